"""Reading and writing a model's LoRA factors, task head and masks as flat dicts.

The federated payload is exactly the LoRA state (plus the small task head); it travels as a
flat ``{path: array}`` dict whose keys are ``/``-joined module paths, e.g.
``layers/0/attn/q/lora_a``. Masks are read and written as stacked arrays
``head_masks (L, H)`` and ``channel_masks (L, F)`` of a full model.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedspine_jax.models.lora import HeadParam


def _key(path) -> str:
    return "/".join(str(p) for p in path)


def get_vars(model, kind) -> dict[str, np.ndarray]:
    """``{path: array}`` of every variable of type ``kind`` (e.g. ``nnx.LoRAParam``)."""
    return {_key(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def set_vars(model, kind, values: dict) -> None:
    """Overwrite variables of type ``kind`` from ``{path: array}`` (shapes may change, e.g. a
    new LoRA rank). Every variable of that type must be given; extra keys are errors."""
    flat = {_key(p): v for p, v in nnx.to_flat_state(nnx.state(model, kind))}
    missing, extra = sorted(set(flat) - set(values)), sorted(set(values) - set(flat))
    if missing or extra:
        raise KeyError(f"state keys differ from the model's: missing {missing[:3]}, "
                       f"unexpected {extra[:3]}")
    for k, var in flat.items():
        var.set_value(jnp.asarray(values[k], jnp.float32))


def get_lora(model) -> dict[str, np.ndarray]:
    return get_vars(model, nnx.LoRAParam)


def set_lora(model, values: dict) -> None:
    set_vars(model, nnx.LoRAParam, values)


def get_head(model) -> dict[str, np.ndarray]:
    return get_vars(model, HeadParam)


def set_head(model, values: dict) -> None:
    set_vars(model, HeadParam, values)


def get_masks(model) -> tuple[np.ndarray, np.ndarray]:
    """``(head_masks (L, H), channel_masks (L, F))`` of a full model."""
    return (np.stack([np.asarray(lay.attn.head_mask[...]) for lay in model.layers]),
            np.stack([np.asarray(lay.mlp.channel_mask[...]) for lay in model.layers]))


def set_masks(model, head_masks, channel_masks) -> None:
    for lay, hm, cm in zip(model.layers, head_masks, channel_masks):
        lay.attn.head_mask.set_value(jnp.asarray(hm, jnp.float32))
        lay.mlp.channel_mask.set_value(jnp.asarray(cm, jnp.float32))


def lora_rank(lora: dict) -> int:
    """The rank of a LoRA state dict (all pairs share one rank)."""
    ranks = {v.shape[1] for k, v in lora.items() if k.endswith("lora_a")}
    if len(ranks) != 1:
        raise ValueError(f"LoRA pairs have different ranks {sorted(ranks)}")
    return ranks.pop()
