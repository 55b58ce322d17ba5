"""In-process federation on one machine: ``fedspine simulate`` and ``fedspine compare``.

Design note
-----------
The simulator drives the same :class:`~fedspine_jax.federation.Federation` round as the
gRPC server and the same local round as a device agent (``train.local_rounds``, with the
task turned into its input and the result into an update by ``fedspine_jax.driver``). All
devices share one frozen model object (their frozen weights are identical); a device's own
state is its record in the federation state (masks, the importance it carries into its next
round, the position of its data stream, its rank), and the LoRA and head it receives each
round. On a GPU the
devices of one rank and size bucket train together, vmapped (``federation.device_batch``);
on a CPU one after the other.
Time is the simulated clock of ``heterogeneity``: a device's completion time is the FLOPs
its round reports over its throughput in that round plus its LoRA download and upload
bytes over its bandwidth; a device whose estimated training memory exceeds its memory
fails the round (no update; charged the deadline). A round lasts as long as its slowest
device; the run's clock is the sum of the rounds.

Every ``federation.eval_every`` rounds each device's local model (its masks, the global
LoRA shrunk to its last rank, the global head) is evaluated on the task's evaluation
split; the mean is the paper's Test Accuracy. The run writes ``config.yaml``,
``metrics.jsonl`` (one line per device and round, plus one per round), ``summary.json``
and orbax checkpoints after every round; ``--resume`` continues from the newest intact
checkpoint (``checkpoint.restore`` skips damaged ones; the metrics of later rounds are
dropped and written again) and ends in the same state as an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedspine_jax import checkpoint, driver, heterogeneity, metrics
from fedspine_jax.config import Config, load_config, replace
from fedspine_jax.experiment import (Setup, device_examples, evaluate_devices, lora_bytes,
                                     setup)
from fedspine_jax.models.compaction import compact
from fedspine_jax.models.state import get_head, get_lora, set_head, set_lora, set_masks
from fedspine_jax.train import local_rounds

def inference_cost(s: Setup, state, batch: int = 32, repeats: int = 5) -> dict:
    """Latency (s) and weight + activation memory (bytes) of the final pruned models,
    physically compacted with the LoRA merged, at (batch, max_len); mean over devices."""
    seq = s.cfg.data.max_len
    ids = jnp.ones((batch, seq), jnp.int32)
    am = jnp.ones((batch, seq), jnp.int32)
    lat, mem = [], []
    set_lora(s.model, state.lora)
    if state.head:
        set_head(s.model, state.head)
    seen = {}
    for hm, cm in zip(state.devices.head_masks, state.devices.channel_masks):
        key = (hm.tobytes(), cm.tobytes())
        if key not in seen:
            set_masks(s.model, hm, cm)
            small, _ = compact(s.model, merge_lora=True)
            from flax import nnx

            graphdef, st = nnx.split(small)
            fwd = jax.jit(lambda st, x, m: nnx.merge(graphdef, st)(x, m))
            jax.block_until_ready(fwd(st, ids, am))
            t0 = time.perf_counter()
            for _ in range(repeats):
                jax.block_until_ready(fwd(st, ids, am))
            weights = sum(int(x.size) for x in jax.tree.leaves(st)) * 4
            d = small.cfg.hidden_size
            acts = batch * seq * (4 * d + max(small.cfg.layer_channels) +
                                  2 * max(len(k) for k in small.cfg.layer_kv_index) * seq) * 4
            seen[key] = ((time.perf_counter() - t0) / repeats, weights + acts)
        lat.append(seen[key][0])
        mem.append(seen[key][1])
    return {"latency_s": float(np.mean(lat)), "memory_bytes": float(np.mean(mem))}


class Progress:
    """The rounds' progress bar (tqdm). While JAX compiles it reads "compiling" (JAX's
    monitoring events; the start of a compile is seen when the persistent compilation cache
    is on) and it shows the seconds spent compiling so far."""

    _START = "/jax/compilation_cache/compile_requests_use_cache"
    _END = "/jax/core/compile/backend_compile_duration"

    def __init__(self, total: int, initial: int):
        from jax import monitoring
        from tqdm import tqdm

        self._monitoring = monitoring
        self.bar = tqdm(total=total, initial=initial, desc="rounds", unit="round")
        self.compile_s = 0.0
        self.postfix: dict = {}
        self.closed = False  # a run that raised leaves its listeners; they then do nothing
        monitoring.register_event_listener(self._on_event)
        monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_event(self, event: str, **_) -> None:
        if event == self._START and not self.closed:
            self.bar.set_description("compiling", refresh=True)

    def _on_duration(self, event: str, duration: float, **_) -> None:
        if event == self._END and not self.closed:
            self.compile_s += duration
            self.bar.set_description("rounds", refresh=False)
            self.bar.set_postfix(self.postfix | {"compiled": f"{self.compile_s:.0f}s"})

    def round_done(self, **postfix) -> None:
        self.postfix = postfix
        self.bar.set_postfix(postfix | {"compiled": f"{self.compile_s:.0f}s"}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.closed = True
        self._monitoring.unregister_event_listener(self._on_event)
        self._monitoring.unregister_event_duration_listener(self._on_duration)
        self.bar.close()


def devices_per_batch(cfg: Config) -> int:
    """How many devices' local rounds run vmapped together (``federation.device_batch``;
    0: every device on a GPU, one at a time on a CPU)."""
    if cfg.federation.device_batch:
        return cfg.federation.device_batch
    return cfg.federation.num_devices if jax.default_backend() == "gpu" else 1


def run(cfg: Config, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Simulate ``cfg.federation.rounds`` rounds; write the run directory; return the summary."""
    out = Path(out)
    ckdir = out / "checkpoints"
    cfg, restore = checkpoint.prepare_run_dir(out, cfg, resume)
    s = setup(cfg)
    n, rounds = cfg.federation.num_devices, cfg.federation.rounds
    if restore:
        state, extra, _ = checkpoint.restore(ckdir, s.fed)
        clock, peak_mem = float(extra["clock"]), float(extra["peak_memory"])
        metrics.truncate_metrics(out / "metrics.jsonl", state.round - 1)
    else:
        state = s.fed.init(get_lora(s.model), get_head(s.model))
        clock, peak_mem = 0.0, 0.0
        (out / "metrics.jsonl").write_text("")
    examples = [device_examples(s, i) for i in range(n)]
    bar = Progress(rounds, state.round - 1) if progress else None
    criterion = s.fed.strategy.criterion
    device_batch = devices_per_batch(cfg)
    while state.round <= rounds:
        t = state.round
        state, tasks = s.fed.plan(state)
        inputs = [driver.device_input(cfg, task, *examples[i]) for i, task in enumerate(tasks)]
        results = local_rounds(s.model, inputs, cfg, criterion=criterion,
                               max_batch=device_batch)
        flops = np.array([r.flops for r in results])
        mem_need = np.array([r.peak_memory_bytes for r in results], np.float64)
        payload = np.array([lora_bytes(task.lora) for task in tasks])
        times = heterogeneity.completion_time(s.fleet, t - 1, flops, payload, payload)
        fits = heterogeneity.fits_memory(s.fleet, mem_need)
        times = heterogeneity.apply_memory_policy(times, fits, cfg.federation.deadline_s)
        updates = [driver.device_update(task, inp, res, len(examples[i][0]), times.comp[i],
                                        times.comm[i])
                   for i, (task, inp, res) in enumerate(zip(tasks, inputs, results))]
        for i, (inp, upd) in enumerate(zip(inputs, updates)):
            if not fits[i]:  # out of memory: no update (design note); its batches are drawn
                state = s.fed.give_up(state, i, driver.stream_after(inp))
                continue
            state = s.fed.accept(state, upd)
        state, report = s.fed.close(state, force=True)
        round_time = float(np.max(times.total))
        clock += round_time
        peak_mem = max(peak_mem, float(mem_need[fits].max()) if fits.any() else 0.0)
        acc = None
        k = cfg.federation.eval_every
        if (k and t % k == 0) or t == rounds:
            acc = evaluate_devices(s, state)
        lines = driver.device_rows(
            updates, report, s.fleet.type_names, round_time, acc, fits,
            {i: {"measured_compute_s": r.compute_time_s} for i, r in enumerate(results)})
        lines.append(metrics.RoundRow(
            round=t, clock=clock, round_time=round_time,
            waiting_time=float(heterogeneity.waiting_time(times.total)),
            mean_sparsity=float(np.mean([ln.ratio for ln in lines])),
            accuracy=None if acc is None else float(acc.mean())))
        metrics.append_metrics(out / "metrics.jsonl", lines)
        extra = {"clock": np.float64(clock), "peak_memory": np.float64(peak_mem)}
        checkpoint.save(ckdir, t, state, extra, keep=cfg.federation.keep_checkpoints)
        if bar is not None:
            bar.round_done(sim_time=f"{clock:.0f}s", acc="-" if acc is None else
                           f"{acc.mean():.3f}", sparsity=f"{lines[-1].mean_sparsity:.2f}")
    if bar is not None:
        bar.close()
    summary = driver.summarize(out, cfg)
    summary["eval_samples"] = len(s.task.eval)
    summary["inference"] = inference_cost(s, state)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------------------------
# CLI (arguments: fedspine_jax.cli)


def run_cli(args) -> int:
    """``fedspine simulate`` / ``fedspine compare``: run, draw the plots, print a summary."""
    from fedspine_jax import report

    out = Path(args.out)
    if args.command == "simulate" and args.resume:  # the run's own config, unless given
        cfg = load_config(args.config or checkpoint.saved_config(out), args.overrides)
    else:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    t0 = time.perf_counter()
    if args.command == "compare":
        methods = method_specs(args.methods)
        compare_runs(cfg, methods, out, progress=not args.no_progress)
        res = report.render_comparison(out)
        print(res["markdown"], end="")
        print(f"\nwall time {_duration(time.perf_counter() - t0)}; wrote "
              f"{', '.join(str(f) for f in res['files'].values())}")
        print(f"next:\n  fedspine report {_q(out)}           # re-render these tables "
              f"and plots\n  fedspine report {_q(out / methods[0][0])}  # one method's run")
        return 0
    summary = run(cfg, out, resume=args.resume, progress=not args.no_progress)
    plots = report.render_run(out)
    print(end_of_run(cfg, out, summary, time.perf_counter() - t0, plots.values()))
    return 0


DEFAULT_CONFIG = "sst2_minilm"  # a shipped config (fedspine_jax.config.config_path)
# what the end-of-run summary suggests to try the exported model on, per task
EXAMPLE_INPUT = {"sst2": '--text "a gripping film"',
                 "mnli": '--text "A man plays a guitar." --text-pair "Someone makes music."',
                 "dolly": '--text "Name three rivers in Europe."',
                 "classification": '--text "<a text like your data>"',
                 "instruction": '--text "<an instruction like your data>"'}


def _q(path) -> str:
    import shlex

    return shlex.quote(str(path))


def _seconds(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


def end_of_run(cfg: Config, out: Path, summary: dict, wall_s: float, plots) -> str:
    """The human summary ``fedspine simulate`` ends with: accuracy, sparsity, simulated and
    wall time, the files written and the commands to run next."""
    acc = summary.get("final_accuracy")
    target = summary.get("target_accuracy")
    ttt = summary.get("time_to_target_s")
    lines = [f"{summary['method']} on {cfg.data.task} ({cfg.model.source}), "
             f"{cfg.federation.num_devices} devices, {summary['rounds']} rounds",
             f"  accuracy     {'-' if acc is None else f'{acc:.3f}'} (mean of the devices' "
             f"models on the evaluation split)"]
    if target:
        lines.append(f"  target {target:.2f}  " + ("not reached" if ttt is None else
                                                   f"reached at {_seconds(ttt)} s simulated"))
    lines += [f"  sparsity     {summary['final_sparsity']:.2f} of the prunable parameters "
              f"(target {cfg.pruning.target_ratio:.2f})",
              f"  time         {_seconds(summary['simulated_time_s'])} s on the simulated fleet, "
              f"{_duration(wall_s)} wall",
              f"  wrote        {out}/: config.yaml, metrics.jsonl, summary.json, checkpoints/, "
              + ", ".join(Path(p).name for p in plots),
              "next:",
              f"  fedspine report {_q(out)}",
              f"  fedspine export {_q(out)} --device-id 0 --out {_q(out / 'device0.onnx')}",
              f"  fedspine infer {_q(out / 'device0.onnx')} {EXAMPLE_INPUT[cfg.data.task]}"]
    return "\n".join(lines)


def method_specs(spec: str | None) -> list[tuple[str, int]]:
    """``--methods`` as ``[(method, seeds), ...]``: comma-separated names, each optionally
    ``name:k`` for k seeds (default 1); ``ablations`` adds FedSpine's ablations. Without a
    spec: the registry's default set (``strategies.COMPARE``).

    Raises:
      ConfigError: an unknown method or a bad seed count (the message names it).
    """
    from fedspine_jax.config import ConfigError
    from fedspine_jax.strategies import ABLATIONS, COMPARE, STRATEGIES

    out = []
    for item in (spec or ",".join(COMPARE)).split(","):
        name, _, k = item.strip().partition(":")
        if name == "ablations":
            out += [(m, 1) for m in ABLATIONS]
            continue
        if name not in STRATEGIES:
            raise ConfigError(f"--methods: unknown method {name!r}; allowed: "
                              f"{', '.join(STRATEGIES)}, ablations")
        if k and (not k.isdigit() or int(k) < 1):
            raise ConfigError(f"--methods: {item!r}: the seed count after ':' must be an "
                              f"integer >= 1")
        out.append((name, int(k) if k else 1))
    return out


def run_dir_name(method: str, seed_index: int, seed: int) -> str:
    """A comparison's run directory: the method's name for its first seed, then
    ``METHOD_seedS``."""
    return method if seed_index == 0 else f"{method}_seed{seed}"


def compare_runs(cfg: Config, methods: list, out: str | Path, progress: bool = True,
                 after=None) -> dict:
    """Run every method on the same config, partition and device traces.

    ``methods`` are names or ``(name, k)`` pairs: k seeds, ``federation.seed + j`` for
    ``j < k`` (a seed draws the data split, the device traces, the bandit's and the LoRA's
    randomness). Every method's first seed runs before any second seed, so a comparison
    stopped early has one run of every method. A run already started in ``out`` resumes.
    ``after(run_dir)``, when given, is called as each run finishes.
    """
    out = Path(out)
    specs = [(m, 1) if isinstance(m, str) else (m[0], int(m[1])) for m in methods]
    results = {}
    for j in range(max(k for _, k in specs)):
        for m, k in specs:
            if j >= k:
                continue
            seed = cfg.federation.seed + j
            d = out / run_dir_name(m, j, seed)
            started = (d / "config.yaml").is_file()
            results[d.name] = run(replace(cfg, federation={"strategy": m, "seed": seed}), d,
                                  resume=started, progress=progress)
            if after is not None:
                after(d)
    return results
