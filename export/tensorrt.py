"""Build a TensorRT engine from an exported ONNX file (TensorRT Python API).

Engines are specific to the GPU and the TensorRT version they are built with, so the
server ships ONNX and every device builds (and caches) its own engine
(``device_runtime.agent``). The build: ONNX parser -> network (explicit batch) -> builder
config (workspace limit, optional FP16) -> one optimisation profile covering the dynamic
dimensions -> serialised engine, written with its metadata sidecar ``<engine>.json``.

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
                    fp16: bool = False) -> str:
    """The ``trtexec`` command line that builds the same engine."""
    def fmt(shapes):
        return ",".join(f"{n}:{'x'.join(str(x) for x in s)}" for n, s in shapes.items())

    argv = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            f"--minShapes={fmt(prof.min)}", f"--optShapes={fmt(prof.opt)}",
            f"--maxShapes={fmt(prof.max)}"]
    if fp16:
        argv.append("--fp16")
    return shlex.join(argv)


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


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, fp16: bool = False,
                 min_shape: str | None = None, opt_shape: str | None = None,
                 max_shape: str | None = None, workspace_gib: float = 2.0) -> Path:
    """Build and write a TensorRT engine (and ``<engine>.json``) from an exported ONNX file.

    Args:
      onnx_path: a file written by ``fedspine export`` (external data beside it is read).
      engine_path: where to write the serialised engine (``.plan``).
      fp16: allow FP16 kernels (``BuilderFlag.FP16``).
      min_shape, opt_shape, max_shape: the profile (see the module note); defaults from
        the model's metadata (batch 1..32, seq 1..max_len, cache up to max_len + 256).
      workspace_gib: the builder's workspace memory pool limit.
    Returns:
      ``engine_path``. Raises :class:`TensorRTUnavailable` without TensorRT and
      :class:`ExportError` when parsing or building fails (with TensorRT's messages).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta, entries = read_onnx_meta(onnx_path)
    if meta.graph != metadata.PORTABLE:
        raise ExportError(f"{onnx_path.name} is the {meta.graph} graph (ONNX Runtime contrib "
                          f"ops TensorRT cannot parse): build the engine from the portable "
                          f"{onnx_path.name[:-len(metadata.GRAPHS[meta.graph])]}.onnx "
                          f"beside it")
    prof = profile(meta, min_shape, opt_shape, max_shape)
    if not available():
        raise TensorRTUnavailable("the tensorrt Python package is not installed here",
                                  trtexec_command(onnx_path, engine_path, prof, fp16))
    import tensorrt as trt

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
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see "
                          f"its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    metadata.write_sidecar(engine_path, entries, {
        "tensorrt": trt.__version__, "fp16": bool(fp16),
        "profile": {d: [lo, mid, hi] for d, lo, mid, hi in prof.dims},
        "onnx": onnx_path.name})
    return engine_path


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

    files = [onnx_path] + [p for p in [onnx_path.with_name(onnx_path.name + ".data")]
                           if p.exists()]
    digest = metadata.sha256_file(files[0])[:16] + "".join(
        metadata.sha256_file(p)[:8] for p in files[1:])
    key = f"{digest}-trt{trt.__version__}-{_gpu_name()}{'-fp16' if fp16 else ''}"
    engine = cache_dir / f"{key}.plan"
    if engine.is_file() and metadata.sidecar_path(engine).is_file():
        return engine
    return build_engine(onnx_path, engine, fp16=fp16, **build_kw)
