"""Tests of the federated round (fedspine_jax.federation) and the strategies, without a model.

The global LoRA is a tiny fake one (two pairs ``a: (16, R)``, ``b: (R, 12)``) and the
devices are simulated by deterministic random updates at their planned ranks, so every test
runs in seconds and checks the round logic against numpy references.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from fedspine_jax import bandit
from fedspine_jax.config import from_dict
from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.state import flatten, unflatten
from fedspine_jax.federation import (DeviceTask, DeviceUpdate, Federation, NonFiniteState,
                                     QuorumNotMet, UpdateRejected)
from fedspine_jax.strategies import STRATEGIES, get

R, ALPHA = 8, 16.0
D_IN, D_OUT = 16, 12
NUM_HEADS = 3                      # the fake q has 12 output columns: 3 heads of 4
N = 3
PAIRS = ("layers/0/attn/q", "layers/1/attn/q")
TIERS = np.array([0, 1, 2])        # device 0 strongest (HETLoRA's rank policy)
# the fake model's architecture: its q is (16, 12), 3 heads of 4; 4 FFN channels
ARCH = ArchConfig(arch="bert", vocab_size=8, hidden_size=D_IN, num_layers=len(PAIRS),
                  num_heads=NUM_HEADS, num_kv_heads=NUM_HEADS, head_dim=D_OUT // NUM_HEADS,
                  intermediate_size=4)
MASK_SHAPES = ((len(PAIRS), NUM_HEADS), (len(PAIRS), 4))   # (L, H), (L, F) of the devices


def Fed(cfg, num_devices: int, tiers=None) -> Federation:
    """The federation of the fake model."""
    return Federation(cfg, num_devices, tiers, ARCH)


def make_cfg(strategy: str = "fedspine", num_devices: int = N, **sections):
    raw = {"lora": {"rank": R, "alpha": ALPHA, "rank_choices": [2, 4, 8]},
           "pruning": {"target_ratio": 0.5, "target_round": 3},
           "federation": {"strategy": strategy, "num_devices": num_devices, "rounds": 6}}
    for name, changes in sections.items():
        raw.setdefault(name, {}).update(changes)
    return from_dict(raw)


def fake_global(seed: int = 0) -> tuple[dict, dict]:
    """A global LoRA at rank R (Gaussian a, zero b, as a fresh model has) and a head."""
    rng = np.random.default_rng(seed)
    lora = {}
    for p in PAIRS:
        lora[p + "/lora_a"] = (0.02 * rng.normal(size=(D_IN, R))).astype(np.float32)
        lora[p + "/lora_b"] = np.zeros((R, D_OUT), np.float32)
    head = {"head/kernel": rng.normal(size=(D_IN, 2)).astype(np.float32),
            "head/bias": np.zeros(2, np.float32)}
    return unflatten(lora), unflatten(head)


def fake_update(task: DeviceTask, seed: int = 0, **changes) -> DeviceUpdate:
    """A plausible update for ``task``, a pure function of (seed, device, round)."""
    rng = np.random.default_rng((seed, task.device_id, task.round))
    lora = {k: (0.3 * rng.normal(size=v.shape)).astype(np.float32)
            for k, v in sorted(flatten(task.lora).items())}
    head = {k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32)
            for k, v in sorted(flatten(task.head).items())}
    loss_before = float(1.0 + rng.random())
    fields = dict(
        device_id=task.device_id, round=task.round, lora=unflatten(lora), head=unflatten(head),
        head_masks=np.asarray(task.record["head_masks"], np.float32),
        channel_masks=np.asarray(task.record["channel_masks"], np.float32),
        head_importance=rng.random(MASK_SHAPES[0]).astype(np.float32),
        channel_importance=rng.random(MASK_SHAPES[1]).astype(np.float32),
        stream=(0, int(task.round)),
        num_samples=int(rng.integers(5, 50)), loss_before=loss_before,
        loss_after=loss_before - 0.5 * float(rng.random()),
        lora_importance=float(0.1 + rng.random()),
        # a pruning device reaches its ratio up to the granularity of its groups (a little
        # above); a device told not to prune reports 0
        ratio=float(min(1.0, task.ratio + 0.004)) if task.ratio > 0 else 0.0,
        compute_time_s=float(rng.uniform(0.5, 2.0)), comm_time_s=float(rng.uniform(0.1, 0.5)))
    fields.update(changes)
    return DeviceUpdate(**fields)


def play_round(fed: Federation, state, seed: int = 0, skip=(), force: bool = False):
    """Plan, accept every device's fake update except ``skip``, close."""
    state, tasks = fed.plan(state)
    planned = state
    updates = [fake_update(t, seed) for t in tasks if t.device_id not in skip]
    for u in updates:
        state = fed.accept(state, u)
    state, report = fed.close(state, force=force)
    return planned, tasks, updates, state, report


def pair(lora: dict, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` of the pair at ``prefix`` (e.g. ``layers/0/attn/q``) of a LoRA tree."""
    flat = flatten(lora)
    return flat[prefix + "/lora_a"], flat[prefix + "/lora_b"]


def effective(a, b, rank: int) -> np.ndarray:
    """The update ``(alpha / rank) a @ b`` in float64."""
    return ALPHA / rank * (np.asarray(a, np.float64) @ np.asarray(b, np.float64))


def best_rank(m: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def new_federation(strategy: str = "fedspine", **sections):
    fed = Fed(make_cfg(strategy, **sections), N, TIERS)
    return fed, fed.init(*fake_global())


# ----------------------------------------------------------------------------- the round


def test_round_advances_and_records_updates():
    fed, s0 = new_federation()
    assert s0.round == 1 and s0.plan_p is None and s0.updates == ()
    assert s0.bandit is not None and np.all(s0.last_p == 0)
    s1, tasks = fed.plan(s0)
    assert s1.round == 1 and s1.plan_p.shape == (N,) and s1.plan_r.shape == (N,)
    assert [t.device_id for t in tasks] == list(range(N))
    assert all(t.round == 1 for t in tasks)
    assert [t.rank for t in tasks] == s1.plan_r.tolist()
    np.testing.assert_array_equal([t.ratio for t in tasks], s1.plan_p)
    for t in tasks:   # each task's LoRA is at its rank; the head is the global head
        assert {k: v.shape for k, v in flatten(t.lora).items()} == {
            **{p + "/lora_a": (D_IN, t.rank) for p in PAIRS},
            **{p + "/lora_b": (t.rank, D_OUT) for p in PAIRS}}
        for k, v in flatten(s1.head).items():
            np.testing.assert_array_equal(flatten(t.head)[k], v)
    state = s1
    ups = [fake_update(t) for t in reversed(tasks)]        # arrival order 2, 1, 0
    for i, u in enumerate(ups):
        state = fed.accept(state, u)
        assert len(state.updates) == i + 1 and state.round == 1
    assert [u.device_id for u in state.updates] == [2, 1, 0]
    s2, report = fed.close(state)
    assert s2.round == 2 and s2.plan_p is None and s2.plan_r is None and s2.updates == ()
    assert report.round == 1 and report.device_ids.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(report.p, s1.plan_p)
    np.testing.assert_array_equal(report.r, s1.plan_r)
    by_id = sorted(ups, key=lambda u: u.device_id)
    np.testing.assert_allclose(s2.last_p, [u.ratio for u in by_id], rtol=1e-6)
    times = np.array([u.completion_time_s for u in by_id])
    np.testing.assert_allclose(report.times, times)
    assert report.waiting_time == pytest.approx(np.mean(times.max() - times))
    # Eq. 3 rewards from the reported statistics, and they reached the bandit (Eq. 4)
    want = bandit.reward(np.array([u.loss_drop for u in by_id]),
                         np.array([u.ratio for u in by_id]) - s0.last_p,
                         np.array([u.lora_importance for u in by_id]), times,
                         fed.bandit_config())
    np.testing.assert_allclose(report.rewards, np.asarray(want), rtol=1e-6)
    assert np.all(np.isfinite(report.rewards))
    updated = bandit.update(s1.bandit, np.asarray(report.rewards, np.float32))
    for f in ("count", "reward_sum"):
        np.testing.assert_array_equal(getattr(s2.bandit, f), getattr(updated, f))
    # the old states are untouched (immutability)
    assert s1.updates == () and s1.round == 1 and s0.plan_p is None


def test_init_rejects_a_lora_at_another_rank():
    fed = Fed(make_cfg(), N)
    lora, head = fake_global()
    lora = unflatten({k: (v[:, :4] if k.endswith("lora_a") else v[:4])
                      for k, v in flatten(lora).items()})
    with pytest.raises(ValueError, match="rank"):
        fed.init(lora, head)
    with pytest.raises(ValueError, match="tiers"):
        Fed(make_cfg(), N, tiers=np.zeros(N + 1))


def test_planning_is_idempotent_within_a_round():
    fed, s0 = new_federation()
    s0 = play_round(fed, s0)[3]                 # round 2: a non-zero global LoRA
    s1, t1 = fed.plan(s0)
    s2, t2 = fed.plan(s1)                        # asked again (a device asking twice)
    s3, t3 = fed.plan(s0)                        # planned again from scratch (a restart)
    for s in (s2, s3):
        np.testing.assert_array_equal(s.plan_p, s1.plan_p)
        np.testing.assert_array_equal(s.plan_r, s1.plan_r)
        for f in ("round", "count", "reward_sum", "num_leaves", "last_p"):
            np.testing.assert_array_equal(getattr(s.bandit, f), getattr(s1.bandit, f))
    for ta, tb, tc in zip(t1, t2, t3):
        for t in (tb, tc):
            assert (t.device_id, t.round, t.ratio, t.rank) == (ta.device_id, ta.round,
                                                               ta.ratio, ta.rank)
            assert flatten(t.lora).keys() == flatten(ta.lora).keys()
            for k in flatten(ta.lora):
                np.testing.assert_array_equal(flatten(t.lora)[k], flatten(ta.lora)[k])
    # the bandit advanced exactly once for the round
    assert np.all(np.asarray(s1.bandit.round) == 2)


def test_fedspine_aggregation_is_the_truncated_importance_weighted_sum():
    """Eq. 15-16: sum_i c_i (alpha/r_i) a_i b_i, best rank R, stored at scaling alpha/R."""
    fed = Fed(make_cfg(num_devices=4), 4)
    state = fed.init(*fake_global())
    planned, tasks, ups, new, _ = play_round(fed, state)
    ranks = planned.plan_r.tolist()
    # the case worth testing: heterogeneous ranks whose sum exceeds R (truncation acts)
    assert len(set(ranks)) > 1 and sum(ranks) > R, ranks
    imp = np.array([u.lora_importance for u in ups])
    c = imp / imp.sum()
    for p in PAIRS:
        total = sum(ci * effective(*pair(u.lora, p), r)
                    for ci, u, r in zip(c, ups, ranks))
        want = best_rank(total, R)
        a, b = pair(new.lora, p)
        assert a.shape == (D_IN, R) and b.shape == (R, D_OUT)
        assert a.dtype == np.float32 and b.dtype == np.float32
        np.testing.assert_allclose(effective(a, b, R), want, atol=1e-5, rtol=1e-5)
        # and it really is truncated: the full sum differs from its best rank-R part
        assert np.abs(total - want).max() > 1e-3
    n = np.array([u.num_samples for u in ups], np.float64)
    for k in flatten(new.head):   # the head is the sample-weighted mean
        want = sum(w * flatten(u.head)[k] for w, u in zip(n / n.sum(), ups))
        np.testing.assert_allclose(flatten(new.head)[k], want, atol=1e-6, rtol=1e-6)


def test_fedavg_aggregation_averages_the_factors():
    """FedLoRA-style baselines: sample-weighted mean of a and of b (all at rank R)."""
    fed, state = new_federation("fedlora_prune")
    planned, tasks, ups, new, _ = play_round(fed, state)
    assert planned.plan_r.tolist() == [R] * N
    n = np.array([u.num_samples for u in ups], np.float64)
    w = n / n.sum()
    for k in flatten(new.lora):
        want = sum(wi * flatten(u.lora)[k].astype(np.float64) for wi, u in zip(w, ups))
        np.testing.assert_allclose(flatten(new.lora)[k], want, atol=1e-6, rtol=1e-5)


def test_hetlora_aggregation_stays_at_rank_r_and_keeps_devices_ranks():
    fed, state = new_federation("hetlora")
    planned, tasks, ups, new, _ = play_round(fed, state)
    assert planned.plan_r.tolist() == [8, 4, 2]        # strongest tier gets the largest rank
    for k, v in flatten(new.lora).items():
        assert v.shape == ((D_IN, R) if k.endswith("lora_a") else (R, D_OUT))
        assert np.all(np.isfinite(v))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_global_lora_stays_at_rank_r_and_tasks_are_its_best_approximation(strategy):
    """Every round: the global LoRA has rank R, and each task at rank r_i carries the best
    rank-r_i approximation of the global effective update (section 4.3's Lambda)."""
    fed, state = new_federation(strategy)
    for _ in range(4):
        state, tasks = fed.plan(state)
        glob = {p: effective(*pair(state.lora, p), R)
                for p in PAIRS}
        for t in tasks:
            for p in PAIRS:
                got = effective(*pair(t.lora, p), t.rank)
                np.testing.assert_allclose(got, best_rank(glob[p], t.rank), atol=1e-5,
                                           rtol=1e-4, err_msg=f"round {t.round} {t}")
        for t in tasks:
            state = fed.accept(state, fake_update(t))
        state, _ = fed.close(state)
        for k, v in flatten(state.lora).items():
            assert v.shape == ((D_IN, R) if k.endswith("lora_a") else (R, D_OUT)), k


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategies_plan_plausible_ratios_and_ranks(strategy):
    fed, state = new_federation(strategy)
    st = get(strategy)
    cfg = fed.cfg
    target, t_end = cfg.pruning.target_ratio, cfg.pruning.target_round
    allowed = set(cfg.lora.rank_choices) | {cfg.lora.rank}
    prev_p = np.zeros(N, np.float32)
    history = []
    for t in range(1, 6):
        last_p = state.last_p
        planned, tasks, ups, state, report = play_round(fed, state)
        p, r = planned.plan_p, planned.plan_r
        history.append(r.tolist())
        assert p.dtype == np.float32 and r.dtype == np.int32
        assert np.all(p >= prev_p) and np.all(p >= last_p), (t, p, prev_p, last_p)
        assert np.all((p >= 0) & (p <= 1))
        assert set(r.tolist()) <= allowed, r
        if not st.prunes or t == 1:
            # round 1: no device has measured importance yet, so none prunes
            assert np.all(p == 0)
        elif st.ratio_policy.name == "schedule":
            # the uniform schedule, raised to the ratio a device already reached
            sched = np.float32(target * min(1.0, t / t_end))
            np.testing.assert_array_equal(p, np.maximum(sched, last_p))
        else:  # S-UCB: within the arm space [p^{t-1}, target]
            assert np.all(p <= max(target, float(last_p.max())) + 1e-6)
            if fed.bandit_config().bandit.arm_space == "floor" and t >= t_end:
                # our floor: at the target from target_round on
                np.testing.assert_allclose(p, np.maximum(target, last_p))
        if st.rank_policy.name == "global":
            assert np.all(r == cfg.lora.rank)
        elif st.rank_policy.name == "capability":
            assert r.tolist() == [8, 4, 2]
        elif st.rank_policy.name == "growing":
            assert len(set(r.tolist())) == 1
        else:
            assert set(r.tolist()) <= set(cfg.lora.rank_choices)
        prev_p = p
        assert state.round == t + 1
    if st.rank_policy.name == "bandit":   # the bandit explores ranks
        assert len({x for row in history for x in row}) > 1


def test_fedapt_rank_grows_to_the_global_rank_on_the_uniform_schedule():
    cfg = make_cfg("fedapt")
    st = get("fedapt")
    ranks, ratios = [], []
    for t in range(1, 6):
        p, r = st.configure(cfg, t, None, None, TIERS)
        assert len(set(r.tolist())) == 1 and len(set(p.tolist())) == 1
        ranks.append(int(r[0]))
        ratios.append(float(p[0]))
    assert ranks == [2, 4, 8, 8, 8]
    np.testing.assert_allclose(ratios, [0.5 / 3, 1.0 / 3, 0.5, 0.5, 0.5], rtol=1e-6)


def test_pruning_never_goes_back_below_a_reached_ratio():
    """A device that overshot its ratio is never planned below what it reached."""
    fed, state = new_federation("fedlora_prune")
    state, tasks = fed.plan(state)
    for t in tasks:   # device 1 jumps to 0.45 in round 1 (schedule says 1/6)
        state = fed.accept(state, fake_update(t, ratio=0.45 if t.device_id == 1 else t.ratio))
    state, _ = fed.close(state)
    state, tasks = fed.plan(state)
    assert state.plan_p[1] == pytest.approx(0.45)
    assert state.plan_p[0] == pytest.approx(1.0 / 3)


# ------------------------------------------------------------------------ bad updates


def _collecting(strategy: str = "fedspine"):
    """A federation in round 2 with device 0's update accepted and two tasks pending."""
    fed, state = new_federation(strategy)
    state = play_round(fed, state)[3]
    state, tasks = fed.plan(state)
    state = fed.accept(state, fake_update(tasks[0]))
    return fed, state, tasks


def _wrong_rank(task):
    r = 8 if task.rank != 8 else 4
    lora = {k: np.zeros((D_IN, r) if k.endswith("lora_a") else (r, D_OUT), np.float32)
            for k in flatten(task.lora)}
    return fake_update(task, lora=unflatten(lora))


def _with(task, part: str, fn):
    u = fake_update(task)
    d = flatten(getattr(u, part))   # edited by path, sent as a tree again
    fn(d)
    return dataclasses.replace(u, **{part: unflatten(d)})


def _set_nan(d):
    k = sorted(d)[1]
    d[k] = d[k].copy()
    d[k][0, 0] = np.nan


BAD_UPDATES = {
    "unknown device id": (lambda ts: fake_update(ts[1], device_id=N), "unknown device id"),
    "negative device id": (lambda ts: fake_update(ts[1], device_id=-1), "unknown device id"),
    "stale round": (lambda ts: fake_update(ts[1], round=1), "stale"),
    "early round": (lambda ts: fake_update(ts[1], round=3), "early"),
    "duplicate device": (lambda ts: fake_update(ts[0]), "already sent"),
    "wrong rank": (lambda ts: _wrong_rank(ts[1]), "planned rank"),
    "NaN in lora": (lambda ts: _with(ts[1], "lora", _set_nan), "NaN"),
    "inf in head": (lambda ts: _with(ts[1], "head", lambda d: d.update(
        {"head/bias": np.array([np.inf, 0], np.float32)})), "NaN or infinite"),
    "float64 lora": (lambda ts: _with(ts[1], "lora", lambda d: d.update(
        {k: v.astype(np.float64) for k, v in d.items()})), "float64"),
    "missing lora key": (lambda ts: _with(ts[1], "lora", lambda d: d.pop(sorted(d)[0])),
                         "missing"),
    "extra lora key": (lambda ts: _with(ts[1], "lora", lambda d: d.update(
        {"layers/9/attn/q/lora_a": np.zeros((D_IN, ts[1].rank), np.float32)})),
        "unexpected"),
    "missing head key": (lambda ts: _with(ts[1], "head", lambda d: d.pop("head/bias")),
                         "missing"),
    "wrong head shape": (lambda ts: _with(ts[1], "head", lambda d: d.update(
        {"head/bias": np.zeros(3, np.float32)})), "shape"),
    "NaN loss": (lambda ts: fake_update(ts[1], loss_after=float("nan")), "loss_after"),
    "infinite importance": (lambda ts: fake_update(ts[1], lora_importance=float("inf")),
                            "lora_importance"),
    "negative time": (lambda ts: fake_update(ts[1], comm_time_s=-1.0),
                      r"comm_time_s=-1.0 is outside"),
    "ratio above 1": (lambda ts: fake_update(ts[1], ratio=1.5), "ratio"),
    "ratio below 0": (lambda ts: fake_update(ts[1], ratio=-0.1), "ratio"),
    "no samples": (lambda ts: fake_update(ts[1], num_samples=0), "num_samples"),
    # finite but implausible statistics (plausibility bounds, federation.STAT_BOUNDS)
    "compute time 1e300": (lambda ts: fake_update(ts[1], compute_time_s=1e300),
                           r"compute_time_s=1e\+300 is outside .*1e\+06"),
    "comm time above the cap": (lambda ts: fake_update(ts[1], comm_time_s=2e6),
                                "comm_time_s=2000000.0 is outside"),
    "2**62 samples": (lambda ts: fake_update(ts[1], num_samples=2**62),
                      f"num_samples={2**62} is outside"),
    "fractional samples": (lambda ts: fake_update(ts[1], num_samples=5.0),
                           "num_samples=5.0 is not an integer"),
    "negative loss": (lambda ts: fake_update(ts[1], loss_before=-0.5),
                      "loss_before=-0.5 is outside"),
    "loss above the cap": (lambda ts: fake_update(ts[1], loss_after=1e5),
                           "loss_after=100000.0 is outside"),
    "huge importance": (lambda ts: fake_update(ts[1], lora_importance=1e30),
                        r"lora_importance=1e\+30 is outside .*Eq. 13-14"),
    "importance above Eq. 14 at the rank": (
        lambda ts: fake_update(ts[1], lora_importance=1.01 * (1 + np.sqrt(ts[1].rank))),
        r"lora_importance=.* is outside .*planned rank"),
    "negative importance": (lambda ts: fake_update(ts[1], lora_importance=-0.1),
                            "lora_importance=-0.1 is outside"),
    "negative flops": (lambda ts: fake_update(ts[1], flops=-1.0), "flops=-1.0 is outside"),
    "flops above the cap": (lambda ts: fake_update(ts[1], flops=1e30), r"flops=1e\+30"),
    "infinite flops": (lambda ts: fake_update(ts[1], flops=float("inf")),
                       "flops=inf is not a finite number"),
    "negative peak memory": (lambda ts: fake_update(ts[1], peak_memory_bytes=-1),
                             "peak_memory_bytes=-1 is outside"),
    "peak memory of 2**60": (lambda ts: fake_update(ts[1], peak_memory_bytes=2**60),
                             "peak_memory_bytes=.* is outside"),
    "fractional peak memory": (lambda ts: fake_update(ts[1], peak_memory_bytes=1.5),
                               "peak_memory_bytes=1.5 is not an integer"),
    "negative params alive": (lambda ts: fake_update(ts[1], params_alive=-3),
                              "params_alive=-3 is outside"),
}


@pytest.mark.parametrize("name", list(BAD_UPDATES))
def test_bad_update_is_rejected_without_state_change(name):
    fed, state, tasks = _collecting()
    make, pattern = BAD_UPDATES[name]
    before_updates = state.updates
    before_lora = {k: v.copy() for k, v in flatten(state.lora).items()}
    with pytest.raises(UpdateRejected, match=pattern):
        fed.accept(state, make(tasks))
    assert state.updates is before_updates and len(state.updates) == 1
    assert state.round == 2
    for k, v in before_lora.items():
        np.testing.assert_array_equal(flatten(state.lora)[k], v)
    # the round goes on with the good updates as if nothing had happened
    for t in tasks[1:]:
        state = fed.accept(state, fake_update(t))
    new, report = fed.close(state)
    assert new.round == 3 and report.device_ids.tolist() == [0, 1, 2]


def test_update_before_planning_is_rejected():
    fed, state = new_federation()
    planned, tasks = fed.plan(state)
    with pytest.raises(UpdateRejected, match="not been planned"):
        fed.accept(state, fake_update(tasks[0]))
    with pytest.raises(QuorumNotMet, match="never planned"):
        fed.close(state)


def test_rejection_is_an_error_type_the_transport_can_catch():
    assert issubclass(UpdateRejected, ValueError)
    assert issubclass(QuorumNotMet, RuntimeError)


# ----------------------------------------------------------------------------- quorum


def test_quorum_not_met_and_forced_close_keeps_missing_device_bandit():
    fed, state = new_federation(federation={"quorum": 1.0})
    state = play_round(fed, state)[3]
    planned, tasks = fed.plan(state)
    collecting = planned
    for t in tasks:
        if t.device_id != 1:
            collecting = fed.accept(collecting, fake_update(t))
    with pytest.raises(QuorumNotMet, match="2 of 3"):
        fed.close(collecting)
    new, report = fed.close(collecting, force=True)
    assert new.round == 3 and report.device_ids.tolist() == [0, 2]
    assert report.rewards.shape == (2,) and report.times.shape == (2,)
    # device 1: bandit statistics as planned (after its select), last_p unchanged (the
    # bandit's p^{t-1} is the ratio a device reached, not the one it was planned)
    np.testing.assert_array_equal(np.asarray(new.bandit.last_p), new.last_p)
    for f in dataclasses.fields(planned.bandit):
        if f.name in ("params", "last_p"):
            continue
        np.testing.assert_array_equal(np.asarray(getattr(new.bandit, f.name))[1],
                                      np.asarray(getattr(planned.bandit, f.name))[1],
                                      err_msg=f.name)
    assert new.last_p[1] == state.last_p[1]
    # devices 0 and 2: updated with their rewards
    full = np.zeros(N, np.float32)
    full[[0, 2]] = report.rewards
    updated = bandit.update(planned.bandit, full)
    for f in ("count", "reward_sum"):
        got, want = np.asarray(getattr(new.bandit, f)), np.asarray(getattr(updated, f))
        np.testing.assert_array_equal(got[[0, 2]], want[[0, 2]])
        assert not np.array_equal(got[[0, 2]], np.asarray(getattr(planned.bandit, f))[[0, 2]])
    # the aggregate is of the two that reported only
    ups = [u for u in collecting.updates]
    imp = np.array([u.lora_importance for u in ups])
    p = PAIRS[0]
    total = sum(c * effective(*pair(u.lora, p),
                              int(planned.plan_r[u.device_id]))
                for c, u in zip(imp / imp.sum(), ups))
    np.testing.assert_allclose(effective(*pair(new.lora, p), R),
                               best_rank(total, R), atol=1e-5, rtol=1e-5)
    # the next round plans device 1 again
    new, tasks = fed.plan(new)
    assert len(tasks) == N


def test_partial_quorum_closes_without_force():
    fed, state = new_federation(federation={"quorum": 0.5})
    assert fed.quorum() == 2
    planned, tasks = fed.plan(state)
    one = fed.accept(planned, fake_update(tasks[0]))
    with pytest.raises(QuorumNotMet):
        fed.close(one)
    two = fed.accept(one, fake_update(tasks[2]))
    new, report = fed.close(two)
    assert report.device_ids.tolist() == [0, 2] and new.round == 2


def test_forced_close_with_no_update_keeps_the_model():
    fed, state = new_federation()
    planned, _ = fed.plan(state)
    new, report = fed.close(planned, force=True)
    assert new.round == 2 and report.device_ids.size == 0 and report.waiting_time == 0.0
    for k in flatten(state.lora):
        np.testing.assert_array_equal(flatten(new.lora)[k], flatten(state.lora)[k])
    np.testing.assert_array_equal(new.last_p, state.last_p)
    for f in ("count", "reward_sum"):
        np.testing.assert_array_equal(getattr(new.bandit, f), getattr(planned.bandit, f))


# ------------------------------------------------------------------ mask-aware Eq. 16


def _masked_round(mask_aware: bool, device1_head_masks: np.ndarray):
    """Two devices at rank 2 (sum of ranks <= R: no truncation), device 1 with the masks."""
    fed = Fed(make_cfg(lora={"rank_choices": [2]},
                              aggregation={"mask_aware": mask_aware}), 2)
    state, tasks = fed.plan(fed.init(*fake_global()))
    assert state.plan_r.tolist() == [2, 2]
    ups = [fake_update(tasks[0]), fake_update(tasks[1], head_masks=device1_head_masks)]
    for u in ups:
        state = fed.accept(state, u)
    return fed, state, ups


@pytest.mark.parametrize("mask_aware", [False, True])
def test_mask_aware_aggregation_ignores_devices_that_pruned_a_head(mask_aware):
    """With mask_aware, a head pruned by device 1 gets its q columns from device 0 only;
    without it, every column is the importance-weighted sum of both."""
    hm = np.ones((len(PAIRS), NUM_HEADS), np.float32)
    hm[:, 2] = 0                                  # device 1 pruned head 2 (columns 8..11)
    fed, state, ups = _masked_round(mask_aware, hm)
    new, _ = fed.close(state)
    imp = np.array([u.lora_importance for u in ups])
    c = imp / imp.sum()
    for p in PAIRS:
        got = effective(*pair(new.lora, p), R)
        dev = [effective(*pair(u.lora, p), 2) for u in ups]
        mixed = c[0] * dev[0] + c[1] * dev[1]
        np.testing.assert_allclose(got[:, :8], mixed[:, :8], atol=1e-5, rtol=1e-5)
        want = dev[0][:, 8:] if mask_aware else mixed[:, 8:]
        np.testing.assert_allclose(got[:, 8:], want, atol=1e-5, rtol=1e-5)


def test_mask_with_nan_is_rejected():
    hm = np.ones((len(PAIRS), NUM_HEADS), np.float32)
    hm[0, 0] = np.nan
    with pytest.raises(UpdateRejected, match="mask"):
        _masked_round(True, hm)


def test_mask_with_too_few_layers_is_rejected():
    with pytest.raises(UpdateRejected, match="mask"):
        _masked_round(True, np.ones((1, NUM_HEADS), np.float32))


# ------------------------------------------------------------- plausibility bounds


def _limited(limits):
    """Round 1 of a federation whose devices' partitions hold ``limits`` examples."""
    fed = Federation(make_cfg(), N, TIERS, ARCH, num_samples_limit=np.array(limits))
    state, tasks = fed.plan(fed.init(*fake_global()))
    return fed, state, tasks


def test_num_samples_is_bounded_by_the_devices_partition_size():
    fed, state, tasks = _limited([30, 40, 60])
    with pytest.raises(UpdateRejected, match=r"num_samples=41 is outside its plausible "
                                             r"range \[1, 40\] \(device 1's partition size\)"):
        fed.accept(state, fake_update(tasks[1], num_samples=41))
    state = fed.accept(state, fake_update(tasks[1], num_samples=40))     # the whole partition
    state = fed.accept(state, fake_update(tasks[0], num_samples=30))
    state = fed.accept(state, fake_update(tasks[2], num_samples=41))     # its partition is 60
    assert [u.num_samples for u in state.updates] == [40, 30, 41]
    with pytest.raises(ValueError, match="num_samples_limit"):
        Federation(make_cfg(), N, TIERS, ARCH, num_samples_limit=np.array([30, 40]))


def test_lora_importance_is_bounded_by_eq14_at_the_planned_rank():
    """I(B_total) = T + S <= 1 + sqrt(r_i) (pruning.lora_importance_total): the bound is
    accepted, anything above it (beyond the float32 tolerance) is refused."""
    fed, state, tasks = _limited([50, 50, 50])
    t = tasks[1]
    bound = 1.0 + np.sqrt(t.rank)
    with pytest.raises(UpdateRejected, match=f"planned rank {t.rank}"):
        fed.accept(state, fake_update(t, lora_importance=bound * 1.002))
    state = fed.accept(state, fake_update(t, lora_importance=bound * 1.0005))
    assert state.updates[0].lora_importance == bound * 1.0005


def test_extreme_plausible_statistics_give_finite_rewards_weights_and_bandit():
    """Every device at the edge of every bound: the round closes with finite rewards, finite
    aggregation weights, a finite global model and a finite bandit state."""
    for strategy in ("fedspine", "fedlora_prune"):
        fed, state = new_federation(strategy)
        state, tasks = fed.plan(state)
        for t, (lb, la, ct) in zip(tasks, [(1e4, 0.0, 1e6), (0.0, 1e4, 0.0), (1e4, 1e4, 0.0)]):
            state = fed.accept(state, fake_update(
                t, num_samples=2**31 - 1, loss_before=lb, loss_after=la,
                lora_importance=1.0 + np.sqrt(t.rank), compute_time_s=ct, comm_time_s=1e6,
                flops=1e24, peak_memory_bytes=2**50, params_alive=2**50))
        new, report = fed.close(state)
        assert np.all(np.isfinite(report.rewards)) and np.all(np.isfinite(report.weights))
        for v in list(flatten(new.lora).values()) + list(flatten(new.head).values()):
            assert np.all(np.isfinite(v))
        if new.bandit is not None:
            assert np.all(np.isfinite(np.asarray(new.bandit.reward_sum)))
            assert np.any(np.asarray(report.rewards) != 0)


def test_close_refuses_to_store_a_non_finite_bandit_state():
    """A bandit state holding NaN (e.g. one restored from an older run) is not stored."""
    fed, state = new_federation()
    planned, tasks = fed.plan(state)
    rs = np.asarray(planned.bandit.reward_sum).copy()
    rs[1, 0] = np.nan
    poisoned = dataclasses.replace(planned, bandit=planned.bandit.replace(
        reward_sum=jnp.asarray(rs)))
    for t in tasks:
        poisoned = fed.accept(poisoned, fake_update(t))
    with pytest.raises(NonFiniteState, match=r"round 1: .*reward_sum of agents \[1\]"):
        fed.close(poisoned)
    assert poisoned.round == 1 and len(poisoned.updates) == N   # nothing was advanced
    # the same round from the intact state closes
    clean = planned
    for t in tasks:
        clean = fed.accept(clean, fake_update(t))
    assert fed.close(clean)[0].round == 2


# --------------------------------------------------------------- fixed bugs (regressions)


def test_non_finite_num_samples_is_rejected():
    fed, state, tasks = _collecting()
    with pytest.raises(UpdateRejected, match="num_samples"):
        fed.accept(state, fake_update(tasks[1], num_samples=float("nan")))


def test_ratio_below_the_reached_ratio_is_rejected():
    fed, state = new_federation("fedlora_prune")
    state = play_round(fed, play_round(fed, state)[3])[3]   # round 1 does not prune
    reached = float(state.last_p[1])
    assert reached > 0.1
    state, tasks = fed.plan(state)
    with pytest.raises(UpdateRejected, match="ratio"):
        fed.accept(state, fake_update(tasks[1], ratio=0.0))
