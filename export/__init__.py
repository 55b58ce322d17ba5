"""Shipping a pruned model (installs as ``fedspine_jax.export``).

compaction + LoRA merge -> ONNX (jax2onnx) -> verified in ONNX Runtime -> TensorRT engine:

* ``onnx_export`` -- :func:`export_model` (any pruned model), the traced graphs, the
  verification against JAX;
* ``run`` -- a device's model from a run directory (:func:`export_run_device`), and the
  run's results for the Hugging Face ecosystem (:func:`export_run_peft`,
  :func:`export_run_hf`);
* ``hf`` -- :func:`export_peft` (a PEFT LoRA adapter) and :func:`export_hf` (a pruned,
  merged model as a ``save_pretrained`` directory);
* ``graph`` -- TensorRT-friendly graph passes, external data;
* ``metadata`` -- what an exported file says about itself (I/O, labels, tokenizer);
* ``tensorrt`` -- :func:`build_engine` and the equivalent ``trtexec`` command;
* ``cli`` -- ``fedspine export``.
"""

import importlib

# Imported on first use: ``fedspine --help`` and the device runtime should not pay for
# JAX / jax2onnx when they only need the metadata.
_EXPORTS = {"ExportError": "onnx_export", "ExportResult": "onnx_export",
            "export_model": "onnx_export", "verify": "onnx_export",
            "sample_inputs": "onnx_export", "export_run_device": "run",
            "load_run": "run", "device_model": "run", "build_engine": "tensorrt",
            "TensorRTUnavailable": "tensorrt", "trtexec_command": "tensorrt",
            "ModelMeta": "metadata", "MetadataError": "metadata",
            "export_peft": "hf", "export_hf": "hf", "HFExportError": "hf",
            "export_run_peft": "run", "export_run_hf": "run"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
