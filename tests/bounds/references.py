"""Independent references for the chain certificates, written without lipreg: brute force over activation patterns
(every vertex of the slope box, where the convex ``||W_K D ... W_0||`` takes its max) and local Jacobian norms."""
from __future__ import annotations

import itertools

import torch
from torch import nn

DT = torch.float64


def mlp(widths: list[int], act=nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).to(DT).eval()


def weights(model: nn.Sequential) -> list[torch.Tensor]:
    return [m.weight.detach().to(DT) for m in model if isinstance(m, nn.Linear)]


def vertex_max(Ws: list[torch.Tensor], lo: float = 0.0, hi: float = 1.0, rows: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``max_D ||R W_K D_K ... D_1 W_0||`` over every vertex pattern (``D_i`` diagonal with entries in
    ``{lo, hi}``): the spectral norm (a scalar), or with ``rows`` one max per row of ``R`` (each row's norm)."""
    widths = [W.shape[0] for W in Ws[:-1]]
    best = None
    for bits in itertools.product([lo, hi], repeat=sum(widths)):
        J, at = Ws[0], 0
        for W, n in zip(Ws[1:], widths):
            J = W @ torch.diag(torch.tensor(bits[at:at + n], dtype=DT)) @ J
            at += n
        value = torch.linalg.matrix_norm(J, 2) if rows is None else torch.linalg.vector_norm(rows @ J, dim=1)
        best = value if best is None else torch.maximum(best, value)
    return best


def local_max(model: nn.Module, n_in: int, n: int = 300, seed: int = 0, rows: torch.Tensor | None = None
              ) -> torch.Tensor:
    """The largest local Jacobian norm over ``n`` random inputs (a lower bound on the Lipschitz constant), or per
    row of ``rows`` applied to the output."""
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(n):
        x = torch.randn(1, n_in, dtype=DT, generator=generator) * 3
        J = torch.func.jacrev(lambda v: model(v))(x).reshape(-1, n_in)
        value = torch.linalg.matrix_norm(J, 2) if rows is None else torch.linalg.vector_norm(rows @ J, dim=1)
        best = value if best is None else torch.maximum(best, value)
    return best.detach()


def pair_rows(n_classes: int) -> torch.Tensor:
    """``e_i - e_j`` for ``i < j`` (the order of ``torch.triu_indices``)."""
    i, j = torch.triu_indices(n_classes, n_classes, offset=1)
    eye = torch.eye(n_classes, dtype=DT)
    return eye[i] - eye[j]
