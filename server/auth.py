"""Bearer tokens per device, the server interceptor that checks them, and TLS credentials.

Tokens file (server side): a JSON object mapping device ids to tokens,
``{"0": "k3J...", "1": "Zp9...", ...}``; :func:`write_tokens` makes one with random tokens
and a one-line token file per device (``device_<id>.token``) to copy onto each device. A
device sends ``authorization: Bearer <token>`` with every call; :class:`TokenInterceptor`
refuses a call whose token is missing or unknown with ``UNAUTHENTICATED`` before any
handler runs, and the servicer refuses a call whose ``device_id`` names another device than
the token's with ``PERMISSION_DENIED``. Tokens are compared in constant time.

Tokens travel in the clear without TLS: use ``--tls-cert/--tls-key`` anywhere but on
loopback. Mutual TLS (``--tls-client-ca``) additionally requires every device to present
a certificate signed by that CA.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from pathlib import Path

import grpc

HEADER = "authorization"
SCHEME = "Bearer "


class Tokens:
    """The device id <-> token map of a run."""

    def __init__(self, by_device: dict[int, str]):
        for dev, tok in by_device.items():
            if not isinstance(tok, str) or len(tok) < 16:
                raise ValueError(f"token of device {dev} is shorter than 16 characters")
        if len(set(by_device.values())) != len(by_device):
            raise ValueError("two devices share a token")
        self.by_device = dict(by_device)

    @classmethod
    def load(cls, path: str | Path) -> "Tokens":
        """Read a tokens file (a JSON object ``{"<device id>": "<token>"}``)."""
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"tokens file {str(p)!r}: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"tokens file {str(p)!r}: expected a JSON object of "
                             f"device id -> token")
        try:
            return cls({int(k): v for k, v in raw.items()})
        except ValueError as e:
            raise ValueError(f"tokens file {str(p)!r}: {e}") from None

    def device_of(self, token: str | None) -> int | None:
        """The device id holding ``token`` (constant-time compare), or None."""
        if not token:
            return None
        found = None
        for dev, tok in self.by_device.items():
            if hmac.compare_digest(tok.encode(), token.encode()):
                found = dev
        return found

    def check_devices(self, num_devices: int) -> None:
        """Every device of the run has a token and no token names an unknown device."""
        want = set(range(num_devices))
        if set(self.by_device) != want:
            missing = sorted(want - set(self.by_device))
            extra = sorted(set(self.by_device) - want)
            raise ValueError(f"tokens file: missing devices {missing[:5]}, unknown devices "
                             f"{extra[:5]} (this run has devices 0..{num_devices - 1})")


def write_tokens(directory: str | Path, num_devices: int) -> Path:
    """Write ``tokens.json`` and ``device_<i>.token`` (mode 0600) with fresh random tokens."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    toks = {i: secrets.token_urlsafe(32) for i in range(num_devices)}

    def put(path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    put(d / "tokens.json", json.dumps({str(k): v for k, v in toks.items()}, indent=1) + "\n")
    for i, t in toks.items():
        put(d / f"device_{i}.token", t + "\n")
    return d / "tokens.json"


def read_token(path: str | Path) -> str:
    """A device's token from its one-line token file."""
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
