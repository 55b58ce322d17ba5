"""Device heterogeneity (paper Table 2, sections 2.3, 5.1, 5.3) and the simulated clock.

Design note
-----------
A :class:`Fleet` is the static description of the simulated devices (type, distance group,
memory) plus the seed of their time-varying state. :func:`round_trace` gives, for a round
``t``, every device's power mode, effective training throughput (FLOP/s) and bandwidth
(bytes/s). A trace is a pure function of ``(seed, t)``: the randomness of a round is drawn
from ``np.random.default_rng((seed, tag, t))`` (``t // mode_redraw_every`` for modes), never
from a stream carried between calls, so every method of a comparison and a resumed run see
the same devices whatever order they ask in. Everything here is host-side numpy: the clock
runs outside the jitted training step.

Decisions (the paper gives measurements, not a model; each choice is made once, here):

* **Throughput.** Training is taken to run in fp16 (mixed precision, as on Jetson).
  Table 2's TX2 figure, 1.33 TFLOPS, is already the Pascal GPU's fp16 peak and is used as
  is. NX (21 TOPS) and AGX (22 TOPS) are int8 figures; Volta tensor cores run int8 at
  twice their fp16 rate, so the fp16 peak is ``TOPS / 2`` (10.5 and 11 TFLOPS). A round
  achieves ``devices.efficiency`` of ``peak * mode multiplier``.
* **Power modes.** Indexed by speed rank: mode 0 is the fastest (MAXN) and the last mode the
  slowest; these are *not* nvpmodel's numbers (the paper's "TX2 mode 1", nvpmodel's MAX-Q,
  is our TX2 mode 3). The multipliers (:data:`MODE_MULTIPLIERS`) are chosen so that the
  slowest TX2 mode and the fastest AGX mode differ by ~100x in training time, the paper's
  measured figure (section 5.1): ``(11 / 1.33) * 12 = 99.2``. Peak-clock ratios alone
  would give less; the multipliers fold in what the paper's measurement includes (cores
  switched off, memory clocks). NX and AGX share one 8-mode table (same Volta GPU family).

  ====  ======================================================
  type  multipliers of peak, mode 0 .. last
  ====  ======================================================
  TX2   1, 1/2, 1/4, 1/12
  NX    1, 0.8, 0.65, 0.5, 0.4, 0.3, 0.2, 0.12
  AGX   1, 0.8, 0.65, 0.5, 0.4, 0.3, 0.2, 0.12
  ====  ======================================================

  Every device's mode is drawn uniformly among its type's modes; it is re-drawn at rounds
  ``0, k, 2k, ...`` (``k = devices.mode_redraw_every``) and held in between.
* **Bandwidth.** Distance groups 2, 8, 14, 20 m have mean bandwidths 30, 15, 6, 2 Mb/s
  (megabits, decimal, as iperf3 reports; 1 Mb/s = 125,000 bytes/s). Each round multiplies
  every device's mean by an independent mean-one log-normal factor whose relative std is
  ``devices.bandwidth_noise`` exactly (``s**2 = log(1 + noise**2)``), then clips to the
  paper's observed [1, 30] Mb/s (so the 2 m group's realised mean is a little below 30).
  Download and upload share the bandwidth.
* **Scenarios** (section 5.3), listed strongest first, which is also the fleet's device
  order: Low = 10 AGX at 2 m; Medium = 5 AGX at 2 m + 5 NX at 8 m; High = 3 AGX at 2 m +
  3 NX at 8 m + 4 TX2 at 14 m. For ``federation.num_devices`` N other than 10 the
  composition is scaled by largest-remainder apportionment (each group gets
  ``floor(N * share)``, the remaining devices go to the largest fractional parts, ties to
  the earlier group): N = 20 doubles every group; High with N = 4 is 1 AGX, 1 NX, 2 TX2.
  ``custom`` takes ``devices.num_agx/num_nx/num_tx2`` (their sum must equal N), orders the
  devices AGX, NX, TX2 and assigns distance groups round-robin by position (device i sits
  in group ``i % 4``: 2, 8, 14, 20, 2, ... m). The counts are ignored by the presets.
* **Memory.** ``memory_bytes`` is Table 2's figure in GiB (8, 8, 32; Jetson memory is
  shared by CPU and GPU; no OS reserve is modelled). Policy for a device whose training peak
  memory exceeds it (:func:`apply_memory_policy`): the scheduler's choice is kept, the
  device fails the round (it sends no update) and is charged the round's deadline as its
  completion time: ``federation.deadline_s`` when set, else the largest completion time any
  device of the round would have had with enough memory. A device killed for memory is
  silent, so the server waits for it until the round closes; the charge makes the failing
  device a straggler, so Eq. 1 and the scheduler's time signal both see the failure.
* **Clock** (``devices.clock``). ``"flops"``: ``T_comp = flops / throughput``. The paper
  fine-tunes RoBERTa-base (12 x 768, FFN 3072, SST-2 padded, batch 32, tau 20), where a
  round's compute outweighs its LoRA transfer; a small model on packed SST-2 tokens
  (MiniLM-L6, 6 x 384) does ~14x less compute per transmitted LoRA byte, so its rounds are
  communication-bound and pruning barely shortens them. ``"paper_regime"`` multiplies every
  device's compute time by one factor ``k`` (:func:`paper_regime_scale`, stored as
  ``Fleet.compute_scale``) so that a round of the run's model has RoBERTa-base's
  compute/communication time ratio. For one device that ratio is
  ``(FLOPs / throughput) / (bytes / bandwidth)``, so ``k`` is the ratio of the two models'
  FLOPs per LoRA byte and the same for every device type, mode and distance. Communication
  times are untouched; throughputs (:func:`round_trace`) stay the devices' own.
* **Spread** (``devices.spread``). ``"paper"``: the model above, whose slowest and fastest
  devices differ ~100x in compute and 30x in bandwidth. ``"narrow"``, a sensitivity setting
  after paper Fig. 2c (section 2.3: "the strongest device requires only 70 % of the time
  taken by the weakest"): in every round the fleet's throughputs, and separately its
  bandwidths, are compressed on a log scale towards the round's largest value until the
  smallest is :data:`NARROW_SPREAD` (0.7) of it (:func:`compress_spread`; a spread already
  narrower is kept). Modes, bandwidth draws and the devices' ranking are unchanged; the
  round's strongest device keeps its speed, the others are lifted towards it. A device
  ``x`` times slower than the strongest in both compute and communication ends
  ``x ** g`` times slower, so for any workload the weakest device of a round needs at most
  ``1 / 0.7`` of the strongest's time, exactly that when one device is the slowest in
  both (or for a pure compute or pure transfer workload). In the High scenario a fixed
  workload's per-round strongest / weakest completion time is 0.70-0.72. The compression
  depends on the whole fleet's draws of the round, so it stays a pure function of
  ``(seed, t)``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from fedspine_jax.config import Config, ConfigError

# Device types, indexed by the values of ``Fleet.device_type``.
TX2, NX, AGX = 0, 1, 2
TYPE_NAMES = ("tx2", "nx", "agx")

# Table 2 "AI performance" as printed: TX2 in FLOPS (fp16), NX / AGX in int8 OPS.
TABLE2_PEAK = (1.33e12, 21e12, 22e12)
# fp16 training peak (FLOP/s) derived from it: TX2 as printed, Volta int8 TOPS / 2.
PEAK_FLOPS = (1.33e12, 21e12 / 2, 22e12 / 2)
# Table 2 memory ("ROM" column, LPDDR4/4x), GiB -> bytes.
MEMORY_BYTES = (8 * 2**30, 8 * 2**30, 32 * 2**30)

# Throughput multiplier of each power mode, mode 0 (fastest) first; see the design note.
_VOLTA_MODES = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3, 0.2, 0.12)
MODE_MULTIPLIERS = ((1.0, 1 / 2, 1 / 4, 1 / 12), _VOLTA_MODES, _VOLTA_MODES)
NUM_MODES = np.array([len(m) for m in MODE_MULTIPLIERS])
# (types, max modes) lookup table, NaN where a type has fewer modes.
MODE_TABLE = np.array([m + (np.nan,) * (NUM_MODES.max() - len(m)) for m in MODE_MULTIPLIERS])

# Distance groups (m) and their mean bandwidth (Mb/s); observed range of section 5.1.
DISTANCES_M = (2.0, 8.0, 14.0, 20.0)
MEAN_BANDWIDTH_MBPS = (30.0, 15.0, 6.0, 2.0)
BANDWIDTH_RANGE_MBPS = (1.0, 30.0)
BYTES_PER_MBIT = 1e6 / 8

# Scenario presets of section 5.3: (device type, distance group, count), strongest first.
SCENARIOS = {
    "low": ((AGX, 0, 10),),
    "medium": ((AGX, 0, 5), (NX, 1, 5)),
    "high": ((AGX, 0, 3), (NX, 1, 3), (TX2, 2, 4)),
}

# Paper regime (section 5.2, :func:`paper_regime_scale`): RoBERTa-base on SST-2 with a batch
# of 32 and tau = 20 local steps. The paper does not state its sequence length; we take the
# usual GLUE fine-tuning setting (Hugging Face run_glue's default max_seq_length): every
# example padded to 128 tokens, all of which the model computes on (no packing).
PAPER_BATCH = 32
PAPER_LOCAL_STEPS = 20
PAPER_SEQ_LEN = 128
# Our side of the paper regime: SST-2 as ``data`` batches it (MiniLM's WordPiece tokenizer,
# max_len 64, buckets 32 / 64, real tokens packed by ``data.pack_index``). Measured on the
# full train split (67,349 sentences, 13.3 tokens each on average with [CLS] / [SEP]; 2,104
# random batches of 32): 83 % of batches pad to 64, 426 real tokens and 515 packed rows
# (T) per batch on average. The modal batch, a 32 x 64 grid with T = 512 (16 rows per
# example), is the one we charge; the mean step FLOPs over all batches is 0.9 % below it.
SST2_SEQ_LEN = 64
SST2_ROWS_PER_EXAMPLE = 16

# Narrow spread (paper Fig. 2c): the weakest device runs at this fraction of the strongest's
# speed, in compute and in communication.
NARROW_SPREAD = 0.7

# Tags that keep the mode and bandwidth draws of a round independent of each other and of
# other modules seeding from the same master seed.
_TAG_MODE = 0x6D6F6465
_TAG_BANDWIDTH = 0x62617764


def _readonly(x: np.ndarray) -> np.ndarray:
    x = np.array(x)
    x.setflags(write=False)
    return x


@dataclasses.dataclass(frozen=True, eq=False)
class Fleet:
    """The simulated devices: static arrays per device and the seed of their traces.

    Attributes:
      device_type: ``(N,)`` int, :data:`TX2` / :data:`NX` / :data:`AGX`.
      distance_group: ``(N,)`` int in 0..3, index into :data:`DISTANCES_M`.
      memory_bytes: ``(N,)`` int64, device memory.
      seed: master seed (``federation.seed``); traces depend on ``(seed, t)`` only.
      mode_redraw_every: power modes are re-drawn every this many rounds.
      bandwidth_noise: relative std of the per-round bandwidth factor.
      efficiency: fraction of ``peak * mode multiplier`` a local round achieves.
      compute_scale: factor on every compute time (``devices.clock``: 1 for ``"flops"``,
        :func:`paper_regime_scale` for ``"paper_regime"``).
      spread: ``"paper"`` or ``"narrow"`` (``devices.spread``, :func:`compress_spread`).
    """

    device_type: np.ndarray
    distance_group: np.ndarray
    memory_bytes: np.ndarray
    seed: int
    mode_redraw_every: int
    bandwidth_noise: float
    efficiency: float
    compute_scale: float = 1.0
    spread: str = "paper"

    def __post_init__(self):
        for name in ("device_type", "distance_group", "memory_bytes"):
            object.__setattr__(self, name, _readonly(getattr(self, name)))
        n = self.device_type.shape
        if len(n) != 1 or self.distance_group.shape != n or self.memory_bytes.shape != n:
            raise ValueError("device_type, distance_group and memory_bytes must be (N,) arrays")
        if not (np.isfinite(self.compute_scale) and self.compute_scale > 0):
            raise ValueError(f"compute_scale={self.compute_scale!r}: must be finite and > 0")
        if self.spread not in ("paper", "narrow"):
            raise ValueError(f"spread={self.spread!r}: expected 'paper' or 'narrow'")

    @property
    def num_devices(self) -> int:
        return int(self.device_type.shape[0])

    @property
    def type_names(self) -> tuple[str, ...]:
        """``(N,)`` names of the device types, e.g. ``("agx", "nx", "tx2")``."""
        return tuple(TYPE_NAMES[k] for k in self.device_type)

    @property
    def distance_m(self) -> np.ndarray:
        """``(N,)`` float distance to the router in metres."""
        return np.asarray(DISTANCES_M)[self.distance_group]

    @property
    def peak_flops(self) -> np.ndarray:
        """``(N,)`` fp16 training peak (FLOP/s) of mode 0, before efficiency."""
        return np.asarray(PEAK_FLOPS)[self.device_type]


class DeviceTrace(NamedTuple):
    """The devices' state in one round; every field is ``(N,)``."""

    mode: np.ndarray          # int, power mode (0 = fastest)
    throughput: np.ndarray    # float, effective training throughput, FLOP/s
    bandwidth: np.ndarray     # float, link bandwidth, bytes/s (download and upload)


class RoundTimes(NamedTuple):
    """Simulated completion time of each device in one round, seconds, every field ``(N,)``.

    ``total = comp + comm``: the paper's T_i^t = T_{i,comp}^t + T_{i,comm}^t (section 4.1).
    """

    comp: np.ndarray
    comm: np.ndarray
    total: np.ndarray


def _apportion(groups: tuple, n: int) -> list[int]:
    """Largest-remainder apportionment of ``n`` devices over the groups' preset counts."""
    counts = np.array([c for _, _, c in groups], dtype=np.int64)
    exact = n * counts / counts.sum()
    out = np.floor(exact).astype(np.int64)
    rest = exact - out
    # Stable sort on -remainder: ties go to the earlier (stronger) group.
    for j in np.argsort(-rest, kind="stable")[: n - int(out.sum())]:
        out[j] += 1
    return out.tolist()


# ---------------------------------------------------------------- paper regime -------


def lora_param_count(arch, rank: int) -> int:
    """Parameters of a model's LoRA factors at ``rank`` (both factors, every layer).

    Every linear named in ``arch.lora_targets`` carries ``a: (in, r)`` and ``b: (r, out)``:
    ``r * (in + out)`` parameters. Encoders: q, k, v ``(D, H dh)`` / ``(D, KV dh)``, o
    ``(H dh, D)``, fc1 ``(D, F)``, fc2 ``(F, D)``; decoders: gate, up ``(D, F)``, down
    ``(F, D)`` instead of fc1 / fc2. What the simulator transmits is this times 4 bytes
    (float32), once down and once up.
    """
    d, dh, total = arch.hidden_size, arch.head_dim, 0
    for layer in range(arch.num_layers):
        h, kv, f = arch.heads(layer), arch.kv_heads(layer), arch.channels(layer)
        dims = {"q": (d, h * dh), "k": (d, kv * dh), "v": (d, kv * dh), "o": (h * dh, d)}
        dims.update({"gate": (d, f), "up": (d, f), "down": (f, d)} if arch.is_decoder
                    else {"fc1": (d, f), "fc2": (f, d)})
        total += sum(i + o for name, (i, o) in dims.items() if name in arch.lora_targets)
    return int(rank) * total


def roberta_base_arch(rank: int, lora_targets: tuple = ("q", "k", "v", "o", "fc1", "fc2")):
    """RoBERTa-base as the paper fine-tunes it on SST-2 (12 layers, D 768, 12 heads, F 3072,
    a 2-class head), with LoRA of ``rank`` on ``lora_targets``."""
    from fedspine_jax.models.arch import ArchConfig

    return ArchConfig(arch="roberta", vocab_size=50265, hidden_size=768, num_layers=12,
                      num_heads=12, num_kv_heads=12, head_dim=64, intermediate_size=3072,
                      max_positions=514, type_vocab_size=1, pad_token_id=1, num_labels=2,
                      lora_rank=int(rank), lora_targets=tuple(lora_targets))


def _round_flops(arch, rank: int, batch: int, local_steps: int, seq: int,
                 tokens: int | None) -> float:
    """FLOPs of ``local_steps`` training steps of the full (unpruned) model, as the simulator
    charges them (``train.step_flops``)."""
    from fedspine_jax.train import step_flops

    layers = arch.num_layers
    heads = np.array([arch.heads(i) for i in range(layers)])
    kv = np.array([arch.kv_heads(i) for i in range(layers)])
    channels = np.array([arch.channels(i) for i in range(layers)])
    return local_steps * step_flops(arch, heads, kv, channels, rank, batch, seq, tokens)


def paper_regime_scale(arch, rank: int, batch: int, local_steps: int, *,
                       seq: int = SST2_SEQ_LEN, tokens: int | None = None) -> float:
    """The factor ``k`` of ``devices.clock: paper_regime`` (module note, Clock).

    Derivation. A device of throughput ``theta`` (FLOP/s) and bandwidth ``beta`` (bytes/s)
    spends on a round ``T_comp / T_comm = (F / theta) / (Q / beta) = (F / Q) (beta / theta)``,
    with ``F`` the FLOPs of the round's tau training steps and ``Q`` the LoRA bytes it moves
    (float32 factors at its rank, down + up: ``2 * 4 * lora_param_count``). Charging the run's
    model ``k F`` instead of ``F`` gives it the paper's ratio on every device at once iff

        k = (F_paper / Q_paper) / (F_run / Q_run),

    the device terms ``beta / theta`` cancelling. Both sides are the full (unpruned) model at
    the same LoRA ``rank`` on the same linears (``arch.lora_targets``), FLOPs by
    ``train.step_flops``:

    * paper: RoBERTa-base (:func:`roberta_base_arch`), ``PAPER_LOCAL_STEPS`` (20) steps of
      ``PAPER_BATCH`` (32) x ``PAPER_SEQ_LEN`` (128, padded, every position computed);
    * run: ``arch``, ``local_steps`` steps of ``batch`` x ``seq`` with ``tokens`` packed rows
      (default ``SST2_ROWS_PER_EXAMPLE * batch``, capped at ``batch * seq``: the modal
      SST-2 batch of ``data``, see the constants).

    Figure: MiniLM-L6 (6 x 384, 12 heads, F 1536) at rank 32, batch 32, tau 20: a step is
    2.552e10 FLOPs (32 x 64 grid, T = 512), RoBERTa-base's 1.471e12; the LoRA has
    41,472 r vs 165,888 r parameters (4x), so ``k = (1.471e12 / 4) / 2.552e10 = 14.41``.
    ``k`` grows about linearly with the paper's assumed padded length (7.1 at 64, 29.9 at
    256) and a little with the rank (LoRA FLOPs weigh more in the smaller model).

    Args:
      arch: the run's model (``models.ArchConfig``, full size).
      rank: the LoRA rank both sides are compared at (a run: ``lora.rank``).
      batch, local_steps: the run's ``train.batch_size`` and ``train.local_steps``.
      seq, tokens: the run's padded length and packed rows per step (see above).

    Returns:
      ``k`` > 0.
    """
    if rank < 1 or batch < 1 or local_steps < 1 or seq < 1:
        raise ValueError(f"rank={rank}, batch={batch}, local_steps={local_steps}, seq={seq}: "
                         f"each must be >= 1")
    if tokens is None:
        tokens = min(SST2_ROWS_PER_EXAMPLE, seq) * batch
    paper = roberta_base_arch(rank, arch.lora_targets)
    f_paper = _round_flops(paper, rank, PAPER_BATCH, PAPER_LOCAL_STEPS, PAPER_SEQ_LEN, None)
    f_run = _round_flops(arch, rank, batch, local_steps, seq, tokens)
    # bytes = 2 (down + up) * 4 (float32) * parameters on both sides: the constant cancels.
    return float((f_paper / lora_param_count(paper, rank))
                 / (f_run / lora_param_count(arch, rank)))


def model_arch(cfg: Config):
    """The full-size ``models.ArchConfig`` of ``cfg.model`` with ``cfg.lora``'s adapters,
    without loading weights: a random-init model's shape from the config, a pretrained one's
    from its ``config.json`` (classification head of 2 labels; only its FLOPs depend on it)."""
    import json

    from fedspine_jax.models.arch import ArchConfig
    from fedspine_jax.models.hf_names import resolve_targets
    from fedspine_jax.models.loading import ModelLoadError, arch_from_hf, resolve

    m, lora = cfg.model, cfg.lora
    kw = {"num_labels": 2, "lora_rank": lora.rank, "lora_alpha": lora.alpha,
          "lora_targets": tuple(lora.targets)}
    if m.source == "random":
        heads = m.num_heads
        kw["lora_targets"] = resolve_targets(m.arch, lora.targets)
        return ArchConfig(arch=m.arch, vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                          num_layers=m.num_layers, num_heads=heads,
                          num_kv_heads=m.num_kv_heads if m.arch == "llama" else heads,
                          head_dim=m.hidden_size // heads,
                          intermediate_size=m.intermediate_size, **kw)
    path = resolve(m.source)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"devices.clock=paper_regime needs the model's config.json; "
                             f"{str(path)!r} has none")
    return arch_from_hf(json.loads((path / "config.json").read_text()), **kw)


def build_fleet(cfg: Config, arch=None) -> Fleet:
    """The fleet of ``cfg.federation.num_devices`` devices for ``cfg.devices.scenario``.

    Presets follow section 5.3, scaled by largest remainder when N != 10; ``custom`` uses
    the per-type counts with round-robin distance groups (see the module's design note).
    ``devices.clock: paper_regime`` sets ``Fleet.compute_scale`` to
    :func:`paper_regime_scale` of the run's model at ``lora.rank``, ``train.batch_size``
    and ``train.local_steps``; ``devices.spread`` is carried as ``Fleet.spread``.

    Args:
      cfg: the run's config.
      arch: the run's full-size ``models.ArchConfig``, for the paper-regime clock; default
        :func:`model_arch` of ``cfg`` (reads a pretrained model's ``config.json``). Unused
        with ``devices.clock: flops``.

    Raises:
      ConfigError: ``custom`` counts that do not sum to ``federation.num_devices``;
        ``paper_regime`` with a task other than SST-2 (its calibration's data).
    """
    dev, n = cfg.devices, cfg.federation.num_devices
    scale = 1.0
    if dev.clock == "paper_regime":
        if cfg.data.task != "sst2":
            raise ConfigError(f"devices.clock=paper_regime is calibrated on SST-2 (the "
                              f"paper's RoBERTa-base setting and our packed SST-2 batches); "
                              f"data.task={cfg.data.task} needs devices.clock=flops")
        seq = min(SST2_SEQ_LEN, cfg.data.max_len)
        scale = paper_regime_scale(model_arch(cfg) if arch is None else arch, cfg.lora.rank,
                                   cfg.train.batch_size, cfg.train.local_steps, seq=seq)
    if dev.scenario == "custom":
        total = dev.num_tx2 + dev.num_nx + dev.num_agx
        if total != n:
            raise ConfigError(
                f"devices.num_agx={dev.num_agx} + devices.num_nx={dev.num_nx} + "
                f"devices.num_tx2={dev.num_tx2} = {total}: must equal "
                f"federation.num_devices={n} for devices.scenario='custom'")
        types = np.repeat([AGX, NX, TX2], [dev.num_agx, dev.num_nx, dev.num_tx2])
        groups = np.arange(n) % len(DISTANCES_M)
    else:
        preset = SCENARIOS[dev.scenario]
        counts = _apportion(preset, n)
        types = np.repeat([k for k, _, _ in preset], counts)
        groups = np.repeat([g for _, g, _ in preset], counts)
    types = types.astype(np.int32)
    return Fleet(device_type=types, distance_group=groups.astype(np.int32),
                 memory_bytes=np.asarray(MEMORY_BYTES, np.int64)[types],
                 seed=cfg.federation.seed, mode_redraw_every=dev.mode_redraw_every,
                 bandwidth_noise=dev.bandwidth_noise, efficiency=dev.efficiency,
                 compute_scale=scale, spread=dev.spread)


def _check_round(t: int) -> int:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
        raise ValueError(f"round index t={t!r}: expected an integer >= 0")
    return int(t)


def power_modes(fleet: Fleet, t: int) -> np.ndarray:
    """``(N,)`` int power mode of every device in round ``t`` (0-based).

    Drawn uniformly per device from ``default_rng((seed, tag, t // mode_redraw_every))``:
    constant on rounds ``[e k, (e + 1) k)``, re-drawn at every multiple of k.
    """
    epoch = _check_round(t) // fleet.mode_redraw_every
    rng = np.random.default_rng((fleet.seed, _TAG_MODE, epoch))
    return rng.integers(0, NUM_MODES[fleet.device_type])


def compress_spread(x: np.ndarray, ratio: float = NARROW_SPREAD) -> np.ndarray:
    """Compress positive values on a log scale towards their maximum (``devices.spread``).

    ``hi * (x / hi) ** g`` with ``hi = max(x)`` and ``g = log(ratio) / log(min(x) / hi)``, so
    the minimum lands on ``ratio * hi``, the maximum stays, the order is kept and every ratio
    ``x / hi`` becomes ``(x / hi) ** g``. Values already within ``ratio`` are returned as
    they are (the spread is never widened).

    Args:
      x: ``(N,)`` positive values (a round's throughputs or bandwidths).
      ratio: the smallest allowed ``min / max``, in (0, 1].
    """
    x = np.asarray(x, dtype=np.float64)
    hi, lo = float(x.max()), float(x.min())
    if lo >= ratio * hi:
        return x
    g = np.log(ratio) / np.log(lo / hi)
    return hi * (x / hi) ** g


def bandwidth_mbps(fleet: Fleet, t: int) -> np.ndarray:
    """``(N,)`` float bandwidth of every device in round ``t``, Mb/s, within [1, 30].

    ``clip(mean[group] * exp(s z - s**2 / 2), 1, 30)`` with ``z ~ N(0, 1)`` drawn from
    ``default_rng((seed, tag, t))`` and ``s**2 = log(1 + bandwidth_noise**2)``, so the
    factor has mean 1 and relative std ``bandwidth_noise`` (before clipping). With
    ``spread == "narrow"`` the round's values then go through :func:`compress_spread`.
    """
    rng = np.random.default_rng((fleet.seed, _TAG_BANDWIDTH, _check_round(t)))
    z = rng.standard_normal(fleet.num_devices)
    bw = bandwidth_from_noise(fleet.distance_group, z, fleet.bandwidth_noise)
    return compress_spread(bw) if fleet.spread == "narrow" else bw


# ---- the device model as array functions, shared with the synthetic sweep environment
# (fedspine_jax.sweep_env): ``xp`` is numpy here (float64) or jax.numpy there (float32,
# traced), so both clocks are one model.


def throughput_from_mode(device_type, mode, efficiency: float, xp=np):
    """Effective training FLOP/s, ``PEAK_FLOPS[type] * MODE_MULTIPLIERS[type][mode] *
    efficiency`` (before ``compress_spread``), for arrays of device types and modes."""
    return (xp.asarray(PEAK_FLOPS)[device_type] * xp.asarray(MODE_TABLE)[device_type, mode]
            * efficiency)


def bandwidth_from_noise(distance_group, z, noise: float, xp=np):
    """Bandwidth in Mb/s, ``clip(mean[group] * exp(s z - s**2 / 2), 1, 30)`` with
    ``s**2 = log(1 + noise**2)``, for standard normal draws ``z`` (before
    ``compress_spread``); ``z = 0`` and ``noise = 0`` give the group's clipped mean."""
    s = float(np.sqrt(np.log1p(noise ** 2)))
    mean = xp.asarray(MEAN_BANDWIDTH_MBPS)[distance_group]
    return xp.clip(mean * xp.exp(s * z - 0.5 * s * s), *BANDWIDTH_RANGE_MBPS)


def times_from_trace(flops, nbytes, throughput, bandwidth, compute_scale: float = 1.0
                     ) -> RoundTimes:
    """Section 4.1's ``T = T_comp + T_comm`` from a round's trace: ``T_comp =
    compute_scale * flops / throughput`` (FLOP/s) and ``T_comm = nbytes / bandwidth``
    (bytes/s), elementwise."""
    comp = flops * compute_scale / throughput
    comm = nbytes / bandwidth
    return RoundTimes(comp=comp, comm=comm, total=comp + comm)


def round_trace(fleet: Fleet, t: int) -> DeviceTrace:
    """Every device's mode, effective throughput (FLOP/s) and bandwidth (bytes/s) in round t.

    A pure function of ``(fleet, t)``: the same for every caller and call order.
    ``throughput = PEAK_FLOPS[type] * MODE_MULTIPLIERS[type][mode] * efficiency``, through
    :func:`compress_spread` when ``spread == "narrow"`` (the bandwidth too,
    :func:`bandwidth_mbps`).
    """
    mode = power_modes(fleet, t)
    throughput = throughput_from_mode(fleet.device_type, mode, fleet.efficiency)
    if fleet.spread == "narrow":
        throughput = compress_spread(throughput)
    return DeviceTrace(mode=mode, throughput=throughput,
                       bandwidth=bandwidth_mbps(fleet, t) * BYTES_PER_MBIT)


def _per_device(name: str, x, n: int) -> np.ndarray:
    x = np.broadcast_to(np.asarray(x, dtype=np.float64), (n,))
    if np.any(x < 0) or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite and >= 0 (scalar or (N,) array)")
    return x


def completion_time(fleet: Fleet, t: int, flops, download_bytes, upload_bytes
                    ) -> RoundTimes:
    """Simulated completion time of every device in round ``t`` (section 4.1).

    ``T_comp = compute_scale * flops / throughput`` and ``T_comm = (download + upload) /
    bandwidth`` with the round's trace (:func:`round_trace`); ``T = T_comp + T_comm`` (the
    round is sequential: download, local training, upload, as in section 3).
    ``fleet.compute_scale`` is 1 for ``devices.clock: flops`` (times as before) and
    :func:`paper_regime_scale` for ``paper_regime``.

    Args:
      fleet: the devices.
      t: round index (>= 0).
      flops: FLOPs of the device's local round, scalar or ``(N,)``.
      download_bytes: bytes the device receives (global LoRA, config), scalar or ``(N,)``.
      upload_bytes: bytes the device sends (its LoRA update, report), scalar or ``(N,)``.

    Returns:
      :class:`RoundTimes` of ``(N,)`` float64 arrays, seconds.
    """
    n = fleet.num_devices
    flops = _per_device("flops", flops, n)
    nbytes = (_per_device("download_bytes", download_bytes, n)
              + _per_device("upload_bytes", upload_bytes, n))
    trace = round_trace(fleet, t)
    return times_from_trace(flops, nbytes, trace.throughput, trace.bandwidth,
                            fleet.compute_scale)


def fits_memory(fleet: Fleet, peak_bytes) -> np.ndarray:
    """``(N,)`` bool: the device's training peak memory (scalar or ``(N,)`` bytes) fits."""
    peak = _per_device("peak_bytes", peak_bytes, fleet.num_devices)
    return peak <= fleet.memory_bytes


def apply_memory_policy(times: RoundTimes, fits: np.ndarray, deadline_s: float = 0.0
                        ) -> RoundTimes:
    """Charge devices that ran out of memory the round's deadline (design note, Memory).

    A failing device sends no update (the caller drops it: ``fits`` is that mask) and its
    completion time becomes the deadline: ``deadline_s`` when > 0 (``federation.deadline_s``),
    else ``max(times.total)`` over all devices (the times they would have had with enough
    memory). Its communication part is kept (capped at the deadline) and the rest of the
    deadline is booked as computation, so ``total = comp + comm`` still holds.

    Args:
      times: :class:`RoundTimes` from :func:`completion_time`, fields ``(N,)``.
      fits: ``(N,)`` bool from :func:`fits_memory`.
      deadline_s: the round's deadline in seconds; 0 means none is set.

    Returns:
      :class:`RoundTimes` with the failing devices' entries replaced.
    """
    fits = np.asarray(fits, dtype=bool)
    if fits.shape != times.total.shape:
        raise ValueError(f"fits has shape {fits.shape}, times {times.total.shape}")
    if deadline_s < 0:
        raise ValueError(f"deadline_s={deadline_s!r}: must be >= 0")
    deadline = float(deadline_s) if deadline_s > 0 else float(np.max(times.total))
    comm = np.where(fits, times.comm, np.minimum(times.comm, deadline))
    total = np.where(fits, times.total, deadline)
    return RoundTimes(comp=np.where(fits, times.comp, total - comm), comm=comm, total=total)


def waiting_time(times) -> np.ndarray:
    """Average waiting time, Eq. 1: ``Gamma = (1/N) sum_i (max_j T_j - T_i)``.

    Args:
      times: completion times ``(..., N)``, devices on the last axis.

    Returns:
      Gamma, shape ``(...)`` (a numpy float for ``(N,)`` input), seconds.
    """
    times = np.asarray(times, dtype=np.float64)
    if times.ndim == 0 or times.shape[-1] == 0:
        raise ValueError("waiting_time needs at least one device on the last axis")
    return np.mean(np.max(times, axis=-1, keepdims=True) - times, axis=-1)
