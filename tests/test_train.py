"""The local round: real statistics, monotone pruning to the ratio, faster when pruned,
and it learns on real data."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from fedspine_jax import data as D
from fedspine_jax.config import load_config, replace
from fedspine_jax.models import ArchConfig, build_model, load_pretrained, load_tokenizer
from fedspine_jax.models.state import flatten, get_head, get_lora, unflatten
from fedspine_jax.train import (
    RoundInput,
    bucket_sizes,
    evaluate,
    initial_masks,
    local_round,
    local_rounds,
    step_flops,
)


@pytest.fixture(scope="module")
def tiny_setup(tiny_config_path, shared_data):
    cfg = load_config(tiny_config_path, [f"data.source={shared_data / 'sst2'}"])
    tok = load_tokenizer(cfg.model.tokenizer)
    task = D.load_task(cfg.data, tok, 0)
    parts = D.partition(task, cfg.federation.num_devices, cfg.data, 0)
    m = cfg.model
    arch = ArchConfig(arch="bert", vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                      num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_heads,
                      head_dim=m.hidden_size // m.num_heads, intermediate_size=m.intermediate_size,
                      max_positions=m.max_positions, num_labels=2, lora_rank=4)
    return cfg, task, parts, arch


def test_tiny_local_round_statistics_and_monotone_masks(tiny_setup):
    cfg, task, parts, arch = tiny_setup
    model = build_model(arch, 0)
    hm, cm = initial_masks(arch)
    train = task.train.take(parts[0].train_idx)
    batches = D.Batches(train, cfg.train.batch_size, 0)
    probe = D.collate(train, np.arange(cfg.train.batch_size), cfg.train.batch_size)
    lora, head = get_lora(model), get_head(model)
    flops, alive, ratios = [], [], []
    hi = ci = None   # no importance before the first round: it does not prune
    for ratio in (0.2, 0.2, 0.5, 0.5):
        res = local_round(model, lora, head, hm, cm, ratio, batches, probe, cfg,
                          head_importance=hi, channel_importance=ci)
        # pruning only adds zeros, and reaches the ratio from above within one group
        assert np.all(res.head_masks <= hm) and np.all(res.channel_masks <= cm)
        if hi is None:
            assert res.ratio == 0.0 and res.head_masks.all() and res.channel_masks.all()
        else:
            assert ratio - 1e-6 <= res.ratio <= ratio + 0.05
        # statistics are measurements, not constants
        assert np.isfinite(res.loss_before) and np.isfinite(res.loss_after)
        assert res.loss_before != res.loss_after
        assert res.compute_time_s > 0 and res.lora_importance > 0
        assert res.peak_memory_bytes > 0 and res.flops > 0
        # the importance to carry: measured for every kept group, zero for pruned ones
        assert res.head_importance.shape == hm.shape
        assert res.channel_importance.shape == cm.shape
        assert np.all(res.head_importance[res.head_masks == 0] == 0)
        assert np.all(res.channel_importance[res.channel_masks == 0] == 0)
        assert res.head_importance[res.head_masks == 1].max() > 0
        # the LoRA actually changed
        assert any(not np.allclose(flatten(res.lora)[k], flatten(lora)[k])
                   for k in flatten(lora))
        flops.append(res.flops)
        alive.append(res.params_alive)
        ratios.append(res.ratio)
        lora, head, hm, cm = res.lora, res.head, res.head_masks, res.channel_masks
        hi, ci = res.head_importance, res.channel_importance
    # the round that prunes is charged at the pruned sizes, in that same round
    assert flops[1] < flops[0] and flops[2] < flops[1]
    assert alive[0] > alive[1] > alive[2] == alive[3]  # 0.5 reached in round 3


def test_a_round_prunes_with_the_carried_importance_then_trains(tiny_setup):
    """Stage 3 before stage 4: the masks are decided by the importance carried in (not by
    this round's training), the FLOPs charged are those of the pruned sizes, and what the
    round returns (and the loss after) is the pruned model fine-tuned after its pruning."""
    import jax.numpy as jnp
    from flax import nnx

    from fedspine_jax import pruning
    from fedspine_jax.train import _group_params, eval_loss

    cfg, task, parts, arch = tiny_setup
    model = build_model(arch, 0)
    hm, cm = initial_masks(arch)
    train = task.train.take(parts[1].train_idx)
    bs = cfg.train.batch_size
    batches = D.Batches(train, bs, 3)
    probe = D.collate(train, np.arange(bs), bs)
    first = local_round(model, get_lora(model), get_head(model), hm, cm, 0.4, batches, probe,
                        cfg)
    # what select_masks makes of the carried importance, computed independently
    head_params, channel_params = _group_params(arch)
    want_h, want_c, want_ratio = pruning.select_masks(
        jnp.asarray(first.head_importance), jnp.asarray(first.channel_importance),
        jnp.asarray(hm), jnp.asarray(cm), 0.4, head_params=jnp.asarray(head_params),
        channel_params=channel_params, min_heads=cfg.pruning.min_heads_per_layer,
        min_channels=cfg.pruning.min_channels_per_layer)
    stream = batches.state()
    res = local_round(model, first.lora, first.head, first.head_masks, first.channel_masks,
                      0.4, batches, probe, cfg, head_importance=first.head_importance,
                      channel_importance=first.channel_importance)
    np.testing.assert_array_equal(res.head_masks, np.asarray(want_h))
    np.testing.assert_array_equal(res.channel_masks, np.asarray(want_c))
    assert res.ratio == pytest.approx(float(want_ratio)) and res.ratio >= 0.4 - 1e-6
    # charged compute: the FLOPs of the tau steps at the kept (pruned) sizes
    replay = D.Batches(train, bs, 3, **stream)
    kept_h = res.head_masks.sum(1).astype(int)
    kept_c = res.channel_masks.sum(1).astype(int)
    want_flops = 0.0
    for _ in range(cfg.train.local_steps):
        b = replay.__next__()
        tokens = b["token_index"].shape[0] if "token_index" in b else None
        want_flops += step_flops(arch, kept_h, kept_h, kept_c, arch.lora_rank,
                                 *b["input_ids"].shape, tokens=tokens)
    assert res.flops == pytest.approx(want_flops)
    # the model left behind is the pruned, then fine-tuned one, and F after is its loss
    from fedspine_jax.models.state import get_masks

    got_h, got_c = get_masks(model)
    np.testing.assert_array_equal(np.asarray(got_h), res.head_masks)
    np.testing.assert_array_equal(np.asarray(got_c), res.channel_masks)
    assert float(eval_loss(*nnx.split(model), {k: jnp.asarray(v) for k, v in probe.items()})) \
        == pytest.approx(res.loss_after, rel=1e-6)
    assert any(not np.allclose(flatten(res.lora)[k], flatten(first.lora)[k])
               for k in flatten(first.lora))


def test_step_flops_fall_with_kept_sizes():
    arch = ArchConfig(arch="bert", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=16, intermediate_size=128, num_labels=2)
    full = step_flops(arch, np.array([4, 4]), np.array([4, 4]), np.array([128, 128]), 8, 4, 16)
    half = step_flops(arch, np.array([2, 2]), np.array([2, 2]), np.array([64, 64]), 8, 4, 16)
    assert half < 0.6 * full
    # a classifier's last layer runs the first token's row alone: fewer FLOPs than the same
    # encoder returning hidden states (every row of every layer)
    hidden = step_flops(dataclasses.replace(arch, num_labels=0), np.array([4, 4]),
                        np.array([4, 4]), np.array([128, 128]), 8, 4, 16)
    assert full < 0.8 * hidden
    # packed rows: the linears' FLOPs are affine in the rows, the attention stays on the grid

    def packed(t):
        return step_flops(arch, np.array([4, 4]), np.array([4, 4]), np.array([128, 128]), 8,
                          4, 16, tokens=t)

    assert packed(64) == full
    assert packed(48) - packed(32) == pytest.approx(packed(32) - packed(16))
    assert packed(16) < 0.45 * full


def test_bucket_sizes_are_coarse():
    hm = np.ones((3, 12))
    cm = np.ones((3, 1536))
    hm[0, :5] = 0
    cm[:, :700] = 0
    assert bucket_sizes(hm, cm) == (12, 1152)  # max kept heads 12; 836 channels -> 1152
    hm[:, :5] = 0
    assert bucket_sizes(hm, cm)[0] == 9  # 7 kept -> next multiple of 3


@pytest.mark.slow
def test_minilm_local_round_raises_heldout_accuracy(shared_data, tiny_config_path):
    cfg = load_config(tiny_config_path, [
        f"data.source={shared_data / 'sst2'}", "data.max_train_samples=400",
        "data.max_eval_samples=200", "train.local_steps=40", "train.batch_size=16",
        "train.learning_rate=0.002", "data.max_len=64", "data.length_buckets=[32, 64]"])
    model, tok = load_pretrained("minilm-l6", num_labels=2, lora_rank=8)
    task = D.load_task(cfg.data, tok, 0)
    hm, cm = initial_masks(model.cfg)
    before = evaluate(model, D.eval_batches(task.eval, 50))
    batches = D.Batches(task.train, 16, 0)
    probe = D.collate(task.train, np.arange(16), 16)
    res = local_round(model, get_lora(model), get_head(model), hm, cm, 0.0, batches, probe,
                      replace(cfg, pruning={"target_ratio": 0.0}))
    after = evaluate(model, D.eval_batches(task.eval, 50))
    assert res.loss_after < res.loss_before
    assert after > before + 0.1, (before, after)


def test_head_lr_scale_scales_only_the_head_step():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fedspine_jax.train import TRAINABLE, _optimizer

    model = build_model(ArchConfig(arch="bert", vocab_size=50, hidden_size=8, num_layers=1,
                                   num_heads=2, num_kv_heads=2, head_dim=4,
                                   intermediate_size=16, max_positions=16, num_labels=2,
                                   lora_rank=2))
    _, trainable, _ = nnx.split(model, TRAINABLE, ...)
    grads = jax.tree.map(jnp.ones_like, trainable)
    steps = {}
    for scale in (1.0, 0.1):
        tx = _optimizer(1e-2, 0.0, scale)
        up, _ = tx.update(grads, tx.init(trainable), trainable)
        steps[scale] = {jax.tree_util.keystr(p): float(jnp.abs(v).max())
                        for p, v in jax.tree_util.tree_flatten_with_path(up)[0]}
    head = [k for k in steps[1.0] if "classifier" in k]
    lora = [k for k in steps[1.0] if "lora_" in k]
    assert head and lora
    for k in head:
        np.testing.assert_allclose(steps[0.1][k], 0.1 * steps[1.0][k], rtol=1e-5)
    for k in lora:
        assert steps[0.1][k] == steps[1.0][k] > 0


def test_vmapped_local_rounds_equal_sequential_ones(tiny_setup, monkeypatch):
    """Devices of one rank and size bucket trained together (vmapped) end where the same
    devices trained one by one end; other ranks / buckets form groups of their own."""
    cfg, task, parts, arch = tiny_setup
    cfg = replace(cfg, data={"length_buckets": (cfg.data.max_len,)})  # one batch shape
    model = build_model(arch, 0)
    hm, cm = initial_masks(arch)
    pruned_h = hm.copy()
    pruned_h[:, 0] = 0  # a 3-of-4-heads bucket: its own group
    lora, head = get_lora(model), get_head(model)

    lora2 = unflatten({k: v[:, :2] if k.endswith("lora_a") else v[:2]
                       for k, v in flatten(lora).items()})

    def inputs():
        out = []
        for i, (lo, h) in enumerate([(lora, hm), (lora, hm), (lora, pruned_h), (lora, hm),
                                     (lora2, hm)]):
            tr = task.train.take(parts[i % len(parts)].train_idx)
            probe = D.collate(tr, np.arange(cfg.train.batch_size), cfg.train.batch_size)
            out.append(RoundInput(lo, head, h, cm, 0.3, D.Batches(tr, cfg.train.batch_size,
                                                                   i), probe))
        return out

    import fedspine_jax.train as T

    sizes, run_group = [], T._run_group
    monkeypatch.setattr(T, "_run_group", lambda jobs, *a: (sizes.append(len(jobs)),
                                                           run_group(jobs, *a)))
    seq = local_rounds(model, inputs(), cfg, max_batch=1)
    assert sizes == [1] * 5
    sizes.clear()
    vm = local_rounds(model, inputs(), cfg, max_batch=3)
    # the three full-mask rank-4 devices together; the pruned one and the rank-2 one alone
    assert sorted(sizes) == [1, 1, 3]
    for a, b in zip(seq, vm):
        for x, y in zip(jax.tree.leaves((a.lora, a.head)), jax.tree.leaves((b.lora, b.head))):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(a.head_masks, b.head_masks)
        np.testing.assert_array_equal(a.channel_masks, b.channel_masks)
        np.testing.assert_allclose(a.head_importance, b.head_importance, rtol=1e-3,
                                   atol=1e-8)
        assert a.loss_before == pytest.approx(b.loss_before, rel=1e-5)
        assert a.loss_after == pytest.approx(b.loss_after, rel=1e-4)
        assert a.lora_importance == pytest.approx(b.lora_importance, rel=1e-3)
        assert a.flops == b.flops and a.ratio == b.ratio
    # the devices really differ (different data), so equality is not trivial
    assert not np.allclose(jax.tree.leaves(seq[0].lora)[0], jax.tree.leaves(seq[1].lora)[0])
    with pytest.raises(ValueError, match="max_batch"):
        local_rounds(model, inputs(), cfg, max_batch=0)


def test_rounds_compile_ahead_and_train_exactly_tau_steps(tiny_setup, monkeypatch):
    """A round compiles each new batch shape ahead of time and runs its tau steps and no
    warm-up step; a later round on shapes seen before compiles nothing."""
    import fedspine_jax.train as T

    cfg, task, parts, arch = tiny_setup
    cfg = replace(cfg, train={"batch_size": 2, "local_steps": 6})  # batches of mixed lengths
    model = build_model(arch, 0)
    hm, cm = initial_masks(arch)
    tr = task.train.take(parts[0].train_idx)
    probe = D.collate(tr, np.arange(cfg.train.batch_size), cfg.train.batch_size)
    monkeypatch.setattr(T, "_EXECUTABLES", {})
    runs, real = [], T._executable

    def counting(step, static, args):
        exe = real(step, static, args)
        return lambda *a: (runs.append((a[-1]["input_ids"].shape,
                                        a[-1]["token_index"].shape)), exe(*a))[1]

    monkeypatch.setattr(T, "_executable", counting)
    compiled = []
    for _ in range(2):
        runs.clear()
        local_round(model, get_lora(model), get_head(model), hm, cm, 0.0,
                    D.Batches(tr, cfg.train.batch_size, 0), probe, cfg)
        assert len(runs) == cfg.train.local_steps
        compiled.append(len(T._EXECUTABLES))
    assert len(set(runs)) > 1  # several batch shapes, so the count below is not trivial
    assert compiled == [len(set(runs))] * 2


def _step_flops_all_linears(arch, heads, kv_heads, channels, rank, batch, seq, tokens=None):
    """step_flops as it stood when every linear carried LoRA (the reference the default
    targets must reproduce exactly)."""
    d, dh, grid = arch.hidden_size, arch.head_dim, batch * seq
    tokens = grid if tokens is None else tokens
    first_only = not arch.is_decoder and arch.num_labels > 0

    def per_row(i, o):
        return 4 * i * o + 6 * rank * (i + o)

    total = 0.0
    for layer, (h, kv, f) in enumerate(zip(heads, kv_heads, channels)):
        last = first_only and layer == len(heads) - 1
        rows, queries = (batch, batch) if last else (tokens, grid)
        dims = [(d, h * dh), (h * dh, d)] + [(d, f)] * (2 if arch.is_decoder else 1) + [(f, d)]
        total += rows * sum(per_row(i, o) for i, o in dims) + queries * 3 * 4 * seq * dh * h
        total += tokens * 2 * per_row(d, kv * dh)
    head_rows = grid if arch.is_decoder else batch
    head = 2 * d * (arch.vocab_size if arch.is_decoder else max(arch.num_labels, 1))
    return float(total + head_rows * 3 * head)


def test_step_flops_charge_lora_on_the_targeted_linears_only():
    bert = ArchConfig(arch="bert", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=16, intermediate_size=128, num_labels=2)
    llama = ArchConfig(arch="llama", vocab_size=100, hidden_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96)
    sizes = {"bert": ([4, 3], [4, 3], [128, 40]), "llama": ([4, 2], [2, 1], [96, 30])}
    # the default targets (every linear): exactly the figures of LoRA everywhere
    for arch in (bert, llama):
        h, kv, f = (np.array(x) for x in sizes[arch.arch])
        for tokens in (None, 24):
            assert step_flops(arch, h, kv, f, 8, 4, 16, tokens) == \
                _step_flops_all_linears(arch, h, kv, f, 8, 4, 16, tokens)
    # PEFT's query, value: k, o, fc1, fc2 lose their LoRA terms 6 r (i + o) per row. Per
    # row: o 64 + 64, fc1 64 + 128, fc2 128 + 64 = 512, on 64 rows in layer 0 and the 4
    # first-token rows of the classifier's last layer; k 64 + 64 = 128 on all 64 tokens of
    # both layers: 6 * 8 * (64 * 512 + 4 * 512 + 2 * 64 * 128) = 2,457,600 FLOPs fewer.
    full = np.array([4, 4]), np.array([4, 4]), np.array([128, 128])
    qv = dataclasses.replace(bert, lora_targets=("q", "v"))
    assert step_flops(bert, *full, 8, 4, 16) - step_flops(qv, *full, 8, 4, 16) == 2_457_600
    # no targets: the frozen model's FLOPs alone, as at rank 0
    none = dataclasses.replace(bert, lora_targets=())
    assert step_flops(none, *full, 8, 4, 16) == step_flops(bert, *full, 0, 4, 16)
