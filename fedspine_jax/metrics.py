"""The schema of a run's ``metrics.jsonl``: typed rows, one writer and one reader.

Design note
-----------
A run's ``metrics.jsonl`` holds one JSON object per line: a :class:`DeviceRow` per device
and round (both transports write one for every device the round planned: the simulator for
every device, the gRPC server also for a device that sent no update), then one
:class:`RoundRow` per round, which carries ``"summary": true``. The simulator and the gRPC
server build these rows (through ``driver.device_rows`` for device rows) and write them with
:func:`append_metrics`; the report, the run summary and the resume repair read them with
:func:`read_metrics`. The JSON key of every field is its name.

Which keys a line holds: a field marked ``_opt`` is written only when it has a value (the
figures one transport measures and the other does not); a device row's update figures
(``_upd``) only when the device sent an update (``no_update`` is None), with null where one
figure is missing (no reward for a device the round gave up on, no single aggregation
weight for HETLoRA). Every other field is always written, null when None. A line of an
older run that lacks a key reads as None; an unknown key is an error that names it.

Times are seconds; ``clock`` times are on the clock the run charges (the simulated fleet,
or the devices' measurements in a deployment that reports them), ``measured_*`` and
``wall_*`` are wall-clock measurements. This module imports no JAX (the report reads it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fedspine_jax.errors import StorageError, UserError


class MetricsError(UserError, ValueError):
    """A metrics.jsonl line that is not a row of this schema (the message names the line)."""


def _opt() -> Any:
    """A field written only when it is not None."""
    return dataclasses.field(default=None, metadata={"write": "opt"})


def _upd() -> Any:
    """A device row's update figure: written only when the device sent an update."""
    return dataclasses.field(default=None, metadata={"write": "upd"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceRow:
    """One device's line of one round."""
    round: int                                  # the round, 1-based
    device: int                                 # device id
    device_type: str | None = None              # device type name ("agx", "nx", "tx2", ...)
    p: float | None = None                      # pruning ratio the round planned
    r: int | None = None                        # LoRA rank the round planned
    ratio: float | None = None                  # fraction of prunable parameters removed
    #                                             (reached); None without an update
    completion_time: float | None = _upd()      # s: compute + communication
    compute_time: float | None = _upd()         # s: the local round
    comm_time: float | None = _upd()            # s: download + upload
    waiting_time: float | None = _upd()         # s: round time - completion time
    loss_before: float | None = _upd()          # probe-batch loss before local training
    loss_drop: float | None = _upd()            # probe-batch loss before - after
    lora_importance: float | None = _upd()      # I(B_total), Eq. 14
    reward: float | None = _upd()               # Eq. 3; None when the round did not use it
    aggregation_weight: float | None = _upd()   # c_i (Eq. 16) or data share; None when the
    #                                             weight differs per linear (HETLoRA)
    flops: float | None = _upd()                # FLOPs of the local round
    no_update: str | None = _opt()              # why the device sent no update (gRPC server)
    peak_memory_bytes: int | None = None        # bytes the local round needed at its peak
    fits_memory: bool | None = None             # the round fitted the device's memory
    measured_compute_s: float | None = _opt()   # s, wall clock of the local round
    measured_comm_s: float | None = _opt()      # s, wall clock of the transfers (gRPC)
    accuracy: float | None = None               # local model's accuracy (evaluated rounds)

    def to_json(self) -> dict:
        """The line's JSON object (keys in field order)."""
        return _to_json(self, skip_updates=self.no_update is not None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundRow:
    """The line that closes a round."""
    round: int                                  # the round, 1-based
    summary: bool = dataclasses.field(default=True, init=False)   # marks a round line
    clock: float                                # s since the run started (run's clock)
    round_time: float                           # s: the slowest update's completion time
    wall_time_s: float | None = _opt()          # s, wall clock the round was open (gRPC)
    wall_clock: float | None = _opt()           # s, wall clock of all rounds so far (gRPC)
    close_reason: str | None = _opt()           # what closed the round (gRPC)
    devices: list | None = _opt()               # ids of the devices whose updates it used
    stragglers: list | None = _opt()            # ids of the devices that had not answered
    no_update: list | None = _opt()             # ids of the devices that sent no update
    waiting_time: float | None = None           # s: mean of round time - completion time
    mean_sparsity: float | None = None          # mean ratio of the devices' models
    accuracy: float | None = None               # mean device accuracy (evaluated rounds)
    overhead_s: dict | None = _opt()            # s of server work per phase (gRPC)

    def to_json(self) -> dict:
        """The line's JSON object (keys in field order)."""
        return _to_json(self, skip_updates=False)


MetricsRow = DeviceRow | RoundRow


def _to_json(row: MetricsRow, skip_updates: bool) -> dict:
    out = {}
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        when = f.metadata.get("write")
        if (when == "opt" and value is None) or (when == "upd" and skip_updates):
            continue
        out[f.name] = value
    return out


def from_json(obj: dict) -> MetricsRow:
    """The row of one parsed line (a :class:`RoundRow` when it has ``"summary": true``).

    Raises:
      MetricsError: not an object, a key the schema does not know, or no ``round``.
    """
    if not isinstance(obj, dict):
        raise MetricsError(f"not a JSON object: {obj!r}")
    cls = RoundRow if obj.get("summary") else DeviceRow
    unknown = sorted(set(obj) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise MetricsError(f"unknown key(s) {unknown} in a {cls.__name__} line")
    try:
        return cls(**{k: v for k, v in obj.items() if k != "summary"})
    except TypeError as e:   # a required field is missing
        raise MetricsError(f"not a {cls.__name__} ({e})") from None


def read_metrics(path: str | Path) -> list[MetricsRow]:
    """Every row of a ``metrics.jsonl``, in file order (blank lines skipped).

    Raises:
      MetricsError: a line that is not valid JSON or not a row of this schema (the message
        names the file and the line).
    """
    rows = []
    for k, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricsError(f"{str(path)!r} line {k} is not valid JSON ({e})") from None
        try:
            rows.append(from_json(obj))
        except MetricsError as e:
            raise MetricsError(f"{str(path)!r} line {k}: {e}") from None
    return rows


def append_metrics(path: Path, rows: list[MetricsRow]) -> None:
    """Append rows (one JSON object per line) to a run's ``metrics.jsonl``.

    Raises:
      StorageError: the file cannot be written (disk full, read-only, gone); a line cut
        short is dropped on resume (:func:`truncate_metrics`), with every line after the
        newest checkpoint.
    """
    try:
        with open(path, "a") as f:
            f.writelines(json.dumps(row.to_json()) + "\n" for row in rows)
    except OSError as e:
        raise StorageError(f"cannot write {str(path)!r}: {e.strerror or e}") from e


def truncate_metrics(path: Path, last_round: int) -> None:
    """Drop the lines of rounds after the checkpoint (they will be written again) and a line
    cut short by a killed process."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if from_json(obj).round <= last_round:
            keep.append(ln)
    path.write_text("".join(x + "\n" for x in keep))
