"""S-UCB throughput: jitted, vmapped JAX agents vs a per-agent NumPy implementation.

Both run the same agents (select + update, Algorithm 1) for the same rounds on the same
synthetic reward surface. The JAX side runs ``--agents`` agents for ``--rounds`` rounds
under one ``lax.scan``; the NumPy peer (written below, the straightforward way: a Python
loop over agents, NumPy over each agent's leaf slots) runs ``--ref-agents`` agents, and
both are reported in agent-rounds per second. Before timing, the NumPy peer is fed the
JAX run's random draws for a few agents and must choose the same arms every round.

    python benchmarks/bandit.py [--agents 10000] [--rounds 100] [--ref-agents 100]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedspine_jax import bandit
from fedspine_jax.config import Config, replace


# ---------------------------------------------------------------- the synthetic surface
def surface(p, rank_index, num_ranks):
    """Mean reward of an arm: a bump at p = 0.3 times a preference for the middle rank."""
    xp = jnp if isinstance(p, jax.Array) else np
    centre = (num_ranks - 1) / 2
    return (xp.exp(-0.5 * ((p - 0.3) / 0.1) ** 2)
            * (1.0 - 0.5 * xp.abs(rank_index - centre) / max(centre, 1)))


# ---------------------------------------------------------------- the NumPy peer
class NumpyAgent:
    """One S-UCB agent in NumPy (float32), the same algorithm as ``fedspine_jax.bandit``."""

    def __init__(self, cfg: Config):
        self.prm = params = bandit.BanditParams.from_config(cfg)
        self.capacity = c = int(cfg.bandit.capacity)
        k = int(params.num_ranks)
        self.u_lo = np.zeros(c, np.float32)
        self.u_hi = np.zeros(c, np.float32)
        self.u_hi[0] = 1.0
        self.b_lo = np.zeros(c, np.int32)
        self.b_hi = np.zeros(c, np.int32)
        self.b_hi[0] = k
        self.count = np.zeros(c, np.float32)
        self.rsum = np.zeros(c, np.float32)
        self.leaves, self.round, self.last_p, self.leaf = 1, 0, np.float32(0.0), 0

    def select(self, draw):
        prm, f32 = self.prm, np.float32
        self.round += 1
        target = f32(prm.target_ratio)
        p_lo = self.last_p
        if prm.floor:
            frac = min(f32(self.round) / f32(prm.target_round), f32(1.0))
            floor = target if frac >= 1.0 else f32(target * f32(frac))
            p_lo = max(self.last_p, floor)
        p_hi = max(target, p_lo)
        head = f32(p_hi - p_lo)
        live = self.leaves
        n, s = self.count[:live], self.rsum[:live]
        visited = n > 1e-30
        safe = np.where(visited, n, f32(1.0))
        log_n = np.log(max(n.sum(dtype=np.float32), f32(1.0)))
        pad = f32(prm.exploration) * np.sqrt(f32(2.0) * log_n / safe)
        ucb = np.where(visited, s / safe + pad, np.inf)
        j = int(np.argmax(ucb))
        u_lo, u_hi, b_lo, b_hi = self.u_lo[j], self.u_hi[j], int(self.b_lo[j]), int(self.b_hi[j])
        u = min(f32(u_lo + f32(draw[0]) * f32(u_hi - u_lo)), u_hi)
        span = b_hi - b_lo
        b = b_lo + min(int(np.floor(f32(draw[1]) * f32(span))), span - 1)
        p = f32(min(max(f32(p_lo + f32(u * head)), p_lo), p_hi))
        p_scale = f32(1.0 / prm.target_ratio) if prm.target_ratio > 0 else f32(0.0)
        side_u = f32(f32(u_hi - u_lo) * head) * p_scale
        side_b = f32(span) / f32(prm.num_ranks) if span > 1 else f32(0.0)
        self.leaf = j
        if (side_u * side_u + side_b * side_b > f32(prm.delta) ** 2 and live < self.capacity
                and self.count[j] > 1e-30):
            m = live
            for arr in (self.u_lo, self.u_hi, self.b_lo, self.b_hi):
                arr[m] = arr[j]
            if side_b >= side_u:
                mid = (b_lo + b_hi) // 2
                self.b_hi[j], self.b_lo[m], upper = mid, mid, b >= mid
            else:
                mid = f32(0.5) * f32(u_lo + u_hi)
                self.u_hi[j], self.u_lo[m], upper = mid, mid, u >= mid
            for arr in (self.count, self.rsum):
                arr[j] *= f32(0.5)
                arr[m] = arr[j]
            self.leaves += 1
            self.leaf = m if upper else j
        self.last_p = p
        return p, int(prm.rank_choices[b]), b

    def update(self, reward):
        lam = np.float32(self.prm.discount)
        self.count *= lam
        self.rsum *= lam
        self.count[self.leaf] += lam
        self.rsum[self.leaf] += lam * np.float32(reward)


def run_numpy(cfg, draws_tad):
    """Run ``A`` NumPy agents on draws ``(T, A, 2)``; returns p ``(T, A)`` and ranks."""
    t_, a_, _ = draws_tad.shape
    k = len(cfg.lora.rank_choices)
    agents = [NumpyAgent(cfg) for _ in range(a_)]
    p_out = np.zeros((t_, a_), np.float32)
    r_out = np.zeros((t_, a_), np.int32)
    for t in range(t_):
        for i, ag in enumerate(agents):
            p, r, b = ag.select(draws_tad[t, i])
            ag.update(surface(np.float32(p), b, k))
            p_out[t, i], r_out[t, i] = p, r
    return p_out, r_out


# ---------------------------------------------------------------- the JAX side
def make_jax_run(cfg: Config, num_agents: int, rounds: int):
    """A jitted ``run(key)``: one fleet of agents for ``rounds`` rounds under ``lax.scan``."""
    ranks = jnp.asarray(cfg.lora.rank_choices)
    k = len(cfg.lora.rank_choices)

    def run(key):
        init_key, round_key = jax.random.split(key)
        state = bandit.init(cfg, num_agents, init_key)

        def body(state, kt):
            state, p, r = bandit.select(state, kt)
            b = jnp.argmax(ranks[None, :] == r[:, None], axis=1)
            return bandit.update(state, surface(p, b, k)), (p, r)

        keys = jax.random.split(round_key, rounds)
        state, (p, r) = jax.lax.scan(body, state, keys)
        return state, p, r, keys

    return jax.jit(run), run


def time_best(fn, key, repeats):
    """(compile + first run seconds, best of ``repeats`` later runs)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(key))
    first = time.perf_counter() - t0
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.fold_in(key, i)))
        best = min(best, time.perf_counter() - t0)
    return first, best


def check_agreement(cfg: Config, num_agents: int, rounds: int, key) -> dict:
    """The NumPy peer, fed the JAX run's draws, chooses the same arms every round."""
    run, _ = make_jax_run(cfg, num_agents, rounds)
    state, p, r, keys = run(key)
    init_key, _ = jax.random.split(key)
    state0 = bandit.init(cfg, num_agents, init_key)
    draws = np.stack([np.asarray(bandit.arm_draws(state0, kt)) for kt in keys])
    p_np, r_np = run_numpy(cfg, draws)
    p, r = np.asarray(p), np.asarray(r)
    ranks_equal = bool(np.array_equal(r, r_np))
    max_dp = float(np.max(np.abs(p - p_np)))
    return {"agents": num_agents, "rounds": rounds, "ranks_equal": ranks_equal,
            "max_abs_dp": max_dp, "ok": ranks_equal and max_dp <= 1e-6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--ref-agents", type=int, default=100)
    ap.add_argument("--fleets", type=int, default=100,
                    help="also run this many fleets of agents/fleets agents under jax.vmap")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    # Our tuned bandit (the schedule floor) with a later target round, so the p schedule
    # is live for half the run.
    cfg = replace(Config(), pruning={"target_round": max(1, args.rounds // 2)},
                  bandit=bandit.TUNED)
    key = jax.random.key(0)

    agree = check_agreement(cfg, 8, args.rounds, jax.random.key(1))

    run, _ = make_jax_run(cfg, args.agents, args.rounds)
    compile_s, best = time_best(run, key, args.repeats)
    jax_rate = args.agents * args.rounds / best

    # The sweep's shape: many fleets, vmapped over fleets, same agent-rounds in total.
    per_fleet = max(1, args.agents // args.fleets)
    _, fleet_run = make_jax_run(cfg, per_fleet, args.rounds)
    fleets_run = jax.jit(lambda k: jax.vmap(fleet_run)(jax.random.split(k, args.fleets)))
    _, fleets_best = time_best(fleets_run, key, args.repeats)
    fleets_rate = args.fleets * per_fleet * args.rounds / fleets_best

    draws = np.random.default_rng(0).random((args.rounds, args.ref_agents, 2), np.float32)
    np_s = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_numpy(cfg, draws)
        np_s = min(np_s, time.perf_counter() - t0)
    np_rate = args.ref_agents * args.rounds / np_s

    print(json.dumps({
        "benchmark": "bandit_select_update",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"jax {jax.__version__} on {jax.devices()[0].platform}",
        "agents": args.agents, "rounds": args.rounds, "capacity": cfg.bandit.capacity,
        "rank_choices": list(cfg.lora.rank_choices),
        "jax_agent_rounds_per_s": round(jax_rate),
        "jax_best_s": round(best, 4), "jax_compile_s": round(compile_s, 2),
        "jax_fleets": f"{args.fleets} x {per_fleet} agents (vmap over fleets)",
        "jax_fleets_agent_rounds_per_s": round(fleets_rate),
        "numpy_agents": args.ref_agents,
        "numpy_agent_rounds_per_s": round(np_rate),
        "speedup": round(jax_rate / np_rate, 1),
        "agreement": agree,
    }, indent=2))
    if not agree["ok"]:
        raise SystemExit("the NumPy peer disagrees with fedspine_jax.bandit")


if __name__ == "__main__":
    main()
