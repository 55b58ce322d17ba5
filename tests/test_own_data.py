"""README, "Your own data": its commands, run as written on a CSV with other column names."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

from fedspine_jax.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _section() -> str:
    """README's "Your own data" subsection, up to the next heading of its level or above."""
    text = README.read_text()
    start = text.index("### Your own data\n")
    end = re.search(r"\n#{2,3} ", text[start + 1:])
    return text[start:start + 1 + end.start()]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(), re.DOTALL)


def _write_reviews(directory: Path, shared_data: Path, header: list[str],
                   sizes: dict[str, int], bad_line: int | None = None) -> None:
    """SST-2 records as the README's CSV: its header, labels written as names."""
    names = ["negative", "positive"]
    directory.mkdir()
    for split, n in sizes.items():
        lines = (shared_data / "sst2" / f"{split}.jsonl").read_text().splitlines()[:n]
        recs = [json.loads(line) for line in lines]
        rows = [{"id": r["idx"], "review": r["sentence"], "sentiment": names[r["label"]]}
                for r in recs]
        if bad_line is not None and split == "train":
            rows[bad_line - 2]["sentiment"] = "meh"  # line 1 is the header
        with (directory / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows)


def _readme_command() -> list[str]:
    (command,) = [b for b in _blocks("bash") if "fedspine simulate" in b]
    args = shlex.split(command.replace("\\\n", " "))
    assert args[:2] == ["fedspine", "simulate"]
    return args[1:]


def test_readme_csv_example_runs_end_to_end(shared_data, tmp_path, monkeypatch, capsys):
    header = _blocks("text")[0].splitlines()[0].split(",")
    assert header == ["id", "review", "sentiment"]
    monkeypatch.chdir(tmp_path)
    _write_reviews(tmp_path / "my_reviews", shared_data, header,
                   {"train": 300, "validation": 40})
    rc = main(_readme_command() + ["--set", "federation.rounds=2", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    run = tmp_path / "runs" / "my_reviews"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["eval_samples"] == 40
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    saved = (run / "config.yaml").read_text()
    assert "task: classification" in saved and "text_column: review" in saved
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "round" in r][-1] == 2


def test_readme_error_example_is_what_a_bad_row_prints(shared_data, tmp_path, monkeypatch,
                                                       capsys):
    example = re.search(r"`(fedspine simulate: my_reviews/train\.csv:(\d+): .*?)`",
                        " ".join(_section().split()), re.DOTALL)
    line = int(example.group(2))
    monkeypatch.chdir(tmp_path)
    _write_reviews(tmp_path / "my_reviews", shared_data, ["id", "review", "sentiment"],
                   {"train": 30, "validation": 5}, bad_line=line)
    rc = main(_readme_command())
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1
    printed = err[0].replace(str(tmp_path.resolve()) + "/", "")
    assert printed == example.group(1)
