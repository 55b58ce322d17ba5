"""The metrics.jsonl schema (fedspine_jax.metrics): rows round-trip through the writer and
the reader, key for key and byte for byte."""

from __future__ import annotations

import json

import pytest

from fedspine_jax.metrics import (DeviceRow, MetricsError, RoundRow, append_metrics,
                                  from_json, read_metrics, truncate_metrics)

# One line of every kind the transports write, as they write them.
SIM_DEVICE = {"round": 2, "device": 1, "device_type": "nx", "p": 0.43, "r": 2, "ratio": 0.44,
              "completion_time": 0.0087, "compute_time": 1.8e-05, "comm_time": 0.0086,
              "waiting_time": 0.0357, "loss_before": 0.69, "loss_drop": 0.0026,
              "lora_importance": 1.77, "reward": 0.16, "aggregation_weight": 0.32,
              "flops": 23041536.0, "peak_memory_bytes": 4996768, "fits_memory": True,
              "measured_compute_s": 0.135, "accuracy": 0.515625}
# out of memory in the simulator: an update row, no reward, no weight, not evaluated
SIM_DEVICE_OOM = {**SIM_DEVICE, "reward": None, "aggregation_weight": None,
                  "fits_memory": False, "accuracy": None}
GRPC_DEVICE = {k: v for k, v in SIM_DEVICE.items() if k != "accuracy"} | {
    "measured_comm_s": 0.01, "accuracy": None}
GRPC_NO_UPDATE = {"round": 3, "device": 2, "device_type": "tx2", "p": 0.5, "r": 4,
                  "ratio": None, "no_update": "out_of_memory", "peak_memory_bytes": None,
                  "fits_memory": False, "accuracy": None}
SIM_ROUND = {"round": 1, "summary": True, "clock": 0.0325, "round_time": 0.0325,
             "waiting_time": 0.0161, "mean_sparsity": 0.0, "accuracy": 0.515625}
GRPC_ROUND = {"round": 3, "summary": True, "clock": 9.5, "round_time": 3.1,
              "wall_time_s": 3.3, "wall_clock": 10.2, "close_reason": "quorum",
              "devices": [0, 1], "stragglers": [2], "no_update": [2], "waiting_time": 0.4,
              "mean_sparsity": None, "accuracy": None,
              "overhead_s": {"accept": 0.01, "close": 0.2, "eval": 0.0, "plan": 0.05}}
LINES = [SIM_DEVICE, SIM_DEVICE_OOM, GRPC_DEVICE, GRPC_NO_UPDATE, SIM_ROUND, GRPC_ROUND]


@pytest.mark.parametrize("line", LINES)
def test_every_kind_of_line_round_trips_key_for_key(line):
    row = from_json(line)
    assert isinstance(row, RoundRow if line.get("summary") else DeviceRow)
    assert json.dumps(row.to_json()) == json.dumps(line)   # same keys, order and values


def test_writer_then_reader_gives_the_rows_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [from_json(x) for x in LINES]
    append_metrics(path, rows[:3])
    append_metrics(path, rows[3:])
    assert read_metrics(path) == rows
    assert path.read_text() == "".join(json.dumps(x) + "\n" for x in LINES)


def test_typed_fields():
    dev = from_json(SIM_DEVICE)
    assert (dev.round, dev.device, dev.r, dev.fits_memory) == (2, 1, 2, True)
    assert dev.measured_comm_s is None and dev.no_update is None
    gone = from_json(GRPC_NO_UPDATE)
    assert gone.no_update == "out_of_memory" and gone.completion_time is None
    rnd = from_json(GRPC_ROUND)
    assert rnd.summary and rnd.stragglers == [2] and rnd.overhead_s["plan"] == 0.05


def test_older_lines_read_and_bad_lines_are_named(tmp_path):
    old = {k: v for k, v in SIM_DEVICE.items() if k != "aggregation_weight"}   # older runs
    assert from_json(old).aggregation_weight is None
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(SIM_ROUND) + "\n" + json.dumps({**SIM_DEVICE, "speed": 1}) + "\n")
    with pytest.raises(MetricsError, match=r"line 2: unknown key\(s\) \['speed'\]"):
        read_metrics(path)
    path.write_text(json.dumps(SIM_ROUND) + "\n" + '{"round": 1, "summary": tru\n')
    with pytest.raises(MetricsError, match="line 2 is not valid JSON"):
        read_metrics(path)
    with pytest.raises(MetricsError, match="RoundRow"):
        from_json({"round": 1, "summary": True})   # no clock


def test_truncate_keeps_rounds_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [from_json({**line, "round": t}) for t in (1, 2, 3)
            for line in (SIM_DEVICE, SIM_ROUND)]
    append_metrics(path, rows)
    path.write_text(path.read_text() + json.dumps(SIM_DEVICE)[:20])   # killed mid-line
    truncate_metrics(path, 2)
    assert read_metrics(path) == rows[:4]


def test_a_write_that_fails_is_one_storage_error_naming_the_file(tmp_path):
    from fedspine_jax.errors import StorageError

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")   # a file where the run directory should be: ENOTDIR, even as root
    path = blocker / "metrics.jsonl"
    with pytest.raises(StorageError, match=r"cannot write .*not_a_dir/metrics\.jsonl.*Not a "
                                           r"directory"):
        append_metrics(path, [RoundRow(round=1, clock=1.0, round_time=1.0)])
