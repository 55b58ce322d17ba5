"""S-UCB sweeps (fedspine_jax.sweep) and their synthetic environment (fedspine_jax.sweep_env)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from fedspine_jax import bandit
from fedspine_jax import heterogeneity as het
from fedspine_jax import sweep, sweep_env
from fedspine_jax.cli import main
from fedspine_jax.config import (Config, ConfigError, Range, dump_config, from_dict, load_sweep,
                                 sweep_from_dict)

F = len(sweep_env.FEATURES)


def make_env(theta, gamma, sigma) -> sweep_env.EnvParams:
    k, s = len(het.TYPE_NAMES), len(sweep_env.SURFACES)
    return sweep_env.EnvParams(
        theta=jnp.asarray(np.broadcast_to(theta, (k, s, F)), jnp.float32),
        gamma=jnp.asarray(np.broadcast_to(gamma, (k, s)), jnp.float32),
        sigma=jnp.asarray(np.broadcast_to(sigma, (k, s)), jnp.float32))


# ---------------------------------------------------------------- the sweep, end to end
# Planted environment: loss drop and importance grow steeply with the rank while FLOPs and
# bytes do not depend on it, so every device's best arm has r = 8 and a configuration
# whose only rank is 8 beats one that must find it ({2, 4, 8}) and one that cannot ({2}).
PLANTED = make_env(
    theta=np.array([[0.01, -0.005, 0.0, 0.03, 0.0, 0.0],     # loss drop: + log2 r
                    [0.0, 0.0, 0.0, 0.0, 0.1, 0.0],          # importance: 0.1 r
                    [5e12, -4e12, 0.0, 0.0, 0.0, 0.0],       # FLOPs: no rank term
                    [1e6, 0.0, 0.0, 0.0, 0.0, 0.0]]),        # bytes: constant
    gamma=np.array([0.3, 0.0, 0.0, 0.0]), sigma=np.array([0.005, 0.05, 1e11, 0.0]))
SPEC = {
    "federation": {"rounds": 24, "num_devices": 4, "seed": 3},
    "pruning": {"target_ratio": 0.5, "target_round": 8},
    "sweep": {"discount": [0.99], "delta": [0.1], "exploration": [0.01],
              "rank_choices": [[2], [8], [2, 4, 8]], "reward": ["log"], "seeds": 3,
              "fleets": [{"agx": 2, "nx": 1, "tx2": 1}], "u_grid": 5},
}


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory):
    """The same sweep with 1 and with 4 forced host devices (two subprocesses at once)."""
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(SPEC))
    sweep_env.save_params(PLANTED, tmp / "planted.json")
    procs = {}
    for n in (1, 4):
        # Optimisation level 0 compiles ~3x faster; both runs use it, so they still have
        # to agree bit for bit (they also do at the default level).
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={n} --xla_backend_optimization_level=0"))
        procs[n] = subprocess.Popen(
            [sys.executable, "-m", "fedspine_jax.cli", "sweep", "sweep.yaml", "--env",
             "planted.json", "--out", f"out{n}", "--no-progress"],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = {}
    for n, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        outs[n] = (tmp / f"out{n}", json.loads(stdout))
    return outs


def test_planted_best_configuration_ranks_first(sweep_runs):
    out, printed = sweep_runs[1]
    doc = json.loads((out / "results.json").read_text())
    ranked = [tuple(r["rank_choices"]) for r in doc["results"]]
    assert ranked == [(8,), (2, 4, 8), (2,)]
    best, learner, stuck = doc["results"]
    assert [r["rank"] for r in doc["results"]] == [1, 2, 3]
    assert best["cumulative_reward"] > learner["cumulative_reward"] > stuck["cumulative_reward"]
    # Regret against the best fixed arm (always r = 8 here) orders them the other way.
    assert best["regret"] < learner["regret"] < stuck["regret"]
    assert stuck["regret"] > 0 and best["cells"] == 3
    # The planted configuration always plays r = 8, the stuck one r = 2, the learner mixes.
    for res, lo, hi in ((best, 8, 8), (stuck, 2, 2), (learner, 2, 8)):
        r_seen = np.array([res["curves"]["r_by_type"][t] for t in het.TYPE_NAMES])
        assert r_seen.min() >= lo and r_seen.max() <= hi
    assert np.ptp(learner["curves"]["r_by_type"]["agx"]) > 0
    assert len(best["curves"]["cumulative_regret"]) == SPEC["federation"]["rounds"]
    assert doc["regret_arms"]["ranks"] == [2, 4, 8] and len(doc["regret_arms"]["u"]) == 5
    assert doc["arm_space"] == "paper"  # SPEC sets none: the default, Algorithm 1's
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 4 and "| 1 | 0.99 | 0.1 | 0.01 | 8 | log |" in table
    for png in ("regret.png", "choices.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert printed["top"][0]["rank"] == 1 and printed["configurations"] == 3


def test_results_identical_on_1_and_4_devices(sweep_runs):
    (out1, printed1), (out4, printed4) = sweep_runs[1], sweep_runs[4]
    assert printed1["timing"]["devices"] == 1 and printed4["timing"]["devices"] == 4
    # 3 cells per group: the 4-device run pads the cell axis to 4 and drops the copy.
    assert (out1 / "results.json").read_bytes() == (out4 / "results.json").read_bytes()


# ---------------------------------------------------------------- configurations as data
GRID = {
    "federation": {"rounds": 10, "num_devices": 4, "seed": 5},
    "pruning": {"target_ratio": 0.5, "target_round": 4},
    "bandit": {"capacity": 8},
    "sweep": {"discount": [0.9, 0.99], "delta": [0.1, 0.4], "exploration": [0.01, 0.3],
              "rank_choices": [[2, 4, 8, 16], [4, 8]], "reward": ["log", "paper"],
              "seeds": 2, "fleets": [{"agx": 1, "nx": 1, "tx2": 2}], "u_grid": 3},
}


def _compiles(fn) -> tuple[object, int]:
    """``fn()`` and the number of XLA compilations it requested (cache hits included)."""
    from jax import monitoring

    seen = []

    def on_event(event, **_):
        if event == "/jax/compilation_cache/compile_requests_use_cache":
            seen.append(event)

    assert jax.config.jax_compilation_cache_dir  # conftest: every compile is then an event
    monitoring.register_event_listener(on_event)
    try:
        return fn(), len(seen)
    finally:
        monitoring.unregister_event_listener(on_event)


def test_grid_is_one_program_and_matches_each_configuration_alone(tmp_path):
    """A grid of 32 configurations compiles as many programs as one of 2 (one per fleet
    size), and every configuration's figures equal those of a sweep of it alone."""
    cfg, spec = load_sweep(None, [f"{s}.{k}={json.dumps(v)}"
                                        for s, d in GRID.items() for k, v in d.items()])
    env = sweep_env.default_params()

    def run(sp, name):
        return sweep.run_sweep(cfg, sp, env, tmp_path / name, progress=False)

    small = sweep_from_dict({**GRID["sweep"], "discount": [0.9], "delta": [0.1],
                                  "exploration": [0.01], "reward": ["log"]})
    run(small, "warm")  # the small eager programs (keys, host transfers) compile here
    doc_small, n_small = _compiles(lambda: run(small, "small"))
    doc, n_grid = _compiles(lambda: run(spec, "grid"))
    assert len(doc["results"]) == 32 and len(doc_small["results"]) == 2
    assert doc["timing"]["programs"] == doc_small["timing"]["programs"] == 1
    assert 1 <= n_grid <= n_small
    by_label = {r["label"]: r for r in doc["results"]}
    assert len(by_label) == 32
    # Alone: the shortest rank set unpadded, the paper reward, a large delta.
    for point in (sweep.Point(0.9, 0.4, 0.3, (4, 8), "paper"),
                  sweep.Point(0.99, 0.1, 0.01, (2, 4, 8, 16), "log")):
        alone_spec = sweep_from_dict({
            **GRID["sweep"], "discount": [point.discount], "delta": [point.delta],
            "exploration": [point.exploration], "rank_choices": [list(point.rank_choices)],
            "reward": [point.reward]})
        alone = run(alone_spec, "alone")["results"][0]
        mine = by_label[point.label]
        for key in ("cumulative_reward", "waiting_time_s"):
            np.testing.assert_allclose(mine[key], alone[key], rtol=1e-5, err_msg=key)
        for key in ("p_by_type", "r_by_type"):
            for t in het.TYPE_NAMES:
                np.testing.assert_allclose(np.array(mine["curves"][key][t], float),
                                           np.array(alone["curves"][key][t], float),
                                           rtol=1e-5, err_msg=key)
        if set(point.rank_choices) == set(sweep.all_ranks(spec)):  # same regret arm grid
            np.testing.assert_allclose(mine["regret"], alone["regret"], rtol=1e-4, atol=1e-6)
    # The configurations really differ (the grid is not one configuration repeated).
    assert len({round(r["cumulative_reward"], 9) for r in doc["results"]}) > 16


# ---------------------------------------------------------------- the regret, by reference
def _log_reward(loss, dp, imp, t_arm, mean, cfg):
    """Eq. 3's "log" variant written out (the guards of bandit.reward)."""
    floor = cfg.pruning.target_ratio / cfg.pruning.target_round
    eps = np.maximum(0.05 * mean, 1e-6)
    dt = np.abs(t_arm - mean) + eps
    slog = np.sign(loss) * np.log1p(np.abs(loss))
    return (slog * np.log1p(np.maximum(imp, 0)) * np.log1p(np.maximum(dp, floor) / floor)
            / np.log1p(dt / eps))


def _surfaces(env, dtype, p, r, t):
    """Mean surfaces ``t^-gamma theta . phi(p, r)`` in NumPy float64, ``(..., 4)``."""
    th, g = np.asarray(env.theta, np.float64), np.asarray(env.gamma, np.float64)
    p, r = np.asarray(p, np.float64), np.asarray(r, np.float64)
    lr = np.log2(r)
    phi = np.stack(np.broadcast_arrays(np.ones_like(p), p, p * p, lr, r, p * lr), -1)
    return np.einsum("...sf,...f->...s", th[dtype], phi) * float(t) ** (-g[dtype])


def _mean_arm(env, hw, dtype, group, mode, p, r, t):
    """Plug-in mean (loss drop, importance, time) of arms, in NumPy float64."""
    y = _surfaces(env, dtype, p, r, t)
    thr = (np.asarray(het.PEAK_FLOPS)[dtype] * het.MODE_TABLE[dtype, mode]
           * hw.efficiency)
    bw = np.asarray(het.MEAN_BANDWIDTH_MBPS)[group] * het.BYTES_PER_MBIT
    time = np.maximum(y[..., 2], 0) / thr + np.maximum(y[..., 3], 0) / bw
    return y[..., 0], np.maximum(y[..., 1], 0), time


@pytest.mark.parametrize("arm_space", ["paper", "floor"])
def test_hindsight_regret_matches_a_numpy_reference(arm_space):
    cfg = from_dict({"pruning": {"target_ratio": 0.5, "target_round": 5},
                     "bandit": {"exploration": 0.01, "reward": "log", "arm_space": arm_space},
                     "devices": {"mode_redraw_every": 3}})
    env, hw = sweep_env.default_params(), sweep_env.Hardware.from_config(cfg)
    dtype = np.array([het.AGX, het.NX, het.TX2, het.TX2], np.int32)
    group = np.array([0, 1, 2, 3], np.int32)
    arm_u, arm_r = (0.0, 0.5, 1.0), (2, 4, 8)
    rounds = 8
    prm = bandit.BanditParams.from_config(cfg)
    traj = jax.jit(lambda k: sweep.rollout(cfg, prm, prm, env, hw, dtype, group, k, rounds))(
        jax.random.PRNGKey(0))
    regret = np.asarray(jax.jit(lambda tr: sweep.hindsight_regret(
        cfg, prm, env, hw, arm_u, arm_r, dtype, group, tr))(traj))
    tr = jax.tree.map(lambda x: np.asarray(x, np.float64), traj)
    mode = np.asarray(traj.mode)
    n = len(dtype)
    u = np.repeat(arm_u, len(arm_r))
    r = np.tile(arm_r, len(arm_u)).astype(np.float64)
    target, t_target = cfg.pruning.target_ratio, cfg.pruning.target_round

    def arm_rewards(t, last_p, uu, rr, cols):
        lo = last_p
        if arm_space == "floor":  # the schedule floor
            lo = np.maximum(last_p, target * min(t / t_target, 1.0))
        p = lo + uu * (np.maximum(target, lo) - lo)
        loss, imp, t_arm = _mean_arm(env, hw, dtype[cols], group[cols], mode[t - 1][cols],
                                     p, rr, t)
        mean = tr.time[t - 1].mean() + (t_arm - tr.time[t - 1][cols]) / n
        return p, _log_reward(loss, p - last_p, imp, t_arm, mean, cfg)

    col = (slice(None), None)
    last, total = np.zeros((n, len(u))), np.zeros((n, len(u)))
    for t in range(1, rounds + 1):
        last, rew = arm_rewards(t, last, u[None], r[None], col)
        total += rew
    best = total.argmax(1)
    last_b, expect = np.zeros(n), []
    for t in range(1, rounds + 1):
        last_b, r_star = arm_rewards(t, last_b, u[best], r[best], slice(None))
        loss, imp, t_pl = _mean_arm(env, hw, dtype, group, mode[t - 1], tr.p[t - 1],
                                    tr.r[t - 1], t)
        mean = tr.time[t - 1].mean() + (t_pl - tr.time[t - 1]) / n
        r_played = _log_reward(loss, tr.p[t - 1] - tr.last_p[t - 1], imp, t_pl, mean, cfg)
        expect.append(np.sum(r_star - r_played))
    np.testing.assert_allclose(regret, expect, rtol=2e-3, atol=2e-5)
    assert np.sum(expect) > 0  # the bandit is still learning after 8 rounds


# ---------------------------------------------------------------- the environment
def test_environment_uses_the_device_model_of_heterogeneity():
    cfg = from_dict({"devices": {"mode_redraw_every": 4, "efficiency": 0.25,
                                 "bandwidth_noise": 0.0}})
    hw = sweep_env.Hardware.from_config(cfg)
    env = sweep_env.default_params().replace(sigma=jnp.zeros((3, 4)))  # no noise
    dtype = np.array([het.TX2, het.NX, het.AGX, het.TX2, het.AGX], np.int32)
    group = np.array([0, 1, 2, 3, 0], np.int32)
    p = np.linspace(0.1, 0.5, 5).astype(np.float32)
    r = np.array([2, 4, 8, 16, 2], np.int32)
    modes = np.asarray(sweep_env.power_modes(hw, jax.random.PRNGKey(0), dtype, 12))
    assert modes.shape == (12, 5) and modes.dtype == np.int32
    step = jax.jit(lambda mode, t: sweep_env.sample_round(env, hw, dtype, group, mode, p, r, t,
                                                          jax.random.PRNGKey(1)))
    for t in range(1, 13):
        mode = modes[t - 1]
        out = step(mode, t)
        assert np.all((0 <= mode) & (mode < het.NUM_MODES[dtype]))
        loss, imp, time = _mean_arm(env, hw, dtype, group, mode, p.astype(np.float64), r, t)
        mult = np.array([het.MODE_MULTIPLIERS[k][m] for k, m in zip(dtype, mode)])
        flops = _surfaces(env, dtype, p, r, t)[:, 2]
        np.testing.assert_allclose(out.compute_time,
                                   flops / (np.asarray(het.PEAK_FLOPS)[dtype] * mult * 0.25),
                                   rtol=1e-5)
        np.testing.assert_allclose(out.time, time, rtol=1e-5)
        np.testing.assert_allclose(out.loss_drop, loss, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(out.importance, imp, rtol=1e-5, atol=1e-8)
    # Modes are held for mode_redraw_every rounds, then re-drawn.
    for e in range(3):
        assert np.all(modes[4 * e: 4 * e + 4] == modes[4 * e])
    assert any(not np.array_equal(modes[0], modes[4 * e]) for e in (1, 2))


@pytest.mark.parametrize("clock", ["flops", "paper_regime"])
def test_sweep_clock_is_the_simulators_for_the_same_trace(clock):
    """One device model: for the simulator's own trace (modes, bandwidths) of a fleet,
    the sweep environment's completion times are heterogeneity.completion_time's."""
    cfg = from_dict({"federation": {"num_devices": 12},
                     "devices": {"scenario": "high", "clock": clock, "efficiency": 0.2,
                                 "mode_redraw_every": 3, "bandwidth_noise": 0.3}})
    fleet = het.build_fleet(cfg)
    hw = sweep_env.Hardware.from_config(cfg)
    assert hw.compute_scale == fleet.compute_scale
    assert (clock == "paper_regime") == (fleet.compute_scale != 1.0)
    rng = np.random.default_rng(0)
    times = jax.jit(lambda *a: sweep_env.round_times(hw, *a))
    for t in range(7):
        trace = het.round_trace(fleet, t)
        flops = rng.uniform(1e11, 1e13, fleet.num_devices)
        nbytes = rng.uniform(1e5, 1e7, fleet.num_devices)
        want = het.completion_time(fleet, t, flops, nbytes, 0.0)
        got = times(fleet.device_type.astype(np.int32), trace.mode.astype(np.int32),
                    trace.bandwidth.astype(np.float32), flops.astype(np.float32),
                    nbytes.astype(np.float32))
        np.testing.assert_allclose(got.compute_time, want.comp, rtol=2e-6)
        np.testing.assert_allclose(got.comm_time, want.comm, rtol=2e-6)
        np.testing.assert_allclose(got.time, want.total, rtol=2e-6)
    # The environment's own bandwidth draw is heterogeneity's function of the same normals.
    z = rng.standard_normal(fleet.num_devices)
    np.testing.assert_allclose(
        het.bandwidth_from_noise(fleet.distance_group, jnp.asarray(z, jnp.float32),
                                 cfg.devices.bandwidth_noise, xp=jnp),
        het.bandwidth_from_noise(fleet.distance_group, z, cfg.devices.bandwidth_noise),
        rtol=2e-6)


def test_noise_and_bandwidth_spread():
    cfg = Config()
    hw = sweep_env.Hardware.from_config(cfg)  # bandwidth_noise 0.2
    env = sweep_env.default_params()
    n = 20_000
    dtype = np.full(n, het.AGX, np.int32)
    group = np.full(n, 1, np.int32)  # 15 Mb/s: clipping at [1, 30] is rare
    p, r = np.full(n, 0.2, np.float32), np.full(n, 4, np.int32)
    mode = np.zeros(n, np.int32)
    out = jax.jit(sweep_env.sample_round, static_argnums=1)(env, hw, dtype, group, mode, p, r,
                                                           4, jax.random.PRNGKey(2))
    mean_loss, _, _, nbytes = _surfaces(env, het.AGX, 0.2, 4, 4)
    bw = nbytes / np.asarray(out.comm_time) / het.BYTES_PER_MBIT
    assert abs(bw.mean() / 15.0 - 1) < 0.01 and abs(bw.std() / 15.0 - 0.2) < 0.01
    sd = float(env.sigma[het.AGX, 0]) * 4 ** -float(env.gamma[het.AGX, 0])
    assert abs(float(np.mean(out.loss_drop)) - mean_loss) < 4 * sd / np.sqrt(n)
    assert abs(float(np.std(out.loss_drop)) / sd - 1) < 0.03


# ---------------------------------------------------------------- calibration
TRUE = make_env(
    theta=np.stack([np.array([[0.06, -0.02, -0.05, 0.015, -0.001, -0.008],
                              [0.1, -0.1, 0.02, 0.12, 0.004, 0.0],
                              [4e12, -3.5e12, 0.0, 0.0, 1.5e10, 0.0],
                              [1e4, 0.0, 0.0, 0.0, 2.5e5, 0.0]]) * (1 + 0.2 * k)
                    for k in range(3)]),
    gamma=np.array([[0.5, -0.3, 0.0, 0.0], [0.4, -0.2, 0.0, 0.0], [0.6, -0.4, 0.05, 0.0]]),
    sigma=np.array([0.0005, 0.001, 1e10, 1e3]))


def write_synthetic_run(path, env, rounds=40, seed=0):
    """A run directory whose metrics.jsonl follows ``env`` exactly (plus its noise)."""
    cfg = from_dict({"federation": {"num_devices": 12, "rounds": rounds, "seed": seed},
                     "devices": {"scenario": "custom", "num_agx": 4, "num_nx": 4,
                                 "num_tx2": 4}})
    fleet = het.build_fleet(cfg)
    path.mkdir(parents=True)
    dump_config(cfg, path / "config.yaml")
    rng = np.random.default_rng(seed)
    th, g, s = (np.asarray(x, np.float64) for x in (env.theta, env.gamma, env.sigma))
    lines = []
    for t in range(1, rounds + 1):
        trace = het.round_trace(fleet, t - 1)
        for i, k in enumerate(fleet.device_type):
            p, r = rng.uniform(0.0, 0.8), int(rng.choice([2, 4, 8, 16]))
            lr = np.log2(r)
            phi = np.array([1, p, p * p, lr, r, p * lr])
            y = t ** -g[k] * (th[k] @ phi + s[k] * rng.standard_normal(4))
            lines.append({"round": t, "device": i, "device_type": het.TYPE_NAMES[k], "p": p,
                          "r": r, "loss_drop": y[0], "lora_importance": y[1], "flops": y[2],
                          "compute_time": y[2] / trace.throughput[i],
                          "comm_time": y[3] / trace.bandwidth[i], "fits_memory": True})
        lines.append({"round": t, "summary": True})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_calibration_recovers_the_parameters(tmp_path):
    write_synthetic_run(tmp_path / "run", TRUE)
    fitted, info = sweep_env.calibrate(tmp_path / "run")
    th, g, s = (np.asarray(x, np.float64) for x in (TRUE.theta, TRUE.gamma, TRUE.sigma))
    fth, fg, fs = (np.asarray(x, np.float64) for x in (fitted.theta, fitted.gamma, fitted.sigma))
    # Coefficients within a small fraction of each surface's scale, exponents and noise close.
    scale = np.abs(th).max(-1, keepdims=True)
    assert np.max(np.abs(fth - th) / scale) < 0.05
    np.testing.assert_allclose(fg, g, atol=0.03)
    np.testing.assert_allclose(fs, s, rtol=0.15)
    # The fitted mean surfaces track the true ones over the arm space.
    pp, rr = np.meshgrid(np.linspace(0, 0.8, 9), [2, 4, 8, 16])
    for k in range(3):
        for t in (1, 10, 40):
            true, got = _surfaces(TRUE, k, pp, rr, t), _surfaces(fitted, k, pp, rr, t)
            assert np.max(np.abs(got - true) / np.abs(true).max((0, 1))) < 0.03
    assert all(not info["types"][n]["pooled"] for n in het.TYPE_NAMES)
    assert info["types"]["tx2"]["rows"] == 4 * 40


def test_calibrate_cli_saves_parameters_the_sweep_reloads(tmp_path, capsys):
    write_synthetic_run(tmp_path / "run", TRUE, rounds=10, seed=1)
    assert main(["sweep", "--calibrate", str(tmp_path / "run"), "--out",
                 str(tmp_path / "env.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == 120 and set(printed["fits"]) == set(het.TYPE_NAMES)
    loaded = sweep_env.load_params(tmp_path / "env.json")
    again, _ = sweep_env.calibrate(tmp_path / "run")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert main(["sweep"]) == 2  # neither --out nor --calibrate
    raw = json.loads((tmp_path / "env.json").read_text())
    assert raw["features"] == list(sweep_env.FEATURES) and "fit" in raw
    raw["types"]["nx"]["flops"]["theta"] = [1.0]
    with pytest.raises(ValueError, match="types.nx.flops.theta"):
        sweep_env.params_from_dict(raw)


def test_calibration_pools_types_with_too_few_rows(tmp_path):
    run = tmp_path / "run"
    write_synthetic_run(run, TRUE, rounds=20)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keep = [x for x in rows if x.get("summary") or x["device_type"] != "tx2" or x["round"] == 1]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in keep))
    _, info = sweep_env.calibrate(run)
    assert info["types"]["tx2"]["rows"] == 4 and info["types"]["tx2"]["pooled"]
    assert info["types"]["tx2"]["loss_drop"]["rows"] == 4 + 2 * 4 * 20  # all types' rows
    assert not info["types"]["agx"]["pooled"] and info["types"]["agx"]["loss_drop"]["rows"] == 80


# ---------------------------------------------------------------- the spec
def test_sweep_spec_grid_random_and_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "federation": {"num_devices": 10},
        "sweep": {"discount": [0.9, 0.99, 1.0], "exploration": [0.01, 0.1],
                  "rank_choices": [[2, 4], [4, 8, 16]], "reward": ["log", "paper"],
                  "fleets": ["high", {"agx": 1, "tx2": 2}]}}))
    cfg, spec = load_sweep(path)
    assert cfg.federation.num_devices == 10 and sweep.all_ranks(spec) == (2, 4, 8, 16)
    points = sweep.points(spec, 0)
    assert len(points) == 3 * 2 * 2 * 2 and len(set(points)) == len(points)
    assert [f.name for f in spec.fleets] == ["high", "agx=1,tx2=2"]
    assert sweep.build_fleet(spec.fleets[1], cfg).num_devices == 3
    pcfg = points[-1].config(cfg)
    assert pcfg.lora.rank_choices == (4, 8, 16) and pcfg.lora.rank == 16
    assert pcfg.bandit.reward == "paper" and pcfg.bandit.discount == 1.0
    _, rnd = load_sweep(path, ["sweep.search=random", "sweep.samples=5"])
    picked = sweep.points(rnd, 0)
    assert len(picked) == 5 and set(picked) <= set(points) and picked == sweep.points(rnd, 0)
    assert picked != sweep.points(rnd, 1)
    for bad, match in [("sweep.colour=1", "sweep.colour"),
                       ("sweep.reward=[log, best]", "sweep.reward"),
                       ("sweep.fleets=[{agx: 1, orin: 2}]", "orin"),
                       ("sweep.rank_choices=[[8, 4]]", "sorted"),
                       ("sweep.discount=[1.5]", "sweep.discount"),
                       ("sweep.seeds=0", "sweep.seeds")]:
        with pytest.raises(ConfigError, match=match):
            load_sweep(path, [bad])
    with pytest.raises(ConfigError, match="federation.bogus"):
        load_sweep(path, ["federation.bogus=1"])
    for raw in (5, "grid", [1, 2]):  # not a mapping: one ConfigError, not a TypeError
        with pytest.raises(ConfigError, match="sweep must be a mapping"):
            sweep_from_dict(raw)


def test_random_search_over_continuous_ranges():
    raw = {"search": "random", "samples": 400,
           "discount": {"low": 0.9, "high": 1.0}, "delta": [0.1, 0.2],
           "exploration": {"low": 1e-3, "high": 1.0, "log": True},
           "rank_choices": [[2, 4], [4, 8, 16]], "reward": ["log", "paper"]}
    spec = sweep_from_dict(raw)
    assert spec.exploration == Range(1e-3, 1.0, True)
    points = sweep.points(spec, 0)
    assert len(points) == 400 and points == sweep.points(spec, 0)
    assert points != sweep.points(spec, 1)
    disc = np.array([p.discount for p in points])
    expl = np.array([p.exploration for p in points])
    assert disc.min() >= 0.9 and disc.max() <= 1.0 and abs(disc.mean() - 0.95) < 0.01
    assert expl.min() >= 1e-3 and expl.max() <= 1.0
    # Log-uniform: each decade holds about a third of the draws (uniform: 0.1 % in the
    # first); the geometric midpoint splits them in half.
    decades = np.histogram(np.log10(expl), bins=[-3, -2, -1, 0])[0] / len(expl)
    assert np.all(np.abs(decades - 1 / 3) < 0.08), decades
    assert {p.delta for p in points} == {0.1, 0.2}
    assert {p.rank_choices for p in points} == {(2, 4), (4, 8, 16)}
    assert {p.reward for p in points} == {"log", "paper"}
    for bad, match in [({**raw, "search": "grid"}, "needs sweep.search=random"),
                       ({**raw, "discount": {"low": 0.99, "high": 0.9}}, "below"),
                       ({**raw, "exploration": {"low": 0.0, "high": 1.0, "log": True}},
                        "log range"),
                       ({**raw, "delta": {"low": 0.1, "hi": 0.2}}, "sweep.delta"),
                       ({**raw, "discount": {"low": 0.5, "high": 1.5}}, "sweep.discount")]:
        with pytest.raises(ConfigError, match=match):
            sweep_from_dict(bad)


def test_sweep_config_file_is_valid(tiny_config_path):
    cfg, spec = load_sweep(tiny_config_path.parent / "sweep.yaml")
    points = sweep.points(spec, cfg.federation.seed)
    assert len(points) >= 8 and spec.seeds >= 2
    # Calibrated on the paper-regime comparison: the fitted surfaces ship beside the config,
    # and the sweep's clock is that run's (same hardware knobs, same compute scale).
    fitted = json.loads(open(spec.env).read())
    assert fitted["fit"]["source"] == "fedspine" and sweep_env.load_params(spec.env)
    hw = sweep_env.Hardware.from_config(cfg)
    assert hw.compute_scale > 1 and cfg.devices.clock == "paper_regime"
    for k, v in fitted["fit"]["hardware"].items():
        assert getattr(hw, k) == pytest.approx(v, rel=1e-9), k
    for f in spec.fleets:
        assert sweep.build_fleet(f, cfg).num_devices == cfg.federation.num_devices
    assert {pt.config(cfg).bandit.reward for pt in points} == {"log", "paper"}
    # The shipped sweep keeps our schedule floor (the default arm space is the paper's).
    assert cfg.bandit.arm_space == "floor"
    assert {pt.config(cfg).bandit.arm_space for pt in points} == {"floor"}
