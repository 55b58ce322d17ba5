"""Structured-pruning math of FedSpine (paper sections 4.2 and 4.3, Eq. 10-14).

Design note
-----------
Everything here works on arrays, never on model objects, and is ``jax.jit``-able (shapes and
head/kv layouts are static; ratios, eta and scores may be traced).

Orientation: Flax kernels are ``(in, out)``; a LoRA pair is ``a: (in, r)`` (Gaussian init)
and ``b: (r, out)`` (zero init) with effective update ``scale * a @ b``, ``scale = alpha/r``.
The paper's B is our ``b``. The paper writes ``W in R^{d x k}`` with ``Delta W = B A``; its
index formula (Eq. 10) gives the same numbers in either orientation (transposing every matrix
maps one onto the other), so only the orientation of the *result* differs: ours is
``(in, out)`` like ``w``.

The flow on a device:

1. every local step: per-weight importances from the LoRA gradients
   (:func:`lora_guided_importance`, Eq. 10), summed into head and FFN-channel scores
   (:func:`group_importance`, Eq. 11), folded into a moving average
   (:func:`update_importance_ema`, Eq. 12);
2. end of the round: :func:`select_masks` prunes the least important groups until the
   assigned ratio of prunable parameters is gone;
3. the report carries :func:`lora_importance_total` (Eq. 13-14, normalised; the raw
   printed form is :func:`lora_importance_raw`).

Groups (Eq. 11): which slices of which linears a query head, a kv head and an FFN channel
own is declared once, in :mod:`fedspine_jax.models.groups`: a *head* is its ``dh`` output
columns of ``q``, its ``dh`` input rows of ``o`` and its share of ``k`` and ``v``; an FFN
*channel* is its column of ``fc1`` (or ``gate`` and ``up``) and its row of ``fc2`` / ``down``.
Output biases (``o``, ``fc2``) are shared by all groups and never pruned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedspine_jax.models import groups
from fedspine_jax.models.groups import channel_param_count, head_param_counts

__all__ = [
    "channel_importance",
    "channel_param_count",
    "group_importance",
    "head_importance",
    "head_param_counts",
    "lora_guided_importance",
    "lora_importance",
    "lora_importance_raw",
    "lora_importance_total",
    "select_masks",
    "update_importance_ema",
]


def _f32(x) -> jax.Array:
    """``x`` as an array of at least float32 precision (bf16 squares underflow)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# --------------------------------------------------------------------------------------
# Eq. 10: per-weight importance of a frozen kernel from its LoRA gradients
# --------------------------------------------------------------------------------------

def lora_guided_importance(w: jax.Array, a: jax.Array, b: jax.Array, g_a: jax.Array,
                           g_b: jax.Array, scale: float | jax.Array = 1.0) -> jax.Array:
    """LoRA-guided importance of every frozen weight (Eq. 10, after LoRAPrune).

    Orientation ``(in, out)``: ``w: (in, out)``, ``a: (in, r)``, ``b: (r, out)``; ``g_a``,
    ``g_b`` are the loss gradients with respect to ``a`` and ``b`` as the layer uses them
    (the forward already applies ``scale``)::

        I = (scale * (g_a @ b + a @ g_b - g_a @ g_b) * (w + scale * a @ b)) ** 2

    Scale (our decision; the paper has no alpha/r): Eq. 10 estimates the frozen kernel's
    gradient by how one unit SGD step on the factors moves the product:
    ``(a - g_a)(b - g_b) - a b = -(g_a b + a g_b - g_a g_b)``. The layer's effective update is
    ``scale * a @ b``, so the same step moves the *effective* kernel by ``scale`` times that,
    and the weight being removed is the effective ``w + scale * a @ b`` (Eq. 10 zeroes it by
    setting the LoRA product to ``-w``). ``scale = 1`` is the paper's formula as written.

    Rank 0 (``a: (in, 0)``, ``b: (0, out)``): there are no LoRA gradients, so the gradient
    estimate and hence the importance are identically 0 (no exception for any weight). A
    device at rank 0 has no signal to rank groups with; :func:`select_masks` then breaks the
    ties by position, so callers should keep ranks >= 1 where pruning happens (the
    scheduler's ``rank_choices`` are >= 1).

    Args:
      w: (in, out) frozen kernel.
      a: (in, r) LoRA factor; b: (r, out) LoRA factor (the paper's B).
      g_a: (in, r) dL/da; g_b: (r, out) dL/db.
      scale: LoRA scaling alpha / r (float or traced scalar).
    Returns:
      (in, out) importances, float32 or wider.
    """
    w, a, b, g_a, g_b = (_f32(x) for x in (w, a, b, g_a, g_b))
    grad_est = scale * (g_a @ b + a @ g_b - g_a @ g_b)          # (in, out)
    return jnp.square(grad_est * (w + scale * (a @ b)))


# --------------------------------------------------------------------------------------
# Eq. 11: group importance (sum over the weights tied to a head / an FFN channel)
# --------------------------------------------------------------------------------------

def _kv_layout(num_heads: int, num_kv_heads: int,
               kv_index: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Static kv index per query head ``(Hq,)`` and query heads per kv head ``(Hkv,)``."""
    if kv_index is None:
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        kv_index = [h // (num_heads // num_kv_heads) for h in range(num_heads)]
    idx = np.asarray(kv_index, dtype=np.int32).reshape(-1)
    if idx.shape[0] != num_heads or (num_heads and (idx.min() < 0 or idx.max() >= num_kv_heads)):
        raise ValueError(f"kv_index={list(idx)} does not map {num_heads} query heads onto "
                         f"{num_kv_heads} kv heads")
    sizes = np.bincount(idx, minlength=num_kv_heads)
    return idx, sizes


def head_importance(iq: jax.Array, ik: jax.Array, iv: jax.Array, io: jax.Array,
                    num_heads: int, num_kv_heads: int,
                    kv_index: Sequence[int] | None = None, *,
                    iq_bias: jax.Array | None = None, ik_bias: jax.Array | None = None,
                    iv_bias: jax.Array | None = None) -> jax.Array:
    """Importance of every query head of one attention layer (Eq. 11, group Psi).

    A head ``h`` owns its ``dh`` output columns of ``q`` and its ``dh`` input rows of ``o``
    (orientation ``(in, out)``; the paper's "columns of o"). With ``Hkv == Hq`` (BERT) it also
    owns its ``k`` and ``v`` columns.

    Grouped-query attention (decision): heads are scored and masked at *query-head*
    granularity. A kv head is shared by ``g`` query heads (``g`` = how many entries of
    ``kv_index`` point at it); each of them is attributed ``1/g`` of that kv head's ``k`` and
    ``v`` importance, so the scores of a group add up to the weights it really removes. A kv
    head disappears only when all its query heads are pruned (physical compaction does that),
    which is exactly when all its shares have been counted. :func:`head_param_counts` counts
    parameters the same way, so importance per parameter is consistent. The shares use the
    static layout (not the current mask) so that scores are comparable across steps.

    Args:
      iq: (D, Hq*dh) per-weight importance of the q kernel.
      ik, iv: (D, Hkv*dh) of the k and v kernels.
      io: (Hq*dh, D) of the o kernel.
      num_heads: Hq; num_kv_heads: Hkv (static).
      kv_index: optional static (Hq,) kv head of every query head (compacted layers); default
        ``h // (Hq / Hkv)``.
      iq_bias: optional (Hq*dh,) per-entry importance of the q bias; ik_bias, iv_bias:
        optional (Hkv*dh,) of the k and v biases (shared like the kernels).
    Returns:
      (Hq,) head scores.
    """
    if num_heads == 0:  # every head of a compacted layer is gone
        return jnp.zeros((0,), jnp.float32)
    idx, sizes = _kv_layout(num_heads, num_kv_heads, kv_index)
    dh = iq.shape[1] // num_heads
    kernels = {"q": iq, "k": ik, "v": iv, "o": io}
    biases = {"q": iq_bias, "k": ik_bias, "v": iv_bias}
    per_q = _group_sums(groups.ATTENTION[groups.HEAD], kernels, biases, num_heads, dh)
    per_kv = _group_sums(groups.ATTENTION[groups.KV_HEAD], kernels, biases, num_kv_heads, dh)
    share = per_kv / jnp.maximum(jnp.asarray(sizes, per_kv.dtype), 1.0)
    return per_q + share[idx]


def channel_importance(kernel_importance: Mapping[str, jax.Array], *,
                       bias_importance: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Importance of every FFN channel of one layer (Eq. 11, group Phi).

    Channel ``f`` owns column ``f`` of every input-side kernel and row ``f`` of the
    output-side kernel (orientation ``(in, out)``; ``groups.FFN``).

    Args:
      kernel_importance: name -> per-weight importance: ``fc1`` (D, F) and ``fc2`` (F, D)
        for encoders, ``gate``, ``up`` (D, F) and ``down`` (F, D) for LLaMA.
      bias_importance: optional name -> per-entry importance (F,) of ``fc1``'s bias.
    Returns:
      (F,) channel scores.
    """
    linears = groups.FFN["gate" in kernel_importance]
    name, axis = linears[0]
    n = kernel_importance[name].shape[axis]
    return _group_sums(linears, kernel_importance, bias_importance or {}, n, 1)


def _group_sums(linears, kernels: Mapping[str, jax.Array],
                biases: Mapping[str, jax.Array | None], n: int, width: int) -> jax.Array:
    """Eq. 11 sums of ``n`` groups of ``width`` slices each: over their slices of every kernel
    of ``linears`` (``(name, axis)`` pairs, added in that order), then over their entries of
    the biases of the linears they own along ``out`` (those given in ``biases``).

    Returns:
      (n,) float32 or wider.
    """
    score = None
    for name, axis in linears:
        x = _f32(kernels[name])
        s = (x.reshape(x.shape[0], n, width).sum(axis=(0, 2)) if axis == groups.OUT
             else x.reshape(n, width, x.shape[1]).sum(axis=(1, 2)))
        score = s if score is None else score + s
    for name, axis in linears:
        if axis == groups.OUT and biases.get(name) is not None:
            score = score + _f32(biases[name]).reshape(n, width).sum(axis=1)
    return score


def group_importance(kernel_importance: Mapping[str, jax.Array], num_heads: int,
                     num_kv_heads: int, kv_index: Sequence[int] | None = None, *,
                     bias_importance: Mapping[str, jax.Array] | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """Eq. 11 for one transformer layer: head and FFN-channel scores.

    ``kernel_importance`` maps the layer's linear names (the model's attribute names, as in
    ``LoRAConfig.targets``) to per-weight importances (:func:`lora_guided_importance`):
    ``q, k, v, o`` and either ``fc1, fc2`` (encoders) or ``gate, up, down`` (LLaMA). A linear
    without LoRA has no importance estimate: pass ``jnp.zeros_like`` of its kernel.
    ``bias_importance`` optionally maps ``q, k, v, fc1`` to per-entry bias importances.

    Args:
      kernel_importance: name -> importance array shaped like that kernel.
      num_heads, num_kv_heads, kv_index: as in :func:`head_importance`.
      bias_importance: optional name -> (out,) bias importance.
    Returns:
      head scores (Hq,), channel scores (F,).
    """
    owned = groups.owned("gate" in kernel_importance)
    missing = [n for linears in owned.values() for n, _ in linears
               if n not in kernel_importance]
    if missing:
        raise KeyError(f"group_importance: missing kernel importances {missing}")
    bias = bias_importance or {}
    heads = head_importance(*(kernel_importance[n] for n in ("q", "k", "v", "o")), num_heads,
                            num_kv_heads, kv_index, iq_bias=bias.get("q"),
                            ik_bias=bias.get("k"), iv_bias=bias.get("v"))
    channels = channel_importance(kernel_importance, bias_importance=bias)
    return heads, channels


# --------------------------------------------------------------------------------------
# Eq. 12: moving average over the local steps
# --------------------------------------------------------------------------------------

def update_importance_ema(prev, new, eta: float | jax.Array, first: bool | jax.Array):
    """Moving average of group scores (Eq. 12): ``Theta_k = eta Theta_{k-1} + (1-eta) hat_k``.

    Initialisation (decision): ``Theta_1 = hat Theta_1`` (``first`` true) instead of the
    literal ``Theta_0 = 0``. A zero start multiplies every score by ``1 - eta^k`` (the same
    factor for all groups, so the ranking would not change), but it would keep scores far
    below the per-step scale for small k (and identically 0 at ``eta = 1``); starting from the
    first estimate keeps Theta on the scale of one step's importance. Whether the average is
    carried across rounds is the caller's choice (set ``first`` at the first step it
    averages).

    Works on any pytree (e.g. lists of per-layer head and channel scores).

    Args:
      prev: pytree of arrays, Theta_{k-1} (ignored when ``first``; pass zeros then).
      new: pytree of the same structure and shapes, hat Theta_k (Eq. 11).
      eta: moving-average factor in [0, 1] (float or traced scalar).
      first: whether this is the first step (bool or traced bool).
    Returns:
      Theta_k, same structure as ``new``.
    """
    return jax.tree.map(
        lambda p, n: jnp.where(first, n, eta * p + (1.0 - eta) * n).astype(n.dtype),
        prev, new)


# --------------------------------------------------------------------------------------
# Mask selection (section 4.2, end)
# --------------------------------------------------------------------------------------

def _flat(tree):
    """A (L, G) array or a sequence of (G_l,) arrays -> flat (sum G_l,) array and sizes."""
    if isinstance(tree, (list, tuple)):
        parts = [jnp.reshape(jnp.asarray(x), (-1,)) for x in tree]
        sizes = [int(p.shape[0]) for p in parts]
        flat = jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)
        return flat, sizes, True
    arr = jnp.asarray(tree)
    if arr.ndim != 2:
        raise ValueError(f"expected (L, G) scores/masks or a list per layer, got {arr.shape}")
    return arr.reshape(-1), [int(arr.shape[1])] * int(arr.shape[0]), False


def _flat_params(params, sizes: list[int], as_list: bool) -> jax.Array:
    """Parameter counts (scalar, per layer, or per group) broadcast to the flat layout."""
    if as_list and isinstance(params, (list, tuple)):
        parts = [jnp.broadcast_to(_f32(p), (s,)) for p, s in zip(params, sizes, strict=True)]
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)
    p = _f32(params)
    if as_list and p.ndim == 0:
        return jnp.broadcast_to(p, (sum(sizes),))
    return jnp.broadcast_to(p, (len(sizes), sizes[0] if sizes else 0)).reshape(-1)


def _unflat(flat: jax.Array, sizes: list[int], as_list: bool, dtype):
    flat = flat.astype(dtype)
    if not as_list:
        return flat.reshape(len(sizes), -1) if sizes else flat.reshape(0, 0)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]


def select_masks(head_scores, channel_scores, head_masks, channel_masks,
                 ratio: float | jax.Array, *, head_params, channel_params,
                 min_heads: int | jax.Array = 1, min_channels: int | jax.Array = 1):
    """Prune the least important groups until ``ratio`` of the prunable parameters are gone.

    Section 4.2 ("selects the top p% unimportant groups and sets their masks to 0").

    Decisions:

    * **Global ranking, heads and channels together, by importance per parameter.** The
      ratio is a fraction of *parameters* (Eq. 2's size constraint), so removing the groups
      with the lowest Theta / (parameters) is the greedy answer to "remove p of the
      parameters while losing the least importance" (as in LLM-Pruner's global ranking and
      APT's parameter-budgeted pruning). Raw sums could not be compared across types: a head
      carries ~``2 dh`` times a channel's weights, so its Eq. 11 sum is larger for that
      reason alone. Ranking across layers lets unimportant layers lose more; ``min_heads`` /
      ``min_channels`` keep every layer alive (the ``min`` most important groups of each layer
      and type are never candidates).
    * **Monotone masks.** Pruning only adds to the mask: already-pruned groups stay pruned and
      count towards the ratio; a ratio already reached prunes nothing.
    * **Ratio reached from above, to within one small group.** Pass 1 takes the longest
      prefix of the ranking that stays within the budget; pass 2 fills the remaining gap
      (smaller than the group that did not fit) with the smallest remaining candidate groups,
      least important first, until the budget is met. So the achieved ratio is >= ``ratio``
      (the paper's preference constraint ``1 - size/size_0 >= p``) and overshoots by less
      than one parameter count of the smallest remaining candidates (one FFN channel in
      practice), up to float32 rounding (relative 1e-6). If the minimums leave too few
      candidates, every candidate is pruned and the achieved ratio is below ``ratio``.
    * Ties (e.g. all-zero scores at rank 0) are broken by position (layer, then index).

    The ratio is over the prunable parameters only: the sum of ``head_params`` and
    ``channel_params`` over all groups (pruned or not).

    Args:
      head_scores: (L, H) array or list of (H_l,) arrays: Theta per head (Eq. 12), >= 0.
      channel_scores: (L, F) array or list of (F_l,) arrays.
      head_masks, channel_masks: 0/1 masks of the same shapes (1 = kept).
      ratio: target fraction of prunable parameters removed (float or traced scalar).
      head_params: frozen parameters per head (> 0): a scalar, one per layer (list form), or
        an array/list shaped like ``head_scores`` (see :func:`head_param_counts`).
      channel_params: the same for channels (see :func:`channel_param_count`).
      min_heads, min_channels: groups every layer keeps at least.
    Returns:
      ``(new_head_masks, new_channel_masks, achieved_ratio)``: masks in the input structure
      and dtype, achieved ratio a float32 scalar.
    """
    sh, h_sizes, h_list = _flat(head_scores)
    sc, c_sizes, c_list = _flat(channel_scores)
    mh, _, _ = _flat(head_masks)
    mc, _, _ = _flat(channel_masks)
    if mh.shape != sh.shape or mc.shape != sc.shape:
        raise ValueError("masks must have the shapes of their scores")
    ph = _flat_params(head_params, h_sizes, h_list)
    pc = _flat_params(channel_params, c_sizes, c_list)
    n_seg = len(h_sizes) + len(c_sizes)
    seg_sizes = np.asarray(h_sizes + c_sizes, dtype=np.int64)
    seg = jnp.asarray(np.repeat(np.arange(n_seg), seg_sizes), jnp.int32)      # (G,)
    seg_start = jnp.asarray(np.concatenate([[0], np.cumsum(seg_sizes)[:-1]]), jnp.int32)
    mins = jnp.concatenate([jnp.full((len(h_sizes),), min_heads, jnp.int32),
                            jnp.full((len(c_sizes),), min_channels, jnp.int32)])

    score = jnp.concatenate([_f32(sh), _f32(sc)])
    params = jnp.concatenate([ph, pc])
    kept = jnp.concatenate([mh, mc]) > 0.5
    density = score / params
    inf = jnp.asarray(jnp.inf, density.dtype)
    pos = jnp.arange(score.shape[0], dtype=jnp.int32)

    # Candidates: the kept groups of each (layer, type) segment except its `min` most
    # important ones. Sort by segment, kept groups first by ascending density.
    order = jnp.lexsort((jnp.where(kept, density, inf), seg))
    kept_count = jax.ops.segment_sum(kept.astype(jnp.int32), seg, num_segments=n_seg)
    seg_sorted = seg[order]
    rank_in_seg = pos - seg_start[seg_sorted]
    cand_sorted = kept[order] & (rank_in_seg < kept_count[seg_sorted] - mins[seg_sorted])
    cand = jnp.zeros_like(kept).at[order].set(cand_sorted)

    total = params.sum()
    tol = 1e-6 * total
    budget = ratio * total - jnp.where(kept, 0.0, params).sum()   # still to remove

    # Pass 1: longest prefix of the global ranking within the budget.
    order1 = jnp.argsort(jnp.where(cand, density, inf), stable=True)
    c1 = jnp.where(cand, params, 0.0)[order1]
    take1 = jnp.zeros_like(cand).at[order1].set(cand[order1] & (jnp.cumsum(c1) <= budget + tol))
    gap = budget - jnp.where(take1, params, 0.0).sum()

    # Pass 2: fill the gap with the smallest remaining candidates, least important first.
    cand2 = cand & ~take1
    order2 = jnp.lexsort((jnp.where(cand2, density, inf), jnp.where(cand2, params, inf)))
    c2 = jnp.where(cand2, params, 0.0)[order2]
    before = jnp.cumsum(c2) - c2
    take2 = jnp.zeros_like(cand).at[order2].set(cand2[order2] & (before < gap - tol))

    new_kept = kept & ~take1 & ~take2
    achieved = jnp.where(total > 0, jnp.where(new_kept, 0.0, params).sum()
                         / jnp.maximum(total, 1e-30), 0.0).astype(jnp.float32)
    n_h = sh.shape[0]
    keep = new_kept.astype(jnp.float32)
    return (_unflat(keep[:n_h], h_sizes, h_list, mh.dtype),
            _unflat(keep[n_h:], c_sizes, c_list, mc.dtype), achieved)


# --------------------------------------------------------------------------------------
# Eq. 13-14: importance of a device's LoRA modules
# --------------------------------------------------------------------------------------

def lora_importance(b: jax.Array, g_b: jax.Array) -> jax.Array:
    """Eq. 13 as printed for one LoRA module: ``I(B) = sum_{m,n} (b[m,n] * g_b[m,n]) ** 2``.

    The importance of an entry of B is Eq. 9's squared first-order Taylor term, the
    criterion the paper uses for the frozen weights, summed over the entries. Role: the
    Taylor half of the *raw* Eq. 14 (:func:`lora_importance_raw`), kept for comparison; the
    importance a device reports (:func:`lora_importance_total`) uses the module-level,
    normalised term instead, for the reasons given there (footnote 1 holds only for
    signed sums, ``sum(a * g_a) == sum(b * g_b) == scale * <a @ b, dL/dW>``, not for these
    sums of squares, and these fall like ``1/r`` when the same update is spread over ``r``
    rows). Invariant to the alpha/r scaling (``g_b`` is the gradient of the scaled layer).

    Args:
      b: (r, out) LoRA factor (the paper's B); g_b: (r, out) dL/db.
    Returns:
      scalar (0 for rank 0).
    """
    return jnp.sum(jnp.square(_f32(b) * _f32(g_b)))


def _norm(x: jax.Array) -> jax.Array:
    """Frobenius norm without overflow or underflow of the squares (scaled by max |x|)."""
    x = _f32(x)
    if x.size == 0:
        return jnp.zeros((), x.dtype)
    peak = jnp.max(jnp.abs(x))
    safe = jnp.where(peak > 0, peak, 1.0)
    return peak * jnp.sqrt(jnp.sum(jnp.square(x / safe)))


def _singular_values(x: jax.Array) -> jax.Array:
    """Singular values of a 2-D array (none for an empty one)."""
    x = _f32(x)
    if x.size == 0:
        return jnp.zeros((0,), x.dtype)
    return jnp.linalg.svd(x, compute_uv=False)


def lora_importance_total(b_list: Sequence[jax.Array], g_b_list: Sequence[jax.Array],
                          scales: Sequence[float | jax.Array]) -> jax.Array:
    """Overall LoRA importance of a device, ``I(B_total)`` (Eq. 13 over layers + Eq. 14),
    each term normalised to a dimensionless O(1) ratio.

    Orientation ``(in, out)``: ``b: (r, out)`` (the paper's B), ``g_b = dL/db`` as the layer
    uses it (its forward computes ``x @ a @ b * scale``, ``scale = alpha / r``). On the
    *effective* factor ``B_s = scale_s * b_s`` and its gradient ``G_s = g_b_s / scale_s``
    (so ``<B_s, G_s> = <b_s, g_b_s>``)::

        I(B_total) = T + S
        T = sum_s |<B_s, G_s>| / (||B|| * ||G||)                  Eq. 13, in [0, 1]
        S = (1/d1) sum_s sum_e sigma_e(B_s) / ||B_s||_F            Eq. 14, see below

    ``||B||``, ``||G||``: Frobenius norms of all the device's effective factors (gradients)
    taken together; ``sigma_e``: singular values; ``d1 = len(b_list)``. A module of rank 0,
    of scale 0 or with ``b = 0`` adds 0 to both sums (it still counts in ``d1``, as in the
    paper's average over modules); ``T = 0`` when ``B`` or ``G`` is 0; an empty list gives 0.

    Decision (Eq. 13-14, normalisation). As printed, Eq. 14 adds a sum of squared Taylor
    terms (units of loss squared) to an average singular value of the raw B (units of the
    factor, set by alpha, r, the init and the optimiser). On ``configs/tiny.yaml`` (20 local
    steps) the first is 1e-9 to 1e-6 and the second 0.1 to 0.6: 5-8 orders of magnitude
    apart, so Eq. 16's weights reward rank, not data. We keep the paper's two terms and make
    each the ratio of a device quantity to its natural bound, computed on the device from
    its own factors and gradients only:

    * Eq. 13 (data): a module's importance is the magnitude of the first-order loss change
      of removing its update, ``|sum_{m,n} B G| = |<B_s, G_s>|`` (Eq. 8-9 applied at the
      granularity Eq. 13 assigns importance to: the signed entry terms are summed, then
      the magnitude taken). This is the one reading under which footnote 1 holds (A and B
      give the same number, ``scale * <a @ b, dL/dW>``), and it is invariant to rotations
      of the rank space, whose basis (the columns of the Gaussian ``a``) is arbitrary.
      The per-entry squares of :func:`lora_importance` are not: they fall like ``1/r``
      when the same update is spread over ``r`` rows (measured on tiny.yaml: 4x lower at
      r = 8 than at r = 2 with identical loss curves, where ``T`` moved by 3 %). Divided
      by its Cauchy-Schwarz bound it is a cosine: near 1 when the round's gradient lies
      along the whole update, near 0 when it is noise around a converged one. The
      absolute value is taken per module, so modules of opposite sign do not cancel.
    * Eq. 14 (structure): singular values in units of the module's own Frobenius norm,
      ``sum_e sigma_e / ||B_s||_F = ||B_s||_* / ||B_s||_F``, which lies in
      ``[1, sqrt(rank B_s)]`` (the square root of the spectrum's effective rank). The
      paper's "larger singular values carry more information" is read relative to the
      module's size: it rewards the rank a device uses (energy spread over more
      directions), not the rank it was given, and the overall scale that alpha, r, the
      init and the learning rate give the factor drops out.

    Properties: (a) invariant to ``b -> c b, alpha -> alpha / c`` per module (any
    ``c != 0``; ``g_b -> g_b / c`` follows); (b) padding a module with zero rows of ``b``
    and ``g_b`` at the same scale (the same effective update) changes nothing; (c) ``T`` is
    in ``[0, 1]`` (0.17 to 0.76 measured) and ``S`` in ``[0, sqrt(r_max)]`` (1.07 to 1.18
    measured), so neither term dominates by construction; (d) non-negative and finite for
    finite inputs (factors are rescaled by their largest entry before any square or SVD).
    The raw form as printed is :func:`lora_importance_raw`.

    Args:
      b_list: the device's LoRA ``b`` factors, each (r, out) (all layers, all targets).
      g_b_list: matching dL/db, each (r, out).
      scales: matching LoRA scalings ``alpha / r`` (floats or traced scalars; 0 for rank 0).
    Returns:
      scalar, float32.
    """
    if not len(b_list) == len(g_b_list) == len(scales):
        raise ValueError(f"{len(b_list)} b factors, {len(g_b_list)} gradients and "
                         f"{len(scales)} scales")
    if not b_list:
        return jnp.zeros((), jnp.float32)
    mods = [(_f32(b), _f32(g), jnp.abs(_f32(s))) for b, g, s in zip(b_list, g_b_list, scales)
            if jnp.size(b)]
    if not mods:
        return jnp.zeros((), jnp.float32)
    # T is unchanged by b -> c b (all modules) and g -> c' g (all modules) separately, and by
    # scale -> c'' scale (all modules): bring every factor, gradient and scale to max 1.
    peak_b = jnp.max(jnp.stack([jnp.max(jnp.abs(b)) for b, _, _ in mods]))
    peak_g = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for _, g, _ in mods]))
    peak_s = jnp.max(jnp.stack([s for _, _, s in mods]))
    peak_b, peak_g, peak_s = (jnp.where(p > 0, p, 1.0) for p in (peak_b, peak_g, peak_s))
    dots, b_norms, g_norms, spectra = [], [], [], []
    for b, g, s in mods:
        on = s > 0                                  # scale 0: the branch is off
        s = jnp.where(on, s / peak_s, 1.0)
        b, g = b / peak_b, g / peak_g
        dots.append(jnp.where(on, jnp.abs(jnp.sum(b * g)), 0.0))   # |<B_s, G_s>|
        b_norms.append(jnp.where(on, s * _norm(b), 0.0))            # ||B_s||
        g_norms.append(jnp.where(on, _norm(g) / s, 0.0))            # ||G_s||
        sv = _singular_values(b)
        fro = _norm(sv)
        spectra.append(jnp.where(on & (fro > 0), jnp.sum(sv) / jnp.where(fro > 0, fro, 1.0),
                                 0.0))
    dot = jnp.sum(jnp.stack(dots))
    bound = _norm(jnp.stack(b_norms)) * _norm(jnp.stack(g_norms))
    ok = (dot > 0) & (bound > 0) & jnp.isfinite(bound)
    taylor = jnp.where(ok, dot / jnp.where(ok, bound, 1.0), 0.0)
    spectral = jnp.sum(jnp.stack(spectra)) / len(b_list)
    return (taylor + spectral).astype(jnp.float32)


def lora_importance_raw(b_list: Sequence[jax.Array], g_b_list: Sequence[jax.Array]
                        ) -> jax.Array:
    """Eq. 13-14 exactly as printed, for comparison (not what a device reports).

    ``sum_s lora_importance(b_s, g_b_s) + (1/d1) sum_s sum_e sigma_e(b_s)`` on the raw ``b``
    factors ``(r, out)``: depends on alpha and r, and its second term dominates (see
    :func:`lora_importance_total`). Rank-0 modules add 0 and count in ``d1``.
    """
    if len(b_list) != len(g_b_list):
        raise ValueError(f"{len(b_list)} b factors but {len(g_b_list)} gradients")
    if not b_list:
        return jnp.zeros((), jnp.float32)
    taylor = sum(lora_importance(b, g) for b, g in zip(b_list, g_b_list))
    sv = sum(jnp.sum(_singular_values(b)) for b in b_list) / len(b_list)
    return (taylor + sv).astype(jnp.float32)
