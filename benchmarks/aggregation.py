"""Low-rank aggregation (Eq. 15-16) vs the dense sum + full SVD, on synthetic or real uploads.

Both sides compute the same thing for every LoRA linear of the model: the weighted sum
``sum_i w_i a_i @ b_i`` of N devices' updates truncated to the global rank R by its SVD.
Ours is ``aggregation.aggregate_lora_batched`` (when ``s = sum r_i < min(d, k)``: QR of the
stacked factors and an SVD of the s x s core, no d x k matrix; otherwise the d x k sum and
its SVD); the peer (written below) always forms the d x k sum and takes its full SVD.
Linears of one shape are stacked along a layer axis and each side runs one jitted call per
shape. Times are medians over ``--repeats`` runs after a warm-up run (which compiles), all
sides timed alternately; their products are compared linear by linear.

Two sources of updates:

* **synthetic** (default): roberta-base shapes (q/k/v/o: 768 x 768, fc1: 768 x 3072, fc2:
  3072 x 768; 4 + 1 + 1 groups of ``--layers`` linears), device ranks drawn from
  {2, 4, 8, 16, 32}, i.i.d. Gaussian factors (a flat spectrum: the worst case for
  truncation), weights from random importances through ``aggregation_weights``. N = 80 and
  N = 10 by default.
* **real** (``--uploads DIR``): the uploads of a real FedSpine simulation, as
  ``Federation.close`` received them, saved by ``--capture DIR`` (it runs ``fedspine
  simulate`` on ``configs/sst2_minilm.yaml`` with 80 devices, global rank 32, device ranks
  {2, 4, 8, 16, 32}, 3 rounds, near-IID data; ``--set`` changes any of it). The weights are
  the run's own (Eq. 14 importances through ``aggregation_weights``). MiniLM-L6 shapes
  (384 x 384, 384 x 1536, 1536 x 384).

The saving depends on ``s`` against ``min(d, k)``: with N = 80 (mean rank ~12, s ~ 1000)
the sum is full rank and an exact truncation needs a full-size SVD on either route; with a
per-round cohort of N = 10 (s ~ 120) the core is small.

**An alternative investigated, not in the library:** randomized subspace iteration on the
factored sum (``randomized_aggregate``; Halko, Martinsson & Tropp 2011, Alg. 4.4), which
never forms the d x k sum and costs O(s (d + k) (R + p)) per product with it. It is
approximate: the report gives its speed-up over the peer with 0-3 power iterations and how
far it lands from the exact truncation (``--power-iters``), so the trade-off behind the
library's choice of exact routes is measured, not asserted.

LAPACK (used by the QR and SVD on CPU) is pinned to one OpenBLAS thread unless
OPENBLAS_NUM_THREADS is set: on a 2-core machine its threaded QR/SVD run several times
slower (and erratically) beside XLA's own thread pool. All sides share the setting.

    python benchmarks/aggregation.py [--layers 2] [--devices 80 10] [--rank 32] [--repeats 3]
    python benchmarks/aggregation.py --capture runs/uploads80     # real run, ~30 min on CPU
    python benchmarks/aggregation.py --uploads runs/uploads80

``--layers 12`` is the full model (about 4 minutes on a 2-core CPU without the randomized
alternative: ``--power-iters`` with no value skips it). Prints one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedspine_jax import aggregation  # noqa: E402

HIDDEN, FFN = 768, 3072                 # roberta-base
RANK_CHOICES = (2, 4, 8, 16, 32)        # HETLoRA's / the paper's rank set (Sec. 5.2)
# (name, d_in, d_out, linears per transformer layer)
GROUPS = (("attn_qkvo", HIDDEN, HIDDEN, 4), ("fc1", HIDDEN, FFN, 1), ("fc2", FFN, HIDDEN, 1))
# --capture: the real run (configs/sst2_minilm.yaml with these overrides, then --set's).
CAPTURE_OVERRIDES = ("federation.num_devices=80", "federation.rounds=3", "lora.rank=32",
                     "lora.rank_choices=[2,4,8,16,32]", "federation.eval_every=0",
                     "data.max_train_samples=8000", "data.dirichlet_alpha=10")
_HI = jax.lax.Precision.HIGHEST


def _mm(x, y):
    return jnp.matmul(x, y, precision=_HI)


def _stacked(a_list, b_list, weights):
    """``(A * w) : (d, s)`` and ``B : (s, k)`` of one linear, so that their product is the sum."""
    return (jnp.concatenate([w * a for w, a in zip(weights, a_list)], axis=1),
            jnp.concatenate(b_list, axis=0))


# ---------------------------------------------------------------- the dense peer
@functools.partial(jax.jit, static_argnames=("rank",))
def dense_aggregate(a_list, b_list, weights, rank):
    """Dense route: per linear, form the (d, k) weighted sum, full SVD, keep the top ``rank``.

    Loops over the layer axis with ``lax.map`` like ours (same batching, so the ratio is the
    algorithms'; see aggregate_lora_batched on batched LAPACK calls). Also returns the top
    ``rank + 1`` singular values (the gap at the cut), which the SVD computes anyway.
    """
    def one(xs):
        a_l, b_l = xs          # the sum as one product of the stacked factors (its best form)
        u, s, vt = jnp.linalg.svd(_mm(*_stacked(a_l, b_l, weights)), full_matrices=False)
        root = jnp.sqrt(s[:rank])
        return u[:, :rank] * root, root[:, None] * vt[:rank], s[:rank + 1]

    return jax.lax.map(one, (list(a_list), list(b_list)))


# ---------------------------------------------------------------- the alternative investigated
@functools.partial(jax.jit, static_argnames=("rank", "power_iters", "oversample"))
def randomized_aggregate(a_list, b_list, weights, rank, power_iters, oversample=16):
    """Randomized subspace iteration on ``M = (A * w) @ B`` without forming M (not exact).

    Halko, Martinsson & Tropp (2011), Alg. 4.4: ``Q = orth(M Omega)`` for a Gaussian
    ``Omega: (k, R + p)``, then ``power_iters`` times ``Q = orth(M orth(M^T Q))``, then the
    SVD of the small ``Q^T M`` (through a QR of ``M^T Q``). Every product with M goes
    through the factors: O(s (d + k) (R + p)) each. Top-``rank`` factors, balanced split.
    """
    def one(xs):
        a, b = _stacked(*xs, weights)
        omega = jax.random.normal(jax.random.PRNGKey(0), (b.shape[1], rank + oversample),
                                  a.dtype)
        q, _ = jnp.linalg.qr(_mm(a, _mm(b, omega)))
        for _ in range(power_iters):
            z, _ = jnp.linalg.qr(_mm(b.T, _mm(a.T, q)))
            q, _ = jnp.linalg.qr(_mm(a, _mm(b, z)))
        q_z, r_z = jnp.linalg.qr(_mm(b.T, _mm(a.T, q)))           # M^T Q = Q_z R_z
        u, s, vt = jnp.linalg.svd(r_z.T)                           # Q^T M = (Q U) S (Q_z V)^T
        root = jnp.sqrt(s[:rank])
        return _mm(q, u[:, :rank]) * root, root[:, None] * _mm(q_z, vt.T[:, :rank]).T

    return jax.lax.map(one, (list(a_list), list(b_list)))


# ---------------------------------------------------------------- harness
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


def _products(a, b):
    return np.matmul(np.asarray(a, np.float64), np.asarray(b, np.float64))


def compare(got, dense_products, sums):
    """How far ``got`` (a, b) lands from the exact truncation, over the linears.

    Returns the max over linears of ``max |P - P_dense| / max |P_dense|`` (entries) and of
    ``||M - P||_F / ||M - P_dense||_F - 1`` (excess truncation error; M is the float64 sum).
    """
    p = _products(*got[:2])
    diff = float(np.abs(p - dense_products).max() / np.abs(dense_products).max())
    err = np.linalg.norm(sums - p, axis=(1, 2))
    best = np.linalg.norm(sums - dense_products, axis=(1, 2))
    return diff, float(np.max(err / np.maximum(best, 1e-30) - 1.0))


def bench_group(a_list, b_list, weights, args):
    """Ours, the dense peer and the randomized alternative on one stack of linears.

    ``a_list``: N arrays ``(L, d, r_i)``; ``b_list``: N arrays ``(L, r_i, k)``;
    ``weights``: (N,). Returns the group's figures (times in seconds).
    """
    fns = [lambda: aggregation.aggregate_lora_batched(a_list, b_list, weights, args.rank),
           lambda: dense_aggregate(a_list, b_list, weights, args.rank)]
    fns += [functools.partial(randomized_aggregate, a_list, b_list, weights, args.rank, q)
            for q in args.power_iters]
    outs, times = timed(fns, args.repeats)
    dense_products = _products(*outs[1][:2])
    w = np.asarray(weights, np.float64)
    sums = sum(wi * _products(a, b) for wi, a, b in zip(w, a_list, b_list))
    s_cut = np.asarray(outs[1][2], np.float64)                 # (L, R + 1)
    ours_diff, ours_excess = compare(outs[0], dense_products, sums)
    out = {"linears": int(a_list[0].shape[0]), "shape": list(sums.shape[1:]),
           "ours_s": round(times[0], 4), "dense_s": round(times[1], 4),
           "speedup": round(times[1] / times[0], 2),
           "max_abs_product_diff_rel": ours_diff, "truncation_error_excess": ours_excess,
           # sigma_{R+1} / sigma_R of each linear's sum: near 1 = no gap at the cut
           "gap_ratio_median": float(np.median(s_cut[:, -1] / s_cut[:, -2])),
           "randomized": {}}
    for q, got, t in zip(args.power_iters, outs[2:], times[2:]):
        diff, excess = compare(got, dense_products, sums)
        out["randomized"][f"q{q}"] = {"s": round(t, 4), "speedup": round(times[1] / t, 2),
                                      "max_abs_product_diff_rel": diff,
                                      "truncation_error_excess": excess}
    return out


def summarize(groups: dict) -> dict:
    """Totals over a run's groups (times add up; differences take the max)."""
    t_ours = sum(g["ours_s"] for g in groups.values())
    t_dense = sum(g["dense_s"] for g in groups.values())
    qs = next(iter(groups.values()))["randomized"]
    return {
        "linears": sum(g["linears"] for g in groups.values()),
        "ours_s": round(t_ours, 4), "dense_s": round(t_dense, 4),
        "speedup": round(t_dense / t_ours, 2),
        "max_abs_product_diff_rel": max(g["max_abs_product_diff_rel"] for g in groups.values()),
        "truncation_error_excess": max(g["truncation_error_excess"] for g in groups.values()),
        "randomized": {q: {"speedup": round(t_dense / sum(g["randomized"][q]["s"]
                                                          for g in groups.values()), 2),
                           "max_abs_product_diff_rel": max(
                               g["randomized"][q]["max_abs_product_diff_rel"]
                               for g in groups.values()),
                           "truncation_error_excess": max(
                               g["randomized"][q]["truncation_error_excess"]
                               for g in groups.values())}
                       for q in qs},
        "groups": groups,
    }


# ---------------------------------------------------------------- synthetic updates
def make_group(rng, n_layers, d, k, ranks):
    """Per device i: a_i (L, d, r_i) and b_i (L, r_i, k), products of order 1."""
    a = [jnp.asarray(rng.standard_normal((n_layers, d, r), np.float32) / np.sqrt(r))
         for r in ranks]
    b = [jnp.asarray(rng.standard_normal((n_layers, r, k), np.float32)) for r in ranks]
    return a, b


def run_synthetic(n_devices, args):
    rng = np.random.default_rng(args.seed + n_devices)
    ranks = [int(r) for r in rng.choice(RANK_CHOICES, size=n_devices)]
    weights = aggregation.aggregation_weights(
        jnp.asarray(rng.uniform(0.1, 1.0, n_devices), jnp.float32), "normalized")
    groups = {}
    for name, d, k, per_layer in GROUPS:
        a_list, b_list = make_group(rng, per_layer * args.layers, d, k, ranks)
        groups[name] = bench_group(a_list, b_list, weights, args)
        del a_list, b_list
    return {"devices": n_devices, "sum_of_ranks": sum(ranks), **summarize(groups)}


# ---------------------------------------------------------------- real uploads
def capture(out: Path, overrides: list[str]) -> None:
    """Run ``fedspine simulate`` and save each round's uploads as ``out/round{t}.npz``.

    Saved exactly as ``Federation.close`` hands them to the aggregator: per LoRA pair ``p``
    and device ``j``, ``p|a|j`` and ``p|b|j`` with the device's ``alpha / r_j`` folded into
    ``b``, and ``importance`` (N,), the devices' Eq. 14 importances. The simulation itself
    goes to ``out/run``.
    """
    from fedspine_jax import simulation
    from fedspine_jax.config import load_config
    from fedspine_jax.federation import Federation
    from fedspine_jax.models.lora import lora_scale
    from fedspine_jax.models.state import flatten

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sst2_minilm.yaml",
                      list(CAPTURE_OVERRIDES) + overrides)
    aggregate = Federation._aggregate_lora

    def saving(self, state, ups):
        rec = {"importance": np.array([u.lora_importance for u in ups], np.float32)}
        for j, u in enumerate(ups):
            for key, a in flatten(u.lora).items():
                if key.endswith("/lora_a"):
                    p = key[: -len("/lora_a")]
                    rec[f"{p}|a|{j}"] = a
                    rec[f"{p}|b|{j}"] = flatten(u.lora)[p + "/lora_b"] * lora_scale(
                        self.cfg.lora.alpha, a.shape[1])
        np.savez(out / f"round{state.round}.npz", **rec)
        return aggregate(self, state, ups)

    out.mkdir(parents=True, exist_ok=True)
    Federation._aggregate_lora = saving
    try:
        simulation.run(cfg, out / "run", progress=True)
    finally:
        Federation._aggregate_lora = aggregate


def run_uploads(path: Path, args):
    """One round's saved uploads: linears grouped by shape, each group one batched call."""
    z = np.load(path)
    n = len(z["importance"])
    weights = aggregation.aggregation_weights(jnp.asarray(z["importance"]), "normalized")
    pairs = sorted({k.split("|")[0] for k in z.files if "|" in k})
    by_shape: dict[tuple, list[str]] = {}
    for p in pairs:
        by_shape.setdefault((z[f"{p}|a|0"].shape[0], z[f"{p}|b|0"].shape[1]), []).append(p)
    groups = {}
    for (d, k), ps in sorted(by_shape.items()):
        a_list = [jnp.asarray(np.stack([z[f"{p}|a|{j}"] for p in ps])) for j in range(n)]
        b_list = [jnp.asarray(np.stack([z[f"{p}|b|{j}"] for p in ps])) for j in range(n)]
        groups[f"{d}x{k}"] = bench_group(a_list, b_list, weights, args)
    ranks = [int(z[f"{pairs[0]}|a|{j}"].shape[1]) for j in range(n)]
    return {"uploads": path.name, "devices": n, "sum_of_ranks": sum(ranks),
            "rank_counts": {r: ranks.count(r) for r in sorted(set(ranks))},
            **summarize(groups)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2,
                    help="synthetic: transformer layers (roberta-base has 12; 6 LoRA linears each)")
    ap.add_argument("--devices", type=int, nargs="+", default=[80, 10],
                    help="synthetic: numbers of devices N to run, each a separate comparison")
    ap.add_argument("--uploads", type=Path, default=None,
                    help="benchmark on the real uploads saved in this folder (round*.npz)")
    ap.add_argument("--capture", type=Path, default=None,
                    help="run the real simulation and save its uploads in this folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="--capture: config override (repeatable)")
    ap.add_argument("--rank", type=int, default=32, help="global rank R")
    ap.add_argument("--power-iters", type=int, nargs="*", default=[0, 1, 2, 3],
                    help="power iterations of the randomized alternative (none: skip it)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.capture is not None:
        capture(args.capture, args.overrides)
        return
    result = {
        "benchmark": "aggregation",
        "what": "sum_i w_i a_i b_i truncated to rank R: aggregate_lora_batched (QR + core SVD "
                "when sum r_i < min(d, k)) vs dense sum + full SVD, median after warm-up; "
                "randomized subspace iteration as the approximate alternative",
        "rank": args.rank,
        "power_iters": args.power_iters,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(),
                    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                    "load_average_1m_at_start": round(os.getloadavg()[0], 2)},
    }
    if args.uploads is not None:
        files = sorted(args.uploads.glob("round*.npz"), key=lambda f: int(f.stem[5:]))
        if not files:
            raise SystemExit(f"no round*.npz in {args.uploads} (make them with --capture)")
        result["source"] = "real uploads of a FedSpine simulation (MiniLM-L6, SST-2)"
        result["runs"] = [run_uploads(f, args) for f in files]
    else:
        result["source"] = (f"synthetic, roberta-base shapes, {args.layers} of 12 layers x 6 "
                            "LoRA linears, i.i.d. Gaussian factors")
        result["layers"] = args.layers
        result["rank_choices"] = list(RANK_CHOICES)
        result["seed"] = args.seed
        result["runs"] = [run_synthetic(n, args) for n in args.devices]
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
