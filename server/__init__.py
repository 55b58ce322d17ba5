"""The gRPC federation server (installs as ``fedspine_jax.server``).

``fedspine.proto`` is the protocol; ``fedspine_pb2`` / ``fedspine_pb2_grpc`` are generated
from it (committed; ``python -m fedspine_jax.server.codegen`` regenerates them). The
server drives the core :class:`fedspine_jax.federation.Federation` round and nothing else:

* ``coordinator`` -- when rounds close (quorum, deadline), per-device records, checkpoints
  after every round and a journal of every accepted update (exact restart);
* ``servicer`` -- the RPCs, status codes and :func:`make_server`;
* ``auth`` -- bearer tokens per device (checked by an interceptor) and TLS credentials;
* ``wire`` -- tensors as chunked streams with dtype and shape headers, and size limits;
* ``models`` -- the devices' exported models at the end of a run, for ``FetchModel``;
* ``cli`` -- ``fedspine server``.
"""

import importlib

# Re-exports, imported on first use: ``codegen`` must run without the generated modules,
# and ``fedspine --help`` should not pay for gRPC.
_EXPORTS = {"Coordinator": "coordinator", "StaleUpdate": "coordinator",
            "config_digest": "wire", "FederationServicer": "servicer",
            "make_server": "servicer", "Tokens": "auth", "TokenInterceptor": "auth",
            "write_tokens": "auth"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
