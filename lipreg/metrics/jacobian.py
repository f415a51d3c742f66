r"""Lower bounds on the Lipschitz constant of a network from local Jacobian norms.

For a function :math:`f:\mathbb{R}^n\to\mathbb{R}^m` that is differentiable almost everywhere
(e.g. any network built from affine maps and Lipschitz activations), Rademacher's theorem gives
the Lipschitz constant w.r.t. the Euclidean norms as

.. math::  L(f) = \sup_x \|J_f(x)\|_2 ,

(Scaman & Virmaux 2018, "Lipschitz regularity of deep neural networks: analysis and efficient
estimation", arXiv:1805.10965, Thm. 1).  Consequently, for **any** point :math:`x` and **any** unit
vector :math:`v`, :math:`\|J_f(x)v\|_2 \le \|J_f(x)\|_2 \le L(f)`: every value computed here is a
valid *lower* bound of :math:`L(f)`, complementary to the upper bounds (AutoLip / SeqLip) of the
rest of the package.  The gap between the two brackets the true constant.

Jacobians are never formed: the top singular value of :math:`J = J_f(x)` is obtained by power
iteration on :math:`J^\top J`, with :math:`Jv` computed by forward-mode AD
(:func:`torch.func.jvp`) and :math:`J^\top u` by reverse-mode AD (:func:`torch.func.vjp`).

The model is applied to the whole batch at once; the per-sample results are only correct if the
samples do not interact, i.e. the model is in eval mode (no BatchNorm batch statistics).  These
functions never change the model's mode: **pass a model in eval mode** (``model.eval()``).  A model
with BatchNorm in training mode is rejected (``ValueError``); Dropout in training mode gives a
``RuntimeWarning`` (the function is then random).

**Precision.**  A lower bound computed in the model's dtype is not one: in bfloat16 the power iteration's
rounding alone puts :math:`\|Jv\|` above :math:`\|J\|_2`.  Every value is therefore computed on a float64
copy of the model's computation (:func:`torch.func.functional_call` with float64 copies of the parameters and
floating-point buffers: the model itself is not modified; a low-precision weight converts to float64 exactly), and
rounded **down** into the output dtype (:func:`_round_down`).  A plain callable is called on float64 inputs as
it is, and must then compute in float64.

This module imports only the power steps of :mod:`lipreg.linalg.power`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from lipreg.linalg.power import power_steps

__all__ = ["local_jacobian_norm", "lower_bound"]

F64_MARGIN = 2.0**-40
"""Relative margin for the float64 rounding of :math:`\|Jv\|_2` (a relative error of order
:math:`n\,2^{-53}` for :math:`n` accumulated terms per entry: :math:`2^{-40}` covers :math:`n` up to 8192
with room to spare), applied before the value is rounded down into the output dtype."""


def _check_mode(model: Callable[[Tensor], Tensor]) -> None:
    """BatchNorm in training mode: samples interact (and torch.func rejects the in-place update of the
    running statistics) -> ValueError.  Dropout in training mode: f is random -> RuntimeWarning."""
    if not isinstance(model, nn.Module):
        return
    for m in model.modules():
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"lipreg.metrics.lower_bound: {type(m).__name__} is in training mode, so the samples of the batch "
                "interact and per-sample Jacobians are meaningless. Call model.eval() first."
            )
    for m in model.modules():
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            warnings.warn(
                f"lipreg.metrics.lower_bound: {type(m).__name__} is in training mode, so the network is random and the "
                "local Jacobian norms are not those of the eval-mode network. Call model.eval() first.",
                RuntimeWarning,
                stacklevel=3,
            )
            return


def _float64_model(model: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The model's computation in float64: for an ``nn.Module``, a :func:`torch.func.functional_call` with float64
    copies of its floating-point parameters and buffers (the module is not modified); a plain callable as it is."""
    if not isinstance(model, nn.Module):
        return model
    tensors = {name: t.detach().to(torch.float64) if t.is_floating_point() else t
               for name, t in [*model.named_parameters(), *model.named_buffers()]}
    return lambda x: torch.func.functional_call(model, tensors, (x,))


def _round_down(value: Tensor, dtype: torch.dtype) -> Tensor:
    """A float64 lower bound lowered by :data:`F64_MARGIN`, then rounded towards zero into ``dtype``: the
    result is never above ``value`` (a value beyond ``dtype``'s range becomes its largest finite number)."""
    lowered = value * (1 - F64_MARGIN)
    out = lowered.to(dtype)
    above = out.to(torch.float64) > lowered
    return torch.where(above, torch.nextafter(out, torch.full_like(out, -math.inf)), out)


def _flat_norm(t: Tensor) -> Tensor:
    """Per-sample Euclidean norm of a (B, *) tensor, shape (B,)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _per_sample(s: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor so that it broadcasts against ``like`` (B, *)."""
    return s.reshape((-1,) + (1,) * (like.dim() - 1))


def _jvp(model: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> Tensor:
    return torch.func.jvp(model, (x,), (v,))[1]


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have a leading batch dimension: shape (B, *in)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")


def local_jacobian_norm(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    n_iter: int = 20,
    v0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-sample spectral norm :math:`\|J_f(x_b)\|_2` of the Jacobian of ``model`` at each sample.

    Power iteration on :math:`J_b^\top J_b`, one independent iteration per sample, run on the whole
    batch at once (the batched Jacobian is block-diagonal when samples do not interact):

    .. math:: v \leftarrow \frac{J^\top J v}{\|J^\top J v\|}, \qquad
              \hat\sigma = \|J v\|_2 \le \sigma_{\max}(J).

    :math:`Jv` uses :func:`torch.func.jvp`, :math:`J^\top u` uses :func:`torch.func.vjp`; the
    Jacobian is never materialised.  The estimate converges to :math:`\|J\|_2` **from below** (at a
    rate set by the gap between the two top singular values), so every returned value is a valid
    lower bound of :math:`\|J_f(x_b)\|_2` and hence of the Lipschitz constant.  The iteration runs on the
    float64 copy of the model's computation, and the norms are rounded down into ``x``'s dtype (module docstring).

    Args:
        model: a callable mapping a batch ``(B, *in)`` to ``(B, *out)`` (``*out`` may be empty).
            Must be in eval mode (samples must not interact); its mode is not changed here.
            BatchNorm in training mode raises ``ValueError``; Dropout in training mode warns.
        x: the points, shape ``(B, *in)``, floating point.  Not modified; gradients are not needed.
        n_iter: number of power iterations (``0`` evaluates :math:`\|J v_0\|` only).
        v0: optional starting vectors ``(B, *in)`` (normalised per sample; every row must be
            nonzero).  Default: standard Gaussian draws from the global torch RNG.

    Raises:
        TypeError: if the model's float64 copy does not return float64 (see the module docstring).

    Returns:
        ``(norms, v)``: ``norms`` of shape ``(B,)`` (dtype of ``x``, rounded down) with :math:`\|J_b v_b\|`, and ``v`` of shape
        ``(B, *in)`` the unit-norm estimates of the top right singular vectors.  Both detached.
        A sample whose Jacobian annihilates the current vector keeps that vector and gets norm 0.
    """
    _check_input(x)
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    _check_mode(model)
    x64 = x.detach().to(torch.float64)
    if v0 is not None:
        if v0.shape != x.shape:
            raise ValueError(f"v0 must have the shape of x {tuple(x.shape)}, got {tuple(v0.shape)}")
        v0 = v0.detach().to(dtype=torch.float64, device=x.device)
        if not bool((_flat_norm(v0) > 0).all()):
            raise ValueError("every row of v0 must be nonzero")
    norms, v = _local_norms64(_float64_model(model), x64, n_iter, v0)
    return _round_down(norms, x.dtype), v.to(x.dtype)


def _local_norms64(model64: Callable[[Tensor], Tensor], x: Tensor, n_iter: int,
                   v0: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`local_jacobian_norm` on float64 ``x`` for the float64 computation ``model64``: float64 norms
    (not yet rounded down) and unit vectors."""
    v0 = torch.randn_like(x) if v0 is None else v0
    v = v0 / _per_sample(_flat_norm(v0), v0)
    if x.shape[0] == 0:
        return x.new_zeros(0), v

    # Outer no_grad: torch.func transforms ignore the outer grad mode, and this avoids recording an
    # autograd graph towards the model's parameters.  Nothing is ever written to any .grad.
    with torch.no_grad():
        out, vjp_fn = torch.func.vjp(model64, x)
        _check_output(out, x)
        v = power_steps(lambda z: vjp_fn(_jvp(model64, x, z))[0], v, n_iter, start_dim=1)  # per-sample J^T J
        norms = _flat_norm(_jvp(model64, x, v))
    return norms.detach(), v.detach()


def _check_output(out: object, x: Tensor) -> None:
    if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model must map (B, *in) to (B, *out); got output {shape} for B={x.shape[0]}")
    if out.dtype != torch.float64:
        raise TypeError(
            f"lipreg.metrics: a lower bound is computed in float64, but the model returned {out.dtype} on float64 "
            "inputs (a cast inside forward, or tensors held outside its parameters and buffers). Pass an nn.Module "
            "whose parameters and buffers hold its tensors (they are copied to float64), or a callable computing in "
            "float64."
        )


def _ascent_direction(model: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> Tensor:
    """Per-sample gradient of ``0.5 * ||J_f(x_b) v_b||^2`` w.r.t. ``x_b`` (reverse over forward AD)."""

    def half_sq(z: Tensor) -> Tensor:
        return 0.5 * _jvp(model, z, v).pow(2).sum()  # samples independent: sum -> per-sample grads

    return torch.func.grad(half_sq)(x)


def lower_bound(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    ascent_steps: int = 0,
    lr: float = 0.1,
    n_iter: int = 20,
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Lower bound of the Lipschitz constant :math:`L(f)=\sup_x\|J_f(x)\|_2`: the max of local norms.

    Computes :math:`\max_b \|J_f(x_b)\|_2` over the batch ``inputs`` with
    :func:`local_jacobian_norm`, then optionally runs ``ascent_steps`` steps of gradient ascent on
    the inputs to find points of larger local norm.  The objective at step :math:`t` is
    :math:`\phi(x) = \|J_f(x) v_t\|_2` with :math:`v_t` the current top right singular vector (by
    Danskin's theorem its gradient equals that of :math:`\sigma_{\max}(J_f(x))` when the top
    singular value is simple).  Each sample takes a normalised step

    .. math:: x_b \leftarrow x_b + \mathrm{lr}\,\frac{g_b}{\|g_b\|_2},\qquad
              g_b = \nabla_{x_b}\tfrac12\|J_f(x_b)v_b\|_2^2 ,

    (so ``lr`` is the Euclidean step length in input space; samples with :math:`g_b=0` stay put),
    after which the power iteration is re-run at the new points, warm-started from :math:`v_t`.
    The gradient is computed by :func:`torch.func.grad` over :func:`torch.func.jvp` (no finite
    differences).  The result is the maximum over **all** visited points, so it never decreases with
    more steps (for the same random start) and is always a valid lower bound of :math:`L(f)`.

    Notes:
        * For piecewise-linear networks (ReLU, max-pool) the local norm is piecewise constant in
          :math:`x`, hence its gradient is zero almost everywhere and the ascent does not move;
          only smooth activations (tanh, GELU, ...) benefit from ``ascent_steps > 0``.
        * The ascent explores all of :math:`\mathbb{R}^n`, the domain of the definition of
          :math:`L(f)`; points may leave the data domain (e.g. pixel range), which is harmless for
          a bound on :math:`L(f)`.
        * Pass an eval-mode model; its mode is not changed here (see module docstring).
        * The power iteration starts from Gaussian vectors drawn from the global torch RNG; seed it
          (``torch.manual_seed``) for reproducible values.
        * Everything runs on the float64 copy of the model's computation, ascent included (the points may
          leave the grid of ``inputs``' dtype), and the maximum is rounded down into ``dtype``.

    Args:
        model: callable ``(B, *in) -> (B, *out)``, in eval mode.
        inputs: starting points ``(B, *in)``.
        ascent_steps: number of gradient-ascent steps (``0``: evaluate the inputs only).
        lr: Euclidean length of each ascent step in input space.
        n_iter: power iterations per evaluation.
        dtype: the dtype of the result (default: that of ``inputs``).

    Raises:
        TypeError: if the model's float64 copy does not return float64 (see the module docstring).

    Returns:
        A detached 0-dim tensor: the float64 maximum, rounded down into ``dtype``; ``0`` for an empty batch.
    """
    _check_input(inputs)
    if ascent_steps < 0:
        raise ValueError(f"ascent_steps must be >= 0, got {ascent_steps}")
    if not (lr >= 0 and lr < float("inf")):
        raise ValueError(f"lr must be finite and >= 0, got {lr}")
    dtype = inputs.dtype if dtype is None else dtype
    x = inputs.detach().to(torch.float64)
    if x.shape[0] == 0:
        return x.new_zeros((), dtype=dtype)
    _check_mode(model)
    model64 = _float64_model(model)
    norms, v = _local_norms64(model64, x, n_iter, None)
    best = norms
    with torch.no_grad():
        for _ in range(ascent_steps):
            g = _ascent_direction(model64, x, v)
            gn = _flat_norm(g)
            moving = torch.isfinite(gn) & (gn > 0)
            step = g / _per_sample(torch.where(moving, gn, torch.ones_like(gn)), g)
            x = torch.where(_per_sample(moving, x), x + lr * step, x)
            norms, v = _local_norms64(model64, x, n_iter, v)
            best = torch.maximum(best, norms)
    return _round_down(best.max(), dtype).detach()
