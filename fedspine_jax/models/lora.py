"""LoRA linear layers, the variable types of the model, and LoRA rank changes.

Design note
-----------
Orientation: Flax kernels are ``(in, out)``. A LoRA pair is ``a: (in, r)`` (Gaussian init)
and ``b: (r, out)`` (zero init); the layer computes ``x @ w + (alpha / r) * (x @ a) @ b``.
The paper's B is our ``b`` (the zero-initialised factor). Rank 0 is allowed: the pair has
zero-width shapes and contributes nothing.

Variable types split the model's state by role:

* ``nnx.Param``       frozen pretrained (or random-init) weights;
* ``nnx.LoRAParam``   the LoRA factors: the federated payload, trained locally;
* ``HeadParam``       the task head (classifier), trained locally with the LoRA;
* ``Mask``            0/1 structured masks (heads, FFN channels), changed only by pruning.

Rank changes (section 4.3) keep the *effective* update ``(alpha / r) a @ b`` fixed:
growing appends Gaussian columns to ``a`` and zero rows to ``b`` (and rescales ``b`` by
r_new / r_old for the changed alpha / r), so the output is unchanged; shrinking replaces the
update by its best rank-r approximation (Eckart-Young), computed from the factors by QR and
an SVD of the small r x r core so no (in, out) matrix is formed.

The LoRA branch ``(x @ a) @ b`` has a hand-written backward (:func:`lora_branch`, a
``jax.custom_vjp``) that flattens the token dimensions and computes the four gradient
products as 2-D matmuls. The gradients are the autodiff ones (the same products, summed in
another order); what changes is XLA's schedule: under plain autodiff it computes the ``b``
gradient of fc1 as a contraction over the 3-D token dims and fuses the GELU backward into a
transposing copy of ``dy`` that took 23-32 % of a CPU LoRA step (measured with
``benchmarks/local_step.py --profile``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class HeadParam(nnx.Param):
    """Trainable task-head weight (classifier), updated with the LoRA factors."""


class Mask(nnx.Variable):
    """0/1 structured-pruning mask (float32), e.g. ``(num_heads,)`` or ``(num_channels,)``."""


def lora_scale(alpha: float, rank: int) -> float:
    """The LoRA output scaling alpha / r (0 for rank 0)."""
    return float(alpha) / rank if rank > 0 else 0.0


@jax.custom_vjp
def lora_branch(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """The unscaled LoRA branch ``(x @ a) @ b``, with a 2-D backward (see the design note).

    Args:
      x: (..., in) inputs, any number of leading (batch, token) dims, including none.
      a: (in, r) LoRA factor (Gaussian init); b: (r, out) LoRA factor (zero init); r may be 0.
    Returns:
      (..., out), the dtype of ``(x @ a) @ b`` (jnp promotion). Gradients have the dtypes
      and shapes of ``x``, ``a``, ``b``: with ``t = dy`` flattened to ``(N, out)`` (N the
      product of the leading dims), ``x2 = x`` as ``(N, in)`` and ``xa2 = x @ a`` as
      ``(N, r)``::

          g_b = xa2.T @ t        (r, out)
          dxa = t @ b.T          (N, r)
          g_a = x2.T @ dxa       (in, r)
          dx  = dxa @ a.T        (N, in) -> (..., in)

    Reverse mode only (a ``custom_vjp`` has no forward-mode rule: ``jax.jvp`` through the
    LoRA branch raises); it composes with ``jit``, ``vmap``, ``grad`` and ``remat``.
    """
    return (x @ a) @ b


def _lora_branch_fwd(x, a, b):
    xa = x @ a
    return xa @ b, (x, a, b, xa)


def _lora_branch_bwd(res, dy):
    x, a, b, xa = res
    d_in, r = a.shape
    d_out = b.shape[1]
    n = math.prod(x.shape[:-1])      # explicit N: reshape(-1, 0) is ambiguous when r == 0
    t = dy.reshape(n, d_out)
    x2 = x.reshape(n, d_in)
    xa2 = xa.reshape(n, r)
    g_b = xa2.T @ t
    dxa = t @ b.T
    g_a = x2.T @ dxa
    dx = (dxa @ a.T).reshape(x.shape)
    return dx.astype(x.dtype), g_a.astype(a.dtype), g_b.astype(b.dtype)


lora_branch.defvjp(_lora_branch_fwd, _lora_branch_bwd)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of ``x`` (any shape) at ``rate``; the identity without a key."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class LoRALinear(nnx.Module):
    """``y = x @ w (+ bias) + (alpha / r) * (drop(x) @ a) @ b``.

    ``drop`` is PEFT's ``lora_dropout`` on the branch's input: applied only when a call
    passes a ``dropout_key`` (training steps), the identity otherwise.

    Args:
      d_in, d_out: kernel shape ``(d_in, d_out)``.
      rank: LoRA rank r (0 allowed); ``lora=False`` builds a plain linear without factors.
      alpha: LoRA alpha.
      use_bias: add a bias ``(d_out,)``.
      init_std: std of the random-init kernel; lora_init_std: std of ``a``.
      dropout: the LoRA branch's input dropout rate (training only).
      param_type: variable type of kernel and bias (``nnx.Param`` frozen, ``HeadParam``).
    """

    def __init__(self, d_in: int, d_out: int, *, rank: int = 0, alpha: float = 16.0,
                 lora: bool = True, use_bias: bool = True, init_std: float = 0.02,
                 lora_init_std: float = 0.02, dropout: float = 0.0, param_type=nnx.Param,
                 rngs: nnx.Rngs):
        self.kernel = param_type(init_std * jax.random.normal(rngs.params(), (d_in, d_out)))
        self.bias = param_type(jnp.zeros((d_out,))) if use_bias else None
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        if lora:
            self.lora_a = nnx.LoRAParam(
                lora_init_std * jax.random.normal(rngs.params(), (d_in, rank)))
            self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out)))
        else:
            self.lora_a = None
            self.lora_b = None

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else int(self.lora_a.shape[1])

    def __call__(self, x_bli: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """x: (..., d_in) -> (..., d_out); ``dropout_key``: LoRA dropout (training)."""
        y = x_bli @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        if self.rank > 0:
            x_in = dropout(x_bli, self.dropout, dropout_key)
            y = y + lora_branch(x_in, self.lora_a[...], self.lora_b[...]) * lora_scale(
                self.alpha, self.rank)
        return y

    def merged_kernel(self) -> jax.Array:
        """The kernel with the LoRA update merged in: ``w + (alpha/r) a @ b``, (d_in, d_out)."""
        w = self.kernel[...]
        if self.rank > 0:
            w = w + lora_scale(self.alpha, self.rank) * (self.lora_a[...] @ self.lora_b[...])
        return w


def best_rank_approx(a: jax.Array, b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Best rank-``rank`` approximation of ``a @ b`` as balanced factors (Eckart-Young).

    Uses a QR of ``a`` and of ``b.T`` and an SVD of the small ``(r, r)`` core, so the
    ``(in, out)`` product is never formed. When ``rank`` exceeds the current rank the
    factors are zero-padded (the product is unchanged).

    Args:
      a: (in, r); b: (r, out); rank: target rank r'.
    Returns:
      a': (in, r') = Q_a U sqrt(S), b': (r', out) = sqrt(S) V^T Q_b^T, with a' @ b' the
      truncated SVD of a @ b.
    """
    d_in, r = a.shape
    d_out = b.shape[1]
    if rank >= r:
        return (jnp.concatenate([a, jnp.zeros((d_in, rank - r), a.dtype)], axis=1),
                jnp.concatenate([b, jnp.zeros((rank - r, d_out), b.dtype)], axis=0))
    if rank == 0:
        return jnp.zeros((d_in, 0), a.dtype), jnp.zeros((0, d_out), b.dtype)
    qa, ra = jnp.linalg.qr(a)            # (in, r), (r, r)
    qb, rb = jnp.linalg.qr(b.T)          # (out, r), (r, r)
    u, s, vt = jnp.linalg.svd(ra @ rb.T)  # core (r, r)
    sq = jnp.sqrt(s[:rank])
    return (qa @ (u[:, :rank] * sq)), ((sq[:, None] * vt[:rank]) @ qb.T)


def resize_lora(a: jax.Array, b: jax.Array, new_rank: int, alpha: float, key: jax.Array,
                init_std: float = 0.02) -> tuple[jax.Array, jax.Array]:
    """Change a LoRA pair's rank, keeping the effective update ``(alpha/r) a @ b`` (sec. 4.3).

    Grow (``new_rank >= r``): ``a`` gets Gaussian ``N(0, init_std^2)`` columns, ``b`` zero
    rows, and ``b`` is rescaled by ``new_rank / r`` so that the changed scaling alpha/r keeps
    the output exactly unchanged. Shrink: the best rank-``new_rank`` approximation of the
    effective update (:func:`best_rank_approx`), re-expressed at the new scaling.

    Args:
      a: (in, r); b: (r, out); new_rank: r'; alpha: LoRA alpha; key: PRNG key for growth.
    Returns:
      (a', b') of shapes (in, r'), (r', out).
    """
    r = a.shape[1]
    s_old, s_new = lora_scale(alpha, r), lora_scale(alpha, new_rank)
    ratio = (s_old / s_new) if s_new > 0 else 0.0
    if new_rank >= r:
        extra = init_std * jax.random.normal(key, (a.shape[0], new_rank - r), a.dtype)
        return (jnp.concatenate([a, extra], axis=1),
                jnp.concatenate([b * ratio, jnp.zeros((new_rank - r, b.shape[1]), b.dtype)], 0))
    a2, b2 = best_rank_approx(a, b, new_rank)
    return a2, b2 * ratio
