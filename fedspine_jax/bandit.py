"""S-UCB: the smooth upper-confidence-bound scheduler of paper Algorithm 1 (Eq. 3-7).

Design note
-----------
Every device has one agent that picks, each round, a pruning ratio ``p`` and a LoRA rank
``r`` from the arm space ``[p_lo(t), p_target] x [r_min, r_max]`` (``p_lo(t)`` below; the
paper's is ``p^{t-1}``). The agent partitions
that space into regions (the leaves of a decision tree), plays the region with the
largest upper confidence bound (Eq. 4-6), draws an arm uniformly inside it, and splits
the region while it is coarser than ``delta``.

*Fixed capacity.* A tree cannot change size under ``jax.jit``, so an agent holds its
leaves in arrays of ``capacity`` slots: slots ``[0, num_leaves)`` are the live leaves,
the rest are free. A split turns the chosen leaf into its lower half in place and writes
the upper half into slot ``num_leaves``; leaves are never removed, so the live slots
stay a prefix. Every operation is an array operation over the capacity axis (no Python
loop over leaves), and :func:`select` / :func:`update` are ``jax.vmap`` of a single-agent
function over the leading agent axis, so a fleet, or a stack of fleets under a further
``jax.vmap``, runs as one fused program.

*Coordinates.* The tree lives in normalised coordinates and never has to be remapped:

* ``u in [0, 1]`` is the fraction of the round's pruning headroom taken:
  ``p = p_lo(t) + u * (p_hi - p_lo(t))`` with ``p_hi = target_ratio``. The lower bound
  depends on ``bandit.arm_space``:

  - ``"paper"`` (the default): ``p_lo(t) = p^{t-1}``, Algorithm 1's ``[p^{t-1},
    p_target]``: pruning never undoes itself, and nothing else constrains the pace, so a
    device may reach the target in its first round or still be short of it after
    ``target_round`` (``p`` approaches the target as the headroom narrows; the interval
    closes once ``p^{t-1}`` reaches it).
  - ``"floor"`` (ours, :data:`TUNED`): ``p_lo(t) = max(p^{t-1}, target_ratio * min(t /
    target_round, 1))``. The second term is a schedule floor, which guarantees ``p =
    target_ratio`` from round ``target_round`` on (there ``p_lo = p_hi``).

  Decision: as ``p^{t-1}`` rises the interval shrinks and every region
  keeps its ``u`` extent, i.e. regions are re-mapped proportionally rather than cut off
  below ``p^{t-1}``. Reason: ``u`` keeps a stationary meaning ("how aggressive a step
  to take"), the statistics of every leaf stay usable, and no leaf ever has to be
  deleted or compacted inside the fixed-capacity arrays. As the interval narrows, the
  ``u`` axis matters less and is split less (see the diameter below); once
  ``p_lo = p_hi`` it is not split at all.
* The rank axis is the index into ``lora.rank_choices``: a region holds the half-open
  index range ``[b_lo, b_hi)`` and an arm's rank is ``rank_choices[b]`` for a ``b``
  drawn uniformly in it. This is the continuous ``r`` coordinate cut into equal bins,
  one per allowed rank; a region spanning one rank is fully resolved along ``r``.

*Diameter and splits.* A region's diameter is measured in the arm space of the current
round, normalised by the full ranges: along ``p`` its side is its width in ``p``,
``(u_hi - u_lo) * (p_hi - p_lo(t))``, over ``target_ratio`` (zero once ``p_lo = p_hi``,
or without pruning); along ``r`` it is ``(b_hi - b_lo) / K`` for ``K`` allowed ranks,
or zero once it spans one rank. The diameter is the Euclidean norm of the two sides
(at most ``sqrt(2)``). So ``delta`` is the granularity of the exploration of ``p``
itself, as in the paper, and capacity is not spent on splitting ``u`` ever finer once
the remaining headroom is small. A chosen region whose diameter exceeds ``delta`` is cut into
halves along its longer side (ties go to the rank axis; a rank range is cut at the
middle index). Decision: halves rather than a cut through the drawn arm (the paper
splits "with p and r"): halves keep the tree balanced so ``delta`` is reached after a
predictable number of splits, and the drawn arm then lies strictly inside one child,
the one credited with its reward by :func:`update`.

*Statistics at a split.* Both children inherit half of the parent's discounted count
and reward sum. The parent's arms were drawn uniformly inside it, so in expectation
half of its past observations fall in each half; the split refines the partition
without forgetting what was learnt and without restarting exploration, and the total
discounted count ``n_t`` of Eq. 5 is unchanged by a split. A region with no (or only
underflowed) count is unvisited: its upper bound is ``+inf`` and it is played first.
Decision: an unvisited region is played but not split (it is split on a later play,
once it holds an observation). Splitting it would give two children without data, one
of which stays unvisited after the reward is credited, is played next round, and is
split again: a chain of forced plays of ever smaller regions in one corner of the arm
space, about ``2 log2(1 / delta)`` rounds long, in the very rounds that decide ``p``.
So round 1 plays the root whole, and the tree grows by one leaf per round after it.

*At capacity.* When all ``capacity`` slots are live the tree stops growing: the chosen
region is played without being split (``S^{t+1} = S^t``, Algorithm 1 line 10), the
partition is frozen, and S-UCB goes on as a finite-armed discounted UCB over the
existing regions. Nothing is merged or evicted.

*Discounting and the size of the tree.* With discount lambda the total count ``n_t`` of
Eq. 5 saturates at ``lambda / (1 - lambda)`` (9 for 0.9), and is shared by all leaves.
When the tree has many more leaves than that, every padding ``c_t`` stays large and the
agent keeps exploring almost uniformly; concentrating on a good region needs
``1 / (1 - lambda)`` well above the number of leaves (e.g. lambda >= 0.99 for up to ~64
leaves), a coarser ``delta`` / smaller ``capacity``, or a smaller ``exploration`` scale
matched to the rewards' spread (the padding has reward units of 1). ``lambda = 1`` is
the undiscounted UCB on a stationary surface.

*Randomness.* ``select(state, key)`` gives agent ``i`` the stream
``fold_in(key, state.stream[i])``, where ``stream`` is a per-agent id fixed by
:func:`init` (a random offset from the init key plus the agent index). An agent's draws
therefore depend only on its own state and the round key: one agent run alone (a state
sliced to one agent) draws exactly what it draws inside its fleet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedspine_jax.config import Config

# Our tuned settings (BENCHMARKS.md, sweeps): the schedule floor, the "log" reward and a
# padding scale matched to its spread. The defaults of config.BanditConfig are the paper's
# (arm_space "paper", reward "paper", exploration 1.0); a config or strategy that wants
# ours sets these ``bandit.*`` keys, e.g. ``replace(cfg, bandit=TUNED)``.
TUNED = {"arm_space": "floor", "reward": "log", "exploration": 0.01}

# Counts below this are treated as zero (unvisited): a region not played for so long that
# its discounted count underflows is explored again, and S/N never divides by a denormal.
_MIN_COUNT = 1e-30

# Relative guard of Eq. 3's time gap: Delta T is replaced by Delta T + eps with
# eps = TIME_EPS_REL * mean_j T_j. Deviations below ~5% of the mean completion time are
# within measurement noise (the simulated bandwidth alone varies by 20%), and the guard caps
# the reward ratio between a device exactly on the mean and one x * mean away at 1 + x / 0.05.
TIME_EPS_REL = 0.05
# Absolute lower bound (seconds) of that guard, so that all-zero times stay finite.
TIME_EPS_ABS = 1e-6
# Every input of Eq. 3 is clipped to [-REWARD_INPUT_LIMIT, REWARD_INPUT_LIMIT] (far beyond
# any statistic federation.Federation.accept lets through), and the dp floor is at least
# DP_FLOOR_MIN, so no finite input drives the float32 arithmetic of :func:`reward` to Inf
# or NaN: |R| <= REWARD_INPUT_LIMIT**3 / TIME_EPS_ABS = 1e30 (float32 reaches 3.4e38).
REWARD_INPUT_LIMIT = 1e8
DP_FLOOR_MIN = 1e-6
_F32_MAX = float(jnp.finfo(jnp.float32).max)


@struct.dataclass
class BanditParams:
    """The hyperparameters of S-UCB agents, as array leaves (taken from :class:`Config`).

    Every field is an array, not static metadata, so agents of different configurations
    share one traced program: a sweep stacks the params of its configurations along a
    leading axis and ``jax.vmap`` s over it. A fleet's params are scalars (one
    configuration for all its agents); rank sets of different sizes are padded to one
    length ``K`` with copies of their last rank and carry their valid count.

    Attributes:
        discount: float32 ``()``: lambda of Eq. 4-5 (``bandit.discount``).
        delta: float32 ``()``: regions are split while their normalised diameter exceeds it.
        exploration: float32 ``()``: scale of the padding c_t of Eq. 5 (1.0 is the paper's).
        rank_choices: int32 ``(K,)``: the ranks an agent may assign, sorted
            (``lora.rank_choices``), padded with the last rank.
        num_ranks: int32 ``()``: valid entries of ``rank_choices``.
        target_ratio: float32 ``()``: pruning ratio every device reaches
            (``pruning.target_ratio``).
        target_round: int32 ``()``: round by which it is reached (``pruning.target_round``);
            only the ``"floor"`` arm space enforces it.
        floor: bool ``()``: the ``"floor"`` arm space (with our schedule floor) rather than
            the ``"paper"`` one (``[p^{t-1}, target]``); ``bandit.arm_space``, module note.
        log_reward: bool ``()``: Eq. 3's ``"log"`` variant rather than ``"paper"``
            (``bandit.reward``, :func:`reward`).
        dp_floor: float32 ``()``: the floor of Eq. 3's ``dp`` (:func:`reward`), computed
            from the pruning schedule in float64.
    """

    discount: jax.Array
    delta: jax.Array
    exploration: jax.Array
    rank_choices: jax.Array
    num_ranks: jax.Array
    target_ratio: jax.Array
    target_round: jax.Array
    floor: jax.Array
    log_reward: jax.Array
    dp_floor: jax.Array

    @classmethod
    def from_config(cls, cfg: Config, num_ranks: int | None = None) -> BanditParams:
        """The params of ``cfg`` (host arrays), the rank set padded to ``num_ranks``.

        Args:
            cfg: the experiment config (``bandit``, ``lora.rank_choices``, ``pruning``).
            num_ranks: length ``K`` of the padded rank set (default: the set's own size).
        """
        ranks = [int(r) for r in cfg.lora.rank_choices]
        k = len(ranks) if num_ranks is None else int(num_ranks)
        if k < len(ranks):
            raise ValueError(f"num_ranks={k} is shorter than the rank set {ranks}")
        target, rounds = float(cfg.pruning.target_ratio), int(cfg.pruning.target_round)
        dp_floor = max(target / rounds, DP_FLOOR_MIN) if target > 0 else 1.0
        return cls(discount=np.float32(cfg.bandit.discount),
                   delta=np.float32(cfg.bandit.delta),
                   exploration=np.float32(cfg.bandit.exploration),
                   rank_choices=np.array(ranks + ranks[-1:] * (k - len(ranks)), np.int32),
                   num_ranks=np.int32(len(ranks)), target_ratio=np.float32(target),
                   target_round=np.int32(rounds),
                   floor=np.bool_(cfg.bandit.arm_space == "floor"),
                   log_reward=np.bool_(cfg.bandit.reward == "log"),
                   dp_floor=np.float32(dp_floor))


@struct.dataclass
class BanditState:
    """S-UCB agents of a fleet: arrays only, leading axis = agents (``A``), ``C`` = capacity.

    The state is a pytree of arrays only, so it goes through ``jax.jit`` / ``jax.vmap`` /
    ``lax.scan`` as plain arrays; the capacity ``C`` is the shape of its slot arrays.

    Attributes:
        params: the fleet's :class:`BanditParams` (scalar leaves, shared by its agents; not
            part of a checkpoint, they come from the config).
        round: int32 ``(A,)``: rounds decided so far (the last ``select`` was round ``round``).
        last_p: float32 ``(A,)``: the pruning ratio p^{t-1} chosen last (0 before round 1).
        last_u: float32 ``(A,)``: normalised p-coordinate of the last arm, the fraction of
            that round's p headroom taken.
        last_leaf: int32 ``(A,)``: slot of the leaf holding the last arm (credited by update).
        num_leaves: int32 ``(A,)``: live leaves (slots ``[0, num_leaves)``).
        stream: uint32 ``(A,)``: per-agent random stream id.
        u_lo, u_hi: float32 ``(A, C)``: leaf bounds along the normalised p axis.
        b_lo, b_hi: int32 ``(A, C)``: leaf range ``[b_lo, b_hi)`` of rank-choice indices.
        count: float32 ``(A, C)``: discounted play count N_t(lambda, S_j) of Eq. 4.
        reward_sum: float32 ``(A, C)``: discounted reward sum, numerator of Eq. 4.
    """

    params: BanditParams
    round: jax.Array
    last_p: jax.Array
    last_u: jax.Array
    last_leaf: jax.Array
    num_leaves: jax.Array
    stream: jax.Array
    u_lo: jax.Array
    u_hi: jax.Array
    b_lo: jax.Array
    b_hi: jax.Array
    count: jax.Array
    reward_sum: jax.Array


def init(cfg: Config, num_agents: int, key: jax.Array,
         params: BanditParams | None = None) -> BanditState:
    """Fresh agents, each with one unvisited root region covering the whole arm space.

    Args:
        cfg: the experiment config (``bandit.capacity``; the params' sections).
        num_agents: number of agents ``A`` (one per device).
        key: PRNG key; fixes the agents' random stream ids.
        params: the agents' hyperparameters (default ``BanditParams.from_config(cfg)``);
            a sweep passes one configuration of its stack (traced under ``jax.vmap``).

    Returns:
        A :class:`BanditState` with leading axis ``A``.
    """
    if params is None:
        params = BanditParams.from_config(cfg)
    params = jax.tree.map(jnp.asarray, params)
    a, c = int(num_agents), int(cfg.bandit.capacity)
    base = jax.random.bits(key, (), jnp.uint32)
    zeros_f = jnp.zeros((a, c), jnp.float32)
    zeros_i = jnp.zeros((a, c), jnp.int32)
    root = jnp.arange(c) == 0
    return BanditState(
        params=params,
        round=jnp.zeros((a,), jnp.int32),
        last_p=jnp.zeros((a,), jnp.float32),
        last_u=jnp.zeros((a,), jnp.float32),
        last_leaf=jnp.zeros((a,), jnp.int32),
        num_leaves=jnp.ones((a,), jnp.int32),
        stream=base + jnp.arange(a, dtype=jnp.uint32),
        u_lo=zeros_f,
        u_hi=jnp.broadcast_to(root.astype(jnp.float32), (a, c)),
        b_lo=zeros_i,
        b_hi=jnp.broadcast_to(jnp.where(root, params.num_ranks, 0).astype(jnp.int32), (a, c)),
        count=zeros_f,
        reward_sum=zeros_f,
    )


def _p_range(params: BanditParams, t: jax.Array, last_p: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """Pruning-ratio interval of round ``t`` (1-based): ``[p_lo, max(target, p_lo)]``.

    ``p_lo = p^{t-1}`` for the ``"paper"`` arm space, ``max(p^{t-1}, floor_t)`` with the
    schedule floor ``floor_t = target * min(t / target_round, 1)`` for ``"floor"``.
    """
    target = params.target_ratio
    frac = jnp.minimum(t.astype(jnp.float32) / params.target_round.astype(jnp.float32), 1.0)
    # At frac == 1 the floor is exactly `target` (no rounding), so p hits the target.
    floor = jnp.where(frac >= 1.0, target, target * frac)
    p_lo = jnp.where(params.floor, jnp.maximum(last_p, floor), last_p)
    return p_lo, jnp.maximum(target, p_lo)


def p_bounds(state: BanditState) -> tuple[jax.Array, jax.Array]:
    """The interval ``[p_lo, p_hi]`` the next :func:`select` draws pruning ratios from.

    ``p_lo`` is ``state.last_p`` (``"paper"`` arm space) or that raised to the schedule
    floor (``"floor"``); ``p_hi = max(target_ratio, p_lo)``.

    Returns:
        ``(p_lo, p_hi)``, float32 ``(A,)`` each.
    """
    return _p_range(state.params, state.round + 1, state.last_p)


def arm_draws(state: BanditState, key: jax.Array) -> jax.Array:
    """The uniforms :func:`select` consumes: agent i's ``(u, rank)`` draws in ``[0, 1)``.

    Returns:
        float32 ``(A, 2)``; column 0 places ``u`` in the chosen region, column 1 the rank.
    """
    return jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(key, s), (2,)))(
        state.stream)


def _upper_bounds(params: BanditParams, count: jax.Array, reward_sum: jax.Array,
                  live: jax.Array) -> jax.Array:
    """Eq. 4-6 for one agent: ``U_j = Rbar_j + c_j`` over its ``(C,)`` leaf slots.

    Unvisited live leaves get ``+inf``, free slots ``-inf``.
    """
    visited = count > _MIN_COUNT
    safe = jnp.where(visited, count, 1.0)
    # Eq. 5 needs log n_t >= 0; n_t = sum_j N_t < 1 happens in the first rounds of a
    # discounted agent (n_2 = lambda). Decision: clamp n_t at 1, i.e. no padding until one
    # full discounted play has accumulated (unvisited regions are still played first).
    log_n = jnp.log(jnp.maximum(jnp.sum(count), 1.0))
    pad = params.exploration * jnp.sqrt(2.0 * log_n / safe)
    u = jnp.where(visited, reward_sum / safe + pad, jnp.inf)
    return jnp.where(live, u, -jnp.inf)


def _first_argmax(x: jax.Array) -> jax.Array:
    """Index of the first maximum of a ``(C,)`` vector (``jnp.argmax`` semantics, no NaN).

    Written as a max followed by a min over matching indices: two plain reductions that
    XLA:CPU vectorises, where ``jnp.argmax``'s (value, index) reduction is much slower
    (it dominated the whole select step; benchmarks/bandit.py).
    """
    idx = jnp.arange(x.shape[-1], dtype=jnp.float32)
    hit = x == jnp.max(x)
    return jnp.min(jnp.where(hit, idx, jnp.float32(x.shape[-1] - 1))).astype(jnp.int32)


def _select_agent(params: BanditParams, s: BanditState, draw: jax.Array
                  ) -> tuple[BanditState, jax.Array, jax.Array]:
    """Algorithm 1 lines 2-10 for one agent (fields unbatched: scalars and ``(C,)``)."""
    cap, k = s.count.shape[-1], params.num_ranks
    t = s.round + 1
    p_lo, p_hi = _p_range(params, t, s.last_p)
    headroom = p_hi - p_lo

    # Lines 2-5: the live region with the largest upper bound (first one on ties).
    live = jnp.arange(cap) < s.num_leaves
    j = _first_argmax(_upper_bounds(params, s.count, s.reward_sum, live))
    u_lo, u_hi, b_lo, b_hi = s.u_lo[j], s.u_hi[j], s.b_lo[j], s.b_hi[j]
    n_j, r_j = s.count[j], s.reward_sum[j]

    # Line 6: an arm drawn uniformly inside it.
    u = jnp.minimum(u_lo + draw[0] * (u_hi - u_lo), u_hi)
    span = b_hi - b_lo
    b = b_lo + jnp.minimum(jnp.floor(draw[1] * span).astype(jnp.int32), span - 1)
    p = jnp.clip(p_lo + u * headroom, p_lo, p_hi)
    r = params.rank_choices[b]

    # Lines 7-10: split into halves along the longer normalised side while the diameter
    # exceeds delta and a free slot remains, once the region holds an observation.
    positive = params.target_ratio > 0
    p_scale = jnp.where(positive, 1.0 / jnp.where(positive, params.target_ratio, 1.0), 0.0)
    side_u = (u_hi - u_lo) * headroom * p_scale
    side_b = jnp.where(span > 1, span.astype(jnp.float32) / k.astype(jnp.float32), 0.0)
    split = ((side_u * side_u + side_b * side_b > params.delta * params.delta)
             & (s.num_leaves < cap) & (n_j > _MIN_COUNT))
    along_b = side_b >= side_u
    u_mid = 0.5 * (u_lo + u_hi)
    b_mid = (b_lo + b_hi) // 2
    cut_u = split & ~along_b
    cut_b = split & along_b
    upper = jnp.where(along_b, b >= b_mid, u >= u_mid)
    new = s.num_leaves  # slot of the upper half

    new_or_none = jnp.where(split, new, cap)  # out of range: the write is dropped
    half = jnp.where(split, 0.5, 1.0)

    def put(field, lower_val, upper_val):
        # Two single-slot writes (a scatter once vmapped): faster on CPU than rewriting
        # every slot with a where over the capacity axis (benchmarks/bandit.py).
        return field.at[j].set(lower_val).at[new_or_none].set(upper_val, mode="drop")

    out = s.replace(
        round=t,
        last_p=p,
        last_u=u,
        last_leaf=jnp.where(split & upper, new, j).astype(jnp.int32),
        num_leaves=s.num_leaves + split.astype(jnp.int32),
        u_lo=put(s.u_lo, u_lo, jnp.where(cut_u, u_mid, u_lo)),
        u_hi=put(s.u_hi, jnp.where(cut_u, u_mid, u_hi), u_hi),
        b_lo=put(s.b_lo, b_lo, jnp.where(cut_b, b_mid, b_lo)),
        b_hi=put(s.b_hi, jnp.where(cut_b, b_mid, b_hi), b_hi),
        count=put(s.count, half * n_j, half * n_j),
        reward_sum=put(s.reward_sum, half * r_j, half * r_j),
    )
    return out, p, r


@jax.jit
def select(state: BanditState, key: jax.Array) -> tuple[BanditState, jax.Array, jax.Array]:
    """Decide round ``t = state.round + 1`` for every agent (Algorithm 1 lines 2-10).

    Each agent plays its live region with the largest ``U = Rbar + c`` (Eq. 4-6), draws
    an arm uniformly inside it, maps it to ``(p, r)`` and splits the region (see the
    module note). Guarantees, with either arm space, ``state.last_p <= p <=
    max(target_ratio, state.last_p)`` (``p`` never decreases) and ``r in rank_choices``.
    The ``"floor"`` arm space also guarantees ``p >= target_ratio * min(t / target_round,
    1)``, so ``p == target_ratio`` from round ``target_round`` on; the ``"paper"`` arm
    space (Algorithm 1) sets no pace: ``p`` may be anywhere in ``[p^{t-1}, target_ratio]``.

    Args:
        state: agents, leading axis ``A``.
        key: PRNG key of this round; agent i uses ``fold_in(key, state.stream[i])``.

    Returns:
        ``(state, p, r)``: the advanced state, pruning ratios float32 ``(A,)`` and
        LoRA ranks int32 ``(A,)``.
    """
    draws = arm_draws(state, key)
    params = state.params
    out, p, r = jax.vmap(functools.partial(_select_agent, params))(
        state.replace(params=None), draws)
    return out.replace(params=params), p, r


@jax.jit
def update(state: BanditState, reward: jax.Array) -> BanditState:
    """Feed each agent the reward of its last arm (Eq. 4's discounted statistics).

    With the paper's indexing ``N_t = sum_{s<t} lambda^{t-s} 1{arm_s in S}`` the newest
    observation already carries one factor lambda, so both sums become
    ``lambda * (old + new observation)``. The reward sums saturate at the float32 range
    instead of overflowing, so finite rewards (:func:`reward`'s are) keep the state finite;
    a NaN reward stays NaN (``Federation.close`` refuses to store such a state).

    Args:
        state: agents after :func:`select`, leading axis ``A``.
        reward: float ``(A,)``, the reward R of Eq. 3 of each agent's last arm.

    Returns:
        The state with updated ``count`` and ``reward_sum``.
    """
    lam = state.params.discount
    hit = jnp.arange(state.count.shape[-1]) == state.last_leaf[:, None]
    r = jnp.asarray(reward, jnp.float32)[:, None]
    reward_sum = lam * (state.reward_sum + jnp.where(hit, r, 0.0))
    return state.replace(count=lam * (state.count + hit.astype(jnp.float32)),
                         reward_sum=jnp.clip(reward_sum, -_F32_MAX, _F32_MAX))


def reward(loss_drop: jax.Array, delta_p: jax.Array, importance: jax.Array,
           times: jax.Array, params: BanditParams | Config) -> jax.Array:
    """Eq. 3, ``R_i = dF_i * dp_i * I(B_i^total) / dT_i``, for all devices of a round.

    ``dT_i = |T_i - mean_j T_j|`` (the mean over the last axis, i.e. over the devices of
    the round). Guards, decided here:

    * ``dp = 0``: ``dp`` is floored at the schedule's per-round step
      ``target_ratio / target_round`` (or 1 without pruning, ``target_ratio = 0``, which
      drops the factor). Reason: once a device has reached the target every arm has
      ``dp = 0`` and Eq. 3 would give every rank the reward 0, so the agent could no longer
      learn ranks; a floor keeps ``dF * I / dT`` ranking them, at the scale of a device
      pruning on schedule, and it also covers a device ahead of schedule standing still.
    * ``dT ~ 0``: ``dT + eps`` with ``eps = TIME_EPS_REL * mean_j T_j`` (at least
      ``TIME_EPS_ABS`` s), so a device exactly on the mean gets a large but finite reward.
    * Overflow: every input is clipped to ``+-REWARD_INPUT_LIMIT`` (a host array before its
      cast to float32, so ``1e300`` does not pass through Inf) and ``dp_floor`` is at least
      ``DP_FLOOR_MIN``; so no finite input gives Inf or NaN, and inputs inside the limit
      give the same numbers as without the clip.

    The ``"log"`` variant (``bandit.reward``, ``params.log_reward``) compresses every factor
    with ``log1p`` after making the two dimensioned ones relative:
    ``R = slog(dF) * log1p(I) * log1p(dp / dp_floor) / log1p((dT + eps) / eps)`` with
    ``slog(x) = sign(x) log1p(|x|)`` (a loss increase stays a penalty) and ``I`` clipped at
    0. The ``dp`` and ``dT`` factors are then ``>= log 2``, and the reward grows
    logarithmically instead of linearly in each factor, which keeps its scale near the O(1)
    padding of Eq. 5 across tasks and units.

    Args:
        loss_drop: ``(..., N)`` decrease of the local loss during the round, dF.
        delta_p: ``(..., N)`` pruning step ``p_i^t - p_i^{t-1}``.
        importance: ``(..., N)`` LoRA importance ``I(B_i^total)`` of Eq. 14.
        times: ``(..., N)`` completion times ``T_i`` (seconds).
        params: the agents' :class:`BanditParams` (``log_reward``, ``dp_floor``; scalar
            leaves, possibly traced), or the experiment config they come from.

    Returns:
        float32 ``(..., N)``, finite for finite inputs.
    """
    if isinstance(params, Config):
        params = BanditParams.from_config(params)
    loss_drop, delta_p, importance, times = map(
        _bounded, (loss_drop, delta_p, importance, times))
    dp_floor = jnp.asarray(params.dp_floor, jnp.float32)
    dp = jnp.maximum(delta_p, dp_floor)
    mean_t = jnp.mean(times, axis=-1, keepdims=True)
    eps = jnp.maximum(TIME_EPS_REL * mean_t, TIME_EPS_ABS)
    dt = jnp.abs(times - mean_t) + eps
    paper = loss_drop * dp * importance / dt
    slog_f = jnp.sign(loss_drop) * jnp.log1p(jnp.abs(loss_drop))
    log = (slog_f * jnp.log1p(jnp.maximum(importance, 0.0)) * jnp.log1p(dp / dp_floor)
           / jnp.log1p(dt / eps))
    # A traced switch (both variants are cheap), so the variant is data, not a program.
    return jnp.where(params.log_reward, log, paper)


def _bounded(x) -> jax.Array:
    """``x`` as float32 clipped to ``+-REWARD_INPUT_LIMIT``; a host array is clipped in
    float64 before the cast (a traced or device array, already float32, after it)."""
    lim = REWARD_INPUT_LIMIT
    if isinstance(x, jax.Array):
        return jnp.clip(jnp.asarray(x, jnp.float32), -lim, lim)
    return jnp.asarray(np.clip(np.asarray(x, np.float64), -lim, lim), jnp.float32)
