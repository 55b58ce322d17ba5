"""Tables and plots of run outputs: ``fedspine report``.

Design note
-----------
A run directory (``fedspine simulate --out DIR``) holds ``config.yaml``, ``metrics.jsonl``
(one line per device and round, plus one ``"summary": true`` line per round; read through
the typed rows of :mod:`fedspine_jax.metrics`) and, once the run has finished,
``summary.json``. A comparison directory (``fedspine compare --out DIR``)
holds one run directory per method, named after the method.

:func:`render_run` draws a run's plots into its directory; :func:`render_comparison` writes
the paper's Table 5 (``comparison.md`` / ``comparison.json``) and the cross-method plots into
the comparison directory. Everything is read from those files only: the report never
imports JAX or reruns anything.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure`` printed by the
Agg canvas) rather than ``pyplot``: Agg renders headless, there is no global figure registry
to leak into (so nothing to close), and the process-wide backend of a caller (say a notebook)
is left alone, which ``matplotlib.use("Agg")`` would switch.

Methods' labels, colours and table order come from the registry in
:mod:`fedspine_jax.strategies`; directories of other names follow, alphabetically.

Table 5 conventions (decided here, once):

- Relative columns are ``value / reference value`` with the reference method at 100%: the
  registry's first method in table order (HETLoRA, as in the paper) when its run is present,
  else the first method in table order.
- "Train. time" is the simulated time to the target accuracy (paper section 5.2, Training
  Metrics) where the run set a target and reached it, else the whole run's simulated time;
  the "Time basis" column says which, because such rows measure different things.
- Accuracy and sparsity are absolute (percent), as in the paper.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from fedspine_jax.errors import UserError
from fedspine_jax.metrics import DeviceRow, MetricsError, RoundRow, read_metrics
from fedspine_jax.strategies import STRATEGIES, TABLE_ORDER

# Fixed colours so a device type / method looks the same in every figure.
DEVICE_COLORS = {"agx": "#1f77b4", "nx": "#ff7f0e", "tx2": "#d62728"}
METHOD_COLORS = {m: s.color for m, s in STRATEGIES.items()}
_SPARE_COLORS = ("#bcbd22", "#e377c2", "#1f77b4", "#aec7e8", "#ffbb78", "#98df8a")

# File names written by render_run / render_comparison.
ACCURACY_PNG = "accuracy_vs_time.png"
COMPLETION_PNG = "completion_time.png"
PR_PNG = "p_r_over_rounds.png"
FEDSPINE_PR_PNG = "fedspine_p_r_over_rounds.png"
TABLE_MD = "comparison.md"
TABLE_JSON = "comparison.json"

_DPI = 120
_MIB = 1024.0 ** 2


class ReportError(UserError, ValueError):
    """A directory that cannot be reported on (missing, empty, malformed, bad round)."""


@dataclasses.dataclass(frozen=True)
class RunData:
    """One run directory, as read from its files.

    Attributes:
      path: the run directory.
      name: its directory name (the method's name inside a comparison).
      method: the strategy that produced it (summary.json, else config.yaml, else ``name``).
      devices: ``metrics.jsonl`` device lines (one per device and round), file order.
      rounds: ``metrics.jsonl`` round lines (``"summary": true``), file order.
      summary: ``summary.json``, or None while the run has not finished.
      task: ``data.task`` of ``config.yaml``, or None without one.
      target_accuracy: the target accuracy in (0, 1], or None when none was set.
      cfg: the run's config (``config.yaml``), or None without one.
    """
    path: Path
    name: str
    method: str
    devices: list[DeviceRow]
    rounds: list[RoundRow]
    summary: dict | None
    task: str | None
    target_accuracy: float | None
    cfg: object = None

    @property
    def label(self) -> str:
        """Display name of the method (paper spelling where known)."""
        s = STRATEGIES.get(self.method)
        return self.method if s is None else s.label


# ---------------------------------------------------------------------------------------
# Reading


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory written by ``fedspine simulate``.

    Raises:
      ReportError: the directory or its ``metrics.jsonl`` is missing, or no round finished.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"{str(path)!r} does not exist or is not a directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{str(path)!r} holds no run: metrics.jsonl is missing (expected "
                          f"the --out of 'fedspine simulate', or of 'fedspine compare' with "
                          f"one subdirectory per method)")
    try:
        rows = read_metrics(metrics)
    except MetricsError as e:
        raise ReportError(str(e)) from None
    rounds = [r for r in rows if isinstance(r, RoundRow)]
    devices = [r for r in rows if isinstance(r, DeviceRow)]
    if not rounds:
        raise ReportError(f"{str(metrics)!r} records no finished round")
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{str(path / 'summary.json')!r} is not valid JSON ({e})"
                              ) from None
    method, task, target, cfg = path.name, None, None, None
    if (path / "config.yaml").is_file():
        from fedspine_jax.config import load_config

        cfg = load_config(path / "config.yaml")
        method = cfg.federation.strategy
        task, target = cfg.data.task, cfg.federation.target_accuracy or None
    if summary is not None:
        method = summary.get("method") or method
        if "target_accuracy" in summary:
            target = summary["target_accuracy"] or None
    return RunData(path, path.name, method, devices, rounds, summary, task, target, cfg)


def method_dirs(comparison_dir: str | Path) -> list[Path]:
    """Subdirectories of a comparison directory that hold a finished run (summary.json),
    sorted by name in table order (the registry's, then other names alphabetically)."""
    root = Path(comparison_dir)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and (d / "summary.json").is_file()]
    return sorted(found, key=lambda d: _order_key(d.name))


def _order_key(name: str) -> tuple[int, str]:
    return (TABLE_ORDER.index(name) if name in TABLE_ORDER else len(TABLE_ORDER), name)


def ranked_completion(run: RunData, round: int | None = None) -> tuple[int, list[dict]]:
    """The device lines of one round, fastest first (paper Fig. 2c ranks devices so).

    Args:
      run: a loaded run.
      round: the round (1-based); None picks the last round recorded.

    Returns:
      ``(round, rows)``: the lines of the devices that sent an update, sorted by
      ``completion_time`` ascending (ties by device id).
    """
    recorded = sorted({r.round for r in run.devices})
    if not recorded:
        raise ReportError(f"{str(run.path)!r}: metrics.jsonl has no device lines")
    t = recorded[-1] if round is None else round
    if t not in recorded:
        raise ReportError(f"{str(run.path)!r}: round {t} not recorded (rounds "
                          f"{recorded[0]}..{recorded[-1]})")
    rows = [r for r in run.devices if r.round == t and r.completion_time is not None]
    return t, sorted(rows, key=lambda r: (r.completion_time, r.device))


# ---------------------------------------------------------------------------------------
# Table 5


def _time_basis(summary: dict) -> tuple[float | None, str]:
    """Training time and what it measures: 'target', 'no_target' or 'not_reached'."""
    target = summary.get("target_accuracy")
    reached = summary.get("time_to_target_s")
    if target and reached is not None:
        return float(reached), "target"
    full = summary.get("simulated_time_s")
    return (None if full is None else float(full)), ("not_reached" if target else "no_target")


def _ratio(value, ref) -> float | None:
    if value is None or ref is None or not ref > 0:
        return None
    return float(value) / float(ref)


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(sum(vals) / len(vals)) if vals else None


def _std(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return float(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)))


def _device_means(runs: list[RunData]) -> dict:
    """Means over every device-round of the runs that sent an update: compute and
    communication time (simulated clock) and, per round, the spread (max - min) of the
    aggregation weights."""
    rows = [r for run in runs for r in run.devices if r.ratio is not None
            and r.fits_memory is not False]
    spreads = []
    for run in runs:
        by_round: dict = {}
        for r in run.devices:
            if r.aggregation_weight is not None:
                by_round.setdefault(r.round, []).append(r.aggregation_weight)
        spreads += [max(w) - min(w) for w in by_round.values() if len(w) > 1]
    return {"compute_time_s": _mean(r.compute_time for r in rows),
            "communication_time_s": _mean(r.comm_time for r in rows),
            "aggregation_weight_spread": _mean(spreads)}


def _seed(run: RunData):
    if run.summary and run.summary.get("seed") is not None:
        return run.summary["seed"]
    return None if run.cfg is None else run.cfg.federation.seed


def protocol(runs: list[RunData]) -> dict:
    """The evaluation protocol of a comparison, from its first run's config and summary."""
    run = runs[0]
    cfg, s = run.cfg, run.summary or {}
    if cfg is None:
        return {}
    return {"eval_samples": s.get("eval_samples"), "rounds": cfg.federation.rounds,
            "eval_every": cfg.federation.eval_every, "local_steps": cfg.train.local_steps,
            "batch_size": cfg.train.batch_size, "rank": cfg.lora.rank,
            "rank_choices": list(cfg.lora.rank_choices),
            "num_devices": cfg.federation.num_devices,
            "target_accuracy": cfg.federation.target_accuracy or None,
            "target_sparsity": cfg.pruning.target_ratio,
            "seeds": sorted({x for x in (_seed(r) for r in runs) if x is not None})}


def comparison_table(runs: list[RunData], skipped: list[str] = ()) -> dict:
    """Table 5 from finished runs: one row per method, its seeds' mean (and spread), and
    figures relative to a reference.

    Args:
      runs: finished runs (``summary`` not None), in table order; runs of one method with
        different seeds (``fedspine compare --methods fedspine:3``) make one row. The
        reference is the row of the registry's first method in table order (``hetlora``),
        else the first.
      skipped: names of unfinished runs left out (listed under the table).

    Returns:
      ``{"reference": method, "protocol": {...}, "skipped": [...], "methods": [row, ...]}``;
      each row holds ``method``, ``run`` (its first run's directory name), ``runs``,
      ``seeds``, ``label``, ``final_accuracy`` (mean over seeds) and
      ``final_accuracy_std``, ``final_accuracy_per_seed``, ``final_sparsity``,
      ``train_time_s``, ``time_basis`` ('target' when every seed reached the target,
      'no_target' or 'not_reached'), ``target_accuracy``, ``simulated_time_s``,
      ``time_to_target_s`` (mean; None unless every seed reached it),
      ``time_to_target_s_per_seed``, ``mean_waiting_time_s``, ``compute_time_s`` and
      ``communication_time_s`` (means per device-round), ``aggregation_weight_spread``
      (mean over rounds of max - min of the weights), ``training_peak_memory_bytes``,
      ``inference_latency_s``, ``inference_memory_bytes``, ``rounds`` and ``relative``:
      ``{train_time, train_memory, inference_time, inference_memory}`` as fractions of the
      reference's (1.0 = 100%; None where either figure is missing).
    """
    if not runs:
        raise ReportError("no finished runs to compare")
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        if run.summary is None:
            raise ReportError(f"{str(run.path)!r} has no summary.json (unfinished run)")
        groups.setdefault(run.method, []).append(run)
    rows = []
    for method, group in groups.items():
        ss = [g.summary for g in group]
        infs = [s.get("inference") or {} for s in ss]
        ttt = [s.get("time_to_target_s") for s in ss]
        target = ss[0].get("target_accuracy")
        reached_all = bool(target) and all(t is not None for t in ttt)
        sim = _mean(s.get("simulated_time_s") for s in ss)
        accs = [s.get("final_accuracy") for s in ss]
        rows.append({
            "method": method, "run": group[0].name, "runs": [g.name for g in group],
            "seeds": [_seed(g) for g in group], "label": group[0].label,
            "final_accuracy": _mean(accs), "final_accuracy_std": _std(accs),
            "final_accuracy_per_seed": accs,
            "final_sparsity": _mean(s.get("final_sparsity") for s in ss),
            "train_time_s": _mean(ttt) if reached_all else sim,
            "time_basis": "target" if reached_all else ("not_reached" if target
                                                        else "no_target"),
            "target_accuracy": target, "simulated_time_s": sim,
            "time_to_target_s": _mean(ttt) if reached_all else None,
            "time_to_target_s_per_seed": ttt,
            "mean_waiting_time_s": _mean(s.get("mean_waiting_time_s") for s in ss),
            **_device_means(group),
            "training_peak_memory_bytes": _mean(s.get("training_peak_memory_bytes")
                                                for s in ss),
            "inference_latency_s": _mean(i.get("latency_s") for i in infs),
            "inference_memory_bytes": _mean(i.get("memory_bytes") for i in infs),
            "rounds": ss[0].get("rounds", len(group[0].rounds)),
        })
    names = [r["method"] for r in rows]
    ref = rows[names.index(TABLE_ORDER[0])] if TABLE_ORDER[0] in names else rows[0]
    for r in rows:
        r["relative"] = {
            "train_time": _ratio(r["train_time_s"], ref["train_time_s"]),
            "train_memory": _ratio(r["training_peak_memory_bytes"],
                                   ref["training_peak_memory_bytes"]),
            "inference_time": _ratio(r["inference_latency_s"], ref["inference_latency_s"]),
            "inference_memory": _ratio(r["inference_memory_bytes"],
                                       ref["inference_memory_bytes"]),
        }
    return {"reference": ref["method"], "protocol": protocol(runs),
            "skipped": list(skipped), "methods": rows}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}"


def _rel(x) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def _num(x, scale: float = 1.0) -> str:
    return "n/a" if x is None else f"{x / scale:.4g}"


def _basis_text(row: dict) -> str:
    target = row["target_accuracy"]
    if row["time_basis"] == "target":
        return f"to {100 * target:.1f}% acc."
    if row["time_basis"] == "not_reached":
        return f"full run ({100 * target:.1f}% not reached)"
    return "full run (no target)"


def table_markdown(table: dict) -> str:
    """Markdown of :func:`comparison_table`'s result: the relative table, then absolutes."""
    ref = next(r for r in table["methods"] if r["method"] == table["reference"])
    lines = [
        f"Relative figures: {ref['label']} = 100%. Accuracy and sparsity are absolute (%).",
        "",
        "| Method | Acc. (%) | Sparsity (%) | Train. Time (↓) | Time basis | Train. Mem. (↓) "
        "| Inf. Time (↓) | Inf. Mem. (↓) |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in table["methods"]:
        rel = r["relative"]
        acc = _pct(r["final_accuracy"])
        if r.get("final_accuracy_std") is not None:
            acc += f" ± {_pct(r['final_accuracy_std'])}"
        lines.append(
            f"| {r['label']} | {acc} | {_pct(r['final_sparsity'])} "
            f"| {_rel(rel['train_time'])} | {_basis_text(r)} | {_rel(rel['train_memory'])} "
            f"| {_rel(rel['inference_time'])} | {_rel(rel['inference_memory'])} |")
    lines += [
        "",
        "Train. Time is the simulated time to the target accuracy where the run reached it, "
        "else the whole run's simulated time (Time basis).",
        "",
        "Absolute figures (means over a method's seeds; simulated clock for times, compute "
        "and communication per device-round; inference measured on this machine):",
        "",
        "| Method | Seeds | Rounds | Sim. time (s) | Time to target (s) | Mean wait (s) "
        "| Compute (s) | Comm. (s) | Train. Mem. (MiB) | Inf. Time (ms) | Inf. Mem. (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table["methods"]:
        seeds = r.get("seeds") or []
        lines.append(
            f"| {r['label']} | {len(seeds)} | {r['rounds']} | {_num(r['simulated_time_s'])} "
            f"| {_num(r['time_to_target_s'])} | {_num(r['mean_waiting_time_s'])} "
            f"| {_num(r.get('compute_time_s'))} | {_num(r.get('communication_time_s'))} "
            f"| {_num(r['training_peak_memory_bytes'], _MIB)} "
            f"| {_num(r['inference_latency_s'], 1e-3)} "
            f"| {_num(r['inference_memory_bytes'], _MIB)} |")
    if table.get("skipped"):
        lines += ["", "Skipped (no summary.json, unfinished): " + ", ".join(table["skipped"])]
    return "\n".join(lines) + "\n"


def run_markdown(run: RunData) -> str:
    """A short Markdown summary of one run (from summary.json, else from metrics.jsonl)."""
    s = run.summary
    last = run.rounds[-1]
    evals = [r for r in run.rounds if r.accuracy is not None]
    if s is None:  # unfinished run: what metrics.jsonl says so far
        s = {"method": run.method, "rounds": len(run.rounds),
             "final_accuracy": evals[-1].accuracy if evals else None,
             "final_sparsity": last.mean_sparsity, "simulated_time_s": last.clock}
    inf = s.get("inference") or {}
    target = run.target_accuracy
    if not target:
        ttt = "n/a (no target)"
    elif s.get("time_to_target_s") is None:
        ttt = f"not reached ({100 * target:.1f}%)"
    else:
        ttt = f"{s['time_to_target_s']:.4g} s (to {100 * target:.1f}%)"
    title = f"{run.label} run"
    if run.task:
        title += f" on {run.task}"
    if run.summary is None:
        title += " (unfinished: no summary.json)"
    rows = [
        ("Rounds", str(s.get("rounds", len(run.rounds)))),
        ("Final accuracy (%)", _pct(s.get("final_accuracy"))),
        ("Final sparsity (%)", _pct(s.get("final_sparsity"))),
        ("Simulated time (s)", _num(s.get("simulated_time_s"))),
        ("Time to target", ttt),
        ("Mean waiting time (s)", _num(s.get("mean_waiting_time_s"))),
        ("Training peak memory (MiB)", _num(s.get("training_peak_memory_bytes"), _MIB)),
        ("Inference latency (ms)", _num(inf.get("latency_s"), 1e-3)),
        ("Inference memory (MiB)", _num(inf.get("memory_bytes"), _MIB)),
    ]
    out = [f"## {title}", "", "| Metric | Value |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# Plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)
    return path


def _colors(names: list[str], fixed: dict) -> dict:
    spare = iter(_SPARE_COLORS * (1 + len(names) // len(_SPARE_COLORS)))
    return {n: fixed[n] if n in fixed else next(spare) for n in dict.fromkeys(names)}


def _plot_accuracy(ax, run: RunData, color: str, label: str, band: bool) -> bool:
    """Mean device accuracy (%) against the simulated clock; True if anything was drawn."""
    evals = [r for r in run.rounds if r.accuracy is not None]
    if not evals:
        return False
    clock = {r.round: r.clock for r in run.rounds}
    xs = [r.clock for r in evals]
    ax.plot(xs, [100 * r.accuracy for r in evals], marker="o", ms=3.5, lw=1.6,
            color=color, label=label)
    if band:  # spread of the devices' local models in evaluated rounds
        per_round: dict[int, list[float]] = {}
        for r in run.devices:
            if r.accuracy is not None:
                per_round.setdefault(r.round, []).append(100 * r.accuracy)
        ts = sorted(t for t in per_round if t in clock)
        if ts:
            ax.fill_between([clock[t] for t in ts], [min(per_round[t]) for t in ts],
                            [max(per_round[t]) for t in ts], color=color, alpha=0.18, lw=0,
                            label="device min-max")
    return True


def _finish_accuracy_axes(ax, target: float | None, drew: bool) -> None:
    if target:
        ax.axhline(100 * target, color="black", ls=":", lw=1,
                   label=f"target {100 * target:.1f}%")
    if not drew:
        ax.text(0.5, 0.5, "no evaluated round", transform=ax.transAxes, ha="center")
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _plot_completion(ax, run: RunData, round: int | None, type_colors: dict) -> list:
    """Ranked stacked bars (compute, then communication) of one round; returns the legend
    handles (device types, bar parts, round-time line)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    t, rows = ranked_completion(run, round)
    x = list(range(1, len(rows) + 1))
    colors = [type_colors[r.device_type] for r in rows]
    comp = [r.compute_time for r in rows]
    comm = [r.comm_time for r in rows]
    ax.bar(x, comp, color=colors, edgecolor="black", lw=0.4)
    ax.bar(x, comm, bottom=comp, color=colors, alpha=0.45, hatch="//", edgecolor="black",
           lw=0.4)
    slowest = max(r.completion_time for r in rows)
    ax.axhline(slowest, color="black", ls="--", lw=1)
    oom = [(xi, r.completion_time) for xi, r in zip(x, rows) if not r.fits_memory]
    if oom:
        ax.plot([o[0] for o in oom], [o[1] for o in oom], "kx", ms=7, mew=1.5)
    if len(rows) <= 40:
        ax.set_xticks(x, [str(r.device) for r in rows], fontsize=7)
    ax.set_xlabel("device id, ranked by completion time")
    ax.set_ylabel("completion time (s)")
    wait = sum(slowest - r.completion_time for r in rows) / len(rows)
    ax.set_title(f"{run.label}, round {t} (mean wait {wait:.3g} s)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    present = {r.device_type for r in rows}
    handles = [Patch(color=c, label=n.upper()) for n, c in type_colors.items() if n in present]
    handles += [Patch(facecolor="white", edgecolor="black", label="compute"),
                Patch(facecolor="white", edgecolor="black", hatch="//", label="communication")]
    handles.append(Line2D([], [], color="black", ls="--", label="round time (slowest)"))
    if oom:
        handles.append(Line2D([], [], color="black", marker="x", ls="",
                              label="out of memory (charged the deadline)"))
    return handles


def _plot_pr(fig, run: RunData, type_colors: dict, title: str) -> None:
    """Two panels, pruning ratio p and LoRA rank r of every device over the rounds.

    Ranks are discrete and many devices share one, so each device's rank line is offset by a
    small fixed factor (within a quarter of a doubling, log2 axis) to keep it visible.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, NullLocator

    ax_p, ax_r = fig.subplots(2, 1, sharex=True)
    by_device: dict[int, list[DeviceRow]] = {}
    for r in run.devices:
        by_device.setdefault(r.device, []).append(r)
    many = len(run.rounds) > 40
    n = len(by_device)
    for j, d in enumerate(sorted(by_device)):
        rows = sorted(by_device[d], key=lambda r: r.round)
        c = type_colors[rows[0].device_type]
        ts = [r.round for r in rows]
        ax_p.plot(ts, [r.p for r in rows], color=c, lw=1.2, alpha=0.75,
                  marker=None if many else "o", ms=3)
        shift = 2.0 ** (0.25 * ((j + 0.5) / n - 0.5)) if n > 1 else 1.0
        ax_r.plot(ts, [r.r * shift for r in rows], color=c, lw=1.2, alpha=0.75,
                  drawstyle="steps-mid", marker=None if many else "o", ms=3)
    ranks = sorted({r.r for r in run.devices})
    ax_r.set_yscale("log", base=2)
    ax_r.set_yticks(ranks, [str(k) for k in ranks])
    ax_r.yaxis.set_minor_locator(NullLocator())
    ax_r.set_ylim(min(ranks) / 2 ** 0.4, max(ranks) * 2 ** 0.4)
    ax_r.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_p.set_ylabel("pruning ratio p")
    ax_r.set_ylabel("LoRA rank r\n(devices offset slightly)")
    ax_r.set_xlabel("round")
    for ax in (ax_p, ax_r):
        ax.grid(alpha=0.3)
    present = {r.device_type for r in run.devices}
    ax_p.legend(handles=[Line2D([], [], color=c, label=n.upper())
                         for n, c in type_colors.items() if n in present],
                fontsize=8, title="device type (one line per device)", title_fontsize=8)
    ax_p.set_title(title, fontsize=10)


def _type_colors(runs: list[RunData]) -> dict:
    """Colour of every device type present, strongest known type first (legend order)."""
    seen = dict.fromkeys(r.device_type for run in runs for r in run.devices)
    return _colors([t for t in DEVICE_COLORS if t in seen] + [t for t in seen
                                                             if t not in DEVICE_COLORS],
                   DEVICE_COLORS)


def render_run(run_dir: str | Path, round: int | None = None) -> dict[str, Path]:
    """Draw one run's plots into its directory.

    Writes ``accuracy_vs_time.png`` (mean device test accuracy against the simulated clock,
    with the devices' min-max band), ``completion_time.png`` (paper Fig. 2c: every device's
    completion time in one round, ranked, split into computation and communication) and
    ``p_r_over_rounds.png`` (the pruning ratio p and LoRA rank r each device was given, per
    round; colour = device type).

    Args:
      run_dir: a run directory of ``fedspine simulate``.
      round: the round of the completion-time plot (1-based); None means the last.

    Returns:
      ``{"accuracy": path, "completion": path, "pr": path}``.
    """
    run = load_run(run_dir)
    type_colors = _type_colors([run])
    where = f" on {run.task}" if run.task else ""

    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    drew = _plot_accuracy(ax, run, METHOD_COLORS.get(run.method, "#d62728"), run.label, True)
    _finish_accuracy_axes(ax, run.target_accuracy, drew)
    ax.set_title(f"{run.label}{where}: test accuracy vs simulated time", fontsize=10)
    files = {"accuracy": _save(fig, run.path / ACCURACY_PNG)}

    fig = _figure(7.6, 4.0)
    ax = fig.add_subplot()
    fig.legend(handles=_plot_completion(ax, run, round, type_colors), fontsize=7,
               loc="outside right upper")
    files["completion"] = _save(fig, run.path / COMPLETION_PNG)

    fig = _figure(6.4, 5.2)
    _plot_pr(fig, run, type_colors, f"{run.label}{where}: (p, r) given to each device")
    files["pr"] = _save(fig, run.path / PR_PNG)
    return files


def render_comparison(comparison_dir: str | Path, round: int | None = None) -> dict:
    """Table 5 and the cross-method plots of a ``fedspine compare`` directory.

    Writes ``comparison.md`` and ``comparison.json`` (:func:`comparison_table`),
    ``accuracy_vs_time.png`` (paper Fig. 4: all methods on one axes),
    ``completion_time.png`` (paper Fig. 2c / 5: ranked per-device completion times of one
    round, one panel per method, shared y axis) and, when a ``fedspine`` run is present,
    ``fedspine_p_r_over_rounds.png``.

    Args:
      comparison_dir: holds one run directory per method (each with summary.json).
      round: the round of the completion-time panels; None means each run's last.

    Returns:
      ``{"table": comparison_table(...), "markdown": str, "files": {key: path}}`` with
      keys ``markdown``, ``json``, ``accuracy``, ``completion`` and ``fedspine_pr``.

    Raises:
      ReportError: the directory is missing or holds no finished run.
    """
    root = Path(comparison_dir)
    if not root.is_dir():
        raise ReportError(f"{str(root)!r} does not exist or is not a directory")
    dirs = method_dirs(root)
    skipped = sorted(d.name for d in root.iterdir() if d.is_dir()
                     and (d / "metrics.jsonl").is_file() and d not in dirs)
    if not dirs:
        raise ReportError(f"{str(root)!r} holds no method subdirectory with a summary.json "
                          f"(expected the --out of 'fedspine compare')"
                          + (f"; unfinished runs: {', '.join(skipped)}" if skipped else ""))
    runs = sorted((load_run(d) for d in dirs), key=lambda r: _order_key(r.method))
    table = comparison_table(runs, skipped)
    markdown = table_markdown(table)
    (root / TABLE_MD).write_text(markdown)
    (root / TABLE_JSON).write_text(json.dumps(table, indent=2) + "\n")
    files = {"markdown": root / TABLE_MD, "json": root / TABLE_JSON}
    type_colors = _type_colors(runs)
    method_colors = _colors([r.method for r in runs], METHOD_COLORS)
    tasks = {r.task for r in runs if r.task}
    where = f" on {tasks.pop()}" if len(tasks) == 1 else ""

    fig = _figure(6.8, 4.2)
    ax = fig.add_subplot()
    drew, labelled = False, set()
    for run in runs:   # a method's seeds share a colour and one legend entry
        label = "_nolegend_" if run.method in labelled else run.label
        labelled.add(run.method)
        drew |= _plot_accuracy(ax, run, method_colors[run.method], label, False)
    targets = {run.target_accuracy for run in runs}
    _finish_accuracy_axes(ax, targets.pop() if len(targets) == 1 else None, drew)
    ax.set_title(f"Test accuracy vs simulated time{where}", fontsize=10)
    files["accuracy"] = _save(fig, root / ACCURACY_PNG)

    firsts: dict = {}
    for run in runs:   # the completion panels: each method's first seed
        firsts.setdefault(run.method, run)
    runs = list(firsts.values())
    ncols = min(3, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    fig = _figure(3.6 * ncols + 1.6, 3.0 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    handles = {}
    for k, (ax, run) in enumerate(zip(axes, runs)):
        handles.update({h.get_label(): h for h in _plot_completion(ax, run, round,
                                                                     type_colors)})
        if k % ncols:
            ax.set_ylabel("")  # shared y axis: the first column says it
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    order = [n.upper() for n in type_colors]  # device types first, in colour-map order
    ordered = sorted(handles.values(), key=lambda h: (order.index(h.get_label())
                                                      if h.get_label() in order
                                                      else len(order)))
    fig.legend(handles=ordered, loc="outside right upper", fontsize=7)
    fig.suptitle(f"Per-device completion time in a round{where}", fontsize=10)
    files["completion"] = _save(fig, root / COMPLETION_PNG)

    fedspine = next((run for run in runs if run.method == "fedspine"), None)
    if fedspine is not None:
        fig = _figure(6.4, 5.2)
        _plot_pr(fig, fedspine, type_colors,
                 f"FedSpine{where}: (p, r) the bandit gave each device")
        files["fedspine_pr"] = _save(fig, root / FEDSPINE_PR_PNG)
    return {"table": table, "markdown": markdown, "files": files}


# ---------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a run directory ('fedspine simulate --out') or a comparison "
                               "directory ('fedspine compare --out')")
    p.add_argument("--round", type=int, default=None,
                   help="round of the per-device completion-time plot (default: the last)")


def run_cli(args) -> int:
    """Render a comparison when DIR has method subdirectories with summary.json, else a
    single run; print the Markdown table (or the run summary)."""
    try:
        if method_dirs(args.dir):
            res = render_comparison(args.dir, round=args.round)
            print(res["markdown"], end="")
            files = res["files"].values()
        else:
            files = render_run(args.dir, round=args.round).values()
            print(run_markdown(load_run(args.dir)), end="")
    except ReportError as e:
        print(f"fedspine report: {e}", file=sys.stderr)
        return 2
    print("\nWrote: " + ", ".join(str(f) for f in files))
    return 0
