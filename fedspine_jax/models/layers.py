"""Transformer building blocks shared by the encoder and the decoder.

Structured masks (section 4.2, ``z = (W0 x + B A x) * M``) are applied where a group's
contribution leaves it: a head's context vector is multiplied by its head-mask entry
before the output projection ``o`` (zeroing its rows of ``o``' input, i.e. the head), and
an FFN channel's activation by its channel-mask entry before ``fc2`` / ``down``. A layer
whose heads (or channels) are all masked contributes only the output bias.

Grouped-query attention (LLaMA): masks and pruning work at query-head granularity. Each
query head reads kv head ``kv_index[h]``; a kv head is physically removed (compaction)
only once every query head of its group is pruned.

Packed tokens (:class:`Packing`): an encoder may run its linears, LayerNorms and FFN on the
batch's real tokens alone, ``(T, D)`` rows, instead of the padded ``(B, L, D)`` grid;
attention unpacks its keys, values and queries onto the grid (zeros at padding, which the
attention bias masks out) and packs its context back. Exact: a real token's output never
depends on a padding position (see ``models.encoder``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.lora import LoRALinear, Mask

NEG_INF = -1e30


class Packing(NamedTuple):
    """Where a batch's real tokens sit when the rows are packed (``(T, D)`` for ``(B, L, D)``).

    Attributes:
      index: (T,) int32, the flat grid position ``b * L + t`` of packed row j, sorted; rows
        past the real tokens (spare rows that round T up to a bucket) hold distinct
        positions >= B * L and read zeros.
      inverse: (B * L,) int32, the packed row of each grid position, T at padding.
      first: (B,) int32, the packed row of each sequence's first token.
      batch, length: B and L of the grid.
    """
    index: jax.Array
    inverse: jax.Array
    first: jax.Array
    batch: int
    length: int

    @classmethod
    def from_index(cls, index_t: jax.Array, batch: int, length: int) -> Packing:
        """The packing of ``index_t`` (T,) (see ``data.pack_index``) on a (batch, length) grid."""
        t = index_t.shape[0]
        inverse = jnp.full((batch * length,), t, jnp.int32).at[index_t].set(
            jnp.arange(t, dtype=jnp.int32), mode="drop")
        return cls(index_t, inverse, inverse[::length], batch, length)

    def pack(self, x_bl: jax.Array) -> jax.Array:
        """(B, L, ...) -> (T, ...): the real tokens' rows, zeros in spare rows."""
        flat = x_bl.reshape((self.batch * self.length,) + x_bl.shape[2:])
        return flat.at[self.index].get(mode="fill", fill_value=0, indices_are_sorted=True,
                                       unique_indices=True)

    def unpack(self, x_t: jax.Array) -> jax.Array:
        """(T, ...) -> (B, L, ...): rows back on the grid, zeros at padding."""
        out = jnp.take(x_t, self.inverse, axis=0, mode="fill", fill_value=0)
        return out.reshape((self.batch, self.length) + x_t.shape[1:])


def _linear(cfg: ArchConfig, name: str, d_in: int, d_out: int, use_bias: bool,
            rngs: nnx.Rngs) -> LoRALinear:
    return LoRALinear(d_in, d_out, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                      lora=name in cfg.lora_targets, use_bias=use_bias,
                      init_std=cfg.init_std, lora_init_std=cfg.lora_init_std,
                      dropout=cfg.lora_dropout, rngs=rngs)


class RMSNorm(nnx.Module):
    """LLaMA RMSNorm: ``x / sqrt(mean(x^2) + eps) * scale`` over the last axis."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,)))
        self.eps = eps

    def __call__(self, x):
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * self.scale[...]


def split_key(key: jax.Array | None, n: int) -> tuple:
    """``n`` independent keys from ``key`` (LoRA dropout), or ``n`` Nones without one."""
    return (None,) * n if key is None else tuple(jax.random.split(key, n))


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

    def __call__(self, x_bld, bias_bqk, rope=None, cache=None, cache_pos=None, queries=None,
                 packing=None, dropout_key=None):
        """Self-attention.

        Args:
          x_bld: (B, L, D) inputs, or (T, D) packed rows with ``packing``.
          bias_bqk: additive attention bias broadcastable to (B, 1, Q, K) (0 or -inf).
          rope: optional (cos, sin) tables (B, L, dh) for the queries/new keys.
          cache: optional (k_cache, v_cache), each (B, Lmax, Hkv, dh); the new keys/values
            are written at ``cache_pos`` and attention runs over all Lmax slots (K = Lmax).
          queries: optional (B, Q, D) rows that ask (default ``x_bld``, Q = L); keys and
            values always come from every row of ``x_bld``. Not with ``rope`` or ``cache``.
          packing: optional :class:`Packing` of ``x_bld``'s rows; the output is packed too
            (unless ``queries`` is given). Not with ``rope`` or ``cache``.
          dropout_key: optional key of the LoRA dropout (training steps only).
        Returns:
          (B, Q, D) output (T, D packed) and the updated cache (or None).
        """
        if (queries is not None or packing is not None) and (rope is not None
                                                              or cache is not None):
            raise ValueError("queries= and packing= are for plain (encoder) attention: no "
                             "rope, no cache")
        x_q = x_bld if queries is None else queries
        if self.num_heads == 0:  # every head pruned: only the output bias remains
            out = jnp.zeros_like(x_q)
            return (out + self.o.bias[...] if self.o.bias is not None else out), cache
        dh = self.head_dim
        kq, kk, kv, ko = split_key(dropout_key, 4)
        q, k, v = self.q(x_q, kq), self.k(x_bld, kk), self.v(x_bld, kv)
        if packing is not None:                 # onto the (B, L) grid, zeros at padding
            k, v = packing.unpack(k), packing.unpack(v)
            q = packing.unpack(q) if queries is None else q
        b, l, lq = k.shape[0], k.shape[1], q.shape[1]
        q = q.reshape(b, lq, self.num_heads, dh)
        k = k.reshape(b, l, self.num_kv_heads, dh)
        v = v.reshape(b, l, self.num_kv_heads, dh)
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
        if packing is not None and queries is None:
            ctx = packing.pack(ctx)                             # (T, H*dh)
        return self.o(ctx, ko), cache


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

    def __call__(self, x_bld, dropout_key=None):
        """x: (..., D) -> (..., D); ``dropout_key``: LoRA dropout (training steps only)."""
        m = self.channel_mask[...]
        if self.gated:
            kg, ku, kd = split_key(dropout_key, 3)
            return self.down(jax.nn.silu(self.gate(x_bld, kg)) * self.up(x_bld, ku) * m, kd)
        k1, k2 = split_key(dropout_key, 2)
        return self.fc2(jax.nn.gelu(self.fc1(x_bld, k1), approximate=False) * m, k2)
