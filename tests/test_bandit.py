"""S-UCB (fedspine_jax.bandit): learning on a known surface, invariants, vmap == loop, Eq. 3-6."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedspine_jax import bandit
from fedspine_jax.config import Config, replace

# One small config, fleet size and rollout length for the invariant tests, so the whole
# module compiles select/update only a handful of times.
CFG = replace(Config(), bandit={"capacity": 16, "discount": 0.9, "delta": 0.1,
                                "reward": "paper"},
              pruning={"target_ratio": 0.5, "target_round": 6},
              lora={"rank": 16, "rank_choices": (2, 4, 8, 16)})
A = 4
ROUNDS = 12


def toy_reward(p, r):
    """A deterministic reward of the arm, so runs can be replayed agent by agent."""
    return jnp.sin(7.0 * p) + r.astype(jnp.float32) / 8.0


@jax.jit
def rollout(state, key):
    """``ROUNDS`` of select -> toy reward -> update; returns the state, p and r ``(T, A)``."""
    def body(st, kt):
        st, p, r = bandit.select(st, kt)
        return bandit.update(st, toy_reward(p, r)), (p, r)
    return jax.lax.scan(body, state, jax.random.split(key, ROUNDS))


def agent(state, i):
    """Agent ``i`` of a fleet as a fleet of one (the params are the fleet's)."""
    return jax.tree.map(lambda x: x[i:i + 1], state.replace(params=None)).replace(
        params=state.params)


def test_init_is_a_pytree_of_arrays():
    st = bandit.init(CFG, A, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(st)
    assert all(isinstance(x, jax.Array) for x in leaves)
    assert all(x.shape[0] == A for x in jax.tree.leaves(st.replace(params=None)))
    # The hyperparameters are array leaves: another configuration has the same
    # tree structure, so it runs through the same compiled program.
    want = bandit.BanditParams.from_config(CFG)
    for x, y in zip(jax.tree.leaves(st.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(x, y)
    other = replace(CFG, bandit={"discount": 0.5, "delta": 0.3, "reward": "log"})
    assert jax.tree.structure(bandit.init(other, A, jax.random.key(0))) == treedef
    assert st.u_lo.shape == (A, 16) and st.count.dtype == jnp.float32
    assert np.all(st.num_leaves == 1)
    assert np.all(st.b_hi[:, 0] == 4)  # the root spans all four ranks
    assert len(set(np.asarray(st.stream).tolist())) == A  # distinct random streams
    # select / update keep every aval, so lax.scan and jit see one signature per fleet.
    st2, _, _ = bandit.select(st, jax.random.key(1))
    st3 = bandit.update(st2, jnp.ones(A))
    def avals(s):  # shape, dtype and weak type of every leaf
        return [jax.typeof(x) for x in jax.tree.leaves(s)]

    assert avals(st) == avals(st2) == avals(st3)
    assert not any(a.weak_type for a in avals(st3))
    assert jax.tree.structure(st3) == treedef


@pytest.mark.parametrize("arm_space", ["paper", "floor"])
def test_schedule_ranks_and_monotone_p(arm_space):
    cfg = replace(CFG, bandit={"arm_space": arm_space})
    a, rounds = A, ROUNDS
    state, (p, r) = rollout(bandit.init(cfg, a, jax.random.key(0)), jax.random.key(1))
    p, r = np.asarray(p), np.asarray(r)
    assert p.dtype == np.float32 and r.dtype == np.int32 and p.shape == r.shape == (rounds, a)
    target, t_target = cfg.pruning.target_ratio, cfg.pruning.target_round
    assert np.all(np.diff(p, axis=0) >= 0), "p decreased"
    assert np.all((p >= 0) & (p <= np.float32(target)))
    if arm_space == "floor":
        t = np.arange(1, rounds + 1)[:, None]
        assert np.all(p >= np.float32(target) * np.minimum(t / t_target, 1) - 1e-7), \
            "behind schedule"
        assert np.all(p[t_target - 1:] == np.float32(target)), \
            "target not reached by target_round"
    assert np.all(np.isin(r, cfg.lora.rank_choices))
    assert len(np.unique(r)) > 1 and len(np.unique(p[0])) == a  # it does explore
    assert np.array_equal(state.round, np.full(a, rounds))
    assert np.array_equal(state.last_p, p[-1])


def test_paper_arm_space_is_previous_p_to_target_without_a_schedule():
    """Algorithm 1's arm space [p^{t-1}, p_target]: no schedule floor, no forced target."""
    target, t_target = CFG.pruning.target_ratio, CFG.pruning.target_round
    assert CFG.bandit.arm_space == "paper"  # the default
    a = 256
    st = bandit.init(CFG, a, jax.random.key(0))
    lo, hi = map(np.asarray, bandit.p_bounds(st))
    np.testing.assert_array_equal(lo, 0.0)  # p^0 = 0, not the floor target / target_round
    np.testing.assert_array_equal(hi, np.float32(target))
    floor_lo, _ = bandit.p_bounds(bandit.init(replace(CFG, bandit={"arm_space": "floor"}), a,
                                              jax.random.key(0)))
    np.testing.assert_allclose(floor_lo, target / t_target, rtol=1e-6)
    # The lower bound is exactly the previous ratio, whatever the round.
    moved = st.replace(round=jnp.full((a,), 3 * t_target, jnp.int32),
                       last_p=jnp.linspace(0.0, 0.6, a, dtype=jnp.float32))
    lo, hi = map(np.asarray, bandit.p_bounds(moved))
    np.testing.assert_array_equal(lo, np.asarray(moved.last_p))
    np.testing.assert_array_equal(hi, np.maximum(np.float32(target), lo))

    _, (p, _) = rollout(st, jax.random.key(1))
    p = np.asarray(p)
    prev = np.vstack([np.zeros((1, a), np.float32), p[:-1]])
    assert np.all((prev <= p) & (p <= np.float32(target))), "p outside [p^{t-1}, target]"
    # Round 1 draws over all of [0, target]: some arms sit at (or within 1% of) the target,
    # others below the floor target / target_round that the "floor" arm space imposes.
    assert p[0].max() >= 0.99 * target
    assert p[0].min() < target / t_target
    # Nothing forces the target by target_round: some agents are still short of it.
    assert np.any(p[t_target - 1:] < np.float32(target))


@pytest.mark.parametrize("arm_space", ["paper", "floor"])
def test_p_bounds_hold_the_draws(arm_space):
    st = bandit.init(replace(CFG, bandit={"arm_space": arm_space}), A, jax.random.key(0))
    for t in range(8):
        lo, hi = bandit.p_bounds(st)
        if arm_space == "paper":
            np.testing.assert_array_equal(lo, st.last_p)
        st, p, r = bandit.select(st, jax.random.key(t))
        assert np.all((lo <= p) & (p <= hi))
        expect = np.clip(lo + st.last_u * (hi - lo), lo, hi)
        np.testing.assert_allclose(p, expect, rtol=0, atol=1e-7)
        st = bandit.update(st, toy_reward(p, r))


def test_vmap_over_agents_equals_loop_of_single_agents():
    key = jax.random.key(3)
    fleet = bandit.init(CFG, A, jax.random.key(7))
    end, (p, r) = rollout(fleet, key)
    for i in range(A):
        end_i, (p_i, r_i) = rollout(agent(fleet, i), key)
        np.testing.assert_array_equal(p_i[:, 0], p[:, i])
        np.testing.assert_array_equal(r_i[:, 0], r[:, i])
        for x, y in zip(jax.tree.leaves(end_i), jax.tree.leaves(agent(end, i))):
            np.testing.assert_array_equal(x, y)


def test_vmap_over_fleets_equals_loop_and_is_deterministic():
    fleets = 3
    init_keys = jax.random.split(jax.random.key(0), fleets)
    keys = jax.random.split(jax.random.key(1), fleets)
    stacked = jax.vmap(lambda k: bandit.init(CFG, A, k))(init_keys)
    fleet_rollout = jax.jit(jax.vmap(rollout))
    end, (p, r) = fleet_rollout(stacked, keys)
    for f in range(fleets):
        end_f, (p_f, r_f) = rollout(bandit.init(CFG, A, init_keys[f]), keys[f])
        np.testing.assert_array_equal(p_f, p[f])
        np.testing.assert_array_equal(r_f, r[f])
        for x, y in zip(jax.tree.leaves(end_f), jax.tree.leaves(end)):
            np.testing.assert_array_equal(x, y[f])
    # Deterministic from the keys; other keys give other arms.
    again = fleet_rollout(stacked, keys)[1][0]
    np.testing.assert_array_equal(again, p)
    assert not np.array_equal(p[0], p[1])


def test_upper_bounds_match_eq_4_to_6():
    prm = bandit.BanditParams.from_config(replace(CFG, bandit={"exploration": 0.5}))
    count = jnp.array([2.0, 0.5, 0.0, 0.0], jnp.float32)
    rsum = jnp.array([1.0, 2.0, 0.0, 0.0], jnp.float32)
    live = jnp.array([True, True, True, False])
    u = np.asarray(bandit._upper_bounds(prm, count, rsum, live))
    n = 2.5
    np.testing.assert_allclose(u[:2], [1.0 / 2.0 + 0.5 * np.sqrt(2 * np.log(n) / 2.0),
                                       2.0 / 0.5 + 0.5 * np.sqrt(2 * np.log(n) / 0.5)],
                               rtol=1e-6)
    assert u[2] == np.inf and u[3] == -np.inf  # unvisited live region first; free slot never
    # n_t < 1 (early discounted rounds): padding 0 instead of the sqrt of a negative log.
    u_small = bandit._upper_bounds(prm, jnp.array([0.9, 0.0]), jnp.array([0.45, 0.0]),
                                   jnp.array([True, False]))
    np.testing.assert_allclose(u_small[0], 0.5, rtol=1e-6)


def test_discounted_statistics_follow_eq_4():
    # delta = 2 exceeds the root's diameter sqrt(2): one region, so N and S are Eq. 4's sums.
    cfg = replace(CFG, bandit={"delta": 2.0, "discount": 0.8})
    st = bandit.init(cfg, 1, jax.random.key(0))
    rewards = [0.3, -1.0, 2.0, 0.5, 0.7]
    for t, rew in enumerate(rewards):
        st, _, _ = bandit.select(st, jax.random.key(t))
        assert int(st.last_leaf[0]) == 0 and int(st.num_leaves[0]) == 1
        st = bandit.update(st, jnp.array([rew]))
    lam, t_now = 0.8, len(rewards) + 1
    w = lam ** (t_now - np.arange(1, t_now))
    np.testing.assert_allclose(st.count[0, 0], w.sum(), rtol=1e-6)
    np.testing.assert_allclose(st.reward_sum[0, 0], (w * rewards).sum(), rtol=1e-6)


def test_tree_tiles_the_arm_space_and_stops_at_capacity():
    # delta = 0 splits every chosen region; the p range is held open (last_p reset to 0, far
    # target round) so that the u axis never closes.
    cfg = replace(CFG, bandit={"delta": 0.0}, pruning={"target_round": 1000})
    a, rounds = A, 40
    state = bandit.init(cfg, a, jax.random.key(0))
    key = jax.random.key(5)
    for t in range(rounds):
        state = state.replace(last_p=jnp.zeros_like(state.last_p))
        state, p, r = bandit.select(state, jax.random.fold_in(key, t))
        # The unvisited root is played whole in round 1; one split per round after that.
        np.testing.assert_array_equal(state.num_leaves, min(t + 1, cfg.bandit.capacity))
        k = len(CFG.lora.rank_choices)
        b = np.searchsorted(CFG.lora.rank_choices, np.asarray(r))
        leaf = np.asarray(state.last_leaf)
        rows = np.arange(a)
        # The arm lies in the leaf update() will credit.
        assert np.all(state.u_lo[rows, leaf] <= state.last_u)
        assert np.all(state.last_u <= state.u_hi[rows, leaf])
        assert np.all((state.b_lo[rows, leaf] <= b) & (b < state.b_hi[rows, leaf]))
        state = bandit.update(state, toy_reward(p, r))
    n_live = np.asarray(state.num_leaves)
    assert np.all(n_live == cfg.bandit.capacity), n_live  # filled up, and no further
    # Total discounted count is preserved by splits: n_t = sum_s lambda^(t-s).
    lam = cfg.bandit.discount
    np.testing.assert_allclose(state.count.sum(1), sum(lam ** s for s in range(1, rounds + 1)),
                               rtol=1e-5)
    # Live leaves tile [0, 1] x [0, K): every grid point lies in exactly one of them.
    gu = (np.arange(64) + 0.5) / 64
    for i in range(a):
        live = slice(0, n_live[i])
        ul, uh = np.asarray(state.u_lo[i, live]), np.asarray(state.u_hi[i, live])
        bl, bh = np.asarray(state.b_lo[i, live]), np.asarray(state.b_hi[i, live])
        inside = ((ul[:, None, None] <= gu[None, :, None]) & (gu[None, :, None] < uh[:, None, None])
                  & (bl[:, None, None] <= np.arange(k)[None, None, :])
                  & (np.arange(k)[None, None, :] < bh[:, None, None]))
        assert np.all(inside.sum(0) == 1)
        assert np.all(np.asarray(state.count[i, n_live[i]:]) == 0)


# ---------------------------------------------------------------- learning
P_STAR, R_STAR = 0.6, 4  # the known best arm of the synthetic surface
SURFACE_CFG = replace(Config(), bandit={"discount": 1.0, "exploration": 0.3, "delta": 0.05,
                                        "capacity": 64},
                      pruning={"target_ratio": 0.9, "target_round": 100_000},
                      lora={"rank_choices": (2, 4, 8)})


def surface(p, r):
    """Mean reward: a bump of width 0.1 at p = 0.6 times a rank weight peaking at r = 4."""
    w = jnp.where(r == 4, 1.0, jnp.where(r == 8, 0.5, 0.3))
    return jnp.exp(-0.5 * ((p - P_STAR) / 0.1) ** 2) * w


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def learn(cfg, agents, rounds, key):
    """Agents on the noisy surface over a frozen arm space; returns p, r, mean rewards."""
    def body(st, kt):
        k_sel, k_noise = jax.random.split(kt)
        # Freeze the arm space at [0, target]: the regret of Eq. 7 is defined against a fixed
        # best arm, whereas the real lower bound p^{t-1} moves with every choice.
        st = st.replace(last_p=jnp.zeros_like(st.last_p))
        st, p, r = bandit.select(st, k_sel)
        mean = surface(p, r)
        noisy = mean + 0.1 * jax.random.normal(k_noise, mean.shape)
        return bandit.update(st, noisy), (p, r, mean)
    k_init, k_run = jax.random.split(key)
    state = bandit.init(cfg, agents, k_init)
    return jax.lax.scan(body, state, jax.random.split(k_run, rounds))[1]


def test_pulls_concentrate_on_the_best_region_and_regret_is_sublinear():
    rounds, agents = 300, 32
    p, r, mean = map(np.asarray, learn(SURFACE_CFG, agents, rounds, jax.random.key(0)))
    best = (np.abs(p - P_STAR) < 0.1) & (r == R_STAR)
    half = rounds // 2
    frac_first, frac_second = best[:half].mean(), best[half:].mean()
    uniform = (0.2 / 0.9) / 3  # share of the best region under uniform play
    regret = 1.0 - mean  # the best arm's mean reward is 1
    quarters = regret.reshape(4, -1, agents).sum(1).mean(1)
    print(f"\nbest-region share: first half {frac_first:.3f}, second half {frac_second:.3f} "
          f"(uniform {uniform:.3f}); regret per quarter {[f'{q:.1f}' for q in quarters]}")
    assert frac_second >= 0.6 and frac_second > 5 * uniform
    assert frac_second > frac_first
    assert quarters[2:].sum() < 0.6 * quarters[:2].sum()  # second half << first half
    assert quarters[3] < 0.5 * quarters[0]
    # regret / T falls
    cum = regret.sum(1).cumsum() / np.arange(1, rounds + 1)
    assert cum[-1] < 0.6 * cum[rounds // 4]


# ---------------------------------------------------------------- Eq. 3
def test_reward_is_eq3_with_finite_guards():
    times = jnp.array([10.0, 12.0, 14.0, 20.0])
    dF = jnp.array([0.2, 0.2, -0.1, 0.4])
    dp = jnp.array([0.05, 0.1, 0.1, 0.0])
    imp = jnp.array([3.0, 3.0, 2.0, 1.0])
    got = np.asarray(bandit.reward(dF, dp, imp, times, CFG))
    mean_t = 14.0
    eps = bandit.TIME_EPS_REL * mean_t
    dp_floor = CFG.pruning.target_ratio / CFG.pruning.target_round
    dp_eff = np.maximum(np.asarray(dp), dp_floor)
    want = np.asarray(dF) * dp_eff * np.asarray(imp) / (np.abs(np.asarray(times) - mean_t) + eps)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[2] < 0  # a loss increase is penalised
    assert got[2] == pytest.approx(-0.1 * 0.1 * 2.0 / eps, rel=1e-6)  # on the mean: finite

    # dp = 0 everywhere (target reached) and all times equal: finite, and still ranks by dF*I.
    same = jnp.full((4,), 7.0)
    zero = jnp.zeros(4)
    for kind in ("paper", "log"):
        cfg = replace(CFG, bandit={"reward": kind})
        rw = np.asarray(bandit.reward(jnp.array([0.1, 0.2, 0.3, 0.3]), zero,
                                      jnp.array([1.0, 1.0, 1.0, 2.0]), same, cfg))
        assert np.all(np.isfinite(rw)) and np.all(np.diff(rw) > 0)
        assert np.all(np.isfinite(bandit.reward(dF, zero, imp, jnp.zeros(4), cfg)))
        # dp below the floor counts as the floor.
        np.testing.assert_array_equal(bandit.reward(dF, zero, imp, times, cfg),
                                      bandit.reward(dF, jnp.full(4, dp_floor), imp, times, cfg))
    # Without pruning (target 0) the dp factor is dropped (1), not a zero reward.
    no_prune = replace(CFG, pruning={"target_ratio": 0.0})
    np.testing.assert_allclose(bandit.reward(dF, zero, imp, times, no_prune),
                               np.asarray(dF) * np.asarray(imp)
                               / (np.abs(np.asarray(times) - mean_t) + eps), rtol=1e-6)


def test_log_reward_and_leading_axes():
    cfg = replace(CFG, bandit={"reward": "log"})
    times = jnp.array([[10.0, 12.0, 14.0, 20.0], [5.0, 5.0, 5.0, 5.0]])
    dF = jnp.array([0.2, 0.2, -0.1, 0.4])
    dp = jnp.array([0.05, 0.2, 0.1, 0.0])
    imp = jnp.array([3.0, 3.0, 2.0, 1.0])
    got = np.asarray(bandit.reward(dF, dp, imp, times, cfg))  # (fleets, devices)
    assert got.shape == (2, 4) and np.all(np.isfinite(got))
    for f in range(2):  # each fleet uses its own mean completion time
        np.testing.assert_array_equal(got[f], bandit.reward(dF, dp, imp, times[f], cfg))
    t, mean_t = np.asarray(times[0]), 14.0
    eps = bandit.TIME_EPS_REL * mean_t
    floor = CFG.pruning.target_ratio / CFG.pruning.target_round
    want = (np.sign(dF) * np.log1p(np.abs(dF)) * np.log1p(np.asarray(imp))
            * np.log1p(np.maximum(np.asarray(dp), floor) / floor)
            / np.log1p((np.abs(t - mean_t) + eps) / eps))
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    # Same ordering directions as Eq. 3: more loss drop up, further from the mean down.
    assert got[0, 1] > got[0, 0] and got[0, 2] < 0
    paper = np.asarray(bandit.reward(dF, dp, imp, times, CFG))
    # Compressed scale: a smaller ratio between two devices' rewards than Eq. 3 gives.
    assert got[0, 1] / got[0, 0] < paper[0, 1] / paper[0, 0]



def _reward_unclipped(loss_drop, delta_p, importance, times, cfg):
    """Eq. 3 as :func:`bandit.reward` computed it before its overflow clip (float32)."""
    loss_drop, delta_p, importance, times = (jnp.asarray(x, jnp.float32) for x in
                                             (loss_drop, delta_p, importance, times))
    target, rounds = cfg.pruning.target_ratio, cfg.pruning.target_round
    dp_floor = target / rounds if target > 0 else 1.0
    dp = jnp.maximum(delta_p, dp_floor)
    mean_t = jnp.mean(times, axis=-1, keepdims=True)
    eps = jnp.maximum(bandit.TIME_EPS_REL * mean_t, bandit.TIME_EPS_ABS)
    dt = jnp.abs(times - mean_t) + eps
    if cfg.bandit.reward == "paper":
        return loss_drop * dp * importance / dt
    slog_f = jnp.sign(loss_drop) * jnp.log1p(jnp.abs(loss_drop))
    return (slog_f * jnp.log1p(jnp.maximum(importance, 0.0)) * jnp.log1p(dp / dp_floor)
            / jnp.log1p(dt / eps))


@pytest.mark.parametrize("kind", ["paper", "log"])
def test_reward_of_ordinary_inputs_is_unchanged_by_the_overflow_clip(kind):
    """Host (float64 numpy) and device (float32 jax) inputs inside the limit give exactly
    the numbers of the unclipped formula."""
    cfg = replace(CFG, bandit={"reward": kind})
    rng = np.random.default_rng(0)
    dF = rng.normal(0.0, 0.3, 64)
    dp = rng.uniform(-0.01, 0.2, 64)
    imp = rng.uniform(0.0, 3.5, 64)
    times = rng.uniform(0.5, 5e4, 64)
    want = np.asarray(_reward_unclipped(dF, dp, imp, times, cfg))
    np.testing.assert_array_equal(bandit.reward(dF, dp, imp, times, cfg), want)
    as_jax = [jnp.asarray(x, jnp.float32) for x in (dF, dp, imp, times)]
    np.testing.assert_array_equal(bandit.reward(*as_jax, cfg), want)


@pytest.mark.parametrize("kind", ["paper", "log"])
def test_reward_is_finite_for_extreme_finite_inputs(kind):
    """Finite statistics far outside float32 (a compute time of 1e300 once turned every
    device's reward into NaN) and degenerate configs give finite rewards, without a cast
    overflow warning, on the host and under jit."""
    cfg = replace(CFG, bandit={"reward": kind})
    big, f32max = 1e300, float(np.finfo(np.float32).max)
    cases = [
        ([0.1, 0.2, 0.3], [0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [1.0, 2.0, big]),  # the probe
        ([big, -big, 0.0], [big, -big, 0.0], [big, -big, 0.0], [big, 0.0, -big]),
        ([f32max, f32max, -f32max], [1.0, 1.0, 1.0], [f32max, 1.0, f32max],
         [0.0, 0.0, 0.0]),
        ([1e-300, 1.0, 2.0], [0.0, 0.0, 0.0], [1e-300, 1.0, 2.0], [1e-300, 1e-300, 1e-300]),
    ]
    degenerate = replace(cfg, pruning={"target_ratio": 1e-40, "target_round": 10**9})
    with np.errstate(over="raise", invalid="raise"):
        for c in (cfg, degenerate):
            for case in cases:
                got = np.asarray(bandit.reward(*(np.array(x) for x in case), c))
                assert np.all(np.isfinite(got)), (case, got)
                jitted = jax.jit(functools.partial(bandit.reward, params=c))(
                    *(jnp.asarray(np.clip(x, -f32max, f32max), jnp.float32) for x in case))
                assert np.all(np.isfinite(np.asarray(jitted))), (case, jitted)


def test_update_saturates_reward_sums_instead_of_overflowing():
    """Undiscounted agents fed the largest finite float32 reward keep finite sums."""
    cfg = replace(CFG, bandit={"discount": 1.0})
    st = bandit.init(cfg, A, jax.random.key(0))
    top = np.finfo(np.float32).max
    for sign in (1.0, 1.0, -1.0, -1.0, -1.0):
        st, _, _ = bandit.select(st, jax.random.key(1))
        st = bandit.update(st, jnp.full(A, sign * top))
    for f in ("count", "reward_sum"):
        assert np.all(np.isfinite(np.asarray(getattr(st, f)))), f
    assert np.abs(np.asarray(st.reward_sum)).max() == top   # saturated, not Inf


def test_checkpoint_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    state, _ = rollout(bandit.init(CFG, A, jax.random.key(0)), jax.random.key(1))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "bandit", state)
    ckpt.wait_until_finished()
    target = jax.eval_shape(lambda: bandit.init(CFG, A, jax.random.key(0)))
    restored = ckpt.restore(tmp_path / "bandit", target)
    assert isinstance(restored, bandit.BanditState)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype
    a = bandit.select(state, jax.random.key(9))
    b = bandit.select(restored, jax.random.key(9))
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
