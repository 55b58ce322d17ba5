"""Report tables and plots from synthetic run directories (no simulation is run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedspine_jax import report
from fedspine_jax.cli import main
from fedspine_jax.report import ReportError

TYPES = ("agx", "nx", "tx2")
ROUNDS = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Hand-picked summaries; the expected relative figures below are computed by hand.
SUMMARIES = {
    "hetlora": dict(final_accuracy=0.90, final_sparsity=0.0, simulated_time_s=200.0,
                    time_to_target_s=160.0, training_peak_memory_bytes=1000,
                    inference={"latency_s": 0.020, "memory_bytes": 500.0}),
    "fedspine": dict(final_accuracy=0.89, final_sparsity=0.5, simulated_time_s=150.0,
                     time_to_target_s=120.0, training_peak_memory_bytes=1145,
                     inference={"latency_s": 0.010, "memory_bytes": 408.0}),
    "fedapt": dict(final_accuracy=0.70, final_sparsity=0.5, simulated_time_s=400.0,
                   time_to_target_s=None, training_peak_memory_bytes=1327,
                   inference={"latency_s": 0.01046, "memory_bytes": 415.5}),
}
# (train time, train memory, inference time, inference memory) relative to HETLoRA
EXPECTED_REL = {
    "hetlora": (1.0, 1.0, 1.0, 1.0),
    "fedspine": (120 / 160, 1145 / 1000, 0.010 / 0.020, 408 / 500),   # 75%, 114.5%, 50%, 81.6%
    "fedapt": (400 / 160, 1327 / 1000, 0.01046 / 0.020, 415.5 / 500),  # not reached: full run
}


def write_run(run_dir: Path, method: str, summary: dict | None, target: float = 0.8,
              speed: float = 1.0, rounds: int = ROUNDS) -> Path:
    """A run directory shaped like ``fedspine simulate``'s output, 3 devices."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"federation:\n  strategy: {method}\n  num_devices: {len(TYPES)}\n"
        f"  rounds: {rounds}\n  target_accuracy: {target}\ndata:\n  task: sst2\n")
    lines, clock = [], 0.0
    for t in range(1, rounds + 1):
        comp = [speed * (i + 1) * (1 + 0.1 * t) for i in range(len(TYPES))]
        comm = [0.5 * speed * (len(TYPES) - i) for i in range(len(TYPES))]
        total = [c + m for c, m in zip(comp, comm)]
        round_time = max(total)
        clock += round_time
        acc = [0.5 + 0.1 * t - 0.02 * i for i in range(len(TYPES))]
        for i, kind in enumerate(TYPES):
            lines.append({
                "round": t, "device": i, "device_type": kind, "p": 0.1 * t + 0.05 * i,
                "r": [8, 4, 2][(i + t) % 3], "ratio": 0.1 * t, "completion_time": total[i],
                "compute_time": comp[i], "comm_time": comm[i],
                "waiting_time": round_time - total[i], "loss_before": 0.7, "loss_drop": 0.01,
                "lora_importance": 1.0, "reward": 0.1, "flops": 1e9, "peak_memory_bytes": 1000,
                "fits_memory": not (t == 2 and i == 2), "measured_compute_s": 0.1,
                "accuracy": acc[i]})
        lines.append({"round": t, "summary": True, "clock": clock, "round_time": round_time,
                      "waiting_time": sum(round_time - x for x in total) / len(total),
                      "mean_sparsity": 0.1 * t, "accuracy": sum(acc) / len(acc)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary is not None:
        full = {"method": method, "rounds": rounds, "target_accuracy": target or None,
                "mean_waiting_time_s": 1.0, **summary}
        (run_dir / "summary.json").write_text(json.dumps(full, indent=2))
    return run_dir


def assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # something is drawn, not a blank canvas


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for speed, (m, s) in zip((1.0, 0.7, 2.0), SUMMARIES.items()):
        write_run(root / m, m, s, speed=speed)
    return root, report.render_comparison(root)


def test_table_relative_to_hetlora(comparison):
    root, res = comparison
    table = res["table"]
    assert table["reference"] == "hetlora"
    assert [r["method"] for r in table["methods"]] == ["hetlora", "fedapt", "fedspine"]
    for row in table["methods"]:
        rel = row["relative"]
        got = (rel["train_time"], rel["train_memory"], rel["inference_time"],
               rel["inference_memory"])
        assert got == pytest.approx(EXPECTED_REL[row["method"]], rel=1e-12), row["method"]
    rows = {r["method"]: r for r in table["methods"]}
    assert rows["fedspine"]["time_basis"] == "target"
    assert rows["fedspine"]["train_time_s"] == 120.0
    assert rows["fedapt"]["time_basis"] == "not_reached"
    assert rows["fedapt"]["train_time_s"] == 400.0
    md = (root / "comparison.md").read_text()
    assert md == res["markdown"]
    fedspine_line = next(ln for ln in md.splitlines() if ln.startswith("| FedSpine |"))
    cells = [c.strip() for c in fedspine_line.strip("|").split("|")]
    assert cells == ["FedSpine", "89.0", "50.0", "75.0%", "to 80.0% acc.", "114.5%", "50.0%",
                     "81.6%"]
    fedapt_line = next(ln for ln in md.splitlines() if ln.startswith("| FedAPT |"))
    assert "250.0%" in fedapt_line and "full run (80.0% not reached)" in fedapt_line
    assert "| HETLoRA | 90.0 | 0.0 | 100.0% |" in md


def test_json_round_trips(comparison):
    root, res = comparison
    loaded = json.loads((root / "comparison.json").read_text())
    assert loaded == res["table"]
    assert report.table_markdown(loaded) == (root / "comparison.md").read_text()


def test_comparison_pngs(comparison):
    root, res = comparison
    names = {"accuracy": "accuracy_vs_time.png", "completion": "completion_time.png",
             "fedspine_pr": "fedspine_p_r_over_rounds.png"}
    for key, name in names.items():
        assert res["files"][key] == root / name
        assert_png(root / name)


def test_reference_falls_back_to_first_method(tmp_path):
    write_run(tmp_path / "fedspine", "fedspine", SUMMARIES["fedspine"], target=0.0)
    write_run(tmp_path / "fedapt", "fedapt", SUMMARIES["fedapt"], target=0.0)
    table = report.comparison_table([report.load_run(d)
                                     for d in report.method_dirs(tmp_path)])
    assert table["reference"] == "fedapt"  # first in table order (paper Table 5's)
    rows = {r["method"]: r for r in table["methods"]}
    assert all(r["time_basis"] == "no_target" for r in rows.values())
    assert rows["fedapt"]["relative"]["train_time"] == 1.0
    # no target: the full simulated times are compared, 150 s against 400 s
    assert rows["fedspine"]["relative"]["train_time"] == pytest.approx(150 / 400)
    assert rows["fedspine"]["relative"]["inference_memory"] == pytest.approx(408 / 415.5)
    assert "full run (no target)" in report.table_markdown(table)


def test_missing_figures_are_na(tmp_path):
    s = dict(SUMMARIES["fedspine"], inference=None, final_accuracy=None)
    write_run(tmp_path / "hetlora", "hetlora", SUMMARIES["hetlora"])
    write_run(tmp_path / "fedspine", "fedspine", s)
    table = report.comparison_table([report.load_run(d)
                                     for d in report.method_dirs(tmp_path)])
    row = table["methods"][1]
    assert row["relative"]["inference_time"] is None
    assert row["relative"]["train_memory"] == pytest.approx(1.145)
    line = next(ln for ln in report.table_markdown(table).splitlines()
                if ln.startswith("| FedSpine |"))
    assert line.count("n/a") == 3  # accuracy, inference time, inference memory


def test_render_run_and_ranked_completion(tmp_path):
    run_dir = write_run(tmp_path / "run", "fedspine", SUMMARIES["fedspine"])
    files = report.render_run(run_dir)
    assert set(files) == {"accuracy", "completion", "pr"}
    for path in files.values():
        assert path.parent == run_dir
        assert_png(path)
    run = report.load_run(run_dir)
    assert run.method == "fedspine" and run.label == "FedSpine" and run.task == "sst2"
    assert run.target_accuracy == 0.8
    t, rows = report.ranked_completion(run)
    assert t == ROUNDS
    times = [r.completion_time for r in rows]
    assert times == sorted(times) and len(rows) == len(TYPES)
    assert {r.device for r in rows} == set(range(len(TYPES)))
    t2, rows2 = report.ranked_completion(run, 2)
    assert t2 == 2 and all(r.round == 2 for r in rows2)
    with pytest.raises(ReportError, match="round 9 not recorded"):
        report.ranked_completion(run, 9)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        report.render_run(tmp_path / "nope")
    with pytest.raises(ReportError, match="does not exist"):
        report.render_comparison(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="metrics.jsonl is missing"):
        report.render_run(empty)
    with pytest.raises(ReportError, match="no method subdirectory with a summary.json"):
        report.render_comparison(empty)
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="no finished round"):
        report.render_run(empty)
    (empty / "metrics.jsonl").write_text('{"round": 1, "summary": tru\n')
    with pytest.raises(ReportError, match="line 1 is not valid JSON"):
        report.load_run(empty)


def test_unfinished_run_is_skipped(tmp_path):
    write_run(tmp_path / "hetlora", "hetlora", SUMMARIES["hetlora"])
    write_run(tmp_path / "fedspine", "fedspine", None)
    assert [d.name for d in report.method_dirs(tmp_path)] == ["hetlora"]
    res = report.render_comparison(tmp_path)
    assert res["table"]["skipped"] == ["fedspine"]
    assert [r["method"] for r in res["table"]["methods"]] == ["hetlora"]
    assert "Skipped (no summary.json, unfinished): fedspine" in res["markdown"]
    loaded = json.loads((tmp_path / "comparison.json").read_text())
    assert report.table_markdown(loaded) == res["markdown"]
    assert "fedspine_pr" not in res["files"]  # FedSpine's (p, r) only from a finished run
    md = report.run_markdown(report.load_run(tmp_path / "fedspine"))
    assert "unfinished" in md and "| Rounds | 4 |" in md


def test_cli_report_comparison(comparison, capsys):
    root, _ = comparison
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert "| Method | Acc. (%)" in out and "| FedSpine |" in out
    assert "comparison.md" in out


def test_cli_report_single_run(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", "hetlora", SUMMARIES["hetlora"])
    assert main(["report", str(run_dir), "--round", "2"]) == 0
    out = capsys.readouterr().out
    assert "## HETLoRA run on sst2" in out
    assert "| Time to target | 160 s (to 80.0%) |" in out
    assert "| Training peak memory (MiB) |" in out
    assert_png(run_dir / "completion_time.png")


def test_cli_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl is missing" in capsys.readouterr().err
    run_dir = write_run(tmp_path / "run", "fedspine", SUMMARIES["fedspine"])
    assert main(["report", str(run_dir), "--round", "7"]) == 2
    assert "round 7 not recorded" in capsys.readouterr().err



def test_seeds_of_a_method_make_one_row_with_mean_and_spread(tmp_path):
    """Runs of one method with different seeds are one row: accuracy mean and sample std,
    time to target per seed (the mean only when every seed reached it), the protocol."""
    out = tmp_path / "cmp"
    a = dict(SUMMARIES["fedspine"], final_accuracy=0.80, time_to_target_s=100.0, seed=0)
    b = dict(SUMMARIES["fedspine"], final_accuracy=0.90, time_to_target_s=None, seed=1)
    write_run(out / "fedspine", "fedspine", a)
    write_run(out / "fedspine_seed1", "fedspine", b)
    write_run(out / "hetlora", "hetlora", SUMMARIES["hetlora"])
    table = report.render_comparison(out)["table"]
    rows = {r["method"]: r for r in table["methods"]}
    assert list(rows) == ["hetlora", "fedspine"]
    f = rows["fedspine"]
    assert f["runs"] == ["fedspine", "fedspine_seed1"] and f["seeds"] == [0, 1]
    assert f["final_accuracy"] == pytest.approx(0.85)
    assert f["final_accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert f["time_to_target_s_per_seed"] == [100.0, None]
    assert f["time_to_target_s"] is None and f["time_basis"] == "not_reached"
    assert table["protocol"]["rounds"] > 0 and "rank_choices" in table["protocol"]


def test_cli_compare_ends_with_the_table_and_what_next(tmp_path, monkeypatch, capsys):
    """``fedspine compare`` ends with Table 5, the files written and the next commands (the
    runs themselves stand in: the simulator's tests run real ones)."""
    from fedspine_jax import simulation

    def fake_compare_runs(cfg, methods, out, progress=True):
        for m, seeds in methods:
            assert seeds == 1
            write_run(Path(out) / m, m, SUMMARIES[m])

    monkeypatch.setattr(simulation, "compare_runs", fake_compare_runs)
    out = tmp_path / "cmp"
    assert main(["compare", "tiny", "--out", str(out), "--methods", "fedspine,hetlora"]) == 0
    printed = capsys.readouterr().out
    assert "| FedSpine | 89.0 | 50.0 |" in printed and "| HETLoRA | 90.0 |" in printed
    assert "wall time" in printed and "comparison.md" in printed
    assert "accuracy_vs_time.png" in printed and (out / "accuracy_vs_time.png").is_file()
    assert printed.rstrip().splitlines()[-3] == "next:"
    assert f"fedspine report {out}" in printed


def test_method_specs_name_seeds_per_method():
    from fedspine_jax.config import ConfigError
    from fedspine_jax.simulation import method_specs, run_dir_name

    assert method_specs("fedspine:3,hetlora,ablations") == [
        ("fedspine", 3), ("hetlora", 1), ("fedspine_no_ap", 1), ("fedspine_no_at", 1)]
    assert method_specs(None) == [(m, 1) for m in ("fedspine", "hetlora", "fedlora_prune",
                                                   "llmpruner_fedlora", "fedapt")]
    assert run_dir_name("fedspine", 0, 5) == "fedspine"
    assert run_dir_name("fedspine", 2, 7) == "fedspine_seed7"
    for bad, word in (("fedspin", "unknown method"), ("fedspine:0", "seed count"),
                      ("hetlora:x", "seed count")):
        with pytest.raises(ConfigError, match=word):
            method_specs(bad)
