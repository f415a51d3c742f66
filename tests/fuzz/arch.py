"""Random small architectures drawn from lipreg's whole rule set, for the soundness fuzz (:mod:`tests.fuzz.soundness`).

Each step is drawn by one generator of :data:`GENERATORS` (:mod:`.layers`, :mod:`.ops`, :mod:`.adversarial`) for the
current per-sample shape, in module or functional form, and may nest (residual branches, concatenations).
Every case records the op kinds it uses (for the per-kind breakdown), the registry targets it calls (for
coverage) and a one-line description (the reproducer).
"""
from __future__ import annotations

import copy
import math
import operator
import random
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .adversarial import (dtype_change, g_bitcast, g_container, g_instance_override, g_item, g_padding_after_init,
                          g_python_attribute, late_override, unbatched_block)
from .layers import (g_avg_pool, g_batch_norm, g_big_operator, g_cancel, g_conv, g_conv_transpose, g_hooked,
                          g_linear, g_max_pool, g_mean_sum, g_pad, g_qat, g_tenfold_conv)
from .net import Builder, Case, Shape, Step
from .ops import (g_activation, g_arith, g_clamp_tensor, g_dropout, g_getitem, g_inplace, g_refused, g_reshape)
from .routes import route_plan
from .structure import (g_addcmul, g_copies, g_extremum, g_flip_roll, g_pad_fill, g_resample, g_shuffle, g_sort,
                        g_split_part, g_stochastic_depth)


# --------------------------------------------------------------------------------------------- composition
def g_residual(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    """``h + branch(h)`` (or ``torch.add(.., alpha)``, ``h - branch``, ``branch += h``) with a shape-keeping branch."""
    if b.depth >= 2:
        return None
    branch, descs = draw_plan(b, s, b.rng.randint(1, 2), preserve=True)
    desc = " -> ".join(descs) or "identity"
    run = lambda net, h: _run(branch, net, h)
    form = b.pick(["add", "torch.add alpha", "sub", "iadd"])
    b.note("residual", {"add": operator.add, "torch.add alpha": torch.add, "sub": operator.sub, "iadd": operator.iadd}[form])
    if form == "add":
        return (lambda net, h: h + run(net, h)), s, f"h + [{desc}]"
    if form == "torch.add alpha":
        return (lambda net, h: torch.add(h, run(net, h), alpha=0.5)), s, f"torch.add(h, [{desc}], alpha=0.5)"
    if form == "sub":
        return (lambda net, h: h - run(net, h)), s, f"h - [{desc}]"

    def iadd(net: nn.Module, h: Tensor) -> Tensor:
        y = run(net, h)
        y += h
        return y
    return iadd, s, f"y = [{desc}]; y += h"


def g_concat(b: Builder, s: Shape, preserve: bool) -> tuple[Step, Shape, str] | None:
    if preserve or b.depth >= 2:
        return None
    branch, descs = draw_plan(b, s, b.rng.randint(0, 2), preserve=True)
    desc = " -> ".join(descs) or "identity"
    run = lambda net, h: _run(branch, net, h)
    form = b.pick([torch.cat, torch.concat, torch.stack])
    b.note("concat", form)
    if form is torch.stack:
        return (lambda net, h: torch.stack([h, run(net, h)], dim=1)), (2, *s), f"stack([h, [{desc}]], 1)"
    return (lambda net, h: form([h, run(net, h)], dim=1)), (2 * s[0], *s[1:]), f"{form.__name__}([h, [{desc}]], 1)"


def _run(steps: list[Step], net: nn.Module, h: Tensor) -> Tensor:
    for step in steps:
        h = step(net, h)
    return h


Generator = Callable[[Builder, Shape, bool], Optional[tuple[Step, Shape, str]]]
GENERATORS: list[tuple[Generator, float]] = [
    (g_linear, 3), (g_conv, 3), (g_conv_transpose, 1), (g_batch_norm, 2), (g_pad, 1), (g_avg_pool, 1.5),
    (g_mean_sum, 0.5), (g_max_pool, 1.5), (g_activation, 5), (g_inplace, 1), (g_hooked, 0.4), (g_qat, 0.3),
    (g_reshape, 1.5), (g_dropout, 0.8), (g_arith, 2), (g_clamp_tensor, 0.5), (g_getitem, 0.8), (g_refused, 0.3),
    (g_cancel, 0.3), (g_residual, 1.2), (g_concat, 0.8),
    (g_instance_override, 0.4), (g_bitcast, 0.25), (g_container, 0.4), (g_item, 0.3), (g_padding_after_init, 0.4),
    (g_python_attribute, 0.25),
    (g_split_part, 0.8), (g_resample, 1.0), (g_pad_fill, 0.8), (g_shuffle, 1.0), (g_flip_roll, 0.5), (g_copies, 0.5),
    (g_addcmul, 0.5), (g_extremum, 1.2), (g_sort, 0.6), (g_stochastic_depth, 0.3),
]
MAX_NUMEL = 200


def draw_plan(b: Builder, s: Shape, n_ops: int, preserve: bool) -> tuple[list[Step], list[str]]:
    """``n_ops`` steps from shape ``s`` (ending at ``s`` when ``preserve``): the steps and their descriptions."""
    b.depth += 1
    steps, descs, fresh, shape = [], [], b.fresh, s
    generators, weights = zip(*GENERATORS)
    for _ in range(n_ops):
        for _attempt in range(20):
            b.fresh = fresh
            gen = b.rng.choices(generators, weights)[0]
            drawn = gen(b, shape, preserve)
            if drawn is not None and math.prod(drawn[1]) <= MAX_NUMEL and (not preserve or drawn[1] == shape):
                break
        else:
            continue
        step, shape, desc = drawn
        steps.append(step)
        descs.append(desc)
        fresh = True
    b.depth -= 1
    b.fresh = fresh
    return steps, descs


FAMILIES = [  # per-sample input shapes
    (lambda r: (r.randint(2, 9),), 4), (lambda r: (r.randint(1, 3), r.randint(4, 10)), 2),
    (lambda r: (r.randint(1, 3), r.randint(3, 7), r.randint(3, 7)), 3),
    (lambda r: (r.randint(1, 2), r.randint(2, 4), r.randint(2, 4), r.randint(2, 4)), 0.6),
]


def _mutation(b: Builder) -> Optional[tuple[str, Callable[[nn.Module], str]]]:
    """A change to the model after the estimator was built, with its kind: one the drawn steps offer (a container
    edit, a parameter read into Python changed), a replaced submodule or changed hyper-parameter, an instance
    override, or a dtype change."""
    if "hook:spectral_norm" in b.kinds:
        return "stale", _replacement(b)
    if b.mutations and b.chance(0.7):
        return b.pick(b.mutations)
    roll = b.rng.random()
    late = late_override(b) if roll < 0.04 else None
    if late is not None:
        return "16.1 instance override (after build)", late
    if 0.04 <= roll < 0.08 and not b.float32_reference:
        return "16.4 dtype change", dtype_change(b)
    replacement = _replacement(b) if 0.08 <= roll < 0.14 else None
    return ("stale", replacement) if replacement is not None else None


def _replacement(b: Builder) -> Optional[Callable[[nn.Module], str]]:
    """A replaced submodule or a changed hyper-parameter (an optimizer step under old-style spectral norm)."""
    names = [(n, m) for n, m in b.net.named_children() if type(m) in (nn.Linear, nn.LeakyReLU, nn.Conv2d, nn.ELU)]
    if not names:
        return None
    spectral = [(n, m) for n, m in names if hasattr(m, "weight_orig")]
    name, module = b.pick(spectral or names)

    def mutate(net: nn.Module) -> str:
        if hasattr(module, "weight_orig"):  # old-style spectral norm: an optimizer step, no forward since
            with torch.no_grad():
                getattr(net, name).weight_orig.add_(3 * torch.randn_like(module.weight_orig))
            return f"{name}.weight_orig += 3 randn (spectral norm recomputes weight at the next call)"
        if isinstance(module, nn.LeakyReLU):
            getattr(net, name).negative_slope = 8.0
            return f"{name}.negative_slope = 8"
        if isinstance(module, nn.ELU):
            getattr(net, name).alpha = 8.0
            return f"{name}.alpha = 8"
        new = copy.deepcopy(module)
        with torch.no_grad():
            new.weight.mul_(8)
        setattr(net, name, new)
        return f"net.{name} replaced by a copy with 8x weights"
    return mutate


def draw_case(seed: int, index: int) -> Case:
    """Architecture ``index`` of the run ``seed``: reproducible on its own."""
    rng = random.Random(seed * 1_000_003 + index)
    torch.manual_seed(rng.randrange(2**31))
    b = Builder(rng)
    big = rng.random() < 0.04  # operators too large for the dense route: the rules' own certified norms
    s = (3, 32, 32) if big else rng.choices([f for f, _ in FAMILIES], [w for _, w in FAMILIES])[0](rng)
    per_sample = not big and len(s) in (2, 3) and rng.random() < 0.08  # 16.3: a conv on one unbatched sample
    routed = not big and not per_sample and rng.random() < 0.2  # aimed at a certificate route (:mod:`.routes`)
    if routed:
        s, b.net.steps, descriptions = route_plan(b)
    elif big:
        step, _, desc = rng.choice([g_tenfold_conv, g_hooked, g_big_operator, g_big_operator])(b, s, True)
        b.net.steps, descriptions = [step], [desc]
    elif per_sample:
        b.net.steps, descriptions = _unbatched_plan(b, s)
    else:
        b.net.steps, descriptions = draw_plan(b, s, rng.randint(1, 5), preserve=False)
    dtype = rng.choices([torch.float32, torch.float64, torch.bfloat16], [5, 3, 2])[0]
    model = b.net.eval()
    double = dtype == torch.float64 and rng.random() < 0.5 and not b.float32_reference
    if double:
        model = model.double()
    x = torch.randn((1 if per_sample else 2,) + s, dtype=torch.float64 if double else torch.float32)
    drawn = _mutation(b)
    kind, mutate = drawn if drawn is not None and drawn[1] is not None else (None, None)
    kinds = b.kinds | ({kind} if kind else set()) | ({"big input"} if big else set())
    margin = rng.choice(["autolip", "seqlip", "liplt"]) if routed or rng.random() < 0.25 else None
    return Case(index, model, x, dtype, rng.random() < 0.8, kinds, b.targets, describe(s, descriptions),
                float32_reference=b.float32_reference, mutate=mutate, steps=descriptions, per_sample=per_sample,
                margin=margin)


def _unbatched_plan(b: Builder, s: Shape) -> tuple[list[Step], list[str]]:
    """Shape-keeping steps, the unbatched convolution block of :func:`.adversarial.unbatched_block`, more steps."""
    before, descs = draw_plan(b, s, b.rng.randint(0, 1), preserve=True)
    step, shape, desc = unbatched_block(b, s)
    after, descs_after = draw_plan(b, shape, b.rng.randint(0, 2), preserve=False)
    return before + [step] + after, descs + [desc] + descs_after


def describe(shape: Shape, steps: list[str]) -> str:
    return f"in{shape} " + (" -> ".join(steps) or "identity")
