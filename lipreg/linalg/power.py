"""The power method through autograd (paper Alg. 2): ``sigma_1(A)`` of a linear map given as a function.

For a linear ``A``, ``g(v) = 1/2 ||A v||^2`` has gradient ``A^T A v``: one backward pass applies ``A^T A`` with no
matrix formed, whatever ``A`` is (dense, convolution with any padding, pooling, a fused chain of them).
Iterating ``v <- A^T A v / ||A^T A v||`` converges to the top right singular vector at the rate
``(sigma_2 / sigma_1)^2``, and ``||A v||`` (with ``||v|| = 1``) to ``sigma_1`` **from below**: a power-method value
is an *estimate*, never a certificate (see :mod:`lipreg.linalg.certify` for certified bounds).

Gradients: the iterations run without grad on the current weights; the returned ``||A v||`` is computed with
grad at the fixed ``v``. At convergence this is the Danskin gradient ``d sigma_1 / dA = u v^T``; away from it, the
gradient of the lower estimate ``||A v||`` (as ``torch.nn.utils.parametrizations.spectral_norm`` does).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

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
    """``n_iter`` steps of ``v <- A^T A v / ||A^T A v||`` from ``v``, ``A^T A v`` by :func:`gram_step`."""
    return power_steps(lambda x: gram_step(apply, x), v, n_iter)


def power_steps(gram: LinearFn, v: Tensor, n_iter: int, start_dim: int = 0) -> Tensor:
    """``n_iter`` steps of ``v <- G v / ||G v||`` from ``v`` for ``G = gram`` (``A^T A``, however it is applied),
    ``v`` normalised over its dimensions from ``start_dim`` on (``start_dim=1``: one iteration per sample).

    A step that would give a zero or non-finite vector (zero or NaN weights) keeps the previous vector, so the
    warm state is never poisoned (:func:`normalized_or_kept`: no host synchronisation).
    """
    for _ in range(n_iter):
        v = normalized_or_kept(gram(v), v, start_dim)
    return v.detach()


def normalized_or_kept(w: Tensor, v: Tensor, start_dim: int = 0) -> Tensor:
    """``w / ||w||`` (the norm over the dimensions from ``start_dim`` on), or ``v`` wherever that norm is zero or
    not finite (chosen with ``torch.where``: no host synchronisation)."""
    norm = torch.linalg.vector_norm(w, dim=tuple(range(start_dim, w.dim())), keepdim=True)
    return torch.where(_usable(norm), w / norm, v)


def _usable(norm: Tensor) -> Tensor:
    """Where a norm can divide: positive and finite (False for NaN too; cheaper than isfinite on the hot path)."""
    return (norm > 0) & (norm < math.inf)


def converged(residual: Tensor, sigma: Tensor, tol: float) -> bool:
    """The stopping test of every iteration here: ``||A^T u - sigma v|| <= tol * sigma`` for the estimated top
    singular triple ``(sigma, u, v)`` (unit ``u``, ``v``, ``A v = sigma u``). Elementwise for several triples: all
    must pass. Needs the host (a Python ``bool``).

    What it guarantees about the value: ``v`` is a Rayleigh-Ritz vector of ``A^T A`` with residual
    ``sigma r``, so by the Kato-Temple inequality ``sigma_1^2 - sigma^2 <= sigma^2 r^2 / (sigma^2 - sigma_2^2)``,
    and ``sigma_1 / sigma - 1 <= tol / 2`` whenever the relative gap ``1 - sigma_2^2 / sigma^2`` is at least
    ``tol`` (a smaller gap puts ``sigma_2`` within ``tol`` of ``sigma_1``: the iterations then test such a cluster
    jointly). No estimate of ``sigma_2`` is needed, and none is used: the next Ritz value is at most ``sigma_2``,
    so a test on the gap it shows can stop early, far from ``sigma_1`` on the dense spectra of convolutions. The
    test also bounds the error of ``v`` (by ``tol sigma / (sigma_1 - sigma_2)``, Wedin's theorem), which a stalled
    ``sigma`` does not. The value stays an estimate **from below**: ``sigma`` is at most ``sigma_1``, and the
    residual measures its distance to *a* singular value, ``sigma_1`` unless the start vector is numerically
    orthogonal to the top singular vector."""
    return bool((residual <= tol * sigma).all())


def ritz_residuals(apply: LinearFn, vs: Tensor) -> tuple[Tensor, Tensor]:
    """For a block of unit right singular vector estimates ``v_i`` (the rows of ``vs``, ``(k, *in)``, mapped by
    ``apply`` to ``(k, *out)``): ``sigma_i = ||A v_i||`` and the residuals ``||A^T u_i - sigma_i v_i||`` with
    ``u_i = A v_i / sigma_i``, by one forward and one backward pass (for :func:`converged`)."""
    with torch.enable_grad():
        x = vs.detach().requires_grad_(True)
        out = apply(x)
        (at_u,) = torch.autograd.grad(out, x, grad_outputs=out.detach())  # A^T A v_i = sigma_i A^T u_i
    sigmas = torch.linalg.vector_norm(out.detach().reshape(len(vs), -1), dim=1)
    per_row = (-1,) + (1,) * (vs.dim() - 1)
    residuals = torch.linalg.vector_norm((at_u / sigmas.reshape(per_row) - sigmas.reshape(per_row) * vs)
                                         .reshape(len(vs), -1), dim=1)
    return sigmas, residuals.detach()


def _all_normalized_or_kept(ws: list[Tensor], vs: list[Tensor]) -> list[Tensor]:
    """:func:`normalized_or_kept` for several vectors, their norms taken in one call."""
    norms = torch.stack(torch._foreach_norm(ws))
    usable = _usable(norms)  # one test for all the vectors
    return [torch.where(ok, w / norm, v) for w, v, norm, ok in zip(ws, vs, norms.unbind(), usable.unbind())]


def rayleigh_norms_and_step(applies: Sequence[LinearFn], vs: Sequence[Tensor], step: bool = True,
                            adjoints: Sequence[LinearFn | None] | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """``sigma_i = ||A_i v_i||`` for several operators, differentiable w.r.t. their weights, and from the same
    forward passes one more power step ``v_i <- A_i^T A_i v_i / ||A_i^T A_i v_i||`` for all of them. This is how a
    training step pays for the bound: one forward per operator and one ``A_i^T``, as ``spectral_norm`` pays one
    ``W v`` and ``W^T u``. ``adjoints[i]`` applies ``A_i^T`` explicitly (no grad); the operators without one
    (``None``, or no ``adjoints``) take ``A_i^T A_i v_i`` from a single joint backward call (the graph is kept
    for the caller's own backward). The returned sigmas belong to the vectors given (one step behind the updated
    ones); under ``torch.no_grad`` they come back detached."""
    grad_enabled = torch.is_grad_enabled()
    adjoints = list(adjoints) if adjoints is not None else [None] * len(applies)
    with torch.no_grad():  # copies: the caller may update its vectors in place before its backward
        vs = [v.clone() for v in vs]
    with torch.enable_grad():
        vs = [v.requires_grad_(step and adjoint is None) for v, adjoint in zip(vs, adjoints)]
        outs = [apply(v) for apply, v in zip(applies, vs)]
        sigmas = [torch.linalg.vector_norm(out) for out in outs]
    if step and vs:
        ata_vs = _gram_of_outputs(outs, vs, adjoints, retain_graph=grad_enabled)
        vs = _all_normalized_or_kept(ata_vs, [v.detach() for v in vs])
    if not grad_enabled:
        sigmas = [sigma.detach() for sigma in sigmas]
    return sigmas, [v.detach() if v.requires_grad else v for v in vs]


def _gram_of_outputs(outs: list[Tensor], vs: list[Tensor], adjoints: list[LinearFn | None],
                     retain_graph: bool) -> list[Tensor]:
    """``A_i^T (A_i v_i)`` from the outputs ``A_i v_i``: by the explicit adjoint where given, and for the others
    by one joint backward to the ``v_i`` (which then require grad)."""
    auto = [i for i, adjoint in enumerate(adjoints) if adjoint is None]
    grams: list[Tensor | None] = [None] * len(outs)
    if auto:
        with torch.enable_grad():
            found = torch.autograd.grad([outs[i] for i in auto], [vs[i] for i in auto],
                                        grad_outputs=[outs[i].detach() for i in auto], retain_graph=retain_graph)
        for i, gram in zip(auto, found):
            grams[i] = gram
    with torch.no_grad():  # no graph is built from the outputs here
        for i, adjoint in enumerate(adjoints):
            if adjoint is not None:
                grams[i] = adjoint(outs[i])
    return grams  # type: ignore[return-value]


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
