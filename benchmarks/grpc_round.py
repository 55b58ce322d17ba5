"""gRPC round with many devices: the server's per-round overhead and the bytes on the wire.

A real ``fedspine server`` process (MiniLM-L6 on SST-2, ``configs/sst2_minilm.yaml`` with
``--devices`` devices in the High scenario) and ``--devices`` device agents on loopback.

FAST-COMPUTE MODE (this benchmark only): the agents skip training. Each is a thread of
this process with its own gRPC channel that registers, fetches its task, and uploads a
stand-in update of exactly the right shapes (the task's own LoRA factors, head and masks,
with plausible statistics), so a round costs only what the server and the wire cost.

Figures, per round (JSON on stdout):

* ``round_wall_s``: from the round's opening (first task served) to its close, server side;
* ``server_overhead_s``: what the server adds on top of the devices' work -- the time it
  spends handling updates under its lock (validation by ``Federation.accept``, mask checks,
  the fsync'd journal write; summed over the round's updates), plus the gap the agents see
  between the last acknowledged upload of the round and the first task of the next one
  (``close`` = aggregation and bandit update, ``plan``, checkpoint), with the server's
  own breakdown;
* ``wire_bytes``: protobuf message bytes of all tasks and uploads, plus gRPC's 5-byte
  message prefix (HTTP/2 frame headers and TLS are not counted); ``payload_bytes``: the raw
  tensor bytes inside them;
* the peer in the same run: a full-model FedAvg round moving the model's parameters
  (counted from the model the server builds) down to and up from every device, float32.

``python benchmarks/grpc_round.py`` (80 devices, 3 measured rounds; round 1 includes jit
compilation, the ``steady_*`` figures are medians of the later rounds); ``--devices``,
``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from fedspine_jax.server import auth, wire
from fedspine_jax.server import fedspine_pb2 as pb
from fedspine_jax.server import fedspine_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
GRPC_PREFIX = 5  # bytes gRPC puts before every message (compressed flag + length)


class StandInAgent(threading.Thread):
    """A device that answers every task at once with a right-shaped stand-in update."""

    def __init__(self, i: int, port: int, token: str, digest: str, log: dict, lock,
                 rounds: int):
        super().__init__(daemon=True)
        self.i, self.port, self.token, self.digest = i, port, token, digest
        self.rounds = rounds
        self.log, self.lock = log, lock
        self.error = None

    def record(self, rnd: int, key: str, value, how=max):
        with self.lock:
            r = self.log.setdefault(rnd, {})
            r[key] = value if key not in r else how(r[key], value)

    def run(self):
        try:
            self._run()
        except Exception as e:  # reported by the main thread
            self.error = e

    def _run(self):
        ch = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=wire.channel_options())
        stub = pb_grpc.FederationStub(ch)
        md = auth.bearer(self.token)
        stub.Register(pb.RegisterRequest(device_id=self.i, config_digest=self.digest),
                      metadata=md, timeout=120)
        while True:
            frames = list(stub.FetchTask(pb.FetchTaskRequest(device_id=self.i, wait_s=25),
                                         metadata=md, timeout=300))
            t_task = time.monotonic()
            h = frames[0].header
            if h.status == pb.DONE:
                return
            if h.status != pb.READY:
                continue
            if h.round > self.rounds:  # the measured rounds are over (see main)
                self.record(h.round, "first_task", t_task, min)
                return
            down = sum(f.ByteSize() + GRPC_PREFIX for f in frames)
            tensors = wire.assemble([f.chunk for f in frames[1:]], 1 << 40)
            for name in wire.IMPORTANCE:  # a device always reports the importance it measured
                tensors.setdefault(name, np.zeros_like(tensors[name.replace("importance",
                                                                            "masks")]))
            up_frames = [pb.UpdateFrame(header=pb.UpdateHeader(
                device_id=self.i, round=h.round, num_tensors=len(tensors)))]
            up_frames += [pb.UpdateFrame(chunk=c) for c in wire.dict_chunks(tensors)]
            up_frames.append(pb.UpdateFrame(stats=pb.UpdateStats(
                num_samples=50, loss_before=0.70, loss_after=0.69 - 1e-4 * self.i,
                lora_importance=1.0 + 0.01 * self.i, ratio=h.ratio,
                compute_time_s=1.0 + 0.01 * self.i, comm_time_s=0.1, flops=1e9)))
            up = sum(f.ByteSize() + GRPC_PREFIX for f in up_frames)
            stub.UploadUpdate(iter(up_frames), metadata=md, timeout=300)
            t_ack = time.monotonic()
            payload = sum(v.nbytes for v in tensors.values())
            self.record(h.round, "first_task", t_task, min)
            self.record(h.round, "last_ack", t_ack, max)
            for key, v in (("down", down), ("up", up), ("payload", 2 * payload), ("n", 1)):
                self.record(h.round, key, v, lambda a, b: a + b)


def count_model_params(cfg) -> int:
    """Frozen parameters + task head of the run's model (no LoRA, no masks)."""
    from flax import nnx

    from fedspine_jax.experiment import build_model_for

    model = build_model_for(cfg, 2)
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return int(sum(x.size for x in __import__("jax").tree.leaves(state)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default=str(REPO / "configs" / "sst2_minilm.yaml"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2"))
    args = ap.parse_args(argv)

    from fedspine_jax.config import load_config
    from fedspine_jax.server.wire import config_digest

    # The server is configured one round longer than measured and stopped once the agents
    # have seen that round's task: the final round's evaluation of every device's model
    # (done once per run, or every federation.eval_every rounds) stays out of the figures.
    sets = [f"federation.num_devices={args.devices}", f"federation.rounds={args.rounds + 1}",
            "federation.eval_every=0", f"data.source={args.data}", "devices.scenario=high"]
    cfg = load_config(args.config, sets)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        auth.write_tokens(tmp / "tokens", args.devices)
        log_path = tmp / "server.log"
        t0 = time.monotonic()
        with open(log_path, "wb") as logf:
            server = subprocess.Popen(
                [sys.executable, "-m", "fedspine_jax.cli", "server", args.config,
                 *[a for s in sets for a in ("--set", s)], "--listen", "127.0.0.1:0",
                 "--tokens", str(tmp / "tokens" / "tokens.json"), "--out", str(tmp / "run"),
                 "--linger-s", "10"], stdout=logf, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
            try:
                port = None
                while port is None:
                    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
                    if m:
                        port = int(m.group(1))
                    elif server.poll() is not None or time.monotonic() - t0 > 600:
                        raise RuntimeError("server did not start:\n" + log_path.read_text())
                    else:
                        time.sleep(0.2)
                startup_s = time.monotonic() - t0
                rounds_log, lock = {}, threading.Lock()
                digest = config_digest(cfg)
                agents = [StandInAgent(i, port, auth.read_token(
                    tmp / "tokens" / f"device_{i}.token"), digest, rounds_log, lock,
                    args.rounds) for i in range(args.devices)]
                for a in agents:
                    a.start()
                for a in agents:
                    a.join(900)
                errors = [repr(a.error) for a in agents if a.error is not None]
                if errors:
                    raise RuntimeError(f"{len(errors)} agents failed: {errors[:3]}")
                server.send_signal(signal.SIGTERM)
                server.wait(120)
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()
        text = log_path.read_text()
        rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()
                if x]
    summaries = {r["round"]: r for r in rows if r.get("summary")}
    ckpt = [float(x) for x in re.findall(r"checkpoint ([\d.]+) s", text)]
    params = count_model_params(cfg)
    fedavg_round_bytes = 2 * args.devices * params * 4
    per_round = []
    for t in range(1, args.rounds + 1):
        s, c = summaries[t], rounds_log[t]
        gap = rounds_log[t + 1]["first_task"] - c["last_ack"]
        wire_bytes = c["down"] + c["up"]
        per_round.append({
            "round": t, "devices_reported": len(s["devices"]), "close_reason": s["close_reason"],
            "round_wall_s": s["wall_time_s"],
            "server_overhead_s": s["overhead_s"]["accept"] + gap,
            "update_handling_s": s["overhead_s"]["accept"],
            "between_rounds_gap_s": gap,
            "server_breakdown_s": {**s["overhead_s"], "checkpoint": ckpt[t - 1]
                                   if t - 1 < len(ckpt) else None},
            "wire_bytes": wire_bytes, "download_bytes": c["down"], "upload_bytes": c["up"],
            "payload_bytes": c["payload"],
            "wire_vs_fedavg_full_model": wire_bytes / fedavg_round_bytes})
    steady = [r for r in per_round if r["round"] > 1] or per_round  # round 1 compiles
    out = {
        "benchmark": "grpc_round", "mode": "fast-compute (stand-in updates, no training)",
        "devices": args.devices, "rounds": args.rounds, "model": cfg.model.source,
        "lora_rank": cfg.lora.rank, "rank_choices": list(cfg.lora.rank_choices),
        "server_startup_s": startup_s, "model_params": params,
        "fedavg_full_model_bytes_per_round": fedavg_round_bytes,
        "per_round": per_round,
        "median_wire_bytes_per_round": statistics.median(r["wire_bytes"] for r in per_round),
        "median_wire_vs_fedavg": statistics.median(r["wire_vs_fedavg_full_model"]
                                                   for r in per_round),
        "protobuf_overhead": statistics.median(r["wire_bytes"] / r["payload_bytes"] - 1
                                               for r in per_round),
        "steady_server_overhead_s": statistics.median(r["server_overhead_s"] for r in steady),
        "steady_round_wall_s": statistics.median(r["round_wall_s"] for r in steady),
        "steady_overhead_share_of_round": statistics.median(
            r["server_overhead_s"] / (r["round_wall_s"] + r["between_rounds_gap_s"])
            for r in steady),
        "cpu_count": os.cpu_count(), "numpy": np.__version__, "grpc": grpc.__version__,
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
