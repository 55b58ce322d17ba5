"""A pruned model -> compacted, LoRA merged -> ONNX (jax2onnx) -> verified in ONNX Runtime.

Design note
-----------
**What is traced.** The model is first physically compacted with the LoRA merged
(``models.compaction.compact(model, merge_lora=True)``): pruned heads and channels are
gone, every layer has its own head / channel count, and there are no adapters left. Then one
function of the compacted model is converted with ``jax2onnx.to_onnx`` over symbolic
dimensions, so a single file serves every batch size and length:

* encoders (BERT / RoBERTa): ``model(input_ids, attention_mask, token_type_ids)``, inputs
  ``(batch, seq)`` int32, output ``logits (batch, num_labels)`` (or ``last_hidden_state
  (batch, seq, hidden)`` for an encoder without a head);
* LLaMA decoders: one **decode step with a KV cache**, ``Decoder.decode``: inputs
  ``input_ids, position_ids (batch, seq)``, ``cache_mask (batch, cache)`` (1 where a cache
  slot holds a real token after this step), ``cache_position ()`` (the slot of the first new
  token) and ``past_key_<l>, past_value_<l> (batch, cache, kv_heads_l, head_dim)`` for every
  layer ``l`` that kept a kv head; outputs ``logits (batch, seq, vocab)`` and
  ``present_key_<l>, present_value_<l>`` of the input's shape. The same graph prefills a
  prompt (``cache_position = 0``, zero caches of length ``cache >= seq``) and then takes
  one token per call, feeding the presents back as pasts; greedy decoding is the loop in
  ``fedspine_jax.device_runtime.inference``. Layers without kv heads have no cache at all.

Integer inputs are int32 (TensorRT's native index type; ONNX Runtime and the runtime cast
the tokenizer's int64).

**Opset.** 17 by default (``export.opset``): the newest opset the TensorRT 8.5 of JetPack 5
(Jetson Xavier NX / AGX, the paper's devices) parses, and every later TensorRT and ONNX
Runtime reads it. jax2onnx 0.17.1 writes ``ReduceMean`` in its opset-18 form whatever it is
asked for; ``graph.legalize_reductions`` rewrites it. LayerNorm is exported decomposed
(jax2onnx's accuracy-first default), not as opset 17's ``LayerNormalization``: TensorRT
before 8.6 (JetPack 5 ships 8.5) has no importer for the latter, and ONNX Runtime 1.31's CPU
kernel for it was slower than the decomposed graph (BENCHMARKS.md, inference). The IR
version is lowered to 8, the oldest that carries opset 17 (``graph.lower_ir_version``).
Opsets 13-23 are accepted; ONNX Runtime verification rejects any graph that an opset cannot
express.

**After tracing**, ``graph.tensorrt_friendly`` turns jax2onnx's ``Einsum`` linears into
``MatMul``, removes empty matmuls of fully pruned FFNs and dead nodes; ``graph.save`` writes
external data above 2 GiB of weights; the file carries its metadata (``metadata``).

**The CPU graph.** An encoder's export also writes ``<name>.cpu.onnx`` beside the portable
file: the same graph with ONNX Runtime's fused contrib ops (multi-head attention,
bias-GELU; ``export.cpu_graph``), verified against JAX like the portable one. The inference
runtime serves it on CPUs and the portable graph everywhere else (TensorRT, CUDA);
``int8=True`` adds ``<name>.int8.onnx``, its weights quantized to int8
(``export.quantize``). A decoder has only the portable graph.

**Verification** (every export): ONNX Runtime (CPU) runs the file on real tokenised inputs
at two shapes and the outputs are compared with the JAX forward of the compacted model;
a decoder is checked on the prefill (against ``Decoder.__call__``) and on greedy decode
steps (against ``Decoder.decode``). The largest absolute difference is printed and the
export fails (files removed) above ``tolerance`` (``export.tolerance``, 1e-4 in fp32) --
absolute for outputs up to magnitude 1, relative to the outputs' scale beyond (why: see
:func:`verify`).

**Converter start-up.** jax2onnx imports every plugin tree on first use; its Equinox
examples compile dozens of XLA programs at import (seconds). Our models need only
the ``jax`` and ``flax`` trees, so :func:`converter` imports those and marks the registry
loaded (it falls back to jax2onnx's own import if that internal API changes).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedspine_jax.data import PRESETS
from fedspine_jax.errors import UserError
from fedspine_jax.export import graph, metadata
from fedspine_jax.export.metadata import BATCH, CACHE, SEQ, CacheSpec, ModelMeta

log = logging.getLogger("fedspine.export")

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
# Real sentences tokenised for verification when the caller gives no inputs.
DEFAULT_TEXTS = (
    "a gripping, beautifully acted film that stays with you long after the credits roll",
    "the plot is thin and the jokes fall flat",
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "an uneven but often funny comedy",
    "I would not recommend this restaurant to anyone.",
    "Federated learning trains a shared model without moving the data.",
    "ok",
)
# Greedy steps a decoder's verification takes after the prefill.
VERIFY_DECODE_STEPS = 3


class ExportError(UserError, RuntimeError):
    """An export that cannot be made or did not verify; the message says why."""


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes:
      path: the ``.onnx`` file; files: it and its external data file, if any.
      bytes: total size of the files; meta: the metadata written into the file.
      max_abs_diff: ONNX Runtime vs JAX, largest absolute difference over all checks.
      checks: per check ``{name: max abs diff}``; scales: per check the largest absolute
        JAX output (the verification criterion is relative above 1, see :func:`verify`).
      graph: what the graph passes changed.
      seconds: wall time of conversion and of verification.
      cpu_path: the CPU-serving graph (``.cpu.onnx``, encoders only, else None);
        cpu_files: its files; cpu_checks: its verification against JAX (as ``checks``);
        fusions: ``export.cpu_graph.build``'s report (rewrites, fused op counts).
      int8_path: the INT8 CPU graph (``.int8.onnx``, with ``int8=True``) and int8_check:
        its ``export.quantize.Int8Check`` against the fp32 CPU graph.
    """
    path: Path
    files: list
    bytes: int
    meta: ModelMeta
    max_abs_diff: float
    checks: dict
    scales: dict
    graph: dict
    seconds: dict
    cpu_path: Path | None = None
    cpu_files: list = dataclasses.field(default_factory=list)
    cpu_checks: dict = dataclasses.field(default_factory=dict)
    fusions: dict = dataclasses.field(default_factory=dict)
    int8_path: Path | None = None
    int8_check: object = None


# ---------------------------------------------------------------------------------------
# the converter


def converter():
    """``jax2onnx.to_onnx``, with only the plugin trees our models need imported."""
    try:
        import jax2onnx
    except ImportError:
        raise ExportError("ONNX export needs jax2onnx and onnxruntime: "
                          "pip install 'fedspine-jax[export]'") from None
    try:
        from jax2onnx.plugins import plugin_system as ps

        if not ps._already_imported_plugins:
            root = Path(ps.__file__).parent
            for sub in ("jax", "flax"):
                ps._import_tree(root / sub, f"jax2onnx.plugins.{sub}")
            ps._already_imported_plugins = True
    except (ImportError, AttributeError):  # another layout: jax2onnx imports all itself
        pass
    return jax2onnx.to_onnx


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("verifying an export needs onnxruntime: "
                          "pip install 'fedspine-jax[export]'") from None
    return ort


# ---------------------------------------------------------------------------------------
# the model to export


def _count(model, exclude_lora: bool = True) -> int:
    n = 0
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if exclude_lora and isinstance(v, nnx.LoRAParam):
            continue
        n += int(np.prod(v.shape))
    return n


def prepare(model):
    """The compacted, LoRA-merged copy of ``model`` that is exported.

    Args:
      model: a full Encoder / Decoder with head and channel masks (the usual case), or an
        already compacted model without adapters.
    Returns:
      (compact_model, dense_params): the model to trace and the parameter count of the
      unpruned model (LoRA excluded).
    """
    from fedspine_jax.models.compaction import compact

    cfg = model.cfg
    if cfg.is_compact:
        if cfg.lora_rank > 0 and cfg.lora_targets:
            raise ExportError("this model is compacted but still has LoRA adapters; export "
                              "the full masked model (it is compacted with the LoRA merged)")
        return model, _count(model)
    dense = _count(model)
    small, _ = compact(model, merge_lora=True)
    return small, dense


def _kv(small) -> list[int]:
    return [lay.attn.num_kv_heads for lay in small.layers]


def build_meta(small, dense_params: int, tokenizer, *, task: str | None, max_len: int | None,
               opset: int, source: dict | None, labels=(), template: str = ""
               ) -> ModelMeta:
    """The :class:`ModelMeta` of a compacted model (see the module note for the I/O).

    ``labels``: a classifier's class names by id (the task's ``TaskData.label_names``);
    default: a preset task's names (``data.PRESETS``), else ``LABEL_i``. ``template``: a
    decoder's prompt template (``TaskData.template``); default: a preset task's, else none.
    """
    cfg = small.cfg
    heads = tuple(cfg.heads(i) for i in range(cfg.num_layers))
    chans = tuple(cfg.channels(i) for i in range(cfg.num_layers))
    common = dict(arch=cfg.arch, task=task, vocab_size=cfg.vocab_size,
                  hidden_size=cfg.hidden_size, max_positions=cfg.max_positions,
                  max_len=int(max_len or min(512, cfg.max_positions)), opset=int(opset),
                  params=_count(small), dense_params=int(dense_params), heads=heads,
                  channels=chans, num_heads=cfg.num_heads,
                  intermediate_size=cfg.intermediate_size, source=dict(source or {}),
                  pad_token_id=int(tokenizer.pad_token_id or 0))
    if cfg.is_decoder:
        kv = _kv(small)
        cache = tuple(CacheSpec(i, h, cfg.head_dim) for i, h in enumerate(kv) if h > 0)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None \
            else tokenizer.sep_token_id
        ins = ("input_ids", "position_ids", "cache_mask", "cache_position") + tuple(
            f"past_{w}_{c.layer}" for c in cache for w in ("key", "value"))
        outs = ("logits",) + tuple(f"present_{w}_{c.layer}" for c in cache
                                   for w in ("key", "value"))
        if not template and task in PRESETS:
            template = PRESETS[task].template
        return ModelMeta(kind="causal_lm", cache=cache, eos_token_id=eos, inputs=ins,
                         outputs=outs, template=template, **common)
    ins = ("input_ids", "attention_mask", "token_type_ids")
    if cfg.num_labels > 0:
        if not labels:
            preset = PRESETS[task].label_names if task in PRESETS else ()
            labels = preset if len(preset) == cfg.num_labels else ()
        try:
            names = metadata.class_names(cfg.num_labels, labels)
        except metadata.MetadataError as e:
            raise ExportError(str(e)) from None
        return ModelMeta(kind="classifier", labels=names, inputs=ins, outputs=("logits",),
                         **common)
    return ModelMeta(kind="encoder", inputs=ins, outputs=("last_hidden_state",), **common)


def graph_function(small, meta: ModelMeta):
    """(fn, input specs) to trace: see the module note for the inputs and outputs."""
    i32 = jnp.int32
    if meta.is_decoder:
        b, l, t = jax.export.symbolic_shape(f"{BATCH}, {SEQ}, {CACHE}",
                                            constraints=(f"{CACHE} >= {SEQ}",))
        specs = [jax.ShapeDtypeStruct((b, l), i32), jax.ShapeDtypeStruct((b, l), i32),
                 jax.ShapeDtypeStruct((b, t), i32), jax.ShapeDtypeStruct((), i32)]
        for c in meta.cache:
            specs += [jax.ShapeDtypeStruct((b, t, c.kv_heads, c.head_dim), jnp.float32)] * 2
        n_layers = small.cfg.num_layers
        layers = [c.layer for c in meta.cache]

        def decode_step(input_ids, position_ids, cache_mask, cache_position, *flat):
            cache = [None] * n_layers
            for j, i in enumerate(layers):
                cache[i] = (flat[2 * j], flat[2 * j + 1])
            logits, new = small.decode(input_ids, position_ids, cache_mask, cache,
                                       cache_position)
            return (logits, *[x for i in layers for x in new[i]])

        return decode_step, specs
    b, l = jax.export.symbolic_shape(f"{BATCH}, {SEQ}")
    specs = [jax.ShapeDtypeStruct((b, l), i32)] * 3

    def encode(input_ids, attention_mask, token_type_ids):
        return small(input_ids, attention_mask, token_type_ids)

    return encode, specs


# ---------------------------------------------------------------------------------------
# verification inputs


def sample_inputs(tokenizer, meta: ModelMeta, texts=None) -> dict[str, np.ndarray]:
    """Real tokenised inputs for verification, int32 ``(B, L)``.

    Encoders get ``input_ids``, ``attention_mask``, ``token_type_ids`` (right padding);
    decoders ``input_ids``, ``attention_mask`` (left padding, as generation uses).
    """
    texts = list(texts or DEFAULT_TEXTS)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if meta.is_decoder else "right"
    try:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=meta.max_len,
                        return_tensors="np")
    finally:
        tokenizer.padding_side = side
    out = {"input_ids": enc["input_ids"].astype(np.int32),
           "attention_mask": enc["attention_mask"].astype(np.int32)}
    if not meta.is_decoder:
        tt = enc.get("token_type_ids")
        out["token_type_ids"] = (np.zeros_like(out["input_ids"]) if tt is None
                                 else tt.astype(np.int32))
    return out


def examples_sample(examples, n: int = 8) -> dict[str, np.ndarray]:
    """Verification inputs from a task's tokenised ``data.Examples`` (its first ``n``),
    trimmed to the longest example. Decoders get the prompts left-padded."""
    k = min(n, len(examples))
    lengths = examples.lengths[:k]
    width = int(lengths.max())
    ids = examples.input_ids[:k, :width].astype(np.int32)
    am = examples.attention_mask[:k, :width].astype(np.int32)
    if examples.token_type_ids is not None:
        return {"input_ids": ids, "attention_mask": am,
                "token_type_ids": examples.token_type_ids[:k, :width].astype(np.int32)}
    # causal LM examples are right-padded prompt + response: move the padding left
    left_ids = np.full_like(ids, examples.pad_id)
    left_am = np.zeros_like(am)
    for r, n_tok in enumerate(lengths):
        left_ids[r, width - n_tok:] = ids[r, :n_tok]
        left_am[r, width - n_tok:] = 1
    return {"input_ids": left_ids, "attention_mask": left_am}


# ---------------------------------------------------------------------------------------
# checks


def _session(path: Path):
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"ONNX Runtime cannot load the exported {path.name}: {e}") from None


def _jax_fn(small):
    graphdef, state = nnx.split(small)

    @jax.jit
    def call(state, *args):
        return nnx.merge(graphdef, state)(*args)

    @jax.jit
    def decode(state, ids, pos, mask, cache, cache_pos):
        return nnx.merge(graphdef, state).decode(ids, pos, mask, cache, cache_pos)

    return (lambda *a: call(state, *a)), (lambda *a: decode(state, *a))


def _diff(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs difference, max abs reference value)."""
    return float(np.max(np.abs(got - ref))), float(np.max(np.abs(ref)))


def _check_encoder(sess, small, sample) -> dict[str, tuple]:
    call, _ = _jax_fn(small)
    checks = {}
    cases = {"batch": sample}
    n0 = int(sample["attention_mask"][0].sum())
    cases["single"] = {k: v[:1, :max(1, n0)] for k, v in sample.items()}
    for name, feeds in cases.items():
        got = sess.run(None, feeds)[0]
        ref = np.asarray(call(*[jnp.asarray(feeds[k]) for k in
                                ("input_ids", "attention_mask", "token_type_ids")]))
        if got.shape != ref.shape:
            raise ExportError(f"ONNX output shape {got.shape} != JAX {ref.shape} ({name})")
        if got.ndim == 3:  # hidden states: padded positions are not outputs anyone reads
            keep = feeds["attention_mask"] > 0
            got, ref = got[keep], ref[keep]
        checks[f"{name} {tuple(feeds['input_ids'].shape)}"] = _diff(got, ref)
    return checks


def decoder_feeds(meta: ModelMeta, input_ids, position_ids, cache_mask, cache_position,
                  caches) -> dict[str, np.ndarray]:
    """The decode-step graph's feeds; ``caches``: ``[(k, v)]`` per ``meta.cache`` entry."""
    feeds = {"input_ids": input_ids, "position_ids": position_ids, "cache_mask": cache_mask,
             "cache_position": np.asarray(cache_position, np.int32)}
    for c, (k, v) in zip(meta.cache, caches):
        feeds[f"past_key_{c.layer}"], feeds[f"past_value_{c.layer}"] = k, v
    return feeds


def _check_decoder(sess, small, meta: ModelMeta, sample) -> dict[str, tuple]:
    call, decode = _jax_fn(small)
    ids, am = sample["input_ids"], sample["attention_mask"]
    b, l = ids.shape
    steps = VERIFY_DECODE_STEPS
    t = l + steps
    pos = np.maximum(np.cumsum(am, axis=1) - 1, 0).astype(np.int32)
    mask = np.concatenate([am, np.zeros((b, steps), np.int32)], axis=1)
    caches = [(np.zeros((b, t, c.kv_heads, c.head_dim), np.float32),) * 2 for c in meta.cache]
    out = sess.run(None, decoder_feeds(meta, ids, pos, mask, 0, caches))
    ref = np.asarray(call(jnp.asarray(ids), jnp.asarray(am)))
    valid = am > 0
    checks = {f"prefill {ids.shape}": _diff(out[0][valid], ref[valid])}
    # greedy steps: ONNX caches fed back; JAX runs its own cache on the same tokens
    j_cache = small.init_cache(b, t)
    j_logits, j_cache = decode(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask),
                               j_cache, 0)
    tok = np.argmax(out[0][:, -1], axis=-1).astype(np.int32)
    nxt = pos[:, -1] + 1
    worst = (0.0, 0.0)
    for s in range(steps):
        mask[:, l + s] = 1
        caches = [(out[1 + 2 * j], out[2 + 2 * j]) for j in range(len(meta.cache))]
        out = sess.run(None, decoder_feeds(meta, tok[:, None], nxt[:, None].astype(np.int32),
                                           mask, l + s, caches))
        j_logits, j_cache = decode(jnp.asarray(tok[:, None]), jnp.asarray(nxt[:, None]),
                                   jnp.asarray(mask), j_cache, l + s)
        d = _diff(out[0], np.asarray(j_logits))
        worst = (max(worst[0], d[0]), max(worst[1], d[1]))
        tok = np.argmax(out[0][:, -1], axis=-1).astype(np.int32)
        nxt = nxt + 1
    checks[f"decode x{steps} (batch {b})"] = worst
    return checks


def verify(path: str | Path, small, meta: ModelMeta, sample: dict[str, np.ndarray],
           tolerance: float = DEFAULT_TOLERANCE) -> tuple[dict, dict]:
    """Run the ONNX file in ONNX Runtime on ``sample`` and compare with the JAX forward.

    The criterion is ``max |onnx - jax| <= tolerance * max(1, max |jax|)``: the absolute
    ``tolerance`` for outputs of magnitude up to 1 (classifier logits, the tiny test
    models), relative to the outputs' scale above that. A 30-layer LLM's residual stream
    reaches thousands (SmolLM2: ~5e3, where one fp32 ulp is 5e-4): there ONNX Runtime's and
    XLA's fp32 kernels differ by ~1e-3 on logits of magnitude ~34 -- JAX itself is 6e-5
    off a float64 run -- and an absolute 1e-4 would reject every correct export.

    Args:
      path: the exported ``.onnx``; small: the compacted model it was traced from.
      meta: its metadata; sample: int32 ``(B, L)`` inputs (see :func:`sample_inputs`).
      tolerance: see above (``export.tolerance``, 1e-4).
    Returns:
      ``({check: max abs diff}, {check: max abs JAX output})``. Raises
      :class:`ExportError` when a check fails.
    """
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"the exported graph {path.name} is not valid ONNX: "
                          f"{str(e).strip().splitlines()[0]}") from None
    sess = _session(path)
    checks = (_check_decoder(sess, small, meta, sample) if meta.is_decoder
              else _check_encoder(sess, small, sample))
    for name, (diff, scale) in checks.items():
        limit = tolerance * max(1.0, scale)
        if not np.isfinite(diff) or diff > limit:
            raise ExportError(f"{path.name}: ONNX Runtime and JAX differ by {diff:.3g} on "
                              f"{name} (outputs up to {scale:.3g}; allowed {limit:.3g}); "
                              f"all checks (max abs diff, max abs output): {checks}")
    return {name: diff for name, (diff, _) in checks.items()}, {
        name: scale for name, (_, scale) in checks.items()}


# ---------------------------------------------------------------------------------------
# export


def export_model(model, out: str | Path, *, tokenizer, task: str | None = None,
                 max_len: int | None = None, sample: dict | None = None,
                 opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                 source: dict | None = None, labels=(), template: str = "",
                 int8: bool = False,
                 external_threshold: int = graph.EXTERNAL_DATA_THRESHOLD) -> ExportResult:
    """Export a pruned model to a verified ONNX file.

    Args:
      model: a full Encoder / Decoder with masks (compacted here, LoRA merged) or a
        compacted model without adapters.
      out: the ``.onnx`` path to write.
      tokenizer: the model's Hugging Face tokenizer (embedded in the file; tokenises the
        verification inputs when ``sample`` is not given).
      task: ``data.task`` (``sst2``, ``classification``, ...) or None.
      labels: a classifier's class names by id (``TaskData.label_names``); default: a
        preset task's names, else ``LABEL_i``.
      template: a decoder's prompt template (``TaskData.template``; the inference runtime
        wraps prompts in it); default: a preset task's template, else none.
      max_len: the tokenisation length the model was trained with.
      sample: int32 ``(B, L)`` verification inputs (:func:`sample_inputs` /
        :func:`examples_sample`); default: :data:`DEFAULT_TEXTS` tokenised.
      opset: ONNX opset (see the module note). tolerance: max abs difference allowed.
      source: provenance stored in the metadata (run, device id, round, rank, ...).
      int8: also write the INT8 CPU graph (``export.quantize``; encoders only).
      external_threshold: weights of this many bytes or more go to external data.
    Returns:
      :class:`ExportResult`. Raises :class:`ExportError` (files removed) when the graph
      cannot be built or does not match JAX.
    """

    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"the output {str(out)!r} must end in .onnx")
    to_onnx = converter()
    _ort()
    t0 = time.perf_counter()
    small, dense = prepare(model)
    meta = build_meta(small, dense, tokenizer, task=task, max_len=max_len, opset=opset,
                      source=source, labels=labels, template=template)
    fn, specs = graph_function(small, meta)
    quiet = logging.getLogger("onnx_ir")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "value type ... not known" notes on shape scalars
    try:
        with warnings.catch_warnings():  # jax2onnx's plugins still read nnx's `.value`
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="jax2onnx")
            proto = to_onnx(fn, specs, model_name=f"fedspine_{meta.kind}", opset=int(opset),
                            input_names=list(meta.inputs), output_names=list(meta.outputs))
    except Exception as e:
        raise ExportError(f"jax2onnx could not convert the {meta.arch} model: "
                          f"{type(e).__name__}: {e}") from e
    finally:
        quiet.setLevel(level)
    report = graph.tensorrt_friendly(proto)
    if report["einsum_left"]:
        log.warning("%d Einsum nodes remain (not plain matrix products)",
                    report["einsum_left"])
    proto.producer_name = "fedspine-jax"
    proto.doc_string = (f"FedSpine {meta.kind} ({meta.arch}), compacted with the LoRA merged; "
                        f"{meta.params:,} of {meta.dense_params:,} parameters")
    if int8 and meta.is_decoder:
        raise ExportError("--int8 is for encoders (classifiers); decoders have no CPU graph")
    tok_files = metadata.tokenizer_files(tokenizer)
    _set_props(proto, meta, tok_files)
    files = graph.save(proto, out, external_threshold)
    cpu_files, fusions = [], {}
    cpu_path = metadata.graph_path(out, metadata.CPU)
    for kind in (metadata.CPU, metadata.CPU_INT8):  # no stale graphs of an earlier export
        for p in graph.model_files(metadata.graph_path(out, kind)):
            p.unlink(missing_ok=True)
    if not meta.is_decoder:
        from fedspine_jax.export import cpu_graph

        fused, fusions = cpu_graph.build(proto, small.cfg.num_heads, small.cfg.hidden_size)
        _set_props(fused, dataclasses.replace(meta, graph=metadata.CPU), tok_files)
        cpu_files = graph.save(fused, cpu_path, external_threshold)
        del fused
    del proto
    t1 = time.perf_counter()
    if sample is None:
        sample = sample_inputs(tokenizer, meta)
    written = files + cpu_files
    try:
        checks, scales = verify(out, small, meta, sample, tolerance)
        cpu_checks = verify(cpu_path, small, meta, sample, tolerance)[0] if cpu_files else {}
        int8_path, int8_check = None, None
        if int8:
            from fedspine_jax.export import quantize

            int8_path = metadata.graph_path(out, metadata.CPU_INT8)
            int8_files, int8_check = quantize.write_int8(cpu_path, int8_path, sample)
            written += int8_files
    except ExportError:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    t2 = time.perf_counter()
    return ExportResult(path=out, files=files, bytes=sum(f.stat().st_size for f in files),
                        meta=meta, max_abs_diff=max(checks.values()), checks=checks,
                        scales=scales, graph=report,
                        seconds={"convert": t1 - t0, "verify": t2 - t1},
                        cpu_path=cpu_path if cpu_files else None, cpu_files=cpu_files,
                        cpu_checks=cpu_checks, fusions=fusions, int8_path=int8_path,
                        int8_check=int8_check)


def _set_props(proto, meta: ModelMeta, tok_files: dict) -> None:
    """Replace ``proto``'s metadata entries by ``meta`` and the tokenizer files."""
    import onnx

    del proto.metadata_props[:]
    for k, v in metadata.props(meta, tok_files).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
