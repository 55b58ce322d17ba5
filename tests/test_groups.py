"""Tests of the group-ownership declaration: kept rows / columns, slices, parameter counts."""

from __future__ import annotations

import numpy as np
import pytest

from fedspine_jax.models import ArchConfig, build_model
from fedspine_jax.models import groups as G
from fedspine_jax.models.lora import LoRALinear


def tiny_arch(arch: str) -> ArchConfig:
    """Encoders: 4 heads of width 8, no GQA; LLaMA: 6 query heads on 2 kv heads (g = 3)."""
    llama = arch == "llama"
    return ArchConfig(arch=arch, vocab_size=50, hidden_size=24, num_layers=2,
                      num_heads=6 if llama else 4, num_kv_heads=2 if llama else 4, head_dim=4,
                      intermediate_size=10, max_positions=16, num_labels=0 if llama else 2,
                      lora_rank=2)


def random_masks(arch: ArchConfig, seed: int = 0):
    """(L, H), (L, F) float32 0/1 masks; layer 0 drops a whole kv group under GQA."""
    rng = np.random.default_rng(seed)
    hm = (rng.random((arch.num_layers, arch.num_heads)) > 0.4).astype(np.float32)
    cm = (rng.random((arch.num_layers, arch.intermediate_size)) > 0.4).astype(np.float32)
    hm[0, : arch.group_size] = 0
    hm[0, -1] = 1
    return hm, cm


def federation_kept(name, d_in, d_out, q_cols, hm, cm):
    """The federation's mask-aware rule as it stood before the groups module (reference):
    shapes from the LoRA pair, query heads grouped contiguously."""
    if name in ("q", "o"):
        dh = (d_out if name == "q" else d_in) // len(hm)
        m = np.repeat(hm, dh)
        return (m, None) if name == "q" else (None, m)
    if name in ("k", "v"):
        dh = q_cols // len(hm)
        kv = hm.reshape(d_out // dh, -1).max(axis=1)
        return np.repeat(kv, dh), None
    if name in ("fc1", "gate", "up"):
        return cm, None
    return None, cm


def _linears(layer) -> dict:
    return {name: lin for sub in (layer.attn, layer.mlp) for name, lin in vars(sub).items()
            if isinstance(lin, LoRALinear)}


@pytest.mark.parametrize("arch_name", ["bert", "llama"])
def test_every_linear_of_a_layer_is_owned_once(arch_name):
    arch = tiny_arch(arch_name)
    layer = build_model(arch, 0).layers[0]
    table = G.owned(arch.is_decoder)
    names = [n for linears in table.values() for n, _ in linears]
    assert sorted(names) == sorted(_linears(layer)) and len(set(names)) == len(names)
    for kind, linears in table.items():
        for name, axis in linears:
            assert G.owner(name) == (kind, axis)
            assert G.linear(layer, name) is _linears(layer)[name]


@pytest.mark.parametrize("arch_name", ["bert", "roberta", "llama"])
def test_kept_mask_matches_the_federation_rule(arch_name):
    arch = tiny_arch(arch_name)
    model = build_model(arch, 0)
    hm, cm = random_masks(arch)
    for i, layer in enumerate(model.layers):
        lins = _linears(layer)
        for name, lin in lins.items():
            d_in, d_out = lin.kernel.shape
            got = G.kept_mask(arch, i, name, hm[i], cm[i])
            want = federation_kept(name, d_in, d_out, lins["q"].kernel.shape[1], hm[i], cm[i])
            for g, w, size in zip(got, want, (d_out, d_in)):
                assert (g is None) == (w is None), name
                if w is not None:
                    assert g.dtype == w.dtype and g.shape == (size,)
                    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("arch_name", ["bert", "llama"])
def test_owned_slices_are_the_kept_masks_support(arch_name):
    """Compaction's gathers take exactly the rows / columns the federation counts as kept."""
    arch = tiny_arch(arch_name)
    hm, cm = random_masks(arch, seed=1)
    for i in range(arch.num_layers):
        heads = np.flatnonzero(hm[i])
        kept = {G.HEAD: heads, G.KV_HEAD: G.kv_heads_of(arch, i, heads),
                G.CHANNEL: np.flatnonzero(cm[i])}
        for name, (axis, idx) in G.owned_slices(arch, kept).items():
            mask = G.kept_mask(arch, i, name, hm[i], cm[i])[0 if axis == G.OUT else 1]
            np.testing.assert_array_equal(idx, np.flatnonzero(mask))
    if arch.is_decoder:  # layer 0 lost every query head of kv head 0
        assert G.kv_heads_of(arch, 0, np.flatnonzero(hm[0])).tolist() == [1]
    assert G.slice_index(np.array([2, 0]), 3).tolist() == [6, 7, 8, 0, 1, 2]


@pytest.mark.parametrize("arch_name", ["bert", "llama"])
def test_param_counts_add_up_to_the_layer_linears(arch_name):
    """Head counts (kv heads in 1/g shares) plus channel counts plus the shared output biases
    are every parameter of a layer's linears."""
    arch = tiny_arch(arch_name)
    model = build_model(arch, 0)
    heads, channel = G.param_counts(arch)
    assert heads.shape == (arch.num_layers, arch.num_heads)
    for i, layer in enumerate(model.layers):
        lins = _linears(layer).values()
        total = sum(lin.kernel.size + (lin.bias.size if lin.bias is not None else 0)
                    for lin in lins)
        shared = sum(G.linear(layer, n).bias.size for n in ("o", "fc2", "down")
                     if n in _linears(layer) and G.linear(layer, n).bias is not None)
        np.testing.assert_allclose(heads[i].sum() + channel * arch.intermediate_size + shared,
                                   total)
    d, dh = arch.hidden_size, arch.head_dim
    if arch.is_decoder:   # g = 3 query heads per kv head
        np.testing.assert_allclose(heads, 2 * d * dh + 2 * d * dh / 3)
        assert channel == 3 * d
    else:
        np.testing.assert_allclose(heads, 2 * d * dh + dh + 2 * (d + 1) * dh)
        assert channel == 2 * d + 1
