"""Experiment configuration: frozen dataclasses, one per concern, loaded from YAML.

Design note
-----------
Every section is a frozen dataclass whose fields carry their allowed values in the
field metadata (``lo``/``hi`` bounds, ``choices``). :func:`load_config` maps a YAML file
onto them, applies ``--set section.key=value`` overrides, and validates every value:
an unknown section or key, a wrong type or an out-of-range value raises
:class:`ConfigError` naming the key, the value and what is allowed. Nothing downstream
reads configuration through string keys.

YAML is read with YAML 1.2's number rules (``1e-3`` is a float; PyYAML's YAML 1.1 reads it
as a string). A config argument is a file, or the name of a config shipped with the package
(``tiny``, ``sst2_minilm``, ...: :func:`config_path`). Relative paths in ``data.source``,
``model.source`` and ``model.tokenizer`` that exist are made absolute when a config loads, so
the ``config.yaml`` a run writes works from any directory.

Resume. :data:`RUN_KEYS` say how long a run goes and what it records, not what its rounds
compute: a resumed run may change them (``--resume --set federation.rounds=20``) and the
devices of a deployment need not agree on them (:func:`round_dict`); any other key that
differs from the run's saved config is refused, naming the key (:func:`for_resume`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fedspine_jax import strategies
from fedspine_jax.errors import UserError

# Where the shipped configs live (package data; the repository's configs/ folder).
CONFIGS_PACKAGE = "fedspine_jax.configs"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats: ``1e-3`` and ``5E4`` are numbers, not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """Parse YAML text with :class:`_Loader` (YAML 1.2 floats)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(UserError, ValueError):
    """A configuration key or value is not allowed; the message names both."""


def _f(default: Any, *, lo: float | None = None, hi: float | None = None,
       choices: tuple | None = None) -> Any:
    """A dataclass field with validation metadata (inclusive bounds, allowed choices)."""
    meta = {"lo": lo, "hi": hi, "choices": choices}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Pretrained name ("minilm-l6", "smollm2-135m"), a local HF directory, a .gguf file,
    # a hub id, or "random" for a randomly initialised model of the shape below.
    source: str = _f("random")
    # Architecture of a random-init model: "bert", "roberta" (encoders) or "llama" (decoder).
    arch: str = _f("bert", choices=("bert", "roberta", "llama"))
    # Width of the residual stream (random init only).
    hidden_size: int = _f(32, lo=1)
    # Number of transformer blocks (random init only).
    num_layers: int = _f(2, lo=1)
    # Query heads per attention layer (random init only).
    num_heads: int = _f(4, lo=1)
    # Key/value heads per layer for grouped-query attention (llama; encoders use num_heads).
    num_kv_heads: int = _f(2, lo=1)
    # FFN inner width (random init only).
    intermediate_size: int = _f(64, lo=1)
    # Vocabulary size (random init only); must cover the tokenizer's ids.
    vocab_size: int = _f(30522, lo=2)
    # Longest position the position embeddings / RoPE cover (random init only).
    max_positions: int = _f(128, lo=1)
    # RoPE base frequency (llama only).
    rope_theta: float = _f(10000.0, lo=1.0)
    # Tokenizer for a random-init model: a pretrained name or path.
    tokenizer: str = _f("minilm-l6")
    # Seed of the random initialisation (frozen weights and task head).
    seed: int = _f(0, lo=0)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    # Global LoRA rank R held by the server.
    rank: int = _f(8, lo=0, hi=1024)
    # LoRA alpha; the adapter's output is scaled by alpha / r.
    alpha: float = _f(16.0, lo=0.0)
    # Linears that carry LoRA: our names, attention (q, k, v, o) and FFN (fc1, fc2 / gate,
    # up, down), or PEFT's module names (query, key, value, dense for BERT / RoBERTa;
    # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj for LLaMA; all-linear).
    targets: tuple = _f(("q", "k", "v", "o", "fc1", "fc2", "gate", "up", "down"))
    # Dropout on the LoRA branch's input during local training (PEFT's lora_dropout).
    dropout: float = _f(0.0, lo=0.0, hi=0.9)
    # Ranks the scheduler may assign to a device (sorted, each <= rank).
    rank_choices: tuple = _f((2, 4, 8))
    # Std of the Gaussian initialisation of the `a` factor (and of rows added by grow).
    init_std: float = _f(0.02, lo=0.0)


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    # Fraction of prunable (attention-head + FFN-channel) parameters removed at the end.
    target_ratio: float = _f(0.5, lo=0.0, hi=0.95)
    # Round by which every device must have reached target_ratio.
    target_round: int = _f(10, lo=1)
    # Moving-average factor eta of Eq. 12.
    eta: float = _f(0.85, lo=0.0, hi=1.0)
    # Heads every attention layer keeps at least (0 lets a layer lose all its heads).
    min_heads_per_layer: int = _f(1, lo=0)
    # FFN channels every layer keeps at least.
    min_channels_per_layer: int = _f(1, lo=0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Local steps tau per round (Eq. 12 averages over them).
    local_steps: int = _f(20, lo=1)
    # Mini-batch size of a local step.
    batch_size: int = _f(32, lo=1)
    # AdamW learning rate.
    learning_rate: float = _f(5e-4, lo=0.0, hi=1.0)
    # AdamW weight decay.
    weight_decay: float = _f(0.0, lo=0.0)
    # The task head's learning rate as a multiple of learning_rate. Adam moves every head
    # weight by about the learning rate per step whatever its gradient, so a linear head on a
    # d-wide feature moves a logit by ~lr * d * |feature| per step: on a device whose data are
    # mostly one label (non-IID), a few local steps flip the head's bias and the aggregate
    # oscillates between classes. A smaller head rate lets the shared LoRA features learn.
    head_lr_scale: float = _f(1.0, lo=0.0)


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    # Defaults are the paper's S-UCB (Algorithm 1, Eq. 3-5); bandit.TUNED holds our tuned
    # settings (arm_space floor, reward log, exploration 0.01; see BENCHMARKS.md, sweeps).
    # Discount factor lambda of Eq. 4-5 (0.9 keeps too little history to learn: see
    # tests/test_bandit.py and the sweep in BENCHMARKS.md).
    discount: float = _f(0.99, lo=0.0, hi=1.0)
    # Regions are split while their (normalised) diameter exceeds delta.
    delta: float = _f(0.1, lo=0.0, hi=2.0)
    # Scale of the padding function c_t of Eq. 5; 1.0 is the paper's. The padding is in
    # reward units, so a smaller scale suits rewards of small spread (BENCHMARKS.md, sweeps).
    exploration: float = _f(1.0, lo=0.0)
    # Fixed capacity of the partition tree (leaves), so select/update are jittable.
    capacity: int = _f(64, lo=2)
    # Reward: "paper" is Eq. 3 as written (its scale depends on units); "log" compresses
    # each factor with log1p so rewards are O(1) whatever the task (see bandit.reward).
    reward: str = _f("paper", choices=("paper", "log"))
    # Pruning-ratio arm space of round t: "paper" is Algorithm 1's [p^{t-1}, p_target];
    # "floor" is ours, [max(p^{t-1}, p_target * min(t / target_round, 1)), p_target], whose
    # schedule floor guarantees p = p_target from round target_round on.
    arm_space: str = _f("paper", choices=("paper", "floor"))


@dataclasses.dataclass(frozen=True)
class AggregationConfig:
    # Eq. 16's 1/N: "normalized" uses the normalised weights c_i alone (a weighted mean);
    # "paper" multiplies them by 1/N as written (shrinks the update N-fold).
    scaling: str = _f("normalized", choices=("normalized", "paper"))
    # Only devices that still keep a head/channel contribute to its rows and columns.
    mask_aware: bool = _f(False)


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    # Method: fedspine, its ablations, or a baseline (the registry in strategies.py).
    strategy: str = _f("fedspine", choices=strategies.NAMES)
    # Number of devices N.
    num_devices: int = _f(4, lo=1)
    # Number of federated rounds.
    rounds: int = _f(10, lo=1)
    # Fraction of planned devices whose updates close a round before its deadline.
    quorum: float = _f(1.0, lo=0.0, hi=1.0)
    # Wall-clock deadline of a round in seconds (real deployment): the server closes the
    # round with the updates it has. 0 (the default): the server's default of 600 s (no
    # round waits for ever); the simulator then charges a device that runs out of memory
    # the round's slowest completion time instead of a deadline.
    deadline_s: float = _f(0.0, lo=0.0)
    # Evaluate the devices' local models every k rounds (0: only at the end).
    eval_every: int = _f(5, lo=0)
    # Master seed of the run (data split, device traces, bandit, LoRA init).
    seed: int = _f(0, lo=0)
    # Devices report simulated-clock times instead of measured ones (deployment tests).
    simulated_clock: bool = _f(False)
    # Accuracy whose first crossing gives the "time to target accuracy" (0: not tracked).
    target_accuracy: float = _f(0.0, lo=0.0, hi=1.0)
    # Keep only the newest this many round checkpoints of a run.
    keep_checkpoints: int = _f(3, lo=1)
    # Simulator: at most this many devices' local rounds run together, vmapped (devices of
    # one rank and one compacted size bucket; see train.local_rounds). 0: all devices when
    # JAX's default backend is a GPU, one at a time on a CPU (batching gains nothing there).
    device_batch: int = _f(0, lo=0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Task: a preset whose columns, labels and splits are fixed (sst2, mnli: classification;
    # dolly: instruction tuning), or an open task read with the keys below: "classification"
    # (text_column, text_pair_column, label_column, num_labels or label_names) or
    # "instruction" (template, response_column).
    task: str = _f("sst2", choices=("sst2", "mnli", "dolly", "classification", "instruction"))
    # A local directory holding a file per split (<split>.jsonl, .csv or .parquet), one local
    # file (a single split), or a Hugging Face data-set id (the `hub` extra).
    source: str = _f("../shared/data/sst2")
    # Configuration name of a hub data set ("": none; the glue presets use their own name).
    hub_config: str = _f("")
    # Split names (train, eval), or one name (eval is then a fixed 10 % of it). Empty: the
    # preset's, or [train, validation].
    splits: tuple = _f(())
    # classification: column of the text ("": "text").
    text_column: str = _f("")
    # classification: column of a second text, read as the pair's second segment ("": none).
    text_pair_column: str = _f("")
    # classification: column of the label ("": "label"). instruction: column of a category
    # the device partition stratifies by (its values in label_names; "": none).
    label_column: str = _f("")
    # classification: number of classes, labels being ids 0..num_labels-1 (0: as many as
    # label_names).
    num_labels: int = _f(0, lo=0)
    # Names of the classes by id (a label may then be its name), or of the instruction
    # categories.
    label_names: tuple = _f(())
    # instruction: the prompt, a format string naming the prompt's columns ("{instruction}");
    # the text after its last field is the response header; a blank-line separated block
    # whose fields are all empty in a record is left out. "": "### Instruction:\n
    # {instruction}\n\n### Response:\n".
    template: str = _f("")
    # instruction: column of the response, the text the model learns ("": "response").
    response_column: str = _f("")
    # Split of the training records over devices: "dirichlet" (ours: Dir(alpha) per class,
    # then a device short of min_samples_per_device takes samples of the largest) or
    # "flower_dirichlet" (flwr-datasets' DirichletPartitioner: the same partitions for the
    # same seed, alpha and min_partition_size; data.flower_dirichlet_partition).
    partition: str = _f("dirichlet", choices=("dirichlet", "flower_dirichlet"))
    # Truncate tokenised inputs to this many tokens.
    max_len: int = _f(64, lo=4)
    # Padded sequence-length buckets (each <= max_len; max_len is always one).
    length_buckets: tuple = _f((16, 32, 64))
    # Dirichlet concentration alpha of the label partition (large: near IID).
    dirichlet_alpha: float = _f(0.5, lo=1e-3)
    # Samples each device holds at least.
    min_samples_per_device: int = _f(8, lo=1)
    # Fraction of each device's samples held out for its local evaluation.
    holdout_fraction: float = _f(0.1, lo=0.0, hi=0.9)
    # Use at most this many training records (0: all), drawn with the run's seed.
    max_train_samples: int = _f(0, lo=0)
    # Evaluate on at most this many records of the evaluation split (0: all).
    max_eval_samples: int = _f(0, lo=0)


@dataclasses.dataclass(frozen=True)
class DevicesConfig:
    # Heterogeneity preset of paper section 5.3, or "custom" for the counts below.
    scenario: str = _f("high", choices=("low", "medium", "high", "custom"))
    # Device counts by type for scenario "custom".
    num_tx2: int = _f(0, lo=0)
    num_nx: int = _f(0, lo=0)
    num_agx: int = _f(0, lo=0)
    # Every device's power mode is re-drawn every this many rounds.
    mode_redraw_every: int = _f(20, lo=1)
    # Relative std of the per-round bandwidth noise.
    bandwidth_noise: float = _f(0.2, lo=0.0, hi=1.0)
    # Fraction of peak throughput a local round achieves.
    efficiency: float = _f(0.3, lo=1e-3, hi=1.0)
    # Time scale of the simulated compute. "flops": a round's FLOPs over the device's
    # throughput. "paper_regime": that time times one factor k, chosen so that a round of
    # the run's model has the compute/communication time ratio RoBERTa-base has in the
    # paper's SST-2 setting (heterogeneity.paper_regime_scale; needs data.task sst2).
    clock: str = _f("flops", choices=("flops", "paper_regime"))
    # Spread of the devices' speeds. "paper": Table 2 peaks, power modes and distance groups
    # as they are. "narrow" (paper Fig. 2c, a sensitivity setting): every round, throughputs
    # and bandwidths are compressed towards the round's strongest device so that the weakest
    # runs at 0.7 of the strongest's speed (heterogeneity.compress_spread).
    spread: str = _f("paper", choices=("paper", "narrow"))


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    # ONNX opset of exported models (17: the newest the TensorRT 8.5 of JetPack 5 parses;
    # why, in export/onnx_export.py).
    opset: int = _f(17, lo=13, hi=23)
    # Max abs difference ONNX Runtime vs JAX (fp32) above which an export fails.
    tolerance: float = _f(1e-4, lo=0.0)
    # Build TensorRT engines in fp16.
    fp16: bool = _f(False)
    # gRPC server: export every device's ONNX model when the run ends, for the devices to
    # fetch (`fedspine device --fetch-model`); needs the `export` extra.
    at_end: bool = _f(True)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    lora: LoRAConfig = LoRAConfig()
    pruning: PruningConfig = PruningConfig()
    train: TrainConfig = TrainConfig()
    bandit: BanditConfig = BanditConfig()
    aggregation: AggregationConfig = AggregationConfig()
    federation: FederationConfig = FederationConfig()
    data: DataConfig = DataConfig()
    devices: DevicesConfig = DevicesConfig()
    export: ExportConfig = ExportConfig()


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return dict(hints)


def _check_value(section: str, fld: dataclasses.Field, hint: Any, value: Any) -> Any:
    key = f"{section}.{fld.name}"
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:  # pragma: no cover - unused now
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
    elif hint is tuple:
        if isinstance(value, (list, tuple)):
            value = tuple(value)
        else:
            raise ConfigError(f"{key}={value!r}: expected a list")
        want = type(fld.default[0]) if fld.default else None
        if want is not None and not all(isinstance(v, want) and not isinstance(v, bool)
                                        for v in value):
            raise ConfigError(f"{key}={value!r}: expected a list of {want.__name__}")
    meta = fld.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key}={value!r}: allowed values are {list(meta['choices'])}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{key}={value!r}: out of range, allowed {rng}")
    return value


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}; allowed keys of {name!r}: "
                          f"{sorted(fields)}")
    values = {}
    for fname, fld in fields.items():
        values[fname] = _check_value(name, fld, hints[fname], raw.get(fname, fld.default))
    return cls(**values)


def _cross_checks(cfg: Config) -> None:
    rc = cfg.lora.rank_choices
    if list(rc) != sorted(rc) or not rc or rc[0] < 1 or rc[-1] > cfg.lora.rank:
        raise ConfigError(f"lora.rank_choices={list(rc)!r}: must be sorted, non-empty, "
                          f">= 1 and <= lora.rank={cfg.lora.rank}")
    if any(b > cfg.data.max_len for b in cfg.data.length_buckets):
        raise ConfigError(f"data.length_buckets={list(cfg.data.length_buckets)!r}: each must "
                          f"be <= data.max_len={cfg.data.max_len}")
    if cfg.model.arch == "llama" and cfg.model.num_heads % cfg.model.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads={cfg.model.num_kv_heads}: must divide "
                          f"model.num_heads={cfg.model.num_heads}")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.num_heads={cfg.model.num_heads}: must divide "
                          f"model.hidden_size={cfg.model.hidden_size}")
    for key in ("splits", "label_names"):
        value = getattr(cfg.data, key)
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"data.{key}={list(value)!r}: expected a list of strings")


def _check_data(cfg: Config) -> None:
    """The data section's task keys agree (data.task_spec's checks, as config errors)."""
    from fedspine_jax import data  # data imports this module's DataConfig

    try:
        data.task_spec(cfg.data)
    except data.DataError as e:
        raise ConfigError(str(e)) from None


def _model_arch(m: ModelConfig) -> str | None:
    """The architecture a model source names, where that is cheap to tell (None: unknown)."""
    if m.source == "random":
        return m.arch
    if m.source in ("minilm-l6", "smollm2-135m"):
        return {"minilm-l6": "bert", "smollm2-135m": "llama"}[m.source]
    if m.source.endswith(".gguf"):
        return "llama"
    hf = Path(m.source).expanduser() / "config.json"
    if hf.is_file():
        try:
            return {"bert": "bert", "roberta": "roberta", "llama": "llama"}.get(
                json.loads(hf.read_text()).get("model_type"))
        except (OSError, ValueError):
            return None
    return None


def _check_model_task(cfg: Config) -> None:
    arch, task = _model_arch(cfg.model), cfg.data.task
    if arch is None:
        return
    generative = task in ("dolly", "instruction")
    if generative and arch != "llama":
        raise ConfigError(f"data.task={task} is instruction tuning and needs a decoder, but "
                          f"model.source={cfg.model.source!r} is a {arch} encoder; use a "
                          f"LLaMA-family model (e.g. --set model.source=smollm2-135m, or "
                          f"configs/dolly_smollm2.yaml)")
    if not generative and arch == "llama":
        raise ConfigError(f"data.task={task} is classification and needs an encoder, but "
                          f"model.source={cfg.model.source!r} is a LLaMA decoder; use a "
                          f"BERT or RoBERTa model (e.g. --set model.source=minilm-l6)")


def from_dict(raw: dict) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (missing keys: defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    hints = _section_types()
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; allowed sections: {sorted(hints)}")
    cfg = Config(**{name: _build_section(name, cls, raw.get(name)) for name, cls in hints.items()})
    _cross_checks(cfg)
    _check_data(cfg)
    _check_model_task(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts/lists (YAML-serialisable)."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
            for s in SECTIONS}


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested mapping."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        path, text = item.split("=", 1)
        section, key = path.split(".", 1)
        try:
            value = yaml_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        raw.setdefault(section, {})[key] = value
    return raw


def _shipped_configs() -> Path | None:
    spec = importlib.util.find_spec(CONFIGS_PACKAGE)
    return Path(list(spec.submodule_search_locations)[0]) if spec else None


def config_path(name: str | Path) -> Path:
    """The file of a config argument: an existing file, or a shipped config by name
    (``tiny``, ``tiny.yaml`` or ``configs/tiny.yaml``)."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = _shipped_configs()
    if shipped is not None and p.suffix in ("", ".yaml", ".yml"):
        cand = shipped / f"{p.stem}.yaml"
        if cand.is_file():
            return cand
    names = sorted(f.stem for f in shipped.glob("*.yaml")) if shipped else []
    raise ConfigError(f"config file {str(name)!r} does not exist (shipped configs: "
                      f"{', '.join(names)})")


def _absolute_paths(raw: dict) -> dict:
    """Relative (or ``~``) paths of data.source, model.source and model.tokenizer that exist
    here, made absolute: a run directory's config.yaml then works from anywhere."""
    for section, key in (("data", "source"), ("model", "source"), ("model", "tokenizer")):
        value = (raw.get(section) or {}).get(key)
        if not isinstance(value, str) or value in ("", "random"):
            continue
        p = Path(value).expanduser()
        if (value.startswith("~") or not p.is_absolute()) and p.exists():
            raw[section][key] = str(p.resolve())
    return raw


def read_config(path: str | Path) -> dict:
    """The raw mapping of a config argument (a file or a shipped config's name; YAML 1.2).

    Raises:
      ConfigError: no such file or shipped config, invalid YAML, or not a mapping.
    """
    p = config_path(path)
    try:
        raw = yaml_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of sections")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
                ) -> Config:
    """Load a YAML config (a file or a shipped config's name; defaults when ``path`` is
    None), apply ``section.key=value`` overrides, validate.

    Relative paths that exist (``data.source``, ``model.source``, ``model.tokenizer``) are
    resolved against the current directory, as a user typing them would expect.
    """
    raw = read_config(path) if path is not None else {}
    return from_dict(_absolute_paths(apply_overrides(raw, overrides)))


# Keys that say how long a run goes and what it records, not what its rounds compute.
RUN_KEYS = frozenset({"federation.rounds", "federation.eval_every",
                      "federation.target_accuracy", "federation.keep_checkpoints",
                      "export.at_end", "data.source"})


def round_dict(cfg: Config) -> dict:
    """The config without :data:`RUN_KEYS`: what every round computes with (the part a
    deployment's server and devices must share)."""
    d = to_dict(cfg)
    for key in RUN_KEYS:
        section, name = key.split(".")
        d[section].pop(name)
    return d


def for_resume(saved: Config, asked: Config) -> Config:
    """The config a resumed run continues with: ``asked``, if it differs from the run's
    ``saved`` config in :data:`RUN_KEYS` only.

    Raises:
      ConfigError: naming the first other key that differs.
    """
    old, new = to_dict(saved), to_dict(asked)
    for section in SECTIONS:
        for key, value in new[section].items():
            if old[section][key] != value and f"{section}.{key}" not in RUN_KEYS:
                raise ConfigError(
                    f"--resume: {section}.{key}={value!r} differs from the run's "
                    f"{old[section][key]!r}; a resumed run may change only "
                    f"{', '.join(sorted(RUN_KEYS))}")
    return asked


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy of ``cfg`` with fields of the named sections replaced, re-validated."""
    raw = to_dict(cfg)
    for name, changes in sections.items():
        if name not in raw:
            raise ConfigError(f"unknown section {name!r}")
        raw[name].update(changes)
    return from_dict(raw)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------- sweeps
# ``fedspine sweep`` reads a config file whose ``sweep:`` section is the search space and
# whose other sections are the base :class:`Config` of every cell (fedspine_jax.sweep). The
# sweep section is not part of :class:`Config` (a run's config, its digest and its resume
# rules do not depend on it); its values are validated here, against the metadata of the
# fields they set (a swept ``discount`` has the bounds of ``bandit.discount``).


@dataclasses.dataclass(frozen=True)
class Range:
    """A continuous range of a swept hyperparameter (random search only).

    Attributes:
        low, high: the bounds, ``low < high``.
        log: draw log-uniformly (a scale spanning decades, e.g. ``exploration``).
    """

    low: float
    high: float
    log: bool = False


@dataclasses.dataclass(frozen=True)
class FleetSpec:
    """A fleet composition of a sweep: a preset of paper section 5.3 or per-type counts.

    Attributes:
        name: label in the results (the preset's name, or ``agx=3,nx=3,tx2=4``).
        scenario: a ``devices.scenario`` preset (``federation.num_devices`` devices) or
            ``custom`` (the counts below).
        counts: ``(agx, nx, tx2)`` for ``custom``.
    """

    name: str
    scenario: str
    counts: tuple[int, int, int] = (0, 0, 0)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    # "grid": every combination of the lists below; "random": `samples` configurations
    # drawn with federation.seed (lists: distinct grid points; ranges: independent draws).
    search: str = _f("grid", choices=("grid", "random"))
    # Configurations a random search draws.
    samples: int = _f(8, lo=1)
    # Values of bandit.discount / bandit.delta / bandit.exploration to try: a list, or
    # (random search) a Range {low, high, log}; bounds are those of the bandit section.
    discount: tuple | Range = _f((0.9, 0.99))
    delta: tuple | Range = _f((0.1,))
    exploration: tuple | Range = _f((0.003, 0.03, 0.3))
    # Rank sets (lora.rank_choices) to try; each sorted.
    rank_choices: tuple = _f(((2, 4, 8),))
    # Reward variants (bandit.reward) the agents learn from.
    reward: tuple = _f(("log",))
    # Seeds per configuration and fleet.
    seeds: int = _f(4, lo=1)
    # Fleet compositions: preset names or {agx: n, nx: n, tx2: n} mappings.
    fleets: tuple = _f((FleetSpec("high", "high"),))
    # The reward variant every cell is scored with (fedspine_jax.sweep, Scores).
    score: str = _f("log", choices=("paper", "log"))
    # Values of the headroom fraction u in the regret's fixed-arm grid.
    u_grid: int = _f(11, lo=1)
    # JSON file of environment parameters (fedspine sweep --calibrate); "": built-in.
    env: str = _f("")


def _meta(cls: type, name: str) -> dict:
    return dict(next(f for f in dataclasses.fields(cls) if f.name == name).metadata)


def _sweep_values(key: str, raw: Any, kind: type, lo=None, hi=None, choices=None) -> tuple:
    """A non-empty list of distinct values of ``sweep.key``; errors name the key."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ConfigError(f"sweep.{key}={raw!r}: expected a non-empty list")
    out = []
    for v in raw:
        ok = (isinstance(v, kind) and not isinstance(v, bool)) or (
            kind is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise ConfigError(f"sweep.{key}: {v!r} is not a {kind.__name__}")
        if choices is not None and v not in choices:
            raise ConfigError(f"sweep.{key}: {v!r} not in {list(choices)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"sweep.{key}: {v!r} out of range [{lo}, {hi}]")
        out.append(kind(v))
    if len(set(out)) != len(out):
        raise ConfigError(f"sweep.{key}={raw!r}: values repeat")
    return tuple(out)


def _sweep_range(key: str, raw: Any, lo=None, hi=None) -> Range:
    """``sweep.key: {low: x, high: y, log: bool}``; errors name the key."""
    if isinstance(raw, Range):
        raw = dataclasses.asdict(raw)
    bad = sorted(set(raw) - {"low", "high", "log"})
    if bad or not {"low", "high"} <= set(raw):
        raise ConfigError(f"sweep.{key}={raw!r}: a range is {{low: x, high: y, log: false}}")
    low, high = (_sweep_values(key, [raw[k]], float, lo, hi)[0] for k in ("low", "high"))
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"sweep.{key}.log={log!r}: expected true or false")
    if not low < high:
        raise ConfigError(f"sweep.{key}: low={low} must be below high={high}")
    if log and low <= 0:
        raise ConfigError(f"sweep.{key}: a log range needs low > 0 (got {low})")
    return Range(low, high, log)


def _sweep_fleet(v: Any) -> FleetSpec:
    if isinstance(v, FleetSpec):
        return v
    presets = [c for c in _meta(DevicesConfig, "scenario")["choices"] if c != "custom"]
    if isinstance(v, str):
        if v not in presets:
            raise ConfigError(f"sweep.fleets: {v!r} is not one of {sorted(presets)} "
                              f"or a mapping of counts {{agx: n, nx: n, tx2: n}}")
        return FleetSpec(v, v)
    if isinstance(v, dict):
        bad = sorted(set(v) - {"agx", "nx", "tx2"})
        if bad:
            raise ConfigError(f"sweep.fleets: unknown device type {bad[0]!r} "
                              f"(allowed: agx, nx, tx2)")
        counts = []
        for k in ("agx", "nx", "tx2"):
            c = v.get(k, 0)
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ConfigError(f"sweep.fleets.{k}={c!r}: expected an integer >= 0")
            counts.append(c)
        if sum(counts) < 1:
            raise ConfigError(f"sweep.fleets: {v!r} has no devices")
        name = ",".join(f"{k}={c}" for k, c in zip(("agx", "nx", "tx2"), counts) if c)
        return FleetSpec(name, "custom", tuple(counts))
    raise ConfigError(f"sweep.fleets: {v!r} is neither a preset name nor a mapping")


def sweep_from_dict(raw: dict | None) -> SweepConfig:
    """Build and validate a :class:`SweepConfig` from the ``sweep:`` mapping.

    Missing keys take the defaults; unknown keys and bad values raise :class:`ConfigError`
    naming ``sweep.<key>``. Swept values are checked against the bounds and choices of the
    config fields they set (``bandit.discount``, ``bandit.reward``, ...).
    """
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"sweep must be a mapping of keys (sweep.discount, ...), not "
                          f"{type(raw).__name__} {raw!r}")
    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key sweep.{unknown[0]}; allowed keys of 'sweep': "
                          f"{sorted(fields)}")
    values = {k: raw.get(k, f.default) for k, f in fields.items()}
    for k in ("search", "samples", "seeds", "score", "u_grid", "env"):
        values[k] = _check_value("sweep", fields[k], type(fields[k].default), values[k])
    for k in ("discount", "delta", "exploration"):
        m = _meta(BanditConfig, k)
        v = values[k]
        if isinstance(v, (dict, Range)):
            if values["search"] != "random":
                raise ConfigError(f"sweep.{k}: a range needs sweep.search=random")
            values[k] = _sweep_range(k, v, m["lo"], m["hi"])
        else:
            values[k] = _sweep_values(k, v, float, m["lo"], m["hi"])
    values["reward"] = _sweep_values("reward", values["reward"], str,
                                     choices=_meta(BanditConfig, "reward")["choices"])
    rank_sets = values["rank_choices"]
    if not isinstance(rank_sets, (list, tuple)) or not rank_sets:
        raise ConfigError(f"sweep.rank_choices={rank_sets!r}: expected a list of rank lists")
    rank_sets = tuple(_sweep_values("rank_choices", rs, int, lo=1) for rs in rank_sets)
    for rs in rank_sets:
        if list(rs) != sorted(rs):
            raise ConfigError(f"sweep.rank_choices: {list(rs)} must be sorted")
    values["rank_choices"] = rank_sets
    fleets = values["fleets"]
    if isinstance(fleets, (str, dict)) or not fleets:
        raise ConfigError(f"sweep.fleets={fleets!r}: expected a non-empty list")
    values["fleets"] = tuple(_sweep_fleet(f) for f in fleets)
    if len({f.name for f in values["fleets"]}) != len(values["fleets"]):
        raise ConfigError("sweep.fleets: fleets repeat")
    return SweepConfig(**values)


def load_sweep(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
               ) -> tuple[Config, SweepConfig]:
    """A config file with an optional ``sweep:`` section: the base :class:`Config` of every
    cell (its other sections) and the :class:`SweepConfig`. ``--set`` overrides apply to
    both, e.g. ``--set sweep.seeds=8``. A relative ``sweep.env`` names a file beside the
    config file (a shipped sweep's fitted environment) or, failing that, in the current
    directory."""
    raw = apply_overrides(read_config(path) if path is not None else {}, overrides)
    sweep_raw = raw.pop("sweep", None)
    spec = sweep_from_dict(sweep_raw)
    if spec.env and path is not None and not Path(spec.env).is_absolute():
        beside = config_path(path).parent / spec.env
        if beside.is_file():
            spec = dataclasses.replace(spec, env=str(beside))
    return from_dict(_absolute_paths(raw)), spec
