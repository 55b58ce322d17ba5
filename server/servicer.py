"""The gRPC face of the :class:`~fedspine_jax.server.coordinator.Coordinator`.

Each RPC identifies the device by its bearer token (the interceptor has already refused
unknown tokens), checks that the request's ``device_id`` is that device, translates
between messages and the core's ``DeviceTask`` / ``DeviceUpdate``, and maps refusals to
status codes:

==========================  ====================================================
``UNAUTHENTICATED``         missing or unknown token (interceptor)
``PERMISSION_DENIED``       the request names another device than the token's
``ABORTED``                 not registered in this server's lifetime (restarted?):
                            register, then retry
``FAILED_PRECONDITION``     config mismatch; an update for a round the server is
                            not collecting (stale)
``INVALID_ARGUMENT``        malformed stream (headers, sizes, names), wrong shapes
                            or dtypes, NaN / infinite values, bad statistics or
                            masks, a second and different update for the round
``RESOURCE_EXHAUSTED``      an upload larger than ``max_update_bytes`` (a single
                            message over the gRPC limit is refused by gRPC itself);
                            more than ``Limits.calls_per_device`` calls of one
                            device at once; more than the server's concurrent calls
``CANCELLED``               a stream that sent or took no frame for
                            ``Limits.stall_s`` (cut by the server)
``NOT_FOUND``               FetchModel: no exported model for the device (export
                            off or failed; the message says why)
``UNAVAILABLE``             the server could not store an update or a give-up
                            durably (disk full, ...; logged there): nothing was
                            acknowledged, retry
``INTERNAL``                a fault of the server (logged there in full)
==========================  ====================================================

The error message always names the problem, and never a server path; a refused update
leaves the state unchanged.

Fairness: each device may hold at most ``calls_per_device`` calls at once (counted by its
token, before a byte of the request is read), the thread pool has that many workers per
device plus spares and gRPC refuses calls beyond it, and a watchdog cancels streams that
stall (no frame for ``stall_s``), so one device's stalled uploads or floods of long polls
cannot keep the others from being served. Keepalive pings (``wire.server_options``) find
dead connections.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import re
import threading
import time

import grpc
import jax

from fedspine_jax.errors import StorageError
from fedspine_jax.federation import DeviceUpdate, UpdateRejected
from fedspine_jax.server import auth, wire
from fedspine_jax.server import fedspine_pb2 as pb
from fedspine_jax.server import fedspine_pb2_grpc as pb_grpc
from fedspine_jax.server.coordinator import MAX_WAIT_S, Coordinator, RunDone, StaleUpdate
from fedspine_jax.server.models import NoModel

log = logging.getLogger("fedspine.server")

_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s'\":,/]+/)*[^\s'\":,/]*")


def public(message: str) -> str:
    """``message`` with absolute filesystem paths replaced by ``<path>`` (what a device
    may be told of a server-side error)."""
    return _PATH.sub("<path>", message)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-device fairness limits of the server.

    Attributes:
      calls_per_device: calls one device may have in flight at once (an agent makes one
        at a time; a retry may overlap a call the server has not yet seen end).
      stall_s: a stream that neither delivers nor takes a frame for this long is cut
        (``fedspine server --stall-s``).
      spare_workers: worker threads beyond ``calls_per_device`` per device.
    """
    calls_per_device: int = 3
    stall_s: float = 60.0
    spare_workers: int = 8


class _Call:
    """One call in flight: its device, and since when it waits on the device (None: the
    server is working on it)."""

    def __init__(self, device: int, context, what: str):
        self.device, self.context, self.what = device, context, what
        self.waiting_since: float | None = None
        self.cut = False

    def frames(self, iterator):
        """``iterator``'s items, timing the waits for each."""
        while True:
            self.waiting_since = time.monotonic()
            try:
                item = next(iterator, None)
            finally:
                self.waiting_since = None
            if item is None:
                return
            yield item


class _Calls:
    """The calls in flight: at most ``limits.calls_per_device`` per device, and a watchdog
    thread that cancels a call whose wait on its device exceeds ``limits.stall_s``."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._per_device: dict[int, int] = {}
        threading.Thread(target=self._watch, name="fedspine-call-watchdog",
                         daemon=True).start()

    def enter(self, device: int, context, what: str) -> _Call:
        with self._lock:
            k = self._per_device.get(device, 0)
            if k >= self.limits.calls_per_device:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"device {device} already has {k} calls in flight (at most "
                              f"{self.limits.calls_per_device}); retry when one has ended")
            self._per_device[device] = k + 1
            call = _Call(device, context, what)
            self._calls.add(call)
        return call

    def leave(self, call: _Call) -> None:
        with self._lock:
            self._calls.discard(call)
            self._per_device[call.device] -= 1

    def _watch(self) -> None:
        period = max(0.05, min(1.0, self.limits.stall_s / 4))
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                stalled = [c for c in self._calls if not c.cut and c.waiting_since is not None
                           and now - c.waiting_since > self.limits.stall_s]
            for c in stalled:
                c.cut = True
                log.warning("device %d: %s stalled for more than %.0f s: cut", c.device,
                            c.what, self.limits.stall_s)
                c.context.cancel()


def _guarded(streaming: bool):
    """Run a handler as one of the device's calls in flight (``_Calls``), passing it the
    ``_Call``; an exception that is not a deliberate refusal becomes ``INTERNAL`` with its
    type only (the traceback goes to the server's log, paths and all)."""

    def fail(self, context, e: Exception, name: str) -> None:
        if context.code() is not None or not context.is_active():
            raise e  # an abort (it raises a bare Exception), or the call is already over
        log.exception("%s failed", name)
        context.abort(grpc.StatusCode.INTERNAL,
                      f"internal server error ({type(e).__name__}; see the server's log)")

    def wrap(fn):
        if streaming:
            @functools.wraps(fn)
            def handler(self, request, context):
                call = self._calls.enter(self._token_device(context), context, fn.__name__)
                try:
                    yield from fn(self, request, context, call)
                except Exception as e:
                    fail(self, context, e, fn.__name__)
                finally:
                    self._calls.leave(call)
        else:
            @functools.wraps(fn)
            def handler(self, request, context):
                call = self._calls.enter(self._token_device(context), context, fn.__name__)
                try:
                    return fn(self, request, context, call)
                except Exception as e:
                    fail(self, context, e, fn.__name__)
                finally:
                    self._calls.leave(call)
        return handler

    return wrap


def _abort(context, code: grpc.StatusCode, message: str) -> None:
    context.abort(code, public(message))


def _storage_fault(context, e: StorageError) -> None:
    """Tell the device its update or give-up was not stored (and so not acknowledged); the
    server's log has the path and the reason."""
    log.error("%s", e)
    context.abort(grpc.StatusCode.UNAVAILABLE,
                  "the server cannot store updates right now (a storage fault, see the "
                  "server's log): nothing was acknowledged; retry later")


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, coord: Coordinator, tokens: auth.Tokens, limits: Limits = Limits()):
        self.coord = coord
        self.tokens = tokens
        self.limits = limits
        self._calls = _Calls(limits)
        # the most tensors an upload may carry: twice what an honest one does (the LoRA
        # and head leaves, the masks and the importance)
        honest = (len(jax.tree.leaves(coord.state.lora)) + len(jax.tree.leaves(coord.state.head))
                  + len(wire.MASKS) + len(wire.IMPORTANCE))
        self.max_tensors = 2 * honest

    def _token_device(self, context) -> int:
        dev = auth.device_of_context(self.tokens, context)
        if dev is None:  # the interceptor lets no such call through; defence in depth
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        return dev

    def _device(self, context, claimed: int, registered: bool = True) -> int:
        dev = self._token_device(context)
        if claimed != dev:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the token belongs to device {dev}, not device {claimed}")
        if registered and not self.coord.is_registered(dev):
            # ABORTED, not FAILED_PRECONDITION: the usual cause is a server restart, and
            # the cure (register, then retry) is the client's to apply.
            context.abort(grpc.StatusCode.ABORTED,
                          f"device {dev} has not registered with this server (call Register)")
        return dev

    @_guarded(streaming=False)
    def Register(self, request, context, call):
        dev = self._device(context, request.device_id, registered=False)
        try:
            info = self.coord.register(dev, request.config_digest)
        except ValueError as e:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.RegisterReply(**info)

    @_guarded(streaming=True)
    def FetchTask(self, request, context, call):
        dev = self._device(context, request.device_id)
        try:
            task = self.coord.fetch(dev, request.wait_s)
        except RunDone:
            yield pb.TaskFrame(header=pb.TaskHeader(status=pb.DONE, message="run finished"))
            return
        if task is None:
            yield pb.TaskFrame(header=pb.TaskHeader(
                status=pb.WAIT, message="no task for this device yet"))
            return
        frames = [pb.TaskFrame(header=pb.TaskHeader(
            status=pb.READY, round=task.round, ratio=task.ratio, rank=task.rank,
            stream_epoch=task.stream[0], stream_position=task.stream[1],
            deadline_in_s=task.deadline_in_s, num_tensors=task.num_tensors))]
        frames += [pb.TaskFrame(chunk=chunk) for chunk in task.chunks]
        yield from _sent(call, frames)

    @_guarded(streaming=False)
    def UploadUpdate(self, request_iterator, context, call):
        request_iterator = call.frames(request_iterator)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("frame") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "an upload must start with an UpdateHeader")
        head = first.header
        dev = self._device(context, head.device_id)
        if head.num_tensors > self.max_tensors:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed upload: header announces {head.num_tensors} tensors "
                          f"(at most {self.max_tensors})")
        asm = wire.TensorAssembler(self.coord.max_update_bytes, self.max_tensors)
        stats = None
        try:
            for frame in request_iterator:
                kind = frame.WhichOneof("frame")
                if stats is not None:
                    raise wire.WireError("frames after the UpdateStats (it must come last)")
                if kind == "chunk":
                    asm.add(frame.chunk)
                elif kind == "stats":
                    stats = frame.stats
                else:
                    raise wire.WireError(f"unexpected {kind or 'empty'} frame inside an upload")
            tensors = asm.finish()
        except wire.TooLarge as e:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except wire.WireError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed upload: {e}")
        if stats is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "malformed upload: no UpdateStats at its end")
        if len(tensors) != head.num_tensors:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed upload: header announces {head.num_tensors} tensors, "
                          f"{len(tensors)} arrived")
        try:
            lora, headp, other = wire.split_payload(tensors)
        except wire.WireError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed upload: {e}")
        want = set(wire.MASKS + wire.IMPORTANCE)
        unknown, missing = sorted(set(other) - want), sorted(want - set(other))
        if unknown or missing:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed upload: unknown tensors {unknown[:3]}, missing {missing}")
        u = DeviceUpdate(
            device_id=dev, round=int(head.round), lora=lora, head=headp, **other,
            stream=(int(stats.stream_epoch), int(stats.stream_position)),
            num_samples=int(stats.num_samples), loss_before=float(stats.loss_before),
            loss_after=float(stats.loss_after), lora_importance=float(stats.lora_importance),
            ratio=float(stats.ratio), compute_time_s=float(stats.compute_time_s),
            comm_time_s=float(stats.comm_time_s), flops=float(stats.flops),
            peak_memory_bytes=int(stats.peak_memory_bytes),
            params_alive=int(stats.params_alive))
        try:
            dup = self.coord.submit(u, (float(stats.measured_compute_s),
                                        float(stats.measured_comm_s)))
        except StaleUpdate as e:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"stale update: {e}")
        except UpdateRejected as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"update refused: {e}")
        except StorageError as e:
            _storage_fault(context, e)
        return pb.UploadReply(duplicate=dup, current_round=self.coord.state.round,
                              message="duplicate of an accepted update" if dup else "accepted")

    @_guarded(streaming=False)
    def ReportStatus(self, request, context, call):
        dev = self._device(context, request.device_id)
        stream = (int(request.stream_epoch), int(request.stream_position))
        try:
            if request.state == pb.OUT_OF_MEMORY:
                self.coord.give_up(dev, request.round, "out_of_memory", stream)
            elif request.state == pb.FAILED:
                self.coord.give_up(dev, request.round, f"failed: {request.message[:200]}",
                                   None)
        except StorageError as e:
            _storage_fault(context, e)
        if request.state == pb.TRAINING:
            log.debug("round %d: device %d training", request.round, dev)
        return pb.StatusReply(current_round=self.coord.state.round)

    @_guarded(streaming=True)
    def FetchModel(self, request, context, call):
        dev = self._device(context, request.device_id)
        if not self.coord.done:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the run is not over (collecting round {self.coord.state.round} of "
                          f"{self.coord.rounds}): models are exported when it ends")
        try:
            files = self.coord.models.get(dev, min(float(request.wait_s), MAX_WAIT_S))
        except NoModel as e:
            _abort(context, grpc.StatusCode.NOT_FOUND, str(e))
        if files is None:
            yield pb.ModelFrame(header=pb.ModelHeader(
                status=pb.MODEL_WAIT, message="the server is exporting the models"))
            return
        yield from _sent(call, [pb.ModelFrame(header=pb.ModelHeader(
            status=pb.MODEL_READY, round=self.coord.models.round,
            files=[pb.ModelFile(name=f.name, size=f.size, sha256=f.sha256) for f in files]))])
        try:
            for f in files:
                with open(f.path, "rb") as fh:
                    while chunk := fh.read(wire.CHUNK_BYTES):
                        yield from _sent(call, [pb.ModelFrame(data=chunk)])
            log.info("device %d fetched its model (%s)", dev, ", ".join(f.name for f in files))
        finally:  # also when the device hangs up after the header (it holds these files)
            self.coord.models.sent(dev)


def _sent(call: _Call, frames):
    """Yield ``frames``, timing how long the device takes each (gRPC resumes a response
    generator once its last frame is sent)."""
    for frame in frames:
        call.waiting_since = time.monotonic()
        yield frame
        call.waiting_since = None


def make_server(coord: Coordinator, tokens: auth.Tokens, listen: str,
                credentials: grpc.ServerCredentials | None = None,
                limits: Limits = Limits()) -> tuple[grpc.Server, int]:
    """A started gRPC server for ``coord`` on ``listen`` (``HOST:PORT``; port 0 picks one).

    Returns ``(server, port)``. Workers: ``limits.calls_per_device`` per device plus
    ``limits.spare_workers``; up to as many calls again wait for a worker (a burst of one
    device's calls beyond its cap is refused as each reaches one, at once), and gRPC
    refuses calls beyond that (``RESOURCE_EXHAUSTED``; agents retry).
    """
    workers = limits.calls_per_device * coord.n + limits.spare_workers
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers),
                         interceptors=[auth.TokenInterceptor(tokens)],
                         options=wire.server_options(), maximum_concurrent_rpcs=2 * workers)
    pb_grpc.add_FederationServicer_to_server(FederationServicer(coord, tokens, limits), server)
    port = (server.add_secure_port(listen, credentials) if credentials is not None
            else server.add_insecure_port(listen))
    if port == 0:
        raise OSError(f"could not listen on {listen!r}")
    server.start()
    return server, port


__all__ = ["FederationServicer", "Limits", "make_server", "public"]
