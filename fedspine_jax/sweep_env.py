"""A synthetic federation for S-UCB sweeps: smooth response surfaces per device type.

Design note
-----------
A sweep runs thousands of fleets for hundreds of rounds, so a round of a whole fleet must
be a few array operations, not a local training run. This module replaces the local round
by four *response surfaces* per device type (``tx2``, ``nx``, ``agx``), each a function of
the device's pruning ratio ``p``, LoRA rank ``r`` and the round ``t`` (1-based):

    y_s(p, r, t) = t^(-gamma_s) * (theta_s . phi(p, r) + sigma_s * z),    z ~ N(0, 1)
    phi(p, r)    = (1, p, p^2, log2 r, r, p log2 r)

for the surfaces ``s`` in :data:`SURFACES`: the loss drop dF, the LoRA importance
I(B^total) of Eq. 14, the FLOPs of the local round and the bytes it moves (LoRA download
plus upload). The factor ``t^(-gamma)`` lets a quantity fade (loss drops shrink as
training converges, gamma > 0) or grow (the trained ``b`` factor's importance, gamma < 0);
the noise is scaled with it. ``log2 r`` and ``r`` together give a saturating or a linear
dependence on the rank (bytes are linear in ``r``; accuracy gains saturate). Decision: one
small linear-in-theta model for all four surfaces, so that a calibration is a least-squares
fit (plus a one-dimensional search for gamma) and a handful of simulated rounds suffice.

*Hardware.* Times are not fitted as times: the environment turns FLOPs and bytes into
seconds with the device model of :mod:`fedspine_jax.heterogeneity`: its tables and its
array functions (``throughput_from_mode``, ``bandwidth_from_noise``, ``times_from_trace``,
called with ``jax.numpy``), so ``T_comp = compute_scale * flops / (PEAK_FLOPS[type] *
MODE_MULTIPLIERS[type][mode] * efficiency)`` and ``T_comm = bytes / bandwidth`` are the
simulator's clock for the same trace, with the power mode drawn uniformly among the type's modes
and re-drawn every ``devices.mode_redraw_every`` rounds, and the bandwidth the distance
group's mean times a mean-one log-normal factor (relative std ``devices.bandwidth_noise``),
clipped to the observed range. So the surfaces are hardware-free (FLOPs and bytes of a
round depend on the model and the arm, not on the device) while completion times depend on
type, mode and distance exactly as in the simulator; a surface per type is still fitted,
so data heterogeneity between types is captured where a run shows it. Memory failures are
not modelled (the sweep studies the scheduler, not the memory policy).

*Calibration.* :func:`calibrate` reads a simulation run directory (``metrics.jsonl`` and
``config.yaml``), rebuilds the run's fleet and its bandwidth trace with ``heterogeneity``,
recovers every device-round's bytes as ``comm_time * bandwidth``, and fits each surface per
device type by maximum likelihood: for a fixed gamma the model is linear, so theta is a
least-squares solution and sigma its residual scale; gamma maximises the profile
likelihood (a grid, then a golden-section refinement). The fitted parameters are saved as
JSON (:func:`save_params`) and reused by ``fedspine sweep --env``.

*Means.* Regret needs the mean outcome of an arm (Eq. 7's expectation). Decision: the
plug-in mean: the surfaces without noise and the bandwidth at its group mean (no log-normal
factor), the device's realised power mode kept (it is exogenous state, known in hindsight).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedspine_jax import heterogeneity as het
from fedspine_jax.config import Config, load_config

# The four response surfaces, in the order of EnvParams' surface axis.
SURFACES = ("loss_drop", "lora_importance", "flops", "comm_bytes")
LOSS, IMPORTANCE, FLOPS, BYTES = range(len(SURFACES))
# Names of the features phi(p, r), in the order of theta's last axis.
FEATURES = ("1", "p", "p^2", "log2_r", "r", "p*log2_r")
FORMAT = "fedspine-sweep-env/1"


# Search range of gamma in a calibration: t^(-3) .. t^(+3) covers any plausible decay or
# growth over a run; a fit at the edge is reported in the fit info.
_GAMMA_RANGE = (-3.0, 3.0)


@struct.dataclass
class EnvParams:
    """The response surfaces of every device type (see the module note).

    Attributes:
        theta: float32 ``(K, S, F)``: coefficients of ``phi(p, r)`` per type ``K = 3``
            (``heterogeneity.TX2, NX, AGX``), surface ``S = 4`` (:data:`SURFACES`) and
            feature ``F = 6`` (:data:`FEATURES`).
        gamma: float32 ``(K, S)``: round exponent, the mean scales as ``t^(-gamma)``.
        sigma: float32 ``(K, S)``: noise std at round 1 (scaled by ``t^(-gamma)`` too).
    """

    theta: jax.Array
    gamma: jax.Array
    sigma: jax.Array


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The device model's knobs of a sweep (``cfg.devices``); the constants are
    :mod:`~fedspine_jax.heterogeneity`'s.

    Attributes:
        efficiency: fraction of ``peak * mode multiplier`` a local round achieves.
        bandwidth_noise: relative std of the per-round bandwidth factor.
        mode_redraw_every: power modes are re-drawn every this many rounds.
        compute_scale: factor on every compute time (``devices.clock``:
            ``heterogeneity.Fleet.compute_scale``, 1 for ``"flops"``).
    """

    efficiency: float
    bandwidth_noise: float
    mode_redraw_every: int
    compute_scale: float = 1.0

    @classmethod
    def from_config(cls, cfg: Config) -> Hardware:
        """The knobs of ``cfg.devices``; the compute scale is that of the fleet
        :func:`heterogeneity.build_fleet` builds (one model arch, so one scale)."""
        scale = het.build_fleet(cfg).compute_scale if cfg.devices.clock != "flops" else 1.0
        return cls(efficiency=float(cfg.devices.efficiency),
                   bandwidth_noise=float(cfg.devices.bandwidth_noise),
                   mode_redraw_every=int(cfg.devices.mode_redraw_every),
                   compute_scale=float(scale))


def default_params() -> EnvParams:
    """Built-in surfaces of a MiniLM-sized model (22 M parameters) on SST-2-like data.

    Same learning surfaces for every type (the types differ in hardware only):

    * loss drop ``0.08 - 0.02 p - 0.06 p^2 + 0.02 log2 r - 0.0015 r - 0.01 p log2 r``
      fading as ``t^-0.5`` (rank helps up to r ~ 16, pruning hurts, more so at high
      rank), noise 0.01;
    * importance ``0.1 - 0.1 p + 0.15 log2 r`` growing as ``t^0.3``, noise 0.02;
    * FLOPs ``5.4e12 (1 - 0.9 p + 0.004 r)`` (20 steps of 32 x 64 tokens, ~6 FLOPs per
      parameter and token; pruning removes up to 90% of the work), noise 1e11;
    * bytes ``2e4 + 3.3e5 r`` (a rank-1 slice of the LoRA factors of 6 layers is 166 kB
      in float32, sent down and up), no noise.
    """
    loss = (0.08, -0.02, -0.06, 0.02, -0.0015, -0.01)
    imp = (0.1, -0.1, 0.0, 0.15, 0.0, 0.0)
    flops = tuple(5.4e12 * c for c in (1.0, -0.9, 0.0, 0.0, 0.004, 0.0))
    nbytes = (2e4, 0.0, 0.0, 0.0, 3.3e5, 0.0)
    k = len(het.TYPE_NAMES)
    theta = np.broadcast_to(np.array([loss, imp, flops, nbytes]), (k, 4, 6))
    gamma = np.broadcast_to(np.array([0.5, -0.3, 0.0, 0.0]), (k, 4))
    sigma = np.broadcast_to(np.array([0.01, 0.02, 1e11, 0.0]), (k, 4))
    return EnvParams(theta=jnp.asarray(theta, jnp.float32), gamma=jnp.asarray(gamma, jnp.float32),
                     sigma=jnp.asarray(sigma, jnp.float32))


# ---------------------------------------------------------------------- the surfaces


def features(p, r):
    """``phi(p, r) = (1, p, p^2, log2 r, r, p log2 r)``.

    Args:
        p: pruning ratios, any shape (jax or numpy).
        r: LoRA ranks (>= 1), broadcastable with ``p``.

    Returns:
        ``(..., F)`` features, ``F = 6``, in the array library of ``p``.
    """
    xp = np if isinstance(p, np.ndarray) and isinstance(r, np.ndarray) else jnp
    p, r = xp.broadcast_arrays(p, xp.asarray(r, p.dtype))
    lr = xp.log2(r)
    return xp.stack([xp.ones_like(p), p, p * p, lr, r, p * lr], axis=-1)


def mean_surfaces(env: EnvParams, device_type, p, r, t) -> jax.Array:
    """Mean of the four surfaces, ``t^(-gamma) * theta . phi(p, r)``.

    Args:
        env: the surfaces.
        device_type: int type index, broadcastable with ``p``.
        p: float pruning ratios, shape ``(...)``.
        r: ranks, broadcastable with ``p``.
        t: round (1-based), scalar.

    Returns:
        float32 ``(..., S)`` in the order of :data:`SURFACES` (before any clipping).
    """
    return _linear(env, device_type, p, r) * _round_scale(env, t)[device_type]


def _linear(env: EnvParams, device_type, p, r) -> jax.Array:
    """``theta[type] . phi(p, r)``, ``(..., S)``, as a polynomial in ``p`` (Horner):
    ``(th0 + th3 log2 r + th4 r) + p ((th1 + th5 log2 r) + p th2)``, about half the
    operations of the dot product with :func:`features` (same value up to rounding)."""
    p = jnp.asarray(p, jnp.float32)[..., None]
    r = jnp.asarray(r, jnp.float32)[..., None]
    lr = jnp.log2(r)
    th = env.theta[device_type]                                         # (..., S, F)
    c0 = th[..., 0] + th[..., 3] * lr + th[..., 4] * r
    c1 = th[..., 1] + th[..., 5] * lr
    return c0 + p * (c1 + p * th[..., 2])


def _round_scale(env: EnvParams, t) -> jax.Array:
    """``t^(-gamma)`` of every type and surface, ``(K, S)`` (gathered by type after)."""
    return jnp.exp(-env.gamma * jnp.log(jnp.asarray(t, jnp.float32)))


def _physical(y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Clip surface values to their physical range: importance, FLOPs and bytes >= 0."""
    return (y[..., LOSS], jnp.maximum(y[..., IMPORTANCE], 0.0),
            jnp.maximum(y[..., FLOPS], 0.0), jnp.maximum(y[..., BYTES], 0.0))


def throughput(hw: Hardware, device_type, mode) -> jax.Array:
    """Effective training FLOP/s (:func:`heterogeneity.throughput_from_mode`)."""
    return het.throughput_from_mode(device_type, mode, hw.efficiency, xp=jnp)


def mean_bandwidth(distance_group) -> jax.Array:
    """The distance group's mean bandwidth in bytes/s (the plug-in mean, no noise)."""
    return het.bandwidth_from_noise(distance_group, 0.0, 0.0, xp=jnp) * het.BYTES_PER_MBIT


def power_modes(hw: Hardware, key: jax.Array, device_type: jax.Array, rounds: int
                ) -> jax.Array:
    """int32 ``(T, N)`` power mode of every device in rounds ``1..T``.

    Uniform among the type's modes, drawn from ``fold_in(key, e)`` for the epoch
    ``e = (t - 1) // k`` (``k = mode_redraw_every``): held for ``k`` rounds, then re-drawn,
    as in the simulator. Modes do not depend on the arms, so a rollout draws them all
    before its scan (one draw per epoch, not per round).
    """
    epochs = -(-rounds // hw.mode_redraw_every)
    u = jax.vmap(lambda e: jax.random.uniform(jax.random.fold_in(key, e), device_type.shape))(
        jnp.arange(epochs))
    n = jnp.asarray(het.NUM_MODES, jnp.int32)[device_type]
    modes = jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)     # (E, N)
    return modes[jnp.arange(rounds) // hw.mode_redraw_every]


class RoundOutcome(NamedTuple):
    """What every device of a fleet reports after a synthetic round; each field ``(N,)``."""

    loss_drop: jax.Array     # dF
    importance: jax.Array    # I(B^total), >= 0
    compute_time: jax.Array  # seconds
    comm_time: jax.Array     # seconds
    time: jax.Array          # T = T_comp + T_comm, seconds


def sample_round(env: EnvParams, hw: Hardware, device_type: jax.Array,
                 distance_group: jax.Array, mode: jax.Array, p: jax.Array, r: jax.Array, t,
                 key: jax.Array) -> RoundOutcome:
    """One noisy round of a fleet at arms ``(p, r)``.

    Args:
        env: the surfaces.
        hw: the device model's knobs.
        device_type: int ``(N,)`` type index (``heterogeneity.TX2`` / ``NX`` / ``AGX``).
        distance_group: int ``(N,)`` index into ``heterogeneity.DISTANCES_M``.
        mode: int ``(N,)`` power modes of the round (a row of :func:`power_modes`).
        p: float ``(N,)`` pruning ratios; r: int ``(N,)`` ranks.
        t: the round, 1-based (scalar, may be traced).
        key: the fleet's noise key; round ``t`` uses ``fold_in(key, t)``, so a round's
            noise does not depend on the arms chosen (common random numbers across
            configurations).

    Returns:
        :class:`RoundOutcome` of ``(N,)`` arrays.
    """
    n = device_type.shape[0]
    z = jax.random.normal(jax.random.fold_in(key, t), (n, len(SURFACES) + 1))
    scale = _round_scale(env, t)[device_type]                            # (N, S)
    y = (_linear(env, device_type, p, r) + env.sigma[device_type] * z[:, :-1]) * scale
    loss, imp, flops, nbytes = _physical(y)
    # heterogeneity's bandwidth: a mean-one log-normal factor with relative std
    # `bandwidth_noise`, clipped to the observed range.
    mbps = het.bandwidth_from_noise(distance_group, z[:, -1], hw.bandwidth_noise, xp=jnp)
    return round_times(hw, device_type, mode, mbps * het.BYTES_PER_MBIT, flops, nbytes,
                       loss, imp)


def round_times(hw: Hardware, device_type, mode, bandwidth, flops, nbytes, loss_drop=None,
                importance=None) -> RoundOutcome:
    """Completion times of a round from its trace (power modes, bandwidth in bytes/s) and
    the devices' FLOPs and bytes: :func:`heterogeneity.times_from_trace`, the simulator's
    clock (``devices.spread: narrow`` is not modelled). Arrays ``(N,)``; the loss drop and
    importance are passed through (zeros if omitted)."""
    t = het.times_from_trace(flops, nbytes, throughput(hw, device_type, mode), bandwidth,
                             hw.compute_scale)
    zeros = jnp.zeros_like(t.total)
    return RoundOutcome(loss_drop=zeros if loss_drop is None else loss_drop,
                        importance=zeros if importance is None else importance,
                        compute_time=t.comp, comm_time=t.comm, time=t.total)


def mean_outcome(env: EnvParams, hw: Hardware, device_type, distance_group, mode, p, r, t
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plug-in mean of an arm (module note, Means): ``(loss_drop, importance, time)``.

    All arguments broadcast together (e.g. devices ``(N, 1)`` against arms ``(N, G)``).

    Returns:
        Three float32 arrays of the broadcast shape.
    """
    loss, imp, flops, nbytes = _physical(mean_surfaces(env, device_type, p, r, t))
    time = het.times_from_trace(flops, nbytes, throughput(hw, device_type, mode),
                                mean_bandwidth(distance_group), hw.compute_scale).total
    return loss, imp, time


# ---------------------------------------------------------------------- JSON


def params_to_dict(env: EnvParams, info: dict | None = None) -> dict:
    """The parameters as plain JSON data: ``types -> surface -> {theta, gamma, sigma}``."""
    theta, gamma, sigma = (np.asarray(x, np.float64) for x in (env.theta, env.gamma, env.sigma))
    types = {name: {s: {"theta": theta[k, j].tolist(), "gamma": float(gamma[k, j]),
                        "sigma": float(sigma[k, j])} for j, s in enumerate(SURFACES)}
             for k, name in enumerate(het.TYPE_NAMES)}
    out = {"format": FORMAT, "features": list(FEATURES), "types": types}
    if info is not None:
        out["fit"] = info
    return out


def params_from_dict(d: dict) -> EnvParams:
    """Inverse of :func:`params_to_dict` (the ``fit`` report is ignored).

    Raises:
        ValueError: a wrong format tag, a missing type or surface, or a theta of the
            wrong length.
    """
    if d.get("format") != FORMAT:
        raise ValueError(f"environment parameters: expected format {FORMAT!r}, "
                         f"got {d.get('format')!r}")
    k, s, f = len(het.TYPE_NAMES), len(SURFACES), len(FEATURES)
    theta, gamma, sigma = np.zeros((k, s, f)), np.zeros((k, s)), np.zeros((k, s))
    for ki, name in enumerate(het.TYPE_NAMES):
        for si, surf in enumerate(SURFACES):
            try:
                entry = d["types"][name][surf]
            except KeyError:
                raise ValueError(f"environment parameters: missing types.{name}.{surf}") from None
            if len(entry["theta"]) != f:
                raise ValueError(f"environment parameters: types.{name}.{surf}.theta needs "
                                 f"{f} values ({', '.join(FEATURES)})")
            theta[ki, si] = entry["theta"]
            gamma[ki, si], sigma[ki, si] = entry["gamma"], entry["sigma"]
    if np.any(sigma < 0) or not np.all(np.isfinite(theta)):
        raise ValueError("environment parameters: sigma must be >= 0 and theta finite")
    return EnvParams(theta=jnp.asarray(theta, jnp.float32), gamma=jnp.asarray(gamma, jnp.float32),
                     sigma=jnp.asarray(sigma, jnp.float32))


def save_params(env: EnvParams, path: str | Path, info: dict | None = None) -> None:
    """Write the parameters (and an optional fit report) as JSON."""
    Path(path).write_text(json.dumps(params_to_dict(env, info), indent=2) + "\n")


def load_params(path: str | Path) -> EnvParams:
    """Read parameters written by :func:`save_params`."""
    return params_from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------- calibration


def _lstsq(phi: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(phi, y, rcond=None)[0]


def fit_surface(p, r, t, y) -> tuple[np.ndarray, float, float, dict]:
    """Maximum-likelihood fit of ``y = t^(-gamma) (theta . phi(p, r) + sigma z)``.

    With ``e = y t^gamma - theta . phi`` the log-likelihood is
    ``-n log sigma - sum e^2 / (2 sigma^2) + gamma sum log t`` (the last term is the
    Jacobian of ``y -> y t^gamma``). For fixed gamma, theta is the least-squares solution
    and ``sigma^2 = mean e^2``; gamma minimises ``n/2 log mean e^2 - gamma sum log t`` over
    :data:`_GAMMA_RANGE` (a grid of step 0.02, then golden-section refinement). With a
    single round gamma is not identifiable and is set to 0; with fewer rows than features
    the minimum-norm theta is kept and the fit is flagged. The reported sigma uses
    ``n - F`` degrees of freedom.

    Args:
        p, r, t, y: ``(n,)`` arrays: pruning ratio, rank, round (>= 1), observation.

    Returns:
        ``(theta (F,), gamma, sigma, info)`` with ``info`` = rows, rmse, r2, flags.
    """
    p, r, t, y = (np.asarray(x, np.float64) for x in (p, r, t, y))
    n, f = y.shape[0], len(FEATURES)
    phi = features(p, r)
    log_t = np.log(t)
    info = {"rows": int(n)}
    if n == 0:
        raise ValueError("fit_surface: no rows")
    if not np.any(y):
        return np.zeros(f), 0.0, 0.0, {**info, "rmse": 0.0, "r2": None, "all_zero": True}

    def solve(g):
        w = np.exp(g * log_t)
        th = _lstsq(phi, y * w)
        e = y * w - phi @ th
        return th, e

    def objective(g):
        _, e = solve(g)
        return 0.5 * n * np.log(max(np.mean(e * e), 1e-300)) - g * log_t.sum()

    identifiable = np.ptp(log_t) > 0 and n > f + 1
    if identifiable:
        grid = np.arange(_GAMMA_RANGE[0], _GAMMA_RANGE[1] + 1e-9, 0.02)
        vals = np.array([objective(g) for g in grid])
        i = int(np.argmin(vals))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(40):
            a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            if objective(a) < objective(b):
                hi = b
            else:
                lo = a
        gamma = 0.5 * (lo + hi)
        info["gamma_at_bound"] = bool(i in (0, len(grid) - 1))
    else:
        gamma = 0.0
        info["underdetermined"] = True
    theta, e = solve(gamma)
    sigma = math.sqrt(float(e @ e) / max(n - f, 1))
    resid = y - np.exp(-gamma * log_t) * (phi @ theta)
    var = float(np.var(y))
    info.update(rmse=float(np.sqrt(np.mean(resid ** 2))),
                r2=float(1 - np.mean(resid ** 2) / var) if var > 0 else None)
    return theta, float(gamma), sigma, info


def read_run(run_dir: str | Path) -> tuple[Config, dict[str, np.ndarray]]:
    """A simulation run's config and its per-device rows as columns.

    Rows of devices that failed for memory (``fits_memory`` false: charged the deadline,
    no real measurement) and the per-round summary lines are dropped. ``comm_bytes`` is
    recovered as ``comm_time * bandwidth`` with the run's own bandwidth trace
    (``heterogeneity.bandwidth_mbps`` of the fleet rebuilt from ``config.yaml``).

    Returns:
        ``(cfg, cols)``: ``cols`` maps ``round, device, type, p, r, loss_drop,
        lora_importance, flops, comm_bytes`` to ``(n,)`` arrays.
    """
    run_dir = Path(run_dir)
    metrics, cfg_path = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    for path in (metrics, cfg_path):
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} not found: not a simulation run directory")
    cfg = load_config(cfg_path)
    fleet = het.build_fleet(cfg)
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    rows = [x for x in rows if not x.get("summary") and x.get("fits_memory", True)]
    if not rows:
        raise ValueError(f"{str(metrics)!r} holds no device rows")
    bw = {}
    cols: dict[str, list] = {k: [] for k in ("round", "device", "type", "p", "r", "loss_drop",
                                              "lora_importance", "flops", "comm_bytes")}
    for x in rows:
        t, i = int(x["round"]), int(x["device"])
        if t not in bw:
            bw[t] = het.bandwidth_mbps(fleet, t - 1) * het.BYTES_PER_MBIT
        cols["round"].append(t)
        cols["device"].append(i)
        cols["type"].append(het.TYPE_NAMES.index(x["device_type"]))
        for k in ("p", "r", "loss_drop", "lora_importance", "flops"):
            cols[k].append(float(x[k]))
        cols["comm_bytes"].append(float(x["comm_time"]) * float(bw[t][i]))
    return cfg, {k: np.asarray(v) for k, v in cols.items()}


def calibrate(run_dir: str | Path) -> tuple[EnvParams, dict]:
    """Fit the surfaces of every device type to a simulation run (module note).

    A type with fewer rows than ``2 * F`` is fitted on the rows of all types pooled (and
    flagged ``pooled``); a type absent from the run gets the pooled fit as well.

    Returns:
        ``(params, info)``; ``info`` holds the source, the run's hardware knobs and per
        type and surface the fit report of :func:`fit_surface`.
    """
    cfg, cols = read_run(run_dir)
    k, s, f = len(het.TYPE_NAMES), len(SURFACES), len(FEATURES)
    theta, gamma, sigma = np.zeros((k, s, f)), np.zeros((k, s)), np.zeros((k, s))
    info: dict = {"source": Path(run_dir).name, "rows": int(cols["p"].shape[0]),
                  "hardware": dataclasses.asdict(Hardware.from_config(cfg)), "types": {}}
    everyone = np.ones_like(cols["type"], bool)
    for ki, name in enumerate(het.TYPE_NAMES):
        mine = cols["type"] == ki
        pooled = int(mine.sum()) < 2 * f
        sel = everyone if pooled else mine
        info["types"][name] = {"rows": int(mine.sum()), "pooled": pooled}
        for si, surf in enumerate(SURFACES):
            th, g, sg, rep = fit_surface(cols["p"][sel], cols["r"][sel], cols["round"][sel],
                                         cols[surf][sel])
            theta[ki, si], gamma[ki, si], sigma[ki, si] = th, g, sg
            info["types"][name][surf] = rep
    env = EnvParams(theta=jnp.asarray(theta, jnp.float32), gamma=jnp.asarray(gamma, jnp.float32),
                    sigma=jnp.asarray(sigma, jnp.float32))
    return env, info
