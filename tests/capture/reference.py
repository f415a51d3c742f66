"""The independent exact reference of the capture tests: the largest spectral norm of the float64 ``jacrev``
Jacobian of the eager model over a few inputs (the Lipschitz constant of a linear model, a lower bound of any other
one), and the same for the logit differences ``z_y - z_j`` of a classifier."""
from __future__ import annotations

import torch
from torch import Tensor, nn

DT = torch.float64


def inputs(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> Tensor:
    """``n`` float64 samples of per-sample ``shape``, spread over a few scales."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, n, dtype=DT).view(-1, *[1] * len(shape))
    return torch.randn(n, *shape, generator=generator, dtype=DT) * scales


def jacobians(model: nn.Module, xs: Tensor) -> list[Tensor]:
    """The ``(outputs, inputs)`` Jacobian of the eager model (eval mode) at each sample."""
    model.eval()
    return [torch.func.jacrev(lambda v: model(v.unsqueeze(0)).squeeze(0))(x).detach().reshape(-1, x.numel())
            for x in xs]


def exact_lipschitz(model: nn.Module, xs: Tensor) -> float:
    """``max_x ||J(x)||_2`` over the samples ``xs`` (float64 SVD)."""
    return max(float(torch.linalg.matrix_norm(j.to(DT), 2)) for j in jacobians(model, xs))


def exact_pair_constants(model: nn.Module, xs: Tensor) -> Tensor:
    """``max_x ||grad (z_y - z_j)(x)||_2`` for every pair of classes, ``(C, C)``: what a margin constant ``K_yj``
    must not be below."""
    best = None
    for j in jacobians(model, xs):
        j = j.to(DT)
        pairs = torch.linalg.vector_norm(j[:, None, :] - j[None, :, :], dim=-1)
        best = pairs if best is None else torch.maximum(best, pairs)
    return best
