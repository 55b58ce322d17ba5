"""Tests of the orbax checkpoints (fedspine_jax.checkpoint): leaf-by-leaf round trips of
federation states and exact resume, with a tiny fake global LoRA and fake device updates."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from fedspine_jax import checkpoint
from fedspine_jax.config import from_dict
from fedspine_jax.federation import DeviceTask, DeviceUpdate, Federation, FederationState
from fedspine_jax.models.arch import ArchConfig
from fedspine_jax.models.state import flatten, unflatten

R, ALPHA, N = 8, 16.0, 3
PAIRS = ("layers/0/attn/q", "layers/1/mlp/fc1")
SHAPES = {"layers/0/attn/q": (16, 12), "layers/1/mlp/fc1": (16, 24)}
TIERS = np.array([0, 1, 2])
ARCH = ArchConfig(arch="bert", vocab_size=8, hidden_size=16, num_layers=2, num_heads=3,
                  num_kv_heads=3, head_dim=4, intermediate_size=8)   # masks (2, 3), (2, 8)


def make_fed(strategy: str = "fedspine") -> Federation:
    cfg = from_dict({"lora": {"rank": R, "alpha": ALPHA, "rank_choices": [2, 4, 8]},
                     "pruning": {"target_ratio": 0.5, "target_round": 3},
                     "federation": {"strategy": strategy, "num_devices": N, "rounds": 6}})
    return Federation(cfg, N, TIERS, ARCH)


def init_state(fed: Federation) -> FederationState:
    rng = np.random.default_rng(0)
    lora = {}
    for p in PAIRS:
        d, k = SHAPES[p]
        lora[p + "/lora_a"] = (0.02 * rng.normal(size=(d, R))).astype(np.float32)
        lora[p + "/lora_b"] = np.zeros((R, k), np.float32)
    head = {"head/kernel": rng.normal(size=(16, 2)).astype(np.float32),
            "head/bias": np.zeros(2, np.float32)}
    return fed.init(unflatten(lora), unflatten(head))


def fake_update(task: DeviceTask) -> DeviceUpdate:
    """A device's update as a pure function of (device, round) (not of dict order:
    a restored state holds its dicts in sorted key order)."""
    rng = np.random.default_rng((7, task.device_id, task.round))
    lb = float(1.0 + rng.random())
    return DeviceUpdate(
        device_id=task.device_id, round=task.round,
        lora=unflatten({k: (0.3 * rng.normal(size=v.shape)).astype(np.float32)
                        for k, v in sorted(flatten(task.lora).items())}),
        head=unflatten({k: (v + 0.1 * rng.normal(size=v.shape)).astype(np.float32)
                        for k, v in sorted(flatten(task.head).items())}),
        head_masks=task.record["head_masks"] * (rng.random((2, 3)) > 0.3),
        channel_masks=task.record["channel_masks"] * (rng.random((2, 8)) > 0.3),
        head_importance=rng.random((2, 3)).astype(np.float32),
        channel_importance=rng.random((2, 8)).astype(np.float32),
        stream=(int(task.round), int(rng.integers(0, 40))),
        num_samples=int(rng.integers(5, 50)), loss_before=lb,
        loss_after=lb - 0.5 * float(rng.random()), lora_importance=float(rng.random()),
        ratio=float(min(1.0, task.ratio + 0.01 * rng.random())) if task.ratio > 0 else 0.0,
        compute_time_s=float(rng.uniform(0.5, 2.0)), comm_time_s=float(rng.uniform(0.1, 0.5)),
        flops=float(rng.uniform(1e9, 2e9)), peak_memory_bytes=int(rng.integers(1, 2**40)),
        params_alive=int(rng.integers(1, 10**6)))


def accept_some(fed, state, order):
    state, tasks = fed.plan(state)
    for i in order:
        state = fed.accept(state, fake_update(tasks[i]))
    return state


def play(fed: Federation, state: FederationState, rounds: int) -> FederationState:
    for _ in range(rounds):
        state, _ = fed.close(accept_some(fed, state, [2, 0, 1]))
    return state


def _equal(x, y, what: str) -> None:
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, f"{what}: dtype {x.dtype} != {y.dtype}"
    np.testing.assert_array_equal(x, y, err_msg=what)


def _trees_equal(t1: dict, t2: dict, what: str) -> None:
    """The same tree (structure, integer layer keys included) with equal leaves."""
    assert jax.tree.structure(t1) == jax.tree.structure(t2), what
    for k, v in flatten(t1).items():
        _equal(v, flatten(t2)[k], f"{what}[{k}]")


def assert_states_equal(s1: FederationState, s2: FederationState) -> None:
    """Every leaf of two federation states equal (values and dtypes)."""
    assert s1.round == s2.round
    for name in ("lora", "head"):
        _trees_equal(getattr(s1, name), getattr(s2, name), name)
    for f in dataclasses.fields(s1.devices):
        _equal(getattr(s1.devices, f.name), getattr(s2.devices, f.name), f"devices.{f.name}")
    assert s1.skipped == s2.skipped
    for name in ("plan_p", "plan_r"):
        v1, v2 = getattr(s1, name), getattr(s2, name)
        assert (v1 is None) == (v2 is None), name
        if v1 is not None:
            _equal(v1, v2, name)
    assert (s1.bandit is None) == (s2.bandit is None)
    if s1.bandit is not None:
        for f in dataclasses.fields(s1.bandit):
            if f.name != "params":
                _equal(getattr(s1.bandit, f.name), getattr(s2.bandit, f.name),
                       f"bandit.{f.name}")
        for f in dataclasses.fields(s1.bandit.params):
            _equal(getattr(s1.bandit.params, f.name), getattr(s2.bandit.params, f.name),
                   f"bandit.params.{f.name}")
    assert len(s1.updates) == len(s2.updates)
    for i, (u1, u2) in enumerate(zip(s1.updates, s2.updates)):
        for f in dataclasses.fields(DeviceUpdate):
            v1, v2 = getattr(u1, f.name), getattr(u2, f.name)
            if isinstance(v1, dict):
                _trees_equal(v1, v2, f"updates[{i}].{f.name}")
            elif isinstance(v1, np.ndarray):
                _equal(v1, v2, f"updates[{i}].{f.name}")
            else:
                assert v1 == v2 and type(v1) is type(v2), (i, f.name, v1, v2)


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("strategy", ["fedspine", "fedlora_prune"])   # with / without bandit
def test_mid_round_state_round_trips_leaf_by_leaf(tmp_path, strategy):
    fed = make_fed(strategy)
    state = play(fed, init_state(fed), 2)
    state = accept_some(fed, state, [2, 0])      # pending updates, arrival order 2, 0
    assert state.plan_p is not None and len(state.updates) == 2
    extra = {"clock": np.float64(12.5), "stream": np.arange(6).reshape(3, 2),
             "masks": np.ones((3, 2, 4), np.float32)}
    path = checkpoint.save(tmp_path / "ck", state.round, state, extra)
    assert path.name == "round_00003" and path.is_dir()
    restored, got_extra, step = checkpoint.restore(tmp_path / "ck", make_fed(strategy))
    assert step == 3
    assert_states_equal(state, restored)
    assert [u.device_id for u in restored.updates] == [2, 0]
    assert got_extra.keys() == extra.keys()
    for k, v in extra.items():
        _equal(got_extra[k], v, k)


def test_post_close_state_round_trips_leaf_by_leaf(tmp_path):
    fed = make_fed()
    state = play(fed, init_state(fed), 3)
    assert state.plan_p is None and state.updates == ()
    checkpoint.save(tmp_path, 3, state)
    restored, extra, step = checkpoint.restore(tmp_path, fed)
    assert step == 3 and extra == {}
    assert_states_equal(state, restored)


def test_state_to_tree_holds_numpy_leaves_only():
    fed = make_fed()
    state = accept_some(fed, play(fed, init_state(fed), 1), [1])
    tree = checkpoint.state_to_tree(state)
    leaves = []

    def walk(t, path):
        if isinstance(t, dict):
            for k, v in t.items():
                assert "/" not in k, f"orbax would read {path + k!r} as a file path"
                walk(v, path + k + ".")
        else:
            leaves.append((path, t))
    walk(tree, "")
    assert leaves and all(isinstance(v, (np.ndarray, np.generic)) for _, v in leaves)
    assert_states_equal(state, checkpoint.state_from_tree(tree, fed))


def test_restore_picks_the_newest_or_the_step_asked_for(tmp_path):
    fed = make_fed()
    state = init_state(fed)
    saved = {}
    for step in (1, 2, 12):
        state = play(fed, state, 1)
        saved[step] = state
        checkpoint.save(tmp_path, step, state)
    assert checkpoint.steps(tmp_path) == [1, 2, 12]
    got, _, step = checkpoint.restore(tmp_path, fed)
    assert step == 12
    assert_states_equal(got, saved[12])
    got, _, step = checkpoint.restore(tmp_path, fed, step=2)
    assert step == 2
    assert_states_equal(got, saved[2])


def test_keep_prunes_old_checkpoints(tmp_path):
    fed = make_fed()
    state = init_state(fed)
    for step in range(1, 6):
        state = play(fed, state, 1)
        checkpoint.save(tmp_path, step, state, keep=2)
        assert checkpoint.steps(tmp_path) == list(range(max(1, step - 1), step + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_00004", "round_00005"]
    assert_states_equal(checkpoint.restore(tmp_path, fed)[0], state)


def test_saving_a_step_again_overwrites_it(tmp_path):
    fed = make_fed()
    s1 = play(fed, init_state(fed), 1)
    s2 = play(fed, s1, 1)
    checkpoint.save(tmp_path, 1, s1)
    checkpoint.save(tmp_path, 1, s2)
    assert checkpoint.steps(tmp_path) == [1]
    assert_states_equal(checkpoint.restore(tmp_path, fed)[0], s2)


def test_missing_directory_or_step_is_an_error(tmp_path):
    fed = make_fed()
    assert checkpoint.steps(tmp_path / "nothing") == []
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path / "nothing", fed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path / "empty", fed)
    checkpoint.save(tmp_path / "ck", 2, init_state(fed))
    with pytest.raises(FileNotFoundError, match=r"round_00005.*\[2\]"):
        checkpoint.restore(tmp_path / "ck", fed, step=5)


def test_unfinished_save_is_never_picked_up(tmp_path):
    """A crash mid-save leaves orbax's temporary directory; restore ignores it."""
    fed = make_fed()
    state = play(fed, init_state(fed), 1)
    checkpoint.save(tmp_path, 1, state)
    (tmp_path / "round_00002.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "notes").mkdir()
    assert checkpoint.steps(tmp_path) == [1]
    got, _, step = checkpoint.restore(tmp_path, fed)
    assert step == 1
    assert_states_equal(got, state)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("strategy", ["fedspine", "hetlora"])
@pytest.mark.parametrize("cut", ["between rounds", "mid-round"])
def test_resume_equals_an_uninterrupted_run(tmp_path, strategy, cut):
    """6 rounds straight == 3 rounds, checkpoint, restore into a new Federation, 3 more."""
    fed = make_fed(strategy)
    straight = play(fed, init_state(fed), 6)

    first = play(fed, init_state(fed), 3)
    if cut == "mid-round":       # round 4 planned, two of three updates in
        first = accept_some(fed, first, [1, 2])
    checkpoint.save(tmp_path, first.round, first, keep=1)
    del fed, first

    fed2 = make_fed(strategy)    # a restarted server
    state, _, _ = checkpoint.restore(tmp_path, fed2)
    if cut == "mid-round":
        state, tasks = fed2.plan(state)       # idempotent: the same tasks as before
        state = fed2.accept(state, fake_update(tasks[0]))
        state, _ = fed2.close(state)
        state = play(fed2, state, 2)
    else:
        state = play(fed2, state, 3)
    assert state.round == 7
    assert_states_equal(straight, state)


def test_a_checkpoint_without_device_records_is_a_clear_error(tmp_path):
    """A checkpoint of the older format (records outside the state) is refused by name."""
    from fedspine_jax.errors import RunDirError

    fed = make_fed()
    tree = checkpoint.state_to_tree(play(fed, init_state(fed), 1))
    del tree["devices"]
    with pytest.raises(RunDirError, match="older fedspine-jax"):
        checkpoint.state_from_tree(tree, fed)


# ------------------------------------------------------------- damage and failed writes


def _flip_bytes(step_dir, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of the checkpoint's largest data file (orbax's
    OCDBT value file, where the arrays are)."""
    f = max(step_dir.glob("ocdbt.process_0/d/*"), key=lambda f: f.stat().st_size)
    b = bytearray(f.read_bytes())
    mid = len(b) // 2
    b[mid:mid + n] = bytes(x ^ 0xFF for x in b[mid:mid + n])
    f.write_bytes(bytes(b))


def _saved_rounds(tmp_path, fed, rounds=(1, 2, 3)) -> dict:
    """Checkpoints of consecutive rounds, each with an array large enough to be stored as
    raw data (flipped bytes there decode to finite garbage rather than a read error)."""
    state, saved = init_state(fed), {}
    big = np.random.default_rng(1).normal(size=(128, 128)).astype(np.float32)
    for step in rounds:
        state = play(fed, state, 1)
        saved[step] = state
        checkpoint.save(tmp_path, step, state, {"big": big})
    return saved


def test_flipped_bytes_fall_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    """64 flipped bytes in the newest checkpoint's data: orbax reads them back as garbage
    without an error, the digest does not match, and restore takes the round before, with a warning
    naming the damaged checkpoint."""
    import orbax.checkpoint as ocp

    fed = make_fed()
    saved = _saved_rounds(tmp_path, fed)
    _flip_bytes(tmp_path / "round_00003")
    # what orbax alone would resume on: it reads the damaged data without an error
    raw = ocp.StandardCheckpointer().restore(tmp_path / "round_00003")
    saved_digest = json.loads((tmp_path / "round_00003" / checkpoint.DIGEST_FILE).read_text())
    assert checkpoint.tree_digest(raw) != saved_digest["sha256"]
    with caplog.at_level("WARNING", logger="fedspine.checkpoint"):
        got, _, step = checkpoint.restore(tmp_path, fed)
    assert step == 2
    assert_states_equal(got, saved[2])
    assert "round_00003 is damaged (its contents do not match its digest)" in caplog.text
    from fedspine_jax.errors import RunDirError

    with pytest.raises(RunDirError, match="round_00003.*damaged.*digest"):
        checkpoint.restore(tmp_path, fed, step=3)   # a step asked for: no fallback


def test_a_checkpoint_without_its_digest_is_restored_unverified(tmp_path, caplog):
    """An older fedspine-jax's checkpoint, or a crash between orbax's rename and the digest
    file (orbax's rename means the checkpoint is complete): restored, with a warning."""
    fed = make_fed()
    saved = _saved_rounds(tmp_path, fed, rounds=(1, 2))
    (tmp_path / "round_00002" / checkpoint.DIGEST_FILE).unlink()
    with caplog.at_level("WARNING", logger="fedspine.checkpoint"):
        got, _, step = checkpoint.restore(tmp_path, fed)
    assert step == 2 and "round_00002 has no digest.json" in caplog.text
    assert "restored without verification" in caplog.text
    assert_states_equal(got, saved[2])


def test_no_intact_checkpoint_is_a_clear_error_naming_each(tmp_path):
    from fedspine_jax.errors import RunDirError

    fed = make_fed()
    _saved_rounds(tmp_path, fed, rounds=(1, 2))
    _flip_bytes(tmp_path / "round_00002")
    (tmp_path / "round_00001" / checkpoint.DIGEST_FILE).write_text("{")
    with pytest.raises(RunDirError, match=r"no intact checkpoint.*round_00002 \(its contents "
                                          r"do not match.*round_00001 \(unreadable digest"):
        checkpoint.restore(tmp_path, fed)


def test_keep_prunes_only_steps_before_the_one_saved(tmp_path):
    """After a fallback from a damaged round 3 to round 2, saving round 3 again overwrites
    it; rounds before are pruned to ``keep``."""
    fed = make_fed()
    saved = _saved_rounds(tmp_path, fed)
    _flip_bytes(tmp_path / "round_00003")
    state, _, step = checkpoint.restore(tmp_path, fed)
    assert step == 2
    checkpoint.save(tmp_path, 3, play(fed, state, 1), keep=2)
    assert checkpoint.steps(tmp_path) == [2, 3]
    assert_states_equal(checkpoint.restore(tmp_path, fed)[0], play(fed, saved[2], 1))


def test_a_file_size_limit_mid_save_is_one_clear_error_and_keeps_the_previous(tmp_path):
    """A real write failure inside orbax (the process's file-size limit, EFBIG, as a full
    disk fails with ENOSPC): StorageError naming the checkpoint and the OS reason; the
    half-written step is removed and the previous checkpoint restores as it was."""
    resource = pytest.importorskip("resource")
    import signal

    from fedspine_jax.errors import StorageError

    fed = make_fed()
    saved = _saved_rounds(tmp_path, fed, rounds=(1,))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(StorageError) as e:
            checkpoint.save(tmp_path, 2, play(fed, saved[1], 1),
                            {"big": np.zeros((128, 128), np.float32)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    msg = str(e.value)
    assert "\n" not in msg and "round_00002" in msg and "File too large (EFBIG)" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_00001"]
    got, _, step = checkpoint.restore(tmp_path, fed)
    assert step == 1
    assert_states_equal(got, saved[1])


def test_an_unwritable_checkpoint_directory_ends_the_cli_in_one_line(tmp_path, monkeypatch,
                                                                     capsys):
    """A checkpoint directory under a file (ENOTDIR; chmod does not stop root) fails with a
    StorageError, which ``fedspine simulate`` prints as one line with the command that
    resumes the run."""
    from fedspine_jax import cli, simulation
    from fedspine_jax.errors import StorageError

    fed = make_fed()
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(StorageError, match=r"round_00001.*Not a directory \(ENOTDIR\)"):
        checkpoint.save(tmp_path / "run" / "checkpoints", 1, init_state(fed))

    def run(cfg, out, resume=False, progress=True):
        checkpoint.save(tmp_path / "run" / "checkpoints", 1, init_state(fed))

    monkeypatch.setattr(simulation, "run", run)
    assert cli.main(["simulate", "tiny", "--out", str(tmp_path / "out"), "--no-progress",
                     "--no-compile-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedspine simulate: cannot write checkpoint") and \
        "Not a directory" in err and err.endswith(
            f"continue with: fedspine simulate tiny --out {tmp_path / 'out'} --no-progress "
            f"--no-compile-cache --resume")
