"""The warm state of an estimator: one power vector per operator that needs the power method, as a buffer.

As ``spectral_norm``'s ``u``, each vector ``v`` is a buffer of the module that owns it (named
:func:`~lipreg.bounds.naming.buffer_name` ``("power", node)``, so ``state_dict`` keys name the operator), updated in
place under ``torch.no_grad()``, saved with the module and moved by ``.to()``. :class:`PowerVectors` draws them,
iterates them (warm power steps, :func:`~lipreg.linalg.power.rayleigh_norms_and_step`, giving ``||A v||``) and
converges them (Golub-Kahan-Lanczos, :func:`~lipreg.linalg.krylov.lanczos_top_singular`);
:func:`converge` solves them with SeqLip's and LipLT's warm state; :func:`rebuild_keeping_warm_state` carries
every buffer whose name and shape still fit across a re-trace.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .bounds.naming import buffer_name
from .capture.graph import LipNode
from .linalg.krylov import lanczos_top_singular, vjp_adjoint
from .linalg.power import normalized, power_steps, rayleigh_norms_and_step
from .operator import Operators
from .progress import progress as _progress
from .tracing import Structure

WARM_TOL = 1e-2
"""The residual to which :meth:`LipschitzEstimator.warm_start` solves each operator."""
WARM_MAX_ITER = 100
"""The most products by each operator in :meth:`LipschitzEstimator.warm_start`."""


class PowerVectors:
    """The power vectors of ``owner`` (an ``nn.Module``, which registers them as its buffers), one per operator,
    in the order they were drawn."""

    def __init__(self, owner: nn.Module) -> None:
        self._owner = owner
        self.names: dict[LipNode, str] = {}

    def reset(self, nodes: Iterable[LipNode], generator: torch.Generator, dtype: torch.dtype) -> None:
        """Drop every vector, then draw one for each of ``nodes`` (of its input's shape, unit norm, from
        ``generator``, in ``dtype``)."""
        for name in self.names.values():
            delattr(self._owner, name)
        self.names = {}
        with torch.no_grad():
            for node in nodes:
                v0 = torch.randn(node.in_shape, generator=generator, dtype=dtype)
                self.names[node] = buffer_name("power", node.name)
                self._owner.register_buffer(self.names[node], normalized(v0))

    @property
    def nodes(self) -> list[LipNode]:
        """The operators that have a vector (the ones iterated)."""
        return list(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def vector(self, node: LipNode) -> Tensor:
        return self._owner.get_buffer(self.names[node])

    def norms(self, operators: Operators, n_iter: int) -> dict[LipNode, Tensor]:
        """Every iterated operator's ``||A v||`` after ``n_iter`` warm power steps, the last one sharing its forward
        pass with the returned norm (differentiable w.r.t. the weights); the vectors advance in place."""
        nodes = self.nodes
        applies = [operators[node].matvec for node in nodes]
        adjoints = [operators[node].rmatvec if operators[node].explicit_adjoint else None for node in nodes]
        buffers = [self.vector(node) for node in nodes]
        if n_iter > 1:
            with torch.no_grad():
                for node, buffer in zip(nodes, buffers):
                    buffer.copy_(power_steps(operators[node].gram, buffer, n_iter - 1))
        sigmas, vs = rayleigh_norms_and_step(applies, buffers, step=n_iter > 0, adjoints=adjoints)
        with torch.no_grad():
            for buffer, v in zip(buffers, vs):
                buffer.copy_(v)
        return dict(zip(nodes, sigmas))

    def converge(self, operators: Operators, tol: float, max_iter: int, show: bool = False) -> None:
        """Replace each vector by its operator's top right singular vector, by Golub-Kahan-Lanczos from it, to the
        residual ``tol`` or ``max_iter`` products (``show``: a progress bar over the operators)."""
        for node in _progress(self.nodes, show, "converge"):
            operator, buffer = operators[node], self.vector(node)
            # the explicit adjoint where every op has one; else one recorded autograd graph, replayed per step
            rmatvec = operator.rmatvec if operator.explicit_adjoint else vjp_adjoint(operator.matvec, buffer)
            top = lanczos_top_singular(operator.matvec, rmatvec, buffer, tol, max_iter)
            buffer.copy_(top.v)


def converge(power: PowerVectors, structure: Structure, operators: Operators, tol: float, max_iter: int,
             show: bool = False) -> None:
    """Every warm vector to its operator's top singular vector (:meth:`PowerVectors.converge`), and SeqLip's
    subspaces or LipLT's product vectors likewise, to the residual ``tol`` or ``max_iter`` products each."""
    power.converge(operators, tol, max_iter, show)
    if structure.seqlip is not None:
        structure.seqlip.converge(operators, tol, max_iter)
    if structure.liplt is not None:
        structure.liplt.converge(operators, tol, max_iter)


def rebuild_keeping_warm_state(module: nn.Module, rebuild: Callable[[], None], restore: Callable[[], None]) -> bool:
    """Run ``rebuild`` (which redraws ``module``'s warm state), then load back every entry of the old ``state_dict``
    whose name and shape are unchanged; whether the rebuilt module has entries that were not kept (new operators,
    to warm). If ``rebuild`` raises, ``restore`` rebuilds the old module and its whole state is loaded back: never a
    half-built module."""
    warm = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    try:
        rebuild()
    except Exception:
        restore()
        module.load_state_dict(warm)
        raise
    fresh = module.state_dict()
    kept = {name: tensor for name, tensor in warm.items() if name in fresh and fresh[name].shape == tensor.shape}
    module.load_state_dict(kept, strict=False)
    return kept.keys() != fresh.keys()
