"""Flax NNX models: BERT/RoBERTa encoder, LLaMA decoder, LoRA, structured masks, compaction.

Public API::

    model, tokenizer = load_pretrained("minilm-l6", num_labels=2)
    logits = model(input_ids, attention_mask)
"""

from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.decoder import Decoder, generate
from fedspine_jax.models.encoder import Encoder
from fedspine_jax.models.loading import (
    ModelLoadError,
    build_model,
    load_pretrained,
    load_tokenizer,
)
from fedspine_jax.models.lora import (
    HeadParam,
    LoRALinear,
    Mask,
    best_rank_approx,
    lora_scale,
    resize_lora,
)

__all__ = [
    "ArchConfig", "Decoder", "Encoder", "HeadParam", "LoRALinear", "Mask", "ModelLoadError",
    "best_rank_approx", "build_model", "generate", "load_pretrained", "load_tokenizer",
    "lora_scale", "resize_lora",
]
