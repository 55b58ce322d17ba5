"""Data sets, tokenisation, length buckets, batching and the Dirichlet device partition.

Design note
-----------
One flow, used by the simulator and the device agent alike::

    task = load_task(cfg.data, tokenizer, seed)          # read, validate, subsample, tokenise once
    devices = partition(task, num_devices, cfg.data, seed)   # Dirichlet(alpha) split + held-out
    batches = Batches(task.train.take(devices[i].train_idx), batch_size, seed=...)
    for _ in range(tau): step(state, next(batches))

Tasks. A task is classification (a text, or a pair of texts read as two segments, and a
label) or instruction tuning (a prompt template over the record's columns, and a response).
``data.task`` names a preset, whose columns, labels and splits are fixed (sst2: ``sentence``,
``label`` in 0..1 (negative, positive), splits ``train`` / ``validation``; mnli: ``premise``,
``hypothesis``, ``label`` in 0..2 (entailment, neutral, contradiction), ``train`` /
``validation_matched``; dolly: ``instruction``, ``context``,
``response``, optional ``category``, one split), or an open task, ``classification`` or
``instruction``, whose columns, labels and splits the ``data`` keys give
(:func:`task_spec` -> :class:`TaskSpec`). A label is a class id or, where ``label_names``
are given, a class name.

Sources. ``cfg.data.source`` is a local directory of one file per split, one local file, or
a Hugging Face data-set id; :mod:`fedspine_jax.data_files` reads and validates the records
(JSON Lines, CSV, Parquet, the hub), naming the file, the line and the column of a bad one.

Splits. A task with one split (dolly; a single file; ``data.splits`` of one name) is split
here into train / eval by a permutation drawn with the fixed seed ``SPLIT_SEED``
(``EVAL_FRACTION`` of the records, at least one, go to eval). The split does not depend on
the run's seed, so runs with different seeds evaluate on the same records. A directory
read as one split holds ``<split>.<suffix>`` or exactly one data file.

Instruction template. The prompt is the template filled with the record's columns; the
text after its last field is the response header. The body is cut into blocks at blank
lines, and a block whose fields are all blank is left out: dolly's template is
``"### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n### Response:\n"``,
whose context block goes when the context is empty. The model sees ``[bos] + prompt +
response + [eos]`` (bos only where the tokenizer itself adds one, e.g. LLaMA-2; eos is
``eos_token_id``, else ``sep_token_id``). The prompt body, the response header and the
response are tokenised separately (no special tokens), so the boundary between prompt and
response is exact. Truncation to ``max_len`` keeps the response: the prompt body is cut
first, but never below half of ``max_len`` (the header is always kept), then the response
is cut at the right (a cut response carries no eos).

Instruction labels are **already shifted**: ``labels[t] = input_ids[t + 1]`` and
``loss_mask[t] = 1`` exactly where ``input_ids[t + 1]`` is a response token (eos included).
A train step takes the cross entropy of ``logits[:, t]`` against ``labels[:, t]`` weighted
by ``loss_mask``; nothing downstream shifts.

Batches. Every batch holds exactly ``batch_size`` rows, padded along the sequence to the
smallest length bucket (``cfg.data.length_buckets`` plus ``max_len``) that fits its longest
example, so a run compiles once per bucket. The last partial batch of an epoch is **padded,
not dropped** (a device may hold fewer examples than a batch): padding rows repeat a real row
(so no row is fully masked, which could make attention softmax NaN) and carry
``example_mask = 0`` (and, for instruction, ``loss_mask = 0``), so a loss weighted by them is
unaffected. All arrays are numpy int32.

Packed tokens. A classification batch also carries ``token_index`` (:func:`pack_index`):
the flat positions of its real tokens, so the encoder runs its linears on those rows alone
(``models.encoder``). Their count is rounded up to a multiple of an eighth of the padded
grid (``PACK_STEPS``), so the shapes a run compiles stay few: at most eight per length
bucket, in practice two or three (an SST-2 batch of 32 padded to 64 tokens holds ~425 real
tokens, T = 512 of 2048). Causal-LM batches are not packed.

Partition. ``data.partition: dirichlet`` (ours): per class, device proportions are drawn
from Dir(alpha * 1_N) (paper Sec. 5.2: "we sample D ~ Dir(alpha) and allocate data D_i to
device i"); the minimum number of samples per device is then met by moving random samples
from the currently largest device to the smallest (moves nothing when already met).
``data.partition: flower_dirichlet``: flwr-datasets' ``DirichletPartitioner`` algorithm,
written here (:func:`flower_dirichlet_partition`; its package would pull in ``datasets``),
which gives the same partitions as that class for the same seed, alpha and minimum size,
so results can be set beside Flower baselines; it redraws when a device falls short.
Instruction tasks have no labels: they are partitioned by a pseudo-label, the record's
category (``label_column``; the paper splits dolly "based on the categories of questions")
when the record carries one, else whether every block of its prompt is kept (dolly: whether
it has a context; the local copy has no category field).
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fedspine_jax.config import DataConfig
from fedspine_jax.data_files import DataError, read_splits

# Class names of the GLUE presets' labels, by id (as the Hugging Face ``glue`` data set names
# them); an exported classifier carries its task's names.
SST2_LABELS = ("negative", "positive")
MNLI_LABELS = ("entailment", "neutral", "contradiction")
# The eight categories of databricks-dolly-15k (pseudo-labels of the partition when present).
DOLLY_CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing",
                    "general_qa", "information_extraction", "open_qa", "summarization")
RESPONSE_HEADER = "### Response:\n"
DOLLY_TEMPLATE = "### Instruction:\n{instruction}\n\n### Context:\n{context}\n\n" + RESPONSE_HEADER
# An open instruction task's default template.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n" + RESPONSE_HEADER
# A single split is cut into train / eval: this share of it (at least one record) is eval,
# drawn with this fixed seed.
EVAL_FRACTION = 0.1
SPLIT_SEED = 0

# Independent random streams derived from the run's seed.
_STREAM_SUBSAMPLE = 0
_STREAM_PARTITION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """Tokenised examples of one split, right-padded to a common width W.

    Attributes:
        input_ids: (n, W) int32 token ids, ``pad_id`` after each example's length.
        attention_mask: (n, W) int32, 1 on real tokens.
        token_type_ids: (n, W) int32 segment ids (classification; zeros where the tokenizer
            returns none), None for instruction tasks.
        labels: (n,) int32 class ids (classification) or (n, W) int32 next-token targets
            (instruction, already shifted: ``labels[:, t] = input_ids[:, t + 1]``).
        loss_mask: (n, W) int32, 1 where ``labels`` is a response token (instruction); None for
            classification.
        lengths: (n,) int32 number of real tokens.
        groups: (n,) int32 the label the Dirichlet partition stratifies by (the class, or the
            instruction pseudo-label).
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
        task: ``data.task``: "sst2", "mnli", "dolly", "classification" or "instruction".
        train: training examples (the pool the devices are partitioned from).
        eval: examples of the evaluation split.
        num_labels: number of classes (classification) or None (instruction).
        label_names: the classes' names by id, where the task names them (else ()).
        template: instruction: the prompt template the examples were built with (else "").
    """

    task: str
    train: Examples
    eval: Examples
    num_labels: int | None
    label_names: tuple[str, ...] = ()
    template: str = ""


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


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task reads from its records: its kind, columns, labels and splits.

    Attributes:
        name: ``data.task`` ("sst2", "mnli", "dolly", "classification" or "instruction").
        kind: "classification" or "instruction".
        splits: split names, (train, eval) or (train,) (eval: a fixed-seed share of train).
        text_column: classification: the text (first segment).
        text_pair_column: classification: the second segment ("" for single texts).
        label_column: classification: the label (an integer id or one of ``label_names``);
            instruction: the optional category the partition stratifies by ("" for none).
        label_names: names of the labels (classification) or categories (instruction), by id.
        num_labels: number of classes (classification; 0 for instruction).
        template: instruction: the prompt, a format string over the record's columns.
        response_column: instruction: the target text.
        hub_config: configuration name of a hub data set (None for none).
    """

    name: str
    kind: str
    splits: tuple[str, ...]
    text_column: str = ""
    text_pair_column: str = ""
    label_column: str = ""
    label_names: tuple[str, ...] = ()
    num_labels: int = 0
    template: str = ""
    response_column: str = ""
    hub_config: str | None = None

    @property
    def is_preset(self) -> bool:
        """A preset (sst2, mnli, dolly), whose columns are fixed; an open task's name is
        its kind."""
        return self.name != self.kind

    @property
    def columns(self) -> tuple[str, ...]:
        """The text columns every record must carry (label and category excluded)."""
        if self.kind == "classification":
            return tuple(c for c in (self.text_column, self.text_pair_column) if c)
        return tuple(template_fields(self.template)) + (self.response_column,)


PRESETS = {
    "sst2": TaskSpec("sst2", "classification", ("train", "validation"),
                     text_column="sentence", label_column="label", label_names=SST2_LABELS,
                     num_labels=2),
    "mnli": TaskSpec("mnli", "classification", ("train", "validation_matched"),
                     text_column="premise", text_pair_column="hypothesis",
                     label_column="label", label_names=MNLI_LABELS, num_labels=3),
    "dolly": TaskSpec("dolly", "instruction", ("train",), label_column="category",
                      label_names=DOLLY_CATEGORIES, template=DOLLY_TEMPLATE,
                      response_column="response"),
}
# What an open task reads when its config leaves a field empty.
OPEN_DEFAULTS = {
    "classification": TaskSpec("classification", "classification", ("train", "validation"),
                               text_column="text", label_column="label"),
    "instruction": TaskSpec("instruction", "instruction", ("train", "validation"),
                            template=INSTRUCTION_TEMPLATE, response_column="response"),
}
# The config keys that describe a task's records (presets fix them).
SPEC_KEYS = ("splits", "text_column", "text_pair_column", "label_column", "label_names",
             "num_labels", "template", "response_column")


def task_spec(cfg_data: DataConfig) -> TaskSpec:
    """The :class:`TaskSpec` of ``cfg_data``: a preset's, or an open task's fields.

    Raises:
        DataError: a preset given a column, label or split key (naming it), an open
            classification with neither ``num_labels`` nor ``label_names`` (or both, not
            agreeing), or a template without fields or without a response header.
    """
    task, given = cfg_data.task, {k: getattr(cfg_data, k) for k in SPEC_KEYS}
    given = {k: v for k, v in given.items() if v not in ("", 0, ())}
    hub_config = cfg_data.hub_config or None
    if task in PRESETS:
        preset = PRESETS[task]
        clash = [k for k, v in given.items() if v != getattr(preset, k)]
        if clash:
            raise DataError(f"data.{clash[0]}={given[clash[0]]!r} does not apply to the "
                            f"{task} preset (its records are fixed); use data.task="
                            f"{preset.kind} to read other columns")
        return dataclasses.replace(preset, hub_config=hub_config)
    if task not in OPEN_DEFAULTS:
        raise DataError(f"unknown task {task!r}; allowed {sorted(PRESETS) + sorted(OPEN_DEFAULTS)}")
    spec = dataclasses.replace(OPEN_DEFAULTS[task], hub_config=hub_config, **given)
    if spec.kind == "classification":
        names, n = spec.label_names, spec.num_labels
        if not names and not n:
            raise DataError("data.task=classification needs data.num_labels or "
                            "data.label_names (e.g. --set 'data.label_names=[neg, pos]')")
        if names and n and len(names) != n:
            raise DataError(f"data.num_labels={n} but data.label_names has {len(names)} "
                            f"names {list(names)}")
        if len(set(names)) != len(names):
            raise DataError(f"data.label_names={list(names)} repeats a name")
        spec = dataclasses.replace(spec, num_labels=n or len(names))
    else:
        split_template(spec.template)
        if spec.label_column and not spec.label_names:
            raise DataError(f"data.label_column={spec.label_column!r} on an instruction task "
                            f"names the records' categories (for the partition): give their "
                            f"values in data.label_names, or drop data.label_column")
    if len(spec.splits) not in (1, 2):
        raise DataError(f"data.splits={list(spec.splits)}: give (train, eval) split names, "
                        f"or one (the eval set is then a fixed share of it)")
    return spec


def _spec_of(task: str | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    if task not in PRESETS:
        raise DataError(f"unknown task {task!r}; allowed {sorted(PRESETS)} (open tasks "
                        f"need their columns: data.task_spec)")
    return PRESETS[task]


# ----------------------------------------------------------------------------- templates


def template_fields(template: str) -> list[str]:
    """The columns a prompt template names, in order (``{instruction}`` -> "instruction")."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"data.template={template!r} is not a valid format string "
                        f"({e}); write literal braces as {{{{ and }}}}") from None
    return [f for _, f, _, _ in parsed if f is not None]


def split_template(template: str) -> tuple[str, str]:
    """(body, header) of a prompt template.

    The header is the text after the template's last field, less its leading whitespace
    (which stays with the body): it is tokenised on its own and always kept whole, so the
    boundary between prompt and response is exact (dolly: ``"### Response:\\n"``).
    """
    fields = template_fields(template)
    if not fields or any(not f.isidentifier() for f in fields):
        raise DataError(f"data.template={template!r} must name the prompt's columns as "
                        f"{{column}} fields, e.g. '### Instruction:\\n{{instruction}}\\n\\n"
                        f"### Response:\\n'")
    last = template.rindex("}") + 1
    rest = template[last:]
    header = rest.lstrip()
    if not header:
        raise DataError(f"data.template={template!r} must end with a response header "
                        f"after its last field (e.g. '\\n\\n### Response:\\n')")
    return template[:last] + rest[:len(rest) - len(header)], header


def render_body(template: str, record: dict) -> tuple[str, bool]:
    """The prompt body of a record, and whether every block of it was kept.

    The body is cut into blocks at blank lines (``"\\n\\n"``); a block whose fields are all
    blank in the record is left out (dolly's empty context).
    """
    body, _ = split_template(template)
    text, whole = "", True
    for block in re.split(r"(?<=\n\n)", body):
        fields = template_fields(block)
        if fields and not any(record[f].strip() for f in fields):
            whole = False
            continue
        text += block.format(**{f: record[f] for f in fields})
    return text, whole


def dolly_prompt(instruction: str, context: str) -> str:
    """The prompt body of a dolly record (without the response header)."""
    return render_body(DOLLY_TEMPLATE, {"instruction": instruction, "context": context})[0]


# ----------------------------------------------------------------------------- records


def _split_fixed(records: list[dict], name: str
                 ) -> tuple[list[dict], list[dict], np.ndarray, np.ndarray]:
    """The fixed-seed train / eval split of a single split (rows into ``records``)."""
    n = len(records)
    if n < 2:
        raise DataError(f"{name} needs at least 2 records to split into train/eval, got {n}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_eval = max(1, int(round(EVAL_FRACTION * n)))
    eval_rows, train_rows = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
    return ([records[i] for i in train_rows], [records[i] for i in eval_rows],
            train_rows, eval_rows)


def load_records(task: str | TaskSpec, source: str) -> tuple[list[dict], list[dict]]:
    """The validated raw records of a task's train and eval splits.

    Args:
        task: a preset name ("sst2", "mnli", "dolly") or a :class:`TaskSpec`.
        source: a local directory (``<split>.jsonl`` / ``.csv`` / ``.parquet`` per split),
            one local file (a single split), or a hub data-set id.

    Returns:
        (train records, eval records), each a list of dicts with the task's columns
        (classification labels as class ids). A single split is cut into train / eval with
        a fixed seed (see the module note).
    """
    train, ev, _, _ = _load_records(_spec_of(task), source)
    return train, ev


def _load_records(spec: TaskSpec, source: str
                  ) -> tuple[list[dict], list[dict], np.ndarray, np.ndarray]:
    splits = read_splits(spec, source)
    if len(splits) == 1:
        return _split_fixed(splits[0], spec.name)
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


def _instruction_group(spec: TaskSpec, rec: dict, whole: bool) -> int:
    """Partition pseudo-label of an instruction record: its category's index, else
    ``len(label_names)`` + (every block of its prompt kept; dolly: has a context)."""
    if spec.label_column and rec.get(spec.label_column) is not None:
        return spec.label_names.index(rec[spec.label_column])
    return len(spec.label_names) + int(whole)


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


def _encode_classification(tokenizer, spec: TaskSpec, records: list[dict], max_len: int,
                           pad_id: int) -> dict[str, Any]:
    texts = [r[spec.text_column] for r in records]
    if spec.text_pair_column:
        enc = tokenizer(texts, [r[spec.text_pair_column] for r in records], truncation=True,
                        max_length=max_len, return_attention_mask=False)
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_len,
                        return_attention_mask=False)
    ids = enc["input_ids"]
    lengths = np.array([len(x) for x in ids], dtype=np.int32)
    width = int(lengths.max())
    tt = enc.get("token_type_ids")
    labels = np.array([r[spec.label_column] for r in records], dtype=np.int32)
    return dict(input_ids=_pad_rows(ids, width, pad_id),
                token_type_ids=(_pad_rows(tt, width, 0) if tt is not None
                                else np.zeros((len(ids), width), np.int32)),
                labels=labels, loss_mask=None, lengths=lengths, groups=labels.copy())


def _encode_instruction(tokenizer, spec: TaskSpec, records: list[dict], max_len: int,
                        bos: list[int], eos: int, pad_id: int) -> dict[str, Any]:
    # Pieces longer than max_len are cut by the tokenizer already (a response cut there can
    # never keep its eos below, as the prompt header takes room too).
    kw = dict(add_special_tokens=False, truncation=True, max_length=max_len,
              return_attention_mask=False)
    header = tokenizer(split_template(spec.template)[1], **kw)["input_ids"]
    rendered = [render_body(spec.template, r) for r in records]
    bodies = tokenizer([body for body, _ in rendered], **kw)["input_ids"]
    responses = tokenizer([r[spec.response_column] for r in records], **kw)["input_ids"]
    fixed = len(bos) + len(header)
    seqs, labels, masks = [], [], []
    for body, resp in zip(bodies, responses):
        resp = list(resp) + [eos]
        prompt_budget = max(max_len - len(resp), max_len // 2)
        prompt = bos + list(body)[:max(0, prompt_budget - fixed)] + list(header)
        room = max_len - len(prompt)
        if room < 1:
            raise DataError(f"data.max_len={max_len} leaves no room for a response after the "
                            f"{spec.name} prompt template ({len(prompt)} tokens)")
        seq = prompt + resp[:room]
        seqs.append(seq)
        labels.append(seq[1:] + [pad_id])
        masks.append([0] * (len(prompt) - 1) + [1] * (len(seq) - len(prompt)) + [0])
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    width = int(lengths.max())
    return dict(input_ids=_pad_rows(seqs, width, pad_id), token_type_ids=None,
                labels=_pad_rows(labels, width, pad_id), loss_mask=_pad_rows(masks, width, 0),
                lengths=lengths,
                groups=np.array([_instruction_group(spec, r, whole)
                                 for r, (_, whole) in zip(records, rendered)], dtype=np.int32))


def encode(tokenizer, task: str | TaskSpec, records: list[dict], max_len: int,
           buckets: tuple[int, ...], source_row: np.ndarray | None = None) -> Examples:
    """Tokenise validated records of ``task`` into :class:`Examples` (truncated to max_len).

    Args:
        tokenizer: any object with the Hugging Face tokenizer call interface.
        task: a preset name or a :class:`TaskSpec`: classification (a text, or a pair of
            texts as two segments) or instruction (template, response).
        records: records as returned by :func:`load_records`.
        max_len: longest tokenised sequence kept.
        buckets: the padded lengths batches may take (see :func:`length_buckets`).
        source_row: (n,) rows of the records in their source split (default 0..n-1).
    """
    spec = _spec_of(task)
    if not records:
        raise DataError(f"{spec.name}: no records to encode")
    bos, eos, pad_id = _special_ids(tokenizer)
    if spec.kind == "instruction":
        enc = _encode_instruction(tokenizer, spec, records, max_len, bos, eos, pad_id)
    else:
        enc = _encode_classification(tokenizer, spec, records, max_len, pad_id)
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
        cfg_data: the data section of the config (task and its columns, source, max_len,
            buckets, limits).
        tokenizer: any object with the Hugging Face tokenizer call interface.
        seed: the run's seed.

    Returns:
        The :class:`TaskData`.
    """
    spec = task_spec(cfg_data)
    buckets = length_buckets(cfg_data)
    train, ev, train_rows, eval_rows = _load_records(spec, cfg_data.source)
    rng = np.random.default_rng([seed, _STREAM_SUBSAMPLE])
    keep_train = _subsample(len(train), cfg_data.max_train_samples, rng)
    keep_eval = _subsample(len(ev), cfg_data.max_eval_samples, rng)
    return TaskData(
        task=spec.name,
        train=encode(tokenizer, spec, [train[i] for i in keep_train], cfg_data.max_len,
                     buckets, train_rows[keep_train]),
        eval=encode(tokenizer, spec, [ev[i] for i in keep_eval], cfg_data.max_len, buckets,
                    eval_rows[keep_eval]),
        num_labels=spec.num_labels or None,
        label_names=spec.label_names if spec.kind == "classification" else (),
        template=spec.template if spec.kind == "instruction" else "")


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
            repeat row 0 with ``example_mask`` (and instruction ``loss_mask``) 0.
        batch_size: B.

    Returns:
        int32 arrays: input_ids, attention_mask (B, L), token_type_ids (B, L)
        (classification), labels (B,) (classification) or (B, L) with loss_mask (B, L)
        (instruction), example_mask (B,); L is the smallest bucket fitting the longest example;
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


FLOWER_MAX_TRIES = 11


def flower_dirichlet_partition(groups: np.ndarray, num_devices: int, alpha: float,
                               min_size: int, seed: int) -> list[np.ndarray]:
    """flwr-datasets' ``DirichletPartitioner`` algorithm (``self_balancing=False``).

    ``DirichletPartitioner(num_partitions=N, partition_by=<label>, alpha=alpha,
    min_partition_size=min_size, seed=seed)`` on a data set whose label column is
    ``groups`` assigns the same example indices to each partition (its ``shuffle`` only
    reorders a partition). With a generator ``default_rng(seed)``: for every class in
    sorted order, its examples in data-set order are cut at ``floor(cumsum(Dir(alpha *
    1_N)) * n_k)``; when some device ends below ``min_size``, the whole draw is repeated
    with the generator's next state, up to 11 draws in all.

    Args:
        groups: (n,) int class or pseudo-label of each example.
        num_devices: N.
        alpha: Dirichlet concentration.
        min_size: examples each device holds at least.
        seed: the generator's seed (flwr-datasets' ``seed``).

    Returns:
        N sorted int64 index arrays, disjoint, covering 0..n-1.

    Raises:
        DataError: ``min_size`` still not met after 11 draws.
    """
    groups = np.asarray(groups)
    if num_devices > len(groups):
        raise DataError(f"cannot split {len(groups)} examples over {num_devices} devices")
    rng = np.random.default_rng(seed)
    alphas = np.full(num_devices, float(alpha))
    for _ in range(FLOWER_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        for g in np.unique(groups):
            idx = np.flatnonzero(groups == g)
            cuts = (np.cumsum(rng.dirichlet(alphas)) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise DataError(f"data.partition=flower_dirichlet: no draw of {FLOWER_MAX_TRIES} gave "
                    f"every one of {num_devices} devices {min_size} samples at "
                    f"dirichlet_alpha={alpha}; raise data.dirichlet_alpha or lower "
                    f"data.min_samples_per_device")


def partition(task_data: TaskData, num_devices: int, cfg_data: DataConfig,
              seed: int) -> list[DeviceData]:
    """Dirichlet(``cfg_data.dirichlet_alpha``) split of ``task_data.train`` over devices
    (``cfg_data.partition``: :func:`dirichlet_partition` or
    :func:`flower_dirichlet_partition`).

    Each device then holds out ``round(holdout_fraction * n_i)`` random examples (at least
    one when the fraction is positive, and never all of them) for its local evaluation.

    Args:
        task_data: the loaded task.
        num_devices: N.
        cfg_data: partition, dirichlet_alpha, min_samples_per_device, holdout_fraction.
        seed: the run's seed (the partition is a pure function of it).

    Returns:
        N :class:`DeviceData`, whose index sets are disjoint and together cover the train
        examples once.
    """
    rng = np.random.default_rng([seed, _STREAM_PARTITION])
    if cfg_data.partition == "flower_dirichlet":
        shares = flower_dirichlet_partition(task_data.train.groups, num_devices,
                                            cfg_data.dirichlet_alpha,
                                            cfg_data.min_samples_per_device, seed)
    else:
        shares = dirichlet_partition(task_data.train.groups, num_devices,
                                     cfg_data.dirichlet_alpha,
                                     cfg_data.min_samples_per_device, rng)
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
