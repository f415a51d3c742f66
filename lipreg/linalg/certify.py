"""Every certified-norm decision of lipreg: the certificate of one (fused) linear node, ``A = A_m ... A_1``.

This module and what it imports (:mod:`.routes`, :mod:`.conv`, :mod:`.dense`) are what a review of soundness
audits. Rules only describe their ops (:mod:`.maps`: a weight and its geometry, a diagonal multiplier, an
isometry, a closed-form norm, entries of one sign); :meth:`lipreg.operator.LinearOperator.certified_norm` hands
those facts here and gets a float64 number ``>= sigma_1(A)``.

Numerics (:mod:`.dense`). Everything is computed from the weights in float64 (complex128 in the Fourier domain),
each matrix scaled by a power of two first (no underflow or overflow of squares), and multiplied by ``1 + 1e-6``,
which dominates the float64 rounding of these computations (<= 1e-12 relative), then rounded upwards; closed forms
get :func:`arithmetic_margin` of their few operations. NaN (inf) weights give a NaN (inf) bound, never an error.
The top eigenvalue of a Gram matrix ``G`` is ``eigvalsh``'s; beyond 1024-square, a ``t = lambda (1 + s)`` above
the Lanczos estimate ``lambda`` proved ``>= lambda_max(G)`` by a floating-point Cholesky factorisation of
``t I - G`` shifted by Rump's rounding bound (``dense.verified_sigma``; ``s <= 1e-3``, ``eigvalsh`` otherwise).

Routes, in the order :func:`certified_node_norm` tries them, and why each is an upper bound:

1. **Isometries** (reshapes, dropout at eval, permutations) have norm 1; a node of isometries and one op with a
   closed form (a diagonal ``max |m|``) has that norm, exactly.
2. **One weighted op** (a linear layer or convolution, with only diagonal ops and numel-keeping reshapes around
   it): the diagonal maps ``v -> m * v`` whose ``m`` is constant off the op's channel axis are per-channel gains,
   ``diag(after) A diag(before)`` is again a convolution / linear map whose weight has the gains folded in
   (:func:`~.routes.fold_channel_gains`): one operator, one certificate, no product of norms. The channel axis is
   read from the op's real input rank (axis 0 of an unbatched ``(C, *spatial)`` convolution input), and a
   multiplier that varies along any other axis is not folded.
   **A chain of channel mixings** (linear layers, or 1x1 convolutions padded with zeros or not, any stride and
   groups, with per-channel gains between them: mobilenet's projection followed by the next block's expansion) is
   ``S (x) M``, ``M`` the product of their channel matrices and gains, ``S`` a selection of pixels (``||S|| <= 1``):
   its norm is at most ``||M||_2``, exactly it without padding (no product of norms).
3. **Dense matrix** of the whole node when it is small or thin (``BoundPolicy.dense_node``): the matrix is built
   from the node's action on the identity basis of its smaller side, and ``sigma_1`` is the square root of the top
   eigenvalue of its Gram matrix (``eigvalsh``, exact), or on accelerators beyond their solver's size the Gram
   iteration ``sigma_1 <= ||G_t||_F^(1/2^t)``, an upper bound at every step.
4. **Product of segments** (sub-multiplicativity ``||A_m ... A_1|| <= prod ||A_i||``): one segment per weighted
   op with its foldable gains, one per remaining non-isometric op (its closed form, or the Schur test).

The routes of a weighted op (:func:`~.routes.weighted_norm`):

* **Linear** ``W``: ``sigma_1(W)`` of the float64 matrix, exact (``eigvalsh``) or by Gram iteration.
* **1x1 convolution** (zero padding or none), any stride, groups, transposition: each output pixel is ``W_g``
  applied to at most one input pixel (or to zero padding), and each input pixel is read by at most one output
  pixel, so up to a permutation the operator is a row and column selection of ``I (x) blockdiag(W_g)``: its norm
  is at most ``max_g ||W_g||_2`` (a row subset of the stride-1 map when the stride drops pixels), with equality
  when some output pixel reads a real input pixel (always without padding).
* **Convolution, dense per group** (:func:`~.conv.dense_route`: a group's block small enough, e.g. 3x3 convs of
  64 channels on 8x8 maps, any conv on 1x1 to 4x4 maps, depthwise convs on maps up to 32x32): a grouped conv is block-diagonal over its
  groups, so its norm is the max of the groups' norms; each block is formed exactly from the kernel (its Gram
  matrix from the kernel's channel correlations when cheaper), and its norm computed as a dense matrix.
* **Convolution, FFT**: the conv (padding by zeros, reflect, replicate or circular, any stride, dilation) is a
  submatrix of a polyphase circular convolution on a grid of at least ``n + extent - 1`` points per axis, composed
  with the padding map ``P`` of a non-zeros mode (``||P|| = sqrt(max copies)``, exact); the circular conv is
  block-diagonalised by the DFT (Sedghi et al. 2019), so its norm is the max over frequencies and groups of small
  blocks' ``sigma_1``. A submatrix has at most the norm of the matrix. The padding used is the one torch applies
  (a module of a non-zeros mode pads with its ``_reversed_padding_repeated_twice``).
* **Transposed convolution**: the adjoint of the conv with the same weight and geometry (equal norms).

The Schur test of an op whose entries all have one sign (average pools, means, sums): ``||A||_2 <=
sqrt(max_i (|A| 1)_i max_j (|A|^T 1)_j)``, and with one sign ``|A| 1 = |A 1|``, ``|A|^T 1 = |A^T 1|``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..policy import BoundPolicy
from .dense import (arithmetic_margin, certified_cast, dense_matrix, dense_spectral_bound, gram_spectral_bound,
                    is_exact, sigma_from_gram64, spectral_norm64)
from .maps import OneSignMap, WeightedMap
from .routes import channel_gains, channel_matrix, fold_channel_gains, weighted_norm

__all__ = [
    "MissingCertificate", "OpFacts", "arithmetic_margin", "certified_cast", "certified_node_norm", "dense_matrix",
    "dense_spectral_bound", "fold_channel_gains", "gram_spectral_bound", "is_exact", "schur_bound",
    "sigma_from_gram64", "spectral_norm64",
]

CLOSED_FORM_MARGIN = arithmetic_margin(8)
"""Closed forms (``max_c |gamma_c| / sqrt(var_c + eps)``, ``max |c|``) take a few correctly rounded float64 steps."""


@dataclass(frozen=True)
class OpFacts:
    """What the certificate knows of one op of a node, as its rule describes it (in float64)."""

    name: str
    in_shape: torch.Size
    out_shape: torch.Size
    isometry: bool = False
    pointwise: bool = False
    """``v -> +-v`` (a pointwise identity): per-channel gains fold across it."""
    multiplier: Tensor | None = None
    """For a diagonal op ``v -> m * v``, ``m`` (broadcastable to ``out_shape``)."""
    closed_form: Tensor | None = None
    """The op's exact norm, when its rule knows it."""
    structure: WeightedMap | OneSignMap | None = None


class MissingCertificate(LookupError):
    """An op of a node too large to form densely has no certificate of its own; ``op`` is its :class:`OpFacts`."""

    def __init__(self, op: OpFacts) -> None:
        super().__init__(op.name)
        self.op = op


def certified_node_norm(ops: Sequence[OpFacts], n_in: int, n_out: int, dense: Callable[[], Tensor],
                        policy: BoundPolicy, device: torch.device) -> Tensor:
    """A float64 upper bound on ``sigma_1`` of the node ``A = A_m ... A_1`` (``n_out x n_in``; ``dense()`` builds
    its matrix), by the routes of the module docstring, in that order."""
    rest = [op for op in ops if not op.isometry]
    if not rest:
        return torch.ones((), dtype=torch.float64, device=device)
    if len(rest) == 1 and rest[0].closed_form is not None:
        return certified_cast(rest[0].closed_form.to(device, torch.float64), torch.float64, CLOSED_FORM_MARGIN)
    chain = _channel_chain(ops, policy)
    if chain is not None:
        return chain
    dense_node = policy.dense_node(n_in, n_out)
    exact_max_dim = policy.exact_eig_max_dim(device.type)
    if dense_node and not _one_weighted_op(ops):
        return dense_spectral_bound(dense(), exact_max_dim=exact_max_dim)
    segments = _segments(ops, policy)
    if len(segments) == 1 and segments[0][1]:
        return segments[0][0]
    if dense_node:
        return dense_spectral_bound(dense(), exact_max_dim=exact_max_dim)
    return torch.stack([norm.to(device) for norm, _ in segments]).prod()


def schur_bound(op: OneSignMap) -> Tensor:
    """The Schur test of an op whose entries all have one sign, from one application of ``A`` and ``A^T`` to
    ones (module docstring), in float64, rounded upwards."""
    ones = torch.ones(op.in_shape, dtype=torch.float64, device=op.device, requires_grad=True)
    with torch.enable_grad():
        out = op.apply(ones)
        (column_sums,) = torch.autograd.grad(out, ones, torch.ones_like(out))
    return certified_cast(torch.sqrt(out.detach().abs().max() * column_sums.abs().max()), torch.float64)


def _channel_chain(ops: Sequence[OpFacts], policy: BoundPolicy) -> Tensor | None:
    """Route 2 for chains: a node of linear layers / 1x1 convolutions (zero padding, any stride) on one channel axis, with
    per-channel gains and pointwise identities between them, is ``S (x) M`` for the product ``M`` of their channel
    matrices and gains, ``S`` a selection of pixels (rows of an identity: ``||S|| <= 1``, ``= 1`` without
    padding): its norm is at most ``||M||_2``, exactly it without padding. ``None`` when the node is not such a
    chain (or has fewer than two weighted ops: route 2 covers one)."""
    weighted = [op.structure for op in ops if isinstance(op.structure, WeightedMap)]
    if len(weighted) < 2 or len({(w.channel_axis, len(w.in_shape), w.conv is None) for w in weighted}) != 1:
        return None
    axis, product = weighted[0].channel_axis, None
    for op in ops:
        if op.pointwise:
            continue
        if isinstance(op.structure, WeightedMap):
            matrix = channel_matrix(op.structure)
            if matrix is None or (product is not None and matrix.shape[1] != product.shape[0]):
                return None
            product = matrix if product is None else matrix @ product
            continue
        channels = product.shape[0] if product is not None else _channels(weighted[0])[0]
        gains = None if op.multiplier is None else channel_gains(op.multiplier, op.out_shape, axis, channels)
        if gains is None:
            return None
        gains = gains.to(torch.float64)
        product = torch.diag(gains) if product is None else gains[:, None] * product
    return certified_cast(spectral_norm64(product, 10, policy.exact_eig_max_dim(product.device.type)), torch.float64)


def _one_weighted_op(ops: Sequence[OpFacts]) -> bool:
    """One weighted op, and around it only diagonal ops and numel-keeping reshapes (route 2)."""
    if sum(isinstance(op.structure, WeightedMap) for op in ops) != 1:
        return False
    return all(isinstance(op.structure, WeightedMap) or op.multiplier is not None
               or (op.isometry and op.in_shape.numel() == op.out_shape.numel()) for op in ops)


def _segments(ops: Sequence[OpFacts], policy: BoundPolicy) -> list[tuple[Tensor, bool]]:
    """Certified float64 norms whose product bounds the node, each with whether it is exact: one per weighted op
    with the diagonal ops around it folded in, one per remaining non-isometric op."""
    folded: set[int] = set()
    segments = []
    for k, op in enumerate(ops):
        if not isinstance(op.structure, WeightedMap):
            continue
        weighted = op.structure
        channels_in, channels_out = _channels(weighted)
        before = _fold(weighted, ops, range(k - 1, -1, -1), channels_in, folded)
        after = _fold(weighted, ops, range(k + 1, len(ops)), channels_out, folded)
        segments.append(weighted_norm(weighted, before, after, policy))
        folded.add(k)
    for k, op in enumerate(ops):
        if k in folded or op.isometry:
            continue
        if op.closed_form is not None:
            segments.append((certified_cast(op.closed_form.to(torch.float64), torch.float64), True))
        elif isinstance(op.structure, OneSignMap):
            segments.append((schur_bound(op.structure), False))
        else:
            raise MissingCertificate(op)
    return segments


def _channels(op: WeightedMap) -> tuple[int, int]:
    """The input and output channel counts of a weighted op, from its weight's layout."""
    a, b = op.weight.shape[:2]
    if op.conv is None:
        return b, a
    groups = op.conv.groups
    return (a, b * groups) if op.conv.transposed else (b * groups, a)


def _fold(weighted: WeightedMap, ops: Sequence[OpFacts], order: range, channels: int,
          folded: set[int]) -> Tensor | None:
    """The per-channel gains of the diagonal ops met walking ``order`` away from a weighted op (across pointwise
    identities, up to the first other op), marked ``folded``; ``None`` if there are none. A diagonal op folds when
    its multiplier is constant off the weighted op's channel axis, read from the tensor's real rank."""
    gains, taken = None, []
    for k in order:
        op = ops[k]
        if op.pointwise:
            continue
        g = (None if op.multiplier is None or k in folded or len(op.out_shape) != len(weighted.in_shape) else
             channel_gains(op.multiplier, op.out_shape, weighted.channel_axis, channels))
        if g is None:
            break
        gains, taken = (g if gains is None else gains * g), [*taken, k]
    folded.update(taken)
    return gains
