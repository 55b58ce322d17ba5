"""Models: LoRA invariants, masks, compaction, loading errors, parity with transformers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedspine_jax.models import (
    ArchConfig,
    ModelLoadError,
    best_rank_approx,
    build_model,
    generate,
    load_pretrained,
    resize_lora,
)
from fedspine_jax.models import lora as lora_module
from fedspine_jax.models.compaction import compact, expand_lora
from fedspine_jax.models.lora import HeadParam, Mask, lora_branch


def tiny_arch(arch: str, **kw) -> ArchConfig:
    base = dict(arch=arch, vocab_size=120, hidden_size=32, num_layers=3, num_heads=4,
                num_kv_heads=2 if arch == "llama" else 4, head_dim=8, intermediate_size=24,
                max_positions=40, num_labels=0 if arch == "llama" else 3,
                pad_token_id=1 if arch == "roberta" else 0, lora_rank=4, norm_eps=1e-6)
    base.update(kw)
    return ArchConfig(**base)


def randomize_lora(model, seed=0):
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(jnp.asarray(rng.normal(size=var.shape) * 0.1, jnp.float32))
    return model


def inputs(seed=0, b=2, l=7, vocab=120):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(2, vocab, (b, l)), jnp.int32)
    am = jnp.ones((b, l), jnp.int32).at[1, 5:].set(0)
    return ids, am


def masked_diff(a, b, am):
    d = jnp.abs(a - b)
    return float((d * am[..., None]).max() if d.ndim == 3 else d.max())


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("r,new", [(4, 8), (0, 3), (2, 2)])
def test_grow_keeps_output(r, new):
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (16, r))
    b = jax.random.normal(jax.random.PRNGKey(1), (r, 12))
    alpha = 16.0
    before = (alpha / r) * (a @ b) if r else jnp.zeros((16, 12))
    a2, b2 = resize_lora(a, b, new, alpha, jax.random.PRNGKey(2))
    assert a2.shape == (16, new) and b2.shape == (new, 12)
    after = (alpha / new) * (a2 @ b2)
    np.testing.assert_allclose(after, before, atol=1e-5)
    # new columns of `a` are Gaussian (not zero) and new rows of `b` are zero
    if new > r:
        assert float(jnp.abs(a2[:, r:]).sum()) > 0
        assert float(jnp.abs(b2[r:]).sum()) == 0


def test_shrink_is_best_rank_approximation():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(20, 6)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(6, 15)), jnp.float32)
    alpha = 8.0
    a2, b2 = resize_lora(a, b, 3, alpha, jax.random.PRNGKey(0))
    eff = (alpha / 6) * np.asarray(a @ b)
    u, s, vt = np.linalg.svd(eff)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    got = (alpha / 3) * np.asarray(a2 @ b2)
    np.testing.assert_allclose(got, best, atol=1e-4)
    # Eckart-Young: the error is exactly the tail of the spectrum
    np.testing.assert_allclose(np.linalg.norm(eff - got), np.sqrt((s[3:] ** 2).sum()), rtol=1e-4)
    a0, b0 = best_rank_approx(a, b, 0)
    assert a0.shape == (20, 0) and b0.shape == (0, 15)


def test_lora_rank_zero_and_scaling():
    cfg = tiny_arch("bert", lora_rank=0)
    m = build_model(cfg)
    ids, am = inputs()
    out = m(ids, am)
    assert out.shape == (2, 3)
    cfg8 = tiny_arch("bert", lora_rank=8, lora_alpha=16.0)
    m8 = build_model(cfg8)
    lin = m8.layers[0].attn.q
    x = jnp.ones((1, 32))
    lin.lora_b.set_value(jnp.ones((8, 32)) * 0.01)
    expect = x @ lin.kernel[...] + lin.bias[...] + 2.0 * (x @ lin.lora_a[...]) @ lin.lora_b[...]
    np.testing.assert_allclose(lin(x), expect, atol=1e-6)


def _plain_branch(x, a, b):
    return (x @ a) @ b


@pytest.mark.parametrize("lead,d_in,r,d_out", [
    ((5,), 16, 4, 12),            # 2-D input
    ((3, 7), 16, 8, 24),          # (batch, tokens, in), as in the model
    ((2, 3, 4), 9, 1, 5),         # more leading dims
    ((), 6, 3, 4),                # a single vector
    ((3, 7), 16, 0, 24),          # rank 0: zero-width factors
    ((0, 7), 16, 4, 24),          # empty batch
])
def test_lora_branch_vjp_matches_autodiff(lead, d_in, r, d_out):
    ka, kb, kx, kt = jax.random.split(jax.random.PRNGKey(sum(lead) + d_in + r), 4)
    x = jax.random.normal(kx, lead + (d_in,))
    a = jax.random.normal(ka, (d_in, r))
    b = jax.random.normal(kb, (r, d_out))
    dy = jax.random.normal(kt, lead + (d_out,))
    y, vjp = jax.vjp(lora_branch, x, a, b)
    y_ref, vjp_ref = jax.vjp(_plain_branch, x, a, b)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, ref, primal in zip(vjp(dy), vjp_ref(dy), (x, a, b)):
        assert got.shape == primal.shape and got.dtype == primal.dtype
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # under jit, and inside a scalar loss with the LoRA scaling (as LoRALinear uses it)
    loss = lambda f: lambda x, a, b: jnp.sum(jnp.tanh(2.0 * f(x, a, b)))  # noqa: E731
    g = jax.jit(jax.grad(loss(lora_branch), argnums=(0, 1, 2)))(x, a, b)
    g_ref = jax.grad(loss(_plain_branch), argnums=(0, 1, 2))(x, a, b)
    for got, ref in zip(g, g_ref):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_lora_branch_keeps_dtypes():
    x = jnp.ones((2, 3, 8), jnp.bfloat16)
    a = jnp.full((8, 2), 0.5, jnp.bfloat16)
    b = jnp.full((2, 4), 0.25, jnp.bfloat16)
    y, vjp = jax.vjp(lora_branch, x, a, b)
    assert y.dtype == jnp.bfloat16
    assert [g.dtype for g in vjp(jnp.ones_like(y))] == [jnp.bfloat16] * 3
    # mixed: bf16 activations with f32 factors promote like the plain expression does
    y2, vjp2 = jax.vjp(lora_branch, x, a.astype(jnp.float32), b.astype(jnp.float32))
    assert y2.dtype == jnp.float32
    assert [g.dtype for g in vjp2(jnp.ones_like(y2))] == [jnp.bfloat16, jnp.float32,
                                                          jnp.float32]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_model_grads_with_custom_vjp_match_plain_autodiff(arch, monkeypatch):
    """jax.jit + nnx.grad through a whole tiny model (LoRA and mask gradients, as train_step
    and the Fisher / Taylor criteria take them) equal autodiff of the plain LoRA branch."""
    m = prune_some(randomize_lora(build_model(tiny_arch(arch))))
    ids, am = inputs()
    graphdef, state = nnx.split(m)
    w = jax.random.normal(jax.random.PRNGKey(3), m(ids, am).shape)
    wrt = nnx.DiffState(0, nnx.Any(nnx.LoRAParam, Mask))

    def grads():
        @jax.jit
        def f(state, ids, am):
            model = nnx.merge(graphdef, state)
            return nnx.state(nnx.grad(lambda mod: jnp.sum(jnp.tanh(mod(ids, am)) * w),
                                      argnums=wrt)(model))
        return nnx.to_flat_state(f(state, ids, am))

    def uses_custom_vjp():
        jaxpr = jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(ids, am))(state)
        return "custom_vjp_call" in str(jaxpr)

    assert uses_custom_vjp()
    got = grads()
    monkeypatch.setattr(lora_module, "lora_branch", _plain_branch)
    assert not uses_custom_vjp()
    ref = grads()
    assert [p for p, _ in got] == [p for p, _ in ref]
    assert any(p[-1] == "lora_a" for p, _ in got) and any(p[-1] == "head_mask" for p, _ in got)
    for (path, g), (_, g_ref) in zip(got, ref):
        np.testing.assert_allclose(g[...], g_ref[...], rtol=1e-5, atol=1e-6, err_msg=str(path))
    # not vacuous: apart from the LoRA of layer 1 (all heads and channels pruned), all non-zero
    zero = {p for p, g in ref if float(jnp.abs(g[...]).max()) == 0}
    assert zero and all(p[:2] == ("layers", 1) and p[-1].startswith("lora") for p in zero), zero


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_classifier_last_layer_on_the_first_row_is_exact(arch, monkeypatch):
    """An encoder classifier's last layer computes the first token's row alone: the same
    logits and the same LoRA / mask gradients as a full last layer, for fewer FLOPs."""
    from fedspine_jax.models.encoder import EncoderLayer

    m = prune_some(randomize_lora(build_model(tiny_arch(arch))))
    ids, am = inputs()
    graphdef, state = nnx.split(m)
    wrt = nnx.DiffState(0, nnx.Any(nnx.LoRAParam, Mask))

    def logits_grads_flops():
        def f(st):
            model = nnx.merge(graphdef, st)
            return model(ids, am), nnx.state(nnx.grad(
                lambda mod: jnp.sum(jnp.tanh(mod(ids, am)) * jnp.arange(3.0)),
                argnums=wrt)(model))

        compiled = jax.jit(f).lower(state).compile()
        cost = compiled.cost_analysis()
        out, g = compiled(state)
        return out, nnx.to_flat_state(g), (cost[0] if isinstance(cost, list) else cost)["flops"]

    got_logits, got, got_flops = logits_grads_flops()
    full_layer = EncoderLayer.__call__
    monkeypatch.setattr(EncoderLayer, "__call__",
                        lambda self, x, bias, first_only=False, packing=None,
                        dropout_key=None: full_layer(self, x, bias, packing=packing,
                                                     dropout_key=dropout_key))
    ref_logits, ref, ref_flops = logits_grads_flops()
    np.testing.assert_allclose(got_logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert [p for p, _ in got] == [p for p, _ in ref]
    for (path, g), (_, g_ref) in zip(got, ref):
        np.testing.assert_allclose(g[...], g_ref[...], rtol=1e-5, atol=1e-6, err_msg=str(path))
    last = [g for p, g in ref if p[:2] == ("layers", 2) and p[-1] == "lora_a"]
    assert last and all(float(jnp.abs(g[...]).max()) > 0 for g in last)  # not vacuous
    assert got_flops < 0.9 * ref_flops


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("head", [True, False])
def test_packed_tokens_are_exact(arch, head):
    """With ``token_index`` (data.pack_index) the encoder computes on the real tokens only:
    the same logits (or hidden states at real positions) and the same gradients of every
    LoRA factor, mask and head weight as on the padded grid, for fewer FLOPs."""
    from fedspine_jax.data import pack_index

    cfg = tiny_arch(arch, **({} if head else {"num_labels": 0}))
    m = prune_some(randomize_lora(build_model(cfg)))
    rng = np.random.default_rng(3)
    b, l = 4, 12
    lengths = np.array([12, 3, 7, 1])
    am_np = (np.arange(l)[None] < lengths[:, None]).astype(np.int32)
    ids = jnp.asarray(np.where(am_np > 0, rng.integers(2, 120, (b, l)), cfg.pad_token_id),
                      jnp.int32)
    am = jnp.asarray(am_np)
    tt = jnp.zeros_like(ids)
    index = pack_index(am_np)
    assert index.shape == (24,) and np.array_equal(index[:23], np.flatnonzero(am_np))
    graphdef, state = nnx.split(m)
    wrt = nnx.DiffState(0, nnx.Any(nnx.LoRAParam, Mask, HeadParam))
    weights = jax.random.normal(jax.random.PRNGKey(1), (b, l, 1)) * am[..., None]

    def run(token_index):
        def f(st):
            def loss(mod):
                out = mod(ids, am, tt, token_index)
                return jnp.sum(jnp.tanh(out) * (jnp.arange(3.0) if head else weights))
            model = nnx.merge(graphdef, st)
            return model(ids, am, tt, token_index), nnx.state(nnx.grad(loss, argnums=wrt)(model))

        compiled = jax.jit(f).lower(state).compile()
        cost = compiled.cost_analysis()
        out, g = compiled(state)
        return out, nnx.to_flat_state(g), (cost[0] if isinstance(cost, list) else cost)["flops"]

    got_out, got, got_flops = run(jnp.asarray(index))
    ref_out, ref, ref_flops = run(None)
    if head:
        np.testing.assert_allclose(got_out, ref_out, rtol=1e-5, atol=1e-6)
    else:   # hidden states: equal at real positions, zeros at padding
        np.testing.assert_allclose(got_out * am[..., None], ref_out * am[..., None],
                                   rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(got_out * (1 - am[..., None])).max()) == 0.0
    assert [p for p, _ in got] == [p for p, _ in ref]
    for (path, g), (_, g_ref) in zip(got, ref):
        np.testing.assert_allclose(g[...], g_ref[...], rtol=1e-4, atol=1e-6, err_msg=str(path))
    moved = [p for p, g in ref if p[-1] == "lora_a" and float(jnp.abs(g[...]).max()) > 0]
    assert len(moved) >= 6                                         # not vacuous
    assert got_flops < 0.8 * ref_flops                             # 24 of 48 rows


def test_pack_index_buckets():
    from fedspine_jax.data import pack_index

    am = np.zeros((4, 16), np.int32)
    am[:, :3] = 1                                                   # 12 real of 64
    idx = pack_index(am)
    assert idx.dtype == np.int32 and idx.shape == (16,)             # quantum 64 / 8 = 8
    assert np.array_equal(idx[:12], np.flatnonzero(am)) and np.array_equal(idx[12:],
                                                                           64 + np.arange(4))
    am[:] = 1
    assert np.array_equal(pack_index(am), np.arange(64))            # full grid: no spare
    am[:] = 0
    am[:, 0] = 1
    assert pack_index(am).shape == (8,)                             # at least one quantum
    assert np.array_equal(pack_index(am, size=6), np.r_[np.flatnonzero(am), 64, 65])
    with pytest.raises(ValueError, match="below the 4 real tokens"):
        pack_index(am, size=3)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("arch", ["bert", "roberta", "llama"])
def test_head_mask_zeroes_head_contribution(arch):
    m = randomize_lora(build_model(tiny_arch(arch)))
    ids, am = inputs()
    attn = m.layers[0].attn
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 32))
    bias = jnp.zeros((1, 1, 7, 7))
    rope = None
    if arch == "llama":
        from fedspine_jax.models.layers import rope_tables
        rope = rope_tables(jnp.broadcast_to(jnp.arange(7), (2, 7)), 8, 10000.0)
    full, _ = attn(x, bias, rope)
    attn.head_mask.set_value(jnp.array([1.0, 0.0, 1.0, 1.0]))
    masked, _ = attn(x, bias, rope)
    assert float(jnp.abs(masked - full).max()) > 1e-4  # the head mattered
    # masking head 1 equals zeroing its dh rows of o (its input to the output projection)
    attn.head_mask.set_value(jnp.ones(4))
    attn.o.kernel.set_value(attn.o.kernel[...].at[8:16].set(0.0))
    attn.o.lora_a.set_value(attn.o.lora_a[...].at[8:16].set(0.0))
    by_hand, _ = attn(x, bias, rope)
    np.testing.assert_allclose(masked, by_hand, atol=1e-5)
    attn.head_mask.set_value(jnp.zeros(4))
    none, _ = attn(x, bias, rope)
    expect = attn.o.bias[...] if attn.o.bias is not None else 0.0
    np.testing.assert_allclose(none, jnp.broadcast_to(expect, none.shape), atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_all_pruned_layer_still_runs(arch):
    m = build_model(tiny_arch(arch))
    for lay in m.layers:
        lay.attn.head_mask.set_value(jnp.zeros(4))
        lay.mlp.channel_mask.set_value(jnp.zeros(24))
    ids, am = inputs()
    out = m(ids, am)
    assert bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------------------- compaction


def prune_some(m, seed=0):
    rng = np.random.default_rng(seed)
    m.layers[0].attn.head_mask.set_value(jnp.array([1.0, 0.0, 0.0, 1.0]))
    m.layers[1].attn.head_mask.set_value(jnp.zeros(4))
    m.layers[2].attn.head_mask.set_value(jnp.array([0.0, 1.0, 1.0, 1.0]))
    m.layers[1].mlp.channel_mask.set_value(jnp.zeros(24))
    m.layers[2].mlp.channel_mask.set_value(jnp.asarray((rng.random(24) > 0.5), jnp.float32))
    return m


@pytest.mark.parametrize("arch", ["bert", "roberta", "llama"])
@pytest.mark.parametrize("merge", [False, True])
def test_compaction_matches_masked_model(arch, merge):
    m = prune_some(randomize_lora(build_model(tiny_arch(arch))))
    ids, am = inputs()
    ref = m(ids, am)
    c, idx = compact(m, merge_lora=merge)
    assert [lay.attn.num_heads for lay in c.layers] == [2, 0, 3]
    assert c.layers[1].mlp.channel_mask.shape == (0,)
    if merge:
        assert not nnx.state(c, nnx.LoRAParam)  # adapters folded in
    assert masked_diff(c(ids, am), ref, am) < 1e-5
    n_full = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    n_small = sum(x.size for x in jax.tree.leaves(nnx.state(c, nnx.Param)))
    assert n_small < n_full


def test_gqa_compaction_drops_unused_kv_heads():
    m = build_model(tiny_arch("llama"))
    # heads 0,1 share kv 0; heads 2,3 share kv 1: prune both heads of kv 0 in layer 0
    m.layers[0].attn.head_mask.set_value(jnp.array([0.0, 0.0, 1.0, 0.0]))
    ids, am = inputs()
    c, idx = compact(m)
    assert c.layers[0].attn.num_kv_heads == 1 and c.layers[0].attn.kv_index == (0,)
    assert list(idx.kv_heads[0]) == [1]
    assert masked_diff(c(ids, am), m(ids, am), am) < 1e-5


def test_padded_compaction_and_expand_lora():
    m = prune_some(randomize_lora(build_model(tiny_arch("bert"))))
    ids, am = inputs()
    ref = m(ids, am)
    c, idx = compact(m, sizes=(3, 16))
    assert all(lay.attn.num_heads == 3 for lay in c.layers)
    assert masked_diff(c(ids, am), ref, am) < 1e-5
    # train-like change on the compacted LoRA, scattered back, equals computing compacted
    randomize_lora(c, seed=5)
    after_small = c(ids, am)
    expand_lora(m, c, idx)
    np.testing.assert_allclose(m(ids, am), after_small, atol=1e-5)


# ----------------------------------------------------------------------------- decoder


def test_generate_matches_full_recompute():
    m = randomize_lora(build_model(tiny_arch("llama")))
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 120, (2, 5)), jnp.int32)
    am = jnp.ones_like(ids)
    toks = generate(m, ids, am, max_new_tokens=4)
    seq = ids
    for _ in range(4):
        nxt = jnp.argmax(m(seq, jnp.ones_like(seq))[:, -1], axis=-1)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(seq[:, 5:]))


# ----------------------------------------------------------------------------- loading


def test_loading_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_pretrained(str(tmp_path))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="GGUF"):
        load_pretrained(str(bad))


# ----------------------------------------------------------------------------- parity

torch = pytest.importorskip("torch")


def sst2_sentences(shared_data, n=8):
    lines = (shared_data / "sst2" / "validation.jsonl").read_text().splitlines()[:n]
    return [json.loads(x)["sentence"] for x in lines]


def test_minilm_parity_hidden_and_logits(shared_data):
    from transformers import AutoModel, BertForSequenceClassification

    from fedspine_jax.models.loading import resolve

    model, tok = load_pretrained("minilm-l6", num_labels=2)
    enc = tok(sst2_sentences(shared_data), padding=True, return_tensors="np")
    path = str(resolve("minilm-l6"))
    ref = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    # give the reference our (random) classifier so logits are comparable
    with torch.no_grad():
        ref.classifier.weight.copy_(torch.tensor(np.asarray(model.classifier.kernel[...]).T))
        ref.classifier.bias.copy_(torch.tensor(np.asarray(model.classifier.bias[...])))
        r_logits = ref(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
        r_hidden = AutoModel.from_pretrained(path).eval()(
            **{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    args = [jnp.asarray(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    logits = np.asarray(model(*args))
    enc_model, _ = load_pretrained("minilm-l6", with_tokenizer=False)
    hidden = np.asarray(enc_model(*args))
    am = enc["attention_mask"][..., None]
    assert np.abs((hidden - r_hidden) * am).max() <= 1e-4
    assert np.abs(logits - r_logits).max() <= 1e-4


def test_tiny_roberta_parity():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fedspine_jax.models.loading import _strip, arch_from_hf, fill_encoder

    hf_cfg = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=48,
                           max_position_embeddings=40, type_vocab_size=1, num_labels=3,
                           pad_token_id=1)
    torch.manual_seed(0)
    ref = RobertaForSequenceClassification(hf_cfg).eval()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    arch = arch_from_hf(hf_cfg.to_dict(), num_labels=3, lora_rank=4)
    m = build_model(arch)
    w = _strip(sd, "roberta")
    w.pop("embeddings.position_ids", None)
    fill_encoder(m, w)
    m.cls_dense.kernel.set_value(jnp.asarray(sd["classifier.dense.weight"].T))
    m.cls_dense.bias.set_value(jnp.asarray(sd["classifier.dense.bias"]))
    m.classifier.kernel.set_value(jnp.asarray(sd["classifier.out_proj.weight"].T))
    m.classifier.bias.set_value(jnp.asarray(sd["classifier.out_proj.bias"]))
    ids = np.random.default_rng(0).integers(3, 120, (3, 9))
    ids[2, 6:] = 1  # padding: RoBERTa positions skip it
    am = (ids != 1).astype(np.int64)
    with torch.no_grad():
        r = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am)).logits.numpy()
    ours = np.asarray(m(jnp.asarray(ids), jnp.asarray(am)))
    assert np.abs(ours - r).max() <= 1e-4


@pytest.mark.slow
def test_smollm2_parity_next_token_logits():
    from transformers import AutoModelForCausalLM

    from fedspine_jax.models.loading import resolve

    model, tok = load_pretrained("smollm2-135m")
    ids = tok(["Federated learning keeps data on the device"], return_tensors="np")["input_ids"]
    p = resolve("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        r = ref(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))))
    # SmolLM2's residual stream reaches ~2e4 in its middle layers, where one fp32 ulp is
    # ~2e-3; the logits (|x| ~ 30) then differ from PyTorch's by fp32 round-off alone
    # (relative ~1e-6, checked layer by layer). 1e-4 relative to the logit scale:
    assert np.abs(ours - r).max() <= 1e-4 * max(1.0, np.abs(r).max())
    assert (ours.argmax(-1) == r.argmax(-1)).all()
