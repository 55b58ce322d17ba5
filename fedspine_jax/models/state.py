"""A model's LoRA factors, task head and masks as pytrees mirroring the model.

The federated payload is exactly the LoRA state (plus the small task head). It is a nested
dict of numpy arrays with the model's own structure, ``nnx.to_pure_dict`` of the variables
of that type, e.g. ``lora["layers"][0]["attn"]["q"] == {"lora_a": (in, r), "lora_b": (r,
out)}`` (a *pair*: the two factors of one adapted linear). Code walks it with ``jax.tree``
(:func:`map_pairs` visits the pairs with their paths), never by parsing strings. Only at a
boundary that needs names (wire framing, checkpoint files, error messages) does it become a
flat ``{"layers/0/attn/q/lora_a": array}`` dict (:func:`flatten` / :func:`unflatten`).
Masks are read and written as stacked arrays ``head_masks (L, H)`` and
``channel_masks (L, F)`` of a full model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedspine_jax.models.lora import HeadParam


def _key_name(k) -> str | int:
    return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


def path_names(path) -> tuple:
    """A ``jax.tree_util`` key path as plain names, e.g. ``("layers", 0, "attn", "q")``."""
    return tuple(_key_name(k) for k in path)


def flatten(tree: dict) -> dict[str, np.ndarray]:
    """``{"layers/0/attn/q/lora_a": array}``: the leaves under ``/``-joined paths."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(n) for n in path_names(p)): v for p, v in leaves}


def unflatten(flat: dict) -> dict:
    """Inverse of :func:`flatten` (path parts made of digits become int keys)."""
    out: dict = {}
    for name, v in flat.items():
        parts = [int(p) if p.isdigit() else p for p in name.split("/")]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {name!r} runs through a leaf")
        if parts[-1] in node:
            raise ValueError(f"path {name!r} given twice")
        node[parts[-1]] = v
    return out


def get_vars(model, kind) -> dict:
    """The variables of type ``kind`` (e.g. ``nnx.LoRAParam``) as a nested dict of numpy
    arrays mirroring the model."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, kind)))


def set_vars(model, kind, values: dict) -> None:
    """Overwrite the variables of type ``kind`` from a tree shaped like :func:`get_vars`'
    (leaf shapes may change, e.g. a new LoRA rank). Every variable of that type must be
    given; extra entries are errors."""
    flat = {"/".join(str(_key_name(k)) for k in p): v
            for p, v in nnx.to_flat_state(nnx.state(model, kind))}
    given = flatten(values)
    missing, extra = sorted(set(flat) - set(given)), sorted(set(given) - set(flat))
    if missing or extra:
        raise KeyError(f"state entries differ from the model's: missing {missing[:3]}, "
                       f"unexpected {extra[:3]}")
    for k, var in flat.items():
        var.set_value(jnp.asarray(given[k], jnp.float32))


def get_lora(model) -> dict:
    return get_vars(model, nnx.LoRAParam)


def set_lora(model, values: dict) -> None:
    set_vars(model, nnx.LoRAParam, values)


def get_head(model) -> dict:
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


def is_pair(node) -> bool:
    """Whether a node of a LoRA tree is one linear's pair ``{"lora_a", "lora_b"}``."""
    return isinstance(node, dict) and "lora_a" in node


def map_pairs(fn: Callable, lora: dict, *others: dict) -> dict:
    """``fn(path, pair, *other_pairs) -> pair`` applied to every pair of ``lora`` (and the
    pairs at the same paths of ``others``); ``path`` is :func:`path_names`' tuple, e.g.
    ``("layers", 3, "attn", "q")``. Returns the tree of the results."""
    return jax.tree_util.tree_map_with_path(
        lambda p, *pairs: fn(path_names(p), *pairs), lora, *others, is_leaf=is_pair)


def lora_rank(lora: dict) -> int:
    """The rank of a LoRA tree (all pairs share one rank)."""
    ranks = {pair["lora_a"].shape[1] for pair in jax.tree.leaves(lora, is_leaf=is_pair)}
    if len(ranks) != 1:
        raise ValueError(f"LoRA pairs have different ranks {sorted(ranks)}")
    return ranks.pop()


def tree_bytes(tree: dict) -> int:
    """Bytes of all the arrays of a tree."""
    return sum(int(np.asarray(v).nbytes) for v in jax.tree.leaves(tree))
