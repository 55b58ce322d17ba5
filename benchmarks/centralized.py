"""Centralised dense LoRA fine-tuning: the reference line of the paper-regime comparison.

The upper bound a federated run approaches: the same model, the same adapters and the same
training data as a federated run of ``--config``, trained in one place, without pruning
and without the federation's non-IID split.

What runs:

* ``experiment.setup(cfg)`` builds everything exactly as ``fedspine simulate`` does: the
  model of ``cfg.model`` with LoRA adapters at the global rank ``cfg.lora.rank`` (alpha
  ``cfg.lora.alpha``, the same initialisation and task head), the tokenised task and the
  Dirichlet partition over ``cfg.federation.num_devices`` devices.
* The training set is the union of every device's ``train_idx`` (the devices' held-out
  examples stay out, as they never train in a federated run either), batched by
  ``data.Batches`` (a fresh seeded permutation each epoch, seed ``cfg.federation.seed``) at
  ``cfg.train.batch_size``, with the config's length buckets and token packing.
* No pruning: every head and channel mask stays 1 (dense model).
* AdamW on the LoRA factors and the task head (``train.TRAINABLE``), built by
  ``train._optimizer(learning_rate, weight_decay, head_lr_scale)`` of ``cfg.train``, one
  optimiser state for the whole run; the loss is ``train.loss_fn``; the step is a jitted
  pure function of the ``nnx.split`` state (trainable, frozen), buffers donated.
* Every ``--eval-every`` steps (and at step 0 and at the last step) ``train.evaluate`` on
  the whole evaluation split as the simulator evaluates (``data.eval_batches``, batch 64;
  ``data.max_eval_samples: 0`` in the config means all 872 SST-2 validation sentences).
  The default, ``federation.eval_every * train.local_steps`` (40 for
  ``sst2_paper_regime``), evaluates at the sequential-step count of the federated run's own
  evaluations, so step k of this curve lines up with round k / tau of a federated one.

Default length, ``--steps`` = ``2 * federation.rounds * train.local_steps``. A federated
run's global model receives ``rounds * tau`` sequential optimiser steps (each round every
device takes tau steps from the same starting point and the aggregate averages them: about
one tau-step trajectory at a larger effective batch), so ``rounds * tau`` steps of batch B
is the centralised run with the federation's number of sequential updates. The factor 2
gives the centralised line room to converge past that point (for ``sst2_paper_regime``: 800
steps, 25,600 samples, about 1.8 epochs of the ~14,400 training sentences; whether the
curve has levelled off by then is for the curve to show, not assumed). A pass-equivalent of everything the whole federation processes
(``rounds * tau * num_devices`` steps: 4,000 here, 8.9 epochs) would take five times longer
and is not needed for an upper bound; ask for it with ``--steps``. The output states the
samples seen, the epochs and the federation's own figures next to them.

    python benchmarks/centralized.py [--config sst2_paper_regime] [--steps N]
        [--eval-every N] [--set section.key=value ...] [--out result.json]

The default run of ``sst2_paper_regime`` takes about 10 minutes on a shared 2-core CPU
(0.4-0.5 s a step, about 9 s per full evaluation, 21 evaluations, ~15 s of setup).

Prints one JSON object (and writes it to ``--out`` when given). ``curve`` holds
``{step, accuracy, loss, wall_s}`` per evaluation: ``loss`` is the mean training loss
of the steps since the previous evaluation, ``wall_s`` the seconds since training began
(evaluations included). ``step_s_median`` is the median wall time of one optimiser step
(the steps that compile a new batch shape are outliers the median ignores);
``compile_steps`` counts the steps that took more than 5x the median.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from fedspine_jax import data, experiment, train
from fedspine_jax.config import load_config

EVAL_BATCH = 64  # as experiment.evaluate_devices


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"),
                   donate_argnames=("trainable", "opt_state"))
def step(graphdef, tx, trainable, opt_state, rest, batch):
    """One AdamW step on LoRA + head of the dense model: (trainable, opt_state, loss)."""
    def f(tr):
        return train.loss_fn(nnx.merge(graphdef, tr, rest), batch)

    loss, grads = jax.value_and_grad(f)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


def _jnp(batch: dict) -> dict:
    return {k: jax.numpy.asarray(v) for k, v in batch.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="sst2_paper_regime",
                    help="a shipped config's name or a YAML file")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override (repeatable)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps (default: 2 * rounds * local_steps)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="evaluate every N steps (0: only at the start and the end; "
                         "default: federation.eval_every * local_steps)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    t_setup = time.perf_counter()
    cfg = load_config(args.config, args.set)
    fed_steps = cfg.federation.rounds * cfg.train.local_steps
    steps = 2 * fed_steps if args.steps is None else args.steps
    eval_every = (cfg.federation.eval_every * cfg.train.local_steps
                  if args.eval_every is None else args.eval_every)
    if steps < 1:
        ap.error(f"--steps={steps}: must be >= 1")
    s = experiment.setup(cfg)
    train_idx = np.sort(np.concatenate([d.train_idx for d in s.devices]))
    train_ex = s.task.train.take(train_idx)
    eval_ex = s.task.eval
    batches = data.Batches(train_ex, cfg.train.batch_size, cfg.federation.seed)
    tx = train._optimizer(cfg.train.learning_rate, cfg.train.weight_decay,
                          cfg.train.head_lr_scale)
    graphdef, trainable, rest = nnx.split(s.model, train.TRAINABLE, nnx.Variable)
    opt_state = tx.init(trainable)
    setup_s = time.perf_counter() - t_setup

    def accuracy(tr) -> float:
        return train.evaluate(nnx.merge(graphdef, tr, rest),
                              data.eval_batches(eval_ex, EVAL_BATCH))

    curve, losses, step_times = [], [], []
    eval_s = 0.0
    t0 = time.perf_counter()

    def record(k: int) -> None:
        nonlocal eval_s
        te = time.perf_counter()
        acc = accuracy(trainable)
        eval_s += time.perf_counter() - te
        curve.append({"step": k, "accuracy": acc,
                      "loss": float(np.mean(losses)) if losses else None,
                      "wall_s": round(time.perf_counter() - t0, 3)})
        losses.clear()

    record(0)
    for k in range(1, steps + 1):
        batch = _jnp(next(batches))
        ts = time.perf_counter()
        trainable, opt_state, loss = step(graphdef, tx, trainable, opt_state, rest, batch)
        losses.append(float(loss))  # a host sync: the step's time is all in
        step_times.append(time.perf_counter() - ts)
        if k == steps or (eval_every and k % eval_every == 0):
            record(k)
    wall = time.perf_counter() - t0

    med = statistics.median(step_times)
    accs = [c["accuracy"] for c in curve]
    best = int(np.argmax(accs))
    samples = steps * cfg.train.batch_size
    n_dev = cfg.federation.num_devices
    result = {
        "benchmark": "centralized",
        "config": args.config, "overrides": args.set,
        "model": cfg.model.source, "task": cfg.data.task,
        "rank": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
        "batch_size": cfg.train.batch_size, "learning_rate": cfg.train.learning_rate,
        "weight_decay": cfg.train.weight_decay, "head_lr_scale": cfg.train.head_lr_scale,
        "pruning": "none (dense, all masks 1)",
        "steps": steps,
        "steps_rule": ("--steps" if args.steps is not None else
                       "2 * federation.rounds * train.local_steps (default)"),
        "eval_every": eval_every,
        "samples_seen": samples,
        "train_examples": len(train_ex),
        "epochs": samples / len(train_ex),
        "eval_examples": len(eval_ex),
        "federation": {
            "devices": n_dev, "rounds": cfg.federation.rounds,
            "local_steps": cfg.train.local_steps,
            "steps_per_device": fed_steps,
            "samples_processed": fed_steps * n_dev * cfg.train.batch_size,
            "epochs": fed_steps * n_dev * cfg.train.batch_size / len(train_ex)},
        "curve": curve,
        "final_accuracy": accs[-1],
        "best_accuracy": accs[best], "best_step": curve[best]["step"],
        "wall_s": wall, "setup_s": setup_s, "eval_s": eval_s,
        "train_s": float(sum(step_times)),
        "step_s_median": med, "step_s_mean": float(np.mean(step_times)),
        "compile_steps": int(sum(t > 5 * med for t in step_times)),
        "backend": jax.default_backend(), "host": platform.node(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
