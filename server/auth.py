"""Bearer tokens per device, the server interceptor that checks them, and TLS credentials.

Tokens file (server side): the devices' tokens as salted hashes, never the tokens
themselves::

    {"format": "fedspine-tokens/2",
     "devices": {"0": {"salt": "<hex>", "sha256": "<hex of HMAC-SHA256(salt, token)>"}, ...}}

:func:`write_tokens` makes one with random 256-bit tokens, and a one-line token file per
device (``device_<id>.token``, the token itself) to copy onto each device; every file it
writes is owner-only (0600), and :meth:`Tokens.load` / :func:`read_token` refuse a file
that its group or others can read. :func:`rotate_token` gives one device a new token and
:func:`revoke_token` removes one; a running server re-reads the file when it changes
(``Tokens.device_of``), so neither needs a restart.

A device sends ``authorization: Bearer <token>`` with every call; :class:`TokenInterceptor`
refuses a call whose token is missing or unknown with ``UNAUTHENTICATED`` before any
handler runs, and the servicer refuses a call whose ``device_id`` names another device than
the token's with ``PERMISSION_DENIED``. Hashes are compared in constant time.

Tokens travel in the clear without TLS: ``fedspine server`` refuses plaintext anywhere but
on loopback unless given ``--insecure``. Mutual TLS (``--tls-client-ca``) additionally
requires every device to present a certificate signed by that CA.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import threading
from pathlib import Path

import grpc

HEADER = "authorization"
SCHEME = "Bearer "
FORMAT = "fedspine-tokens/2"

log = logging.getLogger("fedspine.server")


def _digest(salt: bytes, token: str) -> bytes:
    return hmac.new(salt, token.encode(), hashlib.sha256).digest()


def check_private(path: str | Path) -> None:
    """Refuse a secrets file that its group or others may read or write."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ValueError(f"{str(path)!r} is accessible to group/others (mode {mode:o}); "
                         f"run: chmod 600 {path}")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, owner-only (0600) whatever was there."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older tmp file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Tokens:
    """The devices' token hashes: ``{device id: (salt, HMAC-SHA256(salt, token))}``.

    Args:
      by_device: the hashes.
      path: the tokens file they came from; when it changes on disk (a rotation or a
        revocation), :meth:`device_of` re-reads it.
    """

    def __init__(self, by_device: dict[int, tuple[bytes, bytes]], path: Path | None = None):
        self.by_device = dict(by_device)
        self.path = path
        self._stamp = self._stat()
        self._lock = threading.Lock()

    def _stat(self):
        if self.path is None:
            return None
        st = os.stat(self.path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @staticmethod
    def _parse(path: Path) -> dict[int, tuple[bytes, bytes]]:
        try:
            check_private(path)
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"tokens file {str(path)!r}: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"tokens file {str(path)!r} is not a {FORMAT} file (an older one "
                             f"holds plain tokens): write a new one with fedspine server "
                             f"CONFIG --init-tokens DIR")
        try:
            return {int(k): (bytes.fromhex(v["salt"]), bytes.fromhex(v["sha256"]))
                    for k, v in raw["devices"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tokens file {str(path)!r}: malformed entry ({e})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Tokens":
        """Read a tokens file (owner-only; see the module docstring)."""
        p = Path(path)
        return cls(cls._parse(p), p)

    def _refresh(self) -> None:
        """Re-read the file if it changed since it was read (a bad file keeps the old map)."""
        try:
            stamp = self._stat()
        except OSError:
            return
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                self.by_device = self._parse(self.path)
            except ValueError as e:
                log.error("tokens file changed but cannot be read (keeping the old tokens): "
                          "%s", e)
                return
        log.info("tokens file re-read: %d devices hold a token", len(self.by_device))

    def device_of(self, token: str | None) -> int | None:
        """The device id holding ``token`` (constant-time compare), or None."""
        self._refresh()
        if not token:
            return None
        found = None
        for dev, (salt, digest) in self.by_device.items():
            if hmac.compare_digest(_digest(salt, token), digest):
                found = dev
        return found

    def check_devices(self, num_devices: int) -> None:
        """No token names a device the run does not have (devices without one, revoked,
        cannot take part until given one with ``--rotate-token``)."""
        extra = sorted(set(self.by_device) - set(range(num_devices)))
        if extra:
            raise ValueError(f"tokens file: unknown devices {extra[:5]} (this run has "
                             f"devices 0..{num_devices - 1})")
        missing = sorted(set(range(num_devices)) - set(self.by_device))
        if missing:
            log.warning("devices %s hold no token (revoked?)", missing[:20])


def _entry(token: str) -> dict:
    salt = secrets.token_bytes(16)
    return {"salt": salt.hex(), "sha256": _digest(salt, token).hex()}


def _save(path: Path, entries: dict[int, dict]) -> None:
    _write_private(path, json.dumps({"format": FORMAT, "devices": {
        str(k): entries[k] for k in sorted(entries)}}, indent=1) + "\n")


def write_tokens(directory: str | Path, num_devices: int) -> Path:
    """Write ``tokens.json`` (hashes) and ``device_<i>.token`` (the tokens), all 0600, with
    fresh random tokens (files already there are replaced, permissions included)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    toks = {i: secrets.token_urlsafe(32) for i in range(num_devices)}
    for i, t in toks.items():
        _write_private(d / f"device_{i}.token", t + "\n")
    _save(d / "tokens.json", {i: _entry(t) for i, t in toks.items()})
    return d / "tokens.json"


def _entries(path: Path) -> dict[int, dict]:
    return {k: {"salt": s.hex(), "sha256": h.hex()} for k, (s, h) in Tokens._parse(path).items()}


def rotate_token(path: str | Path, device_id: int) -> Path:
    """Give device ``device_id`` a new token: its entry in the tokens file ``path`` is
    replaced (the old token stops working) and the new token is written to
    ``device_<id>.token`` beside it. Returns that file."""
    p = Path(path)
    entries = _entries(p)
    tok = secrets.token_urlsafe(32)
    out = p.parent / f"device_{device_id}.token"
    _write_private(out, tok + "\n")
    entries[int(device_id)] = _entry(tok)
    _save(p, entries)
    return out


def revoke_token(path: str | Path, device_id: int) -> None:
    """Remove device ``device_id``'s token from the tokens file ``path``."""
    p = Path(path)
    entries = _entries(p)
    if entries.pop(int(device_id), None) is None:
        raise ValueError(f"device {device_id} holds no token in {str(p)!r}")
    _save(p, entries)


def read_token(path: str | Path) -> str:
    """A device's token from its one-line token file (owner-only)."""
    check_private(path)
    tok = Path(path).read_text().strip()
    if not tok:
        raise ValueError(f"token file {str(path)!r} is empty")
    return tok


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return ((HEADER, SCHEME + token),)


def token_from_metadata(metadata) -> str | None:
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and value.startswith(SCHEME):
            return value[len(SCHEME):].strip()
    return None


def device_of_context(tokens: Tokens, context: grpc.ServicerContext) -> int | None:
    """The device id the call's token belongs to."""
    return tokens.device_of(token_from_metadata(context.invocation_metadata()))


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuse calls without a known bearer token (``UNAUTHENTICATED``)."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        token = token_from_metadata(handler_call_details.invocation_metadata)
        if self.tokens.device_of(token) is not None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        why = "missing bearer token" if token is None else "unknown bearer token"

        def deny(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        def deny_stream(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            yield  # pragma: no cover  (a generator, as a streaming handler must be)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None
                       ) -> grpc.ServerCredentials:
    """TLS with the server's certificate chain and key; with ``client_ca``, mutual TLS."""
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())], root_certificates=ca,
        require_client_auth=ca is not None)


def channel_credentials(ca: str | Path | None = None, cert: str | Path | None = None,
                        key: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS for a device: trust ``ca`` (default: the system roots); ``cert``/``key`` for mTLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None)
