"""The ``fedspine`` command line.

Subcommands are thin: each parses its arguments and calls one function of the module that
owns the work. The transports and the exporter (``fedspine_jax.server``,
``fedspine_jax.device_runtime``, ``fedspine_jax.export``) are looked up by module name at
call time, so the core never imports them (imports flow one way, see DESIGN.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module that implements it, one-line help)
COMMANDS = {
    "simulate": ("fedspine_jax.simulation", "run an in-process federated simulation"),
    "compare": ("fedspine_jax.simulation", "run several methods on the same seeds and traces"),
    "report": ("fedspine_jax.report", "render tables and plots of a run or comparison"),
    "sweep": ("fedspine_jax.sweep", "S-UCB hyperparameter sweeps on synthetic fleets"),
    "server": ("fedspine_jax.server.cli", "run the gRPC federation server"),
    "device": ("fedspine_jax.device_runtime.cli", "run a device agent against a server"),
    "export": ("fedspine_jax.export.cli", "export a device's pruned model to ONNX / TensorRT"),
    "infer": ("fedspine_jax.device_runtime.infer_cli", "run inference with an exported model"),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: configs/sst2_minilm.yaml settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedspine",
        description="FedSpine-JAX: federated LoRA fine-tuning with adaptive structured pruning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = _load(name)
        add_args = getattr(module, "add_arguments", None) if module else None
        if add_args is not None:
            add_args(p)
        else:
            p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _load(name: str):
    """The module implementing ``name``, or None while it does not exist yet."""
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = _load(args.command)
    run = getattr(module, "run_cli", None) if module else None
    if run is None:
        print(f"fedspine {args.command}: not yet available in this version", file=sys.stderr)
        return 2
    from fedspine_jax.config import ConfigError

    try:
        return int(run(args) or 0)
    except ConfigError as e:
        print(f"fedspine {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
