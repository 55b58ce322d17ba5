"""LLaMA-family causal decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention), Flax NNX.

Matches Hugging Face ``LlamaForCausalLM``. Positions are ``cumsum(attention_mask) - 1`` so
left-padded prompts get the positions an unpadded prompt would (without padding this is
``arange(L)``, HF's default). Greedy generation runs with a preallocated KV cache:
one prefill call, then one jitted single-token step per new token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.layers import NEG_INF, MLP, Attention, RMSNorm, rope_tables, \
    split_key


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ArchConfig, layer: int, *, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, layer, rngs=rngs)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg, layer, rngs=rngs)

    def __call__(self, x, bias, rope, cache=None, cache_pos=None, dropout_key=None):
        ka, km = split_key(dropout_key, 2)
        h, cache = self.attn(self.norm1(x), bias, rope, cache, cache_pos, dropout_key=ka)
        x = x + h
        return x + self.mlp(self.norm2(x), km), cache


class Decoder(nnx.Module):
    """``model(input_ids, attention_mask) -> logits (B, L, vocab)``."""

    def __init__(self, cfg: ArchConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size)))

    def _logits(self, x):
        x = self.norm(x)
        if self.lm_head is None:
            return x @ self.embed.embedding[...].T
        return x @ self.lm_head[...]

    def __call__(self, input_ids, attention_mask=None, dropout_key=None):
        """input_ids, attention_mask: (B, L) -> next-token logits (B, L, vocab).

        ``dropout_key``: LoRA dropout (``cfg.lora_dropout``), given by training steps only.
        """
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        l = input_ids.shape[1]
        pos = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        rope = rope_tables(pos, self.cfg.head_dim, self.cfg.rope_theta)
        causal = jnp.tril(jnp.ones((l, l), bool))
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
        bias = jnp.where(allowed, 0.0, NEG_INF)
        x = self.embed(input_ids)
        for layer, key in zip(self.layers, split_key(dropout_key, len(self.layers))):
            x, _ = layer(x, bias, rope, dropout_key=key)
        return self._logits(x)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list:
        """Empty KV cache: per layer (k, v), each (B, max_len, Hkv, dh)."""
        return [(jnp.zeros((batch, max_len, lay.attn.num_kv_heads, self.cfg.head_dim), dtype),
                 jnp.zeros((batch, max_len, lay.attn.num_kv_heads, self.cfg.head_dim), dtype))
                for lay in self.layers]

    def decode(self, input_ids, positions, key_valid, cache, cache_pos):
        """Run ``L`` new tokens against the cache.

        Args:
          input_ids: (B, L) new tokens; positions: (B, L) their RoPE positions.
          key_valid: (B, Lmax) which cache slots hold real tokens after this call.
          cache: from :meth:`init_cache`; cache_pos: slot of the first new token.
        Returns:
          logits (B, L, vocab), updated cache.
        """
        l = input_ids.shape[1]
        lmax = key_valid.shape[1]
        rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        # lax.iota rather than jnp.arange: also traces with symbolic L, Lmax (ONNX export)
        q_slot = cache_pos + jax.lax.iota(jnp.int32, l)
        causal = jax.lax.iota(jnp.int32, lmax)[None, :] <= q_slot[:, None]   # (L, Lmax)
        allowed = causal[None, None] & (key_valid[:, None, None, :] > 0)
        bias = jnp.where(allowed, 0.0, NEG_INF)
        x = self.embed(input_ids)
        new_cache = []
        for layer, c in zip(self.layers, cache):
            x, c = layer(x, bias, rope, c, cache_pos)
            new_cache.append(c)
        return self._logits(x), new_cache


@nnx.jit(static_argnames=("max_new_tokens",))
def generate(model: Decoder, input_ids, attention_mask, max_new_tokens: int):
    """Greedy generation with a KV cache.

    Args:
      input_ids, attention_mask: (B, L) left-padded prompts.
      max_new_tokens: number of tokens to generate.
    Returns:
      (B, max_new_tokens) generated token ids.
    """
    b, l = input_ids.shape
    lmax = l + max_new_tokens
    cache = model.init_cache(b, lmax)
    key_valid = jnp.concatenate([attention_mask, jnp.zeros((b, max_new_tokens),
                                                           attention_mask.dtype)], axis=1)
    pos = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    logits, cache = model.decode(input_ids, pos, key_valid, cache, 0)
    tok = jnp.argmax(logits[:, -1], axis=-1)
    next_pos = pos[:, -1] + 1

    def step(carry, i):
        tok, cache, key_valid, next_pos = carry
        key_valid = key_valid.at[:, l + i].set(1)
        logits, cache = model.decode(tok[:, None], next_pos[:, None], key_valid, cache, l + i)
        new = jnp.argmax(logits[:, -1], axis=-1)
        return (new, cache, key_valid, next_pos + 1), tok

    _, toks = jax.lax.scan(step, (tok, cache, key_valid, next_pos), jnp.arange(max_new_tokens))
    return toks.T
