"""Shared fixtures: paths to the real data beside the repository, tiny configs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    """One persistent JAX compilation cache for the whole test session.

    Many tests compile the same programs (the tiny config's train step, at the same shapes)
    in this process and in the server, device and simulator processes of the gRPC tests;
    with the cache each is compiled once per session. A cache the user set
    (``JAX_COMPILATION_CACHE_DIR``) is used as it is; otherwise a temporary one is made and
    removed at the end. Subprocesses inherit it through the environment.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    config._fedspine_jax_cache = tempfile.mkdtemp(prefix="fedspine-jax-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=config._fedspine_jax_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    # this process: jax may have been imported (and read the environment) already
    jax.config.update("jax_compilation_cache_dir", config._fedspine_jax_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    cache = getattr(config, "_fedspine_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets (``../shared/data`` beside the repository)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found beside the repository ({SHARED_DATA.name})")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return REPO / "configs" / "tiny.yaml"


def pytest_collection_modifyitems(config, items):
    """Skip GPU / TensorRT tests cleanly where the hardware or library is absent."""
    import importlib.util

    import jax

    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if os.environ.get(
        "JAX_PLATFORMS", "") != "cpu" else False
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU visible to JAX"))
        if "tensorrt" in item.keywords and not (has_trt and has_gpu):
            item.add_marker(pytest.mark.skip(reason="tensorrt or a GPU is not available"))


@pytest.fixture(scope="session")
def tiny_run(shared_data, tmp_path_factory):
    """``fedspine simulate tiny`` on the real SST-2 slice, run once per session through the
    command line: (run directory, summary, what it printed, wall seconds).

    The simulator's tests read it, and the gRPC tests take it as the reference a
    deployment must reproduce; it also fills the session's compilation cache.
    """
    import contextlib
    import io
    import json
    import time

    from fedspine_jax.cli import main

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    printed = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        rc = main(["simulate", "tiny", "--out", str(out), "--set",
                   f"data.source={shared_data / 'sst2'}", "--no-progress"])
    seconds = time.perf_counter() - t0
    assert rc == 0, printed.getvalue()
    return out, json.loads((out / "summary.json").read_text()), printed.getvalue(), seconds


@pytest.fixture(scope="session")
def save_pruned_run():
    """``save(run, state, step, heads, channels)``: checkpoint ``step`` of ``state`` in
    ``run/checkpoints`` after pruning device 1 (``heads = (layer, slice)`` of its head mask,
    ``channels = (layer, slice)`` of its channel mask) and giving the devices ranks 8 / 4 / 2,
    as a finished run's devices differ; returns the saved state."""
    import dataclasses

    import numpy as np

    from fedspine_jax import checkpoint

    def save(run, state, step, heads, channels):
        hm, cm = state.devices.head_masks.copy(), state.devices.channel_masks.copy()
        hm[(1, *heads)] = 0
        cm[(1, *channels)] = 0
        devices = dataclasses.replace(state.devices, head_masks=hm, channel_masks=cm,
                                      rank=np.array([8, 4, 2], np.int32))
        state = dataclasses.replace(state, devices=devices)
        checkpoint.save(run / "checkpoints", step, state, {})
        return state

    return save
