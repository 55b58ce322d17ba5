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
                            message over the gRPC limit is refused by gRPC itself)
``NOT_FOUND``               FetchModel: no exported model for the device (export
                            off or failed; the message says why)
==========================  ====================================================

The error message always names the problem; a refused update leaves the state unchanged.
"""

from __future__ import annotations

import concurrent.futures
import logging

import grpc

from fedspine_jax.federation import DeviceUpdate, UpdateRejected
from fedspine_jax.server import auth, wire
from fedspine_jax.server import fedspine_pb2 as pb
from fedspine_jax.server import fedspine_pb2_grpc as pb_grpc
from fedspine_jax.server.coordinator import MAX_WAIT_S, Coordinator, RunDone, StaleUpdate
from fedspine_jax.server.models import NoModel

log = logging.getLogger("fedspine.server")


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, coord: Coordinator, tokens: auth.Tokens):
        self.coord = coord
        self.tokens = tokens

    def _device(self, context, claimed: int, registered: bool = True) -> int:
        dev = auth.device_of_context(self.tokens, context)
        if dev is None:  # the interceptor lets no such call through; defence in depth
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        if claimed != dev:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"the token belongs to device {dev}, not device {claimed}")
        if registered and not self.coord.is_registered(dev):
            # ABORTED, not FAILED_PRECONDITION: the usual cause is a server restart, and
            # the cure (register, then retry) is the client's to apply.
            context.abort(grpc.StatusCode.ABORTED,
                          f"device {dev} has not registered with this server (call Register)")
        return dev

    def Register(self, request, context):
        dev = self._device(context, request.device_id, registered=False)
        try:
            info = self.coord.register(dev, request.config_digest)
        except ValueError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.RegisterReply(**info)

    def FetchTask(self, request, context):
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
        yield pb.TaskFrame(header=pb.TaskHeader(
            status=pb.READY, round=task.round, ratio=task.ratio, rank=task.rank,
            stream_epoch=task.stream[0], stream_position=task.stream[1],
            deadline_in_s=task.deadline_in_s, num_tensors=task.num_tensors))
        for chunk in task.chunks:
            yield pb.TaskFrame(chunk=chunk)

    def UploadUpdate(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("frame") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "an upload must start with an UpdateHeader")
        head = first.header
        dev = self._device(context, head.device_id)
        asm = wire.TensorAssembler(self.coord.max_update_bytes)
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
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except wire.WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed upload: {e}")
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
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed upload: {e}")
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
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"stale update: {e}")
        except UpdateRejected as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"update refused: {e}")
        return pb.UploadReply(duplicate=dup, current_round=self.coord.state.round,
                              message="duplicate of an accepted update" if dup else "accepted")

    def ReportStatus(self, request, context):
        dev = self._device(context, request.device_id)
        stream = (int(request.stream_epoch), int(request.stream_position))
        if request.state == pb.OUT_OF_MEMORY:
            self.coord.give_up(dev, request.round, "out_of_memory", stream)
        elif request.state == pb.FAILED:
            self.coord.give_up(dev, request.round, f"failed: {request.message[:200]}", None)
        elif request.state == pb.TRAINING:
            log.debug("round %d: device %d training", request.round, dev)
        return pb.StatusReply(current_round=self.coord.state.round)

    def FetchModel(self, request, context):
        dev = self._device(context, request.device_id)
        if not self.coord.done:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the run is not over (collecting round {self.coord.state.round} of "
                          f"{self.coord.rounds}): models are exported when it ends")
        try:
            files = self.coord.models.get(dev, min(float(request.wait_s), MAX_WAIT_S))
        except NoModel as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        if files is None:
            yield pb.ModelFrame(header=pb.ModelHeader(
                status=pb.MODEL_WAIT, message="the server is exporting the models"))
            return
        yield pb.ModelFrame(header=pb.ModelHeader(
            status=pb.MODEL_READY, round=self.coord.models.round,
            files=[pb.ModelFile(name=f.name, size=f.size, sha256=f.sha256) for f in files]))
        try:
            for f in files:
                with open(f.path, "rb") as fh:
                    while chunk := fh.read(wire.CHUNK_BYTES):
                        yield pb.ModelFrame(data=chunk)
            log.info("device %d fetched its model (%s)", dev, ", ".join(f.name for f in files))
        finally:  # also when the device hangs up after the header (it holds these files)
            self.coord.models.sent(dev)


def make_server(coord: Coordinator, tokens: auth.Tokens, listen: str,
                credentials: grpc.ServerCredentials | None = None,
                max_workers: int | None = None) -> tuple[grpc.Server, int]:
    """A started gRPC server for ``coord`` on ``listen`` (``HOST:PORT``; port 0 picks one).

    Returns ``(server, port)``. Workers: two per device (a long-polling fetch and an upload
    may overlap) plus a few spare.
    """
    workers = max_workers or 2 * coord.n + 8
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers),
                         interceptors=[auth.TokenInterceptor(tokens)],
                         options=wire.channel_options())
    pb_grpc.add_FederationServicer_to_server(FederationServicer(coord, tokens), server)
    port = (server.add_secure_port(listen, credentials) if credentials is not None
            else server.add_insecure_port(listen))
    if port == 0:
        raise OSError(f"could not listen on {listen!r}")
    server.start()
    return server, port


__all__ = ["FederationServicer", "make_server"]
