"""Which rows and columns of which linears each prunable group owns, declared once.

Design note
-----------
A transformer layer has three kinds of structured groups (paper Eq. 11): query heads
(:data:`HEAD`), key/value heads (:data:`KV_HEAD`) and FFN channels (:data:`CHANNEL`).
:func:`owned` lists, for each kind, the linears it owns and along which axis of their
``(in, out)`` kernels:

* a query head ``h``: output columns ``h*dh:(h+1)*dh`` of ``q`` and the same input rows of
  ``o`` (the paper's "columns of o" in its ``(out, in)`` orientation);
* a kv head: its ``dh`` output columns of ``k`` and ``v``. Masks and pruning work at
  query-head granularity; a kv head is kept while any query head reading it
  (``ArchConfig.kv_index``) is (grouped-query attention, LLaMA);
* an FFN channel: its output column of ``fc1`` (or ``gate`` and ``up``) and its input row of
  ``fc2`` (``down``).

A group owns ``width`` consecutive indices along its axis (``dh`` for heads, 1 for channels)
and, in linears with a bias (encoders), the bias entries of the columns it owns: the biases
of ``o`` and ``fc2``, owned along ``in``, are shared by all groups and never pruned. The
other side of every owned kernel is the model width D. Within a kind the linears are listed
in the order Eq. 11 adds their importances (``pruning``).

Pruning (Eq. 11 sums, parameter counts), compaction (gathers), training (parameter counts)
and the federation's mask-aware aggregation (kept rows / columns) all read these tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedspine_jax.models.arch import ArchConfig

IN, OUT = 0, 1                           # kernel axes of an (in, out) kernel: rows, columns
HEAD, KV_HEAD, CHANNEL = "head", "kv_head", "channel"

ATTENTION = {HEAD: (("q", OUT), ("o", IN)), KV_HEAD: (("k", OUT), ("v", OUT))}
# per FFN family (gated: LLaMA); the output-side kernel first, as Eq. 11 has always added it
FFN = {False: (("fc2", IN), ("fc1", OUT)), True: (("down", IN), ("gate", OUT), ("up", OUT))}

_MODULE = {HEAD: "attn", KV_HEAD: "attn", CHANNEL: "mlp"}   # the layer's sub-module
_OWNER = {name: (kind, axis) for table in ({**ATTENTION, CHANNEL: f} for f in FFN.values())
          for kind, linears in table.items() for name, axis in linears}


def owned(gated: bool) -> dict[str, tuple[tuple[str, int], ...]]:
    """Group kind -> ``((linear name, axis), ...)`` it owns, for a layer whose FFN is gated
    (LLaMA: gate/up/down) or not (encoders: fc1/fc2)."""
    return {**ATTENTION, CHANNEL: FFN[gated]}


def owner(name: str) -> tuple[str, int]:
    """``(group kind, axis)`` owning linear ``name``'s slices (``"o"`` -> ``(HEAD, IN)``)."""
    return _OWNER[name]


def has_bias(arch: ArchConfig) -> bool:
    """Whether the layer linears carry biases (encoders yes, LLaMA no)."""
    return not arch.is_decoder


def width(arch: ArchConfig, kind: str) -> int:
    """Indices one group of ``kind`` owns along its axis: ``dh`` for heads, 1 for channels."""
    return 1 if kind == CHANNEL else arch.head_dim


def linear(layer, name: str):
    """The LoRALinear ``name`` of a transformer layer (``layer.attn.q``, ``layer.mlp.fc1``)."""
    return getattr(getattr(layer, _MODULE[owner(name)[0]]), name)


def slice_index(groups: np.ndarray, group_width: int) -> np.ndarray:
    """``(n * group_width,)`` int32 kernel indices owned by groups ``groups (n,)``."""
    groups = np.asarray(groups, np.int64)
    return (groups[:, None] * group_width
            + np.arange(group_width)[None, :]).reshape(-1).astype(np.int32)


def kv_heads_of(arch: ArchConfig, layer: int, heads: np.ndarray) -> np.ndarray:
    """``(kv_l,)`` sorted int32 kv heads read by query heads ``heads`` of ``layer``."""
    kv_of = np.asarray(arch.kv_index(layer), np.int32)
    return np.unique(kv_of[np.asarray(heads, np.int64)]).astype(np.int32)


def owned_slices(arch: ArchConfig, groups: Mapping[str, np.ndarray]
                 ) -> dict[str, tuple[int, np.ndarray]]:
    """For every linear of a layer, ``(axis, indices)`` that ``groups`` own along it.

    Args:
      arch: the model's architecture (FFN family, head width).
      groups: kind -> group indices, e.g. the kept query heads, kv heads and channels.
    Returns:
      name -> (IN or OUT, int32 kernel indices along that axis).
    """
    out = {}
    for kind, linears in owned(arch.is_decoder).items():
        idx = slice_index(groups[kind], width(arch, kind))
        for name, axis in linears:
            out[name] = (axis, idx)
    return out


def kept_mask(arch: ArchConfig, layer: int, name: str, head_mask: np.ndarray,
              channel_mask: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The rows / columns of linear ``name`` of ``layer`` that a device's masks keep.

    Args:
      arch: the full model's architecture.
      layer: layer index.
      name: linear name (``q, k, v, o, fc1, fc2, gate, up, down``).
      head_mask: (H,) 0/1 query-head mask of that layer; channel_mask: (F,) channel mask.
    Returns:
      ``(column mask (out,) or None, row mask (in,) or None)`` in the masks' dtype: the
      axis the owning groups own is masked, the other is None. A kv head's columns are
      kept while any of its query heads is.
    """
    kind, axis = owner(name)
    if kind == CHANNEL:
        group_mask = np.asarray(channel_mask)
    else:
        group_mask = np.asarray(head_mask)
        if kind == KV_HEAD:
            kv_of = np.asarray(arch.kv_index(layer), np.int64)
            kv = np.zeros(arch.kv_heads(layer), group_mask.dtype)
            np.maximum.at(kv, kv_of, group_mask)
            group_mask = kv
    m = np.repeat(group_mask, width(arch, kind))
    return (m, None) if axis == OUT else (None, m)


# ---------------------------------------------------------------------------------------
# Parameter counts


def _own_params(linears: Sequence[tuple[str, int]], hidden_size: int, group_width: int,
                bias: bool) -> int:
    """Frozen parameters one group owns outright: ``D * width`` per linear, plus ``width``
    bias entries per linear it owns along ``out`` when the linears carry biases."""
    return sum(hidden_size * group_width + (group_width if bias and axis == OUT else 0)
               for _, axis in linears)


def head_param_counts(hidden_size: int, head_dim: int, num_kv_heads: int,
                      kv_index: Sequence[int], *, bias: bool) -> np.ndarray:
    """Frozen parameters one query head carries, counted as ``pruning.head_importance``
    sums importance.

    ``q`` columns and ``o`` rows: ``2 * D * dh``; ``k`` and ``v``: ``2 * D * dh / g`` for a kv
    head shared by ``g`` query heads; with biases (encoders) ``dh`` of q plus ``2 * dh / g``
    of k and v (the ``o`` bias is shared by all heads and not counted).

    Grouped-query attention (decision, the same as ``pruning.head_importance``): a kv head
    read by ``g`` query heads is attributed to them in ``1/g`` shares, so the counts of a
    group add up to the parameters it really removes; the shares use the static layout.

    Args:
      hidden_size: D; head_dim: dh; num_kv_heads: Hkv.
      kv_index: (Hq,) kv head of every query head.
      bias: whether q, k, v carry biases.
    Returns:
      (Hq,) float64 parameter counts (may be fractional under GQA).
    """
    idx = np.asarray(kv_index, np.int64).reshape(-1)
    sizes = np.bincount(idx, minlength=num_kv_heads)
    share = (_own_params(ATTENTION[KV_HEAD], hidden_size, head_dim, bias)
             / np.maximum(sizes, 1))
    return _own_params(ATTENTION[HEAD], hidden_size, head_dim, bias) + share[idx]


def channel_param_count(hidden_size: int, *, gated: bool, bias: bool) -> int:
    """Frozen parameters one FFN channel carries: ``2 D`` (fc1/fc2) or ``3 D`` (gate/up/down),
    plus its ``fc1`` bias entry when ``bias`` (the output bias is shared, not counted)."""
    return _own_params(FFN[gated], hidden_size, 1, bias)


def param_counts(arch: ArchConfig) -> tuple[np.ndarray, int]:
    """Frozen parameters per query head ``(L, H)`` (float64, :func:`head_param_counts`) and
    per FFN channel (one figure) of a full model."""
    bias = has_bias(arch)
    heads = np.stack([head_param_counts(arch.hidden_size, arch.head_dim, arch.num_kv_heads,
                                        arch.kv_index(i), bias=bias)
                      for i in range(arch.num_layers)])
    return heads, channel_param_count(arch.hidden_size, gated=arch.is_decoder, bias=bias)
