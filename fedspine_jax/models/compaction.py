"""Physical compaction: remove pruned heads and FFN channels, optionally merge LoRA.

Design note
-----------
``compact(model)`` reads the 0/1 head and channel masks and builds a smaller model of the
same class whose layers hold only the kept groups (different counts per layer; a layer may
keep none). Kernels, biases and LoRA factors are gathered by index:

* a query head ``h``: columns ``h*dh:(h+1)*dh`` of ``q`` (kernel, bias, ``lora_b``) and the
  same rows of ``o`` (kernel, ``lora_a``);
* a kv head: its columns of ``k`` and ``v``; it is kept while any of its query heads is;
* an FFN channel: its column of ``fc1`` / ``gate`` / ``up`` and its row of ``fc2`` / ``down``.

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

from fedspine_jax.models.arch import ArchConfig


@dataclasses.dataclass(frozen=True)
class CompactIndex:
    """Which groups of the full model every compacted layer holds (numpy int arrays)."""
    heads: tuple       # per layer: (h_l,) query-head indices into the full layer
    kv_heads: tuple    # per layer: (kv_l,) kv-head indices into the full layer
    channels: tuple    # per layer: (f_l,) channel indices into the full layer


def _cols(idx: np.ndarray, width: int) -> np.ndarray:
    """Column indices of groups ``idx`` of ``width`` columns each."""
    return (idx[:, None] * width + np.arange(width)[None, :]).reshape(-1).astype(np.int32)


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
        kv_of = np.asarray(cfg.kv_index(i), np.int32)
        heads.append(h)
        kvs.append(np.unique(kv_of[h]).astype(np.int32))
        chans.append(_pad(np.flatnonzero(cm > 0).astype(np.int32), cfg.intermediate_size,
                          sizes[1] if sizes else None))
    return CompactIndex(tuple(heads), tuple(kvs), tuple(chans))


def compact_arch(cfg: ArchConfig, index: CompactIndex, merge_lora: bool) -> ArchConfig:
    kv_index = []
    for i, (h, kv) in enumerate(zip(index.heads, index.kv_heads)):
        full = np.asarray(cfg.kv_index(i))
        kv_index.append(tuple(int(np.searchsorted(kv, full[q])) for q in h))
    changes = dict(layer_kv_index=tuple(kv_index),
                   layer_channels=tuple(int(len(c)) for c in index.channels))
    if merge_lora:
        changes.update(lora_targets=(), lora_rank=0)
    return cfg.replace(**changes)


def _copy_linear(dst, src, *, out_idx=None, in_idx=None, merge: bool) -> None:
    """Gather ``src`` (a LoRALinear) into ``dst`` along its output and/or input axis.

    Gathers run in NumPy on host copies: compaction happens once per round outside jit,
    where dispatching one XLA op per gather would cost more than the copies themselves.
    """
    w = np.asarray(src.merged_kernel() if merge else src.kernel[...])
    if out_idx is not None:
        w = w[:, out_idx]
    if in_idx is not None:
        w = w[in_idx, :]
    dst.kernel.set_value(jnp.asarray(w))
    if src.bias is not None:
        bias = np.asarray(src.bias[...])
        dst.bias.set_value(jnp.asarray(bias if out_idx is None else bias[out_idx]))
    if dst.lora_a is not None and not merge:
        a, b = np.asarray(src.lora_a[...]), np.asarray(src.lora_b[...])
        dst.lora_a.set_value(jnp.asarray(a if in_idx is None else a[in_idx, :]))
        dst.lora_b.set_value(jnp.asarray(b if out_idx is None else b[:, out_idx]))


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
    dh = cfg.head_dim
    for i, (src, dst) in enumerate(zip(model.layers, new.layers)):
        qc, kvc = _cols(index.heads[i], dh), _cols(index.kv_heads[i], dh)
        ch = index.channels[i]
        sa, da = src.attn, dst.attn
        _copy_linear(da.q, sa.q, out_idx=qc, merge=merge_lora)
        _copy_linear(da.k, sa.k, out_idx=kvc, merge=merge_lora)
        _copy_linear(da.v, sa.v, out_idx=kvc, merge=merge_lora)
        _copy_linear(da.o, sa.o, in_idx=qc, merge=merge_lora)
        da.head_mask.set_value(jnp.asarray(np.asarray(sa.head_mask[...])[index.heads[i]]))
        sm, dm = src.mlp, dst.mlp
        if sm.gated:
            _copy_linear(dm.gate, sm.gate, out_idx=ch, merge=merge_lora)
            _copy_linear(dm.up, sm.up, out_idx=ch, merge=merge_lora)
            _copy_linear(dm.down, sm.down, in_idx=ch, merge=merge_lora)
        else:
            _copy_linear(dm.fc1, sm.fc1, out_idx=ch, merge=merge_lora)
            _copy_linear(dm.fc2, sm.fc2, in_idx=ch, merge=merge_lora)
        dm.channel_mask.set_value(jnp.asarray(np.asarray(sm.channel_mask[...])[ch]))
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
    dh = full_model.cfg.head_dim
    for i, (full, small) in enumerate(zip(full_model.layers, compact_model.layers)):
        qc, kvc = _cols(index.heads[i], dh), _cols(index.kv_heads[i], dh)
        ch = index.channels[i]
        pairs = [(full.attn.q, small.attn.q, qc, None), (full.attn.k, small.attn.k, kvc, None),
                 (full.attn.v, small.attn.v, kvc, None), (full.attn.o, small.attn.o, None, qc)]
        if full.mlp.gated:
            pairs += [(full.mlp.gate, small.mlp.gate, ch, None),
                      (full.mlp.up, small.mlp.up, ch, None),
                      (full.mlp.down, small.mlp.down, None, ch)]
        else:
            pairs += [(full.mlp.fc1, small.mlp.fc1, ch, None),
                      (full.mlp.fc2, small.mlp.fc2, None, ch)]
        for f, s, out_idx, in_idx in pairs:
            if f.lora_a is None:
                continue
            a, b = np.array(f.lora_a[...]), np.array(f.lora_b[...])
            if in_idx is None:
                a = np.asarray(s.lora_a[...])
            else:
                a[in_idx] = np.asarray(s.lora_a[...])
            if out_idx is None:
                b = np.asarray(s.lora_b[...])
            else:
                b[:, out_idx] = np.asarray(s.lora_b[...])
            f.lora_a.set_value(jnp.asarray(a))
            f.lora_b.set_value(jnp.asarray(b))
