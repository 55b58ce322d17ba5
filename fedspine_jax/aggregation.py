"""LoRA aggregation: FedSpine's Eq. 15-16, the rank shrink Lambda of Sec. 4.3, and baselines.

Design note
-----------
Every function works on plain factor pairs whose product is the update, in the Flax
orientation (kernels are ``(in, out)``): ``a_i: (d, r_i)``, ``b_i: (r_i, k)`` and
``Delta W_i = a_i @ b_i`` (the paper's B is our ``b``; the paper writes Eq. 15 as B A in the
``(out, in)`` orientation). A layer's ``alpha / r`` scaling is **not** applied here: the
caller folds it into one factor before the call (e.g. passes ``b_i * alpha / r_i``) and
unfolds it from the result (divides the returned ``b`` by ``alpha / R``).

FedSpine's aggregation (Eq. 15-16) rebuilds each device's update ``a_i @ b_i``, takes the
weighted sum ``sum_i w_i a_i @ b_i`` and stores it as global factors of rank R. The sum is
refactorised without forming the ``d x k`` matrix where that saves work:

1. stack ``A = [w_1 a_1, ..., w_N a_N]: (d, s)`` and ``B = [b_1; ...; b_N]: (s, k)``,
   ``s = sum_i r_i``, so that ``A @ B`` is the weighted sum;
2. ``A = Q_A R_A`` and ``B^T = Q_B R_B`` (reduced QR), so ``A @ B = Q_A (R_A R_B^T) Q_B^T``;
3. SVD of the small core ``R_A R_B^T = U S V^T`` and keep the top R triplets (Eckart-Young:
   the best rank-R approximation of the sum in Frobenius and spectral norm);
4. **split**: ``a = Q_A U_R`` (orthonormal columns) and ``b = S_R V_R^T Q_B^T`` (the
   singular values), components ordered by decreasing singular value, so truncating the first
   r columns/rows is again the best rank-r approximation. Fewer than R triplets
   (``min(d, k, s) < R``) are zero-padded to R.

   Why not the balanced split ``U sqrt(S)``, ``sqrt(S) V^T``: the devices *train* these
   factors. A LoRA pair learns like its initialisation, ``a`` of full scale and ``b`` zero;
   with the balanced split a direction of small singular value has both factors near zero,
   and a direction of zero singular value (the first round, when the global ``b`` is still
   zero; or a rank the sum does not fill) has both exactly zero, a saddle where neither
   factor gets a gradient, so the device's LoRA cannot learn in that direction at all. With
   an orthonormal ``a`` every direction stays trainable, its magnitude lives in ``b`` as in a
   fresh LoRA pair, and the product is the same.

The cost is ``O(s^2 (d + k) + s^3)`` against ``O(s d k + d k min(d, k))`` for the dense sum and
its SVD, so the saving is large while ``s`` is well below ``min(d, k)``. When ``s >=
min(d, k)`` (e.g. 80 devices of mean rank 12 on a 768-wide layer) the weighted sum is
generically full rank and its exact truncation needs a full-size SVD whatever the route; the
QRs would only add work, so the core is then the ``(d, k)`` sum itself (``A @ B``) and this
code costs what the dense route costs (see benchmarks/aggregation.py).

Compilation: the devices' ranks change from round to round, and a jitted function of N
factor lists would recompile for every new combination. So the aggregators stack the factors
outside the compiled core (a concatenation, also traceable inside a caller's jit) and pad the
stacked width ``s`` with zero columns/rows to a multiple of ``STACK_BUCKET`` (the product is
unchanged). The compiled core, :func:`_refactor`, sees only ``(d, s_bucket)`` and
``(s_bucket, k)``, so a run compiles once per bucket and shape, a handful of times. Matrix
products use
``Precision.HIGHEST`` so that a GPU server does not aggregate in TF32; the math runs in
float32 at least (bf16 factors are promoted) and returns that dtype.

Do not ``jax.vmap`` these functions over large CPU batches: jaxlib's CPU LAPACK kernels run a
batched QR/SVD as tasks on XLA's intra-op pool and wait for them from a pool thread, so two
independent batched calls (our two QRs) can occupy every thread of a small pool and hang
(seen with jaxlib 0.10.2 on 2 cores). :func:`aggregate_lora_batched` loops with ``lax.map``.

Baselines (paper Sec. 5.2): FedLoRA / FedIT average the factors themselves
(:func:`fedavg_lora`); HETLoRA (Cho et al. 2023) zero-pads heterogeneous ranks and averages
the factors with sparsity weights (:func:`hetlora_aggregate`), distributes by truncation
(:func:`hetlora_truncate`) and prunes ranks on the device (:func:`hetlora_self_prune`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "SCALINGS",
    "STACK_BUCKET",
    "aggregate_lora",
    "aggregate_lora_batched",
    "aggregate_lora_masked",
    "aggregation_weights",
    "fedavg_lora",
    "hetlora_aggregate",
    "hetlora_self_prune",
    "hetlora_truncate",
    "hetlora_weights",
    "pad_lora",
    "shrink_lora",
]

Array = jax.Array

# Values of ``AggregationConfig.scaling`` (see aggregation_weights).
SCALINGS = ("normalized", "paper")

# Stacked widths s = sum_i r_i are zero-padded to a multiple of this (one compile per bucket).
STACK_BUCKET = 32

_HI = jax.lax.Precision.HIGHEST


def _mm(x: Array, y: Array) -> Array:
    return jnp.matmul(x, y, precision=_HI)


def _work_dtype(*xs) -> jnp.dtype:
    """float32 at least (QR/SVD need it), float64 when the inputs are."""
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


# ----------------------------------------------------------------------------------------
# Core refactorisation (shared by Eq. 16 aggregation and the Lambda shrink of Sec. 4.3)
# ----------------------------------------------------------------------------------------

def pad_lora(a: Array, b: Array, rank: int) -> tuple[Array, Array]:
    """Zero-pad a factor pair to ``rank`` (the product ``a @ b`` is unchanged).

    Args:
      a: (d, r); b: (r, k), with ``r <= rank``.
      rank: target rank R.
    Returns:
      ``a': (d, R)`` (zero columns appended) and ``b': (R, k)`` (zero rows appended).
    """
    r = a.shape[1]
    if rank < r:
        raise ValueError(f"pad_lora: rank={rank} is below the current rank {r}")
    return (jnp.pad(a, ((0, 0), (0, rank - r))), jnp.pad(b, ((0, rank - r), (0, 0))))


def _split(u: Array, s: Array, vt: Array, rank: int, width: Array | None = None
           ) -> tuple[Array, Array]:
    """Split the top-``rank`` triplets as ``a = U_R`` (orthonormal), ``b = S_R V_R^T``.

    ``width`` (traced int): triplets from this index on get a zero singular value. The stacked
    width before bucket padding bounds the rank of the sum, so triplets past it are rounding
    noise of the padding. Fewer than ``rank`` triplets are zero-padded.
    """
    t = min(rank, s.shape[0])
    sv = s[:t]
    if width is not None:
        sv = jnp.where(jnp.arange(t) < width, sv, 0.0)
    return pad_lora(u[:, :t], sv[:, None] * vt[:t], rank)


def _refactor_one(a_ds: Array, b_sk: Array, rank: int, width: Array | None = None
                  ) -> tuple[Array, Array]:
    """Best rank-``rank`` factors of ``a_ds @ b_sk`` without the (d, k) product.

    QR of both sides when ``s < min(d, k)`` (else the core is the product itself), SVD of the
    core, split (module design note). ``a_ds: (d, s)``, ``b_sk: (s, k)`` -> ``(d, rank)``, ``(rank, k)``;
    ``width``: the unpadded stacked width (see :func:`_split`).
    """
    d, s = a_ds.shape
    k = b_sk.shape[1]
    if s == 0:
        return jnp.zeros((d, rank), a_ds.dtype), jnp.zeros((rank, k), b_sk.dtype)
    if s >= min(d, k):       # the sum is (generically) full rank: the core is the sum itself
        u, sv, vt = jnp.linalg.svd(_mm(a_ds, b_sk), full_matrices=False)
        return _split(u, sv, vt, rank, width)
    q_a, r_a = jnp.linalg.qr(a_ds)                    # (d, s), (s, s)
    q_b, r_b = jnp.linalg.qr(b_sk.T)                  # (k, s), (s, s)
    u, sv, vt = jnp.linalg.svd(_mm(r_a, r_b.T), full_matrices=False)     # core (s, s)
    a, b = _split(u, sv, vt, rank, width)
    return _mm(q_a, a), _mm(b, q_b.T)


@functools.partial(jax.jit, static_argnames=("rank",))
def _refactor(a_ds: Array, b_sk: Array, w_s: Array, width: Array, rank: int
              ) -> tuple[Array, Array]:
    """Best rank-``rank`` factors of ``(a_ds * w_s) @ b_sk``: the compiled core of every
    aggregator here. Shapes ``(d, s)``, ``(s, k)``, ``(s,)``, or with a leading layer axis
    ``(L, d, s)``, ``(L, s, k)``, ``(L, s)`` looped over with ``lax.map`` (not vmap: batched
    LAPACK calls can hang, see the design note)."""
    def one(args):
        a, b, w = args
        return _refactor_one(a * w, b, rank, width)
    if a_ds.ndim == 2:
        return one((a_ds, b_sk, w_s))
    return jax.lax.map(one, (a_ds, b_sk, w_s))


def _check_pairs(a_list: Sequence[Array], b_list: Sequence[Array], n_weights: int | None
                 ) -> None:
    if len(a_list) != len(b_list) or not a_list:
        raise ValueError(f"need one b per a and at least one device, got {len(a_list)} a and "
                         f"{len(b_list)} b")
    if n_weights is not None and n_weights != len(a_list):
        raise ValueError(f"{n_weights} weights for {len(a_list)} devices")
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"device {i}: a {a.shape} and b {b.shape} have different ranks")


def _stack(a_list: Sequence[Array], b_list: Sequence[Array], weights: Array
           ) -> tuple[Array, Array, Array, Array]:
    """The stacked pair and column weights, zero-padded to a stacked-width bucket.

    ``A = [a_1, ..., a_N, 0]: ([L,] d, s')``, ``B = [b_1; ...; b_N; 0]: ([L,] s', k)`` and
    ``w_s: ([L,] s')``, device i's weight repeated over its r_i columns, so that
    ``(A * w_s) @ B = sum_i w_i a_i @ b_i``; ``s = sum_i r_i`` is padded with zero columns /
    rows to ``s'``, a multiple of STACK_BUCKET (one compile per bucket; the padding is part
    of the one concatenation, not a second copy). Also returns ``s`` as an int32 array (not
    a compile key; see :func:`_split`).

    ``weights``: (N,), or (L, N) per layer when the factors carry a leading layer axis.
    A few array ops whatever N (this runs outside the compiled core, see the design note).
    """
    dt = _work_dtype(weights, *a_list, *b_list)
    ranks = [a.shape[-1] for a in a_list]
    s = sum(ranks)
    pad = -s % STACK_BUCKET
    lead = a_list[0].shape[:-2]
    d, k = a_list[0].shape[-2], b_list[0].shape[-1]
    w_s = jnp.repeat(jnp.asarray(weights, dt), jnp.asarray(ranks), axis=-1,
                     total_repeat_length=s)
    w_s = jnp.pad(w_s, [(0, 0)] * (w_s.ndim - 1) + [(0, pad)])          # (s',), small
    a_parts = [a.astype(dt) for a in a_list] + ([jnp.zeros(lead + (d, pad), dt)] if pad else [])
    b_parts = [b.astype(dt) for b in b_list] + ([jnp.zeros(lead + (pad, k), dt)] if pad else [])
    return (jnp.concatenate(a_parts, axis=-1), jnp.concatenate(b_parts, axis=-2), w_s,
            jnp.asarray(s, jnp.int32))


# ----------------------------------------------------------------------------------------
# FedSpine: Eq. 15-16 and the Lambda shrink of Sec. 4.3
# ----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("scaling",))
def aggregation_weights(importances: Array, scaling: str = "normalized") -> Array:
    """Aggregation weights c_i of Eq. 16 from the devices' LoRA importances (Eq. 14).

    Eq. 16 reads ``Delta W^{t+1} = (1/N) sum_i c_i Delta W_i`` with
    ``c_i = I(B_i^total) / sum_j I(B_j^total)``. Decision: since the c_i are already
    normalised (they sum to 1), the extra 1/N would shrink the aggregated update N-fold every
    round (with N = 80 devices, to 1/80 of any device's update), which no weighted mean does;
    we read it as a typesetting slip. ``scaling="normalized"`` (the default,
    ``AggregationConfig.scaling``) returns ``c_i`` (a weighted mean, summing to 1);
    ``scaling="paper"`` returns ``c_i / N`` as written (summing to 1/N).

    Guard: Eq. 14's importances are non-negative; negative entries (rounding) are clipped to
    0. When any importance is non-finite, or all are zero, the weights fall back to uniform
    (``1/N`` each, then the scaling), so one device's bad report cannot poison the round.

    Args:
      importances: (N,) the devices' ``I(B_i^total)`` of Eq. 14.
      scaling: "normalized" or "paper".
    Returns:
      (N,) float weights ``w_i`` for :func:`aggregate_lora`.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r}: allowed values are {list(SCALINGS)}")
    imp = jnp.asarray(importances)
    imp = imp.astype(_work_dtype(imp))
    n = imp.shape[0]
    clipped = jnp.maximum(imp, 0.0)
    peak = jnp.max(clipped)
    ok = jnp.all(jnp.isfinite(imp)) & (peak > 0)
    # Relative to the max, so the sum cannot overflow. XLA on CPU divides through a
    # reciprocal that flushes below 2^-126: bring a huge max under 2^64 first (exact).
    big = peak > 2.0 ** 64
    clipped = jnp.where(big, clipped * 2.0 ** -64, clipped)
    peak = jnp.where(big, peak * 2.0 ** -64, peak)
    rel = clipped / jnp.where(ok, peak, 1.0)
    c = jnp.where(ok, rel / jnp.sum(rel), 1.0 / n)
    # Eq. 16's 1/N: kept only under "paper" (it shrinks the update N-fold; see above).
    return c / n if scaling == "paper" else c


def aggregate_lora(a_list: Sequence[Array], b_list: Sequence[Array], weights: Array,
                   rank: int) -> tuple[Array, Array]:
    """Heterogeneity-aware aggregation (Eq. 15-16): ``sum_i w_i a_i @ b_i`` at rank R.

    Devices may hold different ranks. The weighted sum of their updates (Eq. 15 rebuilds
    ``Delta W_i = a_i @ b_i``, Eq. 16 sums them) is refactorised to the global rank without
    forming the ``(d, k)`` matrix where that is cheaper: QR of the stacked factors, SVD of the
    small core, top-R triplets, split (see the module design note). The result is the
    best rank-R approximation of the weighted sum; when ``sum_i r_i <= R`` it *is* the sum
    (zero-padded to R). Any ``alpha / r`` scaling is folded into the factors by the caller.

    Traceable (it may be called inside a caller's ``jax.jit``); on its own it runs one
    compiled core per stacked-width bucket, whatever the combination of device ranks.

    Args:
      a_list: N arrays ``a_i: (d, r_i)``.
      b_list: N arrays ``b_i: (r_i, k)``.
      weights: (N,) weights ``w_i`` (:func:`aggregation_weights`); used as given.
      rank: global rank R (a Python int).
    Returns:
      ``a: (d, R) = Q_A U sqrt(S)`` and ``b: (R, k) = sqrt(S) V^T Q_B^T``, components in
      decreasing order of singular value.
    """
    _check_pairs(a_list, b_list, len(weights))
    return _refactor(*_stack(a_list, b_list, weights), rank=rank)


def aggregate_lora_batched(a_list: Sequence[Array], b_list: Sequence[Array], weights: Array,
                           rank: int) -> tuple[Array, Array]:
    """:func:`aggregate_lora` for L same-shaped linears at once (one compiled loop over L).

    The server aggregates every LoRA linear of the model each round (72 for roberta-base);
    stacking the linears of one shape (e.g. q, k, v, o of all layers) gives one call. The
    loop is ``lax.map``, not vmap: jaxlib's CPU LAPACK kernels run a *batched* QR/SVD as
    tasks on XLA's intra-op pool and wait for them from a pool thread, and the two
    independent QRs then fill a 2-thread pool and hang (jaxlib 0.10.2, 2 cores).

    Args:
      a_list: N arrays ``a_i: (L, d, r_i)`` (device i's rank is the same on every linear).
      b_list: N arrays ``b_i: (L, r_i, k)``.
      weights: (N,) weights shared by all linears, or (L, N) per linear.
      rank: global rank R (a Python int).
    Returns:
      ``a: (L, d, R)``, ``b: (L, R, k)``.
    """
    _check_pairs(a_list, b_list, jnp.shape(weights)[-1])
    w_ln = jnp.broadcast_to(jnp.asarray(weights), (a_list[0].shape[0], len(a_list)))
    return _refactor(*_stack(a_list, b_list, w_ln), rank=rank)


@functools.partial(jax.jit, static_argnames=("rank",))
def shrink_lora(a: Array, b: Array, rank: int) -> tuple[Array, Array]:
    """Lambda(a, b, r) of Sec. 4.3: the best rank-``rank`` approximation of ``a @ b``.

    Eckart-Young via QR of ``a`` and ``b^T`` and an SVD of the small core, with the
    split of :func:`aggregate_lora` (so shrinking the global factors to r keeps the top r
    singular directions). If ``rank >= r`` the pair is zero-padded instead, so the product is
    unchanged. Used to shrink the global factors to each device's assigned rank.

    Args:
      a: (d, r); b: (r, k) (any ``alpha / r`` scaling folded in by the caller).
      rank: target rank r' (static).
    Returns:
      ``a': (d, r')``, ``b': (r', k)``.
    """
    if rank >= a.shape[1]:
        return pad_lora(a, b, rank)
    dt = _work_dtype(a, b)
    return _refactor_one(a.astype(dt), b.astype(dt), rank)


def _col_scale(masks_nx: Array, w_n: Array) -> Array:
    """Per-entry factor ``m_ix * sum_j w_j / sum_j w_j m_jx`` (0 where no device keeps x)."""
    kept = _mm(w_n, masks_nx)                                   # (X,)
    scale = jnp.where(kept > 0, jnp.sum(w_n) / jnp.where(kept > 0, kept, 1.0), 0.0)
    return masks_nx * scale


def aggregate_lora_masked(a_list: Sequence[Array], b_list: Sequence[Array], weights: Array,
                          rank: int, col_masks: Array | None = None,
                          row_masks: Array | None = None) -> tuple[Array, Array]:
    """Mask-aware Eq. 16 (``AggregationConfig.mask_aware``): pruned groups do not vote.

    A device that pruned an output group (a head's columns of q/k/v, an FFN channel's column
    of fc1) or an input group (a head's rows of o, a channel's row of fc2) never trains the
    LoRA entries feeding it, so its factors still hold the downloaded values there. Here a
    column ``j`` of the update is the weighted sum over the devices that keep ``j`` only, with
    their weights rescaled to the same total as all weights:
    ``Delta W[:, j] = sum_i w_i m_ij Delta W_i[:, j] * (sum_i w_i) / (sum_i w_i m_ij)``
    (a column no device keeps is 0). Rows with ``row_masks`` likewise.

    With masks on one side only, the rescaling is a diagonal scaling of ``b`` (or ``a``) and
    the low-rank route of :func:`aggregate_lora` applies unchanged. With both sides masked
    the per-entry normaliser ``sum_i w_i n_ip m_ij`` does not factor, so this forms the
    ``(d, k)`` sum and takes its SVD (cost of the dense route; no linear of our models is
    pruned on both sides: heads and FFN channels are column groups of one kernel and row
    groups of the next).

    Args:
      a_list: N arrays ``a_i: (d, r_i)``; b_list: N arrays ``b_i: (r_i, k)``.
      weights: (N,) weights ``w_i``.
      rank: global rank R (a Python int).
      col_masks: (N, k) 0/1, device i keeps output column j; None: all kept.
      row_masks: (N, d) 0/1, device i keeps input row p; None: all kept.
    Returns:
      ``a: (d, R)``, ``b: (R, k)``, split as in :func:`aggregate_lora`.
    """
    _check_pairs(a_list, b_list, len(weights))
    if col_masks is None and row_masks is None:
        raise ValueError("aggregate_lora_masked needs col_masks and/or row_masks; "
                         "use aggregate_lora without masks")
    a_ds, b_sk, w_s, width = _stack(a_list, b_list, weights)
    dt = a_ds.dtype
    w = jnp.asarray(weights, dt)
    ranks = [a.shape[1] for a in a_list]
    pad = a_ds.shape[1] - sum(ranks)

    def per_component(masks_nx):     # device i's mask repeated over its r_i components: (s', X)
        return jnp.concatenate([jnp.broadcast_to(m, (r, masks_nx.shape[1]))
                                for m, r in zip(masks_nx, ranks)] +
                               [jnp.zeros((pad, masks_nx.shape[1]), dt)], axis=0)

    if row_masks is not None and col_masks is not None:
        rows = jnp.asarray(row_masks, dt)
        cols = jnp.asarray(col_masks, dt)
        a_ds = a_ds * w_s * per_component(rows).T
        b_sk = b_sk * per_component(cols)
        return _truncate_masked_sum(a_ds, b_sk, rows, cols, w, rank)
    if col_masks is not None:
        b_sk = b_sk * per_component(_col_scale(jnp.asarray(col_masks, dt), w))
    else:
        a_ds = a_ds * per_component(_col_scale(jnp.asarray(row_masks, dt), w)).T
    return _refactor(a_ds, b_sk, w_s, width, rank=rank)


@functools.partial(jax.jit, static_argnames=("rank",))
def _truncate_masked_sum(a_ds: Array, b_sk: Array, rows_nd: Array, cols_nk: Array,
                         w_n: Array, rank: int) -> tuple[Array, Array]:
    """Two-sided masked sum, formed as (d, k): ``(a_ds @ b_sk) * total / kept``, SVD, split."""
    kept_dk = _mm(rows_nd.T, w_n[:, None] * cols_nk)            # sum_i w_i n_ip m_ij
    scale = jnp.where(kept_dk > 0, jnp.sum(w_n) / jnp.where(kept_dk > 0, kept_dk, 1.0), 0.0)
    u, s, vt = jnp.linalg.svd(_mm(a_ds, b_sk) * scale, full_matrices=False)
    return _split(u, s, vt, rank)


# ----------------------------------------------------------------------------------------
# Baselines (paper Sec. 5.2)
# ----------------------------------------------------------------------------------------

@jax.jit
def fedavg_lora(a_list: Sequence[Array], b_list: Sequence[Array], weights: Array
                ) -> tuple[Array, Array]:
    """FedLoRA / FedIT: FedAvg of the factors themselves, ``sum_i w_i a_i``, ``sum_i w_i b_i``.

    All devices hold the same rank r. The product of the averages is not the average of the
    products (cross terms ``w_i w_j a_i b_j``); that is the baseline's known bias.

    Args:
      a_list: N arrays ``a_i: (d, r)``; b_list: N arrays ``b_i: (r, k)``.
      weights: (N,) weights, used as given (usually data sizes normalised to sum 1).
    Returns:
      ``a: (d, r)``, ``b: (r, k)``.
    """
    _check_pairs(a_list, b_list, len(weights))
    if len({a.shape for a in a_list}) != 1 or len({b.shape for b in b_list}) != 1:
        raise ValueError("fedavg_lora needs every device at the same shapes (same rank); "
                         f"got ranks {[a.shape[-1] for a in a_list]}")
    dt = _work_dtype(weights, *a_list, *b_list)
    w = jnp.asarray(weights, dt)
    a = jnp.tensordot(w, jnp.stack(a_list).astype(dt), axes=1, precision=_HI)
    b = jnp.tensordot(w, jnp.stack(b_list).astype(dt), axes=1, precision=_HI)
    return a, b


def _frobenius_from_factors(a: Array, b: Array) -> Array:
    """``||a @ b||_F`` from the factors: ``sqrt(sum((a^T a) * (b b^T)))``, O(r^2 (d + k))."""
    return jnp.sqrt(jnp.maximum(jnp.sum(_mm(a.T, a) * _mm(b, b.T)), 0.0))


@jax.jit
def hetlora_weights(a_list: Sequence[Array], b_list: Sequence[Array]) -> Array:
    """HETLoRA's sparsity weights: ``p_i = ||a_i b_i||_F / sum_j ||a_j b_j||_F``.

    Cho et al. weight each device by the Frobenius norm of its reconstructed update
    (larger updates carry more information, near-zero ones are mostly noise). The norms are
    computed from the factors, never forming ``a_i @ b_i``. If every update is zero (or a norm
    is non-finite) the weights are uniform.

    Args:
      a_list: N arrays ``a_i: (d, r_i)``; b_list: N arrays ``b_i: (r_i, k)``.
    Returns:
      (N,) weights summing to 1.
    """
    _check_pairs(a_list, b_list, None)
    dt = _work_dtype(*a_list, *b_list)
    norms = jnp.stack([_frobenius_from_factors(a.astype(dt), b.astype(dt))
                       for a, b in zip(a_list, b_list)])
    return aggregation_weights(norms, "normalized")


@functools.partial(jax.jit, static_argnames=("rank",))
def hetlora_aggregate(a_list: Sequence[Array], b_list: Sequence[Array], rank: int | None = None
                      ) -> tuple[Array, Array]:
    """HETLoRA server step: zero-pad to the max rank, sparsity-weighted average of factors.

    Each device's pair is zero-padded to ``rank`` (default: the largest device rank), which
    keeps its product; then ``a = sum_i p_i a_i``, ``b = sum_i p_i b_i`` with the sparsity
    weights ``p_i`` of :func:`hetlora_weights`. As with FedAvg of factors, the product of the
    averages carries cross terms; component j is averaged only with devices that had it
    (the others contribute zeros), which is what biases plain zero-padding toward high ranks.

    Args:
      a_list: N arrays ``a_i: (d, r_i)``; b_list: N arrays ``b_i: (r_i, k)``.
      rank: global rank (static); None: ``max_i r_i``.
    Returns:
      ``a: (d, rank)``, ``b: (rank, k)``.
    """
    _check_pairs(a_list, b_list, None)
    rank = max(a.shape[1] for a in a_list) if rank is None else rank
    padded = [pad_lora(a, b, rank) for a, b in zip(a_list, b_list)]
    return fedavg_lora([p[0] for p in padded], [p[1] for p in padded],
                       hetlora_weights(a_list, b_list))


@functools.partial(jax.jit, static_argnames=("rank",))
def hetlora_truncate(a: Array, b: Array, rank: int) -> tuple[Array, Array]:
    """HETLoRA distribution: device i gets the first ``rank`` components of the global pair.

    ``a[:, :rank]``, ``b[:rank]`` (a zero-pad when ``rank`` exceeds the global rank, keeping
    the product). Unlike :func:`shrink_lora` this is a plain truncation, as in Cho et al.

    Args:
      a: (d, R); b: (R, k); rank: the device's rank r (static).
    Returns:
      ``a': (d, r)``, ``b': (r, k)``.
    """
    if rank >= a.shape[1]:
        return pad_lora(a, b, rank)
    return a[:, :rank], b[:rank]


@jax.jit
def hetlora_self_prune(a: Array, b: Array, gamma: float | Array
                       ) -> tuple[Array, Array, Array]:
    """HETLoRA's device-side rank self-pruning, as implemented here.

    Component j's contribution is the Frobenius norm of its rank-one term,
    ``c_j = ||a[:, j]|| * ||b[j, :]|| = ||a[:, j] b[j, :]||_F``, and ``C = sum_j c_j``. The
    longest trailing run of components whose contributions sum to less than ``gamma * C`` is
    dropped: the new rank r' is the smallest ``r' >= 1`` with ``sum_{j >= r'} c_j < gamma C``
    (r' = r when no trailing component qualifies, e.g. when all of ``b`` is still zero). By
    the triangle inequality the pruned update differs from ``a @ b`` by less than
    ``gamma * C`` in Frobenius norm. At least one component is kept.

    Difference from Cho et al. (2023), as we read their description: they add a regulariser
    on the norm of the trailing components during local training and shrink the rank by a
    decay factor (r <- floor(gamma r)) when that norm has decreased over the round. We keep
    their "trailing components, judged by their norm" but use a direct threshold on the
    components' norm share, which needs no state across rounds and no change to the loss.

    Shapes stay static for jit: the dropped components are zeroed and the new rank is
    returned; the device slices ``a[:, :r']``, ``b[:r']`` outside jit (``int(new_rank)``).

    Args:
      a: (d, r); b: (r, k).
      gamma: threshold share in [0, 1) (0 prunes nothing).
    Returns:
      ``a': (d, r)``, ``b': (r, k)`` with components ``>= r'`` zeroed, and ``r'`` (int32).
    """
    r = a.shape[1]
    if r == 0:
        return a, b, jnp.asarray(0, jnp.int32)
    contrib = jnp.linalg.norm(a, axis=0) * jnp.linalg.norm(b, axis=1)      # (r,)
    tail = jnp.cumsum(contrib[::-1])[::-1]        # tail[j] = sum_{i >= j} c_i
    # tail is non-increasing, so {j in 1..r-1 : tail[j] >= gamma C} is a prefix of 1..r-1.
    new_rank = 1 + jnp.sum(tail[1:] >= gamma * tail[0]).astype(jnp.int32)
    keep = jnp.arange(r) < new_rank
    return a * keep[None, :], b * keep[:, None], new_rank
