"""FedSpine, its ablations and the paper's baselines behind one small interface.

A :class:`Strategy` is a frozen description of how a method (paper sections 5.2-5.3)

* chooses each device's pruning ratio p_i and LoRA rank r_i for a round (:meth:`configure`),
* scores structural groups on the device (the ``criterion`` of ``train.train_step``),
* aggregates the devices' LoRA updates into the global factors (:meth:`aggregate`).

The round logic itself lives only in ``federation``; a strategy holds no state of its own
(the bandit state travels in the federation state).

| method              | p_i                     | r_i                       | device criterion | aggregation |
|---------------------|-------------------------|---------------------------|------------------|-------------|
| fedspine            | S-UCB                   | S-UCB                     | LoRA-guided      | Eq. 15-16   |
| fedspine_tuned      | S-UCB, our tuned bandit | S-UCB, our tuned bandit   | LoRA-guided      | Eq. 15-16   |
| fedspine_no_ap      | 0 (no pruning)          | S-UCB                     | -                | Eq. 15-16   |
| fedspine_no_at      | S-UCB                   | global rank R (static)    | LoRA-guided      | Eq. 15-16   |
| hetlora             | 0 (no pruning)          | by device capability      | -                | HETLoRA     |
| fedlora_prune       | uniform schedule        | global rank R             | Fisher (masks)   | FedAvg      |
| llmpruner_fedlora   | uniform schedule        | global rank R             | first-order Taylor | FedAvg    |
| fedapt              | uniform schedule        | grows r_min -> R (APT)    | activation x grad | FedAvg     |

The uniform schedule prunes progressively, ``p_t = target * min(1, t / target_round)``, the
same for all devices (section 5.2: all pruning baselines prune iteratively). HETLoRA's ranks
follow the device's capability tier (strongest -> largest rank in ``lora.rank_choices``).
FedAPT's adaptive tuning (APT adds tuning parameters as training goes) is modelled as a
rank that grows through ``lora.rank_choices`` up to R by ``target_round``, equal for all.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from fedspine_jax import aggregation, bandit
from fedspine_jax.config import Config

# HETLoRA's rank self-pruning threshold gamma (Cho et al.): rank components carrying less
# than this fraction of the update's norm are dropped before aggregation.
HETLORA_GAMMA = 0.01


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    p_policy: str        # "bandit", "none" or "schedule"
    r_policy: str        # "bandit", "global", "capability" or "growing"
    criterion: str       # device group-importance criterion (train.CRITERIA)
    aggregator: str      # "fedspine", "fedavg" or "hetlora"
    bandit: tuple = ()   # (key, value) pairs that override the config's bandit section

    @property
    def uses_bandit(self) -> bool:
        return "bandit" in (self.p_policy, self.r_policy)

    @property
    def prunes(self) -> bool:
        return self.p_policy != "none"

    def configure(self, cfg: Config, round_t: int, bandit_p: np.ndarray | None,
                  bandit_r: np.ndarray | None, tiers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pruning ratios and ranks of round ``round_t`` (1-based) for every device.

        Args:
          bandit_p, bandit_r: (N,) the bandit's choices when the strategy uses it.
          tiers: (N,) device capability tier, 0 = strongest (used by HETLoRA).
        Returns:
          p (N,) float32, r (N,) int32.
        """
        n = len(tiers)
        target, t_end = cfg.pruning.target_ratio, cfg.pruning.target_round
        choices = np.asarray(cfg.lora.rank_choices, np.int32)
        if self.p_policy == "bandit":
            p = np.asarray(bandit_p, np.float32)
        elif self.p_policy == "none":
            p = np.zeros(n, np.float32)
        else:
            p = np.full(n, target * min(1.0, round_t / t_end), np.float32)
        if self.r_policy == "bandit":
            r = np.asarray(bandit_r, np.int32)
        elif self.r_policy == "global":
            r = np.full(n, cfg.lora.rank, np.int32)
        elif self.r_policy == "capability":
            worst = max(int(tiers.max()), 1)
            idx = np.rint((1.0 - tiers / worst) * (len(choices) - 1)).astype(int)
            r = choices[idx]
        else:  # growing (FedAPT)
            ladder = np.append(choices, cfg.lora.rank) if choices[-1] < cfg.lora.rank else choices
            step = int(min(len(ladder) - 1, (round_t - 1) * len(ladder) // max(t_end, 1)))
            r = np.full(n, ladder[step], np.int32)
        return p, r.astype(np.int32)

    def weights(self, cfg: Config, importances: np.ndarray, num_samples: np.ndarray
                ) -> np.ndarray:
        """(n,) the weight each reporting device's update gets in :meth:`aggregate`: Eq. 16's
        c_i (FedSpine), the data share (FedAvg), or NaN where the weight differs per linear
        (HETLoRA's sparsity weights)."""
        if self.aggregator == "fedspine":
            return np.asarray(aggregation.aggregation_weights(jnp.asarray(importances),
                                                              cfg.aggregation.scaling))
        if self.aggregator == "hetlora":
            return np.full(len(importances), np.nan, np.float32)
        n = np.asarray(num_samples, np.float64)
        return (n / n.sum()).astype(np.float32)

    def aggregate(self, cfg: Config, a_list: list, b_list: list, importances: np.ndarray,
                  num_samples: np.ndarray, col_masks=None, row_masks=None) -> tuple:
        """Aggregate one linear's updates into global factors of rank ``cfg.lora.rank``.

        Args:
          a_list, b_list: per device ``a_i (d, r_i)`` and ``b_i (r_i, k)`` with the LoRA
            scaling folded into ``b_i`` (so ``a_i @ b_i`` is the effective update).
          importances: (N,) I(B_total) of Eq. 14; num_samples: (N,) local data sizes.
          col_masks, row_masks: (N, k) / (N, d) 0/1 masks of the columns / rows each device
            still keeps, for the mask-aware variant (None: not applicable to this linear).
        Returns:
          (a, b) at the global rank, scaling still folded into ``b``.
        """
        rank = cfg.lora.rank
        if self.aggregator == "fedspine":
            w = jnp.asarray(self.weights(cfg, importances, num_samples))
            if cfg.aggregation.mask_aware and (col_masks is not None or row_masks is not None):
                return aggregation.aggregate_lora_masked(a_list, b_list, w, rank,
                                                         col_masks=col_masks,
                                                         row_masks=row_masks)
            return aggregation.aggregate_lora(a_list, b_list, w, rank)
        if self.aggregator == "hetlora":
            pruned = [aggregation.hetlora_self_prune(a, b, HETLORA_GAMMA)
                      for a, b in zip(a_list, b_list)]
            return aggregation.hetlora_aggregate([x[0] for x in pruned], [x[1] for x in pruned],
                                                 rank)
        w = jnp.asarray(self.weights(cfg, importances, num_samples))
        a, b = aggregation.fedavg_lora(a_list, b_list, w)
        return aggregation.pad_lora(a, b, rank)  # FedAPT trains below R early on


STRATEGIES = {
    "fedspine": Strategy("fedspine", "bandit", "bandit", "lora", "fedspine"),
    # FedSpine with our tuned S-UCB (schedule floor, log reward, small padding; bandit.TUNED)
    "fedspine_tuned": Strategy("fedspine_tuned", "bandit", "bandit", "lora", "fedspine",
                               tuple(sorted(bandit.TUNED.items()))),
    "fedspine_no_ap": Strategy("fedspine_no_ap", "none", "bandit", "lora", "fedspine"),
    "fedspine_no_at": Strategy("fedspine_no_at", "bandit", "global", "lora", "fedspine"),
    "hetlora": Strategy("hetlora", "none", "capability", "lora", "hetlora"),
    "fedlora_prune": Strategy("fedlora_prune", "schedule", "global", "fisher", "fedavg"),
    "llmpruner_fedlora": Strategy("llmpruner_fedlora", "schedule", "global", "taylor", "fedavg"),
    "fedapt": Strategy("fedapt", "schedule", "growing", "taylor", "fedavg"),
}


def get(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; allowed: {sorted(STRATEGIES)}")
    return STRATEGIES[name]
