"""Regenerate ``fedspine_pb2.py`` / ``fedspine_pb2_grpc.py`` from ``fedspine.proto``.

Development only (needs ``grpcio-tools``; users get the committed modules)::

    python -m fedspine_jax.server.codegen            # rewrite the modules beside the proto
    python -m fedspine_jax.server.codegen --check    # exit 1 if they are out of date

protoc derives the generated ``import`` lines from the proto's path, so the proto is copied
to ``fedspine_jax/server/fedspine.proto`` inside a temporary directory first: the gRPC
module then imports ``from fedspine_jax.server import fedspine_pb2`` (an installed
package path) instead of a bare top-level ``fedspine_pb2``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "fedspine.proto"
OUTPUTS = ("fedspine_pb2.py", "fedspine_pb2_grpc.py")
# Version stamps the generators write (grpcio-tools' own version, its protobuf's): a patch
# release of the tools changes them and nothing else, so they are not compared.
_STAMPS = (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
           re.compile(r"^# Protobuf Python Version: .*$", re.M),
           re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
                      r"\s*\d+,\s*\d+,\s*\d+,"))


def generate(dest: Path) -> list[Path]:
    """Run protoc on the proto; write the two modules into ``dest``; return their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "fedspine_jax" / "server"
        pkg.mkdir(parents=True)
        shutil.copy(PROTO, pkg / PROTO.name)
        rel = f"fedspine_jax/server/{PROTO.name}"
        rc = protoc.main(["protoc", f"-I{tmp}", f"--python_out={tmp}",
                          f"--grpc_python_out={tmp}", rel])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit status {rc}")
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for name in OUTPUTS:
            shutil.copy(pkg / name, dest / name)
            out.append(dest / name)
        return out


def same_code(generated: str, committed: str) -> bool:
    """Whether two generated modules are the same code, version stamps aside."""
    def strip(text: str) -> str:
        for stamp in _STAMPS:
            text = stamp.sub("<version>", text)
        return text
    return strip(generated) == strip(committed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="only compare with the committed modules")
    args = p.parse_args(argv)
    if not args.check:
        for path in generate(HERE):
            print(f"wrote {path.name}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [n for n, path in zip(OUTPUTS, generate(Path(tmp)))
                 if not same_code(path.read_text(), (HERE / n).read_text())]
    if stale:
        print(f"out of date: {stale}; run python -m fedspine_jax.server.codegen")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
