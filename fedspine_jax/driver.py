"""What both transports do around a device's local round: task in, update out, metrics.

Design note
-----------
A device's task (``federation.DeviceTask``) carries its record (masks, carried importance,
data-stream position); :func:`device_input` turns it into the local round's input exactly
the same way in the simulator and in a device agent, and :func:`device_update` turns the
round's result into the ``DeviceUpdate`` the federation accepts, which in turn carries the
device's new record. ``metrics.jsonl`` is written, read and repaired on resume by the same
functions for both transports: :func:`device_rows` builds the device lines of a round, and
the rows' schema, writer and reader live in :mod:`fedspine_jax.metrics` (no JAX, so the
report reads it too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedspine_jax import data
from fedspine_jax.config import Config
from fedspine_jax.federation import DeviceTask, DeviceUpdate, RoundReport
from fedspine_jax.metrics import DeviceRow, RoundRow, read_metrics
from fedspine_jax.train import LocalRoundResult, RoundInput


def device_input(cfg: Config, task: DeviceTask, train: data.Examples,
                 holdout: data.Examples) -> RoundInput:
    """The local round's input for ``task``: its plan, the global LoRA and head, its record's
    masks and carried importance (None before its first round), its data stream from the
    recorded position and a fixed probe batch (from its held-out examples, or its training
    examples when it holds none out)."""
    rec, bs = task.record, cfg.train.batch_size
    batches = data.Batches(train, bs, cfg.federation.seed * 1000 + task.device_id,
                           epoch=int(rec["stream"][0]), position=int(rec["stream"][1]))
    src = holdout if len(holdout) else train
    probe = data.collate(src, np.arange(min(len(src), bs)), bs)
    scored = bool(rec["scored"])
    return RoundInput(task.lora, task.head, rec["head_masks"], rec["channel_masks"],
                      task.ratio, batches, probe,
                      rec["head_importance"] if scored else None,
                      rec["channel_importance"] if scored else None)


def stream_after(inp: RoundInput) -> tuple[int, int]:
    """(epoch, position) of the input's data stream once the round has drawn its batches."""
    st = inp.batches.state()
    return int(st["epoch"]), int(st["position"])


def device_update(task: DeviceTask, inp: RoundInput, res: LocalRoundResult,
                  num_samples: int, compute_time_s: float, comm_time_s: float
                  ) -> DeviceUpdate:
    """The update a device sends after its round (times: the clock the run charges)."""
    return DeviceUpdate(
        device_id=task.device_id, round=task.round, lora=res.lora, head=res.head,
        head_masks=res.head_masks, channel_masks=res.channel_masks,
        head_importance=res.head_importance, channel_importance=res.channel_importance,
        stream=stream_after(inp), num_samples=int(num_samples),
        loss_before=res.loss_before, loss_after=res.loss_after,
        lora_importance=res.lora_importance, ratio=res.ratio,
        compute_time_s=float(compute_time_s), comm_time_s=float(comm_time_s),
        flops=res.flops, peak_memory_bytes=int(res.peak_memory_bytes),
        params_alive=int(res.params_alive))


def device_rows(updates: list[DeviceUpdate], report: RoundReport, device_types,
                round_time: float, accuracy=None, fits_memory=None, measured=None
                ) -> list[DeviceRow]:
    """``metrics.jsonl``'s device lines of a closed round, one per update (both transports).

    Args:
      updates: the round's updates, in the order to write (the simulator passes those of
        devices that ran out of memory too, with ``fits_memory`` False for them).
      report: the round's :class:`~fedspine_jax.federation.RoundReport` (plan, rewards,
        aggregation weights).
      device_types: (N,) type names; round_time: the round's length (simulated clock).
      accuracy: (N,) the devices' accuracies when the round was evaluated, else None.
      fits_memory: (N,) bools, default all True.
      measured: ``{device: {field: seconds}}`` wall-clock measurements to add to a line
        (``measured_compute_s``, ``measured_comm_s``).
    """
    rewards = dict(zip(report.device_ids.tolist(), report.rewards.tolist()))
    weights = dict(zip(report.device_ids.tolist(), report.weights.tolist()))
    rows = []
    for u in updates:
        i = u.device_id
        rows.append(DeviceRow(
            round=report.round, device=i, device_type=device_types[i],
            p=float(report.p[i]), r=int(report.r[i]), ratio=u.ratio,
            completion_time=u.completion_time_s, compute_time=u.compute_time_s,
            comm_time=u.comm_time_s, waiting_time=round_time - u.completion_time_s,
            loss_before=u.loss_before, loss_drop=u.loss_drop,
            lora_importance=u.lora_importance, reward=rewards.get(i),
            aggregation_weight=_finite(weights.get(i)), flops=u.flops,
            peak_memory_bytes=u.peak_memory_bytes,
            fits_memory=True if fits_memory is None else bool(fits_memory[i]),
            **(measured or {}).get(i, {}),
            accuracy=None if accuracy is None else float(accuracy[i])))
    return rows


def _finite(x):
    """``x`` as a float, or None when missing or not finite (JSON has no NaN)."""
    return None if x is None or not np.isfinite(x) else float(x)


def summarize(out: Path, cfg: Config) -> dict:
    """Summary figures of a run from its ``metrics.jsonl`` (both transports)."""
    rows = read_metrics(out / "metrics.jsonl")
    rounds = [r for r in rows if isinstance(r, RoundRow)]
    evals = [r for r in rounds if r.accuracy is not None]
    target = cfg.federation.target_accuracy
    hit = next((r for r in evals if target and r.accuracy >= target), None)
    devs = [r for r in rows if isinstance(r, DeviceRow)]
    return {
        "method": cfg.federation.strategy, "seed": cfg.federation.seed, "rounds": len(rounds),
        "final_accuracy": evals[-1].accuracy if evals else None,
        "final_sparsity": rounds[-1].mean_sparsity if rounds else None,
        "simulated_time_s": rounds[-1].clock if rounds else 0.0,
        "target_accuracy": target or None,
        "time_to_target_s": hit.clock if hit else None,
        "mean_waiting_time_s": float(np.mean([r.waiting_time for r in rounds])) if rounds
        else None,
        "training_peak_memory_bytes": max((r.peak_memory_bytes for r in devs
                                           if r.fits_memory), default=None),
    }
