"""``fedspine infer``: run an exported model (TensorRT / ONNX Runtime) or a run's model (JAX).

::

    fedspine infer dev3.onnx --text "a gripping film"                 # ONNX Runtime
    fedspine infer dev3.plan --file reviews.jsonl --batch-size 64      # TensorRT
    fedspine infer runs/sst2 --device-id 3 --text "a gripping film"   # JAX
    fedspine infer lm.onnx --text "Name three rivers." --max-new-tokens 40

One JSON line per input: a classifier prints ``label``, ``label_id`` and ``probs`` (every
label's probability); a LLaMA model prints its greedy ``completion``. Input records
(``--file``, JSON Lines) carry their text as ``text`` (+ ``text_pair``), ``sentence``,
``premise`` + ``hypothesis``, ``instruction`` (+ ``context``) or ``prompt``. A LLaMA model
trained on an instruction task (dolly, or ``data.task: instruction`` with its
``data.template``) gets every input wrapped in its training template, carried in the
model's metadata: a record holding the template's columns fills them by name; otherwise the
text fills its first field (and ``--text-pair`` / ``context`` its second).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a TensorRT engine (.plan), an exported .onnx, or a run "
                   "directory (with --device-id)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="an input text (repeatable)")
    src.add_argument("--file", help="JSON Lines file of inputs")
    p.add_argument("--text-pair", action="append",
                   help="second segment for each --text (sentence-pair tasks, e.g. mnli)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per batch (default "
                   "%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="LLaMA models: tokens to generate (default %(default)s)")
    p.add_argument("--device-id", type=int, help="run directories: which device's model")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="run directories: override a value of "
                   "the run's config (repeatable)")
    p.add_argument("--cpu", action="store_true",
                   help="ONNX Runtime: use the CPU provider even when CUDA is available")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime: intra-op threads (default: all cores)")


def _err(msg: str) -> int:
    print(f"fedspine infer: {msg}", file=sys.stderr)
    return 2


def run_cli(args) -> int:
    from fedspine_jax.device_runtime.inference import InferenceError, load, read_jsonl, \
        record_text

    if args.batch_size < 1:
        return _err("--batch-size must be at least 1")
    try:
        recs = None
        if args.text:
            texts = list(args.text)
            pairs = args.text_pair
            if pairs is not None and len(pairs) != len(texts):
                return _err(f"{len(texts)} --text but {len(pairs)} --text-pair")
        else:
            recs = read_jsonl(args.file)
            if not recs:
                return _err(f"{args.file}: no inputs")
        pred = load(args.model, device_id=args.device_id, overrides=args.overrides,
                    providers=["CPUExecutionProvider"] if args.cpu else None,
                    threads=args.threads)
        # Records in the columns of a decoder's prompt template fill it by name.
        fields = pred.template_fields() if pred.meta.is_decoder else []
        own = [bool(fields) and isinstance(r.get(fields[0]), str) for r in recs or ()]
        if recs is not None:
            got = [(r[fields[0]], None) if o else record_text(r, f"{args.file} line {i + 1}")
                   for i, (r, o) in enumerate(zip(recs, own))]
            texts = [t for t, _ in got]
            pairs = [p for _, p in got]
            if all(p is None for p in pairs):
                pairs = None
            elif any(p is None for p in pairs):
                pairs = [p or "" for p in pairs]
        if pred.meta.is_decoder:
            prompts = [pred.prompt(record=recs[i]) if recs is not None and own[i]
                       else pred.prompt(t, c or "")
                       for i, (t, c) in enumerate(zip(texts, pairs or [None] * len(texts)))]
            outs = pred.generate(prompts, args.max_new_tokens, args.batch_size)
            for t, o in zip(texts, outs):
                print(json.dumps({"prompt": t, "completion": o}))
        else:
            if pred.meta.kind != "classifier":
                return _err("this encoder has no classification head; nothing to print")
            for t, r in zip(texts, pred.classify(texts, pairs, args.batch_size)):
                print(json.dumps({"text": t, "label": r.label, "label_id": r.label_id,
                                  "probs": r.probs}))
        print(f"[{pred.backend.name}] {len(texts)} inputs", file=sys.stderr)
    except InferenceError as e:
        return _err(str(e))
    return 0
