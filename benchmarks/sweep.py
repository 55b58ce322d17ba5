"""Sweep throughput: the jitted, vmapped sweep loop vs a per-agent NumPy loop.

Both sides run the same round: S-UCB select -> a synthetic round of the environment
(:mod:`fedspine_jax.sweep_env`, built-in surfaces, a ``high`` fleet) -> Eq. 3's "log"
reward over the fleet -> S-UCB update. The JAX side is the sweep's inner loop,
:func:`fedspine_jax.sweep.rollout` (a ``lax.scan`` over rounds) under ``jax.vmap`` over
``--cells`` cells, sharded over every local device like ``fedspine sweep``; it is also
timed with the hindsight regret pass (:func:`fedspine_jax.sweep.group_program`, a whole
cell of a sweep). The peer is the straightforward program: a Python loop over agents
using the NumPy S-UCB agent of ``benchmarks/bandit.py`` and a NumPy version of the
environment's round (its random numbers drawn in advance, which favours the peer).
Throughput is in agent-rounds per second. Before timing, the peer's surfaces, times and
reward are checked against ``sweep_env`` and ``bandit.reward`` on random arms.

    python benchmarks/sweep.py [--cells 64] [--agents 100] [--rounds 100] [--ref-agents 20]

``--end-to-end`` instead times whole sweeps (:func:`fedspine_jax.sweep.run_sweep`,
compilation, result files and plots included): the shipped grid (``configs/sweep.yaml``)
against its peer, a sweep of the grid's first configuration alone over the same seeds,
fleets and rounds (target: at most 3x its wall time); then, unless ``--random 0``, a random
sweep of ``--random`` configurations drawn from continuous ranges with ``--random-seeds``
seeds (1,000 x 25 seeds x 2 fleets of 20 devices x 100 rounds = 1e8 agent-rounds; target:
at most 5 minutes on a 2-core CPU).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedspine_jax import bandit, sweep, sweep_env
from fedspine_jax import heterogeneity as het
from fedspine_jax.config import Config, load_sweep, replace


def _numpy_agent_class():
    """``NumpyAgent`` of benchmarks/bandit.py (a script, loaded by path)."""
    spec = importlib.util.spec_from_file_location(
        "_bandit_bench", Path(__file__).with_name("bandit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.NumpyAgent


# ---------------------------------------------------------------- the NumPy peer
class NumpyEnv:
    """The environment's round for one device at a time (float64 NumPy)."""

    def __init__(self, env: sweep_env.EnvParams, hw: sweep_env.Hardware):
        self.theta = np.asarray(env.theta, np.float64)
        self.gamma = np.asarray(env.gamma, np.float64)
        self.sigma = np.asarray(env.sigma, np.float64)
        self.eff = hw.efficiency
        self.s = math.sqrt(math.log1p(hw.bandwidth_noise ** 2))

    def device_round(self, k, group, mode, p, r, t, z):
        """(loss drop, importance, time) of device type ``k`` at arm (p, r); z: (5,)."""
        lr = math.log2(r)
        phi = np.array([1.0, p, p * p, lr, r, p * lr])
        scale = t ** -self.gamma[k]
        y = scale * (self.theta[k] @ phi + self.sigma[k] * z[:4])
        loss, imp, flops, nbytes = y[0], max(y[1], 0.0), max(y[2], 0.0), max(y[3], 0.0)
        mbps = min(max(het.MEAN_BANDWIDTH_MBPS[group] * math.exp(self.s * z[4] - 0.5 * self.s ** 2),
                       het.BANDWIDTH_RANGE_MBPS[0]), het.BANDWIDTH_RANGE_MBPS[1])
        thr = het.PEAK_FLOPS[k] * het.MODE_MULTIPLIERS[k][mode] * self.eff
        return loss, imp, flops / thr + nbytes / (mbps * het.BYTES_PER_MBIT)


def numpy_log_reward(loss, dp, imp, times, cfg: Config) -> np.ndarray:
    """Eq. 3, "log" variant, over a fleet's ``(N,)`` arrays (the guards of bandit.reward)."""
    floor = cfg.pruning.target_ratio / cfg.pruning.target_round
    mean = times.mean()
    eps = max(0.05 * mean, 1e-6)
    dt = np.abs(times - mean) + eps
    slog = np.sign(loss) * np.log1p(np.abs(loss))
    return (slog * np.log1p(np.maximum(imp, 0.0)) * np.log1p(np.maximum(dp, floor) / floor)
            / np.log1p(dt / eps))


def run_numpy(cfg, env, hw, fleet, rounds, seed=0):
    """A fleet of NumPy agents, one Python iteration per agent and round."""
    agent_cls = _numpy_agent_class()
    n = fleet.num_devices
    rng = np.random.default_rng(seed)
    draws = rng.random((rounds, n, 2), np.float32)
    z = rng.standard_normal((rounds, n, 5))
    modes = np.stack([het.power_modes(fleet, t) for t in range(rounds)])  # host-side, cheap
    agents = [agent_cls(cfg) for _ in range(n)]
    peer_env = NumpyEnv(env, hw)
    types, groups = fleet.device_type.tolist(), fleet.distance_group.tolist()
    total = 0.0
    for t in range(rounds):
        loss, imp, times, dp = (np.zeros(n) for _ in range(4))
        for i, ag in enumerate(agents):
            last = float(ag.last_p)
            p, r, _ = ag.select(draws[t, i])
            loss[i], imp[i], times[i] = peer_env.device_round(
                types[i], groups[i], int(modes[t, i]), float(p), r, t + 1, z[t, i])
            dp[i] = float(p) - last
        rew = numpy_log_reward(loss, dp, imp, times, cfg)
        for i, ag in enumerate(agents):
            ag.update(rew[i])
        total += rew.sum()
    return total


def check_peer(cfg, env, hw) -> dict:
    """The peer's round and reward agree with sweep_env and bandit.reward."""
    rng = np.random.default_rng(1)
    n = 64
    k = rng.integers(0, 3, n).astype(np.int32)
    g = rng.integers(0, 4, n).astype(np.int32)
    mode = np.minimum((rng.random(n) * het.NUM_MODES[k]).astype(np.int32),
                      het.NUM_MODES[k] - 1)
    p = rng.uniform(0, 0.5, n).astype(np.float32)
    r = rng.choice([2, 4, 8, 16], n).astype(np.int32)
    t = 7
    loss, imp, tm = (np.asarray(x, np.float64) for x in
                     sweep_env.mean_outcome(env, hw, k, g, mode, p, r, t))
    peer = NumpyEnv(env, hw)
    peer.s = 0.0  # z = 0 and no bandwidth noise: the peer's round is the plug-in mean
    mine = np.array([peer.device_round(k[i], g[i], mode[i], float(p[i]), int(r[i]), t,
                                       np.zeros(5)) for i in range(n)])
    surf_err = float(np.max(np.abs(mine - np.stack([loss, imp, tm], 1))
                            / np.abs(np.stack([loss, imp, tm], 1)).max(0)))
    dp = rng.uniform(0, 0.1, n)
    want = np.asarray(bandit.reward(loss, dp, imp, tm, cfg), np.float64)
    got = numpy_log_reward(loss, dp, imp, tm, cfg)
    rew_err = float(np.max(np.abs(got - want)) / np.abs(want).max())
    return {"max_rel_err_round": surf_err, "max_rel_err_reward": rew_err,
            "ok": surf_err < 1e-5 and rew_err < 1e-5}


# ---------------------------------------------------------------- timing
def best_time(fn, args, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best


def end_to_end(args) -> dict:
    """Wall time of whole sweeps: the shipped grid, one configuration, a random sweep."""
    import tempfile

    config = Path(__file__).resolve().parents[1] / "configs" / "sweep.yaml"
    env = sweep_env.default_params()

    def run(overrides: list[str]) -> dict:
        cfg, spec = load_sweep(config, overrides)
        with tempfile.TemporaryDirectory() as out:
            t = sweep.run_sweep(cfg, spec, env, out, progress=False,
                                chunk_agents=args.chunk_agents)["timing"]
        return {"configurations": len(sweep.points(spec, cfg.federation.seed)),
                "agent_rounds": t["agent_rounds"], "wall_s": round(t["wall_s"], 2),
                "agent_rounds_per_s": round(t["agent_rounds"] / t["wall_s"]),
                "programs": t["programs"]}

    out = {"chunk_agents": args.chunk_agents}
    if not args.random_only:
        out |= grid_vs_one(run, config)
    if args.random:
        rnd = run(["sweep.search=random", f"sweep.samples={args.random}",
                   f"sweep.seeds={args.random_seeds}",
                   "sweep.discount={low: 0.9, high: 1.0}",
                   "sweep.delta={low: 0.05, high: 0.4}",
                   "sweep.exploration={low: 0.001, high: 1.0, log: true}"])
        out |= {"random": rnd, "target_5min_met": rnd["wall_s"] <= 300,
                "target_1e8_agent_rounds": rnd["agent_rounds"] >= 1e8,
                "target_gpu_1e8_per_s_met": rnd["agent_rounds_per_s"] >= 1e8}
    return out


def grid_vs_one(run, config) -> dict:
    """The shipped grid against a sweep of its first configuration alone."""
    _, grid_spec = load_sweep(config)
    first = sweep.points(grid_spec, 0)[0]
    one = run([f"sweep.discount=[{first.discount}]", f"sweep.delta=[{first.delta}]",
               f"sweep.exploration=[{first.exploration}]",
               f"sweep.rank_choices=[{list(first.rank_choices)}]",
               f"sweep.reward=[{first.reward}]"])
    grid = run([])
    return {"one_configuration": one, "shipped_grid": grid,
            "grid_over_one_wall": round(grid["wall_s"] / one["wall_s"], 2),
            "target_3x_met": grid["wall_s"] <= 3 * one["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=64, help="cells (fleets) under jax.vmap")
    ap.add_argument("--agents", type=int, default=100, help="devices per fleet")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--ref-agents", type=int, default=20, help="devices of the NumPy fleet")
    ap.add_argument("--ref-rounds", type=int, default=50)
    ap.add_argument("--u-grid", type=int, default=11)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--end-to-end", action="store_true",
                    help="time whole sweeps (shipped grid vs one configuration, random sweep)")
    ap.add_argument("--random", type=int, default=1000,
                    help="configurations of the random end-to-end sweep (0: skip it)")
    ap.add_argument("--random-seeds", type=int, default=25)
    ap.add_argument("--random-only", action="store_true",
                    help="with --end-to-end: skip the grid vs one-configuration pair")
    ap.add_argument("--chunk-agents", type=int, default=sweep.CHUNK_AGENTS,
                    help="most agents per chunk of a sweep program (larger on a GPU)")
    args = ap.parse_args()
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
               f"{len(jax.devices())} x {jax.devices()[0].platform}")
    if args.end_to_end:
        print(json.dumps({"benchmark": "sweep_end_to_end", "machine": machine,
                          **end_to_end(args)}, indent=2))
        return

    cfg = replace(Config(), federation={"num_devices": args.agents, "rounds": args.rounds},
                  pruning={"target_ratio": 0.5, "target_round": max(1, args.rounds // 3)},
                  devices={"scenario": "high"},
                  bandit={**bandit.TUNED, "discount": 0.99})
    env, hw = sweep_env.default_params(), sweep_env.Hardware.from_config(cfg)
    fleet = het.build_fleet(cfg)
    check = check_peer(cfg, env, hw)

    mesh = sweep.device_mesh()
    cells = args.cells + (-args.cells) % mesh.size
    shard, rep = NamedSharding(mesh, P("cells")), NamedSharding(mesh, P())
    types = jax.device_put(np.tile(fleet.device_type.astype(np.int32), (cells, 1)), shard)
    groups = jax.device_put(np.tile(fleet.distance_group.astype(np.int32), (cells, 1)), shard)
    keys = jax.device_put(np.stack([np.asarray(jax.random.PRNGKey(c), np.uint32)
                                    for c in range(cells)]), shard)
    env_d = jax.device_put(env, rep)
    work = cells * args.agents * args.rounds

    prm = bandit.BanditParams.from_config(cfg)
    loop = jax.jit(jax.vmap(lambda e, d, g, k: sweep.rollout(cfg, prm, prm, e, hw, d, g, k,
                                                             args.rounds),
                            in_axes=(None, 0, 0, 0)),
                   in_shardings=(rep, shard, shard, shard), out_shardings=shard)
    loop_first, loop_best = best_time(loop, (env_d, types, groups, keys), args.repeats)

    arm_u = tuple(float(u) for u in np.linspace(0, 1, args.u_grid))
    full = sweep.group_program(cfg, hw, arm_u, tuple(cfg.lora.rank_choices), args.rounds,
                               mesh)
    prm_cells = jax.device_put(jax.tree.map(lambda x: np.repeat(x[None], cells, 0), prm), shard)
    full_first, full_best = best_time(full, (env_d, prm_cells, prm_cells, types, groups, keys),
                                      args.repeats)

    ref_cfg = replace(cfg, federation={"num_devices": args.ref_agents})
    ref_fleet = het.build_fleet(ref_cfg)
    np_best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_numpy(ref_cfg, env, hw, ref_fleet, args.ref_rounds)
        np_best = min(np_best, time.perf_counter() - t0)
    np_rate = args.ref_agents * args.ref_rounds / np_best

    loop_rate, full_rate = work / loop_best, work / full_best
    print(json.dumps({
        "benchmark": "sweep_inner_loop",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
                   f"{mesh.size} x {jax.devices()[0].platform}",
        "cells": cells, "agents": args.agents, "rounds": args.rounds,
        "capacity": cfg.bandit.capacity, "rank_choices": list(cfg.lora.rank_choices),
        "jax_loop_agent_rounds_per_s": round(loop_rate),
        "jax_loop_best_s": round(loop_best, 4), "jax_loop_compile_s": round(loop_first, 2),
        "jax_with_regret_agent_rounds_per_s": round(full_rate),
        "regret_arms": args.u_grid * len(cfg.lora.rank_choices),
        "jax_with_regret_best_s": round(full_best, 4),
        "jax_with_regret_compile_s": round(full_first, 2),
        "numpy_agents": args.ref_agents, "numpy_rounds": args.ref_rounds,
        "numpy_agent_rounds_per_s": round(np_rate),
        "speedup_loop": round(loop_rate / np_rate, 1),
        "speedup_with_regret": round(full_rate / np_rate, 1),
        "target_1e6_met": loop_rate >= 1e6,
        "peer_check": check,
    }, indent=2))
    if not check["ok"]:
        raise SystemExit("the NumPy peer disagrees with sweep_env / bandit.reward")


if __name__ == "__main__":
    main()
