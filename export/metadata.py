"""What an exported model says about itself: the ``fedspine`` metadata of its ONNX file.

An exported ``.onnx`` carries two ``metadata_props`` entries, so that the file alone is
enough to serve it (the inference runtime needs nothing else):

* ``fedspine.meta`` -- JSON of :class:`ModelMeta`: the kind of graph, its inputs and
  outputs, the task and its label names or prompt template (``data.template``), the
  tokenisation length, the KV-cache layout of a
  decoder, where the model came from (run, device, rank, pruning) and its sizes;
* ``fedspine.tokenizer`` -- JSON ``{file name: text}`` of the tokenizer's
  ``save_pretrained`` files (``tokenizer.json``, ``tokenizer_config.json``, ...).

A TensorRT engine cannot carry metadata: :func:`write_sidecar` writes the same two entries
to ``<engine>.json`` beside it. Only the standard library and NumPy are imported here (the
device runtime reads metadata on machines without JAX).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from pathlib import Path
from fedspine_jax.errors import UserError

META_KEY = "fedspine.meta"
TOKENIZER_KEY = "fedspine.tokenizer"
FORMAT_VERSION = 1

# The graphs one export writes (``graph`` in the metadata) and their file names:
# ``portable`` (plain ONNX, for TensorRT and any runtime) is ``model.onnx``; ``cpu`` (ONNX
# Runtime's fused contrib ops, ``export.cpu_graph``) is ``model.cpu.onnx`` beside it;
# ``cpu-int8`` (the CPU graph with dynamically quantized weights, ``export.quantize``) is
# ``model.int8.onnx``.
PORTABLE, CPU, CPU_INT8 = "portable", "cpu", "cpu-int8"
GRAPHS = {PORTABLE: ".onnx", CPU: ".cpu.onnx", CPU_INT8: ".int8.onnx"}

# ONNX dimension names (trtexec / TensorRT profiles refer to them).
BATCH, SEQ, CACHE = "batch", "seq", "cache"


class MetadataError(UserError, ValueError):
    """A model file without (valid) fedspine metadata; the message names the file."""


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """One decoder layer's KV cache: inputs ``past_key_<layer>`` / ``past_value_<layer>`` and
    outputs ``present_key_<layer>`` / ``present_value_<layer>``, each
    ``(batch, cache, kv_heads, head_dim)`` float32."""
    layer: int
    kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """Self-description of an exported model.

    ``kind`` is ``"classifier"`` (encoder + classification head: inputs ``input_ids``,
    ``attention_mask``, ``token_type_ids`` ``(batch, seq)`` int32; output ``logits
    (batch, num_labels)``), ``"encoder"`` (no head: output ``last_hidden_state
    (batch, seq, hidden)``) or ``"causal_lm"`` (LLaMA decode step with a KV cache, see
    ``fedspine_jax.export.onnx_export``).
    """
    kind: str
    arch: str                      # bert | roberta | llama
    task: str | None               # sst2 | mnli | dolly | None (unknown)
    labels: tuple = ()             # class names by id (classifier): the task's, or LABEL_i
    max_len: int = 512             # longest tokenised input the model was trained on
    max_positions: int = 512       # position embeddings / RoPE table length
    vocab_size: int = 0
    hidden_size: int = 0
    template: str = ""             # causal_lm of an instruction task: its prompt template
    cache: tuple = ()              # CacheSpec per decoder layer with kv heads
    eos_token_id: int | None = None
    pad_token_id: int = 0
    inputs: tuple = ()
    outputs: tuple = ()
    opset: int = 17
    params: int = 0                # parameters of the exported (compacted) model
    dense_params: int = 0          # parameters of the unpruned model
    heads: tuple = ()              # query heads kept per layer
    channels: tuple = ()           # FFN channels kept per layer
    num_heads: int = 0             # query heads of an unpruned layer
    intermediate_size: int = 0     # FFN channels of an unpruned layer
    source: dict = dataclasses.field(default_factory=dict)  # run, device_id, round, rank, ...
    graph: str = PORTABLE          # portable | cpu | cpu-int8 (see GRAPHS)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "model") -> "ModelMeta":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{where}: fedspine metadata is not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
            raise MetadataError(f"{where}: fedspine metadata of an unknown format "
                                f"{d.get('format') if isinstance(d, dict) else d!r} "
                                f"(this version reads format {FORMAT_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MetadataError(f"{where}: unknown fedspine metadata fields {unknown}")
        d["cache"] = tuple(CacheSpec(**c) for c in d.get("cache", ()))
        for k in ("labels", "inputs", "outputs", "heads", "channels"):
            d[k] = tuple(d.get(k, ()))
        return cls(**d)

    @property
    def is_decoder(self) -> bool:
        return self.kind == "causal_lm"


def class_names(num_labels: int, names=()) -> tuple[str, ...]:
    """A classifier's class names by id: the task's ``names`` when it has them, else
    ``LABEL_0`` ... ``LABEL_<num_labels - 1>`` (Hugging Face's default ``id2label``)."""
    names = tuple(str(n) for n in names)
    if not names:
        return tuple(f"LABEL_{i}" for i in range(num_labels))
    if len(names) != num_labels:
        raise MetadataError(f"{len(names)} label names {list(names)} for a classifier of "
                            f"{num_labels} classes")
    return names


def graph_path(portable: str | Path, kind: str) -> Path:
    """The file of graph ``kind`` (:data:`GRAPHS`) of the export ``portable``
    (``dev3.onnx`` -> ``dev3.cpu.onnx`` / ``dev3.int8.onnx``)."""
    portable = Path(portable)
    return portable.with_name(portable.name[:-len(".onnx")] + GRAPHS[kind])


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_files(tokenizer) -> dict[str, str]:
    """``{file name: text}`` of a Hugging Face tokenizer's ``save_pretrained`` output."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(d).iterdir())
                if p.is_file()}


def load_tokenizer_files(files: dict[str, str], where: str = "model"):
    """A Hugging Face tokenizer rebuilt from :func:`tokenizer_files` output."""
    from transformers import AutoTokenizer

    if not isinstance(files, dict) or not files:
        raise MetadataError(f"{where}: carries no tokenizer")
    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            if "/" in name or "\\" in name or name.startswith("."):
                raise MetadataError(f"{where}: bad tokenizer file name {name!r}")
            (Path(d) / name).write_text(text, encoding="utf-8")
        try:
            tok = AutoTokenizer.from_pretrained(d)
        except Exception as e:
            raise MetadataError(f"{where}: cannot rebuild its tokenizer "
                                f"({type(e).__name__}: {e})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def props(meta: ModelMeta, tokenizer_json: dict[str, str]) -> dict[str, str]:
    """The ``metadata_props`` entries of an exported model."""
    return {META_KEY: meta.to_json(), TOKENIZER_KEY: json.dumps(tokenizer_json)}


def parse_props(entries: dict[str, str], where: str) -> tuple[ModelMeta, dict[str, str]]:
    """(meta, tokenizer files) from ``metadata_props`` entries; clear errors when absent."""
    if META_KEY not in entries:
        raise MetadataError(f"{where} has no fedspine metadata: export it with "
                            f"`fedspine export` (a plain ONNX file does not say how to "
                            f"tokenise or what its outputs mean)")
    meta = ModelMeta.from_json(entries[META_KEY], where)
    try:
        tok = json.loads(entries.get(TOKENIZER_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise MetadataError(f"{where}: its tokenizer entry is not valid JSON ({e})") from None
    return meta, tok


def sidecar_path(engine: str | Path) -> Path:
    """Where an engine's metadata lives: ``model.plan`` -> ``model.plan.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_sidecar(engine: str | Path, entries: dict[str, str], extra: dict | None = None
                  ) -> Path:
    """Write an engine's metadata (the ONNX file's entries, plus ``extra``) beside it."""
    p = sidecar_path(engine)
    p.write_text(json.dumps({"metadata_props": entries, **(extra or {})}), encoding="utf-8")
    return p


def read_sidecar(engine: str | Path) -> tuple[ModelMeta, dict[str, str], dict]:
    """(meta, tokenizer files, the whole sidecar) of an engine."""
    p = sidecar_path(engine)
    if not p.is_file():
        raise MetadataError(f"engine {str(engine)!r} has no metadata file {p.name!r} beside "
                            f"it (engines built by `fedspine export --engine` get one)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MetadataError(f"{str(p)!r}: cannot read engine metadata ({e})") from None
    meta, tok = parse_props(d.get("metadata_props", {}), str(p))
    return meta, tok, d
