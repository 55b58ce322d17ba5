"""The ``fedspine`` command: a parser that imports no JAX, and one line (exit status 2, no
traceback) for every mistake a user can make."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedspine_jax import __version__
from fedspine_jax.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "fedspine_jax.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in ("simulate", "compare", "sweep", "server", "device", "export", "infer", "report"):
        assert name in out
    assert set(COMMANDS) >= {"simulate", "compare", "sweep", "server", "device", "export",
                             "infer", "report"}


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: fedspine" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fedspine-jax {__version__}"


def test_the_parser_imports_no_jax():
    """``fedspine --help`` and every subcommand's ``--help`` build the whole parser; it
    must not import JAX, orbax, gRPC or transformers (that is what made --help slow)."""
    code = ("import sys; from fedspine_jax.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('jax', 'orbax', 'grpc', 'transformers', 'flax') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------
# one line per mistake


def fails(capsys, args: list[str], *needles: str) -> str:
    """Run ``fedspine ARGS`` in-process; it must exit with 2 and print exactly one line,
    ``fedspine <command>: ...``, holding every needle."""
    rc = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"fedspine {args[0]}: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def sst2_dir(tmp_path, shared_data):
    """A data directory laid out like shared/data/sst2, to spoil."""
    d = tmp_path / "sst2"
    d.mkdir()
    lines = (shared_data / "sst2" / "validation.jsonl").read_text().splitlines()[:40]
    for split in ("train", "validation"):
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_missing_data_directory(capsys, tmp_path):
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "r"), "--set",
                   f"data.source={tmp_path / 'nowhere' / 'sst2'}"],
          "is not a directory", "--set data.source=")


def test_malformed_jsonl_line(capsys, tmp_path, sst2_dir):
    with open(sst2_dir / "train.jsonl", "a") as f:
        f.write('{"idx": 1, "sentence": "cut sh\n')
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "r"), "--set",
                   f"data.source={sst2_dir}"], "train.jsonl:41: not valid JSON")


def test_other_field_names(capsys, tmp_path, sst2_dir):
    (sst2_dir / "train.jsonl").write_text('{"text": "fine", "y": 1}\n')
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "r"), "--set",
                   f"data.source={sst2_dir}"],
          "train.jsonl:1: missing field 'sentence'", "this one has ['text', 'y']")


def test_wrong_model_path(capsys, tmp_path):
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "r"), "--set",
                   "model.source=./no/such/model"], "model path './no/such/model' does not exist")


def test_hub_ids_without_a_hub(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "r"), "--set",
                   "model.source=someone/some-model"],
          "'someone/some-model' is neither an offline name", "reachable hub id")
    monkeypatch.setitem(sys.modules, "datasets", None)  # the `hub` extra not installed
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "r2"), "--set",
                   "data.source=glue"], "needs the 'hub' extra", "fedspine-jax[hub]")


def test_existing_out_and_resume_of_nothing(capsys, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("")
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "old")],
          "already holds a run", "--resume")
    (tmp_path / "empty").mkdir()
    fails(capsys, ["simulate", "--out", str(tmp_path / "empty"), "--resume"],
          "holds no run", "without --resume")
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "empty"), "--resume"],
          "holds no run")


def test_missing_token_file(capsys, tmp_path):
    fails(capsys, ["device", "--server", "127.0.0.1:9", "--device-id", "0", "--token-file",
                   str(tmp_path / "device_0.token"), "--config", "tiny"],
          "device_0.token: No such file or directory")


def test_encoder_config_on_dolly(capsys, tmp_path):
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "r"), "--set",
                   "data.task=dolly"], "data.task=dolly", "needs a decoder")


def test_bad_config_values_and_files(capsys, tmp_path):
    fails(capsys, ["simulate", "tiny", "--out", str(tmp_path / "r"), "--set",
                   "lora.rank=-1"], "lora.rank=-1: out of range")
    fails(capsys, ["simulate", "nope.yaml", "--out", str(tmp_path / "r")],
          "config file 'nope.yaml' does not exist", "tiny")
    fails(capsys, ["report", str(tmp_path / "nothing")], "does not exist")
    fails(capsys, ["export", str(tmp_path), "--device-id", "0", "--out",
                   str(tmp_path / "m.onnx")], "not a run directory")
    fails(capsys, ["infer", str(tmp_path / "m.onnx"), "--text", "hi"], "does not exist")


def test_ctrl_c_prints_the_command_that_resumes(tmp_path, shared_data):
    """SIGINT during a real run: one line with the command to continue it, status 130."""
    out = tmp_path / "run"
    args = ["simulate", "tiny", "--out", str(out), "--set",
            f"data.source={shared_data / 'sst2'}", "--no-progress"]
    p = subprocess.Popen([sys.executable, "-m", "fedspine_jax.cli", *args], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    end = time.monotonic() + 120
    while not (out / "config.yaml").exists() and time.monotonic() < end and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0] == ("fedspine simulate: interrupted; continue with: fedspine "
                        + " ".join(args) + " --resume")
