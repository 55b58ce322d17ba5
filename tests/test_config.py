"""Config loading, validation errors that name the key, overrides, round trips."""

from __future__ import annotations

import pytest
import yaml

from fedspine_jax.config import ConfigError, dump_config, from_dict, load_config, to_dict


def test_tiny_config_loads(tiny_config_path):
    cfg = load_config(tiny_config_path)
    assert cfg.model.source == "random" and cfg.federation.num_devices == 3
    assert cfg.lora.rank_choices == (2, 4, 8)


@pytest.mark.parametrize("raw,needle", [
    ({"lora": {"rnak": 4}}, "lora.rnak"),
    ({"lroa": {}}, "lroa"),
    ({"lora": {"rank": "eight"}}, "lora.rank='eight': expected an integer"),
    ({"lora": {"rank": True}}, "lora.rank=True"),
    ({"pruning": {"target_ratio": 1.5}}, "pruning.target_ratio=1.5: out of range"),
    ({"federation": {"strategy": "fedprox"}}, "federation.strategy='fedprox': allowed values"),
    ({"lora": {"rank": 4, "rank_choices": [2, 8]}}, "lora.rank_choices"),
    ({"data": {"length_buckets": [16, "x"]}}, "data.length_buckets"),
    ({"model": {"hidden_size": 30, "num_heads": 4}}, "model.num_heads=4"),
])
def test_bad_values_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    assert needle in str(e.value)


def test_overrides_and_round_trip(tiny_config_path, tmp_path):
    cfg = load_config(tiny_config_path, ["lora.rank=16", "lora.rank_choices=[4, 16]",
                                         "federation.rounds=7", "data.task=mnli"])
    assert cfg.lora.rank == 16 and cfg.federation.rounds == 7 and cfg.data.task == "mnli"
    out = tmp_path / "c.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(tiny_config_path, ["rank=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_configs_in_repo_are_valid():
    from pathlib import Path

    from fedspine_jax.sweep import load_sweep

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        # Sweep configs carry a `sweep:` search space on top of the base config.
        if "sweep" in (yaml.safe_load(path.read_text()) or {}):
            load_sweep(path)
        else:
            load_config(path)
