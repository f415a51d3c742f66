"""Float64 lower bounds of the true Lipschitz constant, independent of lipreg, for the soundness fuzz.

For ``f`` Lipschitz and differentiable almost everywhere, ``L(f) = sup_x ||J_f(x)||_2`` (Rademacher; Scaman &
Virmaux 2018, Thm. 1), and ``L(f) >= ||f(x) - f(y)|| / ||x - y||`` for every pair. Each value below is one
of these: the spectral norm of a ``torch.func.jacrev`` Jacobian (or a power-iteration lower estimate of it for
large operators) at random points and after gradient ascent on it, and finite-pair ratios along lines (jumps of
discontinuous ops) and for single-entry spikes (max pooling attains its constant on a spike). Each finite-pair
ratio is lowered by a bound on its rounding error, so it stays a lower bound in floating point.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, fx

Fn = Callable[[Tensor], Tensor]
DENSE_LIMIT = 40_000
"""Jacobians with at most this many entries are formed (full SVD); larger ones are power-iterated."""


def no_derivative(err: RuntimeError) -> bool:
    """Whether autograd has no derivative (or no second derivative) for an op (``native_channel_shuffle``...), or
    refuses an in-place write to a tensor it saved or to a view of a multi-output op (``split(x)[i].relu_()``)."""
    return any(message in str(err) for message in ("is not implemented", "modified by an inplace operation",
                                                   "is being modified inplace"))


def jacobian_norm(f: Fn, x: Tensor, n_iter: int = 12, affine: bool = False) -> float:
    """``||J_f(x)||_2`` for one sample ``x`` (exact up to rounding when formed, a lower estimate otherwise). An
    ``affine`` ``f`` that autograd cannot differentiate has its matrix formed from ``f(e_i) - f(0)`` instead."""
    out_numel = f(x).numel()
    if out_numel * x.numel() <= DENSE_LIMIT:
        try:
            jac = torch.func.jacrev(f)(x).reshape(out_numel, x.numel())
        except RuntimeError as err:
            if not (affine and no_derivative(err)):
                raise
            basis = torch.eye(x.numel(), dtype=x.dtype).reshape(-1, *x.shape)
            zero = f(torch.zeros_like(x)).reshape(-1)
            jac = torch.stack([f(e).reshape(-1) - zero for e in basis], dim=1)
        return float(torch.linalg.matrix_norm(jac, 2))
    v = torch.randn_like(x)
    v = v / v.norm()
    sigma = 0.0
    _, vjp = torch.func.vjp(f, x)
    for _ in range(n_iter):
        jv = torch.func.jvp(f, (x,), (v,))[1]
        sigma = max(sigma, float(jv.norm()))
        (w,) = vjp(jv)
        if float(w.norm()) == 0:
            break
        v = w / w.norm()
    return sigma


def ascend(f: Fn, x: Tensor, steps: int = 4, lr: float = 0.5) -> float:
    """The best ``||J_f||`` met along a few normalised gradient-ascent steps from ``x`` (smooth ``f``)."""
    out_numel = f(x).numel()
    if out_numel * x.numel() > DENSE_LIMIT:
        return 0.0

    def sigma(point: Tensor) -> Tensor:
        return torch.linalg.svdvals(torch.func.jacrev(f)(point).reshape(out_numel, -1))[0]

    best = 0.0
    for _ in range(steps):
        grad, value = torch.func.grad_and_value(sigma)(x)
        best = max(best, float(value))
        if not torch.isfinite(grad).all() or float(grad.norm()) == 0:
            break
        x = x + lr * grad / grad.norm()
    return max(best, float(sigma(x)))


def _pair_ratios(fb: Fn, xs: Tensor, ys: Tensor) -> float:
    """``max ||f(x_i) - f(y_i)|| / ||x_i - y_i||`` less its rounding error (``fb`` maps a batch)."""
    fx_, fy = fb(xs).flatten(1), fb(ys).flatten(1)
    dx = (xs - ys).flatten(1).norm(dim=1)
    eps = torch.finfo(fx_.dtype).eps
    err = 8 * eps * (fx_.norm(dim=1) + fy.norm(dim=1) + 1) * (1 + xs.flatten(1).norm(dim=1)) + eps * dx
    ratio = ((fx_ - fy).norm(dim=1) - err) / dx
    ratio = ratio[torch.isfinite(ratio) & (dx > 0)]
    return float(ratio.max()) if ratio.numel() else 0.0


def line_scans(fb: Fn, x: Tensor, spans: tuple[float, ...] = (3.0, 0.01), n: int = 256) -> float:
    """Ratios of consecutive points on lines through ``x`` (a jump of size J shows as J / step)."""
    best = 0.0
    for span in spans:
        u = torch.randn_like(x)
        t = torch.linspace(-span, span, n + 1, dtype=x.dtype).view(-1, *([1] * x.dim()))
        points = x + t * (u / u.norm())
        best = max(best, _pair_ratios(fb, points[:-1], points[1:]))
    return best


def spike_ratios(fb: Fn, x: Tensor, limit: int = 48, amplitude: float = 1.0) -> float:
    """``||f(x + a e_j) - f(x)|| / a`` on single entries ``j`` (up to ``limit`` of them)."""
    n = x.numel()
    idx = torch.randperm(n)[:limit]
    spikes = torch.zeros(len(idx), n, dtype=x.dtype)
    spikes[torch.arange(len(idx)), idx] = amplitude
    ys = x.reshape(1, -1) + spikes
    return _pair_ratios(fb, x.reshape(1, -1).expand_as(ys).reshape(-1, *x.shape), ys.reshape(-1, *x.shape))


def lower_bound(fb: Fn, shape: torch.Size, dtype: torch.dtype, smooth: bool) -> float:
    """The best float lower bound of ``L(f)`` for ``fb`` mapping a batch of samples of ``shape``."""
    f1: Fn = lambda v: fb(v.unsqueeze(0).clone()).squeeze(0)
    fb_fresh: Fn = lambda xs: fb(xs.clone())  # in-place ops may write their input
    best = 0.0
    points = [torch.randn(shape, dtype=dtype) * scale for scale in (0.3, 1.0, 3.0, 10.0)]
    large = f1(points[0]).numel() * points[0].numel() > DENSE_LIMIT
    try:
        for x in points[:2] if large else points:
            best = max(best, jacobian_norm(f1, x))
        if smooth:
            best = max(best, ascend(f1, points[1]))
    except RuntimeError as err:  # autograd cannot differentiate the model (:func:`no_derivative`): finite pairs
        if not no_derivative(err):
            raise
    for x in points[:2]:
        best = max(best, line_scans(fb_fresh, x))
    best = max(best, spike_ratios(fb_fresh, 1e-3 * torch.randn(shape, dtype=dtype)),
               spike_ratios(fb_fresh, points[1], amplitude=0.5))
    stacked = torch.stack(points)
    best = max(best, _pair_ratios(fb_fresh, stacked, stacked.roll(1, 0)))
    return best


# --------------------------------------------------------------------------- one (fused) node of the fx graph
def run_fx_node(gm: fx.GraphModule, node: fx.Node, values: dict[fx.Node, object]) -> object:
    """Execute one fx node with its arguments read from ``values`` (the real modules, hooks included)."""
    args = fx.node.map_arg(node.args, values.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        value: object = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    raise ValueError(node.op)


def forward_values(gm: fx.GraphModule, x: Tensor) -> dict[fx.Node, object]:
    """Every node's value on input ``x``."""
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            values[node] = x
        elif node.op != "output":
            values[node] = run_fx_node(gm, node, values)
    return values


def chain_fn(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node, values: dict[fx.Node, object]) -> Fn:
    """``v -> `` the last of ``nodes`` with ``source`` replaced by ``v`` (other arguments as in ``values``)."""
    def fn(v: Tensor) -> Tensor:
        local = dict(values)
        local[source] = v
        for node in nodes:
            local[node] = run_fx_node(gm, node, local)
        out = local[nodes[-1]]
        return out[0] if isinstance(out, tuple) else out
    return fn
