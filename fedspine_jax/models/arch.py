"""Architecture hyper-parameters of a model, including the per-layer sizes of a compacted one.

A full model has ``num_heads`` query heads, ``num_kv_heads`` key/value heads and
``intermediate_size`` FFN channels in every layer. A compacted model (pruned heads and
channels physically removed) has different counts per layer; those are carried in
``layer_kv_index`` (for every layer, the kv head each kept query head reads) and
``layer_channels``. ``ArchConfig`` is frozen and hashable, so it can be a static jit argument.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    arch: str                      # "bert", "roberta" (post-LN encoders) or "llama" (decoder)
    vocab_size: int                # rows of the token embedding
    hidden_size: int               # width D of the residual stream
    num_layers: int                # transformer blocks
    num_heads: int                 # query heads of a full layer
    num_kv_heads: int              # key/value heads of a full layer (== num_heads for encoders)
    head_dim: int                  # width of one head
    intermediate_size: int         # FFN channels F of a full layer
    max_positions: int = 512       # learned position embeddings (encoders) / RoPE cache length
    type_vocab_size: int = 2       # token-type (segment) embeddings of encoders
    norm_eps: float = 1e-12        # LayerNorm / RMSNorm epsilon
    rope_theta: float = 10000.0    # RoPE base (llama)
    pad_token_id: int = 0          # padding id (RoBERTa positions start after it)
    tie_embeddings: bool = True    # decoder: output projection is the embedding transposed
    num_labels: int = 0            # > 0: encoder gets a sequence-classification head
    lora_rank: int = 8             # rank r of every LoRA pair (0: no adapter effect)
    lora_alpha: float = 16.0       # LoRA output scaling alpha / r
    lora_targets: tuple = ("q", "k", "v", "o", "fc1", "fc2", "gate", "up", "down")
    lora_init_std: float = 0.02    # std of the Gaussian `a` factor
    lora_dropout: float = 0.0      # dropout on a LoRA branch's input, training only (PEFT's)
    init_std: float = 0.02         # std of random-init frozen weights and the task head
    # Compacted models only (None for a full model):
    layer_kv_index: tuple | None = None   # per layer: tuple (kept query head -> kept kv head)
    layer_channels: tuple | None = None   # per layer: number of kept FFN channels

    @property
    def is_decoder(self) -> bool:
        return self.arch == "llama"

    @property
    def group_size(self) -> int:
        """Query heads per kv head in a full layer (1 for encoders)."""
        return self.num_heads // self.num_kv_heads

    def kv_index(self, layer: int) -> tuple:
        """For every query head of ``layer``, the index of the kv head it attends with."""
        if self.layer_kv_index is not None:
            return tuple(self.layer_kv_index[layer])
        return tuple(h // self.group_size for h in range(self.num_heads))

    def heads(self, layer: int) -> int:
        return len(self.kv_index(layer))

    def kv_heads(self, layer: int) -> int:
        if self.layer_kv_index is not None:
            idx = self.layer_kv_index[layer]
            return (max(idx) + 1) if idx else 0
        return self.num_kv_heads

    def channels(self, layer: int) -> int:
        if self.layer_channels is not None:
            return int(self.layer_channels[layer])
        return self.intermediate_size

    @property
    def is_compact(self) -> bool:
        return self.layer_kv_index is not None

    def replace(self, **changes) -> "ArchConfig":
        return dataclasses.replace(self, **changes)
