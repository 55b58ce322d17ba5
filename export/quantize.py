"""INT8 for CPUs: the CPU-serving graph with dynamically quantized weights.

``onnxruntime.quantization.quantize_dynamic`` stores every ``MatMul`` weight as int8 (per
tensor, symmetric) and quantizes the activations feeding it to uint8 at run time, per
call, from their observed range (``DynamicQuantizeLinear``); ONNX Runtime fuses that into
``DynamicQuantizeMatMul``, which runs on the CPU's integer dot-product instructions
(AVX-512 VNNI / AVX-VNNI where present, else AVX2). The embedding tables are quantized too
(``Gather`` on int8 + ``DequantizeLinear``). Attention scores, softmax, LayerNorm and GELU
stay fp32. No calibration data is needed: the activation ranges are taken per call.

The quantized graph is made from the fused CPU graph (``export.cpu_graph``), as ONNX
Runtime recommends for transformers (quantize after fusing), and is checked against the
fp32 CPU graph on the verification inputs: the largest logit difference and how many
argmax decisions agree are reported. Its task accuracy is what
``benchmarks/inference.py`` measures next to fp32's.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from fedspine_jax.export import graph, metadata


@dataclasses.dataclass
class Int8Check:
    """The INT8 graph against the fp32 CPU graph on the same inputs.

    Attributes:
      max_abs_diff: largest absolute difference of the first output (logits).
      argmax_agreement: fraction of rows whose argmax (predicted label) is the same.
      rows: how many rows were compared.
    """
    max_abs_diff: float
    argmax_agreement: float
    rows: int


def quantize(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """The dynamically quantized copy of an fp32 CPU graph (metadata says ``cpu-int8``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        onnx.save_model(fp32, str(src))
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "consider pre-processing": shapes are inferred
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True})
        finally:
            quiet.setLevel(level)
        model = onnx.load(str(dst))
    entries = {e.key: e.value for e in model.metadata_props}
    meta, _ = metadata.parse_props(entries, "the quantized graph")
    meta = dataclasses.replace(meta, graph=metadata.CPU_INT8)
    for e in model.metadata_props:
        if e.key == metadata.META_KEY:
            e.value = meta.to_json()
    return model


def write_int8(cpu_path: str | Path, out: str | Path, sample: dict[str, np.ndarray]
               ) -> tuple[list[Path], Int8Check]:
    """Quantize the CPU graph at ``cpu_path`` to ``out`` and check it (see the module note).

    Args:
      cpu_path: a ``.cpu.onnx`` written by ``export_model``.
      out: the ``.int8.onnx`` to write.
      sample: int32 ``(B, L)`` inputs of the graph (the export's verification inputs).
    Returns:
      (files written, :class:`Int8Check`).
    """
    from fedspine_jax.export.onnx_export import _session

    files = graph.save(quantize(onnx.load(str(cpu_path))), out)
    ref = _session(Path(cpu_path)).run(None, sample)[0]
    got = _session(Path(out)).run(None, sample)[0]
    agree = (got.reshape(len(got), -1).argmax(-1) == ref.reshape(len(ref), -1).argmax(-1))
    return files, Int8Check(float(np.max(np.abs(got - ref))), float(agree.mean()), len(agree))
