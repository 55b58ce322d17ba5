"""Shared fixtures: paths to the real data beside the repository, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
