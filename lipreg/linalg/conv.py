"""Certified, differentiable upper bounds on the operator norm of the linear part (no bias) of torch's
convolutions and transposed convolutions: the FFT bound of a circular embedding (Sedghi et al.), and the exact norm
of the dense matrix when the operator is small.  Numerics (float64, margin, upward rounding) as in
:mod:`lipreg.linalg.dense`.

References: Sedghi, Gupta & Long, "The singular values of convolutional layers" (ICLR 2019);
Delattre, Barthelemy & Allauzen, "Spectral norm of convolutional layers with circular and zero paddings" (2024).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..policy import BoundPolicy
from .conv_layer import ConvLayer, layer_geometry
from .dense import certified_cast, dense_matrix, is_exact, scaled, sigma_from_gram64, spectral_norm64

__all__ = ["conv_certificate", "conv_spectral_bound", "dense_route"]

@dataclass(frozen=True)
class _AxisPlan:
    """How one spatial axis of a stride-s, dilation-d conv is embedded in a circular one.

    The conv restricted to this axis is (up to a unitary shift, and possibly after a padding map
    of norm ``pad_norm``) a submatrix of the stride-``phases`` circular cross-correlation on a
    grid of ``grid`` points (``phases`` divides ``grid``).
    """

    grid: int
    phases: int
    pad_norm: float


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad_norm(n: int, left: int, right: int, mode: str) -> float:
    """Exact norm of torch's 1-d ``mode`` padding map R^n -> R^(n+left+right).

    Each padded entry copies one input entry, so P^T P = diag(copies) and ||P|| = sqrt(max copies).
    The copies are counted by padding an index vector with ``F.pad`` itself (so torch's exact
    semantics and its validity checks apply).
    """
    index = torch.arange(n, dtype=torch.float64).view(1, 1, n)
    padded = F.pad(index, (left, right), mode=mode).view(-1).long()
    return math.sqrt(torch.bincount(padded, minlength=n).max().item())


def _axis_plan(n: int, k: int, stride: int, dilation: int, pad: tuple[int, int], mode: str) -> _AxisPlan:
    """Circular embedding of one axis of a (non-transposed) conv on an input of length n.

    Let K = dilation*(k-1)+1 (effective extent), (l, r) the padding, M = n+l+r.
    * zeros: output row j reads input i with offset e = i - j + l; only rows touching the input
      matter, for which e ranges over [max(K-n-r, 1-n), min(l+n-1, n+K-2)].  On a circular grid of
      N >= max(K, n + min(max(l, r), K-1)) points no offset wraps onto a kernel tap, rows and
      columns stay distinct mod N, so the conv is a submatrix of the circular conv (for any such
      N).  Stride keeps every s-th row: choosing s | N makes them rows of the stride-s circular conv.
    * circular with l + r <= K-1: the output rows j < n+l+r-K+1 <= n are rows of the circular conv
      on the input's own grid n, with the kernel shifted by l (a unitary shift) and taps folded
      mod n; exact when l + r = K-1 (and s | n).  If s does not divide n the stride is dropped
      (a row subset of the stride-1 circular conv).
    * otherwise (reflect, replicate, larger circular padding): conv = valid_conv o P with P the
      padding map; ||conv|| <= ||P|| * ||valid conv on M||, the latter on grid N = M (rounded to s).
    """
    extent = dilation * (k - 1) + 1
    left, right = pad
    if mode == "zeros":
        return _AxisPlan(_round_up(max(extent, n + min(max(left, right), extent - 1)), stride), stride, 1.0)
    if mode == "circular" and left + right <= extent - 1 and max(left, right) <= n:
        return _AxisPlan(n, stride if n % stride == 0 else 1, 1.0)
    return _AxisPlan(_round_up(n + left + right, stride), stride, _pad_norm(n, left, right, mode))


def _kernel_on_grid(w: Tensor, axis: int, k: int, dilation: int, grid: int) -> Tensor:
    """Place the k taps of ``w`` along ``axis`` at positions dilation*a mod ``grid`` (zeros
    elsewhere), summing taps that land on the same point (only in the exact circular case).
    Done as a product with a k x grid 0/1 placement matrix: one small matmul, differentiable."""
    positions = (torch.arange(k, device=w.device) * dilation) % grid
    placement = torch.zeros(k, grid, dtype=w.dtype, device=w.device)
    placement[torch.arange(k, device=w.device), positions] = 1.0
    return (w.movedim(axis, -1) @ placement).movedim(-1, axis)


def _fourier_bound64(w: Tensor, groups: int, dilation: Sequence[int], plans: Sequence[_AxisPlan]) -> Tensor:
    """Bound from the circular embedding, in float64, no margin.

    Stride-s circular cross-correlation on a grid of N = L*s points, in polyphase form:
    y[t] = sum_r sum_u w_r[(u - t) mod L] x_r[u] with x_r[u] = x[s*u + r], w_r[v] = w[s*v + r].
    The unitary DFT on L points block-diagonalises it: at frequency omega the block is the
    c_out x (c_in * s) matrix [conj(W_0(omega)) ... conj(W_{s-1}(omega))], W_r the (unnormalised)
    DFT of w_r; in d dims the phases multiply.  So the norm is the max over frequencies (and over
    groups: a grouped conv is block-diagonal) of those blocks' sigma_1.  For real w, frequency
    -omega gives the conjugate block, so a real FFT along the last axis suffices.
    """
    dims = len(plans)
    c_out, c_in = w.shape[0] // groups, w.shape[1]
    kernel = w.unflatten(0, (groups, c_out))  # (g, co, ci, k_1, ..., k_d)
    for i, plan in enumerate(plans):
        kernel = _kernel_on_grid(kernel, 3 + i, w.shape[2 + i], dilation[i], plan.grid)
    # grid index v*s + r -> (v, r); then phases before the (contiguous, last) frequency axes
    split = [size for plan in plans for size in (plan.grid // plan.phases, plan.phases)]
    kernel = kernel.reshape(groups, c_out, c_in, *split)
    kernel = kernel.permute(0, 1, 2, *(4 + 2 * i for i in range(dims)), *(3 + 2 * i for i in range(dims)))
    spectrum = torch.fft.rfftn(kernel, dim=list(range(3 + dims, 3 + 2 * dims)))  # (g, co, ci, s.., F..)
    blocks = spectrum.permute(0, *range(3 + dims, 3 + 2 * dims), 1, 2, *range(3, 3 + dims))
    blocks = blocks.reshape(-1, c_out, c_in * math.prod(plan.phases for plan in plans))
    return spectral_norm64(blocks, n_iter=10, exact_max_dim=None).max() * math.prod(plan.pad_norm for plan in plans)


def conv_spectral_bound(
    weight: Tensor,
    input_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: int | Sequence[int] = 0,
    *,
    dense_max_entries: int = BoundPolicy.conv_dense_entries,
) -> Tensor:
    """Certified upper bound on the operator norm of the linear part (no bias) of torch's
    conv{1,2,3}d / conv_transpose{1,2,3}d with these hyper-parameters, on inputs of spatial shape
    ``input_shape`` (no batch, no channel dims).

    ``weight`` has torch's layout: (c_out, c_in/groups, *k) for conv, (c_in, c_out/groups, *k) for
    transposed.  ``padding`` may be an int, a tuple, or 'same'/'valid' (conv only, as in torch).

    Math (Sedghi et al. 2019; Delattre et al. 2024):
    * The conv is embedded, axis by axis (see ``_axis_plan``), as a submatrix of a (strided,
      polyphase) circular conv, possibly composed with the padding map P of a reflect /
      replicate / circular padding (||P|| = sqrt(max copies of an input entry), exact); the
      circular conv's norm is computed exactly in the Fourier domain (``_fourier_bound64``).
      Circular padding with 'same' output and stride 1 (or a stride dividing the size): exact.
      Zero padding: the circular symbol's max overshoots the finite (Toeplitz) operator's norm by
      O(1/n^2); measured for random 3x3 kernels, stride 1, padding 1: 2-5% at 8x8, 0.2-2% at
      16x16 (fewer channels and padding 0 are looser), 0.1-0.6% at 32x32; stride 2 is as tight
      (polyphase blocks, no loss from the stride).  Reflect / replicate: up to ||P|| = 2 (2-d,
      padding 1) looser.
    * groups: block-diagonal operator, norm = max over groups.
    * transposed conv: the adjoint of the conv with the same weight, stride, padding, dilation and
      groups, mapping the transposed conv's output shape (which includes ``output_padding``) to
      its input shape; adjoints have equal norms.  When output_padding >= stride (allowed if
      dilation > stride) the transposed conv is a column-submatrix of that adjoint: still a bound.
    * Per group (a grouped or depthwise conv is block-diagonal, so the route is decided on one
      group's block, see :func:`dense_route`): when one group's block has at most
      ``dense_max_entries`` entries, the dense blocks are also formed (from the kernel slices:
      ``_dense_blocks``) and their sigma_1 computed as in ``dense_spectral_bound`` (the max over
      the groups); when that is exact (always on CPU) it is returned alone, else the minimum of the
      two certified bounds.  This removes the circular embedding's slack on small maps (a 3x3
      kernel on 1x1 .. 8x8) and on depthwise convs.  The Gram matrix on the smaller side is formed
      from the kernel's channel correlations when that is cheaper (``_kernel_gram``); the eigvalsh
      of that min(rows, cols)-square matrix then dominates.  Set it to 0 to use the Fourier bound only.
    * ``padding`` may also be a tuple of (left, right) pairs, one per axis.
    * The weight is scaled by a power of two before any product (``scaled``: no underflow or
      overflow of its squares); a NaN (inf) weight gives a NaN (inf) bound.

    Returns:
        A 0-dim tensor in the weight's dtype; float64 inside, times (1 + 1e-6), rounded upwards.
    """
    return conv_certificate(weight, input_shape, stride, padding, dilation, groups, padding_mode, transposed,
                            output_padding, dense_max_entries=dense_max_entries)[0]


def conv_certificate(
    weight: Tensor,
    input_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: int | Sequence[int] = 0,
    *,
    dense_max_entries: int = BoundPolicy.conv_dense_entries,
) -> tuple[Tensor, bool]:
    """:func:`conv_spectral_bound`, and whether it is the exact norm (its dense route, exactly solved)."""
    geometry = layer_geometry(
        weight, input_shape, stride, padding, dilation, groups, padding_mode, transposed, output_padding
    )
    w64 = weight.to(torch.float64)
    c_in, c_out = w64.shape[1] * groups, w64.shape[0]  # of the non-transposed conv
    # (output, input) pixels and channels of the layer itself, and one group's block
    pixels = (math.prod(geometry.conv_in if transposed else geometry.conv_out), math.prod(geometry.input_shape))
    channels = (c_in, c_out) if transposed else (c_out, c_in)
    block = (channels[0] // groups * pixels[0], channels[1] // groups * pixels[1])
    dense = dense_route(block, groups, dense_max_entries)
    layer = ConvLayer(w64, geometry, padding, groups, padding_mode, transposed, output_padding)
    bound64 = scaled(lambda w: _conv_norm64(layer.scaled(w), pixels, block, dense), w64, dims=w64.dim())
    return certified_cast(bound64, weight.dtype), dense and is_exact(block, weight.device)


def dense_route(block: tuple[int, int], groups: int, dense_max_entries: float) -> bool:
    """Whether the ``groups`` diagonal blocks of ``block = (rows, columns)`` entries each are certified from their
    dense matrices: when each block has at most ``dense_max_entries`` entries (so its Gram matrix too), and the
    eigensolves of all groups together cost at most one of the largest size (``groups side^3 <=
    dense_max_entries^1.5``, ``side`` the smaller of ``rows`` and ``columns``)."""
    side = min(block)
    return block[0] * block[1] <= dense_max_entries and groups * side**3 <= dense_max_entries**1.5


def _conv_norm64(layer: ConvLayer, pixels: tuple[int, int], block: tuple[int, int], dense: bool) -> Tensor:
    """:func:`conv_spectral_bound` of a layer with a float64 weight (already scaled), no margin."""
    w64, geometry = layer.w64, layer.geometry
    plans = [
        _axis_plan(n, k, s, d, p, layer.padding_mode)
        for n, k, s, d, p in zip(geometry.conv_in, w64.shape[2:], geometry.stride, geometry.dilation, geometry.pad)
    ]
    if not dense:
        return _fourier_bound64(w64, layer.groups, geometry.dilation, plans)
    if is_exact(block, w64.device):  # the Fourier bound, an upper bound of the same operator, cannot be tighter
        kernel_gram = _kernel_gram(layer, pixels, block)
        if kernel_gram is not None:
            return sigma_from_gram64(kernel_gram).max()
        return spectral_norm64(_dense_blocks(layer), 10, None).max()
    bound = spectral_norm64(_dense_blocks(layer), 10, None).max()
    return torch.minimum(bound, _fourier_bound64(w64, layer.groups, geometry.dilation, plans))


def _kernel_gram(layer: ConvLayer, pixels: tuple[int, int], block: tuple[int, int]) -> Tensor | None:
    """The Gram matrices of the layer's ``groups`` blocks on their smaller side, from the kernel's channel
    correlations; ``None`` when building the blocks and their Gram products is cheaper.

    Each block is ``A[o, p; i, q] = sum_k w[o, i, k] S_k[p, q]``, ``S_k`` the single-channel layer with only tap
    ``k`` (a ``P x Q`` pixel map).  So, on the input side, ``(A^T A)[i, q; j, r] = sum_{k, l} C[i, k; j, l]
    (S_k^T S_l)[q, r]`` with ``C[i, k; j, l] = sum_o w[o, i, k] w[o, j, l]`` (on the output side, ``A A^T`` alike
    with the roles of ``(i, q)`` and ``(o, p)`` swapped): ``K^2`` pixel products and a channel correlation
    instead of a product over all ``c_out P`` rows, cheaper whenever ``K^2 < c_out P`` (3x3 kernels on small
    images, many channels).  ``block`` is ``(rows, columns)`` of one block, ``pixels`` = ``(P, Q)`` of the layer.
    """
    w64, groups, transposed, geometry = layer.w64, layer.groups, layer.transposed, layer.geometry
    a, b = w64.shape[:2]
    taps = math.prod(w64.shape[2:])
    weights = (w64.view(groups, a // groups, b, taps).transpose(1, 2) if transposed
               else w64.view(groups, a // groups, b, taps))  # (group, o, i, k)
    input_side = block[1] <= block[0]
    (side, side_pixels), (other, other_pixels) = (((block[1], pixels[1]), (block[0], pixels[0])) if input_side
                                                  else ((block[0], pixels[0]), (block[1], pixels[1])))
    channels, other_channels = side // side_pixels, other // other_pixels
    direct = groups * (side * other * taps + side**2 * other)  # the bank on the pixel basis, then the Gram product
    correlations, pixel_products = groups * channels**2 * taps**2, taps**2 * side_pixels**2
    via_kernel = pixel_products * other_pixels + correlations * other_channels + groups * side**2 * taps**2
    if via_kernel >= direct or max(correlations, pixel_products) > groups * side * other:  # slower, or larger
        return None
    shape = (taps, 1, *w64.shape[2:]) if not transposed else (1, taps, *w64.shape[2:])
    one_hot = torch.eye(taps, dtype=w64.dtype, device=w64.device).view(shape)
    op = layer.op(one_hot, groups=1)
    maps = dense_matrix(op, (1, *geometry.input_shape), w64.device).view(taps, pixels[0], pixels[1])  # S_k[p, q]
    if input_side:
        correlation = torch.einsum("goik,gojl->gikjl", weights, weights)
        gram = torch.einsum("gikjl,klqr->giqjr", correlation, torch.einsum("kpq,lpr->klqr", maps, maps))
    else:
        correlation = torch.einsum("goik,gmil->gokml", weights, weights)
        gram = torch.einsum("gokml,klps->gopms", correlation, torch.einsum("kpq,lsq->klps", maps, maps))
    return gram.reshape(groups, side, side)


def _dense_blocks(layer: ConvLayer) -> Tensor:
    """The transposes of the layer's ``groups`` diagonal blocks, up to a permutation of their rows (which keeps the
    singular values): ``(groups, Q * c_in/groups, c_out/groups * P)`` for ``Q`` / ``P`` input / output pixels, rows
    ordered (input pixel, input channel), columns (output channel, output pixel).

    The entries of input channel ``i`` and output channel ``o`` are ``S(w[o, i])``, the single-channel layer with
    kernel ``w[o, i]`` (same stride, padding, dilation): so all of them come from one single-channel layer with
    ``c_out * c_in / groups`` output channels (a bank of every kernel slice, ordered (group, i, o)) applied to the
    pixel basis (:func:`~lipreg.linalg.certify.dense_matrix`), about ``c_in / groups`` times fewer operations than
    the layer on the full identity basis; for one group the result is a view of the bank's output, no copy.
    """
    w64, groups, transposed, geometry = layer.w64, layer.groups, layer.transposed, layer.geometry
    a, b = w64.shape[:2]  # conv: (c_out, c_in/g); transposed: (c_in, c_out/g), already ordered (group, i, o)
    kernel = w64.shape[2:]
    if transposed:
        c_in, c_out, bank = a // groups, b, w64.reshape(1, a * b, *kernel)
    else:
        c_in, c_out = b, a // groups
        bank = w64.view(groups, c_out, c_in, *kernel).transpose(1, 2).reshape(a * b, 1, *kernel)
    op = layer.op(bank, groups=1)
    slices = dense_matrix(op, (1, *geometry.input_shape), w64.device)  # (a * b * P, Q), rows (group, i, o, p)
    pixels_out, pixels_in = slices.shape[0] // (a * b), slices.shape[1]
    slices = slices.view(groups, c_in, c_out, pixels_out, pixels_in).permute(0, 4, 1, 2, 3)
    return slices.reshape(groups, pixels_in * c_in, c_out * pixels_out)
