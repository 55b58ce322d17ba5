"""Build a TensorRT engine from an exported ONNX file (TensorRT Python API).

Engines are specific to the GPU and the TensorRT version they are built with, so the
server ships ONNX and every device builds (and caches) its own engine
(``device_runtime.agent``). The build: ONNX parser -> network (explicit batch) -> builder
config (workspace limit, optional FP16 / INT8) -> one optimisation profile covering the
dynamic dimensions -> serialised engine, written with its metadata sidecar ``<engine>.json``.

INT8 takes TensorRT's *implicit* quantization path: the fp32 portable graph plus an
entropy calibrator (:func:`entropy_calibrator`, ``IInt8EntropyCalibrator2``) fed
fixed-shape batches of the task's own examples (:func:`calibration_batches`; from a run,
the device's training share), whose per-tensor scales TensorRT writes to a calibration
cache (``<engine>.<onnx digest>.calib``) and reads back on the next build instead of recalibrating.
TensorRT 10.1 deprecates this path in favour of explicit quantization (Q/DQ nodes in the
ONNX graph), but it is the one the Jetson releases this project targets (JetPack's
TensorRT 8.x) run, and it needs no change to the portable graph; an explicitly quantized
graph is left for later. The builder's calls go through a ``trt`` module argument
(:func:`build_with`), so the path up to the calibrator runs in tests with a stand-in.

Profiles are given per *dimension name* of the exported graph (``batch``, ``seq`` and, for
decoders, ``cache``), e.g. ``--max-shape batch=32,seq=128``, or in trtexec's per-input form
``input_ids:32x128,attention_mask:32x128,...``; both resolve to every input's
(min, opt, max) shape. Without TensorRT, :class:`TensorRTUnavailable` says how to install
it and carries the equivalent ``trtexec`` command line.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np

from fedspine_jax.export import metadata
from fedspine_jax.export.metadata import BATCH, CACHE, SEQ, ModelMeta
from fedspine_jax.export.onnx_export import ExportError

INSTALL_HINT = ("pip install 'fedspine-jax[tensorrt]' (the tensorrt wheel for your CUDA; on "
                "Jetson, TensorRT comes with JetPack)")


class TensorRTUnavailable(ExportError):
    """TensorRT cannot be imported here; ``trtexec`` holds the equivalent command line."""

    def __init__(self, message: str, trtexec: str):
        super().__init__(f"{message}\n  install it: {INSTALL_HINT}\n  or build the engine "
                         f"with trtexec on the target device:\n    {trtexec}")
        self.trtexec = trtexec


def available() -> bool:
    """True when the ``tensorrt`` Python package can be imported."""
    return importlib.util.find_spec("tensorrt") is not None


# ---------------------------------------------------------------------------------------
# shapes


def input_layout(meta: ModelMeta) -> dict[str, tuple]:
    """Every graph input's shape: dimension names for dynamic dims, ints for fixed ones."""
    if not meta.is_decoder:
        return {name: (BATCH, SEQ) for name in meta.inputs}
    out = {"input_ids": (BATCH, SEQ), "position_ids": (BATCH, SEQ),
           "cache_mask": (BATCH, CACHE), "cache_position": ()}
    for c in meta.cache:
        for w in ("key", "value"):
            out[f"past_{w}_{c.layer}"] = (BATCH, CACHE, c.kv_heads, c.head_dim)
    return out


def default_dims(meta: ModelMeta) -> tuple[dict, dict, dict]:
    """(min, opt, max) dimension values when the caller gives none."""
    seq = int(min(meta.max_len, meta.max_positions))
    mn = {BATCH: 1, SEQ: 1}
    opt = {BATCH: 1, SEQ: min(64, seq)}
    mx = {BATCH: 32, SEQ: seq}
    if meta.is_decoder:
        mn[CACHE] = 1
        opt[CACHE] = min(meta.max_positions, seq + 64)
        mx[CACHE] = min(meta.max_positions, seq + 256)
    return mn, opt, mx


def parse_dims(text: str | None, meta: ModelMeta) -> dict[str, int]:
    """``"batch=8,seq=128"`` or trtexec's ``"input_ids:8x128,..."`` -> ``{dim: value}``."""
    if not text:
        return {}
    layout = input_layout(meta)
    dims: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "=" in part:
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in (BATCH, SEQ, CACHE) or (name == CACHE and not meta.is_decoder):
                allowed = [BATCH, SEQ] + ([CACHE] if meta.is_decoder else [])
                raise ExportError(f"shape {part!r}: unknown dimension {name!r} "
                                  f"(this model's dynamic dimensions: {allowed})")
            pairs = [(name, value)]
        elif ":" in part:
            name, _, shape = part.rpartition(":")
            if name not in layout:
                raise ExportError(f"shape {part!r}: the model has no input {name!r} "
                                  f"(inputs: {sorted(layout)})")
            values = shape.split("x")
            if len(values) != len(layout[name]):
                raise ExportError(f"shape {part!r}: input {name} has {len(layout[name])} "
                                  f"dimensions {layout[name]}")
            pairs = list(zip(layout[name], values))
        else:
            raise ExportError(f"shape {part!r}: write dim=value (batch=8,seq=128) or "
                              f"input:AxB (input_ids:8x128)")
        for d, v in pairs:
            if not re.fullmatch(r"\s*\d+\s*", str(v)) or int(v) < 1:
                raise ExportError(f"shape {part!r}: {v!r} is not a positive integer")
            if isinstance(d, int):
                if int(v) != d:
                    raise ExportError(f"shape {part!r}: that dimension is fixed at {d}")
                continue
            if dims.get(d, int(v)) != int(v):
                raise ExportError(f"shape {text!r}: {d} is given as both {dims[d]} and {v}")
            dims[d] = int(v)
    return dims


@dataclasses.dataclass(frozen=True)
class Profile:
    """One optimisation profile: ``{input: shape}`` at min / opt / max, and the dims."""
    min: dict
    opt: dict
    max: dict
    dims: tuple  # ((dim, min, opt, max), ...)


def profile(meta: ModelMeta, min_shape: str | None = None, opt_shape: str | None = None,
            max_shape: str | None = None) -> Profile:
    """Resolve the user's shape options (over the defaults) to every input's shapes."""
    d_min, d_opt, d_max = default_dims(meta)
    d_min.update(parse_dims(min_shape, meta))
    d_max.update(parse_dims(max_shape, meta))
    d_opt.update(parse_dims(opt_shape, meta))
    for d in d_min:
        d_opt[d] = min(max(d_opt[d], d_min[d]), d_max[d])
        if not d_min[d] <= d_opt[d] <= d_max[d]:
            raise ExportError(f"dimension {d}: min {d_min[d]} <= opt {d_opt[d]} <= max "
                              f"{d_max[d]} does not hold")
    if meta.is_decoder and d_min[CACHE] < d_min[SEQ]:
        d_min[CACHE] = d_min[SEQ]
    layout = input_layout(meta)

    def shapes(dims):
        return {n: tuple(dims[d] if isinstance(d, str) else d for d in lay)
                for n, lay in layout.items() if lay}

    return Profile(shapes(d_min), shapes(d_opt), shapes(d_max),
                   tuple((d, d_min[d], d_opt[d], d_max[d]) for d in d_min))


def trtexec_command(onnx_path: str | Path, engine_path: str | Path, prof: Profile,
                    fp16: bool = False, int8: bool = False) -> str:
    """The ``trtexec`` command line that builds the same engine."""
    def fmt(shapes):
        return ",".join(f"{n}:{'x'.join(str(x) for x in s)}" for n, s in shapes.items())

    argv = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            f"--minShapes={fmt(prof.min)}", f"--optShapes={fmt(prof.opt)}",
            f"--maxShapes={fmt(prof.max)}"]
    if fp16:
        argv.append("--fp16")
    if int8:
        argv += ["--int8", f"--calib={calibration_cache_path(engine_path, onnx_path)}"]
    return shlex.join(argv)


# ---------------------------------------------------------------------------------------
# INT8 calibration


CALIBRATION_BATCH = 8     # rows per calibration batch
CALIBRATION_ROWS = 512    # examples drawn for calibration (TensorRT suggests ~500)


def onnx_digest(onnx_path: str | Path) -> str:
    """A key of an ONNX file's contents: its sha256 and its external data's (prefixes)."""
    onnx_path = Path(onnx_path)
    files = [onnx_path] + [p for p in [onnx_path.with_name(onnx_path.name + ".data")]
                           if p.exists()]
    return metadata.sha256_file(files[0])[:16] + "".join(
        metadata.sha256_file(p)[:8] for p in files[1:])


def calibration_cache_path(engine_path: str | Path, onnx_path: str | Path) -> Path:
    """Where the INT8 calibration cache of an engine built from ``onnx_path`` lives:
    ``<engine>.<digest>.calib``, keyed by the ONNX file's contents (another model's scales
    are never reused)."""
    p = Path(engine_path)
    return p.with_name(f"{p.name}.{onnx_digest(onnx_path)[:12]}.calib")


def calibration_batches(examples, seq: int, batch: int = CALIBRATION_BATCH,
                        rows: int = CALIBRATION_ROWS) -> list[dict[str, np.ndarray]]:
    """Fixed-shape encoder inputs for the calibrator from a task's tokenised examples.

    Args:
      examples: ``data.Examples`` of a classification task (right-padded, with
        ``token_type_ids``), e.g. a device's training share.
      seq: the sequence length every batch is padded or cut to (the calibration
        profile's), L.
      batch: rows per batch, B; rows: at most this many examples, the first ones
        (whole batches only).
    Returns:
      ``[{input_ids, attention_mask, token_type_ids}]``, each int32 ``(B, L)``.
    """
    if examples.token_type_ids is None:
        raise ExportError("INT8 calibration is for encoders (classification tasks); a "
                          "causal LM's engine has no INT8 path here: build it with --fp16")
    n = min(len(examples), rows) // batch * batch
    if n == 0:
        raise ExportError(f"INT8 calibration needs at least {batch} examples of the task, "
                          f"got {len(examples)}")

    def fit(a):
        a = np.asarray(a[:n, :seq], np.int32)
        return np.pad(a, ((0, 0), (0, seq - a.shape[1])))

    ids, am, tt = (fit(a) for a in (examples.input_ids, examples.attention_mask,
                                    examples.token_type_ids))
    ids[am == 0] = examples.pad_id
    return [{"input_ids": ids[i:i + batch], "attention_mask": am[i:i + batch],
             "token_type_ids": tt[i:i + batch]} for i in range(0, n, batch)]


def entropy_calibrator(base: type, batches: list[dict[str, np.ndarray]],
                       cache_path: str | Path, to_device):
    """A TensorRT entropy calibrator over ``batches``, caching its scales in ``cache_path``.

    Args:
      base: ``tensorrt.IInt8EntropyCalibrator2`` (or a stand-in class with its interface).
      batches: :func:`calibration_batches`' output (every batch the same shapes).
      cache_path: the calibration cache to read (if it exists, no batch is fed) and write.
      to_device: ``(input name, host array) -> device pointer`` holding that array.
    Returns:
      the calibrator object, for ``config.int8_calibrator``.
    """
    cache_path = Path(cache_path)
    size = len(next(iter(batches[0].values()))) if batches else 0

    class EntropyCalibrator(base):
        def __init__(self):
            base.__init__(self)
            self.fed = 0

        def get_batch_size(self) -> int:
            return size

        def get_batch(self, names, *_):
            """Device pointers of the next batch's inputs, in ``names`` order; None at
            the end."""
            if self.fed >= len(batches):
                return None
            feeds = batches[self.fed]
            self.fed += 1
            return [int(to_device(n, feeds[n])) for n in names]

        def read_calibration_cache(self, *_):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()


class _DeviceInputs:
    """``to_device`` for the calibrator: one CUDA buffer per input, refilled per batch."""

    def __init__(self):
        from fedspine_jax.device_runtime.inference import _Cuda

        self.cuda, self.ptrs = _Cuda(), {}

    def __call__(self, name: str, host: np.ndarray) -> int:
        host = np.ascontiguousarray(host)
        if name not in self.ptrs:
            self.ptrs[name] = self.cuda.alloc(host.nbytes)
        self.cuda.to_device(self.ptrs[name], host)
        self.cuda.sync()
        return self.ptrs[name]

    def free(self) -> None:
        for p in self.ptrs.values():
            self.cuda.free(p)
        self.ptrs = {}


# ---------------------------------------------------------------------------------------
# building


def read_onnx_meta(onnx_path: str | Path) -> tuple[ModelMeta, dict[str, str]]:
    """(meta, metadata_props entries) of an exported ONNX file (weights not loaded)."""
    import onnx

    p = Path(onnx_path)
    if not p.is_file():
        raise ExportError(f"ONNX file {str(p)!r} does not exist")
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{str(p)!r} is not a readable ONNX file ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
    entries = {e.key: e.value for e in m.metadata_props}
    meta, _ = metadata.parse_props(entries, str(p))
    return meta, entries


def read_portable_meta(onnx_path: Path) -> tuple[ModelMeta, dict[str, str]]:
    """:func:`read_onnx_meta` of a portable graph; the CPU graphs are refused by name."""
    meta, entries = read_onnx_meta(onnx_path)
    if meta.graph != metadata.PORTABLE:
        raise ExportError(f"{onnx_path.name} is the {meta.graph} graph (ONNX Runtime contrib "
                          f"ops TensorRT cannot parse): build the engine from the portable "
                          f"{onnx_path.name[:-len(metadata.GRAPHS[meta.graph])]}.onnx "
                          f"beside it")
    return meta, entries


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, fp16: bool = False,
                 int8: bool = False, calibration: list[dict] | None = None,
                 min_shape: str | None = None, opt_shape: str | None = None,
                 max_shape: str | None = None, workspace_gib: float = 2.0) -> Path:
    """Build and write a TensorRT engine (and ``<engine>.json``) from an exported ONNX file.

    Args:
      onnx_path: a file written by ``fedspine export`` (external data beside it is read).
      engine_path: where to write the serialised engine (``.plan``).
      fp16: allow FP16 kernels (``BuilderFlag.FP16``).
      int8: allow INT8 kernels, calibrated (see the module note): the scales come from
        :func:`calibration_cache_path` when it exists, else from ``calibration`` (which is
        needed then; TensorRT writes the cache).
      calibration: :func:`calibration_batches` of the task's data.
      min_shape, opt_shape, max_shape: the profile (see the module note); defaults from
        the model's metadata (batch 1..32, seq 1..max_len, cache up to max_len + 256).
      workspace_gib: the builder's workspace memory pool limit.
    Returns:
      ``engine_path``. Raises :class:`TensorRTUnavailable` without TensorRT and
      :class:`ExportError` when parsing or building fails (with TensorRT's messages).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta, _ = read_portable_meta(onnx_path)
    prof = profile(meta, min_shape, opt_shape, max_shape)
    if not available():
        raise TensorRTUnavailable("the tensorrt Python package is not installed here",
                                  trtexec_command(onnx_path, engine_path, prof, fp16, int8))
    import tensorrt as trt

    to_device = _DeviceInputs() if int8 else None
    try:
        return build_with(trt, onnx_path, engine_path, fp16=fp16, int8=int8,
                          calibration=calibration, to_device=to_device, min_shape=min_shape,
                          opt_shape=opt_shape, max_shape=max_shape,
                          workspace_gib=workspace_gib)
    finally:
        if to_device is not None:
            to_device.free()


def build_with(trt, onnx_path: str | Path, engine_path: str | Path, *, fp16: bool = False,
               int8: bool = False, calibration: list[dict] | None = None, to_device=None,
               min_shape: str | None = None, opt_shape: str | None = None,
               max_shape: str | None = None, workspace_gib: float = 2.0) -> Path:
    """:func:`build_engine` with the ``tensorrt`` module given (``trt``) and, for INT8,
    the calibrator's ``to_device`` (see :func:`entropy_calibrator`)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta, entries = read_portable_meta(onnx_path)
    prof = profile(meta, min_shape, opt_shape, max_shape)
    cache = calibration_cache_path(engine_path, onnx_path)
    if int8 and meta.is_decoder:
        raise ExportError("--int8 engines are for encoders; build a causal LM's engine with "
                          "--fp16")
    if int8 and not cache.is_file() and not calibration:
        raise ExportError(f"--int8 needs calibration data (the task's examples) or a "
                          f"calibration cache {cache.name} beside the engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        if getattr(builder, "platform_has_fast_fp16", True) is False:
            raise ExportError("--fp16: this GPU has no fast FP16 support")
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    dims = {d: (lo, mid, hi) for d, lo, mid, hi in prof.dims}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.is_shape_tensor:  # e.g. cache_position when TensorRT folds it into shapes
            lo, mid, hi = dims.get(CACHE, (0, 0, 0))
            opt.set_shape_input(t.name, [0] * max(1, len(t.shape)),
                                [mid] * max(1, len(t.shape)), [hi] * max(1, len(t.shape)))
        elif t.name in prof.min:
            opt.set_shape(t.name, prof.min[t.name], prof.opt[t.name], prof.max[t.name])
    config.add_optimization_profile(opt)
    if int8:
        if getattr(builder, "platform_has_fast_int8", True) is False:
            raise ExportError("--int8: this GPU has no fast INT8 support")
        config.set_flag(trt.BuilderFlag.INT8)
        _calibrate(trt, builder, config, network, prof, calibration or [], cache, to_device)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see "
                          f"its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    metadata.write_sidecar(engine_path, entries, {
        "tensorrt": trt.__version__, "fp16": bool(fp16), "int8": bool(int8),
        "calibration_cache": cache.name if int8 else None,
        "profile": {d: [lo, mid, hi] for d, lo, mid, hi in prof.dims},
        "onnx": onnx_path.name})
    return engine_path


def _calibrate(trt, builder, config, network, prof: Profile, batches: list[dict],
               cache: Path, to_device) -> None:
    """Attach the entropy calibrator and its profile: every input fixed at the
    calibration batches' shape (which must fit the engine's profile)."""
    shape = next(iter(batches[0].values())).shape if batches else None
    if shape is not None:
        for name, hi in prof.max.items():
            if name in batches[0] and (shape[0] > hi[0] or shape[1] > hi[1]):
                raise ExportError(f"calibration batches {shape[0]}x{shape[1]} exceed the "
                                  f"profile's max {hi[0]}x{hi[1]} for {name}")
        cal_prof = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            if t.name in batches[0]:
                cal_prof.set_shape(t.name, shape, shape, shape)
        config.set_calibration_profile(cal_prof)
    config.int8_calibrator = entropy_calibrator(trt.IInt8EntropyCalibrator2, batches, cache,
                                                to_device)


def check_engine(engine_path: str | Path, onnx_path: str | Path, batches: list[dict]):
    """An engine's first output against the fp32 ONNX graph's (ONNX Runtime, CPU) on the
    same inputs (e.g. :func:`calibration_batches` of the evaluation split): a
    ``quantize.Int8Check``."""
    from fedspine_jax.device_runtime.inference import OrtBackend, TensorRTBackend
    from fedspine_jax.export.quantize import Int8Check

    trt_b = TensorRTBackend(Path(engine_path))
    ort_b = OrtBackend(Path(onnx_path), ["CPUExecutionProvider"])
    got = np.concatenate([trt_b.run(f)[0] for f in batches]).astype(np.float32)
    ref = np.concatenate([ort_b.run(f)[0] for f in batches]).astype(np.float32)
    agree = got.reshape(len(got), -1).argmax(-1) == ref.reshape(len(ref), -1).argmax(-1)
    return Int8Check(float(np.max(np.abs(got - ref))), float(agree.mean()), len(agree))


def _gpu_name() -> str:
    """The first CUDA device's name (for engine cache keys), or ``gpu`` if unknown."""
    try:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt
        err, props = rt.cudaGetDeviceProperties(0)
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        name = name.split("\x00")[0]
    except Exception:
        return "gpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "gpu"


def cached_engine(onnx_path: str | Path, cache_dir: str | Path, *, fp16: bool = False,
                  **build_kw) -> Path:
    """The engine of ``onnx_path`` for this GPU, built once and reused.

    The cache key is the ONNX file's sha256 (and its external data's), the TensorRT
    version, the GPU's name and the precision, so a new model, a TensorRT upgrade or
    another GPU gets a fresh build. ``build_kw`` goes to :func:`build_engine`.
    """
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    if not available():
        meta, _ = read_onnx_meta(onnx_path)
        raise TensorRTUnavailable("the tensorrt Python package is not installed here",
                                  trtexec_command(onnx_path, cache_dir / "model.plan",
                                                  profile(meta), fp16))
    import tensorrt as trt

    key = f"{onnx_digest(onnx_path)}-trt{trt.__version__}-{_gpu_name()}{'-fp16' if fp16 else ''}"
    engine = cache_dir / f"{key}.plan"
    if engine.is_file() and metadata.sidecar_path(engine).is_file():
        return engine
    return build_engine(onnx_path, engine, fp16=fp16, **build_kw)
