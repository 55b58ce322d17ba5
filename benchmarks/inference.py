"""Inference latency and peak memory of MiniLM-L6 dense and structurally pruned, per back end.

Models: the offline MiniLM-L6 (``load_pretrained("minilm-l6", num_labels=2)``; the
classifier head is random, which does not change the cost) dense, and pruned 30 % and 50 %
structurally -- in every layer the given fraction of attention heads and of FFN channels
(rounded: 8 of 12 heads and 1075 of 1536 channels at 30 %, 6 and 768 at 50 %), chosen by
weight magnitude -- then physically compacted with ``compaction.compact`` (the exporter's
path). Back ends:

* ``ort``   -- what the inference runtime serves on a CPU from ``fedspine export``'s files:
  the fused CPU graph (``<name>.cpu.onnx``, ``export.cpu_graph``; verified against JAX
  here), run by its ONNX Runtime back end (``device_runtime.inference``: CPU provider, all
  graph optimisations, one intra-op thread per core, idle workers sleep instead of
  spinning);
* ``ort_portable`` -- the portable graph (``<name>.onnx``, the one TensorRT gets), dense;
* ``ort_int8`` -- the INT8 CPU graph (``fedspine export --int8``: dynamically quantized
  weights, ``export.quantize``);
* ``jax``   -- the compacted model's forward under ``jax.jit`` (XLA CPU);
* ``torch`` -- the peer: Hugging Face ``AutoModelForSequenceClassification`` in eager mode
  (``torch.inference_mode``) from the same local weights, dense only.

Inputs are real SST-2 validation sentences (``../shared/data/sst2`` beside the repository,
else a fixed sentence list) tokenised and padded to ``--seq`` (64), at batch 1, 32 and 128.

**Latency**: one child process loads every (back end, model) and times them round-robin,
call by call, so that a shared machine's changing load hits all of them alike and the
ratios -- against the dense model and against the peer -- stay fair (separate processes
measured minutes apart disagreed by up to 4x for the peer on this box). The order is
shuffled every round: a call that runs right after PyTorch's is slowed while PyTorch's
OpenMP threads still spin (ONNX Runtime at batch 1: +25-33 %, measured), and in a fixed
order the same model would always pay for it. The median after
two warm-up calls (JAX compiles in the first), at least ``--min-repeats`` calls each, more
while under ``--budget-s`` seconds per (back end, model) and batch size.

**Peak memory**: one child per (back end, model), so models do not share a process: the
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after a
warm-up call at each batch size) minus the resident set before the model was loaded (its
library already imported) -- weights, runtime buffers and activations. The JAX child builds
its model from the full pretrained one (load, mask, compact), whose freed host memory the
allocator keeps: its figures include the unpruned model and do not shrink with pruning.

Ratios against the peer are taken **in the same run**: ``ort_pruned50_vs_dense`` (target
<= 0.55, the paper reports 51.4 % on RoBERTa), ``ort_dense_vs_torch`` (target <= 0.6) and
``ort_int8_pruned50_vs_torch`` (target <= 0.3). The machine is shared: the 1-minute load
average at start and end is printed, and the CPU (``/proc/cpuinfo`` model name and its
VNNI / AVX-512 / AMX flags) that every row ran on.

**GEMM ceiling** (CPU runs): matrix products are 75-80 % of the dense model's kernel time,
so how fast our graph can be against the peer is bounded by how fast this CPU multiplies
matrices. A child times products of the model's three shapes in each library and keeps the
best rate (``child_ceiling``). With the model's matrix-multiply work (``dense_gflop``; ours
computes less, the last layer's first row only) the ratios get ``ort_dense_gflops`` and
``torch_dense_gflops`` (the rate each whole model reached) and ``ort_dense_vs_torch_floor``:
the ort dense / torch ratio if every one of our FLOPs ran at the faster library's ceiling,
the lowest that any fp32 graph of this model could reach against the peer on this CPU.

**Accuracy** (``--run DIR --device-id I``): the MiniLM above has a random head, so INT8's
accuracy is measured on a trained, pruned model instead -- a run's device model, exported
with ``--int8``: SST-2 validation accuracy (every sentence) of its fp32 CPU graph and of
its INT8 graph (target: within 0.5 points).

``--gpu`` runs the ONNX Runtime rows with the CUDA execution provider (and torch on CUDA,
JAX on its default device); it needs ``onnxruntime-gpu`` and has not been run on this
project's CPU-only machines.

    python benchmarks/inference.py [--batches 1 32 128] [--seq 64] [--ratios 0.3 0.5]
                                   [--budget-s 3] [--gpu] [--keep DIR] [--skip-memory]
                                   [--run RUN_DIR --device-id I [--set KEY=VALUE]]

Prints one JSON object (progress on stderr). 2.5-4 minutes on a 2-core CPU (load 1.5-3).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2" / "validation.jsonl"
FALLBACK = ["a gripping, beautifully acted film that stays with you",
            "the plot is thin and the jokes fall flat", "an uneven but often funny comedy",
            "one of the best films of the year"]


# ---------------------------------------------------------------- shared by parent and child
def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def pruned_minilm(ratio: float):
    """MiniLM-L6 with a classification head and ``ratio`` of every layer's heads and FFN
    channels masked (the lowest-magnitude ones); returns (model, tokenizer)."""
    from fedspine_jax.models import load_pretrained
    from fedspine_jax.models.state import set_masks

    model, tok = load_pretrained("minilm-l6", num_labels=2)
    if ratio <= 0:
        return model, tok
    cfg = model.cfg
    keep_h = max(1, round(cfg.num_heads * (1 - ratio)))
    keep_c = max(1, round(cfg.intermediate_size * (1 - ratio)))
    hm = np.zeros((cfg.num_layers, cfg.num_heads), np.float32)
    cm = np.zeros((cfg.num_layers, cfg.intermediate_size), np.float32)
    dh = cfg.head_dim
    for i, lay in enumerate(model.layers):
        o = np.asarray(lay.attn.o.kernel[...]).reshape(cfg.num_heads, dh, -1)
        hm[i, np.argsort(-np.linalg.norm(o.reshape(cfg.num_heads, -1), axis=1))[:keep_h]] = 1
        w1 = np.linalg.norm(np.asarray(lay.mlp.fc1.kernel[...]), axis=0)
        w2 = np.linalg.norm(np.asarray(lay.mlp.fc2.kernel[...]), axis=1)
        cm[i, np.argsort(-(w1 * w2))[:keep_c]] = 1
    set_masks(model, hm, cm)
    return model, tok


def inputs(tok, batch: int, seq: int) -> dict:
    """int32 (batch, seq) inputs of real sentences, padded to ``seq``."""
    if SST2.is_file():
        lines = SST2.read_text().splitlines()
        texts = [json.loads(x)["sentence"] for x in lines[:batch]]
    else:
        texts = []
    while len(texts) < batch:
        texts += FALLBACK
    enc = tok(texts[:batch], padding="max_length", truncation=True, max_length=seq,
              return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    tt = enc.get("token_type_ids")
    return {"input_ids": ids, "attention_mask": enc["attention_mask"].astype(np.int32),
            "token_type_ids": np.zeros_like(ids) if tt is None else tt.astype(np.int32)}


# ---------------------------------------------------------------- children
def load_call(backend: str, spec: dict, name: str):
    """A function ``feeds -> logits`` running model ``name`` on ``backend``."""
    from fedspine_jax.models.loading import resolve

    if backend.startswith("ort"):  # the inference runtime's own ONNX Runtime back end
        from fedspine_jax.device_runtime.inference import OrtBackend, serving_graph
        from fedspine_jax.export import metadata

        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if spec["gpu"]
                     else ["CPUExecutionProvider"])
        path = Path(spec["onnx"][name])
        path = {"ort": serving_graph(path, providers), "ort_portable": path,
                "ort_int8": metadata.graph_path(path, metadata.CPU_INT8)}[backend]
        ort_backend = OrtBackend(path, providers)
        if spec["gpu"] and "CUDAExecutionProvider" not in ort_backend.providers:
            raise SystemExit("--gpu: this onnxruntime has no CUDA execution provider "
                             "(pip install onnxruntime-gpu)")
        return lambda feeds: ort_backend.run(feeds)[0]
    if backend == "jax":
        import jax
        from flax import nnx

        from fedspine_jax.models.compaction import compact

        model, _ = pruned_minilm(spec["ratios"][name])
        small, _ = compact(model, merge_lora=True)
        del model
        graphdef, state = nnx.split(small)
        fwd = jax.jit(lambda st, a, b, c: nnx.merge(graphdef, st)(a, b, c))
        return lambda feeds: jax.block_until_ready(fwd(
            state, feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"]))
    import torch
    from transformers import AutoModelForSequenceClassification

    dev = "cuda" if spec["gpu"] and torch.cuda.is_available() else "cpu"
    tm = AutoModelForSequenceClassification.from_pretrained(
        str(resolve("minilm-l6")), num_labels=2).eval().to(dev)

    def call(feeds):
        with torch.inference_mode():
            return tm(**{k: torch.from_numpy(v.astype(np.int64)).to(dev)
                         for k, v in feeds.items()}).logits.cpu().numpy()
    return call


def _tokenizer():
    from transformers import AutoTokenizer

    from fedspine_jax.models.loading import resolve

    return AutoTokenizer.from_pretrained(str(resolve("minilm-l6")))


def child_latency(spec: dict) -> dict:
    """Every (back end, model) in one process, timed round-robin call by call, so that the
    shared machine's changing load hits all of them alike (ratios stay fair)."""
    tok = _tokenizer()
    jobs = [tuple(j) for j in spec["jobs"]]
    calls = {j: load_call(j[0], spec, j[1]) for j in jobs}
    out: dict = {}
    for b in spec["batches"]:
        feeds = inputs(tok, b, spec["seq"])
        for call in calls.values():
            for _ in range(2):  # warm-up (JAX compiles in the first)
                call(feeds)
        times = {j: [] for j in jobs}
        start = time.perf_counter()
        budget = spec["budget_s"] * len(jobs)
        order, rng = list(calls.items()), np.random.default_rng(b)
        while True:
            rng.shuffle(order)  # no model always runs right after the same one
            for j, call in order:
                t = time.perf_counter()
                call(feeds)
                times[j].append(time.perf_counter() - t)
            n = len(times[jobs[0]])
            if n >= spec["max_repeats"] or (n >= spec["min_repeats"] and
                                            time.perf_counter() - start >= budget):
                break
        for (backend, model), ts in times.items():
            out.setdefault(backend, {}).setdefault(model, {})[str(b)] = {
                "latency_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                "calls": len(ts)}
    return out


def _import_backend(backend: str) -> None:
    if backend.startswith("ort"):
        import onnxruntime  # noqa: F401

        from fedspine_jax.device_runtime import inference  # noqa: F401
    elif backend == "jax":
        import jax  # noqa: F401

        from fedspine_jax.models import compaction, load_pretrained  # noqa: F401
    else:
        import torch  # noqa: F401
        from transformers import AutoModelForSequenceClassification  # noqa: F401


def child_memory(spec: dict) -> dict:
    """One model on one back end: peak resident memory per batch size (see the module note)."""
    tok = _tokenizer()
    _import_backend(spec["backend"])  # library code is not the model's memory
    base = _status("VmRSS")
    call = load_call(spec["backend"], spec, spec["model"])
    out = {"weights_mib": (_status("VmRSS") - base) / 2**20}
    for b in spec["batches"]:
        feeds = inputs(tok, b, spec["seq"])
        call(feeds)  # warm-up: compilation / arena set-up are not the model's steady state
        _reset_peak()
        call(feeds)
        out[str(b)] = (_status("VmHWM") - base) / 2**20
    return out


def dense_gflop(batch: int, seq: int, first_row_last_layer: bool, d: int = 384,
                f: int = 1536, layers: int = 6) -> float:
    """Matrix-multiply GFLOP of one dense MiniLM-L6 forward, ``(batch, seq)`` tokens.

    Per token and layer ``2 (4 D^2 + 2 D F)`` (q, k, v, output projection, FFN), per
    sequence and layer ``4 S^2 D`` (scores and weighted values). Our exported graph computes
    the last layer's query, output projection and FFN for the first token only
    (``first_row_last_layer``), saving ``2 (2 D^2 + 2 D F)`` on the other ``S - 1`` tokens
    (its attention saving is not counted: the figure is an upper bound of our work).
    """
    flop = batch * (seq * layers * 2 * (4 * d * d + 2 * d * f) + layers * 4 * seq * seq * d)
    if first_row_last_layer:
        flop -= batch * (seq - 1) * 2 * (2 * d * d + 2 * d * f)
    return flop / 1e9


def child_ceiling(spec: dict) -> dict:
    """This CPU's fp32 GEMM ceiling for each library: the best GFLOP/s over the model's three
    matrix-product shapes ``(M, 384) x (384, 384)``, ``x (384, 1536)`` and ``(M, 1536) x
    (1536, 384)`` at ``M = 128 x seq`` rows, in ONNX Runtime's ``MatMul`` (MLAS, the
    runtime's session settings) and ``torch.matmul``; all cores, median of 7 calls after a
    warm-up."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    rows, rng = 128 * spec["seq"], np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def gflops(fn, flop: int) -> float:
        fn()
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return flop / statistics.median(ts) / 1e9

    out: dict = {"rows": rows, "shapes": {}}
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        a = rng.standard_normal((rows, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, k])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [rows, n])],
            [numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        flop = 2 * rows * k * n
        out["shapes"][f"{k}x{n}"] = {
            "ort_gflops": round(gflops(lambda: sess.run(None, {"a": a}), flop), 1),
            "torch_gflops": round(gflops(lambda: torch.matmul(ta, tb), flop), 1)}
    for lib in ("ort", "torch"):
        out[f"{lib}_gflops"] = max(v[f"{lib}_gflops"] for v in out["shapes"].values())
    out["torch_threads"] = torch.get_num_threads()
    return out


# ---------------------------------------------------------------- the parent
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU every row ran on: /proc/cpuinfo's model name and its int8 / bf16 flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model_name": platform.processor(), "flags": []}
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    return {"model_name": name, "flags": [f for f in CPU_FLAGS if f in flags]}


def sst2_accuracy(run: str, device_id: int, out_dir: Path, overrides: list) -> dict:
    """SST-2 validation accuracy of a run's device model: the fp32 CPU graph and the INT8
    one (``fedspine export --int8``), every validation sentence, batch 32."""
    from fedspine_jax.device_runtime.inference import load
    from fedspine_jax.export.run import export_run_device

    r = export_run_device(run, device_id, out_dir / "device.onnx", overrides, int8=True)
    rows = [json.loads(x) for x in SST2.read_text().splitlines() if x.strip()]
    texts, labels = [x["sentence"] for x in rows], np.array([x["label"] for x in rows])
    out = {"run": run, "device_id": device_id, "examples": len(rows),
           "params": r.meta.params, "dense_params": r.meta.dense_params,
           "heads_per_layer": list(r.meta.heads), "channels_per_layer": list(r.meta.channels),
           "int8_vs_fp32_on_verification_inputs": {
               "max_abs_diff": r.int8_check.max_abs_diff,
               "argmax_agreement": r.int8_check.argmax_agreement}}
    preds = {}
    for kind, path in (("fp32", r.cpu_path), ("int8", r.int8_path)):
        preds[kind] = load(path).logits(texts, batch_size=32).argmax(1)
        out[f"{kind}_accuracy"] = round(float((preds[kind] == labels).mean()), 4)
        out[f"{kind}_file_mib"] = round(path.stat().st_size / 2**20, 2)
    out["int8_minus_fp32_points"] = round(100 * (out["int8_accuracy"] - out["fp32_accuracy"]),
                                          2)
    out["same_label"] = round(float((preds["fp32"] == preds["int8"]).mean()), 4)
    return out

def run_child(kind: str, spec: dict, gpu: bool):
    env = dict(os.environ)
    if not gpu:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)],
                         capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-repeats", type=int, default=50)
    p.add_argument("--budget-s", type=float, default=3.0,
                   help="timing budget per (model, back end, batch) after the minimum repeats")
    p.add_argument("--gpu", action="store_true", help="ONNX Runtime CUDA provider (untested)")
    p.add_argument("--keep", help="write the exported ONNX files here (default: a temp dir)")
    p.add_argument("--run", help="a run directory whose trained, pruned device model's SST-2 "
                   "validation accuracy is measured in fp32 and INT8")
    p.add_argument("--device-id", type=int, default=0, help="with --run (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="with --run: override a value of the run's config (repeatable)")
    p.add_argument("--skip-memory", action="store_true", help="latency (and accuracy) only")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, spec = args.child
        fn = {"latency": child_latency, "memory": child_memory,
              "ceiling": child_ceiling}[kind]
        print(json.dumps(fn(json.loads(spec))))
        return
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()
    from fedspine_jax.export.onnx_export import export_model

    tmp = tempfile.TemporaryDirectory()
    out_dir = Path(args.keep or tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    ratios = {"dense": 0.0, **{f"pruned{round(100 * r)}": r for r in args.ratios}}
    exported = {}
    for name, ratio in ratios.items():
        model, tok = pruned_minilm(ratio)
        r = export_model(model, out_dir / f"minilm_{name}.onnx", tokenizer=tok, task="sst2",
                         max_len=args.seq, sample=inputs(tok, 8, args.seq), int8=True)
        exported[name] = {"file_mib": round(r.bytes / 2**20, 2), "params": r.meta.params,
                          "dense_params": r.meta.dense_params,
                          "heads_per_layer": r.meta.heads[0],
                          "channels_per_layer": r.meta.channels[0],
                          "max_abs_diff_vs_jax": r.max_abs_diff,
                          "cpu_graph_max_abs_diff_vs_jax": max(r.cpu_checks.values()),
                          "cpu_graph_fused_ops": r.fusions["fused"],
                          "cpu_graph_file_mib": round(r.cpu_path.stat().st_size / 2**20, 2),
                          "int8_file_mib": round(r.int8_path.stat().st_size / 2**20, 2),
                          "int8_vs_fp32_max_abs_diff": r.int8_check.max_abs_diff,
                          "export_s": round(sum(r.seconds.values()), 1)}
        print(f"exported {name}: {r.bytes / 2**20:.1f} MiB, max abs diff vs JAX "
              f"{r.max_abs_diff:.2g}", file=sys.stderr)
    common = {"batches": args.batches, "seq": args.seq, "gpu": args.gpu, "ratios": ratios,
              "onnx": {m: str(out_dir / f"minilm_{m}.onnx") for m in ratios},
              "min_repeats": args.min_repeats, "max_repeats": args.max_repeats,
              "budget_s": args.budget_s}
    jobs = ([("ort", m) for m in ratios] + [("ort_portable", "dense")]
            + [("ort_int8", m) for m in ratios] + [("jax", m) for m in ratios]
            + [("torch", "dense")])
    latency = run_child("latency", {**common, "jobs": jobs}, args.gpu)
    memory: dict = {}
    for backend, m in [] if args.skip_memory else jobs:
        memory.setdefault(backend, {})[m] = run_child(
            "memory", {**common, "backend": backend, "model": m}, args.gpu)
        print(f"{backend}/{m}: " + ", ".join(
            f"b{b} {latency[backend][m][str(b)]['latency_ms']:.1f} ms "
            f"{memory[backend][m][str(b)]:.0f} MiB" for b in args.batches), file=sys.stderr)

    def lat(backend, name, b):
        return latency[backend][name][str(b)]["latency_ms"]

    table = {}
    for b in args.batches:
        r = {f"ort_{m}_vs_dense": lat("ort", m, b) / lat("ort", "dense", b)
             for m in ratios if m != "dense"}
        r.update({f"jax_{m}_vs_dense": lat("jax", m, b) / lat("jax", "dense", b)
                  for m in ratios if m != "dense"})
        r["ort_dense_vs_torch"] = lat("ort", "dense", b) / lat("torch", "dense", b)
        r["ort_portable_dense_vs_torch"] = (lat("ort_portable", "dense", b)
                                            / lat("torch", "dense", b))
        r["ort_dense_vs_portable"] = lat("ort", "dense", b) / lat("ort_portable", "dense", b)
        r.update({f"ort_int8_{m}_vs_torch": lat("ort_int8", m, b) / lat("torch", "dense", b)
                  for m in ratios})
        r.update({f"ort_int8_{m}_vs_fp32": lat("ort_int8", m, b) / lat("ort", m, b)
                  for m in ratios})
        r["jax_dense_vs_torch"] = lat("jax", "dense", b) / lat("torch", "dense", b)
        table[str(b)] = {k: round(v, 3) for k, v in r.items()}
    ceiling = None if args.gpu else run_child("ceiling", {"seq": args.seq}, False)
    if ceiling:  # the lowest ort dense / torch ratio this CPU's GEMM ceilings allow
        best = max(ceiling["ort_gflops"], ceiling["torch_gflops"])
        for b in args.batches:
            ours = dense_gflop(b, args.seq, first_row_last_layer=True)
            table[str(b)]["ort_dense_gflops"] = round(ours / lat("ort", "dense", b) * 1e3, 1)
            table[str(b)]["torch_dense_gflops"] = round(
                dense_gflop(b, args.seq, first_row_last_layer=False)
                / lat("torch", "dense", b) * 1e3, 1)
            table[str(b)]["ort_dense_vs_torch_floor"] = round(
                ours / best * 1e3 / lat("torch", "dense", b), 3)
        print(f"GEMM ceiling: {ceiling}", file=sys.stderr)
    half = "ort_pruned50_vs_dense"
    targets = {
        "ort_pruned50_le_0.55x_dense": {b: v[half] <= 0.55 for b, v in table.items()
                                        if half in v},
        "ort_dense_le_0.6x_torch": {b: v["ort_dense_vs_torch"] <= 0.6
                                    for b, v in table.items()},
        "ort_int8_pruned50_le_0.3x_torch": {b: v["ort_int8_pruned50_vs_torch"] <= 0.3
                                            for b, v in table.items()
                                            if "ort_int8_pruned50_vs_torch" in v},
    }
    accuracy = None
    if args.run:
        accuracy = sst2_accuracy(args.run, args.device_id, out_dir, args.overrides)
        targets["int8_within_0.5_points_of_fp32"] = abs(
            accuracy["int8_minus_fp32_points"]) <= 0.5
        print(f"accuracy: {accuracy}", file=sys.stderr)
    import jax
    import onnxruntime
    import torch

    out = {
        "benchmark": "inference", "model": "minilm-l6 (+2-label head)", "seq": args.seq,
        "device": "gpu" if args.gpu else "cpu",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "cpu": cpu_info(),
                    "load_average_1m_at_start": round(load_start, 2),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "onnxruntime": onnxruntime.__version__, "jax": jax.__version__,
                    "torch": torch.__version__},
        "models": exported, "latency": latency, "peak_memory_mib": memory,
        "gemm_ceiling": ceiling,
        "ratios": table, "targets": targets, "sst2_accuracy": accuracy,
        "wall_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
