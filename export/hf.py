"""Back to the Hugging Face ecosystem: a PEFT adapter, and a pruned model as a checkpoint.

* :func:`export_peft` writes the LoRA factors (and an encoder's classification head, as
  PEFT's ``modules_to_save``) as a PEFT adapter directory, ``adapter_config.json`` +
  ``adapter_model.safetensors``, that ``peft.PeftModel.from_pretrained`` loads onto the
  original Hugging Face model. PEFT's ``lora_A.weight`` is ``(r, in)`` and ``lora_B.weight``
  ``(out, r)``, our ``a (in, r)`` and ``b (r, out)`` transposed; both scale by alpha / r.
  ``target_modules`` is written as a regular expression naming exactly the adapted
  linears (a suffix such as ``output.dense`` would also match BERT's attention output).
* :func:`export_hf` writes a (pruned) model with the LoRA merged in the
  ``save_pretrained`` layout, ``config.json`` + ``model.safetensors`` with the Hugging Face
  weight names, which :func:`fedspine_jax.models.load_pretrained` reads back. Per-layer
  head and channel counts go under ``config.json``'s ``fedspine_compact`` key. Where every
  layer keeps the same sizes and transformers' config can say so (a LLaMA model whose
  layers keep the same query heads, kv heads in contiguous groups and channels; an encoder
  whose heads are all kept and channels pruned equally) the ordinary keys carry the pruned
  sizes instead and transformers' ``from_pretrained`` loads the directory too. A
  classifier's ``id2label`` / ``label2id`` are its task's class names. Other
  pruned models are ours alone: transformers 5 has no per-layer head or channel counts
  (its ``pruned_heads`` config key is gone).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from fedspine_jax.errors import UserError
from fedspine_jax.export.metadata import class_names
from fedspine_jax.models.compaction import compact
from fedspine_jax.models.hf_names import LAYER_LINEARS, LAYER_PREFIX
from fedspine_jax.models.loading import COMPACT_KEY

# Our module -> the Hugging Face model class's base-model attribute (weight-name prefix).
BASE_PREFIX = {"bert": "bert.", "roberta": "roberta.", "llama": "model."}
ARCHITECTURES = {("bert", True): "BertForSequenceClassification", ("bert", False): "BertModel",
                 ("roberta", True): "RobertaForSequenceClassification",
                 ("roberta", False): "RobertaModel", ("llama", False): "LlamaForCausalLM"}


class HFExportError(UserError, ValueError):
    """A model that cannot be written in the asked format; the message says why."""


def _np(x, transpose: bool = False) -> np.ndarray:
    """A float32 C-contiguous copy (safetensors writes the raw buffer, whatever the
    strides), transposed first when asked: our ``(in, out)`` -> torch's ``(out, in)``."""
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(x.T if transpose else x)


def _prefix(arch) -> str:
    """Weight-name prefix of the base model inside the Hugging Face class we write/load."""
    return BASE_PREFIX[arch.arch] if (arch.num_labels > 0 or arch.is_decoder) else ""


def _head_weights(model) -> dict[str, np.ndarray]:
    """An encoder's classification head under its Hugging Face names (empty without one)."""
    out = {}
    heads = (("classifier", "classifier.out_proj" if model.cfg.arch == "roberta"
              else "classifier"), ("cls_dense", "classifier.dense"))
    for ours, theirs in heads:
        lin = getattr(model, ours, None)
        if lin is not None:
            out[theirs + ".weight"] = _np(lin.kernel[...], transpose=True)
            out[theirs + ".bias"] = _np(lin.bias[...])
    return out


def _adapted(model) -> list[str]:
    """Our names of the linears that carry LoRA, in layer order."""
    cfg = model.cfg
    return [n for n in LAYER_LINEARS[cfg.arch] if n in cfg.lora_targets]


def _linear(layer, name: str):
    return getattr(layer.attn if name in ("q", "k", "v", "o") else layer.mlp, name)


def export_peft(model, out_dir: str | Path, base_model: str = "") -> Path:
    """Write ``model``'s LoRA (and classification head) as a PEFT LoRA adapter directory.

    Args:
      model: a full (not compacted) Encoder or Decoder built from a Hugging Face model;
        its ``lora_a (in, r)`` / ``lora_b (r, out)`` factors are written as PEFT's
        ``lora_A.weight (r, in)`` / ``lora_B.weight (out, r)``.
      out_dir: the directory to write (created).
      base_model: ``base_model_name_or_path`` for the adapter config (a hub id or path).
    Returns:
      the directory.
    """
    from safetensors.numpy import save_file

    cfg = model.cfg
    if cfg.is_compact:
        raise HFExportError("a PEFT adapter is written from the full model (the global "
                            "LoRA); this model is pruned, export it with --hf instead")
    names = _adapted(model)
    if cfg.lora_rank == 0 or not names:
        raise HFExportError("the model has no LoRA to export (lora.rank 0 or no targets)")
    pre = "base_model.model." + _prefix(cfg)
    w = {}
    for i, lay in enumerate(model.layers):
        for n in names:
            lin = _linear(lay, n)
            key = pre + LAYER_PREFIX[cfg.arch].format(i=i) + LAYER_LINEARS[cfg.arch][n]
            w[key + ".lora_A.weight"] = _np(lin.lora_a[...], transpose=True)
            w[key + ".lora_B.weight"] = _np(lin.lora_b[...], transpose=True)
    head = _head_weights(model) if not cfg.is_decoder else {}
    w.update({"base_model.model." + k: v for k, v in head.items()})
    layer_re = re.escape(LAYER_PREFIX[cfg.arch].format(i="@")).replace("@", r"\d+")
    targets = "|".join(re.escape(LAYER_LINEARS[cfg.arch][n]) for n in names)
    task = "CAUSAL_LM" if cfg.is_decoder else ("SEQ_CLS" if head else "FEATURE_EXTRACTION")
    config = {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model,
        "r": int(cfg.lora_rank), "lora_alpha": float(cfg.lora_alpha),
        "lora_dropout": float(cfg.lora_dropout), "target_modules": f"(.*\\.)?{layer_re}({targets})",
        "modules_to_save": ["classifier"] if head else None, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(w, str(out / "adapter_model.safetensors"))
    return out


def _hf_config(cfg, full_heads: int, full_kv: int, channels: int, compact_key,
               labels=()) -> dict:
    base = {"model_type": cfg.arch, "architectures": [ARCHITECTURES[(cfg.arch,
                                                                      cfg.num_labels > 0)]],
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": full_heads,
            "intermediate_size": channels, "max_position_embeddings": cfg.max_positions,
            "pad_token_id": cfg.pad_token_id, "torch_dtype": "float32"}
    if cfg.is_decoder:
        base.update(num_key_value_heads=full_kv, head_dim=cfg.head_dim, hidden_act="silu",
                    rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                    tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
                    mlp_bias=False)
    else:
        base.update(type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
                    hidden_act="gelu", position_embedding_type="absolute")
    if cfg.num_labels > 0:
        names = class_names(cfg.num_labels, labels)
        base.update(num_labels=cfg.num_labels,
                    id2label={str(i): n for i, n in enumerate(names)},
                    label2id={n: i for i, n in enumerate(names)})
    if compact_key is not None:
        base[COMPACT_KEY] = compact_key
    return base


def _uniform_sizes(cfg) -> tuple[int, int, int] | None:
    """(heads, kv heads, channels) when every compacted layer has them and transformers'
    config can express the layer (see the module docstring); None otherwise."""
    sizes = {(cfg.heads(i), cfg.kv_heads(i), cfg.channels(i)) for i in range(cfg.num_layers)}
    if len(sizes) != 1:
        return None
    h, kv, f = sizes.pop()
    if h == 0 or kv == 0 or f == 0 or h % kv:
        return None
    if any(cfg.kv_index(i) != tuple(q // (h // kv) for q in range(h))
           for i in range(cfg.num_layers)):
        return None
    if not cfg.is_decoder and h != cfg.num_heads:   # encoders: head_dim = hidden / heads
        return None
    return h, kv, f


def export_hf(model, out_dir: str | Path, tokenizer=None, labels=()) -> Path:
    """Write ``model`` pruned (masked groups removed) with its LoRA merged, as a
    ``save_pretrained``-style directory (``config.json`` + ``model.safetensors``).

    Args:
      model: a full Encoder or Decoder holding a device's masks, LoRA and head.
      out_dir: the directory to write (created).
      tokenizer: optional Hugging Face tokenizer, saved beside the weights.
      labels: a classifier's class names by id (``config.json``'s ``id2label``); default
        ``LABEL_i``.
    Returns:
      the directory; ``load_pretrained(dir, num_labels)`` gives the same outputs.
    """
    from safetensors.numpy import save_file

    small, _ = compact(model, merge_lora=True)
    cfg = small.cfg
    pre = _prefix(cfg)
    w = {}
    if cfg.is_decoder:
        w[pre + "embed_tokens.weight"] = _np(small.embed.embedding[...])
        w[pre + "norm.weight"] = _np(small.norm.scale[...])
        if small.lm_head is not None:
            w["lm_head.weight"] = _np(small.lm_head[...], transpose=True)
    else:
        e = pre + "embeddings."
        w[e + "word_embeddings.weight"] = _np(small.word.embedding[...])
        w[e + "position_embeddings.weight"] = _np(small.position.embedding[...])
        w[e + "token_type_embeddings.weight"] = _np(small.token_type.embedding[...])
        w[e + "LayerNorm.weight"] = _np(small.ln_emb.scale[...])
        w[e + "LayerNorm.bias"] = _np(small.ln_emb.bias[...])
        if small.pooler is not None:
            w[pre + "pooler.dense.weight"] = _np(small.pooler.kernel[...], transpose=True)
            w[pre + "pooler.dense.bias"] = _np(small.pooler.bias[...])
        w.update(_head_weights(small))
    for i, lay in enumerate(small.layers):
        p = pre + LAYER_PREFIX[cfg.arch].format(i=i)
        for n, path in LAYER_LINEARS[cfg.arch].items():
            lin = _linear(lay, n)
            w[p + path + ".weight"] = _np(lin.kernel[...], transpose=True)
            if lin.bias is not None:
                w[p + path + ".bias"] = _np(lin.bias[...])
        if cfg.is_decoder:
            w[p + "input_layernorm.weight"] = _np(lay.norm1.scale[...])
            w[p + "post_attention_layernorm.weight"] = _np(lay.norm2.scale[...])
        else:
            for ln, name in ((lay.ln1, "attention.output.LayerNorm"),
                             (lay.ln2, "output.LayerNorm")):
                w[p + name + ".weight"] = _np(ln.scale[...])
                w[p + name + ".bias"] = _np(ln.bias[...])
    uniform = _uniform_sizes(cfg)
    if uniform is not None:
        config = _hf_config(cfg, *uniform, None, labels)
    else:
        config = _hf_config(cfg, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
                            {"kv_index": [list(cfg.kv_index(i)) for i in range(cfg.num_layers)],
                             "channels": [cfg.channels(i) for i in range(cfg.num_layers)]},
                            labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
