"""The coordinator's recovery from damage and from failed writes (server.coordinator), on
the tiny config: a damaged newest checkpoint falls back to the newest intact one with its
round's journal replayed; journal entries that cannot be replayed are set aside, never
deleted; a failed journal or checkpoint write ends the run with one clear error and the run
resumes from what was written before.

The coordinator runs in this process and devices are stand-ins (their tasks' own tensors,
no training) submitted through ``Coordinator.submit``, as the servicer does.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedspine_jax import checkpoint
from fedspine_jax.config import load_config
from fedspine_jax.errors import StorageError
from fedspine_jax.federation import DeviceUpdate
from fedspine_jax.models.state import flatten

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
N = 3  # tiny.yaml's devices


@pytest.fixture(scope="module")
def cfg(shared_data):
    return load_config(TINY, ["federation.simulated_clock=true",
                              f"data.source={shared_data / 'sst2'}", "federation.rounds=3",
                              "federation.eval_every=0", "export.at_end=false"])


def stand_in(coord, i: int) -> DeviceUpdate:
    """Device ``i``'s update for the round being collected, made of its task's tensors."""
    _, tasks = coord.fed.plan(coord.state)  # idempotent: the plan is in the state
    t = tasks[i]
    rec = t.record
    return DeviceUpdate(
        device_id=i, round=t.round, lora=t.lora, head=t.head,
        head_masks=np.asarray(rec["head_masks"], np.float32),
        channel_masks=np.asarray(rec["channel_masks"], np.float32),
        head_importance=np.zeros_like(rec["head_masks"], np.float32),
        channel_importance=np.zeros_like(rec["channel_masks"], np.float32),
        stream=(int(rec["stream"][0]), int(rec["stream"][1]) + 8), num_samples=8,
        loss_before=0.7, loss_after=0.6 - 0.01 * i, lora_importance=1.0,
        ratio=float(t.ratio), compute_time_s=1.0 + i, comm_time_s=0.1, flops=1e9)


def submit(coord, *devices: int) -> None:
    for i in devices:
        assert coord.submit(stand_in(coord, i), (1.0, 0.1)) is False


class Running:
    """``Coordinator.run`` in a thread (it closes rounds as their devices answer)."""

    def __init__(self, coord):
        self.coord, self.stop, self.errors = coord, threading.Event(), []

        def target():
            try:
                coord.run(self.stop, linger_s=0.0)
            except BaseException as e:  # noqa: BLE001 -- reported by the test
                self.errors.append(e)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def wait_round(self, t: int, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while self.coord.state.round < t:
            assert not self.errors, self.errors
            assert time.monotonic() < end, f"round {t - 1} not closed in {timeout} s"
            time.sleep(0.05)
        with self.coord._cv:  # the close holds it until the round is planned and saved
            pass

    def end(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive() and not self.errors, self.errors


def _flip_bytes(step_dir: Path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of the checkpoint's root data file (the tiny
    config's arrays are small enough to live in it; test_checkpoint flips raw array data)."""
    f = max(step_dir.glob("d/*"), key=lambda f: f.stat().st_size)
    b = bytearray(f.read_bytes())
    mid = len(b) // 2
    b[mid:mid + n] = bytes(x ^ 0xFF for x in b[mid:mid + n])
    f.write_bytes(bytes(b))


def _snapshot(state) -> dict:
    snap = {f"lora/{k}": np.array(v) for k, v in flatten(state.lora).items()}
    snap.update({f"head/{k}": np.array(v) for k, v in flatten(state.head).items()})
    for name in ("head_masks", "channel_masks", "head_importance", "channel_importance",
                 "stream", "rank"):
        snap[f"devices/{name}"] = np.array(getattr(state.devices, name))
    snap["plan_p"], snap["plan_r"] = np.array(state.plan_p), np.array(state.plan_r)
    return snap


def _rounds_logged(out: Path) -> list[int]:
    import json

    return sorted({json.loads(x)["round"] for x in
                   (out / "metrics.jsonl").read_text().splitlines() if x})


def test_damaged_checkpoint_falls_back_replays_and_sets_aside(cfg, tmp_path, caplog):
    """Rounds 1 and 2 close, device 0's round-3 update is acknowledged; then round 2's
    checkpoint gets 64 flipped bytes and device 1's round-2 journal entry is cut short.
    The restarted server restores round 1's checkpoint, replays devices 2 and 0 of round 2,
    moves the cut entry and the round-3 entry to journal/set_aside/ (each reported), and
    once device 1 sends its update again, round 2 closes in exactly the state it closed in
    before."""
    from fedspine_jax.server.coordinator import Coordinator

    out = tmp_path / "run"
    c1 = Coordinator(cfg, out)
    run1 = Running(c1)
    submit(c1, 0, 1, 2)
    run1.wait_round(2)
    submit(c1, 2, 0, 1)          # arrival order 2, 0, 1
    run1.wait_round(3)
    closed_2 = _snapshot(c1.state)
    submit(c1, 0)                # acknowledged: journaled before the answer
    run1.end()
    jdir = out / "journal"
    r2 = sorted(jdir.glob("r00002_*.npz"))
    r3 = sorted(jdir.glob("r00003_*.npz"))
    assert [p.name[-7:] for p in r2] == ["_d2.npz", "_d0.npz", "_d1.npz"] and len(r3) == 1

    r3_size = r3[0].stat().st_size
    _flip_bytes(out / "checkpoints" / "round_00002")
    cut = r2[2]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with caplog.at_level("INFO"):
        c2 = Coordinator(cfg, out, resume=True)
    assert c2.state.round == 2
    assert [u.device_id for u in c2.state.updates] == [2, 0]
    aside = jdir / "set_aside"
    assert sorted(p.name for p in aside.iterdir()) == sorted([cut.name, r3[0].name])
    assert not cut.exists() and not r3[0].exists()
    assert (aside / r3[0].name).stat().st_size == r3_size   # moved as it was
    log = caplog.text
    assert "checkpoints/round_00002 is damaged" in log
    assert f"journal entry {cut.name} cannot be replayed" in log and "set_aside" in log
    assert "1 acknowledged journal entries of later rounds" in log
    assert "resumed from checkpoint round_00001: collecting round 2, 2 journal entries " \
           "replayed" in log
    assert _rounds_logged(out) == [1]

    run2 = Running(c2)
    submit(c2, 1)
    run2.wait_round(3)
    run2.end()
    again = _snapshot(c2.state)
    assert again.keys() == closed_2.keys()
    for k, v in closed_2.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)
    assert _rounds_logged(out) == [1, 2]
    assert checkpoint.restore(out / "checkpoints", c2.fed)[2] == 2  # rewritten, intact


def test_a_failed_journal_write_acknowledges_nothing_and_ends_the_run(cfg, tmp_path):
    """The journal directory replaced by a file (ENOTDIR: chmod does not stop root): the
    update is refused with a StorageError naming the entry and the OS reason, the state is
    unchanged, and ``run`` ends with the same error. Once the directory is back, the run
    resumes from its checkpoint and accepts the update."""
    from fedspine_jax.server.coordinator import Coordinator

    out = tmp_path / "run"
    c = Coordinator(cfg, out)
    shutil.rmtree(out / "journal")
    (out / "journal").write_text("not a directory")
    with pytest.raises(StorageError, match=r"cannot write journal entry '.*r00001_000000_d0"
                                           r"\.npz': Not a directory; the update was not "
                                           r"acknowledged"):
        c.submit(stand_in(c, 0), (1.0, 0.1))
    assert c.state.updates == ()
    with pytest.raises(StorageError, match="r00001_000000_d0"):
        c.run(threading.Event(), linger_s=0.0)

    (out / "journal").unlink()
    (out / "journal").mkdir()
    c2 = Coordinator(cfg, out, resume=True)
    assert c2.state.round == 1 and c2.state.updates == ()
    submit(c2, 0)
    assert [u.device_id for u in c2.state.updates] == [0]


def test_a_failed_checkpoint_at_round_close_ends_the_run_and_resumes(cfg, tmp_path):
    """Round 1's checkpoint fails inside orbax (the process's file-size limit: EFBIG, as
    a full disk fails with ENOSPC): ``run`` ends with a StorageError naming the checkpoint
    and the OS reason; round 0's checkpoint and round 1's journal are intact, and the
    restarted server replays the round and closes it."""
    resource = pytest.importorskip("resource")
    import signal

    from fedspine_jax.server.coordinator import Coordinator

    out = tmp_path / "run"
    c = Coordinator(cfg, out)
    submit(c, 0, 1, 2)           # no run() yet: the round closes below
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))  # metrics fit, orbax's data not
    try:
        with pytest.raises(StorageError) as e:
            c.run(threading.Event(), linger_s=0.0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    msg = str(e.value)
    assert "\n" not in msg and "round_00001" in msg and "File too large (EFBIG)" in msg
    assert checkpoint.steps(out / "checkpoints") == [0]
    assert len(list((out / "journal").glob("r00001_*.npz"))) == N

    c2 = Coordinator(cfg, out, resume=True)
    assert c2.state.round == 1 and len(c2.state.updates) == N
    assert _rounds_logged(out) == []
    run2 = Running(c2)
    run2.wait_round(2)
    run2.end()
    assert checkpoint.steps(out / "checkpoints") == [0, 1] and _rounds_logged(out) == [1]
