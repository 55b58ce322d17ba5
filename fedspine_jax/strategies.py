"""FedSpine, its ablations and the paper's baselines: one registry of methods.

Design note
-----------
Every method (paper sections 5.2-5.3) is registered once, in :data:`STRATEGIES`, with all
there is to know about it:

* how it chooses each device's pruning ratio p_i (a :class:`RatioPolicy`) and LoRA rank r_i
  (a :class:`RankPolicy`) for a round (:meth:`Strategy.configure`),
* how a device scores structural groups (the ``criterion`` of ``train.train_step``),
* how the server aggregates the devices' LoRA updates (an :class:`Aggregator`),
* how it is shown and grouped: its label and colour in tables and figures, its row in the
  report's Table 5, whether ``fedspine compare`` runs it by default, whether it is an
  ablation of FedSpine.

Everything else that lists methods reads this registry: the config's ``federation.strategy``
choices (:data:`NAMES`), the report's order, labels and colours (:data:`TABLE_ORDER`), and
``fedspine compare``'s default set and ``ablations`` keyword (:data:`COMPARE`,
:data:`ABLATIONS`).

The round logic itself lives only in ``federation``; a strategy holds no state of its own
(the bandit state travels in the federation state). The config and the report read the
registry, so this module imports no JAX when it loads: the aggregators import
``aggregation`` and the tuned strategy reads ``bandit.TUNED`` when they are used.

The uniform schedule prunes progressively, ``p_t = target * min(1, t / target_round)``, the
same for all devices (section 5.2: all pruning baselines prune iteratively). HETLoRA's ranks
follow the device's capability tier (strongest -> largest rank in ``lora.rank_choices``).
FedAPT's adaptive tuning (APT adds tuning parameters as training goes) is modelled as a
rank that grows through ``lora.rank_choices`` up to R by ``target_round``, equal for all.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from fedspine_jax.config import Config


# ---------------------------------------------------------------------------------------
# Pruning-ratio policies: p (N,) float32 for round t


class RatioPolicy:
    """How a method sets the devices' pruning ratios p_i in a round."""
    name: ClassVar[str]                 # short name of the policy
    uses_bandit: ClassVar[bool] = False  # p_i comes from S-UCB
    prunes: ClassVar[bool] = True        # some round may have p_i > 0

    def __call__(self, cfg: Config, round_t: int, bandit_p: np.ndarray | None,
                 n: int) -> np.ndarray:
        """(n,) float32 ratios of round ``round_t`` (1-based); ``bandit_p`` (n,) holds the
        bandit's choices when the strategy runs the bandit, else None."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class BanditRatio(RatioPolicy):
    """p_i chosen by S-UCB (Algorithm 1)."""
    name = "bandit"
    uses_bandit = True

    def __call__(self, cfg, round_t, bandit_p, n):
        return np.asarray(bandit_p, np.float32)


@dataclasses.dataclass(frozen=True)
class NoPruning(RatioPolicy):
    """p_i = 0: the model is never pruned (HETLoRA, FedSpine w/o A_P)."""
    name = "none"
    prunes = False

    def __call__(self, cfg, round_t, bandit_p, n):
        return np.zeros(n, np.float32)


@dataclasses.dataclass(frozen=True)
class UniformSchedule(RatioPolicy):
    """``p_t = target_ratio * min(1, t / target_round)`` for every device."""
    name = "schedule"

    def __call__(self, cfg, round_t, bandit_p, n):
        target, t_end = cfg.pruning.target_ratio, cfg.pruning.target_round
        return np.full(n, target * min(1.0, round_t / t_end), np.float32)


# ---------------------------------------------------------------------------------------
# Rank policies: r (N,) int32 for round t


class RankPolicy:
    """How a method sets the devices' LoRA ranks r_i in a round."""
    name: ClassVar[str]                  # short name of the policy
    uses_bandit: ClassVar[bool] = False  # r_i comes from S-UCB

    def __call__(self, cfg: Config, round_t: int, bandit_r: np.ndarray | None,
                 tiers: np.ndarray) -> np.ndarray:
        """(N,) integer ranks of round ``round_t`` (1-based).

        Args:
          bandit_r: (N,) the bandit's choices when the strategy runs the bandit, else None.
          tiers: (N,) device capability tier, 0 = strongest.
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class BanditRank(RankPolicy):
    """r_i chosen by S-UCB (Algorithm 1)."""
    name = "bandit"
    uses_bandit = True

    def __call__(self, cfg, round_t, bandit_r, tiers):
        return np.asarray(bandit_r, np.int32)


@dataclasses.dataclass(frozen=True)
class GlobalRank(RankPolicy):
    """r_i = R, the global rank, for every device in every round."""
    name = "global"

    def __call__(self, cfg, round_t, bandit_r, tiers):
        return np.full(len(tiers), cfg.lora.rank, np.int32)


@dataclasses.dataclass(frozen=True)
class CapabilityRank(RankPolicy):
    """HETLoRA: the strongest tier gets the largest of ``lora.rank_choices``, the weakest
    the smallest, tiers in between evenly spaced."""
    name = "capability"

    def __call__(self, cfg, round_t, bandit_r, tiers):
        choices = np.asarray(cfg.lora.rank_choices, np.int32)
        worst = max(int(tiers.max()), 1)
        idx = np.rint((1.0 - tiers / worst) * (len(choices) - 1)).astype(int)
        return choices[idx]


@dataclasses.dataclass(frozen=True)
class GrowingRank(RankPolicy):
    """FedAPT: one rank for all, climbing ``lora.rank_choices`` (then R) evenly until
    ``pruning.target_round``."""
    name = "growing"

    def __call__(self, cfg, round_t, bandit_r, tiers):
        choices = np.asarray(cfg.lora.rank_choices, np.int32)
        t_end = cfg.pruning.target_round
        ladder = np.append(choices, cfg.lora.rank) if choices[-1] < cfg.lora.rank else choices
        step = int(min(len(ladder) - 1, (round_t - 1) * len(ladder) // max(t_end, 1)))
        return np.full(len(tiers), ladder[step], np.int32)


# ---------------------------------------------------------------------------------------
# Aggregators: the devices' updates of one linear -> global factors at rank R


class Aggregator:
    """How the server merges the devices' LoRA updates of one linear."""
    name: ClassVar[str]   # short name of the aggregator

    def weights(self, cfg: Config, importances: np.ndarray, num_samples: np.ndarray
                ) -> np.ndarray:
        """(n,) the weight each reporting device's update gets, or NaN where the weight
        differs per linear.

        Args:
          importances: (n,) I(B_total) of Eq. 14; num_samples: (n,) local data sizes.
        """
        raise NotImplementedError

    def __call__(self, cfg: Config, a_list: list, b_list: list, importances: np.ndarray,
                 num_samples: np.ndarray, col_masks=None, row_masks=None) -> tuple:
        """Aggregate one linear's updates into global factors of rank ``cfg.lora.rank``.

        Args:
          a_list, b_list: per device ``a_i (d, r_i)`` and ``b_i (r_i, k)`` with the LoRA
            scaling folded into ``b_i`` (so ``a_i @ b_i`` is the effective update).
          importances: (n,) I(B_total) of Eq. 14; num_samples: (n,) local data sizes.
          col_masks, row_masks: (n, k) / (n, d) 0/1 masks of the columns / rows each device
            still keeps, for the mask-aware variant (None: not applicable to this linear).
        Returns:
          (a, b) at the global rank, scaling still folded into ``b``.
        """
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ImportanceWeighted(Aggregator):
    """FedSpine, Eq. 15-16: the sum of the updates weighted by c_i (normalised LoRA
    importance), refactorised to rank R; mask-aware when ``aggregation.mask_aware``."""
    name = "fedspine"

    def weights(self, cfg, importances, num_samples):
        import jax.numpy as jnp

        from fedspine_jax import aggregation

        return np.asarray(aggregation.aggregation_weights(jnp.asarray(importances),
                                                          cfg.aggregation.scaling))

    def __call__(self, cfg, a_list, b_list, importances, num_samples, col_masks=None,
                 row_masks=None):
        import jax.numpy as jnp

        from fedspine_jax import aggregation

        rank = cfg.lora.rank
        w = jnp.asarray(self.weights(cfg, importances, num_samples))
        if cfg.aggregation.mask_aware and (col_masks is not None or row_masks is not None):
            return aggregation.aggregate_lora_masked(a_list, b_list, w, rank,
                                                     col_masks=col_masks, row_masks=row_masks)
        return aggregation.aggregate_lora(a_list, b_list, w, rank)


@dataclasses.dataclass(frozen=True)
class FedAvg(Aggregator):
    """FedAvg of the factors, weighted by the devices' data shares, padded to rank R (FedAPT
    trains below R early on)."""
    name = "fedavg"

    def weights(self, cfg, importances, num_samples):
        n = np.asarray(num_samples, np.float64)
        return (n / n.sum()).astype(np.float32)

    def __call__(self, cfg, a_list, b_list, importances, num_samples, col_masks=None,
                 row_masks=None):
        import jax.numpy as jnp

        from fedspine_jax import aggregation

        w = jnp.asarray(self.weights(cfg, importances, num_samples))
        a, b = aggregation.fedavg_lora(a_list, b_list, w)
        return aggregation.pad_lora(a, b, cfg.lora.rank)


@dataclasses.dataclass(frozen=True)
class HetLoRAAggregation(Aggregator):
    """HETLoRA (Cho et al.): each update first drops its rank components carrying less than
    ``gamma`` of its norm (rank self-pruning), then the sparsity-weighted aggregate."""
    name = "hetlora"
    gamma: float = 0.01   # rank self-pruning threshold (fraction of the update's norm)

    def weights(self, cfg, importances, num_samples):
        return np.full(len(importances), np.nan, np.float32)

    def __call__(self, cfg, a_list, b_list, importances, num_samples, col_masks=None,
                 row_masks=None):
        from fedspine_jax import aggregation

        pruned = [aggregation.hetlora_self_prune(a, b, self.gamma)
                  for a, b in zip(a_list, b_list)]
        return aggregation.hetlora_aggregate([x[0] for x in pruned], [x[1] for x in pruned],
                                             cfg.lora.rank)


# ---------------------------------------------------------------------------------------
# Strategies and the registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy:
    name: str                   # the ``federation.strategy`` value (and run directory name)
    label: str                  # display name in tables and legends (paper spelling)
    color: str                  # matplotlib colour of the method in every figure
    order: int                  # row in the report's Table 5 and legends; 0 is the reference
    ratio_policy: RatioPolicy   # p_i
    rank_policy: RankPolicy     # r_i
    criterion: str              # device group-importance criterion (train.CRITERIA)
    aggregator: Aggregator
    tuned_bandit: bool = False  # S-UCB with bandit.TUNED over the config's bandit section
    compare: bool = False       # in ``fedspine compare``'s default set
    ablation: bool = False      # an ablation of FedSpine (``--methods ablations``)

    @property
    def uses_bandit(self) -> bool:
        return self.ratio_policy.uses_bandit or self.rank_policy.uses_bandit

    @property
    def prunes(self) -> bool:
        return self.ratio_policy.prunes

    @property
    def bandit(self) -> tuple:
        """(key, value) pairs that override the config's bandit section."""
        if not self.tuned_bandit:
            return ()
        from fedspine_jax.bandit import TUNED

        return tuple(sorted(TUNED.items()))

    def configure(self, cfg: Config, round_t: int, bandit_p: np.ndarray | None,
                  bandit_r: np.ndarray | None, tiers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pruning ratios and ranks of round ``round_t`` (1-based) for every device.

        Args:
          bandit_p, bandit_r: (N,) the bandit's choices when the strategy uses it.
          tiers: (N,) device capability tier, 0 = strongest (used by HETLoRA).
        Returns:
          p (N,) float32, r (N,) int32.
        """
        p = self.ratio_policy(cfg, round_t, bandit_p, len(tiers))
        r = self.rank_policy(cfg, round_t, bandit_r, tiers)
        return p, r.astype(np.int32)

    def weights(self, cfg: Config, importances: np.ndarray, num_samples: np.ndarray
                ) -> np.ndarray:
        """(n,) the weight each reporting device's update gets in :meth:`aggregate`: Eq. 16's
        c_i (FedSpine), the data share (FedAvg), or NaN where the weight differs per linear
        (HETLoRA's sparsity weights)."""
        return self.aggregator.weights(cfg, importances, num_samples)

    def aggregate(self, cfg: Config, a_list: list, b_list: list, importances: np.ndarray,
                  num_samples: np.ndarray, col_masks=None, row_masks=None) -> tuple:
        """One linear's updates -> global factors at rank R (see :meth:`Aggregator.__call__`
        for the arguments' shapes)."""
        return self.aggregator(cfg, a_list, b_list, importances, num_samples, col_masks,
                               row_masks)


# Registry order: the config's choices and ``fedspine compare``'s run order (FedSpine first).
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy(name="fedspine", label="FedSpine", color="#d62728", order=4,
             ratio_policy=BanditRatio(), rank_policy=BanditRank(), criterion="lora",
             aggregator=ImportanceWeighted(), compare=True),
    # FedSpine with our tuned S-UCB (schedule floor, log reward, small padding)
    Strategy(name="fedspine_tuned", label="FedSpine (tuned S-UCB)", color="#e377c2", order=5,
             ratio_policy=BanditRatio(), rank_policy=BanditRank(), criterion="lora",
             aggregator=ImportanceWeighted(), tuned_bandit=True),
    Strategy(name="fedspine_no_ap", label="FedSpine w/o AP", color="#ff7f0e", order=6,
             ratio_policy=NoPruning(), rank_policy=BanditRank(), criterion="lora",
             aggregator=ImportanceWeighted(), ablation=True),
    Strategy(name="fedspine_no_at", label="FedSpine w/o AT", color="#17becf", order=7,
             ratio_policy=BanditRatio(), rank_policy=GlobalRank(), criterion="lora",
             aggregator=ImportanceWeighted(), ablation=True),
    # the reference of the report's relative figures, as in the paper's Table 5
    Strategy(name="hetlora", label="HETLoRA", color="#7f7f7f", order=0,
             ratio_policy=NoPruning(), rank_policy=CapabilityRank(), criterion="lora",
             aggregator=HetLoRAAggregation(), compare=True),
    Strategy(name="fedlora_prune", label="FedLoRA+Prune", color="#2ca02c", order=1,
             ratio_policy=UniformSchedule(), rank_policy=GlobalRank(), criterion="fisher",
             aggregator=FedAvg(), compare=True),
    Strategy(name="llmpruner_fedlora", label="LLMPruner+FedLoRA", color="#9467bd", order=2,
             ratio_policy=UniformSchedule(), rank_policy=GlobalRank(), criterion="taylor",
             aggregator=FedAvg(), compare=True),
    Strategy(name="fedapt", label="FedAPT", color="#8c564b", order=3,
             ratio_policy=UniformSchedule(), rank_policy=GrowingRank(), criterion="taylor",
             aggregator=FedAvg(), compare=True),
)}

# Derived lists (nothing else spells the methods out)
NAMES = tuple(STRATEGIES)                                         # federation.strategy choices
TABLE_ORDER = tuple(sorted(STRATEGIES, key=lambda m: STRATEGIES[m].order))  # report rows
COMPARE = tuple(m for m, s in STRATEGIES.items() if s.compare)    # `fedspine compare` default
ABLATIONS = tuple(m for m, s in STRATEGIES.items() if s.ablation)  # `--methods ablations`


def get(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; allowed: {sorted(STRATEGIES)}")
    return STRATEGIES[name]
