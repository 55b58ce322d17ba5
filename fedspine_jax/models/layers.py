"""Transformer building blocks shared by the encoder and the decoder.

Structured masks (section 4.2, ``z = (W0 x + B A x) * M``) are applied where a group's
contribution leaves it: a head's context vector is multiplied by its head-mask entry
before the output projection ``o`` (zeroing its rows of ``o``' input, i.e. the head), and
an FFN channel's activation by its channel-mask entry before ``fc2`` / ``down``. A layer
whose heads (or channels) are all masked contributes only the output bias.

Grouped-query attention (LLaMA): masks and pruning work at query-head granularity. Each
query head reads kv head ``kv_index[h]``; a kv head is physically removed (compaction)
only once every query head of its group is pruned.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.lora import LoRALinear, Mask

NEG_INF = -1e30


def _linear(cfg: ArchConfig, name: str, d_in: int, d_out: int, use_bias: bool,
            rngs: nnx.Rngs) -> LoRALinear:
    return LoRALinear(d_in, d_out, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                      lora=name in cfg.lora_targets, use_bias=use_bias,
                      init_std=cfg.init_std, lora_init_std=cfg.lora_init_std, rngs=rngs)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: ``x / sqrt(mean(x^2) + eps) * scale`` over the last axis."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,)))
        self.eps = eps

    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * self.scale[...]


def rope_tables(positions_bl: jax.Array, head_dim: int, theta: float):
    """cos/sin tables ``(B, L, head_dim)`` for RoPE in the Hugging Face (rotate-half) layout."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions_bl[..., None].astype(jnp.float32) * inv       # (B, L, dh/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_blhd: jax.Array, cos_bld: jax.Array, sin_bld: jax.Array) -> jax.Array:
    half = x_blhd.shape[-1] // 2
    rot = jnp.concatenate([-x_blhd[..., half:], x_blhd[..., :half]], axis=-1)
    return x_blhd * cos_bld[:, :, None, :] + rot * sin_bld[:, :, None, :]


class Attention(nnx.Module):
    """Multi-head (or grouped-query) self-attention with LoRA on q, k, v, o and a head mask.

    Shapes: q ``(D, H*dh)``, k/v ``(D, Hkv*dh)``, o ``(H*dh, D)``; ``head_mask (H,)``.
    """

    def __init__(self, cfg: ArchConfig, layer: int, *, rngs: nnx.Rngs):
        d, dh = cfg.hidden_size, cfg.head_dim
        self.kv_index = cfg.kv_index(layer)
        self.num_heads = len(self.kv_index)
        self.num_kv_heads = cfg.kv_heads(layer)
        self.head_dim = dh
        bias = not cfg.is_decoder
        self.q = _linear(cfg, "q", d, self.num_heads * dh, bias, rngs)
        self.k = _linear(cfg, "k", d, self.num_kv_heads * dh, bias, rngs)
        self.v = _linear(cfg, "v", d, self.num_kv_heads * dh, bias, rngs)
        self.o = _linear(cfg, "o", self.num_heads * dh, d, bias, rngs)
        self.head_mask = Mask(jnp.ones((self.num_heads,)))

    def __call__(self, x_bld, bias_bqk, rope=None, cache=None, cache_pos=None, queries=None):
        """Self-attention.

        Args:
          x_bld: (B, L, D) inputs.
          bias_bqk: additive attention bias broadcastable to (B, 1, Q, K) (0 or -inf).
          rope: optional (cos, sin) tables (B, L, dh) for the queries/new keys.
          cache: optional (k_cache, v_cache), each (B, Lmax, Hkv, dh); the new keys/values
            are written at ``cache_pos`` and attention runs over all Lmax slots (K = Lmax).
          queries: optional (B, Q, D) rows that ask (default ``x_bld``, Q = L); keys and
            values always come from every row of ``x_bld``. Not with ``rope`` or ``cache``.
        Returns:
          (B, Q, D) output and the updated cache (or None).
        """
        if queries is not None and (rope is not None or cache is not None):
            raise ValueError("queries= is for plain (encoder) attention: no rope, no cache")
        x_q = x_bld if queries is None else queries
        b, l, _ = x_bld.shape
        lq = x_q.shape[1]
        if self.num_heads == 0:  # every head pruned: only the output bias remains
            out = jnp.zeros_like(x_q)
            return (out + self.o.bias[...] if self.o.bias is not None else out), cache
        dh = self.head_dim
        q = self.q(x_q).reshape(b, lq, self.num_heads, dh)
        k = self.k(x_bld).reshape(b, l, self.num_kv_heads, dh)
        v = self.v(x_bld).reshape(b, l, self.num_kv_heads, dh)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            kc = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype),
                                              (0, cache_pos, 0, 0))
            vc = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype),
                                              (0, cache_pos, 0, 0))
            cache, k, v = (kc, vc), kc, vc
        if self.kv_index != tuple(range(self.num_heads)):
            idx = jnp.asarray(self.kv_index, jnp.int32)
            k, v = jnp.take(k, idx, axis=2), jnp.take(v, idx, axis=2)
        qh = q.transpose(0, 2, 1, 3)                      # (B, H, Q, dh)
        kh = k.transpose(0, 2, 3, 1)                      # (B, H, dh, K)
        vh = v.transpose(0, 2, 1, 3)                      # (B, H, K, dh)
        scores = jnp.matmul(qh, kh) * (1.0 / math.sqrt(dh)) + bias_bqk
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(vh.dtype)
        ctx = jnp.matmul(probs, vh)                       # (B, H, Q, dh)
        ctx = ctx * self.head_mask[...][None, :, None, None]
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, lq, self.num_heads * dh)
        return self.o(ctx), cache


class MLP(nnx.Module):
    """FFN with LoRA and a channel mask ``(F,)``.

    Encoders: ``fc2(gelu(fc1 x) * M)`` with fc1 ``(D, F)``, fc2 ``(F, D)``.
    LLaMA: ``down(silu(gate x) * up x * M)`` with gate/up ``(D, F)``, down ``(F, D)``.
    """

    def __init__(self, cfg: ArchConfig, layer: int, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.channels(layer)
        self.gated = cfg.is_decoder
        if self.gated:
            self.gate = _linear(cfg, "gate", d, f, False, rngs)
            self.up = _linear(cfg, "up", d, f, False, rngs)
            self.down = _linear(cfg, "down", f, d, False, rngs)
        else:
            self.fc1 = _linear(cfg, "fc1", d, f, True, rngs)
            self.fc2 = _linear(cfg, "fc2", f, d, True, rngs)
        self.channel_mask = Mask(jnp.ones((f,)))

    def __call__(self, x_bld):
        m = self.channel_mask[...]
        if self.gated:
            return self.down(jax.nn.silu(self.gate(x_bld)) * self.up(x_bld) * m)
        return self.fc2(jax.nn.gelu(self.fc1(x_bld), approximate=False) * m)
