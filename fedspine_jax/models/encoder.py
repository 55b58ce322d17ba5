"""BERT / RoBERTa encoder for sequence classification, in Flax NNX.

Matches Hugging Face ``BertModel`` / ``RobertaModel`` (post-LN blocks, exact GELU) and the
heads of ``BertForSequenceClassification`` (pooler dense + tanh on the first token, then a
linear classifier) and ``RobertaForSequenceClassification`` (no pooler: dense + tanh +
out_proj on the first token). RoBERTa positions start at ``pad_token_id + 1`` and skip
padding, as in ``create_position_ids_from_input_ids``.

With a classification head only the first token's final hidden state is read, so the last
layer computes that row alone: its keys and values come from every token, its query,
attention output, output projection and FFN from the first row only (B rows instead of
B x L). The logits are the same as a full last layer's, and so are the gradients of every
weight, LoRA factors included (the other rows' outputs have zero gradient).

Packed tokens (``token_index``, built by ``data.pack_index``): the embeddings, LayerNorms,
every linear and the FFN run on the T real tokens of the batch (T rounded up to a bucket)
instead of the B x L padded grid; attention unpacks onto the grid (``layers.Packing``).
A real token never reads a padding position (the attention bias masks them as keys, and
every other op is row-wise), so logits and gradients equal the padded computation's; only
the hidden states returned without a head differ, at padding positions (zeros). On SST-2
batches padded to 64 tokens about a quarter of the grid is real.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.layers import NEG_INF, MLP, Attention, Packing, split_key
from fedspine_jax.models.lora import HeadParam, LoRALinear


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: ArchConfig, layer: int, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.attn = Attention(cfg, layer, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d, epsilon=cfg.norm_eps, rngs=rngs)
        self.mlp = MLP(cfg, layer, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=cfg.norm_eps, rngs=rngs)

    def __call__(self, x_bld, bias, first_only: bool = False, packing: Packing | None = None,
                 dropout_key=None):
        """x: (B, L, D) -> (B, L, D), or packed (T, D) -> (T, D) with ``packing``; with
        ``first_only`` (B, 1, D), the first token's row alone (its attention still reads
        every token). ``dropout_key``: LoRA dropout (training steps only)."""
        ka, km = split_key(dropout_key, 2)
        x_q = x_bld
        if first_only:
            x_q = x_bld[:, :1] if packing is None else x_bld[packing.first][:, None]
        attn = self.attn(x_bld, bias, queries=x_q if first_only else None, packing=packing,
                         dropout_key=ka)[0]
        x = self.ln1(x_q + attn)
        return self.ln2(x + self.mlp(x, km))


def _head_linear(d_in, d_out, cfg, rngs):
    return LoRALinear(d_in, d_out, lora=False, init_std=cfg.init_std, param_type=HeadParam,
                      rngs=rngs)


class Encoder(nnx.Module):
    """``model(input_ids, attention_mask, token_type_ids=None)``.

    Returns the last hidden states ``(B, L, D)``, or the classification logits
    ``(B, num_labels)`` when ``cfg.num_labels > 0``.
    """

    def __init__(self, cfg: ArchConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        init = nnx.initializers.normal(cfg.init_std)
        self.word = nnx.Embed(cfg.vocab_size, d, embedding_init=init, rngs=rngs)
        self.position = nnx.Embed(cfg.max_positions, d, embedding_init=init, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, d, embedding_init=init, rngs=rngs)
        self.ln_emb = nnx.LayerNorm(d, epsilon=cfg.norm_eps, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        has_head = cfg.num_labels > 0
        # BERT: frozen pretrained pooler; RoBERTa: a trainable dense layer in the head.
        self.pooler = nnx.data(LoRALinear(d, d, lora=False, init_std=cfg.init_std, rngs=rngs)
                               if has_head and cfg.arch != "roberta" else None)
        self.cls_dense = nnx.data(_head_linear(d, d, cfg, rngs)
                                  if has_head and cfg.arch == "roberta" else None)
        self.classifier = nnx.data(_head_linear(d, cfg.num_labels, cfg, rngs)
                                   if has_head else None)

    def positions(self, input_ids_bl, attention_mask_bl):
        if self.cfg.arch == "roberta":
            valid = (input_ids_bl != self.cfg.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(valid, axis=1) * valid + self.cfg.pad_token_id
        # iota rather than arange + broadcast: also traces with symbolic (B, L) (ONNX export)
        return jax.lax.broadcasted_iota(jnp.int32, input_ids_bl.shape, 1)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, token_index=None,
                 dropout_key=None):
        """input_ids, attention_mask, token_type_ids: (B, L) int -> see class docstring.

        ``token_index``: optional (T,) int32 packed-token positions (``data.pack_index`` of
        the attention mask): compute on the real tokens only (module docstring).
        ``dropout_key``: LoRA dropout (``cfg.lora_dropout``), given by training steps only.
        """
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = (self.word(input_ids) + self.position(self.positions(input_ids, attention_mask))
             + self.token_type(token_type_ids))
        packing = None
        if token_index is not None:
            packing = Packing.from_index(token_index, *input_ids.shape)
            x = packing.pack(x)                                 # (T, D)
        x = self.ln_emb(x)
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, NEG_INF)
        n = len(self.layers)
        for i, (layer, key) in enumerate(zip(self.layers, split_key(dropout_key, n))):
            # Only the first token reaches the classifier: the last layer computes its row
            # alone (exact; see the module docstring).
            x = layer(x, bias, first_only=self.classifier is not None and i == n - 1,
                      packing=packing, dropout_key=key)
        if self.classifier is None:
            return x if packing is None else packing.unpack(x)
        first = x[:, 0]
        if self.cls_dense is not None:
            h = jnp.tanh(self.cls_dense(first))
        else:
            h = jnp.tanh(self.pooler(first))
        return self.classifier(h)
