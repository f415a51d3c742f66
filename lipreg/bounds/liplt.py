r"""LipLT (Fazlyab, Entesari, Roy & Chellappa, NeurIPS 2023, "Certified robustness via dynamic margin maximization
and improved Lipschitz regularization", arXiv:2310.00116): chains bounded by norms of products of consecutive
operators. The labels (L1)-(L3) are this module's own: the paper's equation, theorem and algorithm numbers could
not be read from its text when this was written, so none is quoted (the paper derives the same loop transformation
and unrolled recursion). (L3) is what the authors' code computes for ReLU (``alpha_i = beta_i = 1/2``):
``SequentialLipltLipschitz.calculateSubNetsImprovedLipschitz`` in ``Networks/NetworkModels.py`` of
https://github.com/o4lc/CRM-LipLT.

**The bound.** On a chain ``A_0 -> rho_0 -> A_1 -> ... -> A_{K-1}`` (:mod:`lipreg.bounds.seqlip.chains`), each
activation has slopes in ``[a_i, b_i]``; write it (the loop transformation)

    ``rho_i(z) = alpha_i z + beta_i psi_i(z)``,  ``alpha_i = (a_i + b_i) / 2``,  ``beta_i = (b_i - a_i) / 2``,

so that ``psi_i = (rho_i - alpha_i id) / beta_i`` has slopes in ``[-1, 1]``: it is 1-Lipschitz (L1; for ``a_i = b_i``, ``beta_i = 0`` and ``psi_i`` drops out). With ``z_k`` the
output of ``A_k`` and ``P(j, k) = A_k A_{k-1} ... A_j``, unrolling ``z_k = A_k rho_{k-1}(z_{k-1})`` gives
(L2)

    ``z_k = (prod_{i<k} alpha_i) P(0, k) x + sum_{j=1..k} beta_{j-1} (prod_{j<=i<k} alpha_i) P(j, k) psi_{j-1}(z_{j-1})``,

and the triangle inequality, with ``Lip(psi) <= 1``, the recursion (L3)

    ``L_k = |prod_{i<k} alpha_i| ||P(0, k)|| + sum_{j=1..k} beta_{j-1} |prod_{j<=i<k} alpha_i| ||P(j, k)|| L_{j-1}``,
    ``L_0 = ||A_0||``,

a bound on ``Lip(z_k)``; ``L_{K-1}`` bounds the chain. It needs the norms of the ``K (K + 1) / 2`` products of
consecutive operators only (:func:`unrolled_bound`). By sub-multiplicativity each ``||P(j, k)||`` is at most the product of
its factors' norms, and then ``L_{K-1}`` is at most the AutoLip product ``prod_i ||A_i|| max(|a_i|, |b_i|)`` (because
``|alpha_i| + beta_i = max(|a_i|, |b_i|)``); the certificate also takes the min with that product outright.

**Per pair** (:func:`pair_bounds`). When the chain's last activation feeds a linear head ``H``, the logit gap of the
pair ``c = e_y - e_j`` is ``c^T H rho(z_{K-1})``: the same recursion one step further, with the exact rows
``c^T H P(j, K-1)`` in place of the products' norms (their Euclidean norms, by transposed passes).

**Training value** (:class:`LipLT`): each product's norm by warm power iteration, one step per call like AutoLip,
differentiable (an estimate from below, not a certificate). **Certificate** (:func:`certified_products`): the norm
of each product certified from float64 weights: the exact norm of its dense float64 matrix when the policy allows
that size (:meth:`BoundPolicy.dense_node <lipreg.BoundPolicy.dense_node>`) plus an explicit bound on the rounding of that matrix
(:func:`product_rounding`), else (and always as a candidate) the best split ``min_m ||P(j, m)|| ||P(m + 1, k)||``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..capture.graph import LipNode
from ..linalg.certify import arithmetic_margin, certified_cast, dense_matrix, dense_spectral_bound
from ..linalg.krylov import lanczos_top_singular, vjp_adjoint
from ..linalg.power import gram_step, normalized, power_steps, rayleigh_norms_and_step
from ..operator import LinearOperator, Operators
from ..policy import BoundPolicy
from .naming import buffer_name
from .seqlip.chains import Chain

Span = tuple[int, int]
"""``(j, k)``: the product ``P(j, k) = A_k ... A_j`` of a chain's operators ``j..k``."""
_U = torch.finfo(torch.float64).eps / 2  # unit roundoff of float64


def loop_coefficients(slopes: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """``(|alpha_i|, beta_i)`` of (L1) for each slope interval ``[a_i, b_i]`` (``|alpha| + beta = max(|a|, |b|)``).
    They are rounded upwards (one float64 operation each), so the recursion built on them stays an upper bound."""
    up = 1.0 + arithmetic_margin(2)
    return [abs(a + b) / 2 * up for a, b in slopes], [(b - a) / 2 * up for a, b in slopes]


def unrolled_bound(norm: Callable[[int, int], Tensor], slopes: Sequence[tuple[float, float]],
                   last: Callable[[int], Tensor] | None = None) -> Tensor:
    """``L_{K-1}`` of (L3) for a chain of ``K = len(slopes) + 1`` operators, ``norm(j, k)`` bounding
    ``||P(j, k)||``; with ``last``, one more step through a final operator whose ``j``-th product norm is
    ``last(j)`` (``j = 0..K``, a tensor of any shape: one value per head row pair), after an activation of slopes
    ``slopes[-1]`` (then ``slopes`` has ``K`` entries)."""
    alphas, betas = loop_coefficients(slopes)
    n_ops = len(slopes) + 1
    bounds: list[Tensor] = []
    for k in range(n_ops):
        value = (last if last is not None and k == n_ops - 1 else (lambda j, k=k: norm(j, k)))
        total = math.prod(alphas[:k]) * value(0)
        for j in range(1, k + 1):
            total = total + betas[j - 1] * math.prod(alphas[j:k]) * value(j) * bounds[j - 1]
        bounds.append(total)
    return bounds[-1]


def spans(n_ops: int) -> list[Span]:
    """Every product ``(j, k)``, ``0 <= j <= k < n_ops``."""
    return [(j, k) for k in range(n_ops) for j in range(k + 1)]


def autolip_chain(norm: Callable[[int, int], Tensor], slopes: Sequence[tuple[float, float]]) -> Tensor:
    """The AutoLip product ``prod_i ||A_i|| prod_i max(|a_i|, |b_i|)`` of a chain (what LipLT never exceeds)."""
    gains = math.prod(max(abs(a), abs(b)) for a, b in slopes)
    return gains * torch.stack([norm(i, i) for i in range(len(slopes) + 1)]).prod()


def chain_operator(operators: Sequence[LinearOperator], j: int, k: int, block: bool = False) -> Callable:
    """``v -> A_k ... A_j v`` on a vector (batch of one), or on a block ``(n, *in_shape[1:])`` with ``block``."""
    def apply(v: Tensor) -> Tensor:
        for op in operators[j:k + 1]:
            v = op.matmat(v) if block else op.matvec(v)
        return v
    return apply


def chain_adjoint(operators: Sequence[LinearOperator], j: int, k: int) -> Callable | None:
    """``u -> A_j^T ... A_k^T u`` (no grad) when every operator has an explicit adjoint, else ``None``."""
    if not all(op.explicit_adjoint for op in operators[j:k + 1]):
        return None

    def apply(u: Tensor) -> Tensor:
        for op in reversed(operators[j:k + 1]):
            u = op.rmatvec(u)
        return u
    return apply


# --------------------------------------------------------------------------- certificate
def rounding_gains(operators: Sequence[LinearOperator]) -> list[float]:
    """``g_i`` of :func:`product_rounding` for each operator."""
    gains = []
    for op in operators:
        n_in, n_out = op.in_shape.numel(), op.out_shape.numel()
        gains.append(_gamma(len(op.node.ops) * (n_in + n_out)) * math.sqrt(min(n_in, n_out)))
    return gains


def product_rounding(operators: Sequence[LinearOperator], norms: Sequence[Tensor]) -> Tensor:
    """An upper bound on ``||P^ - P||_2`` for the float64 matrix ``P^`` of a product of operators computed by applying
    them in turn to a basis (or their adjoints in reverse order). Each application is ``fl(A v) = (A + E) v`` with
    ``|E| <= gamma_n |A|`` entrywise (inner products of at most ``n`` terms, ``gamma_n = n u / (1 - n u)``; ``n``
    counts ``n_in + n_out`` per op of the node, which covers the forward and the transposed passes), and
    ``|| |A| ||_2 <= ||A||_F <= sqrt(min(n_in, n_out)) ||A||_2``, so
    ``||P^ - P|| <= prod_i ||A_i|| (1 + g_i) - prod_i ||A_i||`` with ``g_i = gamma_n sqrt(min(n_in, n_out))``
    (:func:`rounding_gains`), given ``norms[i] >= ||A_i||``."""
    gains = rounding_gains(operators)
    total = torch.stack(list(norms)).prod()
    return total * (math.prod(1 + g for g in gains) - 1) * (1 + arithmetic_margin(2 * len(gains) + 2))


def _gamma(n: int) -> float:
    """``gamma_n = n u / (1 - n u)``: the relative error of ``n`` float64 operations in a row."""
    return n * _U / (1 - n * _U)


def certified_products(operators64: Sequence[LinearOperator], policy: BoundPolicy,
                       norms: Sequence[Tensor] | None = None) -> dict[Span, Tensor]:
    """A certified upper bound (float64) on ``||P(j, k)||`` for every product of the chain: the operator's own
    certificate for ``j = k`` (``norms``, when the caller has them already); for longer products the min of the
    best split ``||P(j, m)|| ||P(m + 1, k)||`` and, when the policy certifies a map of that size from its dense
    matrix (:meth:`~lipreg.BoundPolicy.dense_node`), the exact norm of the dense float64 product plus
    :func:`product_rounding` (a product of convolutions is a convolution: its matrix is formed whole)."""
    n = len(operators64)
    own = [op.certified_norm(policy) for op in operators64] if norms is None else list(norms)
    certs: dict[Span, Tensor] = {(i, i): own[i] for i in range(n)}
    exact_max_dim = policy.exact_eig_max_dim(operators64[0].device.type)
    for length in range(2, n + 1):
        for j in range(n - length + 1):
            k = j + length - 1
            value = torch.stack([certs[(j, m)] * certs[(m + 1, k)] for m in range(j, k)]).min()
            value = certified_cast(value, torch.float64, arithmetic_margin(1))
            if policy.dense_node(operators64[j].in_shape.numel(), operators64[k].out_shape.numel()):
                matrix = dense_matrix(chain_operator(operators64, j, k, block=True), operators64[j].in_shape[1:],
                                      operators64[j].device, torch.float64)
                slack = product_rounding(operators64[j:k + 1], [certs[(i, i)] for i in range(j, k + 1)])
                dense = certified_cast(dense_spectral_bound(matrix, exact_max_dim=exact_max_dim) + slack,
                                       torch.float64, arithmetic_margin(1))
                value = torch.minimum(value, dense)
            certs[(j, k)] = value
    return certs


def certified_chain(operators64: Sequence[LinearOperator], slopes: Sequence[tuple[float, float]],
                    policy: BoundPolicy, norms: Sequence[Tensor] | None = None) -> Tensor:
    """The certified LipLT bound of one chain (float64, rounded upwards), never above its AutoLip product;
    ``norms``: the operators' own certificates, when the caller has them already."""
    certs = certified_products(operators64, policy, norms)
    norm = lambda j, k: certs[(j, k)]  # noqa: E731
    bound = torch.minimum(unrolled_bound(norm, slopes), autolip_chain(norm, slopes))
    n_ops = len(operators64) ** 2 * 3 + 4  # products, sums and min of (L3)
    return certified_cast(bound, torch.float64, arithmetic_margin(n_ops))


# --------------------------------------------------------------------------- per pair
def head_rows(operators: Sequence[LinearOperator], rows: Tensor) -> list[Tensor]:
    """``[r P(0, K-1), r P(1, K-1), ..., r]`` for a block of rows ``r`` ``(m, n_out of A_{K-1})``, each ``(m, n_in of
    A_j)``: exact rows by transposed passes (one backward of each operator on a block of ``m`` zero probes, whose
    gradients are the rows), differentiable w.r.t. the weights and ``rows`` under grad."""
    out = [rows]
    track = torch.is_grad_enabled()
    for op in reversed(operators):
        with torch.enable_grad():
            probe = torch.zeros(rows.shape[0], *op.in_shape[1:], dtype=rows.dtype, device=rows.device,
                                requires_grad=True)
            image = op.matmat(probe).reshape(rows.shape[0], op.out_shape.numel())
            (back,) = torch.autograd.grad(image, probe, out[0], create_graph=track)
        out.insert(0, back.reshape(rows.shape[0], op.in_shape.numel()))
    return out


def pair_differences(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, i, j)``: the rows ``w_i - w_j`` of a head ``W`` ``(C, n)`` for ``i < j``."""
    i, j = torch.triu_indices(weight.shape[0], weight.shape[0], offset=1, device=weight.device)
    return weight[i] - weight[j], i, j


def row_norms(operators: Sequence[LinearOperator], weight: Tensor, i: Tensor, j: Tensor) -> list[Tensor]:
    """``||(w_i - w_j)^T P(m, K-1)||`` for ``m = 0..K-1``, then ``||w_i - w_j||``, one per pair, differentiable: the
    ``C`` rows of ``W P(m, K-1)`` by transposed passes (:func:`head_rows`, ``C`` passes instead of ``C (C - 1) / 2``),
    then their differences."""
    return [torch.linalg.vector_norm(r[i] - r[j], dim=1) for r in head_rows(operators, weight)]


def pair_bounds(norm: Callable[[int, int], Tensor], operators: Sequence[LinearOperator],
                slopes: Sequence[tuple[float, float]], weight: Tensor, rounding: bool = False) -> Tensor:
    """Per-pair LipLT constants ``(C, C)`` (0 on the diagonal) of ``c^T W rho_{K-1}(z_{K-1})`` for a chain of
    ``K = len(operators)`` operators followed by an activation of slopes ``slopes[-1]`` and the head ``W``: (L3)
    with the last step's norms the exact row norms ``||c^T W P(j, K-1)||`` (:func:`head_rows`).

    With ``rounding=True`` (float64 certificates; ``norm(i, i) >= ||A_i||``), each row norm is raised by a bound on
    its rounding: ``fl(w_y - w_j)`` is within ``u`` of each entry, the transposed passes follow the model of
    :func:`product_rounding`, so ``||r^_j - r_j|| <= ||r_K|| prod_{m>=j} ||A_m|| ((1 + u) prod_{m>=j} (1 + g_m) - 1)``
    with ``||r_K|| <= (1 + 2u) ||r^_K||``, and the computed norm of a vector of ``n`` entries is within ``gamma_{n+1}``
    (relative) of the norm of the computed vector."""
    rows, i, j = pair_differences(weight)
    if not rounding:
        norms = row_norms(operators, weight, i, j)
    else:  # the differences first: their rounding is the one bounded below
        passes = head_rows(operators, rows)
        norms = [torch.linalg.vector_norm(r, dim=1) for r in passes]
        norms = [n * (1 + _gamma(r.shape[1] + 1)) for n, r in zip(norms, passes)]
        head = norms[-1] * (1 + 2 * _U)
        gains = rounding_gains(operators)
        for start in range(len(operators)):
            factors = torch.stack([norm(m, m) for m in range(start, len(operators))]).prod()
            growth = (1 + _U) * math.prod(1 + g for g in gains[start:]) - 1
            norms[start] = norms[start] + head * factors * growth
        norms = [certified_cast(n, torch.float64, arithmetic_margin(2 * len(operators) + 6)) for n in norms]
    values = unrolled_bound(norm, slopes, last=lambda m: norms[m])
    out = torch.zeros(weight.shape[0], weight.shape[0], dtype=values.dtype, device=values.device)
    return out.index_put((i, j), values).index_put((j, i), values)


# --------------------------------------------------------------------------- training value
class LipLT(nn.Module):
    """The warm LipLT bounds of the chains of a graph (:func:`~lipreg.bounds.seqlip.chains.find_chains`; used by
    ``LipschitzEstimator(method="liplt")``): one power vector per product
    ``P(j, k)`` of every chain (buffers ``liplt_<first>_<last>``, so ``state_dict`` restores them), one
    Rayleigh step per call (:func:`~lipreg.linalg.power.rayleigh_norms_and_step`: differentiable, an estimate).

    ``forward(operators, n_iter)`` returns ``{last node: (first node, chain bound)}`` for
    :func:`~lipreg.bounds.autolip.autolip_bound`; :meth:`last_norms` the product norms of the last call.
    """

    def __init__(self, chains: Sequence[Chain], dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.dtype = dtype
        self.chains = list(chains)
        self._buffers_of: dict[tuple[int, Span], str] = {}
        taken: set[str] = set()
        for c, chain in enumerate(self.chains):
            for j, k in spans(len(chain.ops)):
                name = buffer_name("liplt", f"{chain.ops[j].name}~{chain.ops[k].name}", taken)
                v0 = torch.randn(chain.ops[j].in_shape, generator=generator, dtype=dtype)
                self.register_buffer(name, normalized(v0))
                self._buffers_of[(c, (j, k))] = name
        self._last: dict[tuple[int, Span], Tensor] = {}

    @property
    def endpoints(self) -> dict[LipNode, LipNode]:
        """``{last operator: first operator}`` of every chain."""
        return {chain.ops[-1]: chain.ops[0] for chain in self.chains}

    def last_norms(self, index: int) -> Callable[[int, int], Tensor]:
        """``norm(j, k)`` of chain ``index`` from the last call (with grad)."""
        return lambda j, k: self._last[(index, (j, k))]

    def forward(self, operators: Operators, n_iter: int = 1) -> dict[LipNode, tuple[LipNode, Tensor]]:
        keys = list(self._buffers_of)
        ops = {c: [operators[node] for node in chain.ops] for c, chain in enumerate(self.chains)}
        applies = [chain_operator(ops[c], j, k) for c, (j, k) in keys]
        adjoints = [chain_adjoint(ops[c], j, k) for c, (j, k) in keys]
        buffers = [self.get_buffer(self._buffers_of[key]) for key in keys]
        if n_iter > 1:
            with torch.no_grad():
                for apply, adjoint, buffer in zip(applies, adjoints, buffers):
                    gram = (lambda v, a=apply, b=adjoint: b(a(v))) if adjoint is not None else \
                        (lambda v, a=apply: gram_step(a, v))
                    buffer.copy_(power_steps(gram, buffer, n_iter - 1))
        sigmas, vs = rayleigh_norms_and_step(applies, buffers, step=n_iter > 0, adjoints=adjoints)
        with torch.no_grad():
            for buffer, v in zip(buffers, vs):
                buffer.copy_(v)
        self._last = dict(zip(keys, sigmas))
        out = {}
        for c, chain in enumerate(self.chains):
            norm = self.last_norms(c)
            bound = torch.minimum(unrolled_bound(norm, chain.slopes), autolip_chain(norm, chain.slopes))
            out[chain.ops[-1]] = (chain.ops[0], bound)
        return out

    @torch.no_grad()
    def converge(self, operators: Operators, tol: float = 1e-6, max_iter: int = 2000) -> None:
        """Iterate every product's vector to its top right singular vector (Golub-Kahan-Lanczos,
        :func:`~lipreg.linalg.krylov.lanczos_top_singular`, as ``LipschitzEstimator.converge`` does per operator)."""
        for (c, (j, k)), name in self._buffers_of.items():
            ops = [operators[node] for node in self.chains[c].ops]
            apply, buffer = chain_operator(ops, j, k), self.get_buffer(name)
            adjoint = chain_adjoint(ops, j, k) or vjp_adjoint(apply, buffer)
            buffer.copy_(lanczos_top_singular(apply, adjoint, buffer, tol, max_iter).v)

    def pair_factors(self) -> dict[str, Tensor]:
        """``{"A_j~A_k": ||P(j, k) v||}`` of every product of every chain, from the last call (detached)."""
        return {f"{self.chains[c].ops[j].name}~{self.chains[c].ops[k].name}": value.detach()
                for (c, (j, k)), value in self._last.items() if j < k}
