"""Tensors on the wire: chunked streams with dtype and shape headers, and their limits.

A tensor is sent as one or more :class:`TensorChunk` messages: the first carries a
``TensorHeader`` (name, numpy dtype name, shape), every one a piece (at most ``chunk_bytes``)
of its raw bytes, little-endian and C order. :class:`TensorAssembler` rebuilds tensors from
chunks and refuses, with an error naming the problem, a chunk without a header, an unknown
dtype, a negative dimension, a repeated name, bytes beyond the header's size, a tensor cut
short, and anything that would push the total past ``max_bytes`` (checked against the
header's declared size before any of the tensor's bytes are read).

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
    """The byte size a header declares."""
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
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.total = 0
        self.tensors: dict[str, np.ndarray] = {}
        self._header: pb.TensorHeader | None = None
        self._want = 0
        self._parts: list[bytes] = []
        self._got = 0

    def add(self, chunk: pb.TensorChunk) -> None:
        """Take the next chunk (raises :class:`WireError` / :class:`TooLarge`)."""
        if chunk.HasField("header"):
            self._finish_open()
            h = chunk.header
            if not h.name:
                raise WireError("a tensor header without a name")
            if h.name in self.tensors:
                raise WireError(f"tensor {h.name} sent twice")
            size = nbytes(h)
            if self.total + size > self.max_bytes:
                raise TooLarge(f"tensor {h.name} of shape {tuple(h.shape)} ({h.dtype}) would "
                               f"bring the upload to {self.total + size} bytes, over the "
                               f"limit of {self.max_bytes}")
            self.total += size
            self._header, self._want, self._parts, self._got = h, size, [], 0
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
