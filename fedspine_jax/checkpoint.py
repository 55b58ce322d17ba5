"""Orbax checkpoints of the federation state (and any extra run state), for exact resume.

A checkpoint is one orbax ``StandardCheckpointer`` directory ``DIR/round_XXXXX`` holding a
tree of numpy arrays: ``{"server": <FederationState as a tree>, "extra": {...}}``; the
federation state includes every device's record (masks, carried importance, stream
position, rank), so a run resumes exactly from it. Orbax
writes to a temporary directory and renames it when complete, so a crash mid-save leaves
the previous checkpoint intact and no half-written one is ever picked up.

Every checkpoint is verified. Once orbax has finished, ``save`` writes ``digest.json`` into
the step directory (atomically): the sha256 of the saved tree's leaves (path, dtype, shape,
bytes; paths in sorted order). ``restore`` recomputes it over what orbax read back; a
checkpoint whose digest does not match (flipped bytes, a truncated file), whose digest file
is unreadable, or that orbax cannot read, is *damaged*. One without a digest file (written
by an older fedspine-jax, or a crash between orbax's rename and the digest; orbax's rename
means it is complete) is restored *unverified*, with a warning saying so. ``restore`` logs a warning naming each damaged one and falls back to the newest
intact checkpoint; it raises only if none is intact. A failed write (disk full, read-only
or missing directory) raises :class:`~fedspine_jax.errors.StorageError` naming the path
and the operating system's reason, removes the half-written step and leaves the previous
checkpoints as they were.
The LoRA and head trees are stored flat under their paths (``layers|0|attn|q|lora_a``: ``|``
for ``/`` because orbax uses the tree path as a file path; flat so that integer layer keys
come back as they went in).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedspine_jax import bandit
from fedspine_jax.config import Config, dump_config, for_resume, load_config
from fedspine_jax.errors import RunDirError, StorageError
from fedspine_jax.federation import DeviceRecords, DeviceUpdate, Federation, FederationState
from fedspine_jax.models.state import flatten, unflatten

log = logging.getLogger("fedspine.checkpoint")

_STEP = re.compile(r"^round_(\d+)$")
DIGEST_FILE = "digest.json"


def _enc(tree: dict) -> dict:
    return {k.replace("/", "|"): np.asarray(v) for k, v in flatten(tree).items()}


def _dec(d: dict) -> dict:
    return unflatten({k.replace("|", "/"): np.asarray(v, np.float32)
                      for k, v in (d or {}).items()})


_ARRAYS = ("head_masks", "channel_masks", "head_importance", "channel_importance")
_INTS = ("device_id", "round", "num_samples", "peak_memory_bytes", "params_alive")


def _update_tree(u: DeviceUpdate) -> dict:
    t = {f.name: np.asarray(getattr(u, f.name)) for f in dataclasses.fields(u)
         if f.name not in ("lora", "head")}
    t["lora"], t["head"] = _enc(u.lora), _enc(u.head)
    t["stream"] = np.asarray(u.stream, np.int64)
    return t


def _update_from_tree(t: dict) -> DeviceUpdate:
    kw = {}
    for f in dataclasses.fields(DeviceUpdate):
        v = t[f.name]
        if f.name in ("lora", "head"):
            kw[f.name] = _dec(v)
        elif f.name in _ARRAYS:
            kw[f.name] = np.asarray(v, np.float32)
        elif f.name == "stream":
            kw[f.name] = tuple(int(x) for x in np.asarray(v))
        elif f.name in _INTS:
            kw[f.name] = int(v)
        else:
            kw[f.name] = float(v)
    return DeviceUpdate(**kw)


def _records_tree(rec: DeviceRecords) -> dict:
    return {f.name: np.asarray(getattr(rec, f.name)) for f in dataclasses.fields(rec)}


def _records_from_tree(t: dict) -> DeviceRecords:
    dtypes = {"scored": bool, "rank": np.int32, "stream": np.int64}
    return DeviceRecords(**{f.name: np.asarray(t[f.name], dtypes.get(f.name, np.float32))
                            for f in dataclasses.fields(DeviceRecords)})


def state_to_tree(state: FederationState) -> dict:
    """A FederationState as a tree of numpy arrays."""
    t = {"round": np.int64(state.round), "lora": _enc(state.lora), "head": _enc(state.head),
         "devices": _records_tree(state.devices),
         "updates": {str(i): _update_tree(u) for i, u in enumerate(state.updates)},
         "skipped": {str(k): {"device_id": np.int64(i),
                              "stream": np.asarray((-1, -1) if st is None else st, np.int64)}
                     for k, (i, st) in enumerate(state.skipped)}}
    if state.bandit is not None:
        t["bandit"] = {f.name: np.asarray(getattr(state.bandit, f.name))
                       for f in dataclasses.fields(state.bandit) if f.name != "params"}
    if state.plan_p is not None:
        t["plan_p"], t["plan_r"] = np.asarray(state.plan_p), np.asarray(state.plan_r)
    return t


def state_from_tree(t: dict, fed: Federation) -> FederationState:
    """Inverse of :func:`state_to_tree` (the bandit's params come from the config).

    Raises:
      RunDirError: a checkpoint written before the devices' records moved into the state
        (it cannot be continued: its rounds trained before they pruned).
    """
    if "devices" not in t:
        raise RunDirError("this checkpoint was written by an older fedspine-jax (no device "
                          "records in its state; its rounds trained before they pruned) and "
                          "cannot be resumed: start the run again in a new --out")
    b_state = None
    if "bandit" in t:
        params = bandit.BanditParams.from_config(fed.bandit_config())
        b_state = bandit.BanditState(params=params, **{k: jnp.asarray(v)
                                                       for k, v in t["bandit"].items()})
    ups = tuple(_update_from_tree(t["updates"][k])
                for k in sorted(t.get("updates", {}) or {}, key=int))
    skipped = []
    for k in sorted(t.get("skipped", {}) or {}, key=int):
        st = tuple(int(x) for x in np.asarray(t["skipped"][k]["stream"]))
        skipped.append((int(t["skipped"][k]["device_id"]), None if st[0] < 0 else st))
    return FederationState(
        round=int(t["round"]), lora=_dec(t["lora"]), head=_dec(t.get("head")), bandit=b_state,
        devices=_records_from_tree(t["devices"]),
        plan_p=np.asarray(t["plan_p"], np.float32) if "plan_p" in t else None,
        plan_r=np.asarray(t["plan_r"], np.int32) if "plan_r" in t else None, updates=ups,
        skipped=tuple(skipped))


def steps(directory: str | Path) -> list[int]:
    """Completed checkpoint steps in ``directory``, ascending."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _STEP.match(p.name)))


def saved_config(out: str | Path) -> Path:
    """The ``config.yaml`` of the run in ``out`` (what ``--resume`` starts from).

    Raises:
      RunDirError: ``out`` holds no run.
    """
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"--resume: {str(out)!r} holds no run (no config.yaml); start the "
                          f"run without --resume")
    return path


def prepare_run_dir(out: str | Path, cfg: Config, resume: bool) -> tuple[Config, bool]:
    """Check a run directory for a new run or a resume and write its ``config.yaml``
    (both transports' one resume rule).

    A new run needs a directory that holds no run. A resume needs a run (its
    ``config.yaml``) and continues with ``cfg`` where that differs from the saved config
    only in keys a resume may change (``config.for_resume``); a run stopped before its
    first checkpoint starts again from its beginning.

    Returns:
      (the config to run with, whether to restore the newest checkpoint).

    Raises:
      RunDirError: ``out`` holds a run (and ``resume`` is false), or none (and ``resume``
        is true).
      ConfigError: ``cfg`` changes a key a resume must keep (the message names it).
    """
    out = Path(out)
    done = bool(steps(out / "checkpoints"))
    if resume:
        cfg = for_resume(load_config(saved_config(out)), cfg)
    elif (out / "metrics.jsonl").exists() or done:
        raise RunDirError(f"{str(out)!r} already holds a run; continue it with --resume, "
                          f"or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    return cfg, resume and done


def tree_digest(tree: dict) -> str:
    """sha256 of a tree's leaves: each leaf's path, dtype, shape and bytes, paths sorted."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for key, leaf in sorted((jax.tree_util.keystr(k), v) for k, v in leaves):
        a = np.ascontiguousarray(leaf)
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    """Write ``path`` durably: a temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _OrbaxThreadErrors(logging.Filter):
    """Drop orbax's logs of an exception in one of its writer threads: the same error is
    raised in the caller, which reports it (as one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("orbax" in record.pathname and record.levelno >= logging.ERROR)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _storage_reason(e: Exception) -> str | None:
    """The operating system's reason for a failed write, or None if ``e`` is no such
    failure (tensorstore reports one as a ValueError carrying the errno)."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = _OS_ERROR_CODE.search(str(e))
        if m is None:
            return str(e) if isinstance(e, OSError) else None
        code = int(m.group(1))
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def save(directory: str | Path, step: int, state: FederationState, extra: dict | None = None,
         keep: int | None = None) -> Path:
    """Write checkpoint ``step`` (overwriting one of the same step) and its digest; keep the
    newest ``keep`` of the steps up to ``step`` (a later step, left by a fallback past a
    damaged checkpoint, is overwritten when the run reaches it again).

    Raises:
      StorageError: the checkpoint could not be written (the message names the path and
        the operating system's reason); checkpoints saved before are intact.
    """
    d = Path(directory).resolve()
    path = d / f"round_{step:05d}"
    tree = {"server": state_to_tree(state), "extra": extra or {}}
    quiet = _OrbaxThreadErrors()
    logging.getLogger("absl").addFilter(quiet)
    try:
        d.mkdir(parents=True, exist_ok=True)
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(path, tree, force=True)
        ckpt.wait_until_finished()
        _write_atomic(path / DIGEST_FILE, json.dumps({"sha256": tree_digest(tree)}))
    except (OSError, ValueError) as e:
        reason = _storage_reason(e)
        if reason is None:
            raise
        for half in (path, *d.glob(f"{path.name}.orbax-checkpoint-tmp*")):
            shutil.rmtree(half, ignore_errors=True)
        raise StorageError(f"cannot write checkpoint {str(path)!r}: {reason}; the "
                           f"checkpoints saved before are intact") from e
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    if keep is not None:
        older = [s for s in steps(d) if s < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(d / f"round_{old:05d}", ignore_errors=True)
    return path


def _read_verified(path: Path) -> dict:
    """The tree of checkpoint ``path``; raises ValueError (the reason) if it is damaged.
    Without a digest file the tree is returned unverified (logged)."""
    try:
        want = json.loads((path / DIGEST_FILE).read_text())["sha256"]
    except FileNotFoundError:
        want = None
        log.warning("checkpoint %s has no %s (an older fedspine-jax, or cut short before its "
                    "digest): restored without verification", path, DIGEST_FILE)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable {DIGEST_FILE} ({e})") from None
    quiet = _OrbaxThreadErrors()
    logging.getLogger("absl").addFilter(quiet)
    try:
        tree = ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # noqa: BLE001 -- whatever orbax/tensorstore raise on bad data
        why = (str(e).splitlines() or [""])[0].split(" [tensorstore_spec")[0]
        raise ValueError(f"orbax cannot read it: {type(e).__name__}: {why[:300]}") from None
    finally:
        logging.getLogger("absl").removeFilter(quiet)
    if want is not None and tree_digest(tree) != want:
        raise ValueError("its contents do not match its digest")
    return tree


def restore(directory: str | Path, fed: Federation, step: int | None = None
            ) -> tuple[FederationState, dict, int]:
    """(state, extra, step) of checkpoint ``step``, or by default of the newest intact one
    (each damaged newer one is skipped with a warning naming it and why).

    Raises:
      FileNotFoundError: no checkpoint in ``directory`` (or no ``step``).
      RunDirError: checkpoint ``step`` is damaged, or (default) every checkpoint is.
    """
    d = Path(directory).resolve()
    available = steps(d)
    if not available:
        raise FileNotFoundError(f"no checkpoint in {str(d)!r}")
    if step is not None and step not in available:
        raise FileNotFoundError(f"no checkpoint round_{step:05d} in {str(d)!r}; "
                                f"have {available}")
    damaged = []
    for k in ([step] if step is not None else available[::-1]):
        try:
            tree = _read_verified(d / f"round_{k:05d}")
        except ValueError as e:
            if step is not None:
                raise RunDirError(f"checkpoint {str(d / f'round_{k:05d}')!r} is damaged: "
                                  f"{e}") from None
            log.warning("checkpoint %s is damaged (%s); trying the one before it",
                        d / f"round_{k:05d}", e)
            damaged.append(f"round_{k:05d} ({e})")
            continue
        if damaged:
            log.warning("restored checkpoint round_%05d, the newest intact one", k)
        return state_from_tree(tree["server"], fed), tree.get("extra") or {}, k
    raise RunDirError(f"no intact checkpoint in {str(d)!r}: {'; '.join(damaged)}; the run "
                      f"cannot be resumed: start it again in a new --out")
