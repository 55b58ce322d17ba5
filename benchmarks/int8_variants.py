"""INT8 forms of one trained device model: the shipped dynamic INT8 against its variants and
against static (calibrated) INT8, accuracy and latency in the same run.

The model: a run's device model (``--run DIR --device-id I``), exported as ``fedspine
export --int8`` does (``export.run.export_run_device_model``): its fp32 CPU graph and the
shipped INT8 graph (``export.quantize``: ``quantize_dynamic``, int8 weights per tensor,
weight ``MatMul`` s only). Variants made here from the same fp32 CPU graph with
``onnxruntime.quantization``:

* dynamic: ``uint8_weights``, ``per_channel``, ``reduce_range`` (7-bit weights), and
  ``matmul_only`` (the embedding ``Gather`` s stay fp32);
* static, QDQ, uint8 activations and int8 weights on ``MatMul`` s only, calibrated on the
  device's own training examples (``tensorrt.calibration_batches``: 512 rows in batches
  of 8, padded to the model's ``max_len``; the TensorRT INT8 calibrator's data):
  ``static_minmax``, ``static_minmax_per_channel``, ``static_entropy``.

Accuracy: every SST-2 validation sentence (``../shared/data/sst2``), and how often each
graph's label equals the fp32 graph's, three ways, because dynamic INT8 takes its
activation ranges per call, over the whole batch (padded rows included), so its results
depend on which sentences share a call: ``served`` (the runtime's ``Predictor.logits``,
batches of 32 formed after sorting by length), ``input_order`` (batches of 32 in the
file's order, padded to their longest) and ``single`` (one sentence per call). Latency: every
graph in one process through the inference runtime's ONNX Runtime back end
(``device_runtime.inference.OrtBackend``: its session settings, all cores), the first
``B`` validation sentences padded to ``--seq``, round-robin in an order shuffled every
round, median of ``--repeats`` calls after two warm-up calls.

    python benchmarks/int8_variants.py --run RUN_DIR [--device-id 0] [--batches 1 32 128]

Prints one JSON object (progress on stderr). About 4 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2" / "validation.jsonl"


def make_variants(cpu_path: Path, calib: list[dict], out: Path) -> dict[str, Path]:
    """Quantize ``cpu_path`` every way the module note lists; returns name -> file."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib)

        def get_next(self):
            return next(self.batches, None)

    const_b = {"MatMulConstBOnly": True}
    dynamic = {"uint8_weights": {"weight_type": QuantType.QUInt8},
               "per_channel": {"per_channel": True},
               "reduce_range": {"reduce_range": True},
               "matmul_only": {"op_types_to_quantize": ["MatMul"]}}
    static = {"static_minmax": (CalibrationMethod.MinMax, False),
              "static_minmax_per_channel": (CalibrationMethod.MinMax, True),
              "static_entropy": (CalibrationMethod.Entropy, False)}
    files = {}
    for name, kw in dynamic.items():
        files[name] = out / f"{name}.onnx"
        quantize_dynamic(cpu_path, files[name], **{"weight_type": QuantType.QInt8, **kw},
                         extra_options=const_b)
    for name, (method, per_channel) in static.items():
        files[name] = out / f"{name}.onnx"
        with contextlib.redirect_stdout(sys.stderr):  # the entropy calibrator prints
            quantize_static(cpu_path, files[name], Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            per_channel=per_channel, calibrate_method=method,
                            op_types_to_quantize=["MatMul"], extra_options=const_b)
        print(f"quantized {name}", file=sys.stderr)
    return files


def feeds_of(backend, tok, texts: list[str], pad_to: int | None) -> dict[str, np.ndarray]:
    """int32 inputs of ``backend``'s graph, padded to ``pad_to`` (None: the longest)."""
    enc = tok(texts, padding="max_length" if pad_to else "longest", truncation=True,
              max_length=pad_to or backend.meta.max_len, return_tensors="np")
    names = [i.name for i in backend.session.get_inputs()]
    return {n: enc[n].astype(np.int32) if n in enc else
            np.zeros_like(enc["input_ids"], np.int32) for n in names}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run directory (fedspine simulate --out)")
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's pre-processing advice

    from fedspine_jax.device_runtime.inference import OrtBackend, Predictor
    from fedspine_jax.export.run import export_run_device_model
    from fedspine_jax.export.tensorrt import calibration_batches

    tmp = tempfile.TemporaryDirectory()
    out = Path(tmp.name)
    res, dm = export_run_device_model(args.run, args.device_id, out / "device.onnx",
                                      int8=True)
    calib = calibration_batches(dm.train, res.meta.max_len)
    files = {"fp32": res.cpu_path, "dynamic_shipped": res.int8_path,
             **make_variants(res.cpu_path, calib, out)}
    backends = {k: OrtBackend(f, ["CPUExecutionProvider"]) for k, f in files.items()}

    rows = [json.loads(x) for x in SST2.read_text().splitlines() if x.strip()]
    texts, labels = [r["sentence"] for r in rows], np.array([r["label"] for r in rows])
    preds = {}
    for k, be in backends.items():
        served = Predictor(be, dm.tokenizer, be.meta)
        preds[k] = {
            "served": served.logits(texts, batch_size=32).argmax(-1),
            "input_order": np.concatenate([
                be.run(feeds_of(be, dm.tokenizer, texts[i:i + 32], None))[0].argmax(-1)
                for i in range(0, len(texts), 32)]),
            "single": served.logits(texts, batch_size=1).argmax(-1)}
    doc = {"run": args.run, "device_id": args.device_id, "examples": len(texts),
           "calibration_rows": sum(len(b["input_ids"]) for b in calib), "graphs": {}}
    for k in backends:
        doc["graphs"][k] = {
            "accuracy": {m: round(100 * float((x == labels).mean()), 2)
                         for m, x in preds[k].items()},
            "same_label_as_fp32": {m: round(float((x == preds["fp32"][m]).mean()), 4)
                                   for m, x in preds[k].items()},
            "file_mib": round(files[k].stat().st_size / 2**20, 1), "latency_ms": {}}
    print(json.dumps({k: v["accuracy"] for k, v in doc["graphs"].items()}), file=sys.stderr)

    for b in args.batches:
        feeds = {k: feeds_of(be, dm.tokenizer, (texts * 2)[:b], args.seq)
                 for k, be in backends.items()}
        order, rng = list(backends.items()), np.random.default_rng(b)
        times = {k: [] for k in backends}
        for k, be in order:
            be.run(feeds[k])
            be.run(feeds[k])
        for _ in range(args.repeats):
            rng.shuffle(order)
            for k, be in order:
                t = time.perf_counter()
                be.run(feeds[k])
                times[k].append(time.perf_counter() - t)
        for k, ts in times.items():
            doc["graphs"][k]["latency_ms"][str(b)] = round(1e3 * statistics.median(ts), 2)
        print(f"b{b}: " + ", ".join(f"{k} {doc['graphs'][k]['latency_ms'][str(b)]} ms"
                                    for k in backends), file=sys.stderr)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
