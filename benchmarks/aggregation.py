"""Low-rank aggregation (Eq. 15-16) vs the dense sum + full SVD, at roberta-base shapes.

Both sides compute the same thing for every LoRA linear of the model: the weighted sum
``sum_i w_i a_i @ b_i`` of N devices' updates truncated to the global rank R by its SVD,
returned as balanced factors. Ours is ``aggregation.aggregate_lora_batched`` (when
``s = sum r_i < min(d, k)``: QR of the stacked factors and an SVD of the s x s core, no d x k
matrix; otherwise the d x k sum and its SVD); the peer (written below) always forms the d x k
sum and takes its full SVD.
Linears of one shape are stacked along a layer axis and each side runs one jitted call per
shape (q/k/v/o: 768 x 768, fc1: 768 x 3072, fc2: 3072 x 768; 4 + 1 + 1 groups of
``--layers`` linears). Device ranks are drawn from {2, 4, 8, 16, 32}; factors are i.i.d.
Gaussian (a flat, worst-case spectrum) and the weights come from random importances through
``aggregation_weights``. Times are medians over ``--repeats`` runs after a warm-up run (which
compiles), the two sides timed alternately; their products are compared linear by linear.

The saving depends on ``s = sum_i r_i`` against ``min(d, k) = 768``: with N = 80 devices
(mean rank 12.4, s ~ 1000 > 768) every device's update adds new directions, the sum is full
rank and an exact truncation needs a full-size SVD on either route; with a per-round cohort
of N = 10 (s ~ 120) the core is small. Both are run by default.

LAPACK (used by the QR and SVD on CPU) is pinned to one OpenBLAS thread unless
OPENBLAS_NUM_THREADS is set: on a 2-core machine its threaded QR/SVD run several times
slower (and erratically) beside XLA's own thread pool. Both sides share the setting.

    python benchmarks/aggregation.py [--layers 2] [--devices 80 10] [--rank 32] [--repeats 3]

``--layers 12`` is the full model (about 4 minutes on a 2-core CPU). Prints one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedspine_jax import aggregation  # noqa: E402

HIDDEN, FFN = 768, 3072                 # roberta-base
RANK_CHOICES = (2, 4, 8, 16, 32)        # HETLoRA's / the paper's rank set (Sec. 5.2)
# (name, d_in, d_out, linears per transformer layer)
GROUPS = (("attn_qkvo", HIDDEN, HIDDEN, 4), ("fc1", HIDDEN, FFN, 1), ("fc2", FFN, HIDDEN, 1))


# ---------------------------------------------------------------- the dense peer
@functools.partial(jax.jit, static_argnames=("rank",))
def dense_aggregate(a_list, b_list, weights, rank):
    """Dense route: per linear, form the (d, k) weighted sum, full SVD, keep the top ``rank``.

    Loops over the layer axis with ``lax.map`` like ours (same batching, so the ratio is the
    algorithms'; see aggregate_lora_batched on batched LAPACK calls).
    """
    hi = jax.lax.Precision.HIGHEST

    def one(xs):
        a_l, b_l = xs          # the sum as one product of the stacked factors (its best form)
        m = jnp.matmul(jnp.concatenate([w * a for w, a in zip(weights, a_l)], axis=1),
                       jnp.concatenate(b_l, axis=0), precision=hi)      # (d, k)
        u, s, vt = jnp.linalg.svd(m, full_matrices=False)
        root = jnp.sqrt(s[:rank])
        return u[:, :rank] * root, root[:, None] * vt[:rank]

    return jax.lax.map(one, (list(a_list), list(b_list)))


# ---------------------------------------------------------------- harness
def make_group(rng, n_layers, d, k, ranks):
    """Per device i: a_i (L, d, r_i) and b_i (L, r_i, k), products of order 1."""
    a = [jnp.asarray(rng.standard_normal((n_layers, d, r), np.float32) / np.sqrt(r))
         for r in ranks]
    b = [jnp.asarray(rng.standard_normal((n_layers, r, k), np.float32)) for r in ranks]
    return a, b


def timed(fns, repeats):
    """Warm up each (compile + one run), then time them alternately ``repeats`` times.

    Alternating keeps a busy machine's slow spells from landing on one side only.
    Returns the outputs and each function's median wall time.
    """
    outs = [jax.block_until_ready(fn()) for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
    return outs, [float(np.median(ts)) for ts in times]


def compare(ours, dense, a_list, b_list, weights):
    """Max |ours - dense| on the products, max |dense|, and the truncation errors' gap."""
    (a1, b1), (a2, b2) = ours, dense
    p1 = np.asarray(jnp.matmul(a1, b1, precision="highest"), np.float64)
    p2 = np.asarray(jnp.matmul(a2, b2, precision="highest"), np.float64)
    m = sum(float(w) * np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64))
            for w, a, b in zip(weights, a_list, b_list))
    e1 = np.linalg.norm(m - p1, axis=(1, 2))
    e2 = np.linalg.norm(m - p2, axis=(1, 2))
    return (float(np.abs(p1 - p2).max()), float(np.abs(p2).max()),
            float(np.max(np.abs(e1 - e2) / np.maximum(e2, 1e-30))))


def run(n_devices, args):
    rng = np.random.default_rng(args.seed + n_devices)
    ranks = [int(r) for r in rng.choice(RANK_CHOICES, size=n_devices)]
    weights = aggregation.aggregation_weights(
        jnp.asarray(rng.uniform(0.1, 1.0, n_devices), jnp.float32), "normalized")
    t_ours = t_dense = 0.0
    max_diff = max_ref = err_gap = 0.0
    groups = {}
    for name, d, k, per_layer in GROUPS:
        n_lin = per_layer * args.layers
        a_list, b_list = make_group(rng, n_lin, d, k, ranks)
        (ours, dense), (t1, t2) = timed(
            [lambda: aggregation.aggregate_lora_batched(a_list, b_list, weights, args.rank),
             lambda: dense_aggregate(a_list, b_list, weights, args.rank)], args.repeats)
        diff, ref, gap = compare(ours, dense, a_list, b_list, weights)
        groups[name] = {"linears": n_lin, "shape": [d, k], "ours_s": round(t1, 4),
                        "dense_s": round(t2, 4), "speedup": round(t2 / t1, 2),
                        "max_abs_product_diff_rel": diff / ref}
        t_ours += t1
        t_dense += t2
        max_diff, max_ref, err_gap = max(max_diff, diff), max(max_ref, ref), max(err_gap, gap)
        del a_list, b_list, ours, dense
    return {
        "devices": n_devices,
        "sum_of_ranks": sum(ranks),
        "linears": sum(g["linears"] for g in groups.values()),
        "ours_s": round(t_ours, 4),
        "dense_s": round(t_dense, 4),
        "speedup": round(t_dense / t_ours, 2),
        # max over linears of |ours - dense| on the products, relative to max |dense product|
        "max_abs_product_diff_rel": max_diff / max_ref,
        # max over linears of | ||M - ours||_F - ||M - dense||_F | / ||M - dense||_F (M: sum)
        "truncation_error_diff_rel": err_gap,
        "groups": groups,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2,
                    help="transformer layers (roberta-base has 12; 6 LoRA linears each)")
    ap.add_argument("--devices", type=int, nargs="+", default=[80, 10],
                    help="numbers of devices N to run, each a separate comparison")
    ap.add_argument("--rank", type=int, default=32, help="global rank R")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    result = {
        "benchmark": "aggregation",
        "what": "sum_i w_i a_i b_i truncated to rank R: aggregate_lora_batched (QR + core SVD "
                "when sum r_i < min(d, k)) vs dense sum + full SVD, median after warm-up",
        "model": f"roberta-base shapes, {args.layers} of 12 layers x 6 LoRA linears",
        "layers": args.layers,
        "rank": args.rank,
        "rank_choices": list(RANK_CHOICES),
        "repeats": args.repeats,
        "seed": args.seed,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(),
                    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                    "load_average_1m_at_start": round(os.getloadavg()[0], 2)},
        "runs": [run(n, args) for n in args.devices],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
