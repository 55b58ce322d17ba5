"""The devices' exported models at the end of a run, for ``FetchModel``.

TensorRT engines only run on the GPU (and TensorRT version) they were built on, so the
server ships ONNX: when the run is over the coordinator exports every device's model
(``fedspine_jax.export``: compacted, LoRA merged, verified against JAX) into
``<run>/models/device_<i>/model.onnx`` (+ ``model.onnx.data`` above 2 GiB of weights),
and each device agent fetches its own and builds its engine locally.

:class:`ModelStore` is the thread-safe record of that: which devices have a model (files,
sizes, sha256), which could not be exported and why, and whether the export is still under
way (a fetch long-polls on it). ``manifest.json`` in the models directory records the
result, so a server restarted (``--resume``) after the run ended serves the same files
without exporting again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

from fedspine_jax.export.metadata import sha256_file

log = logging.getLogger("fedspine.server")

MANIFEST = "manifest.json"


class NoModel(Exception):
    """The server has no model for this device; the message says why."""


@dataclasses.dataclass(frozen=True)
class ModelFileInfo:
    """One file of a device's model."""
    name: str
    path: Path
    size: int
    sha256: str


class ModelStore:
    """Per-device exported model files under ``directory`` (thread-safe).

    States: ``pending`` (the run is not over), ``exporting``, ``ready`` (every device has
    files or an error), ``off`` (``export.at_end`` is false).
    """

    def __init__(self, directory: Path, num_devices: int, enabled: bool = True):
        self.dir = Path(directory)
        self.n = num_devices
        self._cv = threading.Condition()
        self._files: dict[int, list[ModelFileInfo]] = {}
        self._errors: dict[int, str] = {}
        self._sent: set[int] = set()
        self.round = 0
        self.state = "pending" if enabled else "off"
        if enabled:
            self._load_manifest()

    def _load_manifest(self) -> None:
        p = self.dir / MANIFEST
        if not p.is_file():
            return
        try:
            m = json.loads(p.read_text())
            files = {int(k): [ModelFileInfo(f["name"], self.dir / f"device_{k}" / f["name"],
                                            int(f["size"]), f["sha256"]) for f in v]
                     for k, v in m["files"].items()}
            errors = {int(k): str(v) for k, v in m["errors"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable %s (%s): models will be exported again", p, e)
            return
        if any(not f.path.is_file() or f.path.stat().st_size != f.size
               for fs in files.values() for f in fs):
            log.warning("%s lists missing files: models will be exported again", p)
            return
        self._files, self._errors = files, errors
        self.round = int(m.get("round", 0))
        self.state = "ready"

    def _write_manifest(self) -> None:
        m = {"round": self.round,
             "files": {str(i): [{"name": f.name, "size": f.size, "sha256": f.sha256}
                                for f in fs] for i, fs in self._files.items()},
             "errors": {str(i): e for i, e in self._errors.items()}}
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(m, indent=1))
        tmp.replace(self.dir / MANIFEST)

    def export_all(self, export_one: Callable[[int, Path], list[Path]], round_: int) -> None:
        """Export every device's model with ``export_one(device_id, out_path) -> files``
        (unless already done); a device whose export raises gets its error recorded."""
        with self._cv:
            if self.state != "pending":
                return
            self.state = "exporting"
            self.round = int(round_)
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        for i in range(self.n):
            try:
                paths = export_one(i, self.dir / f"device_{i}" / "model.onnx")
                infos = [ModelFileInfo(p.name, p, p.stat().st_size, sha256_file(p))
                         for p in paths]
            except Exception as e:  # recorded and served as NOT_FOUND; the run is kept
                msg = f"{type(e).__name__}: {e}"
                log.error("device %d: model export failed: %s", i, msg)
                with self._cv:
                    self._errors[i] = msg
                continue
            with self._cv:
                self._files[i] = infos
            log.info("device %d: exported %s (%.2f MiB)", i,
                     " + ".join(f.name for f in infos), sum(f.size for f in infos) / 2**20)
        with self._cv:
            self.state = "ready"
            self._write_manifest()
            self._cv.notify_all()
        log.info("exported %d of %d device models in %.1f s", len(self._files), self.n,
                 time.perf_counter() - t0)

    def get(self, device_id: int, wait_s: float) -> list[ModelFileInfo] | None:
        """The device's files; None while still exporting after ``wait_s``; raises
        :class:`NoModel` when there is none (export off or failed)."""
        until = time.monotonic() + max(0.0, float(wait_s))
        with self._cv:
            while self.state in ("pending", "exporting"):
                left = until - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
            if self.state == "off":
                raise NoModel("this server does not export models (export.at_end is false); "
                              "export one with `fedspine export RUN_DIR --device-id I`")
            if device_id in self._errors:
                raise NoModel(f"exporting device {device_id}'s model failed on the server: "
                              f"{self._errors[device_id]}")
            return list(self._files[device_id])

    def sent(self, device_id: int) -> None:
        """Record that a device received its model (the server's linger waits for them)."""
        with self._cv:
            self._sent.add(device_id)
            self._cv.notify_all()

    def all_sent(self) -> bool:
        """True once every device with a model received it (or there is nothing to send)."""
        with self._cv:
            if self.state in ("off", "pending"):
                return True
            if self.state == "exporting":
                return False
            return set(self._files) <= self._sent


__all__ = ["ModelFileInfo", "ModelStore", "NoModel", "sha256_file"]
