"""ONNX graph passes that make jax2onnx's output friendly to TensorRT, and saving.

Design note
-----------
jax2onnx lowers ``lax.dot_general`` to ``MatMul`` / ``Gemm`` only when both operands are
2-D (or share leading batch dims); the linears of our models multiply ``(B, L, D)``
activations by ``(D, E)`` kernels, which it writes as ``Einsum("abc,cd->abd")``. TensorRT
parses Einsum but runs it through a generic path and refuses many equations; ONNX Runtime
also skips its MatMul fusions for it. :func:`einsum_to_matmul` rewrites every Einsum whose
equation is a (batched) matrix product to ``MatMul`` (numpy broadcasting semantics,
identical results).

:func:`legalize_reductions` moves a constant ``axes`` *input* of ``ReduceMean`` (and the other
reductions that took ``axes`` as an attribute before opset 18) into the attribute when the
model's opset is below 18: jax2onnx 0.17.1's ``jnp.mean`` lowering (used by RMSNorm) writes
the opset-18 form whatever opset it is asked for, which ONNX Runtime and TensorRT reject at
opset 17.

:func:`drop_identity_muls` bypasses multiplications by all-ones constants: a compacted
model's head and channel masks are all ones, and the model multiplies by them anyway.

:func:`constant_reshapes` replaces the run-time shape computations jax2onnx writes for
reshapes over symbolic dimensions by constant shapes using ``0`` ("copy the input's
dimension"), which TensorRT resolves at build time and ONNX Runtime does not recompute.

:func:`drop_empty_matmuls` replaces a ``MatMul`` by a constant weight with a zero-length
contraction (an FFN whose channels were all pruned: ``(B, L, 0) @ (0, D)``) by zeros of the
output's shape, and :func:`prune_dead` then removes the now unused nodes and (zero-size)
initializers: TensorRT cannot build layers from empty weights.

:func:`lower_ir_version` writes the oldest IR version that carries the opset (jax2onnx
writes the newest the installed onnx knows, which older TensorRT parsers refuse).

:func:`save` writes a single ``.onnx`` file, or ``.onnx`` + ``.onnx.data`` (all
initializers in one external-data file beside it) when the weights would not fit
protobuf's 2 GiB message limit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Protobuf refuses to serialise a message of 2 GiB or more; leave room for the graph.
EXTERNAL_DATA_THRESHOLD = (2 << 30) - (64 << 20)
# Reductions whose ``axes`` moved from an attribute to an input in opset 18.
_AXES_INPUT_SINCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("the model imports no default-domain ONNX opset")


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node outputs by name (tensors, data not copied)."""
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[n.output[0]] = a.t
    return out


class _Names:
    """Fresh value names for a graph (remembers the ones it hands out)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.taken = {o for n in g.node for o in n.output} | {i for n in g.node
                                                               for i in n.input}
        self.taken |= {t.name for t in g.initializer} | {i.name for i in g.input}

    def __call__(self, base: str) -> str:
        i = 0
        while f"{base}_{i}" in self.taken:
            i += 1
        self.taken.add(f"{base}_{i}")
        return f"{base}_{i}"


_MATMUL_EQ = re.compile(r"^([a-zA-Z]*),([a-zA-Z]*)->([a-zA-Z]*)$")


def _is_matmul_equation(eq: str) -> bool:
    """True for ``P k, k n -> P n`` and ``P m k, P k n -> P m n`` (distinct letters)."""
    m = _MATMUL_EQ.match(eq.replace(" ", ""))
    if not m:
        return False
    lhs, rhs, out = m.groups()
    if len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs) or len(lhs) < 1:
        return False
    if len(rhs) == 2:                       # (..., k) @ (k, n)
        k, n = rhs
        return lhs[-1] == k and n not in lhs and out == lhs[:-1] + n
    if len(rhs) >= 3 and len(lhs) == len(rhs):   # batched (P, m, k) @ (P, k, n)
        p, (mm, k), (k2, n) = lhs[:-2], lhs[-2:], rhs[-2:]
        return (rhs[:-2] == p and k == k2 and len({mm, k, n}) == 3
                and not ({mm, k, n} & set(p)) and out == p + mm + n)
    return False


def einsum_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite matrix-product Einsums to MatMul in place; returns how many were rewritten."""
    count = 0
    for n in model.graph.node:
        if n.op_type != "Einsum" or len(n.input) != 2:
            continue
        eq = next((a.s.decode() for a in n.attribute if a.name == "equation"), "")
        if _is_matmul_equation(eq):
            n.op_type = "MatMul"
            del n.attribute[:]
            count += 1
    return count


def legalize_reductions(model: onnx.ModelProto) -> int:
    """Below opset 18, move constant ``axes`` inputs of reductions into the attribute."""
    if opset_of(model) >= 18:
        return 0
    consts = _constants(model)
    count = 0
    for n in model.graph.node:
        if n.op_type in _AXES_INPUT_SINCE_18 and len(n.input) == 2 and n.input[1]:
            t = consts.get(n.input[1])
            if t is None:
                raise ValueError(f"{n.op_type} node {n.name!r} takes its axes from a computed "
                                 f"tensor, which opset {opset_of(model)} cannot express; "
                                 f"export with opset >= 18")
            axes = [int(x) for x in numpy_helper.to_array(t).reshape(-1)]
            del n.input[1]
            n.attribute.append(helper.make_attribute("axes", axes))
            count += 1
    return count


# Ops that keep their (non-constant) input's leading dimensions.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Neg", "Exp",
                "Sqrt", "Pow", "Cast", "Identity", "Softplus", "Gelu", "Where", "Max", "Min"}


def _leading_source(name: str, producers: dict, consts: dict, limit: int = 64) -> str:
    """A tensor with the same leading dims as ``name`` that does not depend on the empty
    FFN chain: walk back through elementwise ops to the first ``MatMul`` by a constant
    weight and take its input (the FFN's input ``(B, L, D)``); ``name`` if the walk fails."""
    cur = name
    for _ in range(limit):
        n = producers.get(cur)
        if n is None:
            return name
        if n.op_type == "MatMul" and n.input[1] in consts:
            return n.input[0]
        if n.op_type not in _ELEMENTWISE:
            return name
        live = [i for i in n.input if i and i not in consts]
        if not live:
            return name
        cur = live[0]
    return name


def drop_empty_matmuls(model: onnx.ModelProto) -> int:
    """Replace ``MatMul(x, W)`` with a constant ``W: (0, N)`` by zeros ``(..., N)``.

    The zeros' shape is taken from the FFN's input rather than from ``x`` (which is
    ``(B, L, 0)``), so the whole empty chain before it becomes dead (see :func:`prune_dead`).
    """
    consts = _constants(model)
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    fresh = _Names(model)
    nodes, count = [], 0
    for n in g.node:
        w = consts.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if w is None or len(w.dims) != 2 or w.dims[0] != 0:
            nodes.append(n)
            continue
        dtype = w.data_type
        lead = fresh("empty_mm_lead_shape")
        shape = fresh("empty_mm_shape")
        width = fresh("empty_mm_width")
        zero = numpy_helper.from_array(
            np.zeros((1,), helper.tensor_dtype_to_np_dtype(dtype)))
        src = _leading_source(n.input[0], producers, consts)
        nodes += [
            helper.make_node("Shape", [src], [lead], start=0, end=-1),
            helper.make_node("Constant", [], [width], value=numpy_helper.from_array(
                np.array([w.dims[1]], np.int64))),
            helper.make_node("Concat", [lead, width], [shape], axis=0),
            helper.make_node("ConstantOfShape", [shape], [n.output[0]], value=zero),
        ]
        count += 1
    if count:
        del g.node[:]
        g.node.extend(nodes)
    return count


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Declared shapes of graph values (dims as ints or symbolic names), where known."""
    out = {}
    g = model.graph
    for v in list(g.value_info) + list(g.input) + list(g.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else
                                (d.dim_param or None) for d in v.type.tensor_type.shape.dim)
    return out


def drop_identity_muls(model: onnx.ModelProto) -> int:
    """Bypass ``Mul(x, ones)`` whose declared output shape is ``x``'s (a compacted model's
    head and channel masks are all ones: the product is ``x``)."""
    consts = _constants(model)
    shapes = _shapes(model)
    g = model.graph
    outputs = {o.name for o in g.output}
    alias: dict[str, str] = {}
    for n in g.node:
        if n.op_type != "Mul" or len(n.input) != 2 or n.output[0] in outputs:
            continue
        for j in (0, 1):
            c, x = n.input[j], n.input[1 - j]
            if c not in consts or x in consts:
                continue
            ones = numpy_helper.to_array(consts[c])
            sx, so = shapes.get(x), shapes.get(n.output[0])
            if (ones.dtype.kind == "f" and ones.size and np.all(ones == 1) and sx is not None
                    and sx == so and None not in sx and ones.ndim <= len(sx)):
                alias[n.output[0]] = alias.get(x, x)
                break
    if alias:
        for n in g.node:
            for k, i in enumerate(n.input):
                if i in alias:
                    n.input[k] = alias[i]
    return len(alias)


def _dim_of(name: str, producers: dict, consts: dict) -> tuple[str, int] | None:
    """``(tensor, axis)`` when ``name`` is one dimension of a tensor's runtime shape:
    ``Gather(Shape(tensor), axis)``, possibly through ``Squeeze`` / ``Unsqueeze``."""
    n = producers.get(name)
    while n is not None and n.op_type in ("Squeeze", "Unsqueeze"):
        n = producers.get(n.input[0])
    if n is None or n.op_type != "Gather" or n.input[1] not in consts:
        return None
    shape = producers.get(n.input[0])
    if shape is None or shape.op_type != "Shape" or any(a.name in ("start", "end")
                                                          for a in shape.attribute):
        return None
    idx = numpy_helper.to_array(consts[n.input[1]]).reshape(-1)
    return (shape.input[0], int(idx[0])) if idx.size == 1 else None


def constant_reshapes(model: onnx.ModelProto) -> int:
    """Give ``Reshape`` a constant target shape where its computed one is made of constants
    and dimensions of its own input at the same position: those become ``0`` ("copy this
    dimension"). jax2onnx computes every reshape's shape at run time from ``Shape`` ->
    ``Gather`` -> ``Squeeze`` -> ``Unsqueeze`` -> ``Concat``; ONNX Runtime runs those ops
    on every call and TensorRT has to treat them as shape tensors."""
    consts = _constants(model)
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    fresh = _Names(model)
    count, new_inits = 0, []
    for n in g.node:
        if n.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in n.attribute):
            continue
        cat = producers.get(n.input[1])
        if cat is None or cat.op_type != "Concat":
            continue
        dims = []
        for pos, piece in enumerate(cat.input):
            if piece in consts:
                v = numpy_helper.to_array(consts[piece]).reshape(-1)
                if v.size != 1 or int(v[0]) == 0:  # a literal 0 would turn into "copy"
                    break
                dims.append(int(v[0]))
            elif _dim_of(piece, producers, consts) == (n.input[0], pos):
                dims.append(0)
            else:
                break
        else:
            name = fresh("reshape_const_shape")
            new_inits.append(numpy_helper.from_array(np.array(dims, np.int64), name))
            consts[name] = new_inits[-1]
            n.input[1] = name
            count += 1
    g.initializer.extend(new_inits)
    return count


def prune_dead(model: onnx.ModelProto) -> int:
    """Remove nodes whose outputs nobody reads, then unread initializers; returns nodes removed."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
            for a in n.attribute:                    # subgraphs read outer names too
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    needed.update(i for sn in sub.node for i in sn.input if i)
    removed = len(g.node) - len(keep)
    if removed:
        del g.node[:]
        g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in needed]
    if len(inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(inits)
    vi = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vi)
    return removed


def lower_ir_version(model: onnx.ModelProto) -> int:
    """Set the IR version to the oldest that carries the model's opset (8 for opset 17):
    jax2onnx writes the installed onnx package's newest (10), which older TensorRT parsers
    (8.5: onnx 1.12, IR 8) refuse. Returns the IR version now set."""
    opset = opset_of(model)
    oldest = min((ir for _, ir, op, *_ in helper.VERSION_TABLE if op >= opset),
                 default=model.ir_version)
    model.ir_version = int(min(model.ir_version, oldest))
    return model.ir_version


def tensorrt_friendly(model: onnx.ModelProto) -> dict[str, int]:
    """Run every pass above, in order; returns what each changed. Leftover Einsums (none for
    our models) are listed in the result under ``einsum_left``."""
    report = {"einsum_to_matmul": einsum_to_matmul(model),
              "legalized_reductions": legalize_reductions(model),
              "empty_matmuls": drop_empty_matmuls(model),
              "identity_muls": drop_identity_muls(model),
              "constant_reshapes": constant_reshapes(model)}
    report["dead_nodes"] = prune_dead(model)
    report["einsum_left"] = sum(n.op_type == "Einsum" for n in model.graph.node)
    report["ir_version"] = lower_ir_version(model)
    return report


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (computed from dims and dtype; data not touched)."""
    total = 0
    for t in model.graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def save(model: onnx.ModelProto, path: str | Path,
         external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write ``model`` to ``path``; returns the files written.

    Weights of ``external_threshold`` bytes or more go to ``<name>.data`` beside the file
    (ONNX external data, one file, tensors >= 1 KiB); a stale ``.data`` from an earlier
    export to the same path is removed otherwise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if weight_bytes(model) >= external_threshold:
        onnx.save_model(model, os.fspath(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024,
                        convert_attribute=False)
        return [path, data]
    onnx.save_model(model, os.fspath(path))
    return [path]


def model_files(path: str | Path) -> list[Path]:
    """The files of a saved model: the ``.onnx`` and, when it has one, its ``.data``."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]
