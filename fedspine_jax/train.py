"""The device's local round (paper section 3 stages 3-4, sections 4.2-4.3): prune, then
fine-tune LoRA while scoring the groups for the next round.

Design note
-----------
A round takes the device's full frozen model, its record from earlier rounds (masks and the
Eq. 12 importance it measured in its previous round), the global LoRA already shrunk to the
device's rank r_i, the task head, the assigned pruning ratio p_i and tau batches, and:

1. **Prunes** with the carried importance: the least important groups go until p_i of the
   prunable parameters are gone (``pruning.select_masks``: one global ranking by importance
   per parameter across layers; at least ``pruning.min_heads_per_layer`` heads and
   ``min_channels_per_layer`` channels stay in every layer; masks only ever gain zeros). A
   device that has no importance yet (before its first round) does not prune.
2. **Compacts** the pruned model to the structure its masks keep (``models.compaction``),
   every layer padded to one bucketed head count and channel count (the padding groups keep
   mask 0). Training then really runs on smaller matrices, so a step gets cheaper as p_i
   grows, and a run compiles once per (head bucket, channel bucket, rank, sequence bucket),
   not once per mask pattern.
3. **Fine-tunes** for tau jitted AdamW steps (optax; a fresh optimiser state each round) on
   the LoRA factors and the task head, each step shape compiled ahead of time once per
   process (so the compile stays out of the measured compute time). Each step also computes,
   from the LoRA gradients of that step, Eq. 10 for every frozen kernel, Eq. 11 per head /
   channel, and folds them into the Eq. 12 moving average (restarted every round): the
   importance the next round prunes with. The step is
   ``train_step(spec, state, frozen, batch) -> (state, metrics)``: a static
   :class:`StepSpec` (graph, optimiser, eta, criterion), the round's :class:`StepState`
   (trainable, optimiser state, Eq. 12 average, LoRA gradient sum for Eq. 13, step count;
   donated) and the :class:`Frozen` masks and weights.
4. Writes the trained factors back into the full-shape LoRA (``expand_lora``).

So what a device uploads, and what is evaluated, has always been fine-tuned after its last
pruning, and the round's compute is that of the pruned sizes.

Several devices sharing one frozen model (the simulator) go through
:func:`local_rounds`: devices of one rank and size bucket run step 3 together as one vmapped
step over their stacked states; the other steps stay per device. :func:`local_round` (a
device agent) is its one-device case.

It reports the loss on a fixed probe batch before the round (before pruning) and after it
(pruned and fine-tuned), so Delta F of Eq. 3 charges the pruning's damage and credits the
recovery; the wall-clock compute time, I(B_total) of Eq. 13-14, parameters alive, the FLOPs
of the round (analytic, at the kept sizes) and an estimate of its peak training memory.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from fedspine_jax import pruning
from fedspine_jax.config import Config
from fedspine_jax.data import pack_index
from fedspine_jax.models import groups
from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.compaction import compact, expand_lora
from fedspine_jax.models.lora import HeadParam, Mask, lora_scale
from fedspine_jax.models.state import get_head, get_lora, lora_rank, set_head, set_lora, \
    set_masks

TRAINABLE = nnx.Any(nnx.LoRAParam, HeadParam)


@dataclasses.dataclass(frozen=True)
class LocalRoundResult:
    """What a device reports after its local round (and keeps: masks, importance)."""
    lora: dict                 # LoRA tree (models.state), full shapes, rank r_i
    head: dict                 # trained task head tree
    head_masks: np.ndarray     # (L, H) 0/1 after this round's pruning
    channel_masks: np.ndarray  # (L, F) 0/1
    head_importance: np.ndarray     # (L, H) Eq. 12 average of this round's steps (0 where
    channel_importance: np.ndarray  # (L, F)  pruned): what the next round prunes with
    loss_before: float         # probe-batch loss before pruning and training (F before)
    loss_after: float          # probe-batch loss after pruning and training
    compute_time_s: float      # wall clock of the tau steps (jit compile excluded)
    lora_importance: float     # I(B_total), Eq. 13-14
    ratio: float               # achieved fraction of prunable parameters pruned
    params_alive: int          # frozen parameters still in the model
    flops: float               # FLOPs of the round's training steps (kept sizes)
    peak_memory_bytes: int     # estimated training peak memory


# ---------------------------------------------------------------------------------------
# Loss


def loss_fn(model, batch: dict, dropout_key: jax.Array | None = None) -> jax.Array:
    """Mean loss of a batch: classification cross-entropy weighted by ``example_mask``, or
    causal-LM cross-entropy on the response tokens (``labels`` are already shifted, see
    ``data``), weighted by ``loss_mask * example_mask``. ``dropout_key``: LoRA dropout
    (training steps only)."""
    w = batch["example_mask"].astype(jnp.float32)
    if model.cfg.is_decoder:
        logits = model(batch["input_ids"], batch["attention_mask"], dropout_key=dropout_key)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        tw = batch["loss_mask"].astype(jnp.float32) * w[:, None]
        return jnp.sum(ce * tw) / jnp.maximum(jnp.sum(tw), 1.0)
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                   batch.get("token_index"), dropout_key=dropout_key)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def dropout_key(batch: dict, step: jax.Array) -> jax.Array:
    """The LoRA-dropout key of a training step: the step count and a checksum of the
    batch's token ids folded into a fixed key, so a step's dropout is reproducible (exact
    resume) and differs across steps, batches and devices without carrying a seed."""
    ids = batch["input_ids"].astype(jnp.uint32)
    pos = jnp.arange(1, ids.shape[-1] + 1, dtype=jnp.uint32)
    checksum = jnp.sum(ids * pos, dtype=jnp.uint32)
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(0), step), checksum)


# ---------------------------------------------------------------------------------------
# Eq. 10-11 inside the step


def _linears(layer) -> tuple:
    """``((name, LoRALinear), ...)`` of every linear a prunable group owns (``groups``)."""
    return tuple((name, groups.linear(layer, name))
                 for owned in groups.owned(layer.mlp.gated).values() for name, _ in owned)


def group_scores(model, grads_model) -> tuple[jax.Array, jax.Array]:
    """Eq. 10 for every frozen kernel, summed into Eq. 11 head / channel scores.

    Args:
      model: the (compacted) model; grads_model: the same graph holding the LoRA gradients
        in its ``lora_a`` / ``lora_b`` slots.
    Returns:
      head scores (L, H_c), channel scores (L, F_c) of the compacted layers.
    """
    hs, cs = [], []
    for lay, glay in zip(model.layers, grads_model.layers):
        imp = {}
        for (name, lin), (_, glin) in zip(_linears(lay), _linears(glay)):
            if lin.rank > 0:
                imp[name] = pruning.lora_guided_importance(
                    lin.kernel[...], lin.lora_a[...], lin.lora_b[...], glin.lora_a[...],
                    glin.lora_b[...], scale=lora_scale(lin.alpha, lin.rank))
            else:  # no adapter (rank 0 or not a LoRA target): no LoRA-guided signal
                imp[name] = jnp.zeros_like(lin.kernel[...])
        h, c = pruning.group_importance(imp, lay.attn.num_heads, lay.attn.num_kv_heads,
                                        lay.attn.kv_index)
        hs.append(h)
        cs.append(c)
    return jnp.stack(hs), jnp.stack(cs)


def _scale_head(scale: float) -> optax.GradientTransformation:
    """Multiply the updates of :class:`HeadParam` variables by ``scale`` (others unchanged)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(
            lambda v: v.replace(v[...] * scale) if isinstance(v, HeadParam) else v, updates,
            is_leaf=lambda x: isinstance(x, nnx.Variable)), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@functools.lru_cache(maxsize=None)
def _optimizer(lr: float, weight_decay: float, head_lr_scale: float = 1.0
               ) -> optax.GradientTransformation:
    """AdamW on LoRA factors and head; the head's step scaled by ``head_lr_scale``."""
    tx = optax.adamw(lr, weight_decay=weight_decay)
    return tx if head_lr_scale == 1.0 else optax.chain(tx, _scale_head(head_lr_scale))


CRITERIA = ("lora", "fisher", "taylor")


def _mask_scores(mask_grads_model) -> tuple[jax.Array, jax.Array]:
    """Per-group mask gradients dL/dm: heads (L, H_c), channels (L, F_c)."""
    return (jnp.stack([lay.attn.head_mask[...] for lay in mask_grads_model.layers]),
            jnp.stack([lay.mlp.channel_mask[...] for lay in mask_grads_model.layers]))


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the step is compiled for (a static, hashable jit argument).

    Attributes:
      graphdef: static graph of the compacted model (rank r_i, H_c heads, F_c channels).
      tx: the optax transformation (:func:`_optimizer`).
      eta: the Eq. 12 moving-average factor.
      criterion: per-step group scores, one of :data:`CRITERIA` (see :func:`train_step`).
    """
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    eta: float
    criterion: str


@struct.dataclass
class StepState:
    """What the tau steps of a round update (a pytree; fresh every round).

    Attributes:
      trainable: LoRA factors (``lora_a (in, r)``, ``lora_b (r, out)``) and task head.
      opt_state: the optimiser state of ``trainable``.
      importance_ema: ``(heads (L, H_c), channels (L, F_c))``, the Eq. 12 moving average
        of the group scores.
      lora_grad_sum: the sum over the steps of the LoRA gradients (same tree as the LoRA
        factors); its ``lora_b`` part divided by the step count is the mean gradient of
        Eq. 13.
      step: int32 scalar, steps taken (the Eq. 12 average starts at step 0).
    """
    trainable: nnx.State
    opt_state: optax.OptState
    importance_ema: tuple[jax.Array, jax.Array]
    lora_grad_sum: nnx.State
    step: jax.Array


@struct.dataclass
class Frozen:
    """The variables a step reads but does not train (a pytree).

    Attributes:
      masks: the head (H_c,) and channel (F_c,) masks of every layer.
      rest: the frozen weights.
    """
    masks: nnx.State
    rest: nnx.State


def split_for_training(small, tx: optax.GradientTransformation, eta: float,
                       criterion: str) -> tuple[StepSpec, StepState, Frozen]:
    """A compacted model split for :func:`train_step`: its spec, the round's fresh state
    (new optimiser state, zero Eq. 12 average and gradient sum, step 0) and its frozen
    variables. The state holds the model's own LoRA and head arrays, which the steps
    donate."""
    graphdef, trainable, masks, rest = nnx.split(small, TRAINABLE, Mask, nnx.Variable)
    n_layers = len(small.layers)
    hc = small.layers[0].attn.head_mask.shape[0]
    fc = small.layers[0].mlp.channel_mask.shape[0]
    state = StepState(
        trainable=trainable, opt_state=tx.init(trainable),
        importance_ema=(jnp.zeros((n_layers, hc)), jnp.zeros((n_layers, fc))),
        lora_grad_sum=jax.tree.map(jnp.zeros_like, nnx.state(small, nnx.LoRAParam)),
        step=jnp.zeros((), jnp.int32))
    return StepSpec(graphdef, tx, eta, criterion), state, Frozen(masks, rest)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def train_step(spec: StepSpec, state: StepState, frozen: Frozen, batch: dict
               ) -> tuple[StepState, dict]:
    """One AdamW step on LoRA + head, with the group-importance update (Eq. 12 average).

    Per-step group scores by ``spec.criterion``:

    * ``"lora"`` (FedSpine): Eq. 10 from the LoRA gradients, summed per group (Eq. 11);
    * ``"fisher"`` (FedLoRA + Prune, after Kwon et al.'s mask tuning): the squared gradient
      of the loss w.r.t. the group's mask, ``(dL/dm)^2`` (batch-level Fisher estimate);
    * ``"taylor"`` (LLM-Pruner; FedAPT): ``|dL/dm|``, the first-order Taylor estimate of
      removing the group, which equals LLM-Pruner's vector-wise ``|sum_group w dL/dw|`` and
      APT's activation-times-gradient salience summed over the group's outputs.

    Args:
      spec: graph, optimiser, eta, criterion (static).
      state: the round's state so far (donated).
      frozen: masks and frozen weights.
      batch: dict of (B, S) int32 arrays (see ``data.collate``).
    Returns:
      the state after the step, and ``{"loss": scalar}`` (the loss before the update).
    """
    graphdef, masks, rest = spec.graphdef, frozen.masks, frozen.rest
    key = dropout_key(batch, state.step)

    def f(tr, mk):
        model = nnx.merge(graphdef, tr, mk, rest)
        return loss_fn(model, batch, key if model.cfg.lora_dropout > 0 else None)

    loss, (grads, mask_grads) = jax.value_and_grad(f, argnums=(0, 1))(state.trainable, masks)
    grads_model = nnx.merge(graphdef, grads, masks, rest)
    if spec.criterion == "lora":
        scores = group_scores(nnx.merge(graphdef, state.trainable, masks, rest), grads_model)
    else:
        g = _mask_scores(nnx.merge(graphdef, state.trainable, mask_grads, rest))
        scores = jax.tree.map(jnp.square if spec.criterion == "fisher" else jnp.abs, g)
    ema = pruning.update_importance_ema(state.importance_ema, scores, spec.eta,
                                       state.step == 0)
    grad_sum = jax.tree.map(jnp.add, state.lora_grad_sum,
                            nnx.state(grads_model, nnx.LoRAParam))
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return StepState(trainable=trainable, opt_state=opt_state, importance_ema=ema,
                     lora_grad_sum=grad_sum, step=state.step + 1), {"loss": loss}


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def train_step_vmapped(spec: StepSpec, state: StepState, frozen: Frozen, batch: dict
                       ) -> tuple[StepState, dict]:
    """:func:`train_step` of G devices at once: ``state``, ``frozen``, ``batch`` and the
    results carry a leading device axis G (devices of one graph: same rank and compacted
    sizes)."""
    return jax.vmap(functools.partial(train_step, spec))(state, frozen, batch)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_loss(graphdef, state, batch):
    return loss_fn(nnx.merge(graphdef, state), batch)


# ---------------------------------------------------------------------------------------
# Sizes, FLOPs, memory


def bucket_sizes(head_masks: np.ndarray, channel_masks: np.ndarray) -> tuple[int, int]:
    """Uniform per-layer (heads, channels) of the compacted training model: the most any
    layer keeps, rounded up to a bucket (quarters of the heads and of the channels),
    so a whole run compiles for only a handful of sizes."""
    h_full, f_full = head_masks.shape[1], channel_masks.shape[1]
    h_step, f_step = max(1, h_full // 4), max(1, f_full // 4)
    h = int(head_masks.sum(1).max())
    f = int(channel_masks.sum(1).max())
    return (min(h_full, -(-h // h_step) * h_step), min(f_full, -(-f // f_step) * f_step))


def step_flops(arch: ArchConfig, heads: np.ndarray, kv_heads: np.ndarray,
               channels: np.ndarray, rank: int, batch: int, seq: int,
               tokens: int | None = None) -> float:
    """FLOPs of one training step (forward + backward) at the kept sizes.

    Per row and linear ``(i, o)``: forward ``2 i o`` + LoRA ``2 r (i + o)``; backward
    ``2 i o`` (input gradient only: the kernel is frozen) + LoRA ``4 r (i + o)``; the LoRA
    terms only on the linears named in ``arch.lora_targets`` (the default names them all;
    PEFT's ``query, value`` gives q and v alone). Attention
    scores and mixing: ``4 S dh`` per head and query row forward, twice that backward, on
    the B x S grid. The linears' rows are the ``tokens`` (packed, ``models.encoder``; default
    the B x S grid), except in an encoder classifier's last layer, which computes the first
    token's row alone: there q, o, the FFN and the attention see B rows, k and v every
    token. The task head sees B rows (an encoder) or B x S (a decoder's LM head).

    Args:
      heads, kv_heads, channels: (L,) kept counts per layer; rank: LoRA rank;
      batch, seq: the padded grid B x S; tokens: rows the linears run on (T of a packed
      batch's ``token_index``), default B x S.
    """
    d, dh = arch.hidden_size, arch.head_dim
    grid = batch * seq
    tokens = grid if tokens is None else tokens
    first_only = not arch.is_decoder and arch.num_labels > 0

    def per_row(name, i, o):
        lora = 6 * rank * (i + o) if name in arch.lora_targets else 0
        return 4 * i * o + lora

    total = 0.0
    for layer, (h, kv, f) in enumerate(zip(heads, kv_heads, channels)):
        last = first_only and layer == len(heads) - 1
        rows, queries = (batch, batch) if last else (tokens, grid)
        ffn = ([("gate", d, f), ("up", d, f), ("down", f, d)] if arch.is_decoder
               else [("fc1", d, f), ("fc2", f, d)])
        dims = [("q", d, h * dh), ("o", h * dh, d)] + ffn
        total += rows * sum(per_row(*x) for x in dims) + queries * 3 * 4 * seq * dh * h
        total += tokens * (per_row("k", d, kv * dh) + per_row("v", d, kv * dh))
    head_rows = grid if arch.is_decoder else batch
    head = 2 * d * (arch.vocab_size if arch.is_decoder else max(arch.num_labels, 1))
    return float(total + head_rows * 3 * head)


def estimate_peak_memory(arch: ArchConfig, frozen_params: int, trainable_params: int,
                         heads: int, channels: int, batch: int, seq: int,
                         tokens: int | None = None) -> int:
    """Bytes of a training step in fp32: frozen weights, trainable weights (the LoRA factors
    of the targeted linears and the head, as counted in the model) with their
    gradient and two AdamW moments, and the activations kept for the backward pass
    (per layer about ``10 D + 2 F`` values per token, ``tokens`` of them (default B x S;
    fewer when packed), and ``2 H S`` attention probabilities per grid position)."""
    d = arch.hidden_size
    tokens = batch * seq if tokens is None else tokens
    per_layer = tokens * (10 * d + 2 * channels) + batch * seq * 2 * heads * seq
    acts = arch.num_layers * per_layer + 2 * batch * seq * (
        arch.vocab_size if arch.is_decoder else d)
    return int(4 * (frozen_params + 4 * trainable_params + acts))


def _tokens(batch: dict) -> int | None:
    """T of a packed batch (the rows its linears run on), None when not packed."""
    return batch["token_index"].shape[0] if "token_index" in batch else None


def _to_jnp(batch: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------
# The local round


@dataclasses.dataclass(frozen=True)
class RoundInput:
    """One device's share of a round (the arguments of :func:`local_round` but the model).

    Attributes:
      lora: LoRA tree (``models.state``) of the global LoRA shrunk to the device's rank r_i
        (full shapes).
      head: task head tree (empty for a decoder).
      head_masks: (L, H) and channel_masks: (L, F) 0/1 masks from earlier rounds.
      ratio: assigned pruning ratio p_i (fraction of prunable parameters).
      batches: iterator of training batches (``cfg.train.local_steps`` are drawn).
      probe: a fixed batch on which the loss before / after is measured.
      head_importance: (L, H) and channel_importance: (L, F) the Eq. 12 average the device
        measured in its previous round; None before its first round (it does not prune).
    """
    lora: dict
    head: dict
    head_masks: np.ndarray
    channel_masks: np.ndarray
    ratio: float
    batches: Iterator[dict]
    probe: dict
    head_importance: np.ndarray | None = None
    channel_importance: np.ndarray | None = None


@dataclasses.dataclass
class _Job:
    """A device's round between preparation and finishing (see :func:`local_rounds`)."""
    inp: RoundInput
    spec: StepSpec
    index: object              # compaction.CompactIndex: the full-model groups kept
    state: StepState           # what the steps update
    frozen: Frozen
    data: list                 # tau batches (dicts of jnp arrays)
    loss_before: float
    head_masks: np.ndarray     # (L, H) after this round's pruning
    channel_masks: np.ndarray  # (L, F)
    ratio: float               # achieved fraction of prunable parameters pruned
    compute_time: float = 0.0

    def key(self) -> tuple:
        """Jobs with equal keys run vmapped together: same graph, same array shapes (the
        rank is one of them), same batch shapes (packed batches of different T are padded
        to one, see :func:`_one_packing`)."""
        shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(
            (self.state.trainable, self.frozen)))
        return (self.spec, shapes,
                tuple((d["input_ids"].shape, "token_index" in d) for d in self.data))


def _load(model, inp: RoundInput, head_masks=None, channel_masks=None) -> None:
    """Put the device's LoRA, head and masks (its record's, unless given) into ``model``."""
    set_lora(model, inp.lora)
    if inp.head:
        set_head(model, inp.head)
    set_masks(model, inp.head_masks if head_masks is None else head_masks,
              inp.channel_masks if channel_masks is None else channel_masks)


@functools.cache
def _group_params(arch: ArchConfig) -> tuple[np.ndarray, float]:
    """Frozen parameters per head (L, H) and per FFN channel (one figure); computed once per
    architecture (pruning and the round's statistics both need it; read-only)."""
    return groups.param_counts(arch)


def _prune(arch: ArchConfig, inp: RoundInput, cfg: Config) -> tuple:
    """Stage 3: the masks after pruning to ``inp.ratio`` with the carried importance.

    Returns ``(head_masks (L, H), channel_masks (L, F), achieved ratio)``; without carried
    importance the masks stay as they are (the achieved ratio is theirs).
    """
    scored = inp.head_importance is not None
    hm, cm = np.asarray(inp.head_masks, np.float32), np.asarray(inp.channel_masks, np.float32)
    hs = np.asarray(inp.head_importance, np.float32) if scored else np.zeros_like(hm)
    cs = np.asarray(inp.channel_importance, np.float32) if scored else np.zeros_like(cm)
    head_params, channel_params = _group_params(arch)
    new_h, new_c, achieved = pruning.select_masks(
        jnp.asarray(hs), jnp.asarray(cs), jnp.asarray(hm), jnp.asarray(cm),
        float(inp.ratio) if scored else 0.0,
        head_params=jnp.asarray(head_params, jnp.float32), channel_params=channel_params,
        min_heads=cfg.pruning.min_heads_per_layer,
        min_channels=cfg.pruning.min_channels_per_layer)
    return np.asarray(new_h), np.asarray(new_c), float(achieved)


def _prepare(model, inp: RoundInput, cfg: Config, tx, criterion: str) -> _Job:
    """F before, pruning (stage 3), compaction to the kept groups, the round's batches."""
    _load(model, inp)
    # Loss before (and after) on the full masked model (equal to the compacted one's), so
    # this evaluation compiles once per rank, not once per size bucket.
    loss_before = float(eval_loss(*nnx.split(model), _to_jnp(inp.probe)))
    new_h, new_c, achieved = _prune(model.cfg, inp, cfg)
    set_masks(model, new_h, new_c)
    small, index = compact(model, sizes=bucket_sizes(new_h, new_c))
    spec, state, frozen = split_for_training(small, tx, cfg.pruning.eta, criterion)
    data = [_to_jnp(next(inp.batches)) for _ in range(cfg.train.local_steps)]
    return _Job(inp=inp, spec=spec, index=index, state=state, frozen=frozen, data=data,
                loss_before=loss_before, head_masks=new_h, channel_masks=new_c,
                ratio=achieved)


_EXECUTABLES: dict = {}


def _executable(step, spec: StepSpec, args: tuple):
    """``step`` (a jitted step) compiled ahead of time for ``spec`` and the shapes and
    dtypes of ``args`` (the rest, in order), cached for the process.

    Compiling ahead of time keeps the compile out of a round's timed steps without running
    (and throwing away) a warm-up step: every round after a shape's first one trains its
    tau steps and no more. Call the result with ``args``.
    """
    leaves, tree = jax.tree.flatten(args)
    key = (step, spec, tree, tuple(jax.typeof(x) for x in leaves))
    if key not in _EXECUTABLES:
        _EXECUTABLES[key] = step.lower(spec, *args).compile()
    return _EXECUTABLES[key]


def _stack(trees: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _one_packing(batches: list[dict]) -> list[dict]:
    """Batches of devices trained together, their ``token_index`` extended to the longest
    T with spare rows (``data.pack_index``), so that they stack (and give the same loss)."""
    if "token_index" not in batches[0]:
        return batches
    t = max(b["token_index"].shape[0] for b in batches)
    return [dict(b, token_index=jnp.asarray(pack_index(np.asarray(b["attention_mask"]),
                                                       size=t))) for b in batches]


def _run_group(jobs: list[_Job]) -> None:
    """The tau steps of ``jobs`` (equal :meth:`_Job.key`): one device with
    :func:`train_step`, several vmapped with :func:`train_step_vmapped`. Updates each
    job's ``state`` and ``compute_time`` (the group's wall clock, shared out evenly)."""
    spec = jobs[0].spec
    if len(jobs) == 1:
        step, (j,) = train_step, jobs
        state, frozen, data = j.state, j.frozen, j.data
    else:
        step = train_step_vmapped
        state = _stack([j.state for j in jobs])
        frozen = _stack([j.frozen for j in jobs])
        data = [_stack(_one_packing([j.data[k] for j in jobs]))
                for k in range(len(jobs[0].data))]

    # Every step's executable before the timed loop (compiled once per process and shape).
    exes = [_executable(step, spec, (state, frozen, batch)) for batch in data]
    t0 = time.perf_counter()
    for exe, batch in zip(exes, data):
        state, _ = exe(state, frozen, batch)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0
    for i, j in enumerate(jobs):
        j.state = state if len(jobs) == 1 else jax.tree.map(lambda x: x[i], state)
        j.compute_time = elapsed / len(jobs)


def _finish(model, job: _Job, cfg: Config) -> LocalRoundResult:
    """Eq. 13-14, the LoRA back to full shapes, the importance to carry, F after, statistics."""
    inp, arch, steps = job.inp, model.cfg, cfg.train.local_steps
    trainable = job.state.trainable
    small = nnx.merge(job.spec.graphdef, trainable, job.frozen.masks, job.frozen.rest)
    # Eq. 13-14 with the round's mean lora_b gradient and the trained b.
    gb = dict(nnx.to_flat_state(job.state.lora_grad_sum))
    paths = [p for p, _ in nnx.to_flat_state(nnx.state(small, nnx.LoRAParam))
             if p[-1] == "lora_b"]
    lins = [_module(small, p[:-1]) for p in paths]
    importance = float(pruning.lora_importance_total(
        [lin.lora_b[...] for lin in lins], [gb[p][...] / steps for p in paths],
        [lora_scale(lin.alpha, lin.rank) for lin in lins]))

    # Back to full shapes (the record's LoRA and head replaced by the trained ones).
    head_masks, channel_masks, achieved = job.head_masks, job.channel_masks, job.ratio
    _load(model, inp, head_masks, channel_masks)
    index = job.index
    expand_lora(model, small, index)
    if inp.head:
        set_head(model, get_head(small))
    n_layers = arch.num_layers
    # The importance to carry: groups outside the compacted model are pruned and stay so.
    full_h = np.zeros(head_masks.shape, np.float32)
    full_c = np.zeros(channel_masks.shape, np.float32)
    ema_h, ema_c = (np.asarray(x) for x in job.state.importance_ema)
    for layer in range(n_layers):
        full_h[layer, index.heads[layer]] = ema_h[layer]
        full_c[layer, index.channels[layer]] = ema_c[layer]
    full_h *= head_masks
    full_c *= channel_masks

    # Loss after pruning and training, on the same probe batch (masked full model).
    loss_after = float(eval_loss(*nnx.split(model), _to_jnp(inp.probe)))

    kept_h = head_masks.sum(1).astype(int)
    kept_c = channel_masks.sum(1).astype(int)
    kv_kept = np.array([len(np.unique(np.asarray(arch.kv_index(i))[np.flatnonzero(
        head_masks[i])])) for i in range(n_layers)])
    rank = lora_rank(inp.lora) if inp.lora else 0
    flops = sum(step_flops(arch, kept_h, kv_kept, kept_c, rank, *d["input_ids"].shape,
                           tokens=_tokens(d)) for d in job.data)
    b, s = max(d["input_ids"].shape for d in job.data)
    tokens = max(_tokens(d) or b * s for d in job.data)
    frozen = sum(int(x.size) for x in jax.tree.leaves(
        nnx.state(model, nnx.All(nnx.Param, nnx.Not(TRAINABLE)))))
    head_params, channel_params = _group_params(arch)
    pruned_params = achieved * float(head_params.sum() + channel_masks.size * channel_params)
    trainable_n = sum(int(x.size) for x in jax.tree.leaves(trainable))
    peak = estimate_peak_memory(arch, frozen, trainable_n, len(index.heads[0]),
                                len(index.channels[0]), b, s, tokens)
    return LocalRoundResult(
        lora=get_lora(model), head=get_head(model) if inp.head else {},
        head_masks=head_masks, channel_masks=channel_masks, head_importance=full_h,
        channel_importance=full_c, loss_before=job.loss_before, loss_after=loss_after,
        compute_time_s=job.compute_time, lora_importance=importance, ratio=achieved,
        params_alive=int(round(frozen - pruned_params)), flops=flops,
        peak_memory_bytes=peak)


def _module(model, path: tuple):
    """The submodule of ``model`` at an nnx state path (attribute names, list indices)."""
    for k in path:
        model = model[k] if isinstance(k, int) else getattr(model, k)
    return model


def local_rounds(model, inputs: list[RoundInput], cfg: Config, criterion: str = "lora",
                 max_batch: int = 1) -> list[LocalRoundResult]:
    """The local rounds of several devices that share ``model``'s frozen weights.

    Each device's round is exactly :func:`local_round`'s; devices whose compacted models
    have the same graph (same rank r_i and size bucket) and whose batches have the same
    shapes run their tau steps together, up to ``max_batch`` at a time, as one vmapped
    step over stacked per-device states (frozen compacted weights included: memory grows
    with the group). A group runs as soon as it is full, the rest at the end, so
    ``max_batch=1`` runs the devices one after the other, holding one compacted copy at a
    time. Preparation (F before, pruning, compaction) and finishing (Eq. 13-14, F after)
    stay per device.

    Args:
      model: the full model (frozen weights); it is overwritten with each device's state
        in turn and, on return, holds the last device's result.
      inputs: one :class:`RoundInput` per device.
      cfg: the run's config (train, pruning sections).
      criterion: group-importance criterion (see :func:`train_step`; baselines differ).
      max_batch: most devices per vmapped group (>= 1).
    Returns:
      one :class:`LocalRoundResult` per input, in order.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}: allowed {list(CRITERIA)}")
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch}: must be >= 1")
    tx = _optimizer(cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.head_lr_scale)
    results: dict[int, LocalRoundResult] = {}

    def flush(group: list[tuple[int, _Job]]) -> None:
        _run_group([j for _, j in group])
        for pos, j in group:
            results[pos] = _finish(model, j, cfg)

    open_groups: dict[tuple, list[tuple[int, _Job]]] = {}
    for pos, inp in enumerate(inputs):
        job = _prepare(model, inp, cfg, tx, criterion)
        key = job.key()
        open_groups.setdefault(key, []).append((pos, job))
        if len(open_groups[key]) == max_batch:
            flush(open_groups.pop(key))
    for group in open_groups.values():
        flush(group)
    return [results[pos] for pos in range(len(inputs))]


def local_round(model, lora: dict, head: dict, head_masks: np.ndarray,
                channel_masks: np.ndarray, ratio: float, batches: Iterator[dict],
                probe: dict, cfg: Config, criterion: str = "lora",
                head_importance: np.ndarray | None = None,
                channel_importance: np.ndarray | None = None) -> LocalRoundResult:
    """One device round: pruning to ``ratio`` with the carried importance, then tau steps
    of LoRA fine-tuning on the compacted model, scoring Eq. 10-12 for the next round.

    Args:
      model: the device's full model (frozen weights); its LoRA, head and masks are
        overwritten with the arguments and, on return, hold the round's result.
      lora, head, head_masks, channel_masks, ratio, batches, probe, head_importance,
        channel_importance: see :class:`RoundInput`.
      cfg: the run's config (train, pruning sections).
      criterion: group-importance criterion (see :func:`train_step`; baselines differ).
    Returns:
      :class:`LocalRoundResult`.
    """
    inp = RoundInput(lora, head, head_masks, channel_masks, ratio, batches, probe,
                     head_importance, channel_importance)
    return local_rounds(model, [inp], cfg, criterion)[0]


def initial_masks(arch: ArchConfig) -> tuple[np.ndarray, np.ndarray]:
    """All-ones masks ``(L, H)``, ``(L, F)`` of an unpruned model."""
    return (np.ones((arch.num_layers, arch.num_heads), np.float32),
            np.ones((arch.num_layers, arch.intermediate_size), np.float32))


__all__ = ["LocalRoundResult", "RoundInput", "bucket_sizes", "estimate_peak_memory",
           "group_scores", "CRITERIA", "evaluate", "initial_masks", "local_round",
           "local_rounds", "loss_fn", "split_for_training", "step_flops", "StepSpec",
           "StepState", "Frozen", "train_step", "train_step_vmapped"]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _correct(graphdef, state, batch):
    """(correct, counted) of a batch: label accuracy, or next-token accuracy on the
    response tokens for a decoder."""
    model = nnx.merge(graphdef, state)
    w = batch["example_mask"].astype(jnp.float32)
    if model.cfg.is_decoder:
        pred = jnp.argmax(model(batch["input_ids"], batch["attention_mask"]), -1)
        tw = batch["loss_mask"].astype(jnp.float32) * w[:, None]
        return jnp.sum((pred == batch["labels"]) * tw), jnp.sum(tw)
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                   batch.get("token_index"))
    return jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * w), jnp.sum(w)


def evaluate(model, batches) -> float:
    """Accuracy of ``model`` over an iterable of batches (see :func:`_correct`)."""
    graphdef, state = nnx.split(model)
    correct = total = 0.0
    for batch in batches:
        c, n = _correct(graphdef, state, _to_jnp(batch))
        correct, total = correct + float(c), total + float(n)
    return correct / max(total, 1.0)
