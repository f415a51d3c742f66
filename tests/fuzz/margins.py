"""The per-pair margin check of the soundness fuzz: ``MarginCertificate(model, x, method=...).certified()[i, j]``
must be >= ``max_x ||(e_i - e_j)^T J(x)||``, the float64 ``torch.func.jacrev`` Jacobian ``J`` of the logits at
random points (every pair's own lower bound: ``Lip(z_i - z_j) >= ||grad (z_i - z_j)(x)||`` at every ``x`` where
it is differentiable)."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import Tensor, nn

import lipreg

from .reference import DENSE_LIMIT, no_derivative

SCALES = (0.3, 1.0, 3.0, 10.0)


def pair_lower_bounds(model: nn.Module, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """``(C, C)``: the largest ``||J_i(x) - J_j(x)||`` over a few random points ``x`` of ``shape`` (one sample)."""
    ref = copy.deepcopy(model).to(dtype).eval()
    f: Callable[[Tensor], Tensor] = lambda v: ref(v.unsqueeze(0).clone()).squeeze(0)
    best = None
    for scale in SCALES:
        for _ in range(2):
            x = torch.randn(shape, dtype=dtype) * scale
            jac = torch.func.jacrev(f)(x)
            jac = jac.reshape(jac.shape[0], -1)
            diff = (jac[:, None, :] - jac[None, :, :]).norm(dim=-1)
            best = diff if best is None else torch.maximum(best, diff)
    assert best is not None
    return best


def fits(out_shape: torch.Size, in_numel: int) -> bool:
    """Whether a model's output is class logits ``(B, C)``, ``2 <= C <= 10``, with a Jacobian small enough to form."""
    return len(out_shape) == 2 and 2 <= out_shape[1] <= 10 and out_shape[1] * in_numel <= DENSE_LIMIT


def check(run: Any, method: str) -> None:
    """Build ``MarginCertificate(model, x, method=method)`` for the case of ``run`` (a
    :class:`tests.fuzz.soundness.CaseRun`) and compare each pair's certified constant with its lower bound; a
    refusal is clean, any other exception a crash."""
    case = run.case
    try:
        with torch.no_grad():
            out = case.model(case.x.clone())
    except Exception:  # noqa: BLE001 (a model that does not run: the estimators have said so)
        return
    if not fits(out.shape, case.x[0].numel()):
        return
    options = {"search": "exact"} if method == "seqlip" else {}
    try:
        certificate = lipreg.MarginCertificate(case.model, case.x, method=method, dtype=case.dtype, fuse=case.fuse,
                                               **options)
        K = certificate.certified()
    except Exception as err:  # noqa: BLE001 (every exception is classified)
        if isinstance(err, lipreg.UnsupportedOpError):
            run.refused = True
        elif not (isinstance(err, ValueError) and "out of reach" in str(err)):
            run.crash(f"MarginCertificate(method={method!r}).certified()", err)
        return
    try:
        lower = pair_lower_bounds(case.model, case.x.shape[1:], run.ref_dtype)
    except RuntimeError as err:  # an op without a derivative: no Jacobian to compare with
        if not no_derivative(err):
            raise
        return
    worst = int(torch.argmin(K.to(lower.dtype) - lower * (1 - run.rtol)))
    i, j = divmod(worst, lower.shape[0])
    run.compare(f"MarginCertificate(method={method!r}, pairwise={certificate.pairwise}, "
                f"certificate={certificate.certificate!r}).certified()[{i}, {j}]", float(K[i, j]), float(lower[i, j]),
                run.rtol)
