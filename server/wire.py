"""Tensors on the wire: chunked streams with dtype and shape headers, and their limits.

A tensor is sent as one or more :class:`TensorChunk` messages: the first carries a
``TensorHeader`` (name, numpy dtype name, shape), every one a piece (at most ``chunk_bytes``)
of its raw bytes, little-endian and C order. :class:`TensorAssembler` rebuilds tensors from
chunks and refuses, with an error naming the problem, a chunk without a header, an unknown
dtype, an absurd shape (a negative dimension, more than ``MAX_DIMS`` of them, or dimensions
whose product alone exceeds the byte limit), a name longer than ``MAX_NAME_BYTES``, a repeated
name, an empty chunk, bytes beyond the header's size, a tensor cut short, more tensors or
chunks than its limits allow, and anything that would push the total past ``max_bytes``
(checked against the header's declared size before any of the tensor's bytes are read).
Every limit is checked as the chunk arrives, so a malicious stream costs at most one
message's memory beyond what an honest one would.

This module is shared by the server and the device agent (it is the protocol's contract,
beside ``fedspine.proto``), with the rest of what both sides must agree on: the config
digest a device registers with (:func:`config_digest`), which tensors of a device's record
travel with a task and an update (:func:`record_tensors`), and what counts as a loopback
address (:func:`is_loopback`, where plaintext is allowed).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from typing import Iterable, Iterator

import numpy as np

from fedspine_jax.models.state import flatten, unflatten
from fedspine_jax.server import fedspine_pb2 as pb

# One message carries at most this many tensor bytes; the gRPC message limit is set a
# little above it (MESSAGE_LIMIT_BYTES), on both ends.
CHUNK_BYTES = 1 << 20
MESSAGE_LIMIT_BYTES = 4 << 20
DTYPES = ("float32", "float16", "float64", "int32", "int64", "uint8", "bool")
# Upload metadata limits: the longest tensor name (UTF-8 bytes), the most dimensions, and
# the smallest chunk worth a message (an upload may have at most max_bytes / MIN_CHUNK_BYTES
# chunks beyond one per tensor; an honest sender fills every chunk but a tensor's last).
MAX_NAME_BYTES = 256
MAX_DIMS = 8
MIN_CHUNK_BYTES = 64 << 10


class WireError(ValueError):
    """A malformed tensor stream; the message names the problem."""


class TooLarge(WireError):
    """A stream exceeds its byte limit."""


def tensor_chunks(name: str, x: np.ndarray, chunk_bytes: int = CHUNK_BYTES
                  ) -> Iterator[pb.TensorChunk]:
    """The chunks of one tensor (a header on the first; an empty tensor is one chunk)."""
    x = np.asarray(x)
    if x.dtype.name not in DTYPES:
        raise WireError(f"tensor {name}: dtype {x.dtype.name} cannot travel (allowed {DTYPES})")
    raw = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
    header = pb.TensorHeader(name=name, dtype=x.dtype.name, shape=list(x.shape))
    yield pb.TensorChunk(header=header, data=raw[:chunk_bytes])
    for start in range(chunk_bytes, len(raw), chunk_bytes):
        yield pb.TensorChunk(data=raw[start:start + chunk_bytes])


def dict_chunks(tensors: dict[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES
                ) -> Iterator[pb.TensorChunk]:
    """Chunks of every tensor of ``{name: array}``, in sorted name order."""
    for name in sorted(tensors):
        yield from tensor_chunks(name, tensors[name], chunk_bytes)


def nbytes(header: pb.TensorHeader) -> int:
    """The byte size a header declares (its name, dtype and number of dimensions checked)."""
    if len(header.name.encode()) > MAX_NAME_BYTES:
        raise WireError(f"tensor name {header.name[:40]!r}... is longer than "
                        f"{MAX_NAME_BYTES} bytes")
    if len(header.shape) > MAX_DIMS:
        raise WireError(f"tensor {header.name}: {len(header.shape)} dimensions (at most "
                        f"{MAX_DIMS})")
    if header.dtype not in DTYPES:
        raise WireError(f"tensor {header.name}: unknown dtype {header.dtype!r} "
                        f"(allowed {DTYPES})")
    if any(d < 0 for d in header.shape):
        raise WireError(f"tensor {header.name}: negative dimension in shape "
                        f"{tuple(header.shape)}")
    return math.prod(header.shape) * np.dtype(header.dtype).itemsize


class TensorAssembler:
    """Rebuild ``{name: array}`` from chunks, enforcing a total byte limit.

    Args:
      max_bytes: the most tensor bytes the stream may declare in all.
      max_tensors: the most tensors it may carry (None: no limit).
      max_chunks: the most chunks it may have (None: ``max_tensors`` plus
        ``max_bytes // MIN_CHUNK_BYTES``, or no limit without ``max_tensors``).
    """

    def __init__(self, max_bytes: int, max_tensors: int | None = None,
                 max_chunks: int | None = None):
        self.max_bytes = int(max_bytes)
        self.max_tensors = max_tensors
        if max_chunks is None and max_tensors is not None:
            max_chunks = max_tensors + self.max_bytes // MIN_CHUNK_BYTES
        self.max_chunks = max_chunks
        self.chunks = 0
        self.total = 0
        self.tensors: dict[str, np.ndarray] = {}
        self._header: pb.TensorHeader | None = None
        self._want = 0
        self._parts: list[bytes] = []
        self._got = 0

    def add(self, chunk: pb.TensorChunk) -> None:
        """Take the next chunk (raises :class:`WireError` / :class:`TooLarge`)."""
        self.chunks += 1
        if self.max_chunks is not None and self.chunks > self.max_chunks:
            raise WireError(f"more than {self.max_chunks} chunks")
        if chunk.HasField("header"):
            self._finish_open()
            h = chunk.header
            if not h.name:
                raise WireError("a tensor header without a name")
            if h.name in self.tensors:
                raise WireError(f"tensor {h.name} sent twice")
            if self.max_tensors is not None and len(self.tensors) >= self.max_tensors:
                raise WireError(f"more than {self.max_tensors} tensors")
            size = nbytes(h)
            if self.total + size > self.max_bytes:
                raise TooLarge(f"tensor {h.name} of shape {tuple(h.shape)} ({h.dtype}) would "
                               f"bring the upload to {self.total + size} bytes, over the "
                               f"limit of {self.max_bytes}")
            # an empty tensor's other dimensions could still make an array numpy refuses
            if math.prod(max(d, 1) for d in h.shape) > self.max_bytes:
                raise WireError(f"tensor {h.name}: absurd shape {tuple(h.shape)}")
            self.total += size
            self._header, self._want, self._parts, self._got = h, size, [], 0
        elif not chunk.data:
            raise WireError("an empty chunk (no header, no bytes)")
        elif self._header is None:
            if not self.tensors:
                raise WireError("tensor bytes arrived before any tensor header")
            raise WireError(f"bytes beyond the end of tensor {next(reversed(self.tensors))} "
                            f"(its shape holds fewer)")
        if self._got + len(chunk.data) > self._want:
            raise WireError(f"tensor {self._header.name}: more bytes than its shape "
                            f"{tuple(self._header.shape)} x {self._header.dtype} holds "
                            f"({self._want})")
        self._parts.append(chunk.data)
        self._got += len(chunk.data)
        if self._got == self._want:
            self._close()

    def _close(self) -> None:
        h = self._header
        buf = b"".join(self._parts)
        dt = np.dtype(h.dtype).newbyteorder("<")
        arr = np.frombuffer(buf, dtype=dt).reshape(tuple(h.shape))
        self.tensors[h.name] = arr.astype(np.dtype(h.dtype), copy=True)
        self._header, self._parts, self._got, self._want = None, [], 0, 0

    def _finish_open(self) -> None:
        if self._header is not None:
            if self._got < self._want:
                raise WireError(f"tensor {self._header.name} cut short: {self._got} of "
                                f"{self._want} bytes")

    def finish(self) -> dict[str, np.ndarray]:
        """All tensors, once the stream has ended (raises if one is incomplete)."""
        self._finish_open()
        return self.tensors


def assemble(chunks: Iterable[pb.TensorChunk], max_bytes: int) -> dict[str, np.ndarray]:
    """``{name: array}`` from a finite iterable of chunks."""
    asm = TensorAssembler(max_bytes)
    for c in chunks:
        asm.add(c)
    return asm.finish()


def split_payload(tensors: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """``(lora, head, other)`` from wire names ``lora/<path>``, ``head/<path>`` and the rest:
    the LoRA and head as trees (``models.state``), the rest by name.

    Raises:
      WireError: tensor names that do not make a tree (a path through a leaf, or twice).
    """
    lora, head, other = {}, {}, {}
    for name, v in tensors.items():
        if name.startswith("lora/"):
            lora[name[5:]] = v
        elif name.startswith("head/"):
            head[name[5:]] = v
        else:
            other[name] = v
    try:
        return unflatten(lora), unflatten(head), other
    except ValueError as e:
        raise WireError(f"bad tensor names: {e}") from None


def join_payload(lora: dict, head: dict, **other: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse of :func:`split_payload`: the trees' leaves named by their paths."""
    out = {f"lora/{k}": v for k, v in flatten(lora).items()}
    out.update({f"head/{k}": v for k, v in flatten(head).items()})
    out.update(other)
    return out


MASKS = ("head_masks", "channel_masks")
IMPORTANCE = ("head_importance", "channel_importance")


def record_tensors(record: dict) -> dict[str, np.ndarray]:
    """The tensors of a device's record that travel with its task: its masks, and the
    importance it carries when it has measured one (``record["scored"]``)."""
    names = MASKS + (IMPORTANCE if bool(record["scored"]) else ())
    return {k: np.asarray(record[k], np.float32) for k in names}


def record_from_tensors(other: dict) -> dict:
    """Inverse of :func:`record_tensors` (importance None when it was not sent).

    Raises:
      WireError: masks missing, importance half sent, or unknown tensors.
    """
    unknown = sorted(set(other) - set(MASKS) - set(IMPORTANCE))
    missing = sorted(set(MASKS) - set(other))
    sent = [k in other for k in IMPORTANCE]
    if unknown or missing or any(sent) != all(sent):
        raise WireError(f"a device record needs {list(MASKS)} and both or none of "
                        f"{list(IMPORTANCE)}; got {sorted(other)}")
    out = {k: other[k] for k in MASKS}
    out.update({k: other.get(k) for k in IMPORTANCE})
    return out


def config_digest(cfg) -> str:
    """sha256 of the config that devices and server must share: what the rounds compute
    with (``config.round_dict``; the data's path, the number of rounds and what the server
    records are each machine's own)."""
    import yaml

    from fedspine_jax.config import round_dict

    return hashlib.sha256(yaml.safe_dump(round_dict(cfg), sort_keys=True).encode()).hexdigest()


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` (or ``[v6]:PORT``) names this machine's loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_options(max_message_bytes: int = MESSAGE_LIMIT_BYTES) -> list[tuple[str, int]]:
    """gRPC options setting the message size limits (both ends use them)."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


# Server keepalive: ping an idle connection every KEEPALIVE_S and drop it when the ping is
# not answered within KEEPALIVE_TIMEOUT_S (a device that vanished without closing its
# connection); accept a device's own pings no more often than every 10 s.
KEEPALIVE_S = 60
KEEPALIVE_TIMEOUT_S = 20


def server_options(max_message_bytes: int = MESSAGE_LIMIT_BYTES) -> list[tuple[str, int]]:
    """The server's gRPC options: :func:`channel_options` and its keepalive policy."""
    return channel_options(max_message_bytes) + [
        ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", 30 * 60 * 1000)]
