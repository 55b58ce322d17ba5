"""In-process federation on one machine: ``fedspine simulate`` and ``fedspine compare``.

Design note
-----------
The simulator drives the same :class:`~fedspine_jax.federation.Federation` round as the
gRPC server and the same local round as a device agent (``train.local_rounds``, of which
the agent's ``local_round`` is the one-device case). All devices share one frozen model
object (their frozen weights are identical); a device's own state is its masks and the
position of its data stream, and the LoRA and head it receives each round. On a GPU the
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
and orbax checkpoints after every round; ``--resume`` continues from the newest
checkpoint and ends in the same state as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedspine_jax import checkpoint, data, heterogeneity
from fedspine_jax.config import Config, load_config, replace
from fedspine_jax.federation import DeviceUpdate, Federation
from fedspine_jax.models import ArchConfig, build_model, load_pretrained, load_tokenizer
from fedspine_jax.models.compaction import compact
from fedspine_jax.models.state import get_head, get_lora, set_head, set_lora, set_masks
from fedspine_jax.train import RoundInput, evaluate, initial_masks, local_rounds

BYTES_PER_PARAM = 4  # LoRA factors travel as float32


@dataclasses.dataclass
class Setup:
    """Everything a run needs that is derived from the config (not checkpointed)."""
    cfg: Config
    model: object
    task: data.TaskData
    devices: list
    fleet: heterogeneity.Fleet
    fed: Federation


def build_model_for(cfg: Config, num_labels: int | None):
    """The model of ``cfg.model`` with ``cfg.lora`` adapters at the global rank."""
    m = cfg.model
    targets = cfg.lora.targets
    if m.source == "random":
        heads = m.num_heads
        arch = ArchConfig(
            arch=m.arch, vocab_size=m.vocab_size, hidden_size=m.hidden_size,
            num_layers=m.num_layers, num_heads=heads,
            num_kv_heads=m.num_kv_heads if m.arch == "llama" else heads,
            head_dim=m.hidden_size // heads, intermediate_size=m.intermediate_size,
            max_positions=m.max_positions, type_vocab_size=1 if m.arch == "roberta" else 2,
            rope_theta=m.rope_theta, pad_token_id=1 if m.arch == "roberta" else 0,
            num_labels=num_labels or 0, lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
            lora_targets=tuple(targets), lora_init_std=cfg.lora.init_std,
            norm_eps=1e-6 if m.arch == "llama" else 1e-12)
        return build_model(arch, m.seed)
    model, _ = load_pretrained(m.source, num_labels=num_labels, lora_rank=cfg.lora.rank,
                               lora_alpha=cfg.lora.alpha, lora_targets=tuple(targets),
                               seed=m.seed, with_tokenizer=False)
    return model


def setup(cfg: Config) -> Setup:
    """Load model, data, partition and fleet for a run (deterministic from the config)."""
    tokenizer = load_tokenizer(cfg.model.tokenizer if cfg.model.source == "random"
                               else cfg.model.source)
    task = data.load_task(cfg.data, tokenizer, cfg.federation.seed)
    model = build_model_for(cfg, task.num_labels)
    n = cfg.federation.num_devices
    devices = data.partition(task, n, cfg.data, cfg.federation.seed)
    fleet = heterogeneity.build_fleet(cfg)
    # capability tier: 0 = strongest type (AGX), used by HETLoRA's rank policy
    tiers = (heterogeneity.AGX - np.asarray(fleet.device_type)).astype(int)
    arch = model.cfg
    shapes = ((arch.num_layers, arch.num_heads), (arch.num_layers, arch.intermediate_size))
    return Setup(cfg, model, task, devices, fleet, Federation(cfg, n, tiers, shapes))


def _device_examples(s: Setup, i: int) -> tuple[data.Examples, data.Examples]:
    d = s.devices[i]
    return s.task.train.take(d.train_idx), s.task.train.take(d.holdout_idx)


def load_device_model(s: Setup, state, head_masks: np.ndarray, channel_masks: np.ndarray,
                      rank: int, shrunk: dict | None = None):
    """Put a device's local model into ``s.model`` (in place) and return it.

    The local model is the device's masks ``head_masks (L, H)``, ``channel_masks (L, F)``,
    the global LoRA shrunk to the device's last rank and the global head. ``shrunk`` caches
    the shrunk LoRA per rank across calls. Used by :func:`evaluate_devices` and by the
    exporter (``fedspine export RUN_DIR --device-id I``).
    """
    r = int(rank)
    shrunk = {} if shrunk is None else shrunk
    if r not in shrunk:
        shrunk[r] = s.fed.shrink(state.lora, r)
    set_lora(s.model, shrunk[r])
    if state.head:
        set_head(s.model, state.head)
    set_masks(s.model, head_masks, channel_masks)
    return s.model


def evaluate_devices(s: Setup, state, masks: list, ranks: np.ndarray) -> np.ndarray:
    """Test accuracy of every device's local model on the task's evaluation split."""
    accs = []
    shrunk = {}
    for i, (hm, cm) in enumerate(masks):
        load_device_model(s, state, hm, cm, int(ranks[i]), shrunk)
        accs.append(evaluate(s.model, data.eval_batches(s.task.eval, 64)))
    return np.asarray(accs)


def _lora_bytes(lora: dict) -> int:
    return int(sum(v.size for v in lora.values())) * BYTES_PER_PARAM


def inference_cost(s: Setup, masks: list, state, batch: int = 32, repeats: int = 5) -> dict:
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
    for hm, cm in masks:
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
    arch = s.model.cfg
    hm0, cm0 = initial_masks(arch)
    if restore:
        state, extra, _ = checkpoint.restore(ckdir, s.fed)
        masks = [(np.asarray(extra["head_masks"][i]), np.asarray(extra["channel_masks"][i]))
                 for i in range(n)]
        streams = [dict(epoch=int(extra["stream"][i][0]), position=int(extra["stream"][i][1]))
                   for i in range(n)]
        clock = float(extra["clock"])
        last_rank = np.asarray(extra["last_rank"], np.int32)
        peak_mem = float(extra["peak_memory"])
        _truncate_metrics(out / "metrics.jsonl", state.round - 1)
    else:
        state = s.fed.init(get_lora(s.model), get_head(s.model))
        masks = [(hm0.copy(), cm0.copy()) for _ in range(n)]
        streams = [dict(epoch=0, position=0) for _ in range(n)]
        clock, peak_mem = 0.0, 0.0
        last_rank = np.full(n, cfg.lora.rank, np.int32)
        (out / "metrics.jsonl").write_text("")
    examples = [_device_examples(s, i) for i in range(n)]
    bar = Progress(rounds, state.round - 1) if progress else None
    criterion = s.fed.strategy.criterion
    device_batch = devices_per_batch(cfg)
    while state.round <= rounds:
        t = state.round
        state, tasks = s.fed.plan(state)
        flops, mem_need, inputs, streams_now = np.zeros(n), np.zeros(n), [], []
        for i, task in enumerate(tasks):
            train_ex, hold_ex = examples[i]
            batches = data.Batches(train_ex, cfg.train.batch_size,
                                   cfg.federation.seed * 1000 + i, **streams[i])
            probe_src = hold_ex if len(hold_ex) else train_ex
            probe = data.collate(probe_src, np.arange(min(len(probe_src),
                                                          cfg.train.batch_size)),
                                 cfg.train.batch_size)
            inputs.append(RoundInput(task.lora, task.head, masks[i][0], masks[i][1],
                                     task.ratio, batches, probe))
            streams_now.append(batches)
        results = local_rounds(s.model, inputs, cfg, criterion=criterion,
                               max_batch=device_batch)
        pending = []
        for i, (task, res) in enumerate(zip(tasks, results)):
            streams[i] = streams_now[i].state()
            flops[i], mem_need[i] = res.flops, res.peak_memory_bytes
            pending.append((res, _lora_bytes(task.lora), len(examples[i][0])))
        times = heterogeneity.completion_time(
            s.fleet, t - 1, flops, np.array([p[1] for p in pending]),
            np.array([p[1] for p in pending]))
        fits = heterogeneity.fits_memory(s.fleet, mem_need)
        times = heterogeneity.apply_memory_policy(times, fits, cfg.federation.deadline_s)
        for i, (res, _, n_train) in enumerate(pending):
            if not fits[i]:
                continue  # out of memory: no update (design note)
            masks[i] = (res.head_masks, res.channel_masks)
            last_rank[i] = tasks[i].rank
            upd = DeviceUpdate(
                device_id=i, round=t, lora=res.lora, head=res.head, head_masks=res.head_masks,
                channel_masks=res.channel_masks, num_samples=n_train,
                loss_before=res.loss_before, loss_after=res.loss_after,
                lora_importance=res.lora_importance, ratio=res.ratio,
                compute_time_s=float(times.comp[i]), comm_time_s=float(times.comm[i]),
                flops=res.flops, peak_memory_bytes=res.peak_memory_bytes,
                params_alive=res.params_alive)
            state = s.fed.accept(state, upd)
        state, report = s.fed.close(state, force=True)
        round_time = float(np.max(times.total))
        clock += round_time
        peak_mem = max(peak_mem, float(mem_need[fits].max()) if fits.any() else 0.0)
        acc = None
        k = cfg.federation.eval_every
        if (k and t % k == 0) or t == rounds:
            acc = evaluate_devices(s, state, masks, last_rank)
        rewards = dict(zip(report.device_ids.tolist(), report.rewards.tolist()))
        lines = []
        for i, (res, _, _) in enumerate(pending):
            lines.append({
                "round": t, "device": i, "device_type": s.fleet.type_names[i],
                "p": float(report.p[i]), "r": int(report.r[i]), "ratio": res.ratio,
                "completion_time": float(times.total[i]), "compute_time": float(times.comp[i]),
                "comm_time": float(times.comm[i]),
                "waiting_time": round_time - float(times.total[i]),
                "loss_before": res.loss_before, "loss_drop": res.loss_drop,
                "lora_importance": res.lora_importance, "reward": rewards.get(i),
                "flops": res.flops, "peak_memory_bytes": res.peak_memory_bytes,
                "fits_memory": bool(fits[i]), "measured_compute_s": res.compute_time_s,
                "accuracy": None if acc is None else float(acc[i])})
        lines.append({"round": t, "summary": True, "clock": clock, "round_time": round_time,
                      "waiting_time": float(heterogeneity.waiting_time(times.total)),
                      "mean_sparsity": float(np.mean([ln["ratio"] for ln in lines])),
                      "accuracy": None if acc is None else float(acc.mean())})
        with open(out / "metrics.jsonl", "a") as f:
            for ln in lines:
                f.write(json.dumps(ln) + "\n")
        extra = {"head_masks": np.stack([m[0] for m in masks]),
                 "channel_masks": np.stack([m[1] for m in masks]),
                 "stream": np.array([[st["epoch"], st["position"]] for st in streams]),
                 "clock": np.float64(clock), "last_rank": last_rank,
                 "peak_memory": np.float64(peak_mem)}
        checkpoint.save(ckdir, t, state, extra, keep=cfg.federation.keep_checkpoints)
        if bar is not None:
            bar.round_done(sim_time=f"{clock:.0f}s", acc="-" if acc is None else
                           f"{acc.mean():.3f}", sparsity=f"{lines[-1]['mean_sparsity']:.2f}")
    if bar is not None:
        bar.close()
    summary = summarize(out, cfg)
    summary["inference"] = inference_cost(s, masks, state)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Drop metric lines of rounds after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
        if row["round"] <= last_round:
            keep.append(ln)
    path.write_text("".join(x + "\n" for x in keep))


def summarize(out: Path, cfg: Config) -> dict:
    """Summary figures of a run from its metrics.jsonl."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    rounds = [r for r in rows if r.get("summary")]
    evals = [r for r in rounds if r["accuracy"] is not None]
    target = cfg.federation.target_accuracy
    hit = next((r for r in evals if target and r["accuracy"] >= target), None)
    devs = [r for r in rows if not r.get("summary")]
    return {
        "method": cfg.federation.strategy, "rounds": len(rounds),
        "final_accuracy": evals[-1]["accuracy"] if evals else None,
        "final_sparsity": rounds[-1]["mean_sparsity"] if rounds else None,
        "simulated_time_s": rounds[-1]["clock"] if rounds else 0.0,
        "target_accuracy": target or None,
        "time_to_target_s": hit["clock"] if hit else None,
        "mean_waiting_time_s": float(np.mean([r["waiting_time"] for r in rounds])) if rounds
        else None,
        "training_peak_memory_bytes": max((r["peak_memory_bytes"] for r in devs
                                           if r["fits_memory"]), default=None),
    }


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
        methods = (args.methods or ",".join(COMPARE_METHODS)).split(",")
        if "ablations" in methods:
            methods = [m for m in methods if m != "ablations"] + list(ABLATIONS)
        compare_runs(cfg, methods, out, progress=not args.no_progress)
        res = report.render_comparison(out)
        print(res["markdown"], end="")
        print(f"\nwall time {_duration(time.perf_counter() - t0)}; wrote "
              f"{', '.join(str(f) for f in res['files'].values())}")
        print(f"next:\n  fedspine report {_q(out)}           # re-render these tables "
              f"and plots\n  fedspine report {_q(out / methods[0])}  # one method's run")
        return 0
    summary = run(cfg, out, resume=args.resume, progress=not args.no_progress)
    plots = report.render_run(out)
    print(end_of_run(cfg, out, summary, time.perf_counter() - t0, plots.values()))
    return 0


DEFAULT_CONFIG = "sst2_minilm"  # a shipped config (fedspine_jax.config.config_path)
COMPARE_METHODS = ("fedspine", "hetlora", "fedlora_prune", "llmpruner_fedlora", "fedapt")
ABLATIONS = ("fedspine_no_ap", "fedspine_no_at")
# what the end-of-run summary suggests to try the exported model on, per task
EXAMPLE_INPUT = {"sst2": '--text "a gripping film"',
                 "mnli": '--text "A man plays a guitar." --text-pair "Someone makes music."',
                 "dolly": '--text "Name three rivers in Europe."'}


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


def compare_runs(cfg: Config, methods: list[str], out: str | Path, progress: bool = True
                 ) -> dict:
    """Run every method on the same config, seeds, partition and device traces."""
    out = Path(out)
    results = {}
    for m in methods:
        started = (out / m / "config.yaml").is_file()  # a method's run resumes
        results[m] = run(replace(cfg, federation={"strategy": m}), out / m,
                         resume=started, progress=progress)
    return results
