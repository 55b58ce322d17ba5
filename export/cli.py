"""``fedspine export``: a device's pruned model -> verified ONNX -> (optionally) TensorRT.

::

    fedspine export runs/sst2 --device-id 3 --out dev3.onnx
    fedspine export runs/sst2 --device-id 3 --out dev3.onnx --engine dev3.plan --fp16 \\
        --min-shape batch=1,seq=1 --opt-shape batch=8,seq=64 --max-shape batch=32,seq=128
    fedspine export dev3.onnx --engine dev3.plan          # engine from an exported file
    fedspine export runs/sst2 --peft adapter/              # global LoRA + head for PEFT
    fedspine export runs/sst2 --device-id 3 --hf dev3/    # pruned, merged, save_pretrained
    fedspine export runs/sst2 --device-id 3 --out dev3.onnx --int8   # + dev3.int8.onnx

An encoder's export writes two verified graphs: ``dev3.onnx`` (portable: TensorRT, CUDA)
and ``dev3.cpu.onnx`` (ONNX Runtime's fused ops, served on CPUs); ``--int8`` adds
``dev3.int8.onnx``, the CPU graph with int8 weights.

The ONNX export always verifies itself against the JAX model (max abs difference
printed; it fails above ``export.tolerance``). ``--engine`` needs the ``tensorrt``
package; without it the command fails, says how to install it and prints the equivalent
``trtexec`` command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run directory (fedspine simulate / server --out) or an "
                   "exported .onnx file (then only --engine is built)")
    p.add_argument("--device-id", type=int, help="the device whose model to export (run "
                   "directories)")
    p.add_argument("--out", help="the .onnx file to write (run directories)")
    p.add_argument("--peft", metavar="DIR", help="write the run's global LoRA and task head "
                   "as a PEFT adapter directory (for peft.PeftModel.from_pretrained on the "
                   "run's pretrained model)")
    p.add_argument("--hf", metavar="DIR", help="write the device's pruned model, LoRA "
                   "merged, as a save_pretrained-style directory (with --device-id)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a value of the run's config, "
                   "e.g. data.source=<the data on this machine> (repeatable)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the run's export.opset)")
    p.add_argument("--tolerance", type=float,
                   help="max abs difference ONNX Runtime vs JAX (default: export.tolerance)")
    p.add_argument("--int8", action="store_true", help="also write the INT8 CPU graph "
                   "(<out>.int8.onnx: dynamically quantized weights, ONNX Runtime); with "
                   "--engine, build an INT8 TensorRT engine calibrated on the device's "
                   "training data (or --calibration FILE)")
    p.add_argument("--calibration", metavar="FILE", help="--engine --int8 from an .onnx "
                   "source: examples of the model's task (JSON Lines / CSV / Parquet) to "
                   "calibrate on (not needed when the engine's calibration cache exists)")
    p.add_argument("--engine", help="also build a TensorRT engine here (.plan)")
    p.add_argument("--fp16", action="store_true", help="TensorRT: allow FP16 kernels")
    for which in ("min", "opt", "max"):
        p.add_argument(f"--{which}-shape", metavar="DIMS",
                       help=f"TensorRT profile {which}: batch=N,seq=N[,cache=N] or "
                            f"trtexec's input:AxB,...")
    p.add_argument("--workspace-gib", type=float, default=2.0,
                   help="TensorRT builder workspace limit (default %(default)s GiB)")


def _err(msg: str) -> int:
    print(f"fedspine export: {msg}", file=sys.stderr)
    return 2


def run_cli(args) -> int:
    from fedspine_jax.export.onnx_export import ExportError
    from fedspine_jax.export.tensorrt import (TensorRTUnavailable, build_engine,
                                              calibration_batches, calibration_cache_path,
                                              check_engine)

    src = Path(args.source)
    onnx_path, calib, check = None, None, None
    if args.calibration and not (args.int8 and args.engine):
        return _err("--calibration is for --engine --int8")
    try:
        if src.suffix == ".onnx":
            if args.out or args.device_id is not None:
                return _err("--out / --device-id are for run directories; with an .onnx "
                            "source give --engine")
            if not args.engine:
                return _err("an .onnx source needs --engine (the file is already exported)")
            onnx_path = src
            if args.int8 and args.calibration:
                calib = _calibration_file(src, args.calibration)
        elif args.peft or args.hf:
            return _run_hf(src, args)
        else:
            if args.device_id is None or not args.out:
                return _err("exporting from a run directory needs --device-id and --out "
                            "(or --peft DIR, or --device-id and --hf DIR)")
            from fedspine_jax.export.run import export_run_device_model

            kw = {}
            if args.opset is not None:
                kw["opset"] = args.opset
            if args.tolerance is not None:
                kw["tolerance"] = args.tolerance
            kw["int8"] = args.int8
            res, dm = export_run_device_model(src, args.device_id, args.out, args.overrides,
                                              **kw)
            if args.int8 and args.engine:
                calib = calibration_batches(dm.train, res.meta.max_len)
                check = calibration_batches(dm.eval, res.meta.max_len, rows=256)
            m = res.meta
            print(f"wrote {', '.join(str(f) for f in res.files)}: {res.bytes / 2**20:.2f} MiB, "
                  f"{m.params:,} of {m.dense_params:,} parameters "
                  f"({100 * (1 - m.params / max(m.dense_params, 1)):.1f}% fewer; embeddings "
                  f"are not pruned), opset {m.opset}")
            print(f"heads per layer {list(m.heads)} of {m.num_heads}, FFN channels per layer "
                  f"{list(m.channels)} of {m.intermediate_size}")
            for name, diff in res.checks.items():
                print(f"verified in ONNX Runtime vs JAX: {name}: max abs diff {diff:.3g} "
                      f"(outputs up to {res.scales[name]:.3g})")
            if res.cpu_path is not None:
                print(f"wrote the CPU graph {res.cpu_path} (fused: "
                      f"{', '.join(f'{k} x{v}' for k, v in res.fusions['fused'].items())}); "
                      f"verified vs JAX: max abs diff {max(res.cpu_checks.values()):.3g}")
            if res.int8_path is not None:
                c = res.int8_check
                print(f"wrote the INT8 CPU graph {res.int8_path}: vs the fp32 CPU graph max "
                      f"abs diff {c.max_abs_diff:.3g}, same label on {c.argmax_agreement:.0%} "
                      f"of {c.rows} inputs")
            onnx_path = res.path
        if args.engine:
            path = build_engine(onnx_path, args.engine, fp16=args.fp16, int8=args.int8,
                                calibration=calib, min_shape=args.min_shape,
                                opt_shape=args.opt_shape, max_shape=args.max_shape,
                                workspace_gib=args.workspace_gib)
            print(f"wrote TensorRT engine {path} (+ {path.name}.json)")
            if args.int8:
                print(f"INT8 calibration cache: {calibration_cache_path(path, onnx_path)}")
            if check is not None:
                c = check_engine(path, onnx_path, check)
                print(f"INT8 engine vs the fp32 ONNX graph on {c.rows} evaluation examples: "
                      f"max abs diff {c.max_abs_diff:.3g}, same label on "
                      f"{c.argmax_agreement:.1%}")
    except TensorRTUnavailable as e:
        print(f"fedspine export: cannot build the engine: {e}", file=sys.stderr)
        return 3
    except (ExportError, FileNotFoundError, ValueError) as e:
        return _err(str(e))
    return 0


def _calibration_file(onnx_path: Path, path: str) -> list[dict]:
    """:func:`tensorrt.calibration_batches` of a data file of the exported model's task,
    tokenised with the tokenizer the model carries."""
    from fedspine_jax import data
    from fedspine_jax.data_files import read_file
    from fedspine_jax.export import metadata
    from fedspine_jax.export.tensorrt import calibration_batches, read_onnx_meta

    meta, entries = read_onnx_meta(onnx_path)
    spec = data.PRESETS.get(meta.task)
    if spec is None:
        raise ValueError(f"{onnx_path.name} is a model of the {meta.task or 'unnamed'} task, "
                         f"whose columns a calibration file cannot name: build the INT8 "
                         f"engine from the run directory (fedspine export RUN --device-id I "
                         f"--out x.onnx --engine x.plan --int8), which calibrates on the "
                         f"device's own data")
    _, files = metadata.parse_props(entries, str(onnx_path))
    tok = metadata.load_tokenizer_files(files, str(onnx_path))
    records = read_file(path, spec)
    examples = data.encode(tok, spec, records, meta.max_len, (meta.max_len,))
    return calibration_batches(examples, meta.max_len)


def _run_hf(src: Path, args) -> int:
    """``--peft DIR`` and / or ``--device-id I --hf DIR`` from a run directory."""
    from fedspine_jax.export.run import export_run_hf, export_run_peft

    if args.out or args.engine:
        return _err("--peft / --hf write Hugging Face directories; give --out / --engine "
                    "in a separate export")
    if args.hf and args.device_id is None:
        return _err("--hf needs --device-id (whose pruned model to write)")
    if args.peft:
        path, info = export_run_peft(src, args.peft, args.overrides)
        print(f"wrote PEFT adapter {path} (round {info['round']}, rank {info['rank']}, "
              f"alpha {info['alpha']:g}, targets {', '.join(info['targets'])}); load it "
              f"with peft.PeftModel.from_pretrained(<the base model>, {str(path)!r})")
        if info["id2label"]:
            print(f"its classifier's labels: load the base model with "
                  f"id2label={info['id2label']}")
    if args.hf:
        path, dm = export_run_hf(src, args.device_id, args.hf, args.overrides)
        print(f"wrote {path}/config.json + model.safetensors: device {args.device_id}, "
              f"{100 * dm.source['heads_kept']:.0f}% of heads and "
              f"{100 * dm.source['channels_kept']:.0f}% of FFN channels kept, LoRA merged; "
              f"load it with fedspine_jax.models.load_pretrained({str(path)!r}, ...)")
    return 0
