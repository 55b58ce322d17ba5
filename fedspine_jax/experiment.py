"""What a run is built from, for every part that runs one: model, data, partition, fleet.

:func:`setup` builds, deterministically from a config, the model (its frozen weights and
LoRA adapters at the global rank), the task's data, the devices' partitions, the simulated
fleet and the :class:`~fedspine_jax.federation.Federation` of the run. The simulator, the
gRPC coordinator, a device agent (which takes its own partition from it) and the exporter
all start here, so they agree on every device's data and model. :func:`load_device_model`
and :func:`evaluate_devices` put a device's local model together from the federation state
(its record's masks, the global LoRA shrunk to its last rank, the global head) and measure
the paper's Test Accuracy.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fedspine_jax import data, heterogeneity
from fedspine_jax.config import Config
from fedspine_jax.federation import Federation
from fedspine_jax.models import ArchConfig, build_model, load_pretrained, load_tokenizer
from fedspine_jax.models.hf_names import resolve_targets
from fedspine_jax.models.state import set_head, set_lora, set_masks
from fedspine_jax.train import evaluate

BYTES_PER_PARAM = 4  # LoRA factors travel as float32


@dataclasses.dataclass
class Setup:
    """Everything a run needs that is derived from the config (not checkpointed)."""
    cfg: Config
    model: object
    task: data.TaskData
    devices: list
    fleet: heterogeneity.Fleet
    fed: Federation


def build_model_for(cfg: Config, num_labels: int | None):
    """The model of ``cfg.model`` with ``cfg.lora`` adapters at the global rank."""
    m = cfg.model
    targets = cfg.lora.targets
    if m.source == "random":
        targets = resolve_targets(m.arch, targets)
        heads = m.num_heads
        arch = ArchConfig(
            arch=m.arch, vocab_size=m.vocab_size, hidden_size=m.hidden_size,
            num_layers=m.num_layers, num_heads=heads,
            num_kv_heads=m.num_kv_heads if m.arch == "llama" else heads,
            head_dim=m.hidden_size // heads, intermediate_size=m.intermediate_size,
            max_positions=m.max_positions, type_vocab_size=1 if m.arch == "roberta" else 2,
            rope_theta=m.rope_theta, pad_token_id=1 if m.arch == "roberta" else 0,
            num_labels=num_labels or 0, lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
            lora_targets=tuple(targets), lora_init_std=cfg.lora.init_std,
            lora_dropout=cfg.lora.dropout, norm_eps=1e-6 if m.arch == "llama" else 1e-12)
        return build_model(arch, m.seed)
    model, _ = load_pretrained(m.source, num_labels=num_labels, lora_rank=cfg.lora.rank,
                               lora_alpha=cfg.lora.alpha, lora_targets=tuple(targets),
                               lora_dropout=cfg.lora.dropout, lora_init_std=cfg.lora.init_std,
                               seed=m.seed, with_tokenizer=False)
    return model


def setup(cfg: Config) -> Setup:
    """Load model, data, partition and fleet for a run (deterministic from the config)."""
    tokenizer = load_tokenizer(cfg.model.tokenizer if cfg.model.source == "random"
                               else cfg.model.source)
    task = data.load_task(cfg.data, tokenizer, cfg.federation.seed)
    model = build_model_for(cfg, task.num_labels)
    n = cfg.federation.num_devices
    devices = data.partition(task, n, cfg.data, cfg.federation.seed)
    fleet = heterogeneity.build_fleet(cfg)
    # capability tier: 0 = strongest type (AGX), used by HETLoRA's rank policy
    tiers = (heterogeneity.AGX - np.asarray(fleet.device_type)).astype(int)
    fed = Federation(cfg, n, tiers, model.cfg,
                     num_samples_limit=np.array([len(d.train_idx) for d in devices]))
    return Setup(cfg, model, task, devices, fleet, fed)


def device_examples(s: Setup, i: int) -> tuple[data.Examples, data.Examples]:
    d = s.devices[i]
    return s.task.train.take(d.train_idx), s.task.train.take(d.holdout_idx)


def load_device_model(s: Setup, state, device_id: int, shrunk: dict | None = None):
    """Put device ``device_id``'s local model into ``s.model`` (in place) and return it.

    The local model is the device's masks from its record, the global LoRA shrunk to the
    rank of its last round and the global head. ``shrunk`` caches the shrunk LoRA per rank
    across calls. Used by :func:`evaluate_devices` and by the exporter
    (``fedspine export RUN_DIR --device-id I``).
    """
    rec = state.devices
    r = int(rec.rank[device_id])
    shrunk = {} if shrunk is None else shrunk
    if r not in shrunk:
        shrunk[r] = s.fed.shrink(state.lora, r)
    set_lora(s.model, shrunk[r])
    if state.head:
        set_head(s.model, state.head)
    set_masks(s.model, rec.head_masks[device_id], rec.channel_masks[device_id])
    return s.model


def evaluate_devices(s: Setup, state) -> np.ndarray:
    """(N,) test accuracy of every device's local model on the task's evaluation split.

    The split is batched shortest first (accuracy is a mean over examples, so the order is
    free): most batches then fit the smaller length buckets and pack fewer tokens."""
    ex = s.task.eval
    batches = list(data.eval_batches(ex.take(np.argsort(ex.lengths, kind="stable")), 64))
    accs = []
    shrunk = {}
    for i in range(s.fed.num_devices):
        load_device_model(s, state, i, shrunk)
        accs.append(evaluate(s.model, batches))
    return np.asarray(accs)


def lora_bytes(lora: dict) -> int:
    """Bytes of a LoRA payload as it travels (float32 factors)."""
    return int(sum(v.size for v in jax.tree.leaves(lora))) * BYTES_PER_PARAM
