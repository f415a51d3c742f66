"""The power method through autograd (paper Alg. 2): ``sigma_1(A)`` of a linear map given as a function.

For a linear ``A``, ``g(v) = 1/2 ||A v||^2`` has gradient ``A^T A v``: one backward pass applies ``A^T A`` with no
matrix formed, whatever ``A`` is (dense, convolution with any padding, pooling, a fused chain of them).
Iterating ``v <- A^T A v / ||A^T A v||`` converges to the top right singular vector at the rate
``(sigma_2 / sigma_1)^2``, and ``||A v||`` (with ``||v|| = 1``) to ``sigma_1`` **from below**: a power-method value
is an *estimate*, never a certificate (see :mod:`lipreg.certify` for certified bounds).

Gradients: the iterations run without grad on the current weights; the returned ``||A v||`` is computed with
grad at the fixed ``v``. At convergence this is the Danskin gradient ``d sigma_1 / dA = u v^T``; away from it, the
gradient of the lower estimate ``||A v||`` (as ``torch.nn.utils.parametrizations.spectral_norm`` does).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LinearFn = Callable[[Tensor], Tensor]


def normalized(v: Tensor) -> Tensor:
    """``v / ||v||`` (Frobenius norm over all entries)."""
    return v / torch.linalg.vector_norm(v)


def gram_step(apply: LinearFn, v: Tensor) -> Tensor:
    """``A^T A v`` by one forward and one backward pass through ``apply`` (``A v``), with no grad to the weights."""
    with torch.enable_grad():
        v = v.detach().requires_grad_(True)
        av = apply(v)
        (ata_v,) = torch.autograd.grad(av, v, grad_outputs=av.detach())
    return ata_v


def power_iterations(apply: LinearFn, v: Tensor, n_iter: int) -> Tensor:
    """``n_iter`` steps of ``v <- A^T A v / ||A^T A v||`` from ``v``.

    A step that would give a zero or non-finite vector (zero or NaN weights) keeps the previous vector, so the
    warm state is never poisoned (chosen with ``torch.where``: no host synchronisation).
    """
    for _ in range(n_iter):
        w = gram_step(apply, v)
        norm = torch.linalg.vector_norm(w)
        usable = torch.isfinite(norm) & (norm > 0)
        v = torch.where(usable, w / torch.where(usable, norm, 1.0), v)
    return v.detach()


def rayleigh_norm(apply: LinearFn, v: Tensor) -> Tensor:
    """``||A v||`` for a unit ``v``: differentiable w.r.t. the weights inside ``apply``; a lower bound of sigma_1."""
    return torch.linalg.vector_norm(apply(v))


def power_method(linear_fn: LinearFn, example_input: Tensor, n_iter: int = 100, v0: Tensor | None = None,
                 affine: bool = True) -> tuple[Tensor, Tensor]:
    """Paper Alg. 2, standalone: ``(sigma, v)`` with ``sigma = ||A v|| ~ sigma_1(A)`` and ``v`` the right singular
    vector estimate, for the map ``A`` that ``linear_fn`` applies to tensors shaped like ``example_input`` (all
    dimensions, batch included, form the vector space).

    ``affine=True`` drops a constant offset (a bias): the map used is ``A v = f(v) - f(0)``. ``sigma`` carries
    gradients to the parameters ``linear_fn`` closes over. It approaches ``sigma_1`` from below.
    """
    if affine:
        with torch.no_grad():
            offset = linear_fn(torch.zeros_like(example_input))
        apply: LinearFn = lambda v: linear_fn(v) - offset  # noqa: E731
    else:
        apply = linear_fn
    if v0 is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
        v0 = torch.randn(example_input.shape, generator=generator, dtype=example_input.dtype)
    v = power_iterations(apply, normalized(v0.to(example_input)), n_iter)
    return rayleigh_norm(apply, v), v
