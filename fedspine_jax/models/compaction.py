"""Physical compaction: remove pruned heads and FFN channels, optionally merge LoRA.

Design note
-----------
``compact(model)`` reads the 0/1 head and channel masks and builds a smaller model of the
same class whose layers hold only the kept groups (different counts per layer; a layer may
keep none). Every linear is gathered along the axis its owning groups own
(:mod:`fedspine_jax.models.groups`): along ``out`` the kernel's columns, the bias and
``lora_b``'s columns; along ``in`` the kernel's rows and ``lora_a``'s rows. A kv head is kept
while any of its query heads is.

``sizes`` pads every layer up to given head / channel counts with pruned groups whose mask
stays 0, so that training on compacted shapes compiles once per size bucket, not once per
mask pattern (the padded groups compute but contribute nothing). With ``merge_lora`` the
effective update ``(alpha/r) a @ b`` is added to each kernel and the result has no adapters.
The compacted model's outputs equal the masked model's (fp32 round-off).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedspine_jax.models import groups
from fedspine_jax.models.arch import ArchConfig


@dataclasses.dataclass(frozen=True)
class CompactIndex:
    """Which groups of the full model every compacted layer holds (numpy int arrays)."""
    heads: tuple       # per layer: (h_l,) query-head indices into the full layer
    kv_heads: tuple    # per layer: (kv_l,) kv-head indices into the full layer
    channels: tuple    # per layer: (f_l,) channel indices into the full layer


def _pad(keep: np.ndarray, total: int, size: int | None) -> np.ndarray:
    """``keep`` (sorted indices) padded with the first pruned indices up to ``size``."""
    if size is None or size <= len(keep):
        return keep
    rest = np.setdiff1d(np.arange(total), keep)[: size - len(keep)]
    return np.sort(np.concatenate([keep, rest])).astype(np.int32)


def compact_index(model, sizes: tuple[int, int] | None = None) -> CompactIndex:
    """The kept (and padding) groups of every layer from the model's masks.

    Args:
      model: a full (not yet compacted) Encoder or Decoder.
      sizes: optional ``(heads, channels)`` each layer is padded up to.
    """
    cfg: ArchConfig = model.cfg
    if cfg.is_compact:
        raise ValueError("compact a full model; this one is already compacted")
    heads, kvs, chans = [], [], []
    for i, lay in enumerate(model.layers):
        hm = np.asarray(lay.attn.head_mask[...])
        cm = np.asarray(lay.mlp.channel_mask[...])
        h = _pad(np.flatnonzero(hm > 0).astype(np.int32), cfg.num_heads,
                 sizes[0] if sizes else None)
        heads.append(h)
        kvs.append(groups.kv_heads_of(cfg, i, h))
        chans.append(_pad(np.flatnonzero(cm > 0).astype(np.int32), cfg.intermediate_size,
                          sizes[1] if sizes else None))
    return CompactIndex(tuple(heads), tuple(kvs), tuple(chans))


def _kept(index: CompactIndex, layer: int) -> dict[str, np.ndarray]:
    """Group kind -> the groups of the full ``layer`` its compacted layer holds."""
    return {groups.HEAD: index.heads[layer], groups.KV_HEAD: index.kv_heads[layer],
            groups.CHANNEL: index.channels[layer]}


def compact_arch(cfg: ArchConfig, index: CompactIndex, merge_lora: bool) -> ArchConfig:
    kv_index = []
    for i, (h, kv) in enumerate(zip(index.heads, index.kv_heads)):
        full = np.asarray(cfg.kv_index(i))
        kv_index.append(tuple(int(np.searchsorted(kv, full[q])) for q in h))
    changes = {"layer_kv_index": tuple(kv_index),
               "layer_channels": tuple(len(c) for c in index.channels)}
    if merge_lora:
        changes.update(lora_targets=(), lora_rank=0)
    return cfg.replace(**changes)


def _copy_linear(dst, src, axis: int, idx: np.ndarray, *, merge: bool) -> None:
    """Gather ``src`` (a LoRALinear) into ``dst`` at indices ``idx`` of kernel axis ``axis``
    (``groups.IN``: rows, ``groups.OUT``: columns).

    Gathers run in NumPy on host copies: compaction happens once per round outside jit,
    where dispatching one XLA op per gather would cost more than the copies themselves.
    """
    out = axis == groups.OUT
    w = np.asarray(src.merged_kernel() if merge else src.kernel[...])
    dst.kernel.set_value(jnp.asarray(w[:, idx] if out else w[idx, :]))
    if src.bias is not None:
        bias = np.asarray(src.bias[...])
        dst.bias.set_value(jnp.asarray(bias[idx] if out else bias))
    if dst.lora_a is not None and not merge:
        a, b = np.asarray(src.lora_a[...]), np.asarray(src.lora_b[...])
        dst.lora_a.set_value(jnp.asarray(a if out else a[idx, :]))
        dst.lora_b.set_value(jnp.asarray(b[:, idx] if out else b))


@functools.lru_cache(maxsize=64)
def _abstract(cls, cfg: ArchConfig):
    """(graphdef, abstract state) of a model of ``cfg``; tracing a model's init costs
    seconds, and a run compacts to the same few bucketed shapes again and again."""
    return nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))


def compact(model, *, merge_lora: bool = False, sizes: tuple[int, int] | None = None,
            index: CompactIndex | None = None):
    """A physically smaller copy of ``model`` with pruned heads / channels removed.

    Args:
      model: full Encoder or Decoder with head / channel masks.
      merge_lora: fold the LoRA update into the kernels (the result has no adapters).
      sizes: optional per-layer ``(heads, channels)`` padding (see module note).
      index: a precomputed :func:`compact_index` (else computed from the masks).
    Returns:
      (compact_model, index). ``compact_model(input_ids, attention_mask)`` equals
      ``model(input_ids, attention_mask)``.
    """
    index = index or compact_index(model, sizes)
    cfg: ArchConfig = model.cfg
    new_cfg = compact_arch(cfg, index, merge_lora)
    new = nnx.merge(*_abstract(type(model), new_cfg), copy=True)
    src_state = nnx.state(model)
    dst_state = nnx.state(new)
    # Non-layer variables (embeddings, norms, heads) copy unchanged.
    src_flat = dict(nnx.to_flat_state(src_state))
    for path, var in nnx.to_flat_state(dst_state):
        if path[0] != "layers":
            var.set_value(src_flat[path][...])
    for i, (src, dst) in enumerate(zip(model.layers, new.layers)):
        for name, (axis, idx) in groups.owned_slices(cfg, _kept(index, i)).items():
            _copy_linear(groups.linear(dst, name), groups.linear(src, name), axis, idx,
                         merge=merge_lora)
        dst.attn.head_mask.set_value(
            jnp.asarray(np.asarray(src.attn.head_mask[...])[index.heads[i]]))
        dst.mlp.channel_mask.set_value(
            jnp.asarray(np.asarray(src.mlp.channel_mask[...])[index.channels[i]]))
        for name in ("norm1", "norm2", "ln1", "ln2"):
            if hasattr(src, name):
                s_mod, d_mod = getattr(src, name), getattr(dst, name)
                for vname in ("scale", "bias"):
                    if getattr(s_mod, vname, None) is not None:
                        getattr(d_mod, vname).set_value(getattr(s_mod, vname)[...])
    return new, index


def expand_lora(full_model, compact_model, index: CompactIndex) -> None:
    """Write a compacted model's LoRA factors back into the full model, in place.

    The inverse of the gathers in :func:`compact` for the adapters: the kept (and padding)
    columns of ``lora_b`` / rows of ``lora_a`` are overwritten; the factors of groups that
    were not in the compacted model keep their values.
    """
    for i, (full, small) in enumerate(zip(full_model.layers, compact_model.layers)):
        for name, (axis, idx) in groups.owned_slices(full_model.cfg, _kept(index, i)).items():
            f, s = groups.linear(full, name), groups.linear(small, name)
            if f.lora_a is None:
                continue
            a, b = np.array(f.lora_a[...]), np.array(f.lora_b[...])
            if axis == groups.OUT:
                a = np.asarray(s.lora_a[...])
                b[:, idx] = np.asarray(s.lora_b[...])
            else:
                a[idx] = np.asarray(s.lora_a[...])
                b = np.asarray(s.lora_b[...])
            f.lora_a.set_value(jnp.asarray(a))
            f.lora_b.set_value(jnp.asarray(b))
