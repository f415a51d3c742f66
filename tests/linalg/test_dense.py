"""``lipreg.linalg.dense.verified_sigma``: the Cholesky-verified top singular value of large Gram matrices, against
``eigvalsh`` (the exact reference), on spectra that are hard for its Lanczos estimate (clustered or repeated top
eigenvalues), with its gradient."""
from __future__ import annotations

import pytest
import torch

from lipreg.linalg import dense
from lipreg.linalg.dense import sigma_from_gram64, verified_sigma

F64 = torch.float64


def _gram_with_spectrum(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    return (q * eigenvalues) @ q.T


SPECTRA = {
    "spread": lambda n: torch.linspace(0, 1, n, dtype=F64) ** 3,
    "repeated top": lambda n: torch.cat([torch.linspace(0, 1, n - 5, dtype=F64), torch.full((5,), 2.0, dtype=F64)]),
    "clustered top": lambda n: torch.cat([torch.linspace(0, 1.999, n - 1, dtype=F64), torch.tensor([2.0], dtype=F64)]),
    "tiny": lambda n: torch.linspace(0, 1, n, dtype=F64) * 1e-200,
}


@pytest.mark.parametrize("name", list(SPECTRA))
def test_verified_sigma_is_an_upper_bound_within_its_slack(name):
    n = 300
    torch.manual_seed(0)
    gram = _gram_with_spectrum(SPECTRA[name](n), seed=1)
    exact = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())
    bound = float(verified_sigma(gram)) if name != "tiny" else float(sigma_from_gram64(gram))  # tiny: scaled first
    assert exact <= bound <= exact * (1 + 1e-3) + 1e-150


def test_verified_sigma_is_used_beyond_its_side_and_differentiable(monkeypatch):
    monkeypatch.setattr(dense, "VERIFIED_SIDE", 100)
    n = 101
    w = torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    sigma = sigma_from_gram64(w.T @ w)
    (grad,) = torch.autograd.grad(sigma, w)
    exact = torch.linalg.matrix_norm(w.detach(), 2)
    assert exact <= sigma.detach() <= exact * (1 + 1e-3)
    assert torch.isfinite(grad).all() and grad.norm() > 0.5  # d sigma / d W = u v^T, of unit norm
