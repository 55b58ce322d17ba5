"""``fedspine server``: run the gRPC federation server for a config.

::

    fedspine server CONFIG --listen 0.0.0.0:50051 --tokens tokens.json --out runs/fleet \\
        --tls-cert server.crt --tls-key server.key [--tls-client-ca devices-ca.crt]
    fedspine server CONFIG --init-tokens secrets/      # write tokens.json + device_<i>.token
    fedspine server --tokens secrets/tokens.json --rotate-token 3   # new token for device 3
    fedspine server --tokens secrets/tokens.json --revoke-token 3   # device 3 is refused

Without TLS the server listens only on loopback, unless given ``--insecure``. A running
server picks up a rotated or revoked token on the next call (it re-reads the tokens file
when it changes).

One status line per round: devices that reported, stragglers, the round's wall time, the
scheduler's clock and the server's own overhead. ``--resume`` continues the run in
``--out`` after a crash or restart (see ``coordinator``'s design note).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config of the run")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--listen", default="127.0.0.1:50051",
                   help="HOST:PORT to listen on (port 0: any free port; default %(default)s)")
    p.add_argument("--tokens", help="JSON file mapping device id -> bearer token")
    p.add_argument("--out", help="run directory (metrics, checkpoints, journal)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--tls-cert", help="server certificate chain (PEM); enables TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that signs device certificates: "
                   "require mutual TLS")
    p.add_argument("--linger-s", type=float, default=10.0,
                   help="after the last round, wait this long for devices to hear it is over")
    p.add_argument("--init-tokens", metavar="DIR",
                   help="write DIR/tokens.json and DIR/device_<i>.token for the config's "
                        "devices, then exit")
    p.add_argument("--rotate-token", type=int, metavar="I",
                   help="give device I a new token in --tokens (written to device_<I>.token "
                        "beside it), then exit; a running server picks it up")
    p.add_argument("--revoke-token", type=int, metavar="I",
                   help="remove device I's token from --tokens, then exit; a running server "
                        "refuses the device from its next call")
    p.add_argument("--stall-s", type=float, default=60.0,
                   help="cut a device's stream that sends or takes no frame for this many "
                        "seconds (default %(default)s)")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening without TLS on a non-loopback address (tokens and "
                        "updates then travel in the clear)")


def run_cli(args) -> int:
    from fedspine_jax.server.wire import is_loopback
    from fedspine_jax.config import load_config
    from fedspine_jax.server import auth

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("fedspine").setLevel(logging.INFO)
    log = logging.getLogger("fedspine.server")
    if args.rotate_token is not None or args.revoke_token is not None:
        if not args.tokens:
            print("fedspine server: --rotate-token/--revoke-token need --tokens FILE",
                  file=sys.stderr)
            return 2
        try:
            if args.rotate_token is not None:
                path = auth.rotate_token(args.tokens, args.rotate_token)
                print(f"device {args.rotate_token} has a new token in {path} (the old one "
                      f"no longer works)")
            else:
                auth.revoke_token(args.tokens, args.revoke_token)
                print(f"device {args.revoke_token}'s token is revoked")
        except ValueError as e:
            print(f"fedspine server: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.tls_cert and not is_loopback(args.listen) and not args.init_tokens:
        if not args.insecure:
            print(f"fedspine server: refusing to listen on {args.listen} without TLS (tokens "
                  f"and updates would travel in the clear): pass --tls-cert/--tls-key, or "
                  f"--insecure to accept that", file=sys.stderr)
            return 2
        log.warning("listening on %s WITHOUT TLS (--insecure): bearer tokens and updates "
                    "travel in the clear", args.listen)
    if args.resume and args.out and not args.config:  # the run's own config
        from fedspine_jax.checkpoint import saved_config

        args.config = saved_config(args.out)
    cfg = load_config(args.config, args.overrides)
    if args.init_tokens:
        path = auth.write_tokens(args.init_tokens, cfg.federation.num_devices)
        print(f"wrote {path} and {cfg.federation.num_devices} device token files")
        return 0
    missing = [f for f in ("tokens", "out") if not getattr(args, f)]
    if missing:
        print(f"fedspine server: missing --{' --'.join(missing)}", file=sys.stderr)
        return 2
    if not args.stall_s > 0:
        print(f"fedspine server: --stall-s must be positive, not {args.stall_s}",
              file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("fedspine server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_client_ca and not args.tls_cert:
        print("fedspine server: --tls-client-ca needs --tls-cert/--tls-key", file=sys.stderr)
        return 2
    try:
        tokens = auth.Tokens.load(args.tokens)
        tokens.check_devices(cfg.federation.num_devices)
    except ValueError as e:
        print(f"fedspine server: {e}", file=sys.stderr)
        return 2
    creds = None
    if args.tls_cert:
        creds = auth.server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)

    from fedspine_jax.server.coordinator import Coordinator
    from fedspine_jax.server.servicer import Limits, make_server

    try:
        coord = Coordinator(cfg, args.out, resume=args.resume)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"fedspine server: {e}", file=sys.stderr)
        return 2
    server, port = make_server(coord, tokens, args.listen, creds, Limits(stall_s=args.stall_s))
    host = args.listen.rsplit(":", 1)[0]
    log.info("listening on %s:%d (%s), %d devices, %d rounds, collecting round %d",
             host, port, "TLS" + (" + client certificates" if args.tls_client_ca else "")
             if creds else "insecure", coord.n, coord.rounds, coord.state.round)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        summary = coord.run(stop, linger_s=args.linger_s)
    finally:
        server.stop(grace=2).wait()
    if summary is None:
        log.info("stopped before the run finished; continue it with --resume")
        return 1
    log.info("run finished: %s", json.dumps(summary))
    return 0
