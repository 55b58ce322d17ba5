"""The on-device inference runtime: one loader, three back ends, tokenisation included.

Design note
-----------
:func:`load` picks the back end by what it is given:

* ``*.plan`` / ``*.engine`` -> **TensorRT** (the engine plus its ``<engine>.json``
  metadata sidecar, written by ``fedspine export --engine``);
* ``*.onnx`` -> **ONNX Runtime**, with the CUDA execution provider when this onnxruntime
  has it, else the CPU one; on the CPU it serves the export's fused CPU graph
  (``<name>.cpu.onnx``, ``export.cpu_graph``) when that lies beside the portable file, and
  runs an ``.int8.onnx`` (``fedspine export --int8``) when given one;
* a run directory (``fedspine simulate`` / ``fedspine server --out``) plus a device id ->
  **JAX**: that device's model compacted with the LoRA merged, jitted.

Every back end runs the *same graph* with the same named inputs and outputs -- the ONNX
graph described in ``fedspine_jax.export.onnx_export`` (the JAX back end calls the very
function that export traces) -- so one :class:`Predictor` does the rest for all three:
tokenising with the tokenizer the model carries in its metadata, batching, softmax and
labels for a classifier, and greedy decoding with the KV cache for a LLaMA model (prefill
the left-padded prompts once, then one token per call, the presents fed back as pasts).

Inputs to the graphs are int32 (the tokenizer's int64 ids are cast). The TensorRT back end
copies through CUDA with ``cuda-python`` (installed by the ``tensorrt`` extra); it has not
been run on this project's CI machines (no GPU there).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from fedspine_jax.errors import UserError
from fedspine_jax.export import metadata
from fedspine_jax.export.metadata import MetadataError, ModelMeta

ENGINE_SUFFIXES = (".plan", ".engine")


class InferenceError(UserError, RuntimeError):
    """A model that cannot be loaded or run, or bad input; the message names the problem."""


# ---------------------------------------------------------------------------------------
# back ends: run(feeds) -> outputs in meta.outputs order


def default_providers() -> list[str]:
    """ONNX Runtime's execution providers: CUDA when this onnxruntime has it, else CPU."""
    import onnxruntime as ort

    return (["CUDAExecutionProvider", "CPUExecutionProvider"]
            if "CUDAExecutionProvider" in ort.get_available_providers()
            else ["CPUExecutionProvider"])


def serving_graph(path: Path, providers: list[str]) -> Path:
    """The graph of an export to run with ``providers``: on the CPU alone, the fused
    CPU graph (``<name>.cpu.onnx``) when it lies beside a portable ``<name>.onnx``; the
    given file otherwise (CUDA runs the portable graph, as TensorRT does)."""
    cpu = metadata.graph_path(path, metadata.CPU)
    if (list(providers) == ["CPUExecutionProvider"] and cpu.is_file()
            and not path.name.endswith(tuple(metadata.GRAPHS[k] for k in (
                metadata.CPU, metadata.CPU_INT8)))):
        return cpu
    return path


class OrtBackend:
    """ONNX Runtime; ``providers`` default: CUDA when available, else CPU."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InferenceError("running .onnx models needs onnxruntime: "
                                 "pip install 'fedspine-jax[export]'") from None
        providers = default_providers() if providers is None else providers
        so = ort.SessionOptions()
        so.log_severity_level = 3
        # Idle workers sleep rather than spin between operators: on a shared or
        # power-limited CPU (an edge device) spinning burns the cycles the other threads
        # wait for (benchmarks/inference.py measures it).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:
            raise InferenceError(f"cannot load {str(path)!r} with ONNX Runtime: it is not a "
                                 f"valid ONNX model or its external data is missing "
                                 f"({type(e).__name__}: {str(e).strip()[:300]})") from None
        self.path = path
        self.providers = self.session.get_providers()
        self.name = "onnxruntime-" + ("cuda" if "CUDAExecutionProvider" in self.providers
                                      else "cpu")
        entries = dict(self.session.get_modelmeta().custom_metadata_map)
        self.meta, self.tokenizer_files = metadata.parse_props(entries, str(path))
        self._outputs = list(self.meta.outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self._outputs, feeds)


class _Cuda:
    """The few CUDA runtime calls the TensorRT back end needs (cuda-python)."""

    def __init__(self):
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            try:
                from cuda import cudart as rt
            except ImportError:
                raise InferenceError("the TensorRT back end needs cuda-python: "
                                     "pip install 'fedspine-jax[tensorrt]'") from None
        self.rt = rt
        self.stream = self._ok(rt.cudaStreamCreate())

    def _ok(self, res):
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise InferenceError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def alloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(1, nbytes))))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr))

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        self._ok(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                         self.stream))

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                         self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                         self.stream))

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream))


class TensorRTBackend:
    """A TensorRT engine (TensorRT >= 10 tensor API), its metadata from ``<engine>.json``."""

    name = "tensorrt"

    def __init__(self, path: Path):
        self.meta, self.tokenizer_files, self.sidecar = metadata.read_sidecar(path)
        try:
            import tensorrt as trt
        except ImportError:
            raise InferenceError(f"{path.name} is a TensorRT engine but the tensorrt package "
                                 f"is not installed: pip install 'fedspine-jax[tensorrt]', or "
                                 f"serve the .onnx it was built from") from None
        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise InferenceError(f"TensorRT cannot deserialise {str(path)!r}: a corrupt file, "
                                 f"or an engine built for another GPU or TensorRT version "
                                 f"(built with {self.sidecar.get('tensorrt')}; this is "
                                 f"{trt.__version__}); rebuild it on this device")
        self.context = self.engine.create_execution_context()
        self.cuda = _Cuda()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        trt, eng, ctx, cuda = self.trt, self.engine, self.context, self.cuda
        held, outs = [], {}
        try:
            for name in self.inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=trt.nptype(
                    eng.get_tensor_dtype(name)))
                if eng.is_shape_inference_io(name):  # shape tensors live on the host
                    held.append(arr)
                    ctx.set_tensor_address(name, arr.ctypes.data)
                    continue
                ctx.set_input_shape(name, arr.shape)
                ptr = cuda.alloc(arr.nbytes)
                held.append(ptr)
                cuda.to_device(ptr, arr)
                ctx.set_tensor_address(name, ptr)
            for name in self.meta.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                host = np.empty(shape, dtype=trt.nptype(eng.get_tensor_dtype(name)))
                ptr = cuda.alloc(host.nbytes)
                held.append(ptr)
                ctx.set_tensor_address(name, ptr)
                outs[name] = (host, ptr)
            if not ctx.execute_async_v3(cuda.stream):
                raise InferenceError("TensorRT execution failed (see its log)")
            for host, ptr in outs.values():
                cuda.to_host(host, ptr)
            cuda.sync()
        finally:
            for h in held:
                if isinstance(h, int):
                    cuda.free(h)
        return [outs[n][0] for n in self.meta.outputs]


class JaxBackend:
    """A device's model from a run directory, compacted with the LoRA merged, jitted."""

    name = "jax"

    def __init__(self, run_dir: Path, device_id: int | None, overrides=()):
        import jax
        from flax import nnx

        from fedspine_jax.export import onnx_export
        from fedspine_jax.export.run import device_model, load_run

        if device_id is None:
            raise InferenceError(f"{str(run_dir)!r} is a run directory: say which device's "
                                 f"model to serve with --device-id")
        try:
            cfg, s, state, _, step = load_run(run_dir, overrides)
            dm = device_model(s, state, device_id, run=str(run_dir), step=step)
        except onnx_export.ExportError as e:
            raise InferenceError(str(e)) from None
        small, dense = onnx_export.prepare(dm.model)
        self.meta = onnx_export.build_meta(small, dense, dm.tokenizer, task=dm.task,
                                           max_len=dm.max_len, opset=cfg.export.opset,
                                           source=dm.source, labels=dm.labels,
                                           template=dm.template)
        self.tokenizer = dm.tokenizer
        graphdef, st = nnx.split(small)
        meta = self.meta

        @jax.jit
        def call(st, *args):
            fn, _ = onnx_export.graph_function(nnx.merge(graphdef, st), meta)
            out = fn(*args)
            return list(out) if isinstance(out, tuple) else [out]

        self._call, self._state = call, st

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(x) for x in self._call(self._state, *[feeds[n] for n in
                                                                 self.meta.inputs])]


# ---------------------------------------------------------------------------------------
# the predictor


@dataclasses.dataclass
class Prediction:
    """A classifier's answer: the label, its id and the probability of every label."""
    label: str
    label_id: int
    probs: dict


class Predictor:
    """Tokenise, batch, run a back end, post-process.

    Attributes:
      meta: the model's :class:`~fedspine_jax.export.metadata.ModelMeta`.
      backend: the back end (``.name`` says which).
      tokenizer: the model's Hugging Face tokenizer.
    """

    def __init__(self, backend, tokenizer, meta: ModelMeta):
        self.backend, self.tokenizer, self.meta = backend, tokenizer, meta

    # -- classification ---------------------------------------------------------------------

    def logits(self, texts: list[str], pairs: list[str] | None = None,
               batch_size: int = 32) -> np.ndarray:
        """Classifier logits ``(len(texts), num_labels)`` (``pairs``: second segments).

        Texts are batched by tokenised length (shortest first) and each batch is padded to
        its own longest text, so a batch carries little padding; the rows come back in
        the order given."""
        if self.meta.kind != "classifier":
            raise InferenceError(f"this model is a {self.meta.kind}, not a classifier")
        if pairs is not None and len(pairs) != len(texts):
            raise InferenceError(f"{len(texts)} texts but {len(pairs)} text pairs")
        if not texts:
            return np.zeros((0, len(self.meta.labels)), np.float32)
        texts = list(texts)
        pairs = None if pairs is None else list(pairs)
        lengths = [len(x) for x in self.tokenizer(
            *([texts] if pairs is None else [texts, pairs]), truncation=True,
            max_length=self.meta.max_len)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        out = np.zeros((len(texts), len(self.meta.labels)), np.float32)
        for s in range(0, len(texts), batch_size):
            rows = order[s:s + batch_size]
            args = [[texts[i] for i in rows]]
            if pairs is not None:
                args.append([pairs[i] for i in rows])
            enc = self.tokenizer(*args, padding=True, truncation=True,
                                 max_length=self.meta.max_len, return_tensors="np")
            ids = enc["input_ids"].astype(np.int32)
            tt = enc.get("token_type_ids")
            feeds = {"input_ids": ids, "attention_mask": enc["attention_mask"].astype(np.int32),
                     "token_type_ids": np.zeros_like(ids) if tt is None else tt.astype(np.int32)}
            out[rows] = np.asarray(self.backend.run(feeds)[0], np.float32)
        return out

    def classify(self, texts: list[str], pairs: list[str] | None = None,
                 batch_size: int = 32) -> list[Prediction]:
        """Label and probabilities of every text."""
        z = self.logits(texts, pairs, batch_size)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        labels = self.meta.labels
        return [Prediction(labels[int(k)], int(k), {lab: float(v) for lab, v in zip(labels, row)})
                for k, row in zip(p.argmax(axis=1), p)]

    # -- generation -------------------------------------------------------------------------

    def generate_ids(self, prompts: list[str], max_new_tokens: int = 32,
                     batch_size: int = 8) -> list[list[int]]:
        """Greedy continuations (token ids, up to ``max_new_tokens``, cut before eos)."""
        if not self.meta.is_decoder:
            raise InferenceError(f"this model is a {self.meta.kind}, not a causal LM")
        if max_new_tokens < 1:
            raise InferenceError("max_new_tokens must be at least 1")
        out = []
        for s in range(0, len(prompts), batch_size):
            out += self._greedy(prompts[s:s + batch_size], max_new_tokens)
        return out

    def _greedy(self, prompts: list[str], n_new: int) -> list[list[int]]:
        from fedspine_jax.export.onnx_export import decoder_feeds

        tok, meta = self.tokenizer, self.meta
        side, tside = tok.padding_side, tok.truncation_side
        tok.padding_side, tok.truncation_side = "left", "left"
        try:
            enc = tok(prompts, padding=True, truncation=True, max_length=meta.max_len,
                      return_tensors="np")
        finally:
            tok.padding_side, tok.truncation_side = side, tside
        ids = enc["input_ids"].astype(np.int32)
        am = enc["attention_mask"].astype(np.int32)
        b, l = ids.shape
        t = l + n_new
        pos = np.maximum(np.cumsum(am, axis=1) - 1, 0).astype(np.int32)
        mask = np.concatenate([am, np.zeros((b, n_new), np.int32)], axis=1)
        caches = [(np.zeros((b, t, c.kv_heads, c.head_dim), np.float32),) * 2
                  for c in meta.cache]
        outs = self.backend.run(decoder_feeds(meta, ids, pos, mask, 0, caches))
        nxt = pos[:, -1] + 1
        eos = meta.eos_token_id
        toks = np.argmax(outs[0][:, -1], axis=-1).astype(np.int32)
        result = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        for step in range(n_new):
            for r in range(b):
                if not done[r]:
                    if eos is not None and toks[r] == eos:
                        done[r] = True
                    else:
                        result[r].append(int(toks[r]))
            if done.all() or step == n_new - 1:
                break
            mask[:, l + step] = 1
            caches = [(outs[1 + 2 * j], outs[2 + 2 * j]) for j in range(len(meta.cache))]
            outs = self.backend.run(decoder_feeds(meta, toks[:, None], nxt[:, None].astype(
                np.int32), mask, l + step, caches))
            toks = np.argmax(outs[0][:, -1], axis=-1).astype(np.int32)
            nxt = nxt + 1
        return result

    def generate(self, prompts: list[str], max_new_tokens: int = 32,
                 batch_size: int = 8) -> list[str]:
        """Greedy continuations of the prompts, as text."""
        return [self.tokenizer.decode(x, skip_special_tokens=True)
                for x in self.generate_ids(prompts, max_new_tokens, batch_size)]

    @property
    def template(self) -> str:
        """The prompt template the model was trained with ("" for none)."""
        from fedspine_jax.data import PRESETS

        # Files exported before the metadata carried templates name only their task.
        return self.meta.template or (PRESETS["dolly"].template
                                      if self.meta.task == "dolly" else "")

    def template_fields(self) -> list[str]:
        """The record columns the template names, in order, each once."""
        from fedspine_jax.data import template_fields

        return list(dict.fromkeys(template_fields(self.template))) if self.template else []

    def prompt(self, text: str = "", context: str = "", record: dict | None = None) -> str:
        """The prompt a model trained on an instruction task expects: its training template
        (``data.render_body`` + the response header) filled with ``record``'s columns, or
        else ``text`` in its first field and ``context`` in its second (dolly: instruction,
        context), the others empty. A model without a template gets ``text`` as it is
        (``context``, if any, before it)."""
        from fedspine_jax.data import render_body, split_template

        fields = self.template_fields()
        if not fields:
            return text if not context else f"{context}\n\n{text}"
        if record is None:
            if context and len(fields) < 2:
                raise InferenceError(f"the model's prompt template {self.template!r} has "
                                     f"one field; it takes no second text")
            record = dict(zip(fields, (text, context)))
        missing = [f for f in fields if not isinstance(record.get(f, ""), str)]
        if missing:
            raise InferenceError(f"template field {missing[0]!r} must be a string")
        values = {f: record.get(f, "") for f in fields}
        return render_body(self.template, values)[0] + split_template(self.template)[1]


# ---------------------------------------------------------------------------------------
# loading


def load(model: str | Path, *, device_id: int | None = None, overrides=(),
         providers: list[str] | None = None, threads: int = 0) -> Predictor:
    """A :class:`Predictor` for ``model``: ``.plan``/``.engine`` (TensorRT), ``.onnx``
    (ONNX Runtime) or a run directory with ``device_id`` (JAX).

    Raises :class:`InferenceError` naming the problem for a missing, corrupt or unknown
    model file.
    """
    p = Path(model)
    if not p.exists():
        raise InferenceError(f"model {str(p)!r} does not exist")
    try:
        if p.is_dir():
            backend = JaxBackend(p, device_id, overrides)
            return Predictor(backend, backend.tokenizer, backend.meta)
        if p.suffix in ENGINE_SUFFIXES:
            backend = TensorRTBackend(p)
        elif p.suffix == ".onnx":
            if p.stat().st_size == 0:
                raise InferenceError(f"{str(p)!r} is empty")
            try:
                providers = default_providers() if providers is None else providers
            except ImportError:
                raise InferenceError("running .onnx models needs onnxruntime: "
                                     "pip install 'fedspine-jax[export]'") from None
            backend = OrtBackend(serving_graph(p, providers), providers, threads)
        else:
            raise InferenceError(f"cannot tell how to run {str(p)!r}: give a TensorRT engine "
                                 f"({'/'.join(ENGINE_SUFFIXES)}), an .onnx file or a run "
                                 f"directory")
        tok = metadata.load_tokenizer_files(backend.tokenizer_files, str(p))
    except MetadataError as e:
        raise InferenceError(str(e)) from None
    return Predictor(backend, tok, backend.meta)


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON Lines file (blank lines skipped); errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise InferenceError(f"input file {str(p)!r} does not exist")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferenceError(f"{p.name} line {i}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise InferenceError(f"{p.name} line {i}: expected a JSON object")
        out.append(rec)
    return out


# The text fields a record may use, per input kind: (first segment, optional second).
TEXT_FIELDS = (("text", "text_pair"), ("sentence", None), ("premise", "hypothesis"),
               ("instruction", "context"), ("prompt", None))


def record_text(rec: dict, where: str) -> tuple[str, str | None]:
    """(text, second segment or None) of an input record."""
    for first, second in TEXT_FIELDS:
        if isinstance(rec.get(first), str):
            pair = rec.get(second) if second else None
            return rec[first], pair if isinstance(pair, str) else None
    raise InferenceError(f"{where}: no text field; use one of "
                         f"{[f for f, _ in TEXT_FIELDS]}")
