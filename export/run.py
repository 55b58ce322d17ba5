"""A device's model from a run (simulation or gRPC server) and its export.

A device's local model is what ``experiment.evaluate_devices`` evaluates: the run's
frozen model with the device's masks, the global LoRA shrunk to the device's last rank and
the global head. :func:`load_run` + :func:`device_model` rebuild it from a run directory with the
simulator's own code (``experiment.setup`` for the model, tokenizer and data,
``checkpoint.restore`` for the state, ``experiment.load_device_model`` for the device),
so an exported model is exactly the model the run reported on. The verification inputs
are the first examples of the task's evaluation split, tokenised as in training.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


from fedspine_jax import checkpoint, experiment
from fedspine_jax.config import Config, load_config
from fedspine_jax.export.onnx_export import ExportError, ExportResult, examples_sample, \
    export_model


@dataclasses.dataclass
class DeviceModel:
    """A device's local model, ready to export.

    Attributes:
      model: the run's full model holding the device's masks, LoRA and head (the setup's
        shared model object: load another device and this one changes).
      tokenizer: the run's tokenizer; task: the task name; max_len: ``data.max_len``.
      sample: int32 ``(B, L)`` verification inputs from the evaluation split.
      source: provenance for the metadata (run, device_id, round, rank, strategy).
      labels: the task's class names by id (``TaskData.label_names``; () when it has none).
      template: an instruction task's prompt template (``TaskData.template``; else "").
      train: the device's own training examples (``data.Examples``; INT8 calibration).
      eval: the task's evaluation examples (``data.Examples``; INT8 engine checks).
    """
    model: object
    tokenizer: object
    task: str
    max_len: int
    sample: dict
    source: dict
    labels: tuple = ()
    template: str = ""
    train: object = None
    eval: object = None


def tokenizer_name(cfg: Config) -> str:
    """The tokenizer a run uses (as ``experiment.setup`` picks it)."""
    return cfg.model.tokenizer if cfg.model.source == "random" else cfg.model.source


def load_run(run_dir: str | Path, overrides=()) -> tuple[Config, experiment.Setup, object,
                                                         dict, int]:
    """(config, setup, state, extra, step) of a run directory's newest checkpoint.

    ``overrides`` (``section.key=value``) apply on top of the run's ``config.yaml``, e.g.
    ``data.source=...`` when the data lives elsewhere on this machine.
    """
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ExportError(f"{str(run)!r} is not a run directory (no config.yaml); give the "
                          f"--out directory of `fedspine simulate` or `fedspine server`")
    cfg = load_config(run / "config.yaml", list(overrides))
    if not checkpoint.steps(run / "checkpoints"):
        raise ExportError(f"run {str(run)!r} has no checkpoint yet (checkpoints/round_*)")
    s = experiment.setup(cfg)
    state, extra, step = checkpoint.restore(run / "checkpoints", s.fed)
    return cfg, s, state, extra, step


def device_model(s: experiment.Setup, state, device_id: int, *, run: str = "",
                 step: int | None = None, tokenizer=None) -> DeviceModel:
    """Device ``device_id``'s local model from a setup and a federation state (its record's
    masks, the global LoRA shrunk to its last rank, the global head)."""
    n = s.cfg.federation.num_devices
    if not 0 <= int(device_id) < n:
        raise ExportError(f"device id {device_id} outside 0..{n - 1} (the run has {n} devices)")
    i = int(device_id)
    model = experiment.load_device_model(s, state, i)
    if tokenizer is None:
        from fedspine_jax.models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_name(s.cfg))
    source = {"run": str(run), "device_id": i, "round": None if step is None else int(step),
              "rank": int(state.devices.rank[i]), "strategy": s.cfg.federation.strategy,
              "heads_kept": float(state.devices.head_masks[i].mean()),
              "channels_kept": float(state.devices.channel_masks[i].mean())}
    return DeviceModel(model=model, tokenizer=tokenizer, task=s.cfg.data.task,
                       max_len=s.cfg.data.max_len, sample=examples_sample(s.task.eval),
                       source=source, labels=s.task.label_names, template=s.task.template,
                       train=s.task.train.take(s.devices[i].train_idx), eval=s.task.eval)


def export_device(dm: DeviceModel, out: str | Path, cfg: Config, **kw) -> ExportResult:
    """Export a :class:`DeviceModel` with the run's ``export`` settings (``kw`` overrides
    ``opset`` / ``tolerance`` / ``external_threshold`` / ``int8``)."""
    kw.setdefault("opset", cfg.export.opset)
    kw.setdefault("tolerance", cfg.export.tolerance)
    return export_model(dm.model, out, tokenizer=dm.tokenizer, task=dm.task,
                        max_len=dm.max_len, sample=dm.sample, source=dm.source,
                        labels=dm.labels, template=dm.template, **kw)


def export_run_device(run_dir: str | Path, device_id: int, out: str | Path, overrides=(),
                      **kw) -> ExportResult:
    """``fedspine export RUN_DIR --device-id I --out model.onnx`` as a function."""
    return export_run_device_model(run_dir, device_id, out, overrides, **kw)[0]


def export_run_device_model(run_dir: str | Path, device_id: int, out: str | Path,
                            overrides=(), **kw) -> tuple[ExportResult, DeviceModel]:
    """:func:`export_run_device`, also returning the :class:`DeviceModel` (its data
    calibrates an INT8 engine)."""
    cfg, s, state, extra, step = load_run(run_dir, overrides)
    dm = device_model(s, state, device_id, run=str(run_dir), step=step)
    return export_device(dm, out, cfg, **kw), dm


def export_run_peft(run_dir: str | Path, out: str | Path, overrides=()) -> tuple[Path, dict]:
    """``fedspine export RUN_DIR --peft DIR``: the run's global LoRA (at the global rank)
    and task head as a PEFT adapter of the run's pretrained model. Returns the directory
    and ``{"round", "rank", "alpha", "targets", "id2label"}`` (``id2label``: the task's
    class names, ``{}`` for a decoder; a PEFT adapter has no place for them, the base
    model is loaded with them)."""
    from fedspine_jax.export.hf import HFExportError, export_peft
    from fedspine_jax.export.metadata import class_names
    from fedspine_jax.models.state import set_head, set_lora

    cfg, s, state, extra, step = load_run(run_dir, overrides)
    if cfg.model.source == "random":
        raise HFExportError("model.source=random has no Hugging Face base model for a PEFT "
                            "adapter; export the device's model with --hf instead")
    set_lora(s.model, state.lora)
    if state.head:
        set_head(s.model, state.head)
    base = cfg.model.source
    path = export_peft(s.model, out, base_model=base)
    a = s.model.cfg
    id2label = ({i: n for i, n in enumerate(class_names(a.num_labels, s.task.label_names))}
                if a.num_labels > 0 else {})
    return path, {"round": step, "rank": a.lora_rank, "alpha": a.lora_alpha,
                  "targets": a.lora_targets, "id2label": id2label}


def export_run_hf(run_dir: str | Path, device_id: int, out: str | Path, overrides=()
                  ) -> tuple[Path, DeviceModel]:
    """``fedspine export RUN_DIR --device-id I --hf DIR``: the device's pruned model with
    its LoRA merged, as a ``save_pretrained``-style directory (with the tokenizer)."""
    from fedspine_jax.export.hf import export_hf

    cfg, s, state, extra, step = load_run(run_dir, overrides)
    dm = device_model(s, state, device_id, run=str(run_dir), step=step)
    return export_hf(dm.model, out, tokenizer=dm.tokenizer, labels=dm.labels), dm
