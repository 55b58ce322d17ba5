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
    the planned rank, float32 dtype, finite values, plausible statistics, masks that only
    gain zeros against the device's record, finite non-negative importance) and records it;
    a bad update raises :class:`UpdateRejected` naming the problem, and the state is
    unchanged. ``give_up`` records a device that sends no update this round.
``close(state) -> (state, report)``
    needs a quorum of the planned devices (``federation.quorum``; the transport decides
    when a deadline forces a close with fewer). It aggregates what arrived (Eq. 15-16 or the
    strategy's aggregator), computes the rewards of Eq. 3 from the reported loss drops,
    pruning steps, LoRA importances and completion times, updates the bandit agents of the
    devices that reported (the others keep their statistics) and advances the round. A
    bandit state with NaN or infinite statistics is never stored (:class:`NonFiniteState`).

Plausibility bounds. Every statistic an update carries feeds the bandit (Eq. 3) or the
aggregation weights (FedAvg by ``num_samples``, Eq. 16 by ``lora_importance``), so a finite
but absurd value (``compute_time_s = 1e300``, ``num_samples = 2**62``) would let one device
poison every agent or take over the global LoRA. ``accept`` checks each one against
:data:`STAT_BOUNDS` (its kind and a range, one table) before it reaches either, tightened
by what the server knows of the device: ``num_samples`` is at most the device's partition
size (``Federation(num_samples_limit=...)``) and ``lora_importance`` at most Eq. 13-14's
bound ``1 + sqrt(r_i)`` at the device's planned rank (``pruning.lora_importance_total``:
a cosine in [0, 1] plus a nuclear-to-Frobenius ratio in [0, sqrt(rank)]), with a relative
tolerance of :data:`IMPORTANCE_TOL` for float32 rounding.

Per-device records (:class:`DeviceRecords`: masks, the Eq. 12 importance a device carries
into its next round, data-stream position, rank, pruning ratio) are part of the state: a
task carries its device's record, ``close`` replaces the records of the devices whose
updates it took, so the state (one checkpoint) is all a resumed run or a restarted device
agent needs. Planning reads them: a device prunes in round t with the importance of its
round t-1, so one without importance yet (before its first accepted round) is planned no
further pruning.

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
from fedspine_jax.models import groups
from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.lora import lora_scale
from fedspine_jax.models.state import flatten, lora_rank, map_pairs
from fedspine_jax.strategies import Strategy, get


class UpdateRejected(ValueError):
    """A device update failed validation; the message names the problem."""


class QuorumNotMet(RuntimeError):
    """``close`` was asked for before enough devices reported."""


class NonFiniteState(RuntimeError):
    """``close`` computed a bandit state holding NaN or Inf; it is refused, not stored."""


# Plausibility bounds of an update's statistics (see the module note): name -> (kind, lo,
# hi), inclusive; ``int`` statistics must be integers, ``float`` ones finite numbers.
STAT_BOUNDS = {
    "num_samples": (int, 1, 2**31 - 1),        # examples in the device's partition
    "loss_before": (float, 0.0, 1e4),          # a cross-entropy (log K for a uniform guess
    "loss_after": (float, 0.0, 1e4),           #   over K labels) or a squared error
    "lora_importance": (float, 0.0, 1e4),      # per update: <= 1 + sqrt(planned rank)
    "ratio": (float, 0.0, 1.0),                # pruning ratio reached
    "compute_time_s": (float, 0.0, 1e6),       # about 11.6 days: no local round is longer
    "comm_time_s": (float, 0.0, 1e6),
    "flops": (float, 0.0, 1e24),               # FLOPs of one local round
    "peak_memory_bytes": (int, 0, 2**50),      # 1 PiB
    "params_alive": (int, 0, 2**50),           # frozen parameters left in the model
}
# Relative tolerance on the Eq. 13-14 bound of lora_importance (float32 rounding).
IMPORTANCE_TOL = 1e-3


@dataclasses.dataclass(frozen=True)
class DeviceRecords:
    """What the round keeps of every device between its rounds (leading axis: N devices).

    A device's local round starts from its record (prune with the carried importance, train
    on its data stream from the recorded position) and :meth:`Federation.close` replaces the
    record of every device whose update it took; a device without an update this round
    keeps its record. So a device needs no state of its own: a restarted device agent, or a
    resumed run, continues exactly from here.
    """
    head_masks: np.ndarray          # (N, L, H) 0/1 after the device's last accepted round
    channel_masks: np.ndarray       # (N, L, F) 0/1
    head_importance: np.ndarray     # (N, L, H) Eq. 12 average of its last round's tau steps
    channel_importance: np.ndarray  # (N, L, F) (0 for groups pruned before that round)
    scored: np.ndarray              # (N,) bool: the importance above has been measured
    ratio: np.ndarray               # (N,) float32 pruning ratio its masks reach, p^{t-1}
    rank: np.ndarray                # (N,) int32 LoRA rank of its last accepted round
    stream: np.ndarray              # (N, 2) int64 (epoch, position) of its data stream

    def device(self, i: int) -> dict:
        """Device ``i``'s record as a dict of arrays (what travels with its task)."""
        return {f.name: getattr(self, f.name)[i] for f in dataclasses.fields(self)}

    def replace_device(self, i: int, **values) -> DeviceRecords:
        """A copy with device ``i``'s entries of the named fields replaced."""
        out = {}
        for f in dataclasses.fields(self):
            arr = getattr(self, f.name)
            if f.name in values:
                arr = arr.copy()
                arr[i] = values[f.name]
            out[f.name] = arr
        return DeviceRecords(**out)


def initial_records(num_devices: int, mask_shapes: tuple, rank: int) -> DeviceRecords:
    """Records before round 1: nothing pruned, no importance yet, streams at their start.

    Args:
      mask_shapes: ``((L, H), (L, F))`` of the model's head and channel masks.
      rank: the global LoRA rank R (the rank a device's model holds before its first round).
    """
    (layers, heads), (_, channels) = mask_shapes
    n = int(num_devices)
    return DeviceRecords(
        head_masks=np.ones((n, layers, heads), np.float32),
        channel_masks=np.ones((n, layers, channels), np.float32),
        head_importance=np.zeros((n, layers, heads), np.float32),
        channel_importance=np.zeros((n, layers, channels), np.float32),
        scored=np.zeros(n, bool), ratio=np.zeros(n, np.float32),
        rank=np.full(n, rank, np.int32), stream=np.zeros((n, 2), np.int64))


@dataclasses.dataclass(frozen=True)
class DeviceTask:
    """What a device receives for a round: its plan, the global model and its record."""
    device_id: int
    round: int
    ratio: float          # pruning ratio p_i to reach this round
    rank: int             # LoRA rank r_i
    lora: dict            # LoRA tree (models.state) of the global LoRA shrunk to r_i
    head: dict            # task head tree
    record: dict          # the device's DeviceRecords entries (masks, importance, stream...)


@dataclasses.dataclass(frozen=True)
class DeviceUpdate:
    """What a device sends back after its local round."""
    device_id: int
    round: int
    lora: dict                 # LoRA tree of the trained factors at rank r_i (float32)
    head: dict                 # task head tree
    head_masks: np.ndarray     # (L, H) masks after this round's pruning
    channel_masks: np.ndarray  # (L, F)
    head_importance: np.ndarray     # (L, H) Eq. 12 average of this round (next round prunes
    channel_importance: np.ndarray  # (L, F)  with it)
    stream: tuple              # (epoch, position) of the device's data stream after the round
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
    lora: dict                       # global LoRA tree (models.state), rank R
    head: dict                       # global task head
    bandit: bandit.BanditState | None
    devices: DeviceRecords           # per-device records (masks, importance, stream, ...)
    plan_p: np.ndarray | None = None   # (N,) this round's ratios, once planned
    plan_r: np.ndarray | None = None   # (N,) this round's ranks
    updates: tuple = ()              # accepted DeviceUpdates of this round, in arrival order
    skipped: tuple = ()              # (device_id, stream) of devices that gave up this round

    @property
    def last_p(self) -> np.ndarray:
        """(N,) each device's pruning ratio after its last accepted round, p^{t-1}."""
        return self.devices.ratio


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
    weights: np.ndarray        # (n,) aggregation weight of each reporting device's update


class Federation:
    """The round logic for one run: static settings plus pure state transitions.

    Args:
      cfg: the run's config.
      num_devices: N.
      tiers: (N,) device capability tiers, 0 = strongest (HETLoRA's rank policy); default 0.
      arch: the full model's architecture (the devices' masks are ``(L, H)`` and ``(L, F)``
        of it; ``models.groups`` says which rows / columns each group owns); needed to start
        a run, not to restore one.
      num_samples_limit: (N,) the most ``num_samples`` each device may report (its
        partition's size); None: only :data:`STAT_BOUNDS`' global bound.
    """

    def __init__(self, cfg: Config, num_devices: int, tiers: np.ndarray | None = None,
                 arch: ArchConfig | None = None, *,
                 num_samples_limit: np.ndarray | None = None):
        self.cfg = cfg
        self.num_devices = int(num_devices)
        self.strategy: Strategy = get(cfg.federation.strategy)
        self.tiers = np.zeros(num_devices, int) if tiers is None else np.asarray(tiers, int)
        self.arch = arch
        if len(self.tiers) != num_devices:
            raise ValueError(f"tiers has {len(self.tiers)} entries for {num_devices} devices")
        self.num_samples_limit = None
        if num_samples_limit is not None:
            self.num_samples_limit = np.asarray(num_samples_limit, np.int64)
            if self.num_samples_limit.shape != (self.num_devices,):
                raise ValueError(f"num_samples_limit has shape {self.num_samples_limit.shape} "
                                 f"for {num_devices} devices")

    # -- set-up ---------------------------------------------------------------------------

    def bandit_config(self) -> Config:
        """The config the bandit sees: the strategy's bandit settings (``fedspine_tuned``)
        over the config's, and target 0 when the strategy does not prune (w/o A_P)."""
        from fedspine_jax.config import replace

        cfg = self.cfg
        if self.strategy.bandit:
            cfg = replace(cfg, bandit=dict(self.strategy.bandit))
        if self.strategy.prunes:
            return cfg
        return replace(cfg, pruning={"target_ratio": 0.0})

    def init(self, lora: dict, head: dict) -> FederationState:
        """The state before round 1 from the initial global LoRA (rank R) and head."""
        if lora_rank(lora) != self.cfg.lora.rank:
            raise ValueError(f"initial LoRA has rank {lora_rank(lora)}, config says "
                             f"{self.cfg.lora.rank}")
        if self.arch is None:
            raise ValueError("Federation(arch=...) is needed to start a run")
        b_state = None
        if self.strategy.uses_bandit:
            key = jax.random.fold_in(jax.random.PRNGKey(self.cfg.federation.seed), 0xB)
            b_state = bandit.init(self.bandit_config(), self.num_devices, key)
        return FederationState(
            round=1, lora=_f32(lora), head=_f32(head), bandit=b_state,
            devices=initial_records(self.num_devices, self.mask_shapes(), self.cfg.lora.rank))

    def mask_shapes(self) -> tuple:
        """``((L, H), (L, F))``: the shapes of a device's head and channel masks."""
        a = self.arch
        return (a.num_layers, a.num_heads), (a.num_layers, a.intermediate_size)

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
            # Pruning never goes back, and a device prunes with the importance it measured
            # in its previous round (paper section 3, stage 3): before its first accepted
            # round it has none, so it trains unpruned (decision: no calibration pass; the
            # ratio planned by the bandit for it is the ratio it already has).
            devs = state.devices
            p = np.where(devs.scored, np.maximum(p, devs.ratio), devs.ratio).astype(np.float32)
            state = dataclasses.replace(state, bandit=b_state, plan_p=p, plan_r=r)
        shrunk = {int(r): self.shrink(state.lora, int(r)) for r in np.unique(state.plan_r)}
        tasks = [DeviceTask(i, state.round, float(state.plan_p[i]), int(state.plan_r[i]),
                            shrunk[int(state.plan_r[i])], dict(state.head),
                            state.devices.device(i))
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
            return lora
        s_glob = lora_scale(self.cfg.lora.alpha, self.cfg.lora.rank)
        s_dev = lora_scale(self.cfg.lora.alpha, rank)

        def one(_, pair):
            a, b = aggregation.shrink_lora(jnp.asarray(pair["lora_a"]),
                                           jnp.asarray(pair["lora_b"]) * s_glob, rank)
            return {"lora_a": np.asarray(a, np.float32),
                    "lora_b": np.asarray(b, np.float32) / (s_dev if s_dev > 0 else 1.0)}
        return map_pairs(one, lora)

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
            for k, v in flatten(state.lora).items()})
        _check_tensors("head", u.head, {k: v.shape for k, v in flatten(state.head).items()})
        self._check_statistics(state, u)
        if u.ratio < float(state.last_p[u.device_id]) - 1e-6:
            raise UpdateRejected(f"pruning ratio {u.ratio} is below the "
                                 f"{state.last_p[u.device_id]} "
                                 f"device {u.device_id} already reached (pruning never goes back)")
        if u.device_id in {i for i, _ in state.skipped}:
            raise UpdateRejected(f"device {u.device_id} gave up round {state.round}")
        self._check_record(state, u)
        return dataclasses.replace(state, updates=state.updates + (u,))

    def _stat_bounds(self, state: FederationState, device_id: int) -> dict:
        """``{name: (kind, lo, hi, source)}``: :data:`STAT_BOUNDS` tightened for device
        ``device_id`` in the round ``state`` collects (its partition size, Eq. 13-14's
        importance bound at its planned rank); ``source`` says where ``hi`` comes from."""
        out = {k: (kind, lo, hi, "plausibility bound")
               for k, (kind, lo, hi) in STAT_BOUNDS.items()}
        rank = int(state.plan_r[device_id])
        kind, lo, hi = STAT_BOUNDS["lora_importance"]
        out["lora_importance"] = (kind, lo, min(hi, (1.0 + math.sqrt(rank)) *
                                                (1.0 + IMPORTANCE_TOL)),
                                  f"Eq. 13-14 bound 1 + sqrt(r) at the planned rank {rank}")
        if self.num_samples_limit is not None:
            kind, lo, hi = STAT_BOUNDS["num_samples"]
            out["num_samples"] = (kind, lo, min(hi, int(self.num_samples_limit[device_id])),
                                  f"device {device_id}'s partition size")
        return out

    def _check_statistics(self, state: FederationState, u: DeviceUpdate) -> None:
        """Every statistic of ``u`` of its kind and within :meth:`_stat_bounds`."""
        for name, (kind, lo, hi, source) in self._stat_bounds(state, u.device_id).items():
            val = getattr(u, name)
            if kind is int:
                if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
                    raise UpdateRejected(f"statistic {name}={val!r} is not an integer")
            elif isinstance(val, bool) or not isinstance(
                    val, (int, float, np.integer, np.floating)) or not math.isfinite(val):
                raise UpdateRejected(f"statistic {name}={val!r} is not a finite number")
            if not lo <= val <= hi:
                shown = hi if kind is int else f"{hi:.6g}"
                raise UpdateRejected(f"statistic {name}={val!r} is outside its plausible "
                                     f"range [{lo}, {shown}] ({source})")

    def _check_record(self, state: FederationState, u: DeviceUpdate) -> None:
        """Masks and importance shaped like the device's record; masks 0/1 and only gaining
        zeros (none may revive a group its record has pruned); importance finite, >= 0;
        a stream position of two non-negative integers."""
        rec = state.devices
        i = u.device_id
        for name in ("head_masks", "channel_masks", "head_importance", "channel_importance"):
            m, want = np.asarray(getattr(u, name)), getattr(rec, name)[i]
            if m.shape != want.shape:
                raise UpdateRejected(f"{name} has shape {m.shape}, expected {want.shape}")
            if name.endswith("masks"):
                if not np.all((m == 0) | (m == 1)):
                    raise UpdateRejected(f"{name} must hold only 0 and 1 (no NaN)")
                if np.any(m > want):
                    raise UpdateRejected(f"{name} revives groups pruned in an earlier round "
                                         f"(masks only gain zeros)")
            elif not np.all(np.isfinite(m)) or np.any(m < 0):
                raise UpdateRejected(f"{name} must be finite and >= 0")
        st = u.stream
        if len(st) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer))
                               or x < 0 for x in st):
            raise UpdateRejected(f"stream={st!r}: expected (epoch, position), integers >= 0")

    def give_up(self, state: FederationState, device_id: int,
                stream: tuple | None = None) -> FederationState:
        """Record that a device sends no update this round (out of memory, failed). Its
        record stays as it was, except the data-stream position ``stream`` when given (a
        device that ran out of memory has drawn its batches)."""
        if any(x.device_id == device_id for x in state.updates):
            raise UpdateRejected(f"device {device_id} already sent its update for round "
                                 f"{state.round}")
        return dataclasses.replace(state, skipped=state.skipped + ((int(device_id), stream),))

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
        weights = np.zeros(len(ups), np.float32)
        lora, head, b_state, last_p = state.lora, state.head, state.bandit, state.last_p.copy()
        if ups:
            weights = self.strategy.weights(
                self.cfg, np.array([u.lora_importance for u in ups], np.float32),
                np.array([u.num_samples for u in ups], np.float32))
            lora = self._aggregate_lora(state, ups)
            w = np.array([u.num_samples for u in ups], np.float64)
            head = jax.tree.map(
                lambda *xs: np.asarray(sum(wi * x for wi, x in zip(w / w.sum(), xs)),
                                       np.float32), *[u.head for u in ups])
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
        if b_state is not None:  # the arm space's lower bound is the ratio reached, p^{t-1}
            b_state = b_state.replace(last_p=jnp.asarray(last_p, jnp.float32))
            _check_finite_bandit(b_state, state.round)
        waiting = float(np.mean(times.max() - times)) if len(times) else 0.0
        report = RoundReport(state.round, ids, state.plan_p, state.plan_r, rewards, times,
                             waiting, np.asarray(weights, np.float32))
        new = FederationState(round=state.round + 1, lora=lora, head=head, bandit=b_state,
                              devices=self._records_after(state, ups))
        return new, report

    def _records_after(self, state: FederationState, ups: list[DeviceUpdate]
                       ) -> DeviceRecords:
        """The devices' records once the round closes: replaced from each accepted update;
        a device that gave up keeps its record but its stream position (when it sent one)."""
        rec = state.devices
        for i, stream in state.skipped:
            if stream is not None:
                rec = rec.replace_device(i, stream=stream)
        for u in ups:
            rec = rec.replace_device(
                u.device_id, head_masks=u.head_masks, channel_masks=u.channel_masks,
                head_importance=u.head_importance, channel_importance=u.channel_importance,
                scored=True, ratio=u.ratio, rank=int(state.plan_r[u.device_id]),
                stream=u.stream)
        return rec

    def _aggregate_lora(self, state: FederationState, ups: list[DeviceUpdate]) -> dict:
        alpha, big_r = self.cfg.lora.alpha, self.cfg.lora.rank
        imp = np.array([u.lora_importance for u in ups], np.float32)
        n = np.array([u.num_samples for u in ups], np.float32)

        def one(path, glob, *pairs):
            a_list = [jnp.asarray(pr["lora_a"]) for pr in pairs]
            b_list = [jnp.asarray(pr["lora_b"]) * lora_scale(alpha, pr["lora_a"].shape[1])
                      for pr in pairs]
            cols = rows = None
            if self.cfg.aggregation.mask_aware:
                layer, name = int(path[1]), path[-1]
                masks = [groups.kept_mask(self.arch, layer, name, u.head_masks[layer],
                                          u.channel_masks[layer]) for u in ups]
                if masks[0][0] is not None:
                    cols = jnp.asarray(np.stack([m[0] for m in masks]))
                if masks[0][1] is not None:
                    rows = jnp.asarray(np.stack([m[1] for m in masks]))
            a, b = self.strategy.aggregate(self.cfg, a_list, b_list, imp, n, cols, rows)
            return {"lora_a": np.asarray(a, np.float32),
                    "lora_b": np.asarray(b, np.float32) / lora_scale(alpha, big_r)}
        return map_pairs(one, state.lora, *[u.lora for u in ups])


def _select_agents(mask: np.ndarray, new: bandit.BanditState, old: bandit.BanditState):
    """Per agent: the updated bandit state where ``mask``, else the old one (the params
    are the fleet's, shared by both)."""
    def pick(x, y):
        m = jnp.asarray(mask).reshape((-1,) + (1,) * (jnp.ndim(x) - 1))
        return jnp.where(m, x, y)
    return jax.tree.map(pick, new.replace(params=None), old.replace(params=None)).replace(
        params=new.params)


def _check_finite_bandit(b: bandit.BanditState, round_: int) -> None:
    """Raise :class:`NonFiniteState` naming the fields and agents of ``b`` that hold NaN or
    Inf (such a state is never stored, nor checkpointed)."""
    bad = {}
    for f in dataclasses.fields(b):
        if f.name == "params":
            continue
        x = np.asarray(getattr(b, f.name))
        if np.issubdtype(x.dtype, np.floating):
            agents = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
            if agents.size:
                bad[f.name] = agents.tolist()
    if bad:
        raise NonFiniteState(f"round {round_}: the bandit state after the update holds NaN or "
                             f"Inf ({', '.join(f'{k} of agents {v}' for k, v in bad.items())})"
                             f"; refusing to store it")


def _f32(tree: dict) -> dict:
    return jax.tree.map(lambda v: np.asarray(v, np.float32), tree)


def _check_tensors(what: str, got: dict, want: dict) -> None:
    """``got`` (a tree) has exactly the paths of ``want`` (``{path: shape}``), float32,
    finite, at those shapes."""
    if not isinstance(got, dict):
        raise UpdateRejected(f"{what} is not a tree of arrays")
    got = flatten(got)
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
