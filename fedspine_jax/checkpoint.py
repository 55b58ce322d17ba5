"""Orbax checkpoints of the federation state (and any extra run state), for exact resume.

A checkpoint is one orbax ``StandardCheckpointer`` directory ``DIR/round_XXXXX`` holding a
tree of numpy arrays: ``{"server": <FederationState as a tree>, "extra": {...}}``; the
federation state includes every device's record (masks, carried importance, stream
position, rank), so a run resumes exactly from it. Orbax
writes to a temporary directory and renames it when complete, so a crash mid-save leaves
the previous checkpoint intact and no half-written one is ever picked up.
The LoRA and head trees are stored flat under their paths (``layers|0|attn|q|lora_a``: ``|``
for ``/`` because orbax uses the tree path as a file path; flat so that integer layer keys
come back as they went in).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fedspine_jax import bandit
from fedspine_jax.config import Config, dump_config, for_resume, load_config
from fedspine_jax.errors import RunDirError
from fedspine_jax.federation import DeviceRecords, DeviceUpdate, Federation, FederationState
from fedspine_jax.models.state import flatten, unflatten

_STEP = re.compile(r"^round_(\d+)$")


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
    """Inverse of :func:`state_to_tree` (the bandit's static params come from the config).

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


def save(directory: str | Path, step: int, state: FederationState, extra: dict | None = None,
         keep: int | None = None) -> Path:
    """Write checkpoint ``step`` (overwriting one of the same step); keep the newest ``keep``."""
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"round_{step:05d}"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, {"server": state_to_tree(state), "extra": extra or {}}, force=True)
    ckpt.wait_until_finished()
    if keep is not None:
        import shutil

        for old in steps(d)[:-keep]:
            shutil.rmtree(d / f"round_{old:05d}", ignore_errors=True)
    return path


def restore(directory: str | Path, fed: Federation, step: int | None = None
            ) -> tuple[FederationState, dict, int]:
    """(state, extra, step) of checkpoint ``step`` (default: the newest)."""
    d = Path(directory).resolve()
    available = steps(d)
    if not available:
        raise FileNotFoundError(f"no checkpoint in {str(d)!r}")
    step = available[-1] if step is None else step
    if step not in available:
        raise FileNotFoundError(f"no checkpoint round_{step:05d} in {str(d)!r}; "
                                f"have {available}")
    tree = ocp.StandardCheckpointer().restore(d / f"round_{step:05d}")
    return state_from_tree(tree["server"], fed), tree.get("extra") or {}, step
