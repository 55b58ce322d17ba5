"""``fedspine sweep``: S-UCB hyperparameter sweeps on synthetic fleets (issue 8).

Design note
-----------
A *configuration* is one point of the search space: the bandit's ``discount``, ``delta``
and ``exploration``, the rank set ``lora.rank_choices`` and the ``reward`` variant. A
*cell* is a configuration run on one fleet composition with one seed: a fleet of S-UCB
agents (one per device) playing ``federation.rounds`` rounds against the synthetic
environment of :mod:`fedspine_jax.sweep_env`. The agents are exactly
:func:`fedspine_jax.bandit.select` / :func:`~fedspine_jax.bandit.update` fed
:func:`~fedspine_jax.bandit.reward` (Eq. 3); this module only wires them to the
environment.

*Batching: configurations as data.* The bandit's hyperparameters are array leaves of
:class:`~fedspine_jax.bandit.BanditParams` (discount, delta, exploration, the pruning
schedule, the reward variant as a traced switch, the rank set padded to the sweep's longest
with a count of valid ranks), so a configuration is a row of a stacked params pytree, and a
*cell* (configuration x seed x fleet) is one index of a single ``jax.vmap`` axis. A sweep
compiles **one program per distinct fleet size** (the agent axis ``N`` is the only shape
that differs between cells; for the preset fleets, all of ``federation.num_devices``
devices, that is one program), however many configurations, seeds and fleets it holds:
everything else a cell needs (params, device types, distance groups, key) is data. The
program is a ``jax.vmap`` over a chunk of cells of a ``lax.scan`` over rounds; every
chunk of a fleet size has the same number of cells (the last is padded with copies of
its last cell, which are dropped) so all chunks reuse the one compiled program, and a
chunk holds at most :data:`CHUNK_AGENTS` agents so memory stays bounded for sweeps of any
size. The cell axis is sharded over a 1-D mesh of every local device (``NamedSharding``;
chunks are a multiple of the device count). Cells are independent, so results do not
depend on the number of devices or on the chunking.

*Randomness.* Cell ``(seed s, fleet f)`` uses ``fold_in(fold_in(key(federation.seed), s),
f)`` in every configuration: all configurations meet the same power modes, bandwidths and
surface noise and draw from the same bandit streams (common random numbers), so their
differences are not sampling noise between configurations.

*Scores.* Decision: every cell is scored with one reward variant, ``sweep.score``,
whatever variant its agents learn from. The "paper" reward (Eq. 3 in raw units) and the
"log" reward differ in scale by orders of magnitude, so cumulative rewards of the two
would not be comparable; the agents of a "paper" configuration still learn from "paper".
Three figures rank a configuration, means over its seeds and fleets, per agent:

* cumulative reward: the realised (noisy) score reward summed over rounds;
* regret (Eq. 7) against the best fixed arm in hindsight: for every device and every arm
  of a grid (``sweep.u_grid`` values of the headroom fraction ``u`` of S-UCB's arm space
  times every rank of the sweep's rank sets), the device's own p-trajectory under that
  fixed arm is rolled out through the schedule of :func:`fedspine_jax.bandit.p_bounds`,
  and its mean reward (the environment's plug-in mean surfaces, the device's realised
  power modes, the rest of the fleet's realised times) is summed over rounds; the best
  arm's sum minus that of the arms actually played, evaluated the same way. Decision: the
  grid spans the ranks of all rank sets, so regrets are comparable across rank sets; a
  fixed arm is not the best adaptive policy, so regret can be negative;
* waiting time: Eq. 1, ``Gamma = mean_i (max_j T_j - T_i)``, averaged over rounds.

Configurations are ranked by cumulative reward (ties by regret).

The output directory gets ``results.json`` (ranked configurations, per-fleet figures and
per-round curves), ``results.md`` (the table) and two plots: ``regret.png`` (cumulative
regret of the top configurations) and ``choices.png`` (the best configuration's mean
``p`` and ``r`` per device type over rounds).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedspine_jax import bandit, heterogeneity as het, sweep_env
from fedspine_jax.config import (Config, FleetSpec, Range, SweepConfig, load_sweep,
                                 replace)

FORMAT = "fedspine-sweep/1"
_CELLS = "cells"  # name of the mesh axis the cells are sharded over
# Agents (cells x devices) per chunk of a sweep program: bounds its memory (the bandit state
# is ~1.6 kB per agent at capacity 64, the trajectory ~2 kB per agent at 100 rounds).
CHUNK_AGENTS = 1 << 15


# ---------------------------------------------------------------------- the search space
# The sweep section is parsed and validated by fedspine_jax.config (SweepConfig, Range,
# FleetSpec, load_sweep); this module turns it into configurations and fleets.


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of the search space."""

    discount: float
    delta: float
    exploration: float
    rank_choices: tuple[int, ...]
    reward: str

    @property
    def label(self) -> str:
        ranks = ",".join(str(r) for r in self.rank_choices)
        return (f"lambda={self.discount:g} delta={self.delta:g} c={self.exploration:g} "
                f"r={{{ranks}}} {self.reward}")

    def config(self, base: Config) -> Config:
        """``base`` with this configuration's bandit and rank set (validated)."""
        return replace(base, bandit={"discount": self.discount, "delta": self.delta,
                                     "exploration": self.exploration, "reward": self.reward},
                       lora={"rank_choices": self.rank_choices,
                             "rank": max(base.lora.rank, max(self.rank_choices))})

    def params(self, base: Config, num_ranks: int, reward: str | None = None
               ) -> bandit.BanditParams:
        """This configuration's bandit params (host arrays), the rank set padded to
        ``num_ranks``; ``reward`` replaces the variant (the score's, module note)."""
        cfg = self.config(base)
        if reward is not None:
            cfg = replace(cfg, bandit={"reward": reward})
        return bandit.BanditParams.from_config(cfg, num_ranks)

    def as_dict(self) -> dict:
        return {"discount": self.discount, "delta": self.delta,
                "exploration": self.exploration, "rank_choices": list(self.rank_choices),
                "reward": self.reward}


def points(spec: SweepConfig, seed: int) -> list[Point]:
    """The configurations of a sweep.

    A grid search runs every combination, in grid order. A random search over lists only
    draws ``spec.samples`` distinct grid points (all of them if the grid is smaller); with
    a :class:`~fedspine_jax.config.Range` among the parameters it draws every parameter of
    every sample independently: a range uniformly (log-uniformly if ``log``), a list one of
    its values uniformly. Both are reproducible from ``seed``.
    """
    rng = np.random.default_rng(seed)
    axes = (spec.discount, spec.delta, spec.exploration, spec.rank_choices, spec.reward)
    if any(isinstance(a, Range) for a in axes):
        cols = [_draw(a, rng, spec.samples).tolist() if isinstance(a, Range)
                else [a[i] for i in rng.integers(0, len(a), spec.samples)] for a in axes]
        return [Point(*v) for v in zip(*cols)]
    grid = [Point(*v) for v in itertools.product(*axes)]
    if spec.search == "random" and spec.samples < len(grid):
        pick = rng.choice(len(grid), spec.samples, replace=False)
        grid = [grid[i] for i in sorted(pick.tolist())]
    return grid


def _draw(r: Range, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` float64 values in ``[r.low, r.high]``, log-uniform if ``r.log``."""
    if r.log:
        return np.exp(rng.uniform(np.log(r.low), np.log(r.high), n))
    return rng.uniform(r.low, r.high, n)


def all_ranks(spec: SweepConfig) -> tuple[int, ...]:
    """Every rank of every rank set: the rank axis of the regret's arm grid."""
    return tuple(sorted({r for rc in spec.rank_choices for r in rc}))


def build_fleet(fleet: FleetSpec, cfg: Config) -> het.Fleet:
    """The devices of a fleet composition (:func:`fedspine_jax.heterogeneity.build_fleet`)."""
    if fleet.scenario == "custom":
        agx, nx, tx2 = fleet.counts
        cfg = replace(cfg, devices={"scenario": "custom", "num_agx": agx, "num_nx": nx,
                                    "num_tx2": tx2},
                      federation={"num_devices": agx + nx + tx2})
    else:
        cfg = replace(cfg, devices={"scenario": fleet.scenario})
    return het.build_fleet(cfg)


# ---------------------------------------------------------------------- one cell


class Trajectory(NamedTuple):
    """A cell's rounds, stacked by ``lax.scan``: ``(T, N)`` per device or ``(T,)``."""

    p: jax.Array          # pruning ratio chosen in the round
    last_p: jax.Array     # the ratio before it (p^{t-1})
    r: jax.Array          # int32 rank chosen
    mode: jax.Array       # int32 power mode
    time: jax.Array       # completion time T_i^t (s)
    reward: jax.Array     # (T,) score reward summed over the devices
    waiting: jax.Array    # (T,) Eq. 1


def rollout(cfg: Config, params: bandit.BanditParams, score: bandit.BanditParams,
            env: sweep_env.EnvParams, hw: sweep_env.Hardware, device_type: jax.Array,
            distance_group: jax.Array, key: jax.Array, rounds: int) -> Trajectory:
    """One fleet of S-UCB agents for ``rounds`` rounds (``lax.scan``); jit- and vmap-able.

    Each round: :func:`bandit.select` -> :func:`sweep_env.sample_round` ->
    :func:`bandit.reward` (Eq. 3 with the configuration's variant) -> :func:`bandit.update`.

    Args:
        cfg: the base config (``bandit.capacity``).
        params: the configuration's bandit params (scalar leaves, may be traced).
        score: ``params`` with the score variant (module note, Scores).
        env, hw: the synthetic environment.
        device_type, distance_group: int ``(N,)``.
        key: the cell's key (raw ``uint32 (2,)`` or typed).
        rounds: ``T``.

    Returns:
        A :class:`Trajectory`.
    """
    k_init, k_select, k_mode, k_noise = jax.random.split(key, 4)
    state = bandit.init(cfg, device_type.shape[0], k_init, params=params)
    modes = sweep_env.power_modes(hw, k_mode, device_type, rounds)      # (T, N)

    def step(state, xs):
        t, mode = xs
        last_p = state.last_p
        state, p, r = bandit.select(state, jax.random.fold_in(k_select, t))
        out = sweep_env.sample_round(env, hw, device_type, distance_group, mode, p, r, t,
                                     k_noise)
        dp = p - last_p
        rew = bandit.reward(out.loss_drop, dp, out.importance, out.time, params)
        state = bandit.update(state, rew)
        scored = bandit.reward(out.loss_drop, dp, out.importance, out.time, score)
        waiting = jnp.mean(jnp.max(out.time) - out.time)  # Eq. 1
        return state, Trajectory(p=p, last_p=last_p, r=r, mode=mode, time=out.time,
                                 reward=jnp.sum(scored), waiting=waiting)

    _, traj = jax.lax.scan(step, state, (jnp.arange(1, rounds + 1, dtype=jnp.int32), modes))
    return traj


def hindsight_regret(cfg: Config, score: bandit.BanditParams, env: sweep_env.EnvParams,
                     hw: sweep_env.Hardware,
                     arm_u: tuple[float, ...], arm_r: tuple[int, ...], device_type: jax.Array,
                     distance_group: jax.Array, traj: Trajectory) -> jax.Array:
    """Per-round regret (Eq. 7) of a cell against each device's best fixed arm in hindsight.

    Arms are ``(u, r)`` pairs (``G`` of them): ``u`` is the fraction of the round's p
    headroom taken, as in S-UCB's arm space, so a fixed arm's pruning ratio follows
    ``p^t = p_lo + u (p_hi - p_lo)`` with ``[p_lo, p_hi]`` from :func:`bandit.p_bounds`
    at the arm's own ``p^{t-1}``. An arm's mean reward in round ``t`` is
    :func:`bandit.reward` (``score``) of the plug-in mean loss drop, importance and
    time (:func:`sweep_env.mean_outcome`, realised power mode), against the fleet's
    realised mean time with the device's own time replaced by the arm's. The played arms
    are evaluated the same way. Two passes: the arms' totals give each device's best arm,
    then the best arm's and the played arm's per-round rewards are differenced.

    Args:
        cfg: the base config (``bandit.capacity``).
        score: bandit params of the score reward and the pruning schedule.
        env, hw: the synthetic environment.
        arm_u, arm_r: the grid's u values and ranks (static).
        device_type, distance_group: int ``(N,)``.
        traj: the cell's :class:`Trajectory`.

    Returns:
        float32 ``(T,)``: regret summed over the devices, per round.
    """
    n = device_type.shape[0]
    rounds = traj.p.shape[0]
    u_g = jnp.repeat(jnp.asarray(arm_u, jnp.float32), len(arm_r))        # (G,)
    r_g = jnp.tile(jnp.asarray(arm_r, jnp.int32), len(arm_u))            # (G,)
    # p_bounds reads only the params, round and last_p of a state: a one-agent template
    # whose round / last_p are replaced by the arms' ((N, G) or (N,)).
    template = bandit.init(cfg, 1, jax.random.PRNGKey(0), params=score)

    def fixed_p(last_p, t, u):
        lo, hi = bandit.p_bounds(template.replace(
            round=jnp.full(last_p.shape, t - 1, jnp.int32), last_p=last_p))
        return jnp.clip(lo + u * (hi - lo), lo, hi)

    def mean_reward(t, mode, own, fleet_mean, dev_t, dev_g, p, dp, r):
        loss, imp, t_arm = sweep_env.mean_outcome(env, hw, dev_t, dev_g, mode, p, r, t)
        # The fleet's mean time with this device's realised time `own` replaced by the
        # arm's; Eq. 3's mean over devices is then that of [t_arm, 2 mean - t_arm] (same
        # mean, same |dT|), so bandit.reward computes it unchanged.
        mean = fleet_mean + (t_arm - own) / n
        times = jnp.stack([t_arm, 2.0 * mean - t_arm], axis=-1)
        return bandit.reward(loss[..., None], dp[..., None], imp[..., None], times,
                             score)[..., 0]

    ts = jnp.arange(1, rounds + 1, dtype=jnp.int32)
    dt_col, dg_col = device_type[:, None], distance_group[:, None]

    def totals(carry, xs):
        last_p, total = carry
        t, mode, time = xs
        p = fixed_p(last_p, t, u_g[None, :])
        rew = mean_reward(t, mode[:, None], time[:, None], jnp.mean(time), dt_col, dg_col,
                          p, p - last_p, r_g[None, :])
        return (p, total + rew), None

    zeros = jnp.zeros((n, u_g.shape[0]), jnp.float32)
    (_, total), _ = jax.lax.scan(totals, (zeros, zeros), (ts, traj.mode, traj.time))
    best = jnp.argmax(total, axis=1)                                      # (N,)
    u_best, r_best = u_g[best], r_g[best]

    def gaps(last_p, xs):
        t, mode, time, p_pol, last_pol, r_pol = xs
        p = fixed_p(last_p, t, u_best)
        mean = jnp.mean(time)
        r_star = mean_reward(t, mode, time, mean, device_type, distance_group, p, p - last_p,
                             r_best)
        r_played = mean_reward(t, mode, time, mean, device_type, distance_group, p_pol,
                               p_pol - last_pol, r_pol)
        return p, jnp.sum(r_star - r_played)

    _, regret = jax.lax.scan(gaps, jnp.zeros((n,), jnp.float32),
                             (ts, traj.mode, traj.time, traj.p, traj.last_p, traj.r))
    return regret


def cell_metrics(cfg: Config, hw: sweep_env.Hardware, arm_u: tuple[float, ...],
                 arm_r: tuple[int, ...], rounds: int, env: sweep_env.EnvParams,
                 params: bandit.BanditParams, score: bandit.BanditParams,
                 device_type: jax.Array, distance_group: jax.Array, key: jax.Array
                 ) -> dict[str, jax.Array]:
    """A cell's per-round figures: :func:`rollout` then :func:`hindsight_regret`.

    ``cfg`` is the base config (capacity); ``params`` / ``score`` the configuration's
    bandit params and their score variant (scalar leaves).

    Returns:
        ``reward``, ``regret``, ``waiting``: float32 ``(T,)`` (the first two summed over
        devices); ``p_type``, ``r_type``: float32 ``(T, 3)``, mean p and r per device type
        (``heterogeneity.TX2, NX, AGX``; NaN for a type the fleet lacks).
    """
    traj = rollout(cfg, params, score, env, hw, device_type, distance_group, key, rounds)
    regret = hindsight_regret(cfg, score, env, hw, arm_u, arm_r, device_type, distance_group,
                              traj)
    mask = device_type[None, :, None] == jnp.arange(len(het.TYPE_NAMES))[None, None, :]
    count = jnp.sum(mask, axis=1).astype(jnp.float32)                   # (1, K)

    def by_type(x):  # (T, N) -> (T, K): reductions only, no dot (same result batched)
        return jnp.sum(jnp.where(mask, x[:, :, None].astype(jnp.float32), 0.0), axis=1) / count

    return {"reward": traj.reward, "regret": regret, "waiting": traj.waiting,
            "p_type": by_type(traj.p), "r_type": by_type(traj.r)}


# ---------------------------------------------------------------------- the sweep


def device_mesh() -> Mesh:
    """A 1-D mesh (axis ``cells``) of every local device."""
    return Mesh(np.array(jax.devices()), (_CELLS,))


def group_program(cfg: Config, hw: sweep_env.Hardware, arm_u: tuple[float, ...],
                  arm_r: tuple[int, ...], rounds: int, mesh: Mesh):
    """The jitted program of a sweep: :func:`cell_metrics` vmapped over cells.

    Called as ``program(env, params, score, device_type (B, N), distance_group (B, N),
    keys (B, 2))`` with ``params`` / ``score`` :class:`~fedspine_jax.bandit.BanditParams`
    of leading axis ``B`` (one configuration per cell) and ``B`` a multiple of
    ``mesh.size``; the cell axis is sharded over ``mesh``. Compiles once per
    ``(B, N, K)`` (``K`` the padded rank-set length), whatever the params' values.
    """
    cell = functools.partial(cell_metrics, cfg, hw, arm_u, arm_r, rounds)
    shard, rep = NamedSharding(mesh, P(_CELLS)), NamedSharding(mesh, P())
    return jax.jit(jax.vmap(cell, in_axes=(None, 0, 0, 0, 0, 0)),
                   in_shardings=(rep, shard, shard, shard, shard, shard), out_shardings=shard)


def _cell_key(seed: int, s: int, f: int) -> np.ndarray:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), s), f)
    return np.asarray(key, np.uint32)


def _shard_cells(mesh: Mesh, size: int, tree):
    """Pad the cell axis of every leaf of ``tree`` (host arrays) to ``size`` cells with
    copies of the last cell and shard it over ``mesh``."""
    shard = NamedSharding(mesh, P(_CELLS))

    def put(x):
        pad = size - x.shape[0]
        return jax.device_put(np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]), shard)

    return jax.tree.map(put, tree)


def _stack(trees: list):
    """Stack a list of pytrees of host arrays along a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _nan_to_none(x: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(x, np.float64).ravel()]


def _summarise(point: Point, cells: list[dict], fleets: list[FleetSpec]) -> dict:
    """Mean (and std) figures of a configuration over its cells, per agent."""
    cum = np.array([c["reward"].sum() / c["n"] for c in cells])
    reg = np.array([c["regret"].sum() / c["n"] for c in cells])
    wait = np.array([c["waiting"].mean() for c in cells])
    per_fleet = {}
    for f in fleets:
        mine = [i for i, c in enumerate(cells) if c["fleet"] == f.name]
        per_fleet[f.name] = {"cumulative_reward": float(cum[mine].mean()),
                             "regret": float(reg[mine].mean()),
                             "waiting_time_s": float(wait[mine].mean())}
    curve = np.mean([np.cumsum(c["regret"]) / c["n"] for c in cells], axis=0)
    with np.errstate(invalid="ignore"):  # a type no fleet has stays NaN -> null
        p_type = np.nanmean(np.stack([c["p_type"] for c in cells]), axis=0)
        r_type = np.nanmean(np.stack([c["r_type"] for c in cells]), axis=0)
    return {
        "label": point.label, **point.as_dict(),
        "cumulative_reward": float(cum.mean()), "cumulative_reward_std": float(cum.std()),
        "regret": float(reg.mean()), "regret_std": float(reg.std()),
        "waiting_time_s": float(wait.mean()), "cells": len(cells), "per_fleet": per_fleet,
        "curves": {"cumulative_regret": _nan_to_none(curve),
                   "p_by_type": {n: _nan_to_none(p_type[:, k])
                                 for k, n in enumerate(het.TYPE_NAMES)},
                   "r_by_type": {n: _nan_to_none(r_type[:, k])
                                 for k, n in enumerate(het.TYPE_NAMES)}},
    }


def run_sweep(cfg: Config, spec: SweepConfig, env: sweep_env.EnvParams, out: str | Path,
              env_name: str = "builtin", progress: bool = True,
              chunk_agents: int = CHUNK_AGENTS) -> dict:
    """Run every configuration of ``spec`` on its seeds x fleets; write ``out``.

    Args:
        cfg: the base config (rounds, fleet size, pruning schedule, device knobs, seed).
        spec: the search space and cells.
        env: the synthetic environment's surfaces.
        out: output directory (created; files are overwritten).
        env_name: how the results name the environment (a file name, not a path).
        progress: show a tqdm bar over the chunks of cells.
        chunk_agents: most agents (cells x devices) per chunk of the program (an
            accelerator wants more than a CPU: its memory, not its cores, bounds it).

    Returns:
        The ``results.json`` content plus a ``timing`` entry (not written to the file, so
        the file depends only on the inputs).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mesh = device_mesh()
    hw = sweep_env.Hardware.from_config(cfg)
    rounds, seed = cfg.federation.rounds, cfg.federation.seed
    arm_u = tuple(float(u) for u in np.linspace(0.0, 1.0, spec.u_grid)) if spec.u_grid > 1 \
        else (1.0,)
    arm_r = all_ranks(spec)
    fleets = [(f, build_fleet(f, cfg)) for f in spec.fleets]
    sizes = sorted({fl.num_devices for _, fl in fleets})
    configs = points(spec, seed)
    k = max(len(pt.rank_choices) for pt in configs)
    # Configurations as data: one row of params per configuration (host arrays).
    params = _stack([pt.params(cfg, k) for pt in configs])
    scores = _stack([pt.params(cfg, k, reward=spec.score) for pt in configs])
    keys = {(s, fi): _cell_key(seed, s, fi) for s in range(spec.seeds)
            for fi in range(len(fleets))}
    env_d = jax.device_put(env, NamedSharding(mesh, P()))
    t0 = time.perf_counter()
    # One program per fleet size, run over chunks of cells of one shape.
    plan = []
    for n in sizes:
        mine = [fi for fi, (_, fl) in enumerate(fleets) if fl.num_devices == n]
        cell_ids = [(c, s, fi) for c in range(len(configs)) for s in range(spec.seeds)
                    for fi in mine]
        chunk = min(len(cell_ids), max(1, chunk_agents // n))
        chunk += (-chunk) % mesh.size
        plan.append((n, cell_ids, chunk))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(-(-len(ids) // ch) for _, ids, ch in plan), desc="sweep",
                   unit="chunk")
    cells: dict[Point, list] = {pt: [] for pt in configs}
    for n, cell_ids, chunk in plan:
        program = group_program(cfg, hw, arm_u, arm_r, rounds, mesh)
        pending = []
        for lo in range(0, len(cell_ids), chunk):
            ids = cell_ids[lo:lo + chunk]
            c_idx = np.array([c for c, _, _ in ids])
            args = _shard_cells(mesh, chunk, (
                jax.tree.map(lambda x: x[c_idx], params),
                jax.tree.map(lambda x: x[c_idx], scores),
                np.stack([fleets[fi][1].device_type for _, _, fi in ids]).astype(np.int32),
                np.stack([fleets[fi][1].distance_group for _, _, fi in ids]).astype(np.int32),
                np.stack([keys[s, fi] for _, s, fi in ids])))
            pending.append((ids, program(env_d, *args)))  # dispatched asynchronously
        for ids, res in pending:
            res = {name: np.asarray(v)[:len(ids)] for name, v in res.items()}  # drop padding
            for i, (c, s, fi) in enumerate(ids):
                cells[configs[c]].append({"fleet": fleets[fi][0].name, "seed": s, "n": n,
                                         **{name: v[i] for name, v in res.items()}})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    results = [_summarise(pt, cells[pt], spec.fleets) for pt in configs]
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: (-r["cumulative_reward"], r["regret"]))
    for i, r in enumerate(results):
        r["rank"] = i + 1
    doc = {
        "format": FORMAT, "env": env_name, "rounds": rounds, "seeds": spec.seeds,
        "score_reward": spec.score, "search": spec.search,
        "target_ratio": cfg.pruning.target_ratio, "target_round": cfg.pruning.target_round,
        "arm_space": cfg.bandit.arm_space,
        "regret_arms": {"u": list(arm_u), "ranks": list(arm_r)},
        "fleets": [{"name": f.name, "devices": fl.num_devices,
                    "types": {n: int(np.sum(fl.device_type == k))
                              for k, n in enumerate(het.TYPE_NAMES)}} for f, fl in fleets],
        "results": [{"rank": r.pop("rank"), **r} for r in results],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(markdown_table(doc))
    plot(doc, out)
    agent_rounds = len(configs) * spec.seeds * sum(fl.num_devices for _, fl in fleets) * rounds
    return {**doc, "timing": {"wall_s": wall, "agent_rounds": agent_rounds,
                              "programs": len(plan), "devices": mesh.size,
                              "platform": jax.devices()[0].platform}}


def markdown_table(doc: dict) -> str:
    """The ranked configurations as a Markdown table (per agent, mean +- std over cells)."""
    lines = [f"# S-UCB sweep: {len(doc['results'])} configurations, {doc['rounds']} rounds, "
             f"{doc['seeds']} seeds, fleets {', '.join(f['name'] for f in doc['fleets'])}",
             "",
             f"Score reward: `{doc['score_reward']}`; environment: `{doc['env']}`. "
             "Figures per agent, mean over seeds and fleets (+- std).",
             "",
             "| rank | discount | delta | exploration | ranks | reward | cumulative reward "
             "| regret | waiting time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        lines.append(
            f"| {r['rank']} | {r['discount']:g} | {r['delta']:g} | {r['exploration']:g} | "
            f"{','.join(map(str, r['rank_choices']))} | {r['reward']} | "
            f"{r['cumulative_reward']:.4g} +- {r['cumulative_reward_std']:.2g} | "
            f"{r['regret']:.4g} +- {r['regret_std']:.2g} | {r['waiting_time_s']:.4g} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, out: Path, top: int = 5) -> None:
    """``regret.png`` (top configurations) and ``choices.png`` (best configuration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    rounds = np.arange(1, doc["rounds"] + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in res[:top]:
        ax.plot(rounds, np.array(r["curves"]["cumulative_regret"], float),
                label=f"#{r['rank']} {r['label']}")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative regret per agent")
    ax.set_title(f"S-UCB regret vs the best fixed arm ({doc['score_reward']} reward)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "regret.png", dpi=110)
    plt.close(fig)

    best = res[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in het.TYPE_NAMES:
        p = np.array([np.nan if v is None else v for v in best["curves"]["p_by_type"][name]])
        r = np.array([np.nan if v is None else v for v in best["curves"]["r_by_type"][name]])
        if np.all(np.isnan(p)):
            continue
        axes[0].plot(rounds, p, label=name)
        axes[1].plot(rounds, r, label=name)
    axes[0].set_ylabel("pruning ratio p (mean)")
    axes[1].set_ylabel("LoRA rank r (mean)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.legend()
    fig.suptitle(f"chosen (p, r) per device type: #1 {best['label']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "choices.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- CLI


def run_cli(args) -> int:
    if args.calibrate:
        env, info = sweep_env.calibrate(args.calibrate)
        path = Path(args.out) if args.out else Path(args.calibrate) / "sweep_env.json"
        sweep_env.save_params(env, path, info)
        fits = {name: {s: {"r2": t[s]["r2"], "rmse": t[s]["rmse"]}
                       for s in sweep_env.SURFACES} | {"rows": t["rows"], "pooled": t["pooled"]}
                for name, t in info["types"].items()}
        json.dump({"env": str(path), "rows": info["rows"], "fits": fits}, sys.stdout, indent=2)
        print()
        return 0
    if not args.out:
        print("fedspine sweep: --out DIR is required (or --calibrate RUN_DIR)", file=sys.stderr)
        return 2
    cfg, spec = load_sweep(args.config, args.overrides)
    env_path = args.env or spec.env
    env = sweep_env.load_params(env_path) if env_path else sweep_env.default_params()
    doc = run_sweep(cfg, spec, env, args.out, env_name=Path(env_path).name if env_path
                    else "builtin", progress=not args.no_progress)
    top = [{k: r[k] for k in ("rank", "label", "cumulative_reward", "regret", "waiting_time_s")}
           for r in doc["results"][:5]]
    json.dump({"out": str(args.out), "configurations": len(doc["results"]), "top": top,
               "timing": doc["timing"]}, sys.stdout, indent=2)
    print()
    return 0
