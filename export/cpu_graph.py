"""The CPU-serving graph: the portable export with ONNX Runtime's transformer fusions.

Design note
-----------
The portable graph (``onnx_export``) is plain ONNX so that old TensorRT parsers read it:
LayerNorm decomposed into a dozen elementwise ops, GELU as ``Erf`` arithmetic, attention as
reshapes, transposes, two batched matmuls and a softmax. ONNX Runtime's CPU kernels are much
faster on its fused contrib ops, but neither its C++ fusions nor the Python optimizer
(``onnxruntime.transformers.optimizer``) recognise jax2onnx's spelling of these blocks (they
match PyTorch's). So the CPU graph is made from the portable file in two steps:

1. :func:`canonicalize` rewrites our own blocks, whose exact shape we know, into ops the
   optimizer understands:

   * ``0.5 x (1 + erf(x / sqrt 2))`` -> ``com.microsoft.Gelu``;
   * the projections' biases ``(1, 1, N)`` -> ``(N,)`` (what the fusions below expect);
   * attention ``softmax(q k^T * scale + mask) v`` with q, k, v ``(B, L, h * d)``
     projections reshaped to heads, and the additive mask computed from the graph input
     ``attention_mask`` (``where(attention_mask > 0, 0, fill)``) ->
     ``com.microsoft.MultiHeadAttention(q, k, v, bias, key_padding_mask=attention_mask)``
     with the projections' biases moved into its ``bias`` (``(3 h d,)``) and the graph's
     own ``fill`` as its ``mask_filter_value`` (the op's default, -10000, would leave a
     fully padded row attending to its pad tokens by score instead of uniformly, as the
     portable graph does). Queries may come from another tensor than keys and values
     (the classifier's last layer attends from the first token only).

2. ONNX Runtime's BERT optimizer then fuses what it knows on top of that (bias ``Add`` +
   ``Gelu`` -> ``BiasGelu``); :func:`build` reports the fused op counts.

LayerNorm stays decomposed, on purpose: ONNX Runtime turns a residual ``Add`` followed by
``LayerNormalization`` into ``SkipLayerNormalization`` when it loads a session, a CPU
kernel that loses to the decomposed ops it replaces, and the decomposed form
(``E[x^2] - E[x]^2``) matches none of its fusions. q, k and v stay three matmuls. The
measurements behind both choices are in BENCHMARKS.md (inference).

Pruned layers keep their own head counts (read from each attention's reshape); a layer
without heads or channels has no such block and is left as it is. Decoders (RMSNorm,
rotary embeddings, KV cache) are not fused: they have no CPU graph.
"""

from __future__ import annotations

import collections
import logging
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fedspine_jax.export import graph

MS = "com.microsoft"
# Fused ops counted in the report (the contrib ops the CPU graph may hold).
FUSED_OPS = ("LayerNormalization", "SkipLayerNormalization", "Gelu", "BiasGelu",
             "FastGelu", "MultiHeadAttention", "Attention", "EmbedLayerNormalization")


class _Graph:
    """Producer / consumer / constant lookups of a model's graph (built once per pass)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.consts = graph._constants(model)
        self.prod = {o: n for n in model.graph.node for o in n.output}
        self.cons = collections.defaultdict(list)
        for n in model.graph.node:
            for i in n.input:
                self.cons[i].append(n)
        self.shapes = graph._shapes(model)
        self.inputs = {i.name for i in model.graph.input}

    def node(self, name: str, op: str):
        """The producer of ``name`` if it is an ``op`` node, else None."""
        n = self.prod.get(name)
        return n if n is not None and n.op_type == op else None

    def scalar(self, name: str) -> float | None:
        """The value of a one-element constant, else None."""
        t = self.consts.get(name)
        if t is None:
            return None
        a = numpy_helper.to_array(t)
        return float(a.reshape(-1)[0]) if a.size == 1 else None

    def array(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def split(self, node, want=None):
        """(the non-constant input, the constant input's value) of a binary op; ``want``:
        the constant must equal it (approximately). None when the node does not fit."""
        if node is None or len(node.input) != 2:
            return None
        for j in (0, 1):
            c, x = node.input[j], node.input[1 - j]
            v = self.scalar(c) if want is not None else self.array(c)
            if v is None or x in self.consts:
                continue
            if want is not None and not math.isclose(v, want, rel_tol=1e-5, abs_tol=1e-7):
                continue
            return x, v
        return None


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _swap(new: dict, old, node, fresh) -> None:
    """Let ``node`` take over the output of ``old`` (which gets a fresh, unread name) and
    note it in ``new`` for :func:`_replace`."""
    old.output[0] = fresh("unfused")
    new[old.output[0]] = node


def _replace(model: onnx.ModelProto, new_nodes: dict) -> None:
    """Insert each new node right before the node it replaces (``{old output: node}``,
    see :func:`_swap`); the old blocks become dead and :func:`graph.prune_dead` removes
    them."""
    out = []
    for n in model.graph.node:
        for o in n.output:
            if o in new_nodes:
                out.append(new_nodes.pop(o))
        out.append(n)
    del model.graph.node[:]
    model.graph.node.extend(out)


# ---------------------------------------------------------------------------------------
# biases


def flatten_biases(model: onnx.ModelProto) -> int:
    """``MatMul(x, W) + b`` with ``b: (1, ..., 1, N)`` -> ``b: (N,)`` (the same broadcast;
    ONNX Runtime fuses only 1-D biases into ``BiasGelu``)."""
    g = _Graph(model)
    fresh = graph._Names(model)
    count = 0
    for add in model.graph.node:
        if add.op_type != "Add":
            continue
        for j in (0, 1):
            b, x = g.array(add.input[j]), add.input[1 - j]
            if (b is None or b.ndim < 2 or set(b.shape[:-1]) != {1}
                    or g.node(x, "MatMul") is None):
                continue
            name = fresh("bias")
            model.graph.initializer.append(numpy_helper.from_array(b.reshape(-1), name))
            add.input[j] = name
            count += 1
            break
    return count


# ---------------------------------------------------------------------------------------
# GELU


def fuse_gelu(model: onnx.ModelProto) -> int:
    """Rewrite ``0.5 x (1 + erf(x / sqrt 2))`` to ``com.microsoft.Gelu``."""
    g = _Graph(model)
    new, fresh = {}, graph._Names(model)
    for erf in model.graph.node:
        if erf.op_type != "Erf":
            continue
        a = g.split(g.node(erf.input[0], "Mul"), 1 / math.sqrt(2))
        if a is None:
            d = g.split(g.node(erf.input[0], "Div"), math.sqrt(2))
            if d is None:
                continue
            a = d
        x = a[0]
        add = g.cons[erf.output[0]]
        if len(add) != 1 or add[0].op_type != "Add" or g.split(add[0], 1.0) is None:
            continue
        outer = g.cons[add[0].output[0]]
        if len(outer) != 1 or outer[0].op_type != "Mul":
            continue
        mul = outer[0]
        other = mul.input[1] if mul.input[0] == add[0].output[0] else mul.input[0]
        half = g.split(g.node(other, "Mul"), 0.5)          # (0.5 x) * (1 + erf)
        if half is not None and half[0] == x:
            last = mul
        elif other == x:                                   # (x * (1 + erf)) * 0.5
            nxt = g.cons[mul.output[0]]
            if len(nxt) != 1 or nxt[0].op_type != "Mul" or g.split(nxt[0], 0.5) is None:
                continue
            last = nxt[0]
        else:
            continue
        out = last.output[0]
        _swap(new, last, helper.make_node("Gelu", [x], [out], domain=MS,
                                          name=fresh("Gelu")), fresh)
    count = len(new)
    _replace(model, new)
    return count


# ---------------------------------------------------------------------------------------
# attention


def _heads(g: _Graph, name: str, perm: list[int]):
    """``Transpose(perm)(Reshape(Add(MatMul(x, W), b), [0, L, h, d]))`` ->
    (matmul output, bias (h d,), h, d); None when ``name`` is not such a projection."""
    t = g.node(name, "Transpose")
    if t is None or list(_attr(t, "perm", [])) != perm:
        return None
    r = g.node(t.input[0], "Reshape")
    shape = g.array(r.input[1]) if r is not None else None
    if shape is None or shape.shape != (4,) or min(shape[2:]) < 1:
        return None
    add = g.node(r.input[0], "Add")
    sb = g.split(add)
    mm = g.node(sb[0], "MatMul") if sb else None
    if mm is None or mm.input[1] not in g.consts:
        return None
    h, d = int(shape[2]), int(shape[3])
    bias = sb[1].reshape(-1)
    if bias.size != h * d:
        return None
    return mm.output[0], bias.astype(np.float32), h, d


def _padding_mask(g: _Graph, name: str) -> tuple[str, float] | None:
    """(the graph input ``attention_mask``, ``fill``) when ``name`` is the additive mask
    ``where(attention_mask > 0, 0, fill)`` computed from it alone (``fill <= -1e4``),
    else None."""
    w = g.node(name, "Where")
    fill = g.scalar(w.input[2]) if w is not None else None
    if w is None or g.scalar(w.input[1]) != 0.0 or fill is None or fill > -1e4:
        return None
    gt = g.node(w.input[0], "Greater")
    if gt is None or g.scalar(gt.input[1]) != 0.0:
        return None
    v = gt.input[0]     # the mask's values pass through shape-only ops (their data input)
    while v not in g.inputs:
        n = g.prod.get(v)
        if n is None or n.op_type not in ("Reshape", "Expand", "Unsqueeze", "Cast"):
            return None
        v = n.input[0]
    return (v, fill) if v == "attention_mask" else None


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite masked softmax attention blocks to ``com.microsoft.MultiHeadAttention``."""
    g = _Graph(model)
    new, fresh = {}, graph._Names(model)
    for sm in model.graph.node:
        if sm.op_type != "Softmax" or _attr(sm, "axis", -1) not in (-1, 3):
            continue
        add = g.node(sm.input[0], "Add")
        if add is None:
            continue
        for j in (0, 1):
            mul, mask = g.node(add.input[j], "Mul"), _padding_mask(g, add.input[1 - j])
            if mul is not None and mask is not None:
                break
        else:
            continue
        sc = g.split(mul)
        qk = g.node(sc[0], "MatMul") if sc and sc[1].size == 1 else None
        if qk is None:
            continue
        q, k = _heads(g, qk.input[0], [0, 2, 1, 3]), _heads(g, qk.input[1], [0, 2, 3, 1])
        users = g.cons[sm.output[0]]
        pv = users[0] if len(users) == 1 and users[0].op_type == "MatMul" else None
        v = _heads(g, pv.input[1], [0, 2, 1, 3]) if pv is not None else None
        if None in (q, k, v) or q[2:] != k[2:] or k[2:] != v[2:]:
            continue
        t = g.cons[pv.output[0]]
        if len(t) != 1 or t[0].op_type != "Transpose" or list(_attr(t[0], "perm", [])) != [
                0, 2, 1, 3]:
            continue
        r = g.cons[t[0].output[0]]
        shape = g.array(r[0].input[1]) if len(r) == 1 and r[0].op_type == "Reshape" else None
        h, d = q[2], q[3]
        if shape is None or shape.shape != (3,) or int(shape[2]) != h * d:
            continue
        mask, fill = mask
        bias = fresh("mha_bias")
        model.graph.initializer.append(numpy_helper.from_array(
            np.concatenate([q[1], k[1], v[1]]), bias))
        out = r[0].output[0]
        _swap(new, r[0], helper.make_node(
            "MultiHeadAttention", [q[0], k[0], v[0], bias, mask], [out], domain=MS,
            num_heads=h, scale=float(sc[1].reshape(-1)[0]), mask_filter_value=fill,
            name=fresh("MultiHeadAttention")),
            fresh)
    count = len(new)
    _replace(model, new)
    return count


# ---------------------------------------------------------------------------------------
# the CPU graph


def canonicalize(model: onnx.ModelProto) -> dict[str, int]:
    """Step 1 of the module note, in place; returns how many blocks each rewrite replaced."""
    report = {"gelu": fuse_gelu(model),
              "attention": fuse_attention(model), "biases": flatten_biases(model)}
    if report["gelu"] or report["attention"]:
        if not any(i.domain == MS for i in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS, 1))
    report["dead_nodes"] = graph.prune_dead(model)
    return report


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many of each fused op (:data:`FUSED_OPS`) the graph holds (zeros left out)."""
    c = collections.Counter(n.op_type for n in model.graph.node)
    return {op: c[op] for op in FUSED_OPS if c[op]}


def optimize(model: onnx.ModelProto, num_heads: int, hidden_size: int) -> onnx.ModelProto:
    """Step 2 of the module note: ONNX Runtime's BERT optimizer (its Python fusions only;
    the session applies its own graph optimisations when it loads the file)."""
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "model producer not matched" (it expects PyTorch's)
    try:
        return optimize_by_fusion(model, model_type="bert", num_heads=num_heads,
                                  hidden_size=hidden_size).model
    finally:
        quiet.setLevel(level)


def build(portable: onnx.ModelProto, num_heads: int, hidden_size: int
          ) -> tuple[onnx.ModelProto, dict]:
    """The CPU-serving graph of a portable encoder graph (which is not modified).

    Args:
      portable: the graph ``onnx_export`` writes (after ``graph.tensorrt_friendly``).
      num_heads, hidden_size: of an unpruned layer (the optimizer's defaults; pruned
        layers keep their own counts, set per node by :func:`fuse_attention`).
    Returns:
      (the fused model, report): ``report["rewrites"]``: blocks :func:`canonicalize`
      replaced; ``report["fused"]``: fused op counts of the final graph.
    """
    model = onnx.ModelProto()
    model.CopyFrom(portable)
    rewrites = canonicalize(model)
    model = optimize(model, num_heads, hidden_size)
    graph.prune_dead(model)
    return model, {"rewrites": rewrites, "fused": fused_counts(model)}
