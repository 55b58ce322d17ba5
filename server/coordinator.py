"""The server's round driver: the core ``Federation`` round behind a thread-safe facade.

Design note
-----------
The coordinator owns one :class:`~fedspine_jax.federation.FederationState` and moves it only
through ``Federation.plan / accept / close``: it holds no round logic of its own. What it
adds is what a network needs and a simulator does not:

* **When a round closes** (the transport's decision the core leaves open). A round is
  *open* from the first time a device fetches its task or an update arrives (so a server
  that waits for its devices to start does not burn the deadline; a restarted server
  starts the round's deadline again). It closes as soon as
  (a) every device has answered (an update, or a report that it cannot send one: out of
  memory, failed) -- ``close(force=True)``, as the simulator does; or (b) the quorum
  ``ceil(federation.quorum * N)`` of updates has arrived -- ``close()``; or (c)
  the round's deadline (``federation.deadline_s``; 0, the default, means
  ``DEFAULT_DEADLINE_S``) has passed since the round opened and at least one update
  arrived -- ``close(force=True)``; the devices that did not report are the round's
  stragglers (an update they send later is refused as stale). With no update at the
  deadline the round keeps waiting: a round that learns nothing would still advance the
  schedule.
* **Per-device records travel with the tasks.** Each device's record in the federation
  state (masks, the importance it carries into its next round, data-stream position, rank;
  ``federation.DeviceRecords``) is sent with every task and replaced from every accepted
  update, so a device agent is stateless: killed, restarted on another machine, it
  continues exactly where the server's record says.
* **Durability.** After every closed round the state (planned for the next round) and the
  records are saved as an orbax checkpoint (``checkpoints/round_XXXXX``: XXXXX rounds
  closed, as the simulator names them). Every accepted update (and every out-of-memory /
  failure report) is first written to a journal file (``journal/``, fsync'd, atomically
  renamed) and only then acknowledged. A restarted server restores the newest checkpoint,
  re-plans the round (planning is deterministic and idempotent) and replays that round's
  journal through ``Federation.accept``, in arrival order: nothing acknowledged is lost and
  nothing is counted twice (a device that retries an acknowledged upload is told it is a
  duplicate; the same device sending a *different* update for the round is refused).
  Journal files of a round are deleted once the oldest checkpoint kept
  (``federation.keep_checkpoints``) contains them, so each kept checkpoint can be resumed
  with its round's journal.
* **Recovery from damage.** ``checkpoint.restore`` verifies each checkpoint's digest and
  falls back past damaged ones to the newest intact one; the restored round's journal is
  replayed. Entries of *later* rounds were answers to tasks planned from a state that is
  now lost, so they cannot be replayed: they are moved (never deleted) to
  ``journal/set_aside/`` with a warning, and their devices are asked for those rounds
  again. A journal entry that cannot be read (cut short, flipped bytes: each update entry
  carries its digest) or that the restored state refuses is reported in one warning and
  moved there too; the resume goes on without it (its device is asked again).
* **Faults of the disk.** A checkpoint or journal write that fails (disk full, read-only
  or missing directory) raises ``errors.StorageError`` naming the path and the operating
  system's reason, and ends ``run`` with it (a failed journal write acknowledges nothing);
  what was written before is intact, so ``--resume`` continues once the disk is fixed.

Everything else -- metrics lines compatible with the simulator's (``fedspine report``
reads both; written with ``fedspine_jax.driver``), evaluation of the devices' models every
``federation.eval_every`` rounds -- reuses ``fedspine_jax.experiment``; the devices' final models are exported for
``FetchModel`` with ``fedspine_jax.export`` (``server.models``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
import threading
import time
from pathlib import Path

import jax
import numpy as np

from fedspine_jax import checkpoint, driver, experiment, metrics
from fedspine_jax.config import Config
from fedspine_jax.errors import StorageError
from fedspine_jax.federation import DeviceUpdate, UpdateRejected
from fedspine_jax.models.state import flatten, get_head, get_lora, tree_bytes
from fedspine_jax.server import wire
from fedspine_jax.server.models import ModelStore

log = logging.getLogger("fedspine.server")

# A fetch long-polls at most this long before answering WAIT.
MAX_WAIT_S = 30.0
# The round deadline when the config sets none (federation.deadline_s = 0): a dead device
# never stalls a round for ever.
DEFAULT_DEADLINE_S = 600.0
# While a round is open, name the devices it still waits for this often.
WAITING_LOG_S = 60.0


class StaleUpdate(UpdateRejected):
    """An update for a round the server is not collecting (late, early, or already closed)."""


class RunDone(Exception):
    """The run has finished all its rounds."""


class DamagedEntry(Exception):
    """A journal entry that cannot be read back as it was written."""


def update_digest(u: DeviceUpdate) -> str:
    """sha256 of an update's tensors and statistics (detects a retried upload)."""
    h = hashlib.sha256()
    for f in dataclasses.fields(u):
        v = getattr(u, f.name)
        if isinstance(v, dict):   # a tree: its leaves by path
            flat = flatten(v)
            for k in sorted(flat):
                h.update(k.encode())
                h.update(np.ascontiguousarray(flat[k], np.float32).tobytes())
        elif isinstance(v, np.ndarray):
            h.update(np.ascontiguousarray(v, np.float32).tobytes())
        elif isinstance(v, tuple):
            h.update(repr(tuple(int(x) for x in v)).encode())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


@dataclasses.dataclass
class Task:
    """A device's task as the servicer streams it."""
    round: int
    ratio: float
    rank: int
    stream: tuple[int, int]
    deadline_in_s: float
    chunks: list           # TensorChunk messages: LoRA, head, then the device's record
    num_tensors: int


class Coordinator:
    """Drive ``cfg.federation.rounds`` rounds of the core federation for remote devices.

    Args:
      cfg: the run's config (devices must use the same one; see ``wire.config_digest``).
      out: run directory (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
        ``journal/``, ``summary.json``).
      resume: continue the run in ``out`` (its newest checkpoint and journal).
    """

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False):
        self.out = Path(out)
        self.ckdir = self.out / "checkpoints"
        self.jdir = self.out / "journal"
        cfg, restore = checkpoint.prepare_run_dir(self.out, cfg, resume)
        self.cfg = cfg
        self.digest = wire.config_digest(cfg)
        self.s = experiment.setup(cfg)
        self.fed = self.s.fed
        self.n = cfg.federation.num_devices
        self.rounds = cfg.federation.rounds
        # the devices' exported models once the run is over (FetchModel)
        self.models = ModelStore(self.out / "models", self.n, enabled=cfg.export.at_end)
        self._tokenizer = None
        self._cv = threading.Condition()
        self._seq = 0
        self._gave_up: dict[int, str] = {}       # device -> "out_of_memory" / "failed: ..."
        self._digests: dict[int, str] = {}       # device -> digest of its accepted update
        self._measured: dict[int, tuple] = {}    # device -> (compute_s, comm_s) measured
        self._registered: set[int] = set()
        self._told_done: set[int] = set()
        self._opened_at: float | None = None
        self._accept_s = 0.0
        self._deadline_logged = False
        self._waiting_logged_at = 0.0
        self._payload: dict[int, list] = {}      # rank -> TensorChunks of LoRA + head
        self._fatal: StorageError | None = None  # a failed journal write ends ``run``
        self.out.mkdir(parents=True, exist_ok=True)
        self.jdir.mkdir(exist_ok=True)
        if restore:
            self._restore()
        else:
            (self.out / "metrics.jsonl").write_text("")
            self.clock = self.wall_clock = self.peak_memory = 0.0
            self.state, _ = self.fed.plan(self.fed.init(get_lora(self.s.model),
                                                        get_head(self.s.model)))
            self._save()
        self._build_payload()
        # The largest honest update is the full-rank payload; twice that is refused
        # outright (smaller mistakes get the core's precise shape error).
        rec = self.state.devices
        full = tree_bytes(self.state.lora) + tree_bytes(self.state.head) + 2 * (
            rec.head_masks[0].nbytes + rec.channel_masks[0].nbytes)
        self.max_update_bytes = 2 * int(full) + (64 << 10)

    # -- persistence ----------------------------------------------------------------------

    def _extra(self) -> dict:
        return {"clock": np.float64(self.clock), "wall_clock": np.float64(self.wall_clock),
                "peak_memory": np.float64(self.peak_memory)}

    def _save(self) -> None:
        checkpoint.save(self.ckdir, self.state.round - 1, self.state, self._extra(),
                        keep=self.cfg.federation.keep_checkpoints)
        oldest = checkpoint.steps(self.ckdir)[0]  # it holds the rounds up to its step
        for p in self.jdir.glob("r*.npz"):
            if int(p.name[1:6]) <= oldest:
                p.unlink(missing_ok=True)

    def _restore(self) -> None:
        state, extra, step = checkpoint.restore(self.ckdir, self.fed)
        self.clock = float(extra["clock"])
        self.wall_clock = float(extra.get("wall_clock", 0.0))
        self.peak_memory = float(extra["peak_memory"])
        if state.round <= self.rounds:
            state, _ = self.fed.plan(state)
        self.state = state
        metrics.truncate_metrics(self.out / "metrics.jsonl", state.round - 1)
        replayed, later = 0, []
        for path in self.jdir.glob("*.tmp"):
            path.unlink(missing_ok=True)  # a journal write that never completed
        for path in sorted(self.jdir.glob("r*.npz")):
            t = int(path.name[1:6])
            if t < state.round:
                continue  # in the checkpoint already (deleted by the next _save)
            if t > state.round:
                later.append(self._set_aside(path))
                continue
            self._seq = max(self._seq, int(path.name[7:13]) + 1)
            try:
                kind, u, meta = _read_entry(path)
                if kind == "update":
                    self._commit_update(self.fed.accept(self.state, u), u, meta)
                else:
                    self._commit_gave_up(meta)
            except (DamagedEntry, UpdateRejected) as e:
                log.warning("journal entry %s cannot be replayed (%s): moved to %s; its "
                            "device will be asked for round %d again", path.name, e,
                            self._set_aside(path), state.round)
                continue
            replayed += 1
        if later:
            log.warning("checkpoint round_%05d is the newest intact one: %d acknowledged "
                        "journal entries of later rounds cannot be replayed onto it and were "
                        "moved to %s (their devices will be asked for those rounds again)",
                        step, len(later), later[0].parent)
        if replayed:  # the round was under way: its deadline restarts now
            self._opened_at = time.monotonic()
        log.info("resumed from checkpoint round_%05d: collecting round %d, %d journal "
                 "entries replayed", step, state.round, replayed)

    def _set_aside(self, path: Path) -> Path:
        """Move a journal entry to ``journal/set_aside/`` (never over another); its new path."""
        d = self.jdir / "set_aside"
        d.mkdir(exist_ok=True)
        dest, k = d / path.name, 1
        while dest.exists():
            dest, k = d / f"{path.stem}.{k}{path.suffix}", k + 1
        os.replace(path, dest)
        return dest

    def _journal(self, arrays: dict, meta: dict) -> None:
        """Write one journal entry durably (tmp file, fsync, atomic rename, fsync dir).

        Raises:
          StorageError: the entry could not be written (also kept for ``run`` to end with).
        """
        if self._fatal is not None:
            raise self._fatal
        name = f"r{self.state.round:05d}_{self._seq:06d}_d{meta['device_id']}.npz"
        self._seq += 1
        tmp = self.jdir / (name + ".tmp")
        payload = {k.replace("/", "|"): v for k, v in arrays.items()}
        payload["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.jdir / name)
            fd = os.open(self.jdir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._fatal = StorageError(
                f"cannot write journal entry {str(self.jdir / name)!r}: "
                f"{e.strerror or e}; the update was not acknowledged, and the checkpoints "
                f"and journal written before are intact")
            self._cv.notify_all()
            raise self._fatal from e

    # -- the transport-facing API (thread-safe) --------------------------------------------

    @property
    def done(self) -> bool:
        return self.state.round > self.rounds

    def register(self, device_id: int, digest: str) -> dict:
        """Check the device's config digest; return what the device needs to know."""
        if digest != self.digest:
            raise ValueError(f"device {device_id} runs a different config (digest "
                             f"{digest[:12]}..., server {self.digest[:12]}...): start it "
                             f"with the server's config")
        with self._cv:
            first = device_id not in self._registered
            self._registered.add(device_id)
            current = self.state.round
        if first:
            log.info("device %d registered", device_id)
        return {"num_devices": self.n, "rounds": self.rounds, "current_round": current,
                "config_digest": self.digest, "chunk_bytes": wire.CHUNK_BYTES,
                "max_update_bytes": self.max_update_bytes}

    def is_registered(self, device_id: int) -> bool:
        with self._cv:
            return device_id in self._registered

    def _answered(self) -> set[int]:
        return {u.device_id for u in self.state.updates} | set(self._gave_up)

    def fetch(self, device_id: int, wait_s: float) -> Task | None:
        """The device's task, or None (nothing yet: ask again); raises :class:`RunDone`."""
        until = time.monotonic() + max(0.0, min(float(wait_s), MAX_WAIT_S))
        with self._cv:
            while True:
                if self.done:
                    self._told_done.add(device_id)
                    self._cv.notify_all()
                    raise RunDone()
                if device_id not in self._answered():
                    return self._task(device_id)
                left = until - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)

    def _task(self, i: int) -> Task:
        st = self.state
        now = time.monotonic()
        if self._opened_at is None:
            self._opened_at = now
            log.info("round %d open", st.round)
        left = max(0.0, self._opened_at + self.deadline_s - now)
        rank = int(st.plan_r[i])
        record = wire.record_tensors(st.devices.device(i))
        payload = self._payload[rank]
        stream = st.devices.stream[i]
        return Task(round=st.round, ratio=float(st.plan_p[i]), rank=rank,
                    stream=(int(stream[0]), int(stream[1])), deadline_in_s=left,
                    chunks=payload + list(wire.dict_chunks(record)),
                    num_tensors=len(jax.tree.leaves(st.lora)) + len(jax.tree.leaves(st.head))
                    + len(record))

    def _build_payload(self) -> None:
        """Pre-serialise the round's LoRA (one per planned rank) and head."""
        self._payload = {}
        if self.done:
            return
        _, tasks = self.fed.plan(self.state)  # idempotent: the plan is in the state
        for t in tasks:
            if t.rank not in self._payload:
                self._payload[t.rank] = list(wire.dict_chunks(
                    wire.join_payload(t.lora, t.head)))

    def submit(self, u: DeviceUpdate, measured: tuple[float, float]) -> bool:
        """Validate, journal and record one update; True if it was a duplicate (a retry).

        Raises :class:`StaleUpdate` (wrong round) or ``UpdateRejected`` (anything else),
        leaving the state unchanged.
        """
        digest = update_digest(u)
        with self._cv:
            t0 = time.perf_counter()  # work under the lock: uploads queue here, in order
            st = self.state
            if u.round == st.round and u.device_id in {x.device_id for x in st.updates}:
                if self._digests.get(u.device_id) == digest:
                    return True
                raise UpdateRejected(f"device {u.device_id} already sent a different update "
                                     f"for round {st.round}")
            if u.round == st.round and u.device_id in self._gave_up:
                raise UpdateRejected(f"device {u.device_id} reported "
                                     f"{self._gave_up[u.device_id]} for round {st.round}")
            try:
                new = self.fed.accept(st, u)
            except UpdateRejected as e:
                if u.round != st.round:
                    raise StaleUpdate(str(e)) from None
                raise
            meta = {"kind": "update", "device_id": int(u.device_id), "round": int(u.round),
                    "stream": [int(u.stream[0]), int(u.stream[1])], "digest": digest,
                    "measured": [float(measured[0]), float(measured[1])],
                    **_scalars(u)}
            self._journal(_update_arrays(u), meta)
            self._commit_update(new, u, meta)
            if self._opened_at is None:  # a device that fetched before a server restart
                self._opened_at = time.monotonic()
            self._accept_s += time.perf_counter() - t0
            self._cv.notify_all()
        log.info("round %d: update from device %d accepted (%d/%d)", u.round, u.device_id,
                 len(new.updates), self.n)
        return False

    def _commit_update(self, new_state, u: DeviceUpdate, meta: dict) -> None:
        i = u.device_id
        self.state = new_state
        self.peak_memory = max(self.peak_memory, float(u.peak_memory_bytes))
        self._digests[i] = meta["digest"]
        self._measured[i] = tuple(meta["measured"])

    def give_up(self, device_id: int, round_t: int, reason: str,
                stream: tuple[int, int] | None) -> None:
        """A device says it will send no update this round (out of memory, or failed)."""
        with self._cv:
            if round_t != self.state.round or device_id in self._answered():
                return
            meta = {"kind": "gave_up", "device_id": int(device_id), "round": int(round_t),
                    "reason": reason, "stream": None if stream is None else list(stream)}
            self._journal({}, meta)
            self._commit_gave_up(meta)
            self._cv.notify_all()
        log.info("round %d: device %d sends no update (%s)", round_t, device_id, reason)

    def _commit_gave_up(self, meta: dict) -> None:
        i = meta["device_id"]
        self._gave_up[i] = meta["reason"]
        stream = meta["stream"] if meta["reason"] == "out_of_memory" else None
        self.state = self.fed.give_up(self.state, i, None if stream is None else tuple(stream))

    # -- closing rounds ---------------------------------------------------------------------

    def _close_reason(self) -> str | None:
        ups = len(self.state.updates)
        if len(self._answered()) == self.n:
            return "all devices answered"
        if ups >= self.fed.quorum():
            return "quorum"
        if self._opened_at is not None and \
                time.monotonic() >= self._opened_at + self.deadline_s:
            if ups:
                return "deadline"
            if not self._deadline_logged:
                log.warning("round %d: deadline passed without any update; waiting for "
                            "the first", self.state.round)
                self._deadline_logged = True
        return None

    @property
    def deadline_s(self) -> float:
        """The round deadline: ``federation.deadline_s``, or ``DEFAULT_DEADLINE_S``."""
        return self.cfg.federation.deadline_s or DEFAULT_DEADLINE_S

    def _wakeup(self) -> float:
        if self._opened_at is not None:
            return max(0.05, min(1.0, self._opened_at + self.deadline_s - time.monotonic()))
        return 1.0

    def _log_waiting(self) -> None:
        """Every ``WAITING_LOG_S`` of an open round: the devices it still waits for."""
        now = time.monotonic()
        if self._opened_at is None or now - max(self._opened_at, self._waiting_logged_at) \
                < WAITING_LOG_S:
            return
        self._waiting_logged_at = now
        waiting = sorted(set(range(self.n)) - self._answered())
        log.info("round %d open for %.0f s: waiting for devices %s (%d/%d answered; "
                 "deadline in %.0f s)", self.state.round, now - self._opened_at, waiting,
                 self.n - len(waiting), self.n,
                 max(0.0, self._opened_at + self.deadline_s - now))

    def run(self, stop: threading.Event | None = None, linger_s: float = 10.0) -> dict | None:
        """Close rounds until the run is done (or ``stop`` is set); return the summary.

        After the last round it exports every device's model (``export.at_end``; see
        ``server.models``), then waits up to ``linger_s`` for every device to be told the
        run is over and to fetch its model.
        """
        stop = stop or threading.Event()
        with self._cv:
            while not self.done and not stop.is_set():
                if self._fatal is not None:
                    raise self._fatal
                why = self._close_reason()
                if why is None:
                    self._log_waiting()
                    self._cv.wait(self._wakeup())
                    continue
                self._close(why)
        if self.done and not stop.is_set():
            self.models.export_all(self._export_model, self.rounds)
        end = time.monotonic() + linger_s
        with self._cv:
            while self.done and not stop.is_set() and (
                    len(self._told_done) < self.n or not self.models.all_sent()):
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.5))  # model fetches do not notify this condition
        if not self.done:
            return None
        summary = driver.summarize(self.out, self.cfg)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _export_model(self, device_id: int, out: Path) -> list[Path]:
        """Export one device's final model (``ModelStore.export_all`` calls this)."""
        from fedspine_jax.export.run import device_model, export_device
        from fedspine_jax.models import load_tokenizer

        if self._tokenizer is None:
            from fedspine_jax.export.run import tokenizer_name

            self._tokenizer = load_tokenizer(tokenizer_name(self.cfg))
        dm = device_model(self.s, self.state, device_id, run=self.out.name,
                          step=self.rounds, tokenizer=self._tokenizer)
        return export_device(dm, out, self.cfg).files

    def _close(self, why: str) -> None:
        t0 = time.perf_counter()
        wall = time.monotonic() - (self._opened_at or time.monotonic())
        st = self.state
        t = st.round
        ups = sorted(st.updates, key=lambda x: x.device_id)
        stragglers = sorted(set(range(self.n)) - self._answered())
        new, report = self.fed.close(st, force=why != "quorum")
        t_close = time.perf_counter() - t0
        times = np.array([u.completion_time_s for u in ups])
        round_time = float(times.max()) if len(times) else 0.0
        self.clock += round_time
        self.wall_clock += wall
        t1 = time.perf_counter()
        acc = None
        k = self.cfg.federation.eval_every
        if (k and t % k == 0) or t == self.rounds:
            acc = experiment.evaluate_devices(self.s, new)
        t_eval = time.perf_counter() - t1
        lines = driver.device_rows(
            ups, report, self.s.fleet.type_names, round_time, acc,
            measured={i: {"measured_compute_s": m[0], "measured_comm_s": m[1]}
                      for i, m in self._measured.items()})
        for i, why_not in sorted(self._gave_up.items()):
            lines.append(metrics.DeviceRow(
                round=t, device=i, device_type=self.s.fleet.type_names[i],
                p=float(report.p[i]), r=int(report.r[i]), no_update=why_not,
                fits_memory=False if why_not == "out_of_memory" else None,
                accuracy=None if acc is None else float(acc[i])))
        t2 = time.perf_counter()
        self.state = new
        if not self.done:
            self.state, _ = self.fed.plan(self.state)
        t_plan = time.perf_counter() - t2
        summary = metrics.RoundRow(
            round=t, clock=self.clock, round_time=round_time, wall_time_s=wall,
            wall_clock=self.wall_clock, close_reason=why,
            devices=[u.device_id for u in ups], stragglers=stragglers,
            no_update=sorted(self._gave_up), waiting_time=float(report.waiting_time),
            mean_sparsity=float(np.mean([u.ratio for u in ups])) if ups else None,
            accuracy=None if acc is None else float(np.mean(acc)),
            overhead_s={"accept": self._accept_s, "close": t_close, "eval": t_eval,
                        "plan": t_plan})
        lines.append(summary)
        metrics.append_metrics(self.out / "metrics.jsonl", lines)
        t3 = time.perf_counter()
        self._save()
        t_ckpt = time.perf_counter() - t3
        self._build_payload()
        self._gave_up, self._digests, self._measured = {}, {}, {}
        self._opened_at, self._accept_s, self._deadline_logged = None, 0.0, False
        self._cv.notify_all()
        log.info("round %d/%d closed (%s): %d/%d devices, stragglers %s, round time %.2f s "
                 "(scheduler clock %.4g s), accuracy %s; server overhead: accept %.3f s, "
                 "close %.3f s, eval %.3f s, plan %.3f s, checkpoint %.3f s",
                 t, self.rounds, why, len(ups), self.n, stragglers or "none", wall,
                 round_time, "-" if acc is None else f"{float(np.mean(acc)):.3f}",
                 summary.overhead_s["accept"], t_close, t_eval, t_plan, t_ckpt)


def _scalars(u: DeviceUpdate) -> dict:
    """An update's scalar fields as plain Python numbers (JSON round-trips them exactly)."""
    out = {}
    for f in dataclasses.fields(u):
        if f.name in ("lora", "head", "head_masks", "channel_masks", "head_importance",
                      "channel_importance", "stream"):
            continue
        v = getattr(u, f.name)
        out[f.name] = int(v) if isinstance(v, (int, np.integer)) else float(v)
    return out


def _update_arrays(u: DeviceUpdate) -> dict:
    return wire.join_payload(u.lora, u.head, **{
        name: np.asarray(getattr(u, name))
        for name in ("head_masks", "channel_masks", "head_importance", "channel_importance")})


def _read_entry(path: Path) -> tuple[str, DeviceUpdate | None, dict]:
    """(kind, update or None, meta) of a journal entry.

    Raises:
      DamagedEntry: the entry cannot be read, or its update does not match its digest.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {k.replace("|", "/"): z[k] for k in z.files if k != "meta"}
        if meta["kind"] != "update":
            if {"device_id", "reason", "stream"} - meta.keys():
                raise DamagedEntry(f"its {meta['kind']!r} record lacks fields")
            return meta["kind"], None, meta
        lora, head, other = wire.split_payload(arrays)
        kw = {f.name: meta[f.name] for f in dataclasses.fields(DeviceUpdate)
              if f.name in meta and f.name != "stream"}
        u = DeviceUpdate(lora=lora, head=head, stream=tuple(meta["stream"]), **other, **kw)
        if update_digest(u) != meta["digest"]:
            raise DamagedEntry("its update does not match its digest")
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise DamagedEntry(f"{type(e).__name__}: {e}") from None
    return "update", u, meta


__all__ = ["Coordinator", "RunDone", "StaleUpdate", "Task", "update_digest",
           "MAX_WAIT_S"]
