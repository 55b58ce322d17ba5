"""The federated round as a transport-agnostic state machine (paper section 3, Fig. 3).

Design note
-----------
Both the in-process simulator and the gRPC server drive exactly this code:

``plan(state) -> (state, tasks)``
    decides every device's pruning ratio p_i and LoRA rank r_i (FedSpine: S-UCB, Eq. 3-6;
    other methods: their :class:`~fedspine_jax.strategies.Strategy`), and builds its task:
    the global LoRA shrunk to r_i (section 4.3's Lambda: the best rank-r_i approximation of
    the effective update) and the task head. Planning is idempotent within a round, so a
    restarted server or a device that asks twice gets the same task.
``accept(state, update) -> state``
    validates one device's update (device id, round id, no duplicate, LoRA keys, shapes at
    the planned rank, float32 dtype, finite values, sane statistics) and records it; a bad
    update raises :class:`UpdateRejected` naming the problem, and the state is unchanged.
``close(state) -> (state, report)``
    needs a quorum of the planned devices (``federation.quorum``; the transport decides
    when a deadline forces a close with fewer). It aggregates what arrived (Eq. 15-16 or the
    strategy's aggregator), computes the rewards of Eq. 3 from the reported loss drops,
    pruning steps, LoRA importances and completion times, updates the bandit agents of the
    devices that reported (the others keep their statistics) and advances the round.

States are immutable (frozen dataclasses of numpy arrays); every transition returns a new
one. The global LoRA is held at rank R with the layers' scaling ``alpha / R``; updates
arrive at rank r_i with scaling ``alpha / r_i``, which is folded into ``b`` before
aggregation and unfolded after, so devices of different ranks add up correctly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedspine_jax import aggregation, bandit
from fedspine_jax.config import Config
from fedspine_jax.models.lora import lora_scale
from fedspine_jax.strategies import Strategy, get


class UpdateRejected(ValueError):
    """A device update failed validation; the message names the problem."""


class QuorumNotMet(RuntimeError):
    """``close`` was asked for before enough devices reported."""


@dataclasses.dataclass(frozen=True)
class DeviceTask:
    """What a device receives for a round."""
    device_id: int
    round: int
    ratio: float          # pruning ratio p_i to reach this round
    rank: int             # LoRA rank r_i
    lora: dict            # {path: array} global LoRA shrunk to r_i
    head: dict            # {path: array} task head


@dataclasses.dataclass(frozen=True)
class DeviceUpdate:
    """What a device sends back after its local round."""
    device_id: int
    round: int
    lora: dict                 # {path: array} trained factors at rank r_i (float32)
    head: dict                 # {path: array} trained task head
    head_masks: np.ndarray     # (L, H) masks after this round
    channel_masks: np.ndarray  # (L, F)
    num_samples: int           # local training examples
    loss_before: float
    loss_after: float
    lora_importance: float     # I(B_total), Eq. 14
    ratio: float               # achieved pruning ratio
    compute_time_s: float      # T_comp
    comm_time_s: float         # T_comm
    flops: float = 0.0
    peak_memory_bytes: int = 0
    params_alive: int = 0

    @property
    def completion_time_s(self) -> float:
        """T_i = T_comp + T_comm (section 4.1.1)."""
        return self.compute_time_s + self.comm_time_s

    @property
    def loss_drop(self) -> float:
        return self.loss_before - self.loss_after


@dataclasses.dataclass(frozen=True)
class FederationState:
    round: int                       # the round being planned / collected (1-based)
    lora: dict                       # global LoRA {path: array}, rank R
    head: dict                       # global task head
    bandit: bandit.BanditState | None
    last_p: np.ndarray               # (N,) each device's pruning ratio after its last round
    plan_p: np.ndarray | None = None   # (N,) this round's ratios, once planned
    plan_r: np.ndarray | None = None   # (N,) this round's ranks
    updates: tuple = ()              # accepted DeviceUpdates of this round, in arrival order


@dataclasses.dataclass(frozen=True)
class RoundReport:
    """What happened in a closed round (for logs and the bandit's analysis)."""
    round: int
    device_ids: np.ndarray     # (n,) devices that reported
    p: np.ndarray              # (N,) planned ratios
    r: np.ndarray              # (N,) planned ranks
    rewards: np.ndarray        # (n,) Eq. 3 rewards of the reporting devices (0 without bandit)
    times: np.ndarray          # (n,) completion times T_i
    waiting_time: float        # Eq. 1 over the reporting devices


def _pairs(lora: dict) -> list[str]:
    """Prefixes of the LoRA pairs, e.g. ``layers/0/attn/q``."""
    return sorted(k[: -len("/lora_a")] for k in lora if k.endswith("/lora_a"))


class Federation:
    """The round logic for one run: static settings plus pure state transitions.

    Args:
      cfg: the run's config.
      num_devices: N.
      tiers: (N,) device capability tiers, 0 = strongest (HETLoRA's rank policy); default 0.
      mask_shapes: ((L, H), (L, F)) the devices' head / channel masks must have.
    """

    def __init__(self, cfg: Config, num_devices: int, tiers: np.ndarray | None = None,
                 mask_shapes: tuple | None = None):
        self.cfg = cfg
        self.num_devices = int(num_devices)
        self.strategy: Strategy = get(cfg.federation.strategy)
        self.tiers = np.zeros(num_devices, int) if tiers is None else np.asarray(tiers, int)
        # expected ((L, H), (L, F)) of the devices' masks; None checks only the layer count
        self.mask_shapes = mask_shapes or (None, None)
        if len(self.tiers) != num_devices:
            raise ValueError(f"tiers has {len(self.tiers)} entries for {num_devices} devices")

    # -- set-up ---------------------------------------------------------------------------

    def bandit_config(self) -> Config:
        """The bandit sees target 0 when the strategy does not prune (the ablation w/o A_P)."""
        from fedspine_jax.config import replace

        if self.strategy.prunes:
            return self.cfg
        return replace(self.cfg, pruning={"target_ratio": 0.0})

    def init(self, lora: dict, head: dict) -> FederationState:
        """The state before round 1 from the initial global LoRA (rank R) and head."""
        rank = {v.shape[1] for k, v in lora.items() if k.endswith("lora_a")}
        if rank != {self.cfg.lora.rank}:
            raise ValueError(f"initial LoRA has rank {sorted(rank)}, config says "
                             f"{self.cfg.lora.rank}")
        b_state = None
        if self.strategy.uses_bandit:
            key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.federation.seed), 0xB)
            b_state = bandit.init(self.bandit_config(), self.num_devices, key)
        return FederationState(
            round=1, lora={k: np.asarray(v, np.float32) for k, v in lora.items()},
            head={k: np.asarray(v, np.float32) for k, v in head.items()}, bandit=b_state,
            last_p=np.zeros(self.num_devices, np.float32))

    # -- plan -----------------------------------------------------------------------------

    def plan(self, state: FederationState) -> tuple[FederationState, list[DeviceTask]]:
        """Decide (p_i, r_i) for every device and build the tasks (idempotent per round)."""
        if state.plan_p is None:
            bp = br = None
            b_state = state.bandit
            if self.strategy.uses_bandit:
                key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.federation.seed),
                                         state.round)
                b_state, bp, br = bandit.select(state.bandit, key)
                bp, br = np.asarray(bp), np.asarray(br)
            p, r = self.strategy.configure(self.cfg, state.round, bp, br, self.tiers)
            p = np.maximum(p, state.last_p).astype(np.float32)  # pruning never goes back
            state = dataclasses.replace(state, bandit=b_state, plan_p=p, plan_r=r)
        shrunk = {int(r): self.shrink(state.lora, int(r)) for r in np.unique(state.plan_r)}
        tasks = [DeviceTask(i, state.round, float(state.plan_p[i]), int(state.plan_r[i]),
                            shrunk[int(state.plan_r[i])], dict(state.head))
                 for i in range(self.num_devices)]
        return state, tasks

    def shrink(self, lora: dict, rank: int) -> dict:
        """The global LoRA at rank ``rank`` (section 4.3's Lambda, scaling-aware).

        The effective update ``(alpha / R) a @ b`` of every pair is truncated to its best
        rank-``rank`` approximation (:func:`aggregation.shrink_lora`: orthonormal ``a``, the
        magnitude in ``b``, so every direction stays trainable on the device) and expressed
        at the device's scaling ``alpha / rank``.
        """
        if rank == self.cfg.lora.rank:
            return dict(lora)
        s_glob = lora_scale(self.cfg.lora.alpha, self.cfg.lora.rank)
        s_dev = lora_scale(self.cfg.lora.alpha, rank)
        out = {}
        for p in _pairs(lora):
            a, b = aggregation.shrink_lora(jnp.asarray(lora[p + "/lora_a"]),
                                           jnp.asarray(lora[p + "/lora_b"]) * s_glob, rank)
            out[p + "/lora_a"] = np.asarray(a, np.float32)
            out[p + "/lora_b"] = np.asarray(b, np.float32) / (s_dev if s_dev > 0 else 1.0)
        return out

    # -- accept ---------------------------------------------------------------------------

    def accept(self, state: FederationState, u: DeviceUpdate) -> FederationState:
        """Validate and record one update; raises :class:`UpdateRejected` (state unchanged)."""
        if state.plan_p is None:
            raise UpdateRejected(f"round {state.round} has not been planned yet")
        if not isinstance(u.device_id, (int, np.integer)) or not 0 <= u.device_id < \
                self.num_devices:
            raise UpdateRejected(f"unknown device id {u.device_id!r} "
                                 f"(this run has devices 0..{self.num_devices - 1})")
        if u.round != state.round:
            raise UpdateRejected(f"update for round {u.round} from device {u.device_id}, but "
                                 f"the server is collecting round {state.round} (stale or early)")
        if any(x.device_id == u.device_id for x in state.updates):
            raise UpdateRejected(f"device {u.device_id} already sent its update for round "
                                 f"{state.round}")
        rank = int(state.plan_r[u.device_id])
        _check_tensors("lora", u.lora, {
            k: (v.shape[0], rank) if k.endswith("lora_a") else (rank, v.shape[1])
            for k, v in state.lora.items()})
        _check_tensors("head", u.head, {k: v.shape for k, v in state.head.items()})
        for name in ("loss_before", "loss_after", "lora_importance", "ratio",
                     "compute_time_s", "comm_time_s"):
            val = getattr(u, name)
            if not isinstance(val, (int, float, np.floating)) or not math.isfinite(val):
                raise UpdateRejected(f"statistic {name}={val!r} is not a finite number")
        if u.compute_time_s < 0 or u.comm_time_s < 0:
            raise UpdateRejected("negative compute or communication time")
        if not 0.0 <= u.ratio <= 1.0:
            raise UpdateRejected(f"pruning ratio {u.ratio} outside [0, 1]")
        if isinstance(u.num_samples, bool) or not isinstance(u.num_samples, (int, np.integer)) \
                or u.num_samples < 1:
            raise UpdateRejected(f"num_samples={u.num_samples!r}: must be an integer >= 1")
        if u.ratio < float(state.last_p[u.device_id]) - 1e-6:
            raise UpdateRejected(f"pruning ratio {u.ratio} is below the {state.last_p[u.device_id]} "
                                 f"device {u.device_id} already reached (pruning never goes back)")
        self._check_masks(state, u)
        return dataclasses.replace(state, updates=state.updates + (u,))

    def _check_masks(self, state: FederationState, u: DeviceUpdate) -> None:
        layers = 1 + max(int(k.split("/")[1]) for k in state.lora if k.startswith("layers/"))
        for name, m, want in (("head_masks", u.head_masks, self.mask_shapes[0]),
                              ("channel_masks", u.channel_masks, self.mask_shapes[1])):
            m = np.asarray(m)
            if m.ndim != 2 or m.shape[0] != layers:
                raise UpdateRejected(f"{name} has shape {m.shape}, expected ({layers}, ...)")
            if want is not None and tuple(m.shape) != tuple(want):
                raise UpdateRejected(f"{name} has shape {m.shape}, expected {tuple(want)}")
            if not np.all((m == 0) | (m == 1)):
                raise UpdateRejected(f"{name} must hold only 0 and 1 (no NaN)")

    # -- close ----------------------------------------------------------------------------

    def quorum(self) -> int:
        return max(1, math.ceil(self.cfg.federation.quorum * self.num_devices))

    def close(self, state: FederationState, force: bool = False
              ) -> tuple[FederationState, RoundReport]:
        """Aggregate, reward, update the bandit and advance (see the module note).

        Args:
          force: close even below the quorum (a deadline passed); with no update at all
            the global LoRA stays as it was.
        """
        if state.plan_p is None:
            raise QuorumNotMet(f"round {state.round} was never planned")
        ups = sorted(state.updates, key=lambda x: x.device_id)
        if len(ups) < self.quorum() and not force:
            raise QuorumNotMet(f"round {state.round}: {len(ups)} of {self.num_devices} devices "
                               f"reported, quorum is {self.quorum()}")
        ids = np.array([u.device_id for u in ups], int)
        times = np.array([u.completion_time_s for u in ups], np.float64)
        rewards = np.zeros(len(ups), np.float32)
        lora, head, b_state, last_p = state.lora, state.head, state.bandit, state.last_p.copy()
        if ups:
            lora = self._aggregate_lora(state, ups)
            w = np.array([u.num_samples for u in ups], np.float64)
            head = {k: np.asarray(sum(wi * u.head[k] for wi, u in zip(w / w.sum(), ups)),
                                  np.float32) for k in state.head}
            if b_state is not None:
                rewards = np.asarray(bandit.reward(
                    np.array([u.loss_drop for u in ups]),
                    np.array([u.ratio for u in ups]) - last_p[ids],
                    np.array([u.lora_importance for u in ups]), times, self.bandit_config()))
                full = np.zeros(self.num_devices, np.float32)
                full[ids] = rewards
                updated = bandit.update(b_state, jnp.asarray(full))
                arrived = np.zeros(self.num_devices, bool)
                arrived[ids] = True
                b_state = _select_agents(arrived, updated, b_state)
            last_p[ids] = [u.ratio for u in ups]
        waiting = float(np.mean(times.max() - times)) if len(times) else 0.0
        report = RoundReport(state.round, ids, state.plan_p, state.plan_r, rewards, times,
                             waiting)
        new = FederationState(round=state.round + 1, lora=lora, head=head, bandit=b_state,
                              last_p=last_p.astype(np.float32))
        return new, report

    def _aggregate_lora(self, state: FederationState, ups: list[DeviceUpdate]) -> dict:
        alpha, big_r = self.cfg.lora.alpha, self.cfg.lora.rank
        imp = np.array([u.lora_importance for u in ups], np.float32)
        n = np.array([u.num_samples for u in ups], np.float32)
        out = {}
        for p in _pairs(state.lora):
            a_list = [jnp.asarray(u.lora[p + "/lora_a"]) for u in ups]
            b_list = [jnp.asarray(u.lora[p + "/lora_b"]) * lora_scale(alpha, u.lora[
                p + "/lora_a"].shape[1]) for u in ups]
            cols = rows = None
            if self.cfg.aggregation.mask_aware:
                masks = [_kept(p, state.lora, u.head_masks, u.channel_masks) for u in ups]
                if masks[0][0] is not None:
                    cols = jnp.asarray(np.stack([m[0] for m in masks]))
                if masks[0][1] is not None:
                    rows = jnp.asarray(np.stack([m[1] for m in masks]))
            a, b = self.strategy.aggregate(self.cfg, a_list, b_list, imp, n, cols, rows)
            out[p + "/lora_a"] = np.asarray(a, np.float32)
            out[p + "/lora_b"] = np.asarray(b, np.float32) / lora_scale(alpha, big_r)
        return out


def _kept(pair: str, lora: dict, head_masks: np.ndarray, channel_masks: np.ndarray):
    """(column mask (k,) or None, row mask (d,) or None) of the frozen weights a device
    still keeps in LoRA pair ``pair`` (e.g. ``layers/3/attn/q``), from its group masks:
    q columns / o rows by query head, k / v columns by kv head (kept while any of its
    query heads is), fc1 / gate / up columns and fc2 / down rows by channel."""
    parts = pair.split("/")
    layer, name = int(parts[1]), parts[-1]
    hm, cm = np.asarray(head_masks[layer]), np.asarray(channel_masks[layer])
    d_in, d_out = lora[pair + "/lora_a"].shape[0], lora[pair + "/lora_b"].shape[1]
    if name in ("q", "o"):
        dh = (d_out if name == "q" else d_in) // len(hm)
        m = np.repeat(hm, dh)
        return (m, None) if name == "q" else (None, m)
    if name in ("k", "v"):
        q_cols = lora[f"layers/{layer}/attn/q/lora_b"].shape[1]
        dh = q_cols // len(hm)
        n_kv = d_out // dh
        kv = hm.reshape(n_kv, -1).max(axis=1)  # query heads are grouped contiguously
        return np.repeat(kv, dh), None
    if name in ("fc1", "gate", "up"):
        return cm, None
    return None, cm  # fc2 / down


def _select_agents(mask: np.ndarray, new: bandit.BanditState, old: bandit.BanditState):
    """Per agent: the updated bandit state where ``mask``, else the old one."""
    def pick(x, y):
        m = jnp.asarray(mask).reshape((-1,) + (1,) * (jnp.ndim(x) - 1))
        return jnp.where(m, x, y)
    return jax.tree.map(pick, new, old)


def _check_tensors(what: str, got: dict, want: dict) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise UpdateRejected(f"{what} keys differ: missing {missing[:3]}, unexpected "
                             f"{extra[:3]}")
    for k, shape in want.items():
        v = got[k]
        if not isinstance(v, np.ndarray) and not isinstance(v, jax.Array):
            raise UpdateRejected(f"{what} tensor {k} is not an array")
        if v.dtype != np.float32:
            raise UpdateRejected(f"{what} tensor {k} has dtype {v.dtype}, expected float32")
        if tuple(v.shape) != tuple(shape):
            raise UpdateRejected(f"{what} tensor {k} has shape {tuple(v.shape)}, expected "
                                 f"{tuple(shape)} (the planned rank)")
        if not np.all(np.isfinite(np.asarray(v))):
            raise UpdateRejected(f"{what} tensor {k} has NaN or infinite values")
