"""The registry of methods (fedspine_jax.strategies): everything that lists methods reads it,
and each policy computes what its docstring says."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedspine_jax import strategies
from fedspine_jax.config import FederationConfig, from_dict
from fedspine_jax.strategies import STRATEGIES


def test_every_list_of_methods_comes_from_the_registry():
    from fedspine_jax import report
    from fedspine_jax.simulation import method_specs

    field = next(f for f in FederationConfig.__dataclass_fields__.values()
                 if f.name == "strategy")
    assert field.metadata["choices"] == tuple(STRATEGIES)
    assert sorted(s.order for s in STRATEGIES.values()) == list(range(len(STRATEGIES)))
    assert strategies.TABLE_ORDER[0] == "hetlora"    # the reference of Table 5, as the paper
    assert method_specs(None) == [(m, 1) for m in strategies.COMPARE]
    assert strategies.COMPARE == ("fedspine", "hetlora", "fedlora_prune", "llmpruner_fedlora",
                                  "fedapt")
    assert method_specs("ablations") == [("fedspine_no_ap", 1), ("fedspine_no_at", 1)]
    assert report.METHOD_COLORS == {m: s.color for m, s in STRATEGIES.items()}
    assert len(set(report.METHOD_COLORS.values())) == len(STRATEGIES)


def test_config_and_registry_load_without_jax():
    code = ("import sys, fedspine_jax.config, fedspine_jax.report, fedspine_jax.metrics; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_tuned_strategy_overrides_the_bandit_with_bandit_tuned():
    from fedspine_jax.bandit import TUNED

    assert STRATEGIES["fedspine_tuned"].bandit == tuple(sorted(TUNED.items()))
    assert all(s.bandit == () for m, s in STRATEGIES.items() if m != "fedspine_tuned")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_configure_follows_the_policies(name):
    cfg = from_dict({"lora": {"rank": 8, "rank_choices": [2, 4, 8]},
                     "pruning": {"target_ratio": 0.5, "target_round": 4}})
    s = STRATEGIES[name]
    tiers = np.array([0, 1, 2, 2])
    bp, br = np.array([0.1, 0.2, 0.3, 0.4]), np.array([2, 4, 8, 2])
    for t in (1, 2, 4, 6):
        p, r = s.configure(cfg, t, bp if s.uses_bandit else None,
                           br if s.uses_bandit else None, tiers)
        assert p.dtype == np.float32 and r.dtype == np.int32 and p.shape == r.shape == (4,)
        expect_p = {"bandit": bp, "none": np.zeros(4),
                    "schedule": np.full(4, 0.5 * min(1.0, t / 4))}[s.ratio_policy.name]
        np.testing.assert_array_equal(p, expect_p.astype(np.float32))
        expect_r = {"bandit": br, "global": np.full(4, 8), "capability": [8, 4, 2, 2],
                    "growing": np.full(4, {1: 2, 2: 2, 4: 8, 6: 8}[t])}[s.rank_policy.name]
        np.testing.assert_array_equal(r, expect_r)
    assert s.prunes == (s.ratio_policy.name != "none")


def test_weights_of_each_aggregator():
    cfg = from_dict({})
    imp, n = np.array([1.0, 3.0]), np.array([10, 30])
    np.testing.assert_allclose(STRATEGIES["fedlora_prune"].weights(cfg, imp, n), [0.25, 0.75])
    assert np.isnan(STRATEGIES["hetlora"].weights(cfg, imp, n)).all()
    w = STRATEGIES["fedspine"].weights(cfg, imp, n)
    assert w.shape == (2,) and w[1] > w[0] and np.isclose(w.sum(), 1.0)
