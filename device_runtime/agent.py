"""The device agent: fetch a task, run the local round, upload, repeat.

Design note
-----------
The agent is the remote twin of one device of ``fedspine_jax.simulation``: it builds the
run's model and its own data partition with ``experiment.setup`` (device ``i`` gets
partition ``i``), and every round runs the same ``train.local_rounds`` on the same input
the simulator builds (``driver.device_input``) -- the task's LoRA (already shrunk to r_i by
the server's ``Federation.plan``), head, pruning ratio and the device's record: its masks,
the importance it measured in its previous round (which this round prunes with) and the
position of its data stream. The record comes *from the server* with every task (the
server keeps it in the federation state and replaces it from each accepted update), so the
agent keeps no state between rounds: killed and restarted, or moved to another machine, it
continues exactly where the server's record says.

Times. The scheduler needs T_i = T_comp + T_comm. Measured: T_comp is the wall clock of
the tau training steps (``LocalRoundResult.compute_time_s``: jit compilation, which
happens once per shape bucket, is excluded), T_comm the wall clock of downloading the
task plus uploading the update's tensors (the statistics travel after the tensors, so
the upload's own duration is in them). With ``federation.simulated_clock: true`` the agent
reports the simulated clock's times instead -- ``heterogeneity.completion_time`` of the
run's fleet for this device, FLOPs and LoRA bytes -- and, like the simulator, sends no
update (an ``OUT_OF_MEMORY`` status) when the round's estimated peak memory exceeds the
device's; then a gRPC run reproduces the simulator's run. The measured times are always
sent too, for the logs.

Connection. Every call retries transient failures (server down or restarting, network
loss) with exponential backoff and jitter (``Backoff``), re-registering after each
failure; it gives up after ``Backoff.give_up_s`` of continuous failure. An upload that
failed in transit is re-sent as is (the server recognises a duplicate of an update it
already journaled); an upload refused as stale (the round closed without it) is dropped.
Refusals of the token or of the config are fatal.

The model. When the run is over the server exports every device's model to ONNX;
:meth:`DeviceAgent.fetch_model` downloads this device's own over ``FetchModel`` (checking
every file's size and sha256; files already held with the right digest are not sent again)
and :meth:`DeviceAgent.prepare_engine` builds its TensorRT engine -- engines are specific to
the GPU -- into a cache keyed by the model's digest, the TensorRT version and the GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path

import grpc

from fedspine_jax import driver, experiment, heterogeneity
from fedspine_jax.config import Config
from fedspine_jax.server import auth, wire
from fedspine_jax.server import fedspine_pb2 as pb
from fedspine_jax.server import fedspine_pb2_grpc as pb_grpc
from fedspine_jax.federation import DeviceTask
from fedspine_jax.train import local_rounds

log = logging.getLogger("fedspine.device")

AGENT_VERSION = "fedspine-jax-agent/1"
# RESOURCE_EXHAUSTED: the server is at its limit of concurrent calls (for this device, or
# in all); an honest agent never sends an upload over the byte limit.
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.RESOURCE_EXHAUSTED}
FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class AgentError(RuntimeError):
    """The agent cannot go on (refused token or config, or the server is gone for good)."""


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Reconnection policy: wait ``min(max_s, base_s * 2**k)`` times a jitter in [0.5, 1]
    before the k-th retry; give up after ``give_up_s`` of continuous failure."""
    base_s: float = 0.5
    max_s: float = 10.0
    give_up_s: float = 600.0

    def delay(self, k: int, rng: random.Random) -> float:
        return min(self.max_s, self.base_s * 2 ** k) * rng.uniform(0.5, 1.0)


class DeviceAgent:
    """One device of a run, talking to the server at ``target``.

    Args:
      cfg: the run's config (the server refuses a device whose config differs, apart from
        ``data.source``).
      device_id: this device's id (its data partition and its token's owner).
      target: ``HOST:PORT`` of the server.
      token: the device's bearer token.
      credentials: TLS channel credentials (``auth.channel_credentials``); None: insecure.
      server_name: expected name in the server's certificate, when it differs from HOST.
      backoff: reconnection policy.
      wait_s: how long one fetch long-polls for the next round.
    """

    def __init__(self, cfg: Config, device_id: int, target: str, token: str,
                 credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None, backoff: Backoff = Backoff(),
                 wait_s: float = 20.0):
        n = cfg.federation.num_devices
        if not 0 <= device_id < n:
            raise ValueError(f"device id {device_id} outside 0..{n - 1}")
        self.cfg, self.i, self.target, self.token = cfg, int(device_id), target, token
        self.credentials, self.server_name = credentials, server_name
        self.backoff, self.wait_s = backoff, wait_s
        self.digest = wire.config_digest(cfg)
        self._rng = random.Random()
        self._channel = None
        self._stub = None
        self._registered = False
        self.chunk_bytes = wire.CHUNK_BYTES
        self.rounds_done = 0
        self.s = None

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> None:
        if self._channel is not None:
            self._channel.close()
        opts = wire.channel_options()
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        self._channel = (grpc.secure_channel(self.target, self.credentials, options=opts)
                         if self.credentials is not None
                         else grpc.insecure_channel(self.target, options=opts))
        self._stub = pb_grpc.FederationStub(self._channel)
        self._registered = False

    def _md(self):
        return auth.bearer(self.token)

    def _register(self) -> None:
        try:
            r = self._stub.Register(pb.RegisterRequest(
                device_id=self.i, config_digest=self.digest, agent_version=AGENT_VERSION),
                metadata=self._md(), timeout=30)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise AgentError(f"server refused the registration: {e.details()}") from None
            raise
        self.chunk_bytes = int(r.chunk_bytes) or wire.CHUNK_BYTES
        self._registered = True
        log.info("device %d registered with %s: %d devices, %d rounds, server at round %d",
                 self.i, self.target, r.num_devices, r.rounds, r.current_round)

    def call(self, what: str, fn):
        """Run ``fn()`` (an RPC), reconnecting with backoff on transient failures."""
        first_failure, k = None, 0
        while True:
            try:
                if self._stub is None:
                    self._connect()
                if not self._registered:
                    self._register()
                return fn()
            except grpc.RpcError as e:
                code = e.code()
                if code in FATAL:
                    raise AgentError(f"{what}: {code.name}: {e.details()}") from None
                if code == grpc.StatusCode.ABORTED:  # the server restarted: register again
                    self._registered = False
                    continue
                if code not in TRANSIENT:
                    raise
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.backoff.give_up_s:
                    raise AgentError(f"{what}: server unreachable for "
                                     f"{now - first_failure:.0f} s, giving up") from None
                delay = self.backoff.delay(k, self._rng)
                k += 1
                log.warning("device %d: %s failed (%s: %s); retrying in %.1f s", self.i, what,
                            code.name, (e.details() or "")[:120], delay)
                time.sleep(delay)
                self._connect()

    # -- one round ----------------------------------------------------------------------------

    def _fetch(self):
        """(header, tensors, download seconds, bytes received) of one FetchTask call."""
        frames = self._stub.FetchTask(pb.FetchTaskRequest(device_id=self.i, wait_s=self.wait_s),
                                      metadata=self._md(), timeout=self.wait_s + 120)
        header, t0, nbytes = None, None, 0
        asm = wire.TensorAssembler(1 << 62)
        for fr in frames:
            nbytes += fr.ByteSize()
            if header is None:
                header, t0 = fr.header, time.perf_counter()
            else:
                asm.add(fr.chunk)
        return header, asm.finish(), time.perf_counter() - (t0 or time.perf_counter()), nbytes

    def _status(self, round_t: int, state, message: str = "", stream=(0, 0),
                retry: bool = False) -> None:
        req = pb.StatusReport(device_id=self.i, round=round_t, state=state, message=message,
                              stream_epoch=int(stream[0]), stream_position=int(stream[1]))
        if retry:
            self.call("status", lambda: self._stub.ReportStatus(req, metadata=self._md(),
                                                                timeout=30))
            return
        try:  # best effort: do not hold training back for a log line
            self._stub.ReportStatus(req, metadata=self._md(), timeout=5)
        except grpc.RpcError:
            pass

    def setup(self) -> None:
        """Build the model, the fleet and this device's data (``experiment.setup``)."""
        self.s = experiment.setup(self.cfg)
        d = self.s.devices[self.i]
        self.train_ex = self.s.task.train.take(d.train_idx)
        self.hold_ex = self.s.task.train.take(d.holdout_idx)
        log.info("device %d: %d training examples, %d held out (%s)", self.i,
                 len(self.train_ex), len(self.hold_ex), self.s.fleet.type_names[self.i])

    def run_round(self, header, tensors, download_s: float) -> None:
        """Train on the task and upload the update (or report why there is none)."""
        cfg, i, t = self.cfg, self.i, int(header.round)
        lora, head, other = wire.split_payload(tensors)
        record = wire.record_from_tensors(other)
        record["scored"] = record["head_importance"] is not None
        record["stream"] = (int(header.stream_epoch), int(header.stream_position))
        task = DeviceTask(i, t, float(header.ratio), int(header.rank), lora, head, record)
        inp = driver.device_input(cfg, task, self.train_ex, self.hold_ex)
        log.info("device %d: round %d: training (pruned first to p=%.3f; r=%d)", i, t,
                 header.ratio, header.rank)
        self._status(t, pb.TRAINING)
        res = local_rounds(self.s.model, [inp], cfg,
                           criterion=self.s.fed.strategy.criterion)[0]
        stream = driver.stream_after(inp)
        sim = None
        if cfg.federation.simulated_clock:
            nbytes = experiment.lora_bytes(lora)
            times = heterogeneity.completion_time(self.s.fleet, t - 1, res.flops, nbytes,
                                                  nbytes)
            if not heterogeneity.fits_memory(self.s.fleet, res.peak_memory_bytes)[i]:
                log.warning("device %d: round %d needs %.0f MB, more than the simulated "
                            "device's memory: no update", i, t, res.peak_memory_bytes / 2**20)
                self._status(t, pb.OUT_OF_MEMORY, "simulated memory exceeded", stream,
                             retry=True)
                return
            sim = (float(times.comp[i]), float(times.comm[i]))
        tensors_up = wire.join_payload(res.lora, res.head, head_masks=res.head_masks,
                                       channel_masks=res.channel_masks,
                                       head_importance=res.head_importance,
                                       channel_importance=res.channel_importance)

        def frames():
            yield pb.UpdateFrame(header=pb.UpdateHeader(device_id=i, round=t,
                                                        num_tensors=len(tensors_up)))
            t0 = time.perf_counter()
            for c in wire.dict_chunks(tensors_up, self.chunk_bytes):
                yield pb.UpdateFrame(chunk=c)
            comm = download_s + (time.perf_counter() - t0)
            comp_s, comm_s = sim if sim is not None else (res.compute_time_s, comm)
            yield pb.UpdateFrame(stats=pb.UpdateStats(
                num_samples=len(self.train_ex), loss_before=res.loss_before,
                loss_after=res.loss_after, lora_importance=res.lora_importance,
                ratio=res.ratio, compute_time_s=comp_s, comm_time_s=comm_s, flops=res.flops,
                peak_memory_bytes=int(res.peak_memory_bytes),
                params_alive=int(res.params_alive), stream_epoch=int(stream[0]),
                stream_position=int(stream[1]), measured_compute_s=res.compute_time_s,
                measured_comm_s=comm))

        try:
            reply = self.call("upload", lambda: self._stub.UploadUpdate(
                frames(), metadata=self._md(), timeout=300))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                log.warning("device %d: round %d: update not taken: %s", i, t, e.details())
                return
            log.error("device %d: round %d: update refused: %s: %s", i, t, e.code().name,
                      e.details())
            self._status(t, pb.FAILED, f"{e.code().name}: {e.details()}", retry=True)
            return
        self.rounds_done += 1
        log.info("device %d: round %d: update %s (loss %.4f -> %.4f, pruned %.3f, T=%.4g s)",
                 i, t, "already held by the server" if reply.duplicate else "accepted",
                 res.loss_before, res.loss_after, res.ratio,
                 sum(sim) if sim is not None else res.compute_time_s)

    # -- the model, once the run is over ----------------------------------------------------

    def _fetch_model_once(self, dest: Path):
        """One FetchModel call: the ModelHeader once the files are in ``dest``, or None
        while the server is still exporting."""
        from fedspine_jax.export.metadata import sha256_file

        frames = self._stub.FetchModel(pb.FetchModelRequest(device_id=self.i,
                                                            wait_s=self.wait_s),
                                       metadata=self._md(), timeout=self.wait_s + 3600)
        first = next(frames, None)
        if first is None or first.WhichOneof("frame") != "header":
            raise AgentError("malformed FetchModel reply (no header first)")
        head = first.header
        if head.status != pb.MODEL_READY:
            frames.cancel()
            return None
        for f in head.files:
            if not f.name or "/" in f.name or "\\" in f.name or f.name.startswith("."):
                raise AgentError(f"the server sent a bad model file name {f.name!r}")
        if all((dest / f.name).is_file() and (dest / f.name).stat().st_size == f.size
               and sha256_file(dest / f.name) == f.sha256 for f in head.files):
            frames.cancel()  # already held (an earlier fetch)
            log.info("device %d: model files already up to date in %s", self.i, dest)
            return head
        parts = [(f, dest / (f.name + ".part")) for f in head.files]
        k, out, written = 0, None, 0
        try:
            for fr in frames:
                data = fr.data
                while data:
                    while k < len(parts) and written == parts[k][0].size:  # file k complete
                        if out is not None:
                            out.close()
                            out = None
                        k, written = k + 1, 0
                    if k == len(parts):
                        raise AgentError("the server sent more model bytes than announced")
                    if out is None:
                        out = open(parts[k][1], "wb")
                    take = data[:parts[k][0].size - written]
                    out.write(take)
                    written += len(take)
                    data = data[len(take):]
        finally:
            if out is not None:
                out.close()
        for f, part in parts:
            if not part.exists() and f.size == 0:
                part.write_bytes(b"")
            size = part.stat().st_size if part.exists() else -1
            if size != f.size or sha256_file(part) != f.sha256:
                raise AgentError(f"model file {f.name}: received {size} bytes whose sha256 "
                                 f"does not match the server's ({f.size} bytes, "
                                 f"{f.sha256[:12]}...)")
        for f, part in parts:
            part.replace(dest / f.name)
        return head

    def fetch_model(self, dest: str | Path) -> Path:
        """Download this device's exported model into ``dest``; returns its ``.onnx``.

        Waits while the server exports; raises :class:`AgentError` when the run is not over
        or the server has no model for this device.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                head = self.call("fetch model", lambda: self._fetch_model_once(dest))
            except grpc.RpcError as e:
                raise AgentError(f"fetch model: {e.code().name}: {e.details()}") from None
            if head is None:
                log.info("device %d: the server is still exporting the models", self.i)
                continue
            onnx = next(f.name for f in head.files if f.name.endswith(".onnx"))
            log.info("device %d: model of round %d in %s (%s, %.2f MiB)", self.i, head.round,
                     dest, ", ".join(f.name for f in head.files),
                     sum(f.size for f in head.files) / 2**20)
            return dest / onnx

    def prepare_engine(self, onnx_path: str | Path, cache_dir: str | Path) -> Path | None:
        """This GPU's TensorRT engine for the fetched model (built once, cached), or None
        without TensorRT (serve the ONNX file with ONNX Runtime then)."""
        from fedspine_jax.export import tensorrt

        if not tensorrt.available():
            log.warning("device %d: TensorRT is not installed: serving %s with ONNX Runtime "
                        "(%s)", self.i, Path(onnx_path).name, tensorrt.INSTALL_HINT)
            return None
        path = tensorrt.cached_engine(onnx_path, cache_dir, fp16=self.cfg.export.fp16)
        log.info("device %d: TensorRT engine %s", self.i, path)
        return path

    def run(self) -> int:
        """Serve rounds until the server says the run is over; return an exit status."""
        if self.s is None:
            self.setup()
        while True:
            header, tensors, download_s, _ = self.call("fetch task", self._fetch)
            if header.status == pb.DONE:
                log.info("device %d: the run is over (%d rounds trained here)", self.i,
                         self.rounds_done)
                return 0
            if header.status != pb.READY:
                continue
            log.info("device %d: round %d: task received", self.i, header.round)
            self.run_round(header, tensors, download_s)
