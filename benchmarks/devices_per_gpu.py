"""How many MiniLM devices one accelerator trains per round, with the vmapped path.

``train.local_rounds`` runs the tau steps of devices that share a rank and a size bucket as
one vmapped step over their stacked states (``federation.device_batch`` in a simulation).
This script times one local round of ``G`` MiniLM-L6 devices (real SST-2 batches, each
device its own data stream, LoRA rank ``lora.rank`` of ``configs/sst2_minilm.yaml``, no
pruning so all share one bucket) for growing ``G``: the first call compiles and is
reported apart, the second is timed. It stops at the first ``G`` that runs out of memory or
whose round exceeds ``--budget-s``. The peer is ``G = 1`` in the same run: ``speedup`` is
``G * t(1) / t(G)``, how much faster than one device after another.

    python benchmarks/devices_per_gpu.py [--groups 1 8 32 128] [--steps 20]

Prints one JSON object (``device_rounds_per_s`` per group size, the largest size that fit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from fedspine_jax import data as D
from fedspine_jax.config import load_config
from fedspine_jax.models import load_pretrained
from fedspine_jax.models.state import get_head, get_lora
from fedspine_jax.train import RoundInput, initial_masks, local_rounds

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sst2"


def round_inputs(cfg, task, model, n: int) -> list[RoundInput]:
    """``n`` devices with the global LoRA and head, unpruned, each on its own data stream."""
    hm, cm = initial_masks(model.cfg)
    lora, head = get_lora(model), get_head(model)
    b = cfg.train.batch_size
    probe = D.collate(task.train, np.arange(b), b)
    return [RoundInput(lora, head, hm, cm, 0.0, D.Batches(task.train, b, i), probe)
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--steps", type=int, default=20, help="local steps tau (paper: 20)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=60.0,
                    help="stop after a group size whose timed round took longer")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SST-2 JSONL directory")
    args = ap.parse_args()

    cfg = load_config("sst2_minilm", [
        f"data.source={args.data}", f"train.local_steps={args.steps}",
        f"train.batch_size={args.batch}", f"data.max_len={args.seq}",
        f"data.length_buckets=[{args.seq}]", "pruning.target_ratio=0.0",
        f"data.max_train_samples={args.batch * 64}", "data.max_eval_samples=1"])
    model, tok = load_pretrained("minilm-l6", num_labels=2, lora_rank=cfg.lora.rank)
    task = D.load_task(cfg.data, tok, 0)
    rows, largest, stopped = [], 0, ""
    for g in sorted(args.groups):
        try:
            t0 = time.perf_counter()
            local_rounds(model, round_inputs(cfg, task, model, g), cfg, max_batch=g)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            local_rounds(model, round_inputs(cfg, task, model, g), cfg, max_batch=g)
            timed = time.perf_counter() - t0
        except Exception as e:  # an accelerator out of memory ends the scan
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            stopped = f"out of memory at {g} devices"
            break
        largest = g
        rows.append({"devices": g, "first_call_s": round(first, 2), "round_s": round(timed, 3),
                     "device_rounds_per_s": round(g / timed, 2)})
        if timed > args.budget_s:
            stopped = f"round of {g} devices took {timed:.0f} s > --budget-s"
            break
    base = next((r for r in rows if r["devices"] == 1), None)
    for r in rows:
        if base is not None:
            r["speedup"] = round(r["devices"] * base["round_s"] / r["round_s"], 2)
    print(json.dumps({
        "benchmark": "devices_per_gpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
                   f"{jax.devices()[0].device_kind}",
        "model": "minilm-l6", "lora_rank": cfg.lora.rank, "local_steps": args.steps,
        "batch": args.batch, "seq": args.seq, "groups": rows,
        "largest_group_that_fit": largest, "stopped": stopped or "all sizes ran",
    }, indent=2))


if __name__ == "__main__":
    main()
