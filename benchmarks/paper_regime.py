"""The paper-regime comparison (BENCHMARKS.md, "FedSpine in the paper's regime").

Runs ``fedspine compare`` on ``configs/sst2_paper_regime.yaml`` with the methods and seeds
below into a work directory (default ``runs/sst2_paper_regime``, git-ignored: it holds the
checkpoints), resuming whatever is already there, and after every finished run publishes the
comparison so far into ``benchmarks/results/sst2_paper_regime/``: ``comparison.json`` /
``comparison.md``, the plots, and each run's ``config.yaml``, ``metrics.jsonl`` and
``summary.json`` under ``runs/``. Then the sensitivity run (paper Fig. 2c's narrower device
spread, ``devices.spread=narrow``: FedSpine and HETLoRA, one seed each) into ``narrow/`` of
both directories. Stopped at any point, rerun the same command to continue.

    python benchmarks/paper_regime.py [--work DIR] [--set SECTION.KEY=VALUE ...]

Prints the comparison table (JSON) at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from fedspine_jax import report, simulation
from fedspine_jax.cli import enable_compile_cache
from fedspine_jax.config import load_config

# FedSpine (paper settings and our tuned S-UCB) and HETLoRA with 3 seeds, the rest with 1.
METHODS = ("fedspine:3,fedspine_tuned,hetlora:3,fedlora_prune,llmpruner_fedlora,fedapt,"
           "fedspine_no_ap,fedspine_no_at")
SENSITIVITY = "fedspine,hetlora"
RESULTS = Path(__file__).resolve().parent / "results" / "sst2_paper_regime"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


def publish(work: Path, dest: Path = RESULTS) -> dict:
    """Render the comparison of the finished runs in ``work`` and copy it to ``dest``."""
    res = report.render_comparison(work)
    dest.mkdir(parents=True, exist_ok=True)
    for path in res["files"].values():
        shutil.copy2(path, dest / Path(path).name)
    for run in report.method_dirs(work):
        (dest / "runs" / run.name).mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            shutil.copy2(run / name, dest / "runs" / run.name / name)
        _relative_paths(dest / "runs" / run.name / "config.yaml")
    return res["table"]


def _relative_paths(config: Path) -> None:
    """Write the paths beside the repository (``../shared/...``) that a run's config holds
    resolved as the repository-relative paths it was given, so published files name no
    machine's directories."""
    beside = str(Path(__file__).resolve().parents[2]) + "/"
    text = config.read_text()
    if beside in text:
        config.write_text(text.replace(beside, "../"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/sst2_paper_regime")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--publish-only", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    enable_compile_cache()  # a resumed comparison skips the long first compiles
    if not args.publish_only:
        cfg = load_config("sst2_paper_regime", args.overrides)
        simulation.compare_runs(cfg, simulation.method_specs(args.methods), work,
                                progress=False, after=lambda _: publish(work))
        narrow = load_config("sst2_paper_regime", [*args.overrides, "devices.spread=narrow"])
        simulation.compare_runs(narrow, simulation.method_specs(SENSITIVITY), work / "narrow",
                                progress=False,
                                after=lambda _: publish(work / "narrow", RESULTS / "narrow"))
    print(json.dumps(publish(work), indent=2))


if __name__ == "__main__":
    main()
