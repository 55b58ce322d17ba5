"""Data sets, tokenisation, length buckets, batching and the Dirichlet device partition.

Design note
-----------
One flow, used by the simulator and the device agent alike::

    task = load_task(cfg.data, tokenizer, seed)          # read, validate, subsample, tokenise once
    devices = partition(task, num_devices, cfg.data, seed)   # Dirichlet(alpha) split + held-out
    batches = Batches(task.train.take(devices[i].train_idx), batch_size, seed=...)
    for _ in range(tau): step(state, next(batches))

Sources. ``cfg.data.source`` is a local directory of JSON Lines laid out like
``shared/data/<task>`` when it exists as a directory, or else a Hugging Face data-set id
(``glue`` with configuration ``sst2``/``mnli``, ``databricks/databricks-dolly-15k``) read with
``datasets.load_dataset``. A source that *looks* like a path (starts with ``.``, ``/`` or
``~``, holds more than one ``/``, or ends in ``.json``/``.jsonl``) but is not a directory is an
error naming it, never a silent hub lookup. Local files are read line by line here, so a bad
line is an error naming the file and the line number.

Splits. sst2: ``train`` / ``validation``; mnli: ``train`` / ``validation_matched``; dolly has
one split (a directory holding exactly one ``*.jsonl`` file, or the hub's ``train``), which is
split here into train / eval by a permutation drawn with the fixed seed ``DOLLY_SPLIT_SEED``
(``DOLLY_EVAL_FRACTION`` of the records, at least one, go to eval). The split does not depend
on the run's seed, so runs with different seeds evaluate on the same records.

Dolly template. The prompt is ``"### Instruction:\\n{instruction}\\n\\n### Context:\\n{context}
\\n\\n### Response:\\n"`` with the context block left out when the context is empty; the model
sees ``[bos] + prompt + response + [eos]`` (bos only where the tokenizer itself adds one, e.g.
LLaMA-2; eos is ``eos_token_id``, else ``sep_token_id``). The prompt body, the response header
and the response are tokenised separately (no special tokens), so the boundary between
prompt and response is exact. Truncation to ``max_len`` keeps the response: the prompt body
is cut first, but never below half of ``max_len`` (the header is always kept), then the
response is cut at the right (a cut response carries no eos).

Dolly labels are **already shifted**: ``labels[t] = input_ids[t + 1]`` and ``loss_mask[t] = 1``
exactly where ``input_ids[t + 1]`` is a response token (eos included). A train step takes the
cross entropy of ``logits[:, t]`` against ``labels[:, t]`` weighted by ``loss_mask``; nothing
downstream shifts.

Batches. Every batch holds exactly ``batch_size`` rows, padded along the sequence to the
smallest length bucket (``cfg.data.length_buckets`` plus ``max_len``) that fits its longest
example, so a run compiles once per bucket. The last partial batch of an epoch is **padded,
not dropped** (a device may hold fewer examples than a batch): padding rows repeat a real row
(so no row is fully masked, which could make attention softmax NaN) and carry
``example_mask = 0`` (and, for dolly, ``loss_mask = 0``), so a loss weighted by them is
unaffected. All arrays are numpy int32.

Packed tokens. A classification batch also carries ``token_index`` (:func:`pack_index`):
the flat positions of its real tokens, so the encoder runs its linears on those rows alone
(``models.encoder``). Their count is rounded up to a multiple of an eighth of the padded
grid (``PACK_STEPS``), so the shapes a run compiles stay few: at most eight per length
bucket, in practice two or three (an SST-2 batch of 32 padded to 64 tokens holds ~425 real
tokens, T = 512 of 2048). Causal-LM batches are not packed.

Partition. Per class, device proportions are drawn from Dir(alpha * 1_N) (paper Sec. 5.2:
"we sample D ~ Dir(alpha) and allocate data D_i to device i"); the minimum number of samples
per device is then met by moving random samples from the currently largest device to the
smallest (moves nothing when already met). Written here in ~40 lines of numpy rather than
with flwr-datasets' DirichletPartitioner: that would pull in flwr (a heavy dependency) for a
short, easily tested function. Dolly has no labels: it is partitioned by a pseudo-label, the
record's category (the paper splits dolly "based on the categories of questions") when the
record carries one, else whether it has a context (the local copy has no category field).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedspine_jax.config import DataConfig
from fedspine_jax.errors import UserError

NUM_LABELS = {"sst2": 2, "mnli": 3, "dolly": None}
# Split names of each task (local file stems and hub split names alike); dolly has one.
SPLITS = {"sst2": ("train", "validation"), "mnli": ("train", "validation_matched"),
          "dolly": ("train",)}
# Text fields every record must carry (strings; dolly's context may be empty).
TEXT_FIELDS = {"sst2": ("sentence",), "mnli": ("premise", "hypothesis"),
               "dolly": ("instruction", "context", "response")}
# The eight categories of databricks-dolly-15k (pseudo-labels of the partition when present).
DOLLY_CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing",
                    "general_qa", "information_extraction", "open_qa", "summarization")
DOLLY_EVAL_FRACTION = 0.1
DOLLY_SPLIT_SEED = 0
RESPONSE_HEADER = "### Response:\n"

# Independent random streams derived from the run's seed.
_STREAM_SUBSAMPLE = 0
_STREAM_PARTITION = 1


class DataError(UserError, ValueError):
    """A data source, file or record is invalid; the message names where."""


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """Tokenised examples of one split, right-padded to a common width W.

    Attributes:
        input_ids: (n, W) int32 token ids, ``pad_id`` after each example's length.
        attention_mask: (n, W) int32, 1 on real tokens.
        token_type_ids: (n, W) int32 segment ids (classification; zeros where the tokenizer
            returns none), None for dolly.
        labels: (n,) int32 class ids (classification) or (n, W) int32 next-token targets
            (dolly, already shifted: ``labels[:, t] = input_ids[:, t + 1]``).
        loss_mask: (n, W) int32, 1 where ``labels`` is a response token (dolly); None for
            classification.
        lengths: (n,) int32 number of real tokens.
        groups: (n,) int32 the label the Dirichlet partition stratifies by (the class, or the
            dolly pseudo-label).
        source_row: (n,) int64 row of the example in its source split (0-based).
        pad_id: token id used for padding.
        buckets: sorted padded lengths a batch may take (the last is ``max_len``).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    labels: np.ndarray
    loss_mask: np.ndarray | None
    lengths: np.ndarray
    groups: np.ndarray
    source_row: np.ndarray
    pad_id: int
    buckets: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def is_causal_lm(self) -> bool:
        return self.loss_mask is not None

    def take(self, idx: np.ndarray | Sequence[int]) -> Examples:
        """The examples at ``idx`` ((k,) integer indices), in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return dataclasses.replace(
            self, input_ids=self.input_ids[idx], attention_mask=self.attention_mask[idx],
            token_type_ids=pick(self.token_type_ids), labels=self.labels[idx],
            loss_mask=pick(self.loss_mask), lengths=self.lengths[idx],
            groups=self.groups[idx], source_row=self.source_row[idx])


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """A task's tokenised train and eval examples.

    Attributes:
        task: "sst2", "mnli" or "dolly".
        train: training examples (the pool the devices are partitioned from).
        eval: examples of the evaluation split.
        num_labels: 2 (sst2), 3 (mnli) or None (dolly).
    """

    task: str
    train: Examples
    eval: Examples
    num_labels: int | None


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceData:
    """One device's share of ``TaskData.train``.

    Attributes:
        train_idx: (n_i,) sorted int64 indices into ``task.train`` the device trains on.
        holdout_idx: (m_i,) sorted int64 indices into ``task.train`` held out for its
            local evaluation (disjoint from ``train_idx``).
    """

    train_idx: np.ndarray
    holdout_idx: np.ndarray


# ----------------------------------------------------------------------------- reading


def _looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
            or source.endswith((".json", ".jsonl")))


def _fields(task: str) -> list[str]:
    return list(TEXT_FIELDS[task]) + (["label"] if NUM_LABELS[task] is not None else [])


def _check_record(rec: Any, task: str, where: str) -> dict:
    """Validate one raw record (fields, types, label range); errors name ``where``."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for name in TEXT_FIELDS[task]:
        if name not in rec:
            raise DataError(f"{where}: missing field {name!r} ({task} records need "
                            f"{_fields(task)}; this one has {sorted(rec)})")
        if not isinstance(rec[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {rec[name]!r}")
    num_labels = NUM_LABELS[task]
    if num_labels is not None:
        if "label" not in rec:
            raise DataError(f"{where}: missing field 'label' ({task} records need "
                            f"{_fields(task)}; this one has {sorted(rec)})")
        label = rec["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{where}: label {label!r} is not an integer")
        if not 0 <= label < num_labels:
            raise DataError(f"{where}: unknown label {label} (allowed 0..{num_labels - 1})")
    elif rec.get("category") is not None and rec["category"] not in DOLLY_CATEGORIES:
        raise DataError(f"{where}: unknown category {rec['category']!r} "
                        f"(allowed {list(DOLLY_CATEGORIES)})")
    return rec


def read_jsonl(path: str | Path, task: str) -> list[dict]:
    """Read and validate a JSON Lines file of ``task`` records (blank lines are skipped).

    Raises:
        DataError: naming the file and the 1-based line number of a line that is not valid
            JSON, not an object, lacks a field, or has a non-integer or unknown label.
    """
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            records.append(_check_record(rec, task, where))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _read_hub(source: str, task: str, split: str) -> list[dict]:
    try:
        import datasets  # deferred: only hub sources need it
    except ImportError:
        raise DataError(f"data.source={source!r} is not a local directory, and reading it "
                        f"from the Hugging Face hub needs the 'hub' extra: pip install "
                        f"'fedspine-jax[hub]'") from None

    config = task if source.rsplit("/", 1)[-1] == "glue" else None
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # the hub raises many types; re-raise naming the source
        raise DataError(f"could not load hub data set {source!r} (config {config!r}, split "
                        f"{split!r}): {type(e).__name__}: {str(e).splitlines()[0][:200]}; "
                        f"without a hub, point data.source at a local directory") from e
    rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
    if not rows:
        raise DataError(f"hub data set {source!r} split {split!r}: no records")
    return [_check_record(r, task, f"{source}[{split}] row {i}") for i, r in enumerate(rows)]


def _split_dolly(records: list[dict]) -> tuple[list[dict], list[dict], np.ndarray, np.ndarray]:
    """The fixed-seed train / eval split of dolly's single split (rows into ``records``)."""
    n = len(records)
    if n < 2:
        raise DataError(f"dolly needs at least 2 records to split into train/eval, got {n}")
    perm = np.random.default_rng(DOLLY_SPLIT_SEED).permutation(n)
    n_eval = max(1, int(round(DOLLY_EVAL_FRACTION * n)))
    eval_rows, train_rows = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    return ([records[i] for i in train_rows], [records[i] for i in eval_rows],
            train_rows, eval_rows)


def load_records(task: str, source: str) -> tuple[list[dict], list[dict]]:
    """The validated raw records of a task's train and eval splits.

    Args:
        task: "sst2", "mnli" or "dolly".
        source: a local directory laid out like ``shared/data/<task>`` or a hub data-set id.

    Returns:
        (train records, eval records), each a list of dicts with the task's fields. For dolly
        the records are those of the fixed-seed train / eval split (see the module note).
    """
    train, ev, _, _ = _load_records(task, source)
    return train, ev


def _load_records(task: str, source: str
                  ) -> tuple[list[dict], list[dict], np.ndarray, np.ndarray]:
    if task not in NUM_LABELS:
        raise DataError(f"unknown task {task!r}; allowed {sorted(NUM_LABELS)}")
    path = Path(source).expanduser()
    if path.is_dir():
        if task == "dolly":
            files = sorted(path.glob("*.jsonl"))
            if len(files) != 1:
                raise DataError(f"dolly source {str(path)!r} must hold exactly one *.jsonl "
                                f"file, found {[f.name for f in files]}")
            splits = [read_jsonl(files[0], task)]
        else:
            splits = []
            for split in SPLITS[task]:
                f = path / f"{split}.jsonl"
                if not f.is_file():
                    raise DataError(f"{task} source {str(path)!r} has no {f.name} (expected "
                                    f"{', '.join(s + '.jsonl' for s in SPLITS[task])})")
                splits.append(read_jsonl(f, task))
    elif _looks_local(source):
        raise DataError(f"data source {source!r} looks like a local path but is not a "
                        f"directory; point data.source at the data (e.g. --set "
                        f"data.source=../shared/data/{task})")
    else:
        splits = [_read_hub(source, task, split) for split in SPLITS[task]]
    if task == "dolly":
        return _split_dolly(splits[0])
    train, ev = splits
    return train, ev, np.arange(len(train)), np.arange(len(ev))


# ------------------------------------------------------------------------ tokenisation


def length_buckets(cfg_data: DataConfig) -> tuple[int, ...]:
    """The sorted padded lengths a batch may take: ``cfg_data.length_buckets`` + max_len."""
    bad = [b for b in cfg_data.length_buckets if not 1 <= b <= cfg_data.max_len]
    if bad:
        raise DataError(f"data.length_buckets {bad} must lie in [1, data.max_len="
                        f"{cfg_data.max_len}]")
    return tuple(sorted(set(cfg_data.length_buckets) | {cfg_data.max_len}))


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length`` (``buckets`` sorted)."""
    for b in buckets:
        if b >= length:
            return b
    raise DataError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def dolly_prompt(instruction: str, context: str) -> str:
    """The prompt body of a dolly record (without the response header)."""
    text = f"### Instruction:\n{instruction}\n\n"
    if context.strip():
        text += f"### Context:\n{context}\n\n"
    return text


def _dolly_group(rec: dict) -> int:
    """Partition pseudo-label: the category index, else 8 + (has a context)."""
    if rec.get("category") is not None:
        return DOLLY_CATEGORIES.index(rec["category"])
    return len(DOLLY_CATEGORIES) + int(bool(rec["context"].strip()))


def _pad_rows(rows: list[list[int]], width: int, value: int) -> np.ndarray:
    out = np.full((len(rows), width), value, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _special_ids(tokenizer) -> tuple[list[int], int, int]:
    """(leading bos ids the tokenizer adds itself, eos id, pad id)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    bos = [bos_id] if bos_id is not None and probe and probe[0] == bos_id else []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has neither an eos nor a sep token to end responses")
    pad = getattr(tokenizer, "pad_token_id", None)
    return bos, int(eos), int(pad if pad is not None else 0)


def _encode_classification(tokenizer, task: str, records: list[dict], max_len: int,
                           pad_id: int) -> dict[str, Any]:
    if task == "sst2":
        enc = tokenizer([r["sentence"] for r in records], truncation=True, max_length=max_len,
                        return_attention_mask=False)
    else:
        enc = tokenizer([r["premise"] for r in records], [r["hypothesis"] for r in records],
                        truncation=True, max_length=max_len, return_attention_mask=False)
    ids = enc["input_ids"]
    lengths = np.array([len(x) for x in ids], dtype=np.int32)
    width = int(lengths.max())
    tt = enc.get("token_type_ids")
    labels = np.array([r["label"] for r in records], dtype=np.int32)
    return dict(input_ids=_pad_rows(ids, width, pad_id),
                token_type_ids=(_pad_rows(tt, width, 0) if tt is not None
                                else np.zeros((len(ids), width), np.int32)),
                labels=labels, loss_mask=None, lengths=lengths, groups=labels.copy())


def _encode_dolly(tokenizer, records: list[dict], max_len: int, bos: list[int], eos: int,
                  pad_id: int) -> dict[str, Any]:
    # Pieces longer than max_len are cut by the tokenizer already (a response cut there can
    # never keep its eos below, as the prompt header takes room too).
    kw = dict(add_special_tokens=False, truncation=True, max_length=max_len,
              return_attention_mask=False)
    header = tokenizer(RESPONSE_HEADER, **kw)["input_ids"]
    bodies = tokenizer([dolly_prompt(r["instruction"], r["context"]) for r in records],
                       **kw)["input_ids"]
    responses = tokenizer([r["response"] for r in records], **kw)["input_ids"]
    fixed = len(bos) + len(header)
    seqs, labels, masks = [], [], []
    for body, resp in zip(bodies, responses):
        resp = list(resp) + [eos]
        prompt_budget = max(max_len - len(resp), max_len // 2)
        prompt = bos + list(body)[:max(0, prompt_budget - fixed)] + list(header)
        room = max_len - len(prompt)
        if room < 1:
            raise DataError(f"data.max_len={max_len} leaves no room for a response after the "
                            f"dolly prompt template ({len(prompt)} tokens)")
        seq = prompt + resp[:room]
        seqs.append(seq)
        labels.append(seq[1:] + [pad_id])
        masks.append([0] * (len(prompt) - 1) + [1] * (len(seq) - len(prompt)) + [0])
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    width = int(lengths.max())
    return dict(input_ids=_pad_rows(seqs, width, pad_id), token_type_ids=None,
                labels=_pad_rows(labels, width, pad_id), loss_mask=_pad_rows(masks, width, 0),
                lengths=lengths,
                groups=np.array([_dolly_group(r) for r in records], dtype=np.int32))


def encode(tokenizer, task: str, records: list[dict], max_len: int,
           buckets: tuple[int, ...], source_row: np.ndarray | None = None) -> Examples:
    """Tokenise validated records of ``task`` into :class:`Examples` (truncated to max_len).

    Args:
        tokenizer: any object with the Hugging Face tokenizer call interface.
        task: "sst2" (single sentence), "mnli" (premise, hypothesis pair) or "dolly".
        records: records as returned by :func:`load_records`.
        max_len: longest tokenised sequence kept.
        buckets: the padded lengths batches may take (see :func:`length_buckets`).
        source_row: (n,) rows of the records in their source split (default 0..n-1).
    """
    if not records:
        raise DataError(f"{task}: no records to encode")
    bos, eos, pad_id = _special_ids(tokenizer)
    if task == "dolly":
        enc = _encode_dolly(tokenizer, records, max_len, bos, eos, pad_id)
    else:
        enc = _encode_classification(tokenizer, task, records, max_len, pad_id)
    # Store at the width of the bucket covering the longest example: batching then slices.
    width = pick_bucket(int(enc["lengths"].max()), buckets)

    def widen(a, value):
        if a is None or a.ndim == 1:
            return a
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)

    lengths = enc["lengths"]
    attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    return Examples(
        input_ids=widen(enc["input_ids"], pad_id), attention_mask=attention,
        token_type_ids=widen(enc["token_type_ids"], 0), labels=widen(enc["labels"], pad_id),
        loss_mask=widen(enc["loss_mask"], 0), lengths=lengths, groups=enc["groups"],
        source_row=(np.arange(len(records)) if source_row is None
                    else np.asarray(source_row, dtype=np.int64)),
        pad_id=pad_id, buckets=tuple(buckets))


def _subsample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``k`` of ``n`` items drawn without replacement (all when k is 0)."""
    if k == 0 or k >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=k, replace=False))


def load_task(cfg_data: DataConfig, tokenizer, seed: int) -> TaskData:
    """Read, validate, subsample and tokenise a task's train and eval splits (once).

    ``max_train_samples`` / ``max_eval_samples`` records are drawn with ``seed`` *before*
    tokenising.

    Args:
        cfg_data: the data section of the config (task, source, max_len, buckets, limits).
        tokenizer: any object with the Hugging Face tokenizer call interface.
        seed: the run's seed.

    Returns:
        The :class:`TaskData`.
    """
    task = cfg_data.task
    buckets = length_buckets(cfg_data)
    train, ev, train_rows, eval_rows = _load_records(task, cfg_data.source)
    rng = np.random.default_rng([seed, _STREAM_SUBSAMPLE])
    keep_train = _subsample(len(train), cfg_data.max_train_samples, rng)
    keep_eval = _subsample(len(ev), cfg_data.max_eval_samples, rng)
    return TaskData(
        task=task,
        train=encode(tokenizer, task, [train[i] for i in keep_train], cfg_data.max_len,
                     buckets, train_rows[keep_train]),
        eval=encode(tokenizer, task, [ev[i] for i in keep_eval], cfg_data.max_len, buckets,
                    eval_rows[keep_eval]),
        num_labels=NUM_LABELS[task])


# ---------------------------------------------------------------------------- batching


PACK_STEPS = 8


def pack_index(attention_mask: np.ndarray, steps: int = PACK_STEPS,
               size: int | None = None) -> np.ndarray:
    """Packed-token positions of a padded batch (``layers.Packing``).

    Args:
        attention_mask: (B, L) 1 on real tokens.
        steps: T is rounded up to a multiple of ``ceil(B * L / steps)``.
        size: T itself instead (at least the number of real tokens), e.g. to give the
            batches of devices trained together one shape.
    Returns:
        (T,) int32: the sorted flat positions ``b * L + t`` of the real tokens, then
        distinct spare positions ``B * L, B * L + 1, ...`` up to the bucket T.
    """
    n_grid = attention_mask.size
    real = np.flatnonzero(np.asarray(attention_mask).reshape(-1) > 0)
    quantum = -(-n_grid // steps)
    t = max(quantum, -(-len(real) // quantum) * quantum) if size is None else size
    if t < len(real):
        raise ValueError(f"pack_index: size={t} is below the {len(real)} real tokens")
    return np.concatenate([real, n_grid + np.arange(t - len(real))]).astype(np.int32)


def collate(examples: Examples, idx: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """One padded batch of the examples at ``idx``.

    Args:
        examples: the pool.
        idx: (k,) indices into ``examples``, 1 <= k <= batch_size; rows k..batch_size-1
            repeat row 0 with ``example_mask`` (and dolly ``loss_mask``) 0.
        batch_size: B.

    Returns:
        int32 arrays: input_ids, attention_mask (B, L), token_type_ids (B, L)
        (classification), labels (B,) (classification) or (B, L) with loss_mask (B, L)
        (dolly), example_mask (B,); L is the smallest bucket fitting the longest example;
        token_index (T,) (classification, :func:`pack_index`).
    """
    idx = np.asarray(idx, dtype=np.int64)
    k = len(idx)
    if not 1 <= k <= batch_size:
        raise ValueError(f"a batch takes 1..{batch_size} examples, got {k}")
    rows = np.concatenate([idx, np.full(batch_size - k, idx[0])])
    length = pick_bucket(int(examples.lengths[idx].max()), examples.buckets)
    example_mask = (np.arange(batch_size) < k).astype(np.int32)
    batch = {"input_ids": examples.input_ids[rows, :length],
             "attention_mask": examples.attention_mask[rows, :length]}
    if examples.is_causal_lm:
        batch["labels"] = examples.labels[rows, :length]
        batch["loss_mask"] = examples.loss_mask[rows, :length] * example_mask[:, None]
    else:
        batch["token_type_ids"] = examples.token_type_ids[rows, :length]
        batch["labels"] = examples.labels[rows]
        batch["token_index"] = pack_index(batch["attention_mask"])
    batch["example_mask"] = example_mask
    return {k_: np.ascontiguousarray(v, dtype=np.int32) for k_, v in batch.items()}


class Batches:
    """Endless seeded mini-batches: a fresh permutation each epoch, fixed batch size.

    Epoch e visits the examples in ``default_rng([seed, e]).permutation(n)`` order, in
    chunks of ``batch_size``; an epoch's last chunk is padded (see :func:`collate`). The
    stream depends only on (seed, epoch, position), so ``Batches(..., **b.state())`` resumes
    it exactly (e.g. across rounds or from a checkpoint). Draw tau steps with
    ``[next(b) for _ in range(tau)]``.
    """

    def __init__(self, examples: Examples, batch_size: int, seed: int, *, epoch: int = 0,
                 position: int = 0):
        if len(examples) == 0:
            raise DataError("cannot batch an empty set of examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.position = epoch, position
        self._perm_epoch, self._perm = -1, np.empty(0, np.int64)

    def state(self) -> dict[str, int]:
        """Where the stream stands: {"epoch": e, "position": p}."""
        return {"epoch": self.epoch, "position": self.position}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.examples)), self.epoch
        idx = self._perm[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        if self.position >= len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
        return collate(self.examples, idx, self.batch_size)


def eval_batches(examples: Examples, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order; the last batch padded with ``example_mask`` 0."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples, np.arange(start, min(start + batch_size, len(examples))),
                      batch_size)


# --------------------------------------------------------------------------- partition


def dirichlet_partition(groups: np.ndarray, num_devices: int, alpha: float, min_size: int,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """Split example indices across devices with Dirichlet(alpha) label proportions.

    Paper Sec. 5.2: for every class, device shares are drawn from Dir(alpha * 1_N) and the
    class's (shuffled) examples are cut accordingly. The paper does not say how devices
    left (almost) empty by a small alpha are handled; here a device short of ``min_size``
    receives random examples of the currently largest device until every device has
    ``min_size`` (it inherits that device's skew, so the split stays non-IID).

    Args:
        groups: (n,) int class or pseudo-label of each example.
        num_devices: N.
        alpha: Dirichlet concentration (large: near IID; small: few classes per device).
        min_size: examples each device holds at least.
        rng: the random generator (the split is a pure function of its state).

    Returns:
        N sorted int64 index arrays, disjoint, covering 0..n-1.
    """
    n = len(groups)
    if num_devices * min_size > n:
        raise DataError(f"cannot give {num_devices} devices {min_size} samples each from "
                        f"{n} examples (needs {num_devices * min_size}); lower "
                        f"data.min_samples_per_device or raise data.max_train_samples")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for g in np.unique(groups):
        idx = rng.permutation(np.flatnonzero(groups == g))
        share = rng.dirichlet(np.full(num_devices, alpha))
        cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    out = [np.concatenate(p) for p in parts]
    while True:
        sizes = np.array([len(p) for p in out])
        short, rich = int(np.argmin(sizes)), int(np.argmax(sizes))
        if sizes[short] >= min_size:
            break
        move = int(min(min_size - sizes[short], sizes[rich] - min_size))
        order = rng.permutation(sizes[rich])
        out[short] = np.concatenate([out[short], out[rich][order[:move]]])
        out[rich] = out[rich][order[move:]]
    return [np.sort(p).astype(np.int64) for p in out]


def partition(task_data: TaskData, num_devices: int, cfg_data: DataConfig,
              seed: int) -> list[DeviceData]:
    """Dirichlet(``cfg_data.dirichlet_alpha``) split of ``task_data.train`` over devices.

    Each device then holds out ``round(holdout_fraction * n_i)`` random examples (at least
    one when the fraction is positive, and never all of them) for its local evaluation.

    Args:
        task_data: the loaded task.
        num_devices: N.
        cfg_data: dirichlet_alpha, min_samples_per_device, holdout_fraction.
        seed: the run's seed (the partition is a pure function of it).

    Returns:
        N :class:`DeviceData`, whose index sets are disjoint and together cover the train
        examples once.
    """
    rng = np.random.default_rng([seed, _STREAM_PARTITION])
    shares = dirichlet_partition(task_data.train.groups, num_devices,
                                 cfg_data.dirichlet_alpha, cfg_data.min_samples_per_device,
                                 rng)
    devices = []
    for idx in shares:
        n_hold = int(round(cfg_data.holdout_fraction * len(idx)))
        if cfg_data.holdout_fraction > 0:
            n_hold = max(n_hold, 1)
        n_hold = min(n_hold, len(idx) - 1)
        order = rng.permutation(idx)
        devices.append(DeviceData(train_idx=np.sort(order[n_hold:]),
                                  holdout_idx=np.sort(order[:n_hold])))
    return devices
