"""``fedspine device``: run a device agent against a federation server.

::

    fedspine device --server fl.example.org:50051 --device-id 3 --token-file device_3.token \\
        --config run.yaml --tls-ca ca.crt [--tls-cert dev3.crt --tls-key dev3.key]
    # ... and when the run is over, fetch this device's model and build its engine:
    fedspine device ... --fetch-model models/         # train, then fetch
    fedspine device ... --fetch-model models/ --fetch-only   # the run is over: just fetch

``--fetch-model DIR`` downloads the device's exported ONNX model into ``DIR`` (size and
sha256 checked), builds its TensorRT engine into ``DIR/engines/`` when TensorRT is
installed (cached: a second fetch of the same model on the same GPU reuses it) and prints
the ``fedspine infer`` command that serves it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, help="HOST:PORT of the federation server")
    p.add_argument("--device-id", type=int, required=True, help="this device's id (0-based)")
    p.add_argument("--token-file", required=True, help="file holding this device's token")
    p.add_argument("--config", required=True, help="the run's YAML config (the server's)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable); "
                   "typically data.source=<this device's data>")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to verify the server; enables TLS "
                   "(without any --tls-* option the connection is plaintext)")
    p.add_argument("--tls-cert", help="this device's certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", help="this device's private key (PEM), for mutual TLS")
    p.add_argument("--tls-server-name", help="name to expect in the server's certificate "
                   "(default: the host of --server)")
    p.add_argument("--fetch-model", metavar="DIR",
                   help="when the run is over, download this device's exported model into "
                        "DIR and build its TensorRT engine (when TensorRT is installed)")
    p.add_argument("--fetch-only", action="store_true",
                   help="with --fetch-model: do not train, only fetch (the run is over)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a plaintext connection to a non-loopback server (the token "
                        "and updates then travel in the clear)")
    p.add_argument("--give-up-s", type=float, default=600.0,
                   help="exit after this long without reaching the server (default "
                        "%(default)s)")


def run_cli(args) -> int:
    from fedspine_jax.config import load_config
    from fedspine_jax.device_runtime.agent import AgentError, Backoff, DeviceAgent
    from fedspine_jax.server import auth
    from fedspine_jax.server.wire import is_loopback

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("fedspine").setLevel(logging.INFO)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("fedspine device: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls = bool(args.tls_ca or args.tls_cert)
    if not tls and not is_loopback(args.server):
        if not args.insecure:
            print(f"fedspine device: refusing to connect to {args.server} without TLS (the "
                  f"token and updates would travel in the clear): pass --tls-ca, or "
                  f"--insecure to accept that", file=sys.stderr)
            return 2
        logging.getLogger("fedspine.device").warning(
            "connecting to %s WITHOUT TLS (--insecure): the token and updates travel in the "
            "clear", args.server)
    cfg = load_config(args.config, args.overrides)
    creds = auth.channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if tls else None
    try:
        tok = auth.read_token(args.token_file)
    except ValueError as e:  # empty, or readable by others (a missing file: the CLI's line)
        print(f"fedspine device: {e}", file=sys.stderr)
        return 2
    agent = DeviceAgent(cfg, args.device_id, args.server, tok,
                        credentials=creds, server_name=args.tls_server_name,
                        backoff=Backoff(give_up_s=args.give_up_s))
    if args.fetch_only and not args.fetch_model:
        print("fedspine device: --fetch-only needs --fetch-model DIR", file=sys.stderr)
        return 2
    log = logging.getLogger("fedspine.device")
    try:
        if not args.fetch_only:
            rc = agent.run()
            if rc != 0 or not args.fetch_model:
                return rc
        onnx = agent.fetch_model(args.fetch_model)
    except AgentError as e:
        log.error("device %d: %s", args.device_id, e)
        return 3
    from fedspine_jax.export.onnx_export import ExportError

    try:
        engine = agent.prepare_engine(onnx, Path(args.fetch_model) / "engines")
    except ExportError as e:  # TensorRT's parser / builder messages are in it
        log.error("device %d: could not build the engine: %s", args.device_id, e)
        return 4
    log.info("device %d: serve it with: fedspine infer %s --text \"...\"", args.device_id,
             engine or onnx)
    return 0
