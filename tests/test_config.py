"""Config loading, validation errors that name the key, overrides, round trips."""

from __future__ import annotations

import pytest
import yaml

from fedspine_jax.config import (ConfigError, config_path, dump_config, for_resume, from_dict,
                                 load_config, round_dict, to_dict)


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

    from fedspine_jax.config import load_sweep

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        # Sweep configs carry a `sweep:` search space on top of the base config.
        if "sweep" in (yaml.safe_load(path.read_text()) or {}):
            load_sweep(path)
        else:
            load_config(path)


def test_yaml_12_floats(tmp_path):
    """``1e-3`` is a number (YAML 1.2), in files and in --set overrides alike."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 1e-3\n  weight_decay: 5E-2\n")
    cfg = load_config(p, ["train.head_lr_scale=2e0"])
    assert cfg.train.learning_rate == 1e-3 and cfg.train.weight_decay == 0.05
    assert cfg.train.head_lr_scale == 2.0
    assert load_config(None, ["data.source=1e3x"]).data.source == "1e3x"  # still a string


def test_shipped_configs_by_name(tiny_config_path):
    names = ("tiny", "tiny.yaml", "configs/tiny.yaml")
    assert {config_path(n).resolve() for n in names} == {tiny_config_path.resolve()}
    assert config_path("tiny").read_text() == tiny_config_path.read_text()
    assert load_config("tiny") == load_config(tiny_config_path)
    with pytest.raises(ConfigError, match="does not exist .*shipped configs: .*tiny"):
        config_path("tinyy")


def test_relative_paths_become_absolute(tmp_path, monkeypatch, shared_data):
    """A run's config.yaml must work from any directory: existing relative paths are
    resolved against the current directory when a config loads; others stay as written."""
    monkeypatch.chdir(shared_data.parent)
    cfg = load_config("tiny", ["data.source=data/sst2"])
    assert cfg.data.source == str((shared_data / "sst2").resolve())
    assert load_config("tiny", ["data.source=glue"]).data.source == "glue"  # a hub id
    assert load_config("tiny").model.tokenizer == "minilm-l6"              # a name


def test_model_and_task_must_fit():
    with pytest.raises(ConfigError, match="data.task=dolly .* needs a decoder.*smollm2"):
        from_dict({"data": {"task": "dolly"}})
    with pytest.raises(ConfigError, match="classification and needs an encoder"):
        from_dict({"model": {"source": "smollm2-135m"}, "data": {"task": "sst2"}})
    assert from_dict({"model": {"arch": "llama"}, "data": {"task": "dolly"}})


def test_resume_may_change_run_keys_only(tiny_config_path):
    saved = load_config(tiny_config_path)
    more = load_config(tiny_config_path, ["federation.rounds=5", "federation.eval_every=2"])
    assert for_resume(saved, more) == more
    other = load_config(tiny_config_path, ["train.learning_rate=0.01"])
    with pytest.raises(ConfigError, match="--resume: train.learning_rate=0.01 differs"):
        for_resume(saved, other)
    # what a deployment's devices must share leaves the run keys out
    assert round_dict(saved) == round_dict(more) != round_dict(other)


@pytest.mark.parametrize("data,needle", [
    ({"task": "sst2", "label_column": "y"}, "data.label_column='y' does not apply to the sst2"),
    ({"task": "classification"}, "data.num_labels or data.label_names"),
    ({"task": "classification", "label_names": [0, 1]}, "data.label_names=[0, 1]: expected"),
    ({"task": "classification", "num_labels": 2, "splits": "train"}, "data.splits='train'"),
    ({"task": "instruction", "template": "{q}"}, "must end with a response header"),
    ({"task": "instruction", "label_column": "topic"}, "data.label_column='topic' on an"),
    ({"task": "classification", "num_labels": 2, "partition": "flower"}, "data.partition"),
])
def test_data_task_keys_name_the_key(data, needle):
    with pytest.raises(ConfigError) as e:
        from_dict({"data": data})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_open_tasks_load_and_need_the_right_model(tiny_config_path):
    cfg = load_config(tiny_config_path, [
        "data.task=classification", "data.text_column=review", "data.label_column=stars",
        "data.label_names=[bad, good]", "data.splits=[fit, dev]",
        "data.partition=flower_dirichlet"])
    d = cfg.data
    assert (d.text_column, d.label_column, d.label_names, d.splits, d.partition) == (
        "review", "stars", ("bad", "good"), ("fit", "dev"), "flower_dirichlet")
    with pytest.raises(ConfigError, match="data.task=instruction is instruction tuning"):
        load_config(tiny_config_path, ["data.task=instruction"])
    cfg = load_config(tiny_config_path, [
        "data.task=instruction", "model.arch=llama", "model.num_kv_heads=2",
        r'data.template="Q: {question}\nA: "', "data.response_column=answer"])
    assert cfg.data.template == "Q: {question}\nA: "
