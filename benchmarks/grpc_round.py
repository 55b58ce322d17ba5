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

MISBEHAVING CLIENTS (``--misbehaving M``): two runs one after the other, each with its own
server process and the same config of ``--devices`` + M devices whose quorum is the
``--devices`` honest ones (so a round closes on the honest devices' updates alone and the
M others never hold it open). In the *clean* run the M devices stay away; in the
*misbehaving* run M clients, each with a valid token of one of them, misbehave from before
the first round to the end: even-numbered ones keep ``calls_per_device + 1`` uploads open
that send a header and then go silent (stalled uploads); odd-numbered ones keep
``calls_per_device + 2`` threads calling ``FetchTask`` (a 30 s long poll once the device
has reported its round as failed) and ``Register`` in a tight loop (floods). They run in a
process of their own (their threads do not take the honest agents' interpreter lock), on
the same machine. ``--stall-s`` is passed to both servers (``fedspine server --stall-s``).
Reported: both runs' full figures, the honest devices' round latency in each (server
side, ``round_wall_s``; and as the honest agents see it, ``honest_round_s``: between the
last honest acknowledgements of consecutive rounds, round 1 from the agents' start), their
ratio, the misbehaving calls' outcomes by status code (``RESOURCE_EXHAUSTED``: refused;
``CANCELLED`` on a stalled upload: cut by the server's stall deadline; ``OK``: served), and
the CPU seconds the server (``server_cpu_s``) and the misbehaving clients' process used
while the honest agents ran (``measured_s``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
        self.refused = 0  # calls refused with RESOURCE_EXHAUSTED (and retried)

    def call(self, fn):
        """``fn()``, retried while the server refuses it for its limits on calls."""
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or self.refused >= 1000:
                    raise
                self.refused += 1
                time.sleep(0.1)

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
        self.call(lambda: stub.Register(pb.RegisterRequest(
            device_id=self.i, config_digest=self.digest), metadata=md, timeout=120))
        while True:
            frames = self.call(lambda: list(stub.FetchTask(pb.FetchTaskRequest(
                device_id=self.i, wait_s=25), metadata=md, timeout=300)))
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
            self.call(lambda: stub.UploadUpdate(iter(up_frames), metadata=md, timeout=300))
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


def misbehave(port: int, clients: list, digest: str, calls_per_device: int, stop, ready,
              results) -> None:
    """Misbehaving clients (``clients``: ``(device id, token)`` pairs, even positions stall
    uploads, odd ones flood) until ``stop`` is set; then put ``{call: {status code: count}}``
    on ``results``. Runs in a process of its own."""
    counts: dict[str, dict[str, int]] = {}
    lock = threading.Lock()
    live = set()  # calls in flight, cancelled at the stop

    def count(kind: str, code: str) -> None:
        if not stop.is_set():  # calls ended by the stop itself are not counted
            with lock:
                counts.setdefault(kind, {})
                counts[kind][code] = counts[kind].get(code, 0) + 1

    def outcome(fn) -> str:
        try:
            fn()
            return "OK"
        except grpc.RpcError as e:
            return e.code().name
        except grpc.FutureCancelledError:
            return "CANCELLED"

    def stalled_uploads(dev, stub, md):
        while not stop.is_set():
            done = threading.Event()

            def frames():  # a header, then silence until the call has ended
                yield pb.UpdateFrame(header=pb.UpdateHeader(device_id=dev, round=1,
                                                            num_tensors=1))
                done.wait()

            fut = stub.UploadUpdate.future(frames(), metadata=md)
            with lock:
                live.add(fut)
            try:
                code = outcome(fut.result)
            finally:
                done.set()
                with lock:
                    live.discard(fut)
            count("stalled_upload", code)

    def flood(dev, stub, md):
        while not stop.is_set():
            it = stub.FetchTask(pb.FetchTaskRequest(device_id=dev, wait_s=30), metadata=md)
            with lock:
                live.add(it)
            frames = []
            try:
                code = outcome(lambda: frames.extend(it))
            finally:
                with lock:
                    live.discard(it)
            count("flood_fetch_task", code)
            if code == "OK" and frames[0].header.status == pb.READY:  # report it failed:
                rnd = frames[0].header.round  # the next FetchTask calls are long polls
                count("flood_report_failed", outcome(lambda: stub.ReportStatus(
                    pb.StatusReport(device_id=dev, round=rnd, state=pb.FAILED,
                                    message="misbehaving client"), metadata=md, timeout=30)))
            count("flood_register", outcome(lambda: stub.Register(pb.RegisterRequest(
                device_id=dev, config_digest=digest), metadata=md, timeout=30)))

    threads = []
    for k, (dev, token) in enumerate(clients):
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.channel_options())
        stub = pb_grpc.FederationStub(ch)
        md = auth.bearer(token)
        stub.Register(pb.RegisterRequest(device_id=dev, config_digest=digest), metadata=md,
                      timeout=120)
        fn, n = (stalled_uploads, calls_per_device + 1) if k % 2 == 0 else \
            (flood, calls_per_device + 2)
        threads += [threading.Thread(target=fn, args=(dev, stub, md), daemon=True)
                    for _ in range(n)]
    for t in threads:
        t.start()
    ready.set()
    cpu0 = time.process_time()
    stop.wait()
    with lock:
        for call in list(live):
            call.cancel()
    for t in threads:
        t.join(10)
    results.put({"calls": counts, "cpu_s": time.process_time() - cpu0})


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(args, cfg, sets: list[str], honest: int, misbehaving: int = 0) -> dict:
    """One run: a ``fedspine server`` process for ``sets`` (``honest + misbehaving``
    devices), ``honest`` stand-in agents, and in a process of their own the misbehaving
    clients (``misbehave``) of the last ``misbehaving`` devices, started before the agents
    and stopped once the agents are done. Returns what the run measured."""
    from fedspine_jax.server.wire import config_digest

    n = honest + misbehaving
    extra = ["--stall-s", str(args.stall_s)] if args.stall_s is not None else []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        auth.write_tokens(tmp / "tokens", n)
        tokens = [auth.read_token(tmp / "tokens" / f"device_{i}.token") for i in range(n)]
        log_path = tmp / "server.log"
        t0 = time.monotonic()
        with open(log_path, "wb") as logf:
            server = subprocess.Popen(
                [sys.executable, "-m", "fedspine_jax.cli", "server", args.config,
                 *[a for s in sets for a in ("--set", s)], "--listen", "127.0.0.1:0",
                 "--tokens", str(tmp / "tokens" / "tokens.json"), "--out", str(tmp / "run"),
                 "--linger-s", "10", *extra], stdout=logf, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
            bad = None
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
                if misbehaving:
                    from fedspine_jax.server.servicer import Limits

                    ctx = multiprocessing.get_context("spawn")
                    stop, ready, results = ctx.Event(), ctx.Event(), ctx.Queue()
                    bad = ctx.Process(target=misbehave, daemon=True, args=(
                        port, [(i, tokens[i]) for i in range(honest, n)], digest,
                        Limits().calls_per_device, stop, ready, results))
                    bad.start()
                    if not ready.wait(300):
                        raise RuntimeError("the misbehaving clients did not start")
                agents = [StandInAgent(i, port, tokens[i], digest, rounds_log, lock,
                                       args.rounds) for i in range(honest)]
                t_agents, server_cpu = time.monotonic(), cpu_s(server.pid)
                for a in agents:
                    a.start()
                for a in agents:
                    a.join(900)
                errors = [repr(a.error) for a in agents if a.error is not None]
                if errors:
                    raise RuntimeError(f"{len(errors)} agents failed: {errors[:3]}")
                t_done, server_cpu = time.monotonic(), cpu_s(server.pid) - server_cpu
                calls = None
                if bad is not None:
                    stop.set()
                    calls = results.get(timeout=120)
                    bad.join(30)
                server.send_signal(signal.SIGTERM)
                server.wait(120)
            finally:
                if bad is not None and bad.is_alive():
                    bad.kill()
                if server.poll() is None:
                    server.kill()
                    server.wait()
        text = log_path.read_text()
        rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()
                if x]
    return {"rounds_log": rounds_log, "rows": rows, "log": text, "startup_s": startup_s,
            "t_agents": t_agents, "honest_refused": sum(a.refused for a in agents),
            "measured_s": t_done - t_agents, "server_cpu_s": server_cpu,
            "misbehaving": calls, "load_average": [load_before, os.getloadavg()]}


def figures(args, cfg, run: dict, params: int) -> dict:
    """The JSON figures of one run (``serve``)."""
    rounds_log, text = run["rounds_log"], run["log"]
    summaries = {r["round"]: r for r in run["rows"] if r.get("summary")}
    ckpt = [float(x) for x in re.findall(r"checkpoint ([\d.]+) s", text)]
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
    return {
        "benchmark": "grpc_round", "mode": "fast-compute (stand-in updates, no training)",
        "devices": args.devices, "rounds": args.rounds, "model": cfg.model.source,
        "lora_rank": cfg.lora.rank, "rank_choices": list(cfg.lora.rank_choices),
        "server_startup_s": run["startup_s"], "model_params": params,
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
        "load_average": run["load_average"],
    }


def honest_latency(args, run: dict, out: dict) -> dict:
    """The honest devices' round latency in one run: server side and as the agents see it."""
    log = run["rounds_log"]
    acks = [run["t_agents"]] + [log[t]["last_ack"] for t in range(1, args.rounds + 1)]
    seen = [b - a for a, b in zip(acks, acks[1:])]
    wall = [r["round_wall_s"] for r in out["per_round"]]
    return {"round_wall_s": wall, "honest_round_s": seen,
            "median_round_wall_s": statistics.median(wall),
            "median_honest_round_s": statistics.median(seen),
            "steady_round_wall_s": statistics.median(wall[1:] or wall),
            "steady_honest_round_s": statistics.median(seen[1:] or seen),
            "close_reasons": [r["close_reason"] for r in out["per_round"]],
            "honest_calls_refused": run["honest_refused"],
            "measured_s": run["measured_s"], "server_cpu_s": run["server_cpu_s"],
            "load_average": run["load_average"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default=str(REPO / "configs" / "sst2_minilm.yaml"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--misbehaving", type=int, default=0, metavar="M",
                    help="also measure a run with M misbehaving clients (see the module note)")
    ap.add_argument("--stall-s", type=float, default=None,
                    help="the servers' stall deadline (fedspine server --stall-s; default: "
                         "the server's)")
    args = ap.parse_args(argv)

    from fedspine_jax.config import load_config

    # The server is configured one round longer than measured and stopped once the agents
    # have seen that round's task: the final round's evaluation of every device's model
    # (done once per run, or every federation.eval_every rounds) stays out of the figures.
    n = args.devices + args.misbehaving
    sets = [f"federation.num_devices={n}", f"federation.rounds={args.rounds + 1}",
            "federation.eval_every=0", f"data.source={args.data}", "devices.scenario=high"]
    if args.misbehaving:  # a round closes once the honest devices' updates are in
        sets.append(f"federation.quorum={(args.devices - 0.5) / n!r}")
    cfg = load_config(args.config, sets)
    if not args.misbehaving:
        run = serve(args, cfg, sets, args.devices)
        out = figures(args, cfg, run, count_model_params(cfg))
    else:
        clean = serve(args, cfg, sets, args.devices)
        bad = serve(args, cfg, sets, args.devices, args.misbehaving)
        params = count_model_params(cfg)
        runs = {"clean": figures(args, cfg, clean, params),
                "misbehaving": figures(args, cfg, bad, params)}
        lat = {k: honest_latency(args, r, runs[k])
               for k, r in (("clean", clean), ("misbehaving", bad))}
        calls = bad["misbehaving"]["calls"]
        out = {
            "benchmark": "grpc_round_misbehaving", "honest_devices": args.devices,
            "misbehaving_clients": args.misbehaving, "config_devices": n,
            "rounds": args.rounds, "stall_s": args.stall_s,
            "honest_latency": lat,
            "ratio_median_round_wall": lat["misbehaving"]["median_round_wall_s"]
            / lat["clean"]["median_round_wall_s"],
            "ratio_steady_round_wall": lat["misbehaving"]["steady_round_wall_s"]
            / lat["clean"]["steady_round_wall_s"],
            "ratio_median_honest_round": lat["misbehaving"]["median_honest_round_s"]
            / lat["clean"]["median_honest_round_s"],
            "ratio_steady_honest_round": lat["misbehaving"]["steady_honest_round_s"]
            / lat["clean"]["steady_honest_round_s"],
            "misbehaving_calls": calls,
            "misbehaving_clients_cpu_s": bad["misbehaving"]["cpu_s"],
            "misbehaving_refused": sum(c.get("RESOURCE_EXHAUSTED", 0) for c in calls.values()),
            "misbehaving_stalled_cut": calls.get("stalled_upload", {}).get("CANCELLED", 0),
            "server_log_stall_cuts": len(re.findall(r"stalled for more than", bad["log"])),
            "runs": runs,
        }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
