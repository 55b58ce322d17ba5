"""Export: compaction -> ONNX (jax2onnx) verified in ONNX Runtime, the inference runtime,
TensorRT engines (skipped without TensorRT), and exports from a run directory.

Tiny random-init models with the MiniLM tokenizer (so inputs are real tokenised text);
every layer of the pruned models keeps a different number of heads and channels, one
layer keeps none of either.
"""

from __future__ import annotations

import dataclasses

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

from fedspine_jax.cli import main  # noqa: E402
from fedspine_jax.device_runtime.inference import InferenceError, load  # noqa: E402
from fedspine_jax.export import graph, tensorrt  # noqa: E402
from fedspine_jax.export.onnx_export import ExportError, export_model  # noqa: E402
from fedspine_jax.models import ArchConfig, build_model, generate, load_tokenizer  # noqa: E402
from fedspine_jax.models.state import set_masks  # noqa: E402

TEXTS = ["a gripping, beautifully acted film", "the plot is thin and the jokes fall flat",
         "an uneven but often funny comedy", "ok", "I would not recommend it to anyone.",
         "one of the best films of the year , funny and moving"]


def tiny(arch: str) -> ArchConfig:
    dec = arch == "llama"
    return ArchConfig(arch=arch, vocab_size=30522, hidden_size=32, num_layers=3, num_heads=4,
                      num_kv_heads=2 if dec else 4, head_dim=8, intermediate_size=48,
                      max_positions=128, num_labels=0 if dec else 2, lora_rank=4,
                      norm_eps=1e-6 if dec else 1e-12)


def pruned(arch: str):
    """A tiny model with non-zero LoRA and different head / channel counts per layer:
    heads 4, 1, 0 (encoder) or 2 (one kv group), 0, 3 (decoder); channels 48, 10, 0."""
    model = build_model(tiny(arch), 0)
    rng = np.random.default_rng(0)
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        v.set_value(jnp.asarray(rng.normal(size=v.shape) * 0.05, jnp.float32))
    if arch == "llama":  # layer 0: kv head 0 loses both its query heads (compaction drops it)
        hm = np.array([[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]], np.float32)
    else:
        hm = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    cm = np.ones((3, 48), np.float32)
    cm[1, 10:] = 0
    cm[2, :] = 0
    set_masks(model, hm, cm)
    return model


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("minilm-l6")


@pytest.fixture(scope="module")
def encoder():
    return pruned("bert")


@pytest.fixture(scope="module")
def decoder():
    return pruned("llama")


@pytest.fixture(scope="module")
def enc_export(encoder, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "enc.onnx"
    return export_model(encoder, out, tokenizer=tok, task="sst2", max_len=64)


@pytest.fixture(scope="module")
def dec_export(decoder, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("dec") / "dec.onnx"
    return export_model(decoder, out, tokenizer=tok, task="dolly", max_len=64)


def _enc_inputs(tok, texts, max_len=64):
    e = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="np")
    return {k: e[k].astype(np.int32) for k in ("input_ids", "attention_mask",
                                               "token_type_ids")}


# ---------------------------------------------------------------------------------------
# graph passes


@pytest.mark.parametrize("eq,ok", [("abc,cd->abd", True), ("bc,cd->bd", True),
                                   ("abcd,abde->abce", True), ("abc,dc->abd", False),
                                   ("abc,cd->abc", False), ("aab,bc->aac", False),
                                   ("abc,abd->acd", False)])
def test_matmul_equations(eq, ok):
    assert graph._is_matmul_equation(eq) is ok


# ---------------------------------------------------------------------------------------
# the encoder


def test_encoder_export_matches_jax(enc_export, encoder, tok):
    r = enc_export
    assert r.max_abs_diff <= 1e-4 and len(r.checks) == 2
    assert r.meta.heads == (4, 1, 0) and r.meta.channels == (48, 10, 0)
    assert r.meta.labels == ("negative", "positive")
    m = onnx.load(str(r.path))
    ops = {n.op_type for n in m.graph.node}
    assert "Einsum" not in ops and "MatMul" in ops
    assert graph.opset_of(m) == 17 and m.ir_version == 8  # what TensorRT 8.5's parser reads
    assert all(0 not in t.dims for t in m.graph.initializer), "empty weights left"
    for inp in m.graph.input:
        assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT32
    # new shapes (dynamic batch and sequence) against the *masked, unmerged* model
    import onnxruntime as ort

    sess = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
    for texts in (TEXTS[:3], TEXTS[3:4], TEXTS):
        feeds = _enc_inputs(tok, texts)
        got = sess.run(None, feeds)[0]
        ref = np.asarray(encoder(*[jnp.asarray(feeds[k]) for k in
                                   ("input_ids", "attention_mask", "token_type_ids")]))
        assert got.shape == (len(texts), 2)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


def test_pruned_file_is_smaller_and_external_data(encoder, enc_export, tok, tmp_path):
    dense = build_model(tiny("bert"), 0)  # same weights, nothing pruned
    r = export_model(dense, tmp_path / "dense.onnx", tokenizer=tok, task="sst2",
                     max_len=64, external_threshold=0)  # force the external-data layout
    assert [f.name for f in r.files] == ["dense.onnx", "dense.onnx.data"]
    assert r.meta.params == r.meta.dense_params > enc_export.meta.params
    assert r.bytes > enc_export.bytes
    pred = load(r.path)  # ONNX Runtime finds the data file beside it
    assert len(pred.classify(TEXTS[:2])) == 2


def test_infer_cli_gives_the_jax_labels(enc_export, encoder, tok, tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in TEXTS))
    assert main(["infer", str(enc_export.path), "--file", str(f), "--batch-size", "4"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    feeds = _enc_inputs(tok, TEXTS)
    ref = np.asarray(encoder(*[jnp.asarray(feeds[k]) for k in
                               ("input_ids", "attention_mask", "token_type_ids")]))
    assert [r["label_id"] for r in rows] == ref.argmax(1).tolist()
    assert [r["text"] for r in rows] == TEXTS
    for r in rows:
        assert set(r["probs"]) == {"negative", "positive"}
        assert abs(sum(r["probs"].values()) - 1) < 1e-5
        assert r["label"] == max(r["probs"], key=r["probs"].get)


def test_cpu_graph_is_fused_verified_and_served_on_cpu(enc_export, encoder, tok):
    r = enc_export
    assert r.cpu_path == r.path.with_name("enc.cpu.onnx") and r.cpu_path.is_file()
    assert max(r.cpu_checks.values()) <= 1e-4 and len(r.cpu_checks) == 2
    # heads (4, 1, 0), channels (48, 10, 0): two attention blocks, two FFNs
    assert r.fusions["rewrites"]["attention"] == 2 and r.fusions["rewrites"]["gelu"] == 2
    fused = r.fusions["fused"]
    assert fused["MultiHeadAttention"] == 2 and fused["BiasGelu"] == 2
    cpu = onnx.load(str(r.cpu_path))
    assert sum(n.op_type == "Softmax" for n in cpu.graph.node) == 0
    portable_domains = {n.domain for n in onnx.load(str(r.path)).graph.node}
    assert portable_domains <= {"", "ai.onnx"}  # TensorRT's graph keeps standard ops
    pred = load(r.path)  # CPU only here: the runtime serves the fused graph
    assert pred.backend.path == r.cpu_path and pred.meta.graph == "cpu"
    feeds = _enc_inputs(tok, TEXTS)
    ref = np.asarray(encoder(*[jnp.asarray(feeds[k]) for k in
                               ("input_ids", "attention_mask", "token_type_ids")]))
    np.testing.assert_allclose(pred.logits(TEXTS, batch_size=4), ref, rtol=0, atol=1e-4)
    with pytest.raises(ExportError, match="build the engine from the portable enc.onnx"):
        tensorrt.build_engine(r.cpu_path, r.path.with_name("x.plan"))


def test_logits_batch_by_length_and_keep_the_order(enc_export):
    pred = load(enc_export.path)
    widths, run = [], pred.backend.run

    def recording_run(feeds):
        widths.append(feeds["input_ids"].shape)
        return run(feeds)

    one_by_one = np.concatenate([pred.logits([t]) for t in TEXTS])
    pred.backend.run = recording_run
    got = pred.logits(TEXTS, batch_size=2)
    np.testing.assert_allclose(got, one_by_one, rtol=0, atol=1e-5)
    lengths = sorted(len(pred.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert widths == [(2, lengths[1]), (2, lengths[3]), (2, lengths[5])]


def test_cpu_graph_keeps_layernorm_unfused_and_masks_padded_rows_alike(enc_export, tok,
                                                                      tmp_path):
    """No SkipLayerNormalization even after ONNX Runtime's own session-time fusions, and
    a row whose attention mask is all zeros gives the portable graph's output (the
    attention's mask fill is the graph's, not MultiHeadAttention's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "session.onnx")
    cpu = ort.InferenceSession(str(enc_export.cpu_path), so,
                               providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    assert "MultiHeadAttention" in ops
    assert not ops & {"SkipLayerNormalization", "LayerNormalization"}
    p_model = onnx.load(str(enc_export.path))
    consts = graph._constants(p_model)
    fills = {float(onnx.numpy_helper.to_array(consts[n.input[2]])) for n in p_model.graph.node
             if n.op_type == "Where" and n.input[2] in consts}
    mha = [n for n in onnx.load(str(enc_export.cpu_path)).graph.node
           if n.op_type == "MultiHeadAttention"]
    assert len(fills) == 1 and len(mha) == 2
    (fill,) = fills
    for n in mha:
        attr = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attr["mask_filter_value"] == pytest.approx(fill, rel=1e-6)
    portable = ort.InferenceSession(str(enc_export.path), providers=["CPUExecutionProvider"])
    feeds = _enc_inputs(tok, TEXTS)
    feeds["attention_mask"][2] = 0
    want, got = portable.run(None, feeds)[0], cpu.run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_int8_graph_agrees_with_fp32(tok, tmp_path):
    from fedspine_jax.models import load_pretrained

    model, mtok = load_pretrained("minilm-l6", num_labels=2)
    texts = TEXTS * 3
    sample = _enc_inputs(mtok, texts)
    r = export_model(model, tmp_path / "m.onnx", tokenizer=mtok, task="sst2", max_len=64,
                     sample=sample, int8=True)
    assert r.int8_path == tmp_path / "m.int8.onnx"
    q = onnx.load(str(r.int8_path))
    ops = {n.op_type for n in q.graph.node}
    assert "MatMulInteger" in ops and "MultiHeadAttention" in ops
    assert r.int8_path.stat().st_size < 0.4 * r.cpu_path.stat().st_size
    c = r.int8_check
    assert c.rows == len(texts) and c.argmax_agreement >= 0.8
    fp32 = load(r.cpu_path).logits(texts)
    int8 = load(r.int8_path)
    assert int8.meta.graph == "cpu-int8"
    got = int8.logits(texts)
    assert np.abs(got - fp32).max() == pytest.approx(c.max_abs_diff, abs=1e-4)
    assert c.max_abs_diff > 0  # the weights are int8 now, not a copy of the fp32 graph
    # a later export without --int8 removes the now stale INT8 graph
    export_model(model, tmp_path / "m.onnx", tokenizer=mtok, task="sst2", max_len=64,
                 sample=sample)
    assert not r.int8_path.exists()


# ---------------------------------------------------------------------------------------
# the decoder


def test_decoder_export_matches_jax_and_generates_the_same(dec_export, decoder, tok):
    r = dec_export
    assert r.max_abs_diff <= 1e-4
    assert {"prefill", "decode"} <= {k.split()[0] for k in r.checks}
    assert r.meta.kind == "causal_lm" and r.meta.heads == (2, 0, 3)
    # layer 0 kept one kv head, layer 1 none (no cache), layer 2 both
    assert [(c.layer, c.kv_heads) for c in r.meta.cache] == [(0, 1), (2, 2)]
    assert "past_key_1" not in r.meta.inputs
    pred = load(r.path)
    prompts = ["the capital of france is", "one two three"]
    got = pred.generate_ids(prompts, max_new_tokens=6, batch_size=2)
    tok.padding_side = "left"
    e = tok(prompts, padding=True, return_tensors="np")
    tok.padding_side = "right"
    ref = np.asarray(generate(decoder, jnp.asarray(e["input_ids"], jnp.int32),
                              jnp.asarray(e["attention_mask"], jnp.int32), 6))
    eos = r.meta.eos_token_id
    for row, want in zip(got, ref.tolist()):
        cut = want.index(eos) if eos in want else len(want)
        assert row == want[:cut]
    assert len(pred.generate(["hello"], max_new_tokens=3)) == 1


# ---------------------------------------------------------------------------------------
# bad input


def test_missing_and_corrupt_files_are_clear_errors(enc_export, tmp_path):
    with pytest.raises(InferenceError, match="does not exist"):
        load(tmp_path / "missing.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(enc_export.path.read_bytes()[:5000])
    with pytest.raises(InferenceError, match="not a valid ONNX model"):
        load(cut)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(InferenceError, match="is empty"):
        load(empty)
    plain = tmp_path / "plain.onnx"  # valid ONNX without our metadata
    m = onnx.load(str(enc_export.path))
    del m.metadata_props[:]
    onnx.save(m, str(plain))
    with pytest.raises(InferenceError, match="no fedspine metadata"):
        load(plain)
    with pytest.raises(InferenceError, match="cannot tell how to run"):
        weird = tmp_path / "model.bin"
        weird.write_bytes(b"x")
        load(weird)
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine")
    with pytest.raises(InferenceError, match="no metadata file"):
        load(engine)
    assert main(["infer", str(cut), "--text", "hello"]) == 2


def test_failed_verification_removes_the_file(encoder, tok, tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="ONNX Runtime and JAX differ by"):
        export_model(encoder, out, tokenizer=tok, tolerance=-1.0)  # nothing can pass
    assert not out.exists()
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_model(encoder, tmp_path / "model.txt", tokenizer=tok)


def test_engine_without_tensorrt_says_how(enc_export, tmp_path, capsys):
    if tensorrt.available():
        pytest.skip("tensorrt is installed here")
    with pytest.raises(tensorrt.TensorRTUnavailable) as e:
        tensorrt.build_engine(enc_export.path, tmp_path / "m.plan", fp16=True,
                              max_shape="batch=8,seq=64")
    msg = str(e.value)
    assert "pip install 'fedspine-jax[tensorrt]'" in msg
    assert e.value.trtexec.startswith("trtexec --onnx=")
    assert "--maxShapes=input_ids:8x64,attention_mask:8x64,token_type_ids:8x64" in msg
    assert "--fp16" in msg
    assert main(["export", str(enc_export.path), "--engine", str(tmp_path / "m.plan")]) == 3
    assert "trtexec --onnx=" in capsys.readouterr().err


def test_int8_engine_from_an_onnx_file_reads_its_calibration_file(enc_export, shared_data,
                                                                   tmp_path, capsys):
    """`--calibration FILE` tokenises a preset task's file with the model's own tokenizer
    before the builder runs; a bad file is one line naming it."""
    if tensorrt.available():
        pytest.skip("tensorrt is installed here")
    plan = str(tmp_path / "m.plan")
    calib = str(shared_data / "sst2" / "validation.jsonl")
    assert main(["export", str(enc_export.path), "--engine", plan, "--int8",
                 "--calibration", calib]) == 3  # read, tokenised; then no TensorRT
    assert "--int8 --calib=" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "fine", "label": 7}\n')
    assert main(["export", str(enc_export.path), "--engine", plan, "--int8",
                 "--calibration", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1" in err[0], err


def test_profile_shapes(enc_export, dec_export):
    em, dm = enc_export.meta, dec_export.meta
    assert tensorrt.parse_dims("batch=8, seq=32", em) == {"batch": 8, "seq": 32}
    assert tensorrt.parse_dims("input_ids:8x32", em) == {"batch": 8, "seq": 32}
    p = tensorrt.profile(dm, "batch=1,seq=1", None, "batch=4,seq=16,cache=48")
    assert p.max["past_key_2"] == (4, 48, 2, 8) and p.min["cache_mask"] == (1, 1)
    assert "cache_position" not in p.max  # a scalar: no profile
    for bad, words in (("cache=4", "unknown dimension"), ("batch=0", "positive integer"),
                       ("nope:1x2", "no input"), ("input_ids:1x2x3", "dimensions"),
                       ("batch=2,input_ids:3x4", "both"), ("seq", "dim=value")):
        with pytest.raises(ExportError, match=words):
            tensorrt.profile(em, None, None, bad)


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnxruntime(enc_export, dec_export, tmp_path):
    for r in (enc_export, dec_export):
        plan = tensorrt.build_engine(r.path, tmp_path / (r.path.stem + ".plan"),
                                     max_shape="batch=4,seq=64" + (",cache=80" if
                                                                   r.meta.is_decoder else ""))
        trt_pred, ort_pred = load(plan), load(r.path, providers=["CPUExecutionProvider"])
        assert trt_pred.backend.name == "tensorrt"
        if r.meta.is_decoder:
            assert trt_pred.generate_ids(TEXTS[:2], 5) == ort_pred.generate_ids(TEXTS[:2], 5)
        else:
            np.testing.assert_allclose(trt_pred.logits(TEXTS[:4]), ort_pred.logits(TEXTS[:4]),
                                       atol=1e-3)


class FakeTensorRT:
    """A stand-in for the ``tensorrt`` module: the few builder / network / config calls
    ``tensorrt.build_with`` makes. Its builder calibrates as TensorRT does: it reads the
    calibrator's cache and, when there is none, asks for batches until None and writes
    the cache."""

    __version__ = "stand-in"
    NetworkDefinitionCreationFlag = type("Flags", (), {})  # TensorRT 10: explicit batch only
    MemoryPoolType = type("Pools", (), {"WORKSPACE": "workspace"})
    BuilderFlag = type("BuilderFlags", (), {"FP16": "fp16", "INT8": "int8"})

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class IInt8EntropyCalibrator2:
        def __init__(self):
            pass

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, mid, hi):
            self.shapes[name] = (tuple(lo), tuple(mid), tuple(hi))

    class Config:
        def __init__(self):
            self.flags, self.profiles = set(), []
            self.int8_calibrator = self.calibration_profile = None

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def set_calibration_profile(self, p):
            self.calibration_profile = p

    class Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            for i in onnx.load(path, load_external_data=False).graph.input:
                dims = [d.dim_value or -1 for d in i.type.tensor_type.shape.dim]
                self.network.inputs.append(type("Input", (), {
                    "name": i.name, "shape": dims, "is_shape_tensor": False}))
            return True

    class Builder:
        built: list = []

        def __init__(self, logger):
            self.cache_read = None

        def create_network(self, flags):
            return FakeTensorRT.Network()

        def create_builder_config(self):
            return FakeTensorRT.Config()

        def create_optimization_profile(self):
            return FakeTensorRT.Profile()

        def build_serialized_network(self, network, config):
            cal, fed = config.int8_calibrator, []
            names = [network.get_input(i).name for i in range(network.num_inputs)]
            self.cache_read = cal.read_calibration_cache()
            if self.cache_read is None:
                while (ptrs := cal.get_batch(names)) is not None:
                    fed.append(ptrs)
                cal.write_calibration_cache(memoryview(f"scales of {len(fed)} batches"
                                                       .encode()))
            FakeTensorRT.Builder.built.append((self, config, fed))
            return b"engine"


def test_int8_engine_calibrates_on_task_data_and_reuses_its_cache(enc_export, tok,
                                                                  shared_data, tmp_path):
    from fedspine_jax import data

    records = data.load_records("sst2", str(shared_data / "sst2"))[1][:43]
    examples = data.encode(tok, "sst2", records, 64, (64,))
    batches = tensorrt.calibration_batches(examples, 64, batch=8)
    assert len(batches) == 5  # 43 examples: whole batches of 8 only
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
            k: ((8, 64), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    first = tok(records[0]["sentence"], truncation=True, max_length=64)["input_ids"]
    assert batches[0]["input_ids"][0, :len(first)].tolist() == first
    assert batches[0]["attention_mask"][0].sum() == len(first)

    copied = []

    def to_device(name, host):
        copied.append((name, host.copy()))
        return len(copied)

    trt = FakeTensorRT
    engine = tmp_path / "enc.plan"
    cache = tensorrt.calibration_cache_path(engine, enc_export.path)
    tensorrt.build_with(trt, enc_export.path, engine, int8=True, calibration=batches,
                        to_device=to_device)
    builder, config, fed = trt.Builder.built[-1]
    assert config.flags == {"int8"}
    assert {v for v in config.calibration_profile.shapes.values()} == {((8, 64),) * 3}
    names = list(enc_export.meta.inputs)
    assert fed == [[3 * i + 1, 3 * i + 2, 3 * i + 3] for i in range(5)]  # one pointer each
    for i, (name, host) in enumerate(copied):
        np.testing.assert_array_equal(host, batches[i // 3][names[i % 3]])
    assert cache.read_bytes() == b"scales of 5 batches" and engine.read_bytes() == b"engine"
    sidecar = json.loads(engine.with_name("enc.plan.json").read_text())
    assert sidecar["int8"] is True and sidecar["calibration_cache"] == cache.name

    # the next build reads the cache and feeds nothing; without data or cache it refuses
    tensorrt.build_with(trt, enc_export.path, engine, int8=True, to_device=to_device)
    builder, config, fed = trt.Builder.built[-1]
    assert builder.cache_read == b"scales of 5 batches" and fed == [] and len(copied) == 15
    cache.unlink()
    with pytest.raises(ExportError, match="calibration data"):
        tensorrt.build_with(trt, enc_export.path, engine, int8=True, to_device=to_device)
    with pytest.raises(ExportError, match="exceed the profile"):
        tensorrt.build_with(trt, enc_export.path, engine, int8=True, to_device=to_device,
                            calibration=batches, max_shape="batch=4,seq=64")


@pytest.mark.tensorrt
def test_int8_engine_agrees_with_fp32_onnx(enc_export, tok, shared_data, tmp_path):
    from fedspine_jax import data

    records = data.load_records("sst2", str(shared_data / "sst2"))[1]
    examples = data.encode(tok, "sst2", records[:256], 64, (64,))
    plan = tensorrt.build_engine(enc_export.path, tmp_path / "enc.plan", int8=True,
                                 calibration=tensorrt.calibration_batches(examples, 64))
    c = tensorrt.check_engine(plan, enc_export.path, tensorrt.calibration_batches(
        data.encode(tok, "sst2", records[256:512], 64, (64,)), 64))
    assert c.rows == 256 and c.argmax_agreement >= 0.9


# ---------------------------------------------------------------------------------------
# from a run directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data, tiny_config_path, save_pruned_run):
    """A run directory as `fedspine simulate` leaves it (config + checkpoint), with device
    1 pruned and a trained-looking LoRA, written without running the rounds."""
    from fedspine_jax import experiment
    from fedspine_jax.config import dump_config, load_config
    from fedspine_jax.models.state import get_head, get_lora

    run = tmp_path_factory.mktemp("run")
    here = os.getcwd()
    try:  # the data given as a path relative to where the run starts, as users do
        os.chdir(shared_data.parent)
        cfg = load_config(tiny_config_path, ["data.source=data/sst2"])
    finally:
        os.chdir(here)
    dump_config(cfg, run / "config.yaml")
    s = experiment.setup(cfg)
    rng = np.random.default_rng(1)
    lora = jax.tree.map(lambda v: (rng.normal(size=v.shape) * 0.05).astype(np.float32),
                        get_lora(s.model))
    state = s.fed.init(lora, get_head(s.model))
    state = save_pruned_run(run, state, 3, (0, slice(None, 3)), (1, slice(5, None)))
    return run, s, state


def test_run_directory_works_from_anywhere(run_dir, tmp_path, monkeypatch, capsys):
    """The run was made with a relative data path elsewhere; export and infer work on it
    from another directory, and with its data gone they say which --set points to it."""
    run = run_dir[0]
    monkeypatch.chdir(tmp_path)
    assert main(["infer", str(run), "--device-id", "1", "--text", "a gripping film"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["label"] in ("negative",
                                                                           "positive")
    assert main(["infer", str(run), "--device-id", "1", "--text", "x", "--set",
                 f"data.source={tmp_path / 'moved'}"]) == 2
    assert "--set data.source=" in capsys.readouterr().err


def test_export_from_run_directory(run_dir, tmp_path, capsys):
    from fedspine_jax import experiment

    run, s, state = run_dir
    out = tmp_path / "dev1.onnx"
    assert main(["export", str(run), "--device-id", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max abs diff" in printed and "heads per layer [1, 4] of 4" in printed
    pred = load(out)
    src = pred.meta.source
    assert (src["device_id"], src["rank"], src["round"]) == (1, 4, 3)
    # the exported model is the device's local model as the simulator evaluates it
    texts = TEXTS[:4]
    model = experiment.load_device_model(s, state, 1)
    feeds = _enc_inputs(pred.tokenizer, texts, pred.meta.max_len)
    ref = np.asarray(model(*[jnp.asarray(feeds[k]) for k in
                             ("input_ids", "attention_mask", "token_type_ids")]))
    np.testing.assert_allclose(pred.logits(texts), ref, rtol=0, atol=1e-4)
    # the JAX back end serves the same model straight from the run directory
    jax_pred = load(run, device_id=1)
    assert jax_pred.backend.name == "jax"
    np.testing.assert_allclose(jax_pred.logits(texts), ref, rtol=0, atol=1e-5)
    assert main(["infer", str(run), "--text", "x"]) == 2  # no --device-id
    assert "--device-id" in capsys.readouterr().err
    assert main(["export", str(run), "--device-id", "7", "--out", str(out)]) == 2
    assert "outside 0..2" in capsys.readouterr().err
    # an INT8 engine calibrates on the device's own training share
    from fedspine_jax.export.run import device_model

    dm = device_model(s, state, 1)
    np.testing.assert_array_equal(dm.train.source_row,
                                  s.task.train.source_row[s.devices[1].train_idx])
    batches = tensorrt.calibration_batches(dm.train, dm.max_len, batch=2)
    assert len(batches) == min(len(dm.train), tensorrt.CALIBRATION_ROWS) // 2
    assert batches[0]["input_ids"].shape == (2, dm.max_len)
    if not tensorrt.available():
        assert main(["export", str(run), "--device-id", "1", "--out", str(out), "--engine",
                     str(tmp_path / "dev1.plan"), "--int8"]) == 3
        assert "--int8 --calib=" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# a run of an open task: its own label names and prompt template travel with the model


def _saved_run(run, cfg, seed: int = 1):
    """``run`` as `fedspine simulate` leaves it after round 1 (config + checkpoint), with a
    trained-looking LoRA, written without running the rounds: (run, setup, state)."""
    from fedspine_jax import checkpoint, experiment
    from fedspine_jax.config import dump_config
    from fedspine_jax.models.state import get_head, get_lora

    dump_config(cfg, run / "config.yaml")
    s = experiment.setup(cfg)
    rng = np.random.default_rng(seed)
    lora = jax.tree.map(lambda v: (rng.normal(size=v.shape) * 0.05).astype(np.float32),
                        get_lora(s.model))
    checkpoint.save(run / "checkpoints", 1, s.fed.init(lora, get_head(s.model)), {})
    return run, s


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, shared_data, tiny_config_path):
    """A `classification` run on a CSV whose labels are the names ``bad`` / ``good``."""
    import csv

    from fedspine_jax.config import load_config

    run = tmp_path_factory.mktemp("labelled")
    data = run / "reviews"
    data.mkdir()
    for split, n in (("train", 120), ("validation", 20)):
        lines = (shared_data / "sst2" / f"{split}.jsonl").read_text().splitlines()[:n]
        with (data / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["review", "stars"])
            for r in map(json.loads, lines):
                w.writerow([r["sentence"], ("bad", "good")[r["label"]]])
    cfg = load_config(tiny_config_path, [
        "data.task=classification", f"data.source={data}", "data.text_column=review",
        "data.label_column=stars", "data.label_names=[bad, good]",
        "data.min_samples_per_device=4"])
    return _saved_run(run, cfg)


def test_open_task_labels_reach_onnx_infer_and_hf_config(labelled_run, tmp_path, capsys):
    run, s = labelled_run
    assert s.task.label_names == ("bad", "good")
    out = tmp_path / "dev0.onnx"
    assert main(["export", str(run), "--device-id", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert load(out).meta.labels == ("bad", "good")
    assert main(["infer", str(out), "--text", TEXTS[0], "--text", TEXTS[1]]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert set(r["probs"]) == {"bad", "good"} and r["label"] in ("bad", "good")
    # the JAX back end, straight from the run directory, names them too
    assert load(run, device_id=0).meta.labels == ("bad", "good")
    # and the save_pretrained export's config.json
    hf = tmp_path / "dev0"
    assert main(["export", str(run), "--device-id", "0", "--hf", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["id2label"] == {"0": "bad", "1": "good"}
    assert config["label2id"] == {"bad": 0, "good": 1}


def test_label_names_default_and_mismatch(encoder, tok, tmp_path):
    from fedspine_jax.export.metadata import class_names
    from fedspine_jax.export.onnx_export import build_meta, prepare

    small, dense = prepare(encoder)
    names = {task: build_meta(small, dense, tok, task=task, max_len=32, opset=17,
                              source=None).labels for task in ("sst2", "classification")}
    assert names == {"sst2": ("negative", "positive"), "classification": ("LABEL_0", "LABEL_1")}
    assert build_meta(small, dense, tok, task="sst2", max_len=32, opset=17, source=None,
                      labels=("no", "yes")).labels == ("no", "yes")
    with pytest.raises(ExportError, match=r"3 label names \['a', 'b', 'c'\] for a "
                                          r"classifier of 2 classes"):
        build_meta(small, dense, tok, task=None, max_len=32, opset=17, source=None,
                   labels=("a", "b", "c"))
    assert class_names(2) == ("LABEL_0", "LABEL_1")


TEMPLATE = "Q: {q}\nA: "


@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory, tiny_config_path):
    """An `instruction` run of a tiny LLaMA on records ``{"q", "a"}`` with its own template."""
    from fedspine_jax.config import load_config

    run = tmp_path_factory.mktemp("instruction")
    data = run / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"what is {k} plus one", "a": f"{k + 1}"}) + "\n"
                            for k in range(40)))
    cfg = load_config(tiny_config_path, [
        "model.arch=llama", "model.num_kv_heads=2", "data.task=instruction",
        f"data.source={data}", f"data.template={json.dumps(TEMPLATE)}",
        "data.response_column=a", "data.min_samples_per_device=2"])
    return _saved_run(run, cfg)


def test_instruction_template_reaches_the_runtime(instruction_run, tmp_path, capsys):
    run, s = instruction_run
    assert s.task.template == TEMPLATE
    out = tmp_path / "lm.onnx"
    assert main(["export", str(run), "--device-id", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    pred = load(out)
    assert pred.meta.template == TEMPLATE and pred.template_fields() == ["q"]
    assert pred.prompt("what is 2 plus one") == "Q: what is 2 plus one\nA: "
    assert pred.prompt(record={"q": "x", "other": "y"}) == "Q: x\nA: "
    with pytest.raises(InferenceError, match="has one field"):
        pred.prompt("x", "a second text")
    assert load(run, device_id=0).meta.template == TEMPLATE  # the JAX back end too
    # `fedspine infer` wraps --text, and fills a record's own columns by name
    want = pred.generate([pred.prompt("what is 2 plus one")], 4)[0]
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"q": "what is 2 plus one"}) + "\n")
    for how in (["--text", "what is 2 plus one"], ["--file", str(f)]):
        assert main(["infer", str(out), *how, "--max-new-tokens", "4"]) == 0
        (row,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert row == {"prompt": "what is 2 plus one", "completion": want}


def test_dolly_prompts_are_unchanged(dec_export, tok):
    from fedspine_jax.data import DOLLY_TEMPLATE, RESPONSE_HEADER, dolly_prompt
    from fedspine_jax.device_runtime.inference import Predictor

    pred = load(dec_export.path)
    assert pred.meta.template == DOLLY_TEMPLATE
    old = Predictor(pred.backend, tok, dataclasses.replace(pred.meta, template=""))
    for p in (pred, old):  # a file exported before templates were carried: by its task
        assert p.prompt("Name a river.", "Rivers of Europe") == dolly_prompt(
            "Name a river.", "Rivers of Europe") + RESPONSE_HEADER
        assert p.prompt("Name a river.") == (
            "### Instruction:\nName a river.\n\n" + RESPONSE_HEADER)
