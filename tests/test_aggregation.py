"""Tests of fedspine_jax.aggregation against dense float64 references (numpy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedspine_jax import aggregation as agg
from fedspine_jax.config import AggregationConfig

FAST = settings(max_examples=10, deadline=None, derandomize=True)


def _factors(seed: int, d: int, k: int, ranks) -> tuple[list, list]:
    """Random float32 factor pairs with O(1) products."""
    rng = np.random.default_rng(seed)
    a = [jnp.asarray(rng.normal(size=(d, r)) / np.sqrt(r), jnp.float32) for r in ranks]
    b = [jnp.asarray(rng.normal(size=(r, k)), jnp.float32) for r in ranks]
    return a, b


def _dense(a_list, b_list, weights) -> np.ndarray:
    """float64 reference of the weighted sum of products."""
    return sum(float(w) * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
               for w, a, b in zip(weights, a_list, b_list))


def _truncate(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncated SVD of m (the reference), and all singular values."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    t = min(rank, s.size)
    return (u[:, :t] * s[:t]) @ vt[:t], s


def _prod(a, b) -> np.ndarray:
    return np.asarray(a, np.float64) @ np.asarray(b, np.float64)


def _gap_ok(s: np.ndarray, rank: int) -> bool:
    """The rank-r truncation is well posed (a singular-value gap at r)."""
    return rank >= s.size or s[rank - 1] - s[rank] > 1e-2 * s[0]


# With at most 30 stacked columns (bucketed to 32), (48, 40) and (40, 72) take the QR route
# (s < min(d, k)); the others take the dense-core route.
shapes = st.sampled_from([(48, 40), (40, 72), (12, 9), (40, 7)])
device_ranks = st.lists(st.integers(1, 6), min_size=1, max_size=5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, ranks=device_ranks,
       rank=st.integers(1, 10), data=st.data())
def test_aggregate_lora_is_truncated_svd_of_weighted_sum(seed, shape, ranks, rank, data):
    d, k = shape
    w = np.asarray(data.draw(st.lists(st.floats(0.01, 1.0), min_size=len(ranks),
                                      max_size=len(ranks))), np.float32)
    a_list, b_list = _factors(seed, d, k, ranks)
    dense = _dense(a_list, b_list, w)
    ref, s = _truncate(dense, rank)
    assume(_gap_ok(s, rank))
    a, b = agg.aggregate_lora(a_list, b_list, jnp.asarray(w), rank)
    assert a.shape == (d, rank) and b.shape == (rank, k)
    scale = max(1.0, float(s[0]))
    np.testing.assert_allclose(_prod(a, b), ref, atol=1e-5 * scale)
    if sum(ranks) <= rank:           # nothing truncated: the product is the sum itself
        np.testing.assert_allclose(_prod(a, b), dense, atol=1e-5 * scale)
    # Split: a has orthonormal columns, b b^T = diag(S^2), singular values decreasing.
    gram_a = np.asarray(a, np.float64).T @ np.asarray(a, np.float64)
    gram_b = np.asarray(b, np.float64) @ np.asarray(b, np.float64).T
    t = min(rank, s.size)
    s_ref, eye = np.zeros(rank), np.zeros(rank)
    s_ref[:t], eye[:t] = s[:t], 1.0
    np.testing.assert_allclose(gram_a, np.diag(eye), atol=1e-5)
    np.testing.assert_allclose(gram_b, np.diag(s_ref ** 2), atol=1e-5 * scale ** 2)


@pytest.mark.parametrize("shape", [(48, 40), (16, 11)])      # QR route, dense-core route
def test_aggregate_lora_pads_when_sum_of_ranks_is_below_rank(shape):
    a_list, b_list = _factors(0, *shape, [1, 2])
    w = jnp.asarray([0.25, 0.75])
    a, b = agg.aggregate_lora(a_list, b_list, w, 8)
    assert a.shape == (shape[0], 8) and b.shape == (8, shape[1])
    # Directions past the sum's rank 3: zero rows of b, orthonormal (trainable) columns of a.
    np.testing.assert_allclose(np.asarray(b[3:]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a).T @ np.asarray(a), np.eye(8), atol=1e-5)
    np.testing.assert_allclose(_prod(a, b), _dense(a_list, b_list, w), atol=1e-5)


def test_aggregate_lora_wide_stack_skips_qr_and_stays_exact():
    # sum r = 30 > d = 8 and > k = 6: the core is the dense sum itself.
    a_list, b_list = _factors(3, 8, 6, [10, 10, 10])
    w = jnp.asarray([0.2, 0.3, 0.5])
    dense = _dense(a_list, b_list, w)
    a, b = agg.aggregate_lora(a_list, b_list, w, 6)      # rank = min(d, k): exact
    np.testing.assert_allclose(_prod(a, b), dense, atol=1e-5 * np.abs(dense).max())
    a, b = agg.aggregate_lora(a_list, b_list, w, 9)      # beyond min(d, k): zero-padded
    assert a.shape == (8, 9)
    np.testing.assert_allclose(_prod(a, b), dense, atol=1e-5 * np.abs(dense).max())


def test_aggregate_lora_batched_matches_per_layer_calls():
    ranks, n_layers = [2, 4, 3], 3
    a_l = [jnp.stack(x) for x in zip(*[_factors(i, 40, 36, ranks)[0] for i in range(n_layers)])]
    b_l = [jnp.stack(x) for x in zip(*[_factors(i, 40, 36, ranks)[1] for i in range(n_layers)])]
    w_ln = jnp.asarray([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]])
    for weights in (w_ln[0], w_ln):
        a, b = agg.aggregate_lora_batched(a_l, b_l, weights, 4)
        assert a.shape == (n_layers, 40, 4) and b.shape == (n_layers, 4, 36)
        for layer in range(n_layers):
            w = weights if weights.ndim == 1 else weights[layer]
            a1, b1 = agg.aggregate_lora([x[layer] for x in a_l], [x[layer] for x in b_l], w, 4)
            np.testing.assert_allclose(_prod(a[layer], b[layer]), _prod(a1, b1), atol=1e-5)


def test_aggregate_lora_works_inside_an_outer_jit_and_checks_inputs():
    a_list, b_list = _factors(1, 12, 9, [2, 3])
    w = jnp.asarray([0.5, 0.5])

    @jax.jit
    def outer(a_list, b_list, w):
        a, b = agg.aggregate_lora(a_list, b_list, w, 3)
        return a @ b

    np.testing.assert_allclose(np.asarray(outer(a_list, b_list, w)),
                               _truncate(_dense(a_list, b_list, w), 3)[0], atol=1e-5)
    # One compiled program, no host callbacks.
    assert "callback" not in outer.lower(a_list, b_list, w).as_text()
    with pytest.raises(ValueError, match="weights"):
        agg.aggregate_lora(a_list, b_list, jnp.ones(3), 3)
    with pytest.raises(ValueError, match="ranks"):
        agg.aggregate_lora(a_list, [b_list[1], b_list[0]], w, 3)


def test_rank_combinations_of_one_bucket_share_one_compiled_core():
    cache_size = getattr(agg._refactor, "_cache_size", None)
    if cache_size is None:
        pytest.skip("this jax does not expose the jit cache size")
    w = jnp.asarray([0.5, 0.3, 0.2])
    agg.aggregate_lora(*_factors(0, 40, 36, [2, 3, 4]), w, 4)     # s = 9 -> bucket 32
    before = cache_size()
    for ranks in ([4, 3, 2], [1, 1, 1], [8, 8, 8], [5, 1, 7]):       # s <= 32: same bucket
        a_list, b_list = _factors(1, 40, 36, ranks)
        a, b = agg.aggregate_lora(a_list, b_list, w, 4)
        np.testing.assert_allclose(_prod(a, b), _truncate(_dense(a_list, b_list, w), 4)[0],
                                   atol=1e-5 * max(1.0, np.abs(_dense(a_list, b_list, w)).max()))
    assert cache_size() == before


@FAST
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, r=st.integers(1, 8),
       rank=st.integers(1, 8))
def test_shrink_lora_is_the_best_rank_r_approximation(seed, shape, r, rank):
    d, k = shape
    (a0,), (b0,) = _factors(seed, d, k, [r])
    dense = _prod(a0, b0)
    ref, s = _truncate(dense, rank)
    assume(_gap_ok(s, rank))
    a, b = agg.shrink_lora(a0, b0, rank)
    assert a.shape == (d, rank) and b.shape == (rank, k)
    if rank >= r:       # zero-padded: the factors are kept and the product is unchanged
        np.testing.assert_array_equal(np.asarray(a[:, :r]), np.asarray(a0))
        np.testing.assert_array_equal(np.asarray(b[:r]), np.asarray(b0))
        np.testing.assert_array_equal(np.asarray(a[:, r:]), 0.0)
        return
    scale = max(1.0, float(s[0]))
    np.testing.assert_allclose(_prod(a, b), ref, atol=1e-5 * scale)
    # Eckart-Young: the error is the norm of the discarded singular values.
    err = np.linalg.norm(dense - _prod(a, b))
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[rank:] ** 2)), rtol=1e-4, atol=1e-5 * scale)



def test_shrunk_fresh_lora_stays_trainable():
    """Round 1: the global pair is a fresh LoRA (Gaussian a, zero b). Shrinking it for a
    lower-rank device must give an orthonormal a (a zero a and zero b would be a saddle where
    neither factor gets a gradient), and still the zero product."""
    rng = np.random.default_rng(0)
    a0 = jnp.asarray(0.02 * rng.normal(size=(48, 8)), jnp.float32)
    a, b = agg.shrink_lora(a0, jnp.zeros((8, 40), jnp.float32), 4)
    np.testing.assert_allclose(np.asarray(a).T @ np.asarray(a), np.eye(4), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(b), 0.0)
    # The gradient of a loss of x @ a @ b with respect to b is then non-zero.
    x = jnp.asarray(rng.normal(size=(5, 48)), jnp.float32)
    g_b = jax.grad(lambda bb: jnp.sum(jnp.sin(x @ a @ bb + 1.0)))(b)
    assert float(jnp.abs(g_b).max()) > 1e-3

@FAST
# XLA on CPU flushes subnormals to zero, so a subnormal total counts as "all zero" there.
@given(imp=st.lists(st.floats(0.0, 1e6, width=32, allow_subnormal=False), min_size=1,
                    max_size=12))
def test_aggregation_weights_are_normalised_importances(imp):
    imp = np.asarray(imp, np.float32)
    w = np.asarray(agg.aggregation_weights(jnp.asarray(imp), "normalized"))
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    assert np.all(w >= 0)
    if imp.sum() > 0:
        np.testing.assert_allclose(w, imp / imp.sum(), rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_allclose(w, 1.0 / imp.size)
    paper = np.asarray(agg.aggregation_weights(jnp.asarray(imp), "paper"))
    np.testing.assert_allclose(paper, w / imp.size, rtol=1e-6)


@pytest.mark.parametrize("bad", [[0.0, 0.0, 0.0], [1.0, np.nan, 2.0], [1.0, np.inf, 2.0]])
def test_aggregation_weights_fall_back_to_uniform(bad):
    w = np.asarray(agg.aggregation_weights(jnp.asarray(bad, jnp.float32)))
    np.testing.assert_allclose(w, [1 / 3] * 3, rtol=1e-6)


def test_aggregation_weights_survive_huge_importances_and_clip_negatives():
    w = np.asarray(agg.aggregation_weights(jnp.asarray([3e38, 3e38, 0.0], jnp.float32)))
    np.testing.assert_allclose(w, [0.5, 0.5, 0.0], rtol=1e-6)   # the sum overflows float32
    w = np.asarray(agg.aggregation_weights(jnp.asarray([-1e-9, 1.0, 3.0], jnp.float32)))
    np.testing.assert_allclose(w, [0.0, 0.25, 0.75], rtol=1e-6)


def test_aggregation_weights_scaling_choices_match_the_config():
    assert set(agg.SCALINGS) == set(
        AggregationConfig.__dataclass_fields__["scaling"].metadata["choices"])
    assert AggregationConfig().scaling == "normalized"
    with pytest.raises(ValueError, match="scaling"):
        agg.aggregation_weights(jnp.ones(2), "mean")


def test_fedavg_lora_averages_factors_and_needs_equal_ranks():
    a_list, b_list = _factors(5, 7, 5, [3, 3, 3])
    w = jnp.asarray([0.5, 0.25, 0.25])
    a, b = agg.fedavg_lora(a_list, b_list, w)
    np.testing.assert_allclose(np.asarray(a), sum(float(wi) * np.asarray(x)
                                                  for wi, x in zip(w, a_list)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(b), sum(float(wi) * np.asarray(x)
                                                  for wi, x in zip(w, b_list)), atol=1e-6)
    a_list, b_list = _factors(5, 7, 5, [3, 2])
    with pytest.raises(ValueError, match="same rank"):
        agg.fedavg_lora(a_list, b_list, jnp.asarray([0.5, 0.5]))


@settings(max_examples=5, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), ranks=device_ranks, extra=st.integers(0, 3))
def test_hetlora_padding_preserves_products_and_weights_are_sparsity(seed, ranks, extra):
    a_list, b_list = _factors(seed, 11, 8, ranks)
    rank = max(ranks) + extra
    for a, b in zip(a_list, b_list):
        ap, bp = agg.pad_lora(a, b, rank)
        assert ap.shape == (11, rank) and bp.shape == (rank, 8)
        np.testing.assert_allclose(_prod(ap, bp), _prod(a, b), rtol=1e-12, atol=1e-12)
    norms = np.asarray([np.linalg.norm(_prod(a, b)) for a, b in zip(a_list, b_list)])
    p = np.asarray(agg.hetlora_weights(a_list, b_list))
    np.testing.assert_allclose(p, norms / norms.sum(), rtol=1e-4)
    a, b = agg.hetlora_aggregate(a_list, b_list, rank)
    padded = [agg.pad_lora(x, y, rank) for x, y in zip(a_list, b_list)]
    np.testing.assert_allclose(np.asarray(a), sum(pi * np.asarray(x[0])
                                                  for pi, x in zip(p, padded)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b), sum(pi * np.asarray(x[1])
                                                  for pi, x in zip(p, padded)), atol=1e-5)
    # Distribution is truncation: the first r components of the global pair.
    at, bt = agg.hetlora_truncate(a, b, min(ranks))
    np.testing.assert_array_equal(np.asarray(at), np.asarray(a[:, :min(ranks)]))
    np.testing.assert_array_equal(np.asarray(bt), np.asarray(b[:min(ranks)]))


def test_hetlora_weights_of_all_zero_updates_are_uniform():
    a_list, b_list = _factors(2, 6, 5, [2, 3])
    b_list = [jnp.zeros_like(b) for b in b_list]
    np.testing.assert_allclose(np.asarray(agg.hetlora_weights(a_list, b_list)), [0.5, 0.5])


@FAST
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 8), gamma=st.floats(0.0, 0.9))
def test_hetlora_self_prune_drops_a_minimal_small_tail(seed, r, gamma):
    rng = np.random.default_rng(seed)
    decay = 10.0 ** -rng.uniform(0, 3, size=r).cumsum()         # trailing components shrink
    a = jnp.asarray(rng.normal(size=(9, r)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(r, 7)) * decay[:, None], jnp.float32)
    a2, b2, new_rank = agg.hetlora_self_prune(a, b, gamma)
    new_rank = int(new_rank)
    assert 1 <= new_rank <= r
    contrib = np.linalg.norm(np.asarray(a, np.float64), axis=0) * np.linalg.norm(
        np.asarray(b, np.float64), axis=1)
    total = contrib.sum()
    assert contrib[new_rank:].sum() < gamma * total or new_rank == r
    if new_rank > 1:          # minimal: dropping one more component would cross the threshold
        assert contrib[new_rank - 1:].sum() >= gamma * total * (1 - 1e-6)
    np.testing.assert_array_equal(np.asarray(a2[:, :new_rank]), np.asarray(a[:, :new_rank]))
    np.testing.assert_array_equal(np.asarray(a2[:, new_rank:]), 0.0)
    np.testing.assert_array_equal(np.asarray(b2[new_rank:]), 0.0)
    err = np.linalg.norm(_prod(a, b) - _prod(a2, b2))
    assert err <= gamma * total * (1 + 1e-5) + 1e-6


def test_hetlora_self_prune_keeps_everything_while_b_is_zero():
    a = jnp.ones((5, 4))
    _, _, new_rank = agg.hetlora_self_prune(a, jnp.zeros((4, 3)), 0.5)
    assert int(new_rank) == 4


def _masked_reference(a_list, b_list, w, col_masks, row_masks) -> np.ndarray:
    """Per entry: weighted mean over the devices keeping it, scaled to the total weight."""
    d, k = a_list[0].shape[0], b_list[0].shape[1]
    n = len(a_list)
    cols = np.ones((n, k)) if col_masks is None else np.asarray(col_masks, np.float64)
    rows = np.ones((n, d)) if row_masks is None else np.asarray(row_masks, np.float64)
    num = np.zeros((d, k))
    den = np.zeros((d, k))
    for i in range(n):
        keep = np.outer(rows[i], cols[i])
        num += w[i] * keep * _prod(a_list[i], b_list[i])
        den += w[i] * keep
    return np.where(den > 0, num * np.sum(w) / np.where(den > 0, den, 1), 0.0)


@pytest.mark.parametrize("sides", ["cols", "rows", "both"])
def test_masked_aggregation_ignores_devices_that_pruned_a_group(sides):
    d, k, ranks = 10, 12, [2, 3, 2]
    a_list, b_list = _factors(7, d, k, ranks)
    w = np.asarray([0.5, 0.3, 0.2], np.float32)
    rng = np.random.default_rng(1)
    cols = rng.integers(0, 2, size=(3, k)).astype(np.float32) if sides != "rows" else None
    rows = rng.integers(0, 2, size=(3, d)).astype(np.float32) if sides != "cols" else None
    if cols is not None:
        cols[:, 0] = [0, 1, 1]            # device 0 pruned output column 0
        cols[:, 1] = 0                    # nobody keeps column 1
        cols[:, 2] = 1                    # everybody keeps column 2
    if rows is not None:
        rows[:, 0] = [1, 0, 1]            # device 1 pruned input row 0
        rows[:, 1] = 1
    # No truncation, so entries compare exactly (the two-sided normaliser makes the masked
    # sum full rank, hence min(d, k) there).
    rank = min(d, k) if sides == "both" else sum(ranks)
    a, b = agg.aggregate_lora_masked(a_list, b_list, jnp.asarray(w), rank,
                                     col_masks=cols, row_masks=rows)
    got = _prod(a, b)
    np.testing.assert_allclose(got, _masked_reference(a_list, b_list, w, cols, rows),
                               atol=1e-5)
    dense = _dense(a_list, b_list, w)
    if cols is not None:
        np.testing.assert_array_equal(np.abs(got[:, 1]) < 1e-6, True)   # nobody keeps it
        if rows is None:      # a column every device keeps is the plain weighted sum
            np.testing.assert_allclose(got[:, 2], dense[:, 2], atol=1e-5)
        # Device 0's values in its pruned column have no influence.
        b_poisoned = list(b_list)
        b_poisoned[0] = b_list[0].at[:, 0].set(1e3)
        a2, b2 = agg.aggregate_lora_masked(a_list, b_poisoned, jnp.asarray(w), rank,
                                           col_masks=cols, row_masks=rows)
        np.testing.assert_allclose(_prod(a2, b2)[:, 0], got[:, 0], atol=1e-4)
    if rows is not None:
        a_poisoned = list(a_list)
        a_poisoned[1] = a_list[1].at[0].set(1e3)
        a2, b2 = agg.aggregate_lora_masked(a_poisoned, b_list, jnp.asarray(w), rank,
                                           col_masks=cols, row_masks=rows)
        np.testing.assert_allclose(_prod(a2, b2)[0], got[0], atol=1e-4)


def test_masked_aggregation_with_all_ones_is_plain_aggregation():
    a_list, b_list = _factors(4, 10, 12, [2, 4])
    w = jnp.asarray([0.3, 0.7])
    a, b = agg.aggregate_lora_masked(a_list, b_list, w, 3, col_masks=jnp.ones((2, 12)))
    a0, b0 = agg.aggregate_lora(a_list, b_list, w, 3)
    np.testing.assert_allclose(_prod(a, b), _prod(a0, b0), atol=1e-5)
    with pytest.raises(ValueError, match="masks"):
        agg.aggregate_lora_masked(a_list, b_list, w, 3)
