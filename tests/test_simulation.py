"""End-to-end tests of the in-process simulator (fedspine_jax.simulation) on configs/tiny.yaml.

Each run is real (tiny random-init encoder, a slice of SST-2), so the runs are shared through
module-scoped fixtures: one plain ``simulate``, one ``compare`` of two methods, and one run
interrupted after two of its three rounds and resumed. The first run pays the JIT compiles;
the others reuse them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedspine_jax import checkpoint, heterogeneity, metrics, simulation
from fedspine_jax.config import dump_config, load_config
from fedspine_jax.errors import RunDirError
from fedspine_jax.federation import Federation
from fedspine_jax.models.state import flatten

ROUNDS, DEVICES = 3, 3
SUMMARY_KEYS = {"method", "seed", "eval_samples", "rounds", "final_accuracy",
                "final_sparsity", "simulated_time_s", "target_accuracy", "time_to_target_s", "mean_waiting_time_s",
                "training_peak_memory_bytes", "inference"}
# wall-clock measurements: the only fields two runs of one config may disagree on
WALL_CLOCK = {"measured_compute_s"}


@pytest.fixture(scope="module")
def tiny_cfg(shared_data, tiny_config_path):
    cfg = load_config(tiny_config_path, [f"data.source={shared_data / 'sst2'}"])
    assert (cfg.federation.rounds, cfg.federation.num_devices) == (ROUNDS, DEVICES)
    return cfg


@pytest.fixture(scope="module")
def plain_run(tiny_run):
    """``fedspine simulate tiny`` (conftest's session run): (out dir, summary, seconds)."""
    out, summary, _, seconds = tiny_run
    return out, summary, seconds


class _Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def resumed_run(tiny_cfg, plain_run, tmp_path_factory):
    """A run killed after writing round 3's metrics but before its checkpoint (so after two
    complete rounds, with a partial third one on disk), then resumed with ``resume=True``.

    ``run`` has no way to stop after k rounds, so the crash is injected into
    ``checkpoint.save``; the run directory is left exactly as a killed process leaves it.
    """
    out = tmp_path_factory.mktemp("sim") / "resumed"
    real_save = checkpoint.save

    def crashing_save(directory, step, *args, **kwargs):
        if step == ROUNDS:
            raise _Crash(f"killed before checkpoint {step}")
        return real_save(directory, step, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", crashing_save)
        with pytest.raises(_Crash):
            simulation.run(tiny_cfg, out, progress=False)
    on_disk = {"steps": checkpoint.steps(out / "checkpoints"),
               "rounds_logged": sorted({r["round"] for r in _rows(out)}),
               "summary_written": (out / "summary.json").exists()}
    summary = simulation.run(tiny_cfg, out, resume=True, progress=False)
    return out, summary, on_disk


@pytest.fixture(scope="module")
def compared(tiny_cfg, tmp_path_factory):
    """``fedspine compare`` of fedspine and hetlora; also records each run's Setup."""
    out = tmp_path_factory.mktemp("cmp")
    setups = {}
    real_setup = simulation.setup

    def spy(cfg):
        s = real_setup(cfg)
        setups[cfg.federation.strategy] = s
        return s

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation, "setup", spy)
        results = simulation.compare_runs(tiny_cfg, ["fedspine", "hetlora"], out,
                                          progress=False)
    return out, results, setups


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]


def _final(out: Path, cfg):
    fed = Federation(cfg, cfg.federation.num_devices)   # restoring needs no mask shapes
    return checkpoint.restore(out / "checkpoints", fed)


def _lora_bytes_per_rank(lora: dict) -> int:
    """Bytes of a LoRA at rank 1: sum over pairs of (d_in + d_out) float32 entries."""
    return 4 * sum(v.shape[0] if k.endswith("lora_a") else v.shape[1]
                   for k, v in flatten(lora).items())


# ------------------------------------------------------------------------- simulate


@pytest.mark.slow
def test_simulate_writes_every_file(plain_run, tiny_cfg):
    out, summary, seconds = plain_run
    print(f"tiny simulate (first run, compiles included): {seconds:.1f} s")
    assert load_config(out / "config.yaml") == tiny_cfg
    rows = _rows(out)
    assert len(rows) == DEVICES * ROUNDS + ROUNDS
    dev = [r for r in rows if not r.get("summary")]
    rnd = [r for r in rows if r.get("summary")]
    # every line is a row of the schema (fedspine_jax.metrics) and is written back verbatim
    typed = metrics.read_metrics(out / "metrics.jsonl")
    assert [json.dumps(x.to_json()) for x in typed] == \
        (out / "metrics.jsonl").read_text().splitlines()
    assert [isinstance(x, metrics.RoundRow) for x in typed] == [bool(r.get("summary"))
                                                                for r in rows]
    assert all(x.measured_compute_s is not None and x.no_update is None
               for x in typed if isinstance(x, metrics.DeviceRow))
    assert [(r["round"], r["device"]) for r in dev] == [
        (t, i) for t in range(1, ROUNDS + 1) for i in range(DEVICES)]
    assert [r["round"] for r in rnd] == list(range(1, ROUNDS + 1))
    choices = set(tiny_cfg.lora.rank_choices)
    for r in dev:
        assert r["r"] in choices and 0 <= r["p"] <= r["ratio"] + 1e-6 <= 1 + 1e-6
        assert r["completion_time"] == pytest.approx(r["compute_time"] + r["comm_time"])
        assert r["fits_memory"] and r["reward"] is not None and np.isfinite(r["reward"])
        assert 0 <= r["accuracy"] <= 1          # tiny evaluates every round
    for t in range(1, ROUNDS + 1):
        times = [r["completion_time"] for r in dev if r["round"] == t]
        assert rnd[t - 1]["round_time"] == pytest.approx(max(times))
    np.testing.assert_allclose(np.cumsum([r["round_time"] for r in rnd]),
                               [r["clock"] for r in rnd])
    # prune, then train: round 1 prunes nothing (no importance yet); later rounds reach
    # their planned ratio from above, within the arm space [p^{t-1}, target]
    assert all(r["p"] == 0 and r["ratio"] == 0 for r in dev if r["round"] == 1)
    later = [r for r in dev if r["round"] > 1]
    assert all(r["ratio"] >= r["p"] - 1e-6 for r in later)
    assert all(r["p"] <= tiny_cfg.pruning.target_ratio + 1e-6 for r in later)
    assert max(r["ratio"] for r in later) > 0

    written = json.loads((out / "summary.json").read_text())
    assert set(written) == SUMMARY_KEYS and written == summary
    assert written["method"] == "fedspine" and written["rounds"] == ROUNDS
    assert written["simulated_time_s"] == pytest.approx(rnd[-1]["clock"])
    assert written["final_accuracy"] == pytest.approx(rnd[-1]["accuracy"])
    assert written["inference"]["latency_s"] > 0 and written["inference"]["memory_bytes"] > 0

    assert checkpoint.steps(out / "checkpoints") == [1, 2, 3]
    state, extra, step = _final(out, tiny_cfg)
    assert step == ROUNDS and state.round == ROUNDS + 1 and state.updates == ()
    assert state.bandit is not None
    assert all(v.shape[1 if k.endswith("lora_a") else 0] == tiny_cfg.lora.rank
               for k, v in flatten(state.lora).items())
    np.testing.assert_allclose(state.last_p, [r["ratio"] for r in dev if r["round"] == ROUNDS],
                               rtol=1e-6)
    assert set(extra) == {"clock", "peak_memory"}   # the devices' records are in the state
    np.testing.assert_array_equal(state.devices.rank,
                                  [r["r"] for r in dev if r["round"] == ROUNDS])
    assert state.devices.scored.all()
    assert float(extra["clock"]) == pytest.approx(rnd[-1]["clock"])


def test_simulate_ends_with_a_summary_and_plots(tiny_run):
    """The command ends with a human summary (no raw JSON), the plots and what to run next."""
    out, summary, printed, _ = tiny_run
    lines = printed.splitlines()
    assert lines[0] == "fedspine on sst2 (random), 3 devices, 3 rounds"
    assert f"accuracy     {summary['final_accuracy']:.3f}" in printed
    assert f"sparsity     {summary['final_sparsity']:.2f}" in printed
    assert "s on the simulated fleet" in printed and " wall" in printed
    for png in ("accuracy_vs_time.png", "completion_time.png", "p_r_over_rounds.png"):
        assert (out / png).is_file() and png in printed
    assert lines[-4] == "next:" and lines[-3] == f"  fedspine report {out}"
    assert lines[-2].startswith(f"  fedspine export {out} --device-id 0 --out ")
    assert lines[-1].startswith("  fedspine infer ")
    assert "{" not in printed


def test_run_refuses_to_overwrite_and_to_resume_nothing(tiny_config_path, tmp_path):
    cfg = load_config(tiny_config_path)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match="--resume"):
        simulation.run(cfg, tmp_path / "old", progress=False)
    with pytest.raises(RunDirError, match="holds no run"):
        simulation.run(cfg, tmp_path / "new", resume=True, progress=False)


def test_resume_tolerates_a_partially_written_metrics_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"round": t, "device": 0}) for t in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + lines[-1][:9])     # killed mid-line
    metrics.truncate_metrics(path, 2)
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()] == [1, 2]


class _Started(Exception):
    pass


def test_compare_restarts_a_method_killed_before_its_first_checkpoint(tiny_config_path,
                                                                      tmp_path, monkeypatch):
    cfg = load_config(tiny_config_path)
    (tmp_path / "fedspine").mkdir()
    dump_config(cfg, tmp_path / "fedspine" / "config.yaml")
    (tmp_path / "fedspine" / "metrics.jsonl").write_text("")

    def started(cfg):
        raise _Started

    monkeypatch.setattr(simulation, "setup", started)
    with pytest.raises(_Started):
        simulation.compare_runs(cfg, ["fedspine"], tmp_path, progress=False)


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_after_an_interruption_equals_an_uninterrupted_run(plain_run, resumed_run,
                                                                  tiny_cfg):
    plain, plain_summary, _ = plain_run
    out, summary, on_disk = resumed_run
    # what the crash left: checkpoints of rounds 1-2, metrics of round 3 already written
    assert on_disk == {"steps": [1, 2], "rounds_logged": [1, 2, 3], "summary_written": False}

    # the final checkpoint (federation state and the simulator's extra) leaf by leaf
    s1, e1, step1 = _final(plain, tiny_cfg)
    s2, e2, step2 = _final(out, tiny_cfg)
    assert step1 == step2 == ROUNDS
    t1, t2 = checkpoint.state_to_tree(s1), checkpoint.state_to_tree(s2)

    def leaves(t, path=""):
        if isinstance(t, dict):
            for k in sorted(t):
                yield from leaves(t[k], f"{path}/{k}")
        else:
            yield path, np.asarray(t)
    l1, l2 = dict(leaves({"server": t1, "extra": e1})), dict(leaves({"server": t2, "extra": e2}))
    assert l1.keys() == l2.keys()
    for k in l1:
        assert l1[k].dtype == l2[k].dtype, k
        np.testing.assert_array_equal(l1[k], l2[k], err_msg=k)

    # the metrics: the partial round 3 was replaced, nothing duplicated
    r1, r2 = _rows(plain), _rows(out)
    assert len(r2) == len(r1)
    for a, b in zip(r1, r2):
        assert {k: v for k, v in a.items() if k not in WALL_CLOCK} == \
               {k: v for k, v in b.items() if k not in WALL_CLOCK}
    # the summary (inference latency is a wall-clock measurement)
    for s in (plain_summary, summary):
        s["inference"].pop("latency_s")
    assert summary == plain_summary


# -------------------------------------------------------------------------- compare


@pytest.mark.slow
def test_compare_gives_every_method_the_same_devices_data_and_traces(compared, plain_run,
                                                                    tiny_cfg):
    out, results, setups = compared
    methods = ["fedspine", "hetlora"]
    assert set(results) == set(setups) == set(methods)
    for m in methods:
        assert results[m]["method"] == m and results[m]["rounds"] == ROUNDS
        assert load_config(out / m / "config.yaml").federation.strategy == m
        assert (out / m / "summary.json").exists()
    fs, hl = setups["fedspine"], setups["hetlora"]

    # same data partition (indices into the same training examples)
    np.testing.assert_array_equal(fs.task.train.source_row, hl.task.train.source_row)
    assert len(fs.devices) == len(hl.devices) == DEVICES
    for a, b in zip(fs.devices, hl.devices):
        np.testing.assert_array_equal(a.train_idx, b.train_idx)
        np.testing.assert_array_equal(a.holdout_idx, b.holdout_idx)
    # same fleet and per-round traces
    for name in ("device_type", "distance_group", "memory_bytes"):
        np.testing.assert_array_equal(getattr(fs.fleet, name), getattr(hl.fleet, name))
    for t in range(ROUNDS):
        for x, y in zip(heterogeneity.round_trace(fs.fleet, t),
                        heterogeneity.round_trace(hl.fleet, t)):
            np.testing.assert_array_equal(x, y)

    # and the runs saw them: per device and round the same type, and the bandwidth implied
    # by the LoRA bytes each moved (down + up at its rank) equals the trace's
    per_rank = _lora_bytes_per_rank(_final(out / "fedspine", tiny_cfg)[0].lora)
    rows = {m: [r for r in _rows(out / m) if not r.get("summary")] for m in methods}
    ranks = {m: {r["r"] for r in rows[m]} for m in methods}
    assert ranks["hetlora"] != ranks["fedspine"] or len(ranks["fedspine"]) > 1
    for a, b in zip(rows["fedspine"], rows["hetlora"]):
        assert (a["round"], a["device"], a["device_type"]) == \
               (b["round"], b["device"], b["device_type"])
        assert a["device_type"] == fs.fleet.type_names[a["device"]]
        want = heterogeneity.round_trace(fs.fleet, a["round"] - 1).bandwidth[a["device"]]
        for r in (a, b):
            got = 2 * r["r"] * per_rank / r["comm_time"]
            assert got == pytest.approx(want, rel=1e-9)
    assert [r["p"] for r in rows["hetlora"]] == [0.0] * len(rows["hetlora"])

    # compare's fedspine run is the plain simulate of the same config
    plain = [r for r in _rows(plain_run[0])]
    mine = _rows(out / "fedspine")
    assert [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in plain] == \
           [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in mine]


@pytest.mark.slow
def test_resume_applies_safe_overrides_and_refuses_others(tiny_run, tmp_path, capsys):
    """``--resume --set federation.rounds=4`` runs a fourth round with the run's own config;
    a key that changes what a round computes is refused, naming it, and nothing changes."""
    import shutil

    from fedspine_jax.cli import main

    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    before = (out / "metrics.jsonl").read_text()
    assert main(["simulate", "--out", str(out), "--resume", "--set",
                 "train.learning_rate=0.5"]) == 2
    err = capsys.readouterr().err
    assert "--resume: train.learning_rate=0.5 differs from the run's 0.001" in err
    assert (out / "metrics.jsonl").read_text() == before
    assert main(["simulate", "--out", str(out), "--resume", "--set", "federation.rounds=4",
                 "--no-progress"]) == 0
    assert "4 rounds" in capsys.readouterr().out
    assert sorted({r["round"] for r in _rows(out)}) == [1, 2, 3, 4]
    assert load_config(out / "config.yaml").federation.rounds == 4
    assert checkpoint.steps(out / "checkpoints")[-1] == 4
