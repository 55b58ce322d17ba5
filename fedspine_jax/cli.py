"""The ``fedspine`` command line.

Design note
-----------
Subcommands are thin: each parses its arguments and calls one function of the module that
owns the work. Building the parser imports no JAX: the core's own subcommands (simulate,
compare, sweep) declare their arguments here, ``report`` in its own light module, and the
transports and the exporter (``fedspine_jax.server``, ``fedspine_jax.device_runtime``,
``fedspine_jax.export``) in their ``cli`` modules, looked up by name so that the core never
imports them (imports flow one way, see DESIGN.md). The work's modules are imported only
when a command runs, so ``fedspine --help`` answers at once.

Errors a user can cause (:class:`~fedspine_jax.errors.UserError`, and the operating system's
file errors) end in one line, ``fedspine <command>: <message>``, with exit status 2; a
traceback means a bug (``FEDSPINE_TRACEBACK=1`` shows it for any error). Ctrl-C, and a
run's file that cannot be written (``StorageError``: disk full, read-only directory), print
the command that continues the run.

Commands that compile (simulate, compare, sweep, server, device, export, infer) keep JAX's
persistent compilation cache in the user's cache directory
(``$XDG_CACHE_HOME/fedspine-jax/jax``, else ``~/.cache/fedspine-jax/jax``), so a second run
reuses the first one's programs; ``--no-compile-cache`` turns it off and a cache set with
``JAX_COMPILATION_CACHE_DIR`` is used as it is.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path

from fedspine_jax import __version__

# subcommand -> (module holding its add_arguments / run_cli, one-line help)
COMMANDS = {
    "simulate": (__name__, "run an in-process federated simulation"),
    "compare": (__name__, "run several methods on the same seeds and traces"),
    "report": ("fedspine_jax.report", "render tables and plots of a run or comparison"),
    "sweep": (__name__, "S-UCB hyperparameter sweeps on synthetic fleets"),
    "server": ("fedspine_jax.server.cli", "run the gRPC federation server"),
    "device": ("fedspine_jax.device_runtime.cli", "run a device agent against a server"),
    "export": ("fedspine_jax.export.cli", "export a device's pruned model to ONNX / TensorRT"),
    "infer": ("fedspine_jax.device_runtime.infer_cli", "run inference with an exported model"),
}
# Commands that run JAX programs: they get --no-compile-cache.
COMPILING = ("simulate", "compare", "sweep", "server", "device", "export", "infer")
# Commands a Ctrl-C can leave half done, and how to continue them.
RESUMABLE = {"simulate": "--resume", "server": "--resume", "compare": "", "device": ""}


# ---------------------------------------------------------------------------------------
# the core's subcommands


def _add_simulate_args(p: argparse.ArgumentParser, compare: bool) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config: a file, or the name of a shipped one (tiny, "
                        "sst2_minilm, ...; default: sst2_minilm)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--out", required=True, help="output directory")
    if compare:
        p.add_argument("--methods", default=None,
                       help="comma-separated methods, each optionally NAME:K for K seeds "
                            "(default: fedspine and the four baselines, one seed each; "
                            "'ablations' adds both ablations)")
    else:
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --out (--set may change federation.rounds, "
                            "federation.eval_every and similar; see the README)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_simulate(args) -> int:
    from fedspine_jax import simulation

    return simulation.run_cli(args)


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config with a 'sweep:' section (e.g. configs/sweep.yaml); "
                        "default: built-in defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override a config or sweep value, e.g. sweep.seeds=8 (repeatable)")
    p.add_argument("--out", default=None,
                   help="sweep: output directory; --calibrate: the parameters' JSON file "
                        "(default RUN_DIR/sweep_env.json)")
    p.add_argument("--env", default=None,
                   help="environment parameters (JSON from --calibrate); overrides sweep.env")
    p.add_argument("--calibrate", default=None, metavar="RUN_DIR",
                   help="fit the environment to a simulation run directory and save it")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_sweep(args) -> int:
    from fedspine_jax import sweep

    return sweep.run_cli(args)


_CORE = {"simulate": (lambda p: _add_simulate_args(p, compare=False), _run_simulate),
         "compare": (lambda p: _add_simulate_args(p, compare=True), _run_simulate),
         "sweep": (_add_sweep_args, _run_sweep)}


def _entry(name: str):
    """(add_arguments, run_cli) of subcommand ``name``."""
    if name in _CORE:
        return _CORE[name]
    module = importlib.import_module(COMMANDS[name][0])
    return module.add_arguments, module.run_cli


# ---------------------------------------------------------------------------------------
# parser, compilation cache, errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedspine",
        description="FedSpine-JAX: federated LoRA fine-tuning with adaptive structured pruning.")
    parser.add_argument("--version", action="version", version=f"fedspine-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _entry(name)[0](p)
        if name in COMPILING:
            p.add_argument("--no-compile-cache", action="store_true",
                           help="do not keep compiled programs in the user's cache directory")
    return parser


def compile_cache_dir() -> Path:
    """Where the commands keep JAX's persistent compilation cache."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedspine-jax" / "jax"


def enable_compile_cache() -> None:
    """Turn JAX's persistent compilation cache on in :func:`compile_cache_dir` (unless one
    is set already). Child processes inherit it through the environment."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable cache directory: run without the cache
        return
    os.environ.update(JAX_COMPILATION_CACHE_DIR=str(path),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if "jax" in sys.modules:  # already imported (read the environment before we set it)
        import jax

        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _resume_hint(command: str, argv: list[str]) -> str:
    flag = RESUMABLE[command]
    again = ["fedspine", *argv]
    if flag and flag not in again:
        again.append(flag)
    return " ".join(shlex.quote(a) for a in again)


class _Interrupt:
    """Ctrl-C that always reaches :func:`main`.

    Python raises ``KeyboardInterrupt`` wherever the main thread is when the signal arrives;
    raised inside a garbage-collector callback (JAX registers one) it is printed as
    "Exception ignored" and lost, and the run goes on. So the handler, once a Ctrl-C has
    come, raises it again every half second (``_thread.interrupt_main``) until ``main``
    has caught it, and such lost copies are not printed.
    """

    def __init__(self):
        import threading

        self.pending = False   # a Ctrl-C has come and has not reached main yet
        self.done = False      # main has it: later copies are ignored
        self._lock = threading.Lock()
        self._saved = None

    def install(self) -> None:
        """Take over SIGINT and the unraisable hook (main thread only) until :meth:`remove`."""
        import signal

        self._saved = None
        if not threading_main():
            return
        self._saved = (signal.getsignal(signal.SIGINT), sys.unraisablehook)
        signal.signal(signal.SIGINT, self._handle)
        default = sys.unraisablehook

        def hook(unraisable):
            if not isinstance(unraisable.exc_value, KeyboardInterrupt):
                default(unraisable)

        sys.unraisablehook = hook

    def caught(self) -> None:
        """``main`` has the interrupt: stop raising it."""
        with self._lock:
            self.pending, self.done = False, True

    def remove(self) -> None:
        import signal

        self.caught()
        if self._saved is not None:
            signal.signal(signal.SIGINT, self._saved[0])
            sys.unraisablehook = self._saved[1]
            self._saved = None

    def _handle(self, signum, frame):
        if self.done:
            return
        if not self.pending:
            import threading

            self.pending = True
            threading.Thread(target=self._repeat, daemon=True).start()
        raise KeyboardInterrupt

    def _repeat(self) -> None:
        import _thread
        import time

        while self.pending:
            time.sleep(0.5)
            with self._lock:
                if self.pending:
                    _thread.interrupt_main()



def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if not getattr(args, "no_compile_cache", True):
        enable_compile_cache()
    cmd = args.command
    interrupt = _Interrupt()
    if cmd in RESUMABLE:
        interrupt.install()
    try:
        return _run(cmd, args, argv, interrupt)
    finally:
        interrupt.remove()


def _run(cmd: str, args, argv: list[str], interrupt: _Interrupt) -> int:
    from fedspine_jax.errors import StorageError, UserError

    try:
        return int(_entry(cmd)[1](args) or 0)
    except (UserError, OSError) as e:
        if os.environ.get("FEDSPINE_TRACEBACK"):
            raise
        if isinstance(e, OSError) and e.filename and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = str(e) or type(e).__name__
        if isinstance(e, StorageError) and cmd in RESUMABLE:
            msg += f"; once fixed, continue with: {_resume_hint(cmd, argv)}"
        print(f"fedspine {cmd}: {_one_line(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        interrupt.caught()
        if os.environ.get("FEDSPINE_TRACEBACK"):
            raise
        hint = (f"; continue with: {_resume_hint(cmd, argv)}" if cmd in RESUMABLE else "")
        print(f"\nfedspine {cmd}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
