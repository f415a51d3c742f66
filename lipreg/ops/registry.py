"""The rule registry: op -> rule. Keys are module classes, functions, tensor method names (``"view"``) or the
qualified names of functions from libraries lipreg does not import (``"torchvision.ops.stochastic_depth.
stochastic_depth"``)."""
from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Union

from torch import fx, nn

from .base import Constant, NodeInfo, Refuse, Rule

RuleFactory = Callable[[NodeInfo], Rule]
RuleSpec = Union[Rule, float, RuleFactory]
Target = Union[type, Callable[..., Any], str]

_RULES: dict[Target, RuleFactory] = {}


def register_rule(target: Target, rule: RuleSpec) -> None:
    """Teach lipreg an op.

    ``target`` is an ``nn.Module`` subclass (its instances are then kept whole when tracing, not traced
    through), a function (``torch.tanh``, ``F.gelu``...), a tensor method name (``"tanh"``), or a function's
    qualified name ``"module.name"`` (its ``__module__`` and ``__qualname__``), which names a function of a library
    without importing it.
    ``rule`` is a :class:`~lipreg.ops.Rule`, a float (the op's Lipschitz constant), or a callable
    ``NodeInfo -> Rule`` for rules that depend on the call's arguments. A later registration replaces an earlier one.
    """
    _RULES[target] = _factory(rule)  # raises on an invalid rule before the registry changes
    if isinstance(rule, Refuse):
        _REFUSALS.add(target)
    else:
        _REFUSALS.discard(target)


def _factory(rule: RuleSpec) -> RuleFactory:
    if isinstance(rule, Rule):
        return lambda info, _rule=rule: _rule
    if isinstance(rule, (int, float)):
        return lambda info, _rule=Constant(float(rule)): _rule
    if callable(rule):
        return rule
    raise TypeError(f"a rule is a lipreg.ops.Rule, a float or a callable NodeInfo -> Rule, got {type(rule)!r}")


def unregister_rule(target: Target) -> None:
    """Forget the rule of ``target`` (a built-in rule too): its op is then refused as one without a rule.
    Raises ``KeyError`` if ``target`` has no rule."""
    del _RULES[target]
    _REFUSALS.discard(target)


@contextmanager
def registered(target: Target, rule: RuleSpec) -> Iterator[None]:
    """``register_rule(target, rule)`` for the duration of a ``with`` block; on exit, ``target``'s previous rule
    (or its absence) is restored."""
    previous, refused = _RULES.get(target), target in _REFUSALS
    register_rule(target, rule)
    try:
        yield
    finally:
        _RULES.pop(target, None)
        _REFUSALS.discard(target)
        if previous is not None:
            _RULES[target] = previous
            if refused:
                _REFUSALS.add(target)


def qualified_name(function: Any) -> str | None:
    """``module.qualname`` of a function, the key of rules registered by name."""
    module, name = getattr(function, "__module__", None), getattr(function, "__qualname__", None)
    return f"{module}.{name}" if module and name else None


def rule_factory(node: fx.Node, module: nn.Module | None) -> RuleFactory | None:
    """The registered factory for an fx node (module classes are matched along their MRO; functions by
    themselves, then by qualified name)."""
    if node.op == "call_module":
        assert module is not None
        cls = _registered_class(module)
        return None if cls is None else _RULES[cls]
    factory = _RULES.get(node.target)
    if factory is None and node.op == "call_function":
        factory = _RULES.get(qualified_name(node.target))
    return factory


# Methods a subclass may override without changing what the module computes: construction, representation,
# (de)serialisation, replication and input-shape validation.
_NEUTRAL_METHODS = {"__init__", "__repr__", "extra_repr", "_get_name", "reset_parameters", "_check_input_dim",
                    "_save_to_state_dict", "_load_from_state_dict", "_replicate_for_data_parallel", "__setstate__",
                    "__getstate__"}
_REFUSALS: set[Target] = set()  # targets registered with a Refuse: every subclass keeps the refusal


def _overrides(classes: tuple[type, ...], base: type) -> bool:
    """Whether one of ``classes`` redefines a method of ``base`` (its own or inherited, ``nn.Module``'s included)."""
    return any(name not in _NEUTRAL_METHODS and hasattr(base, name)
               and (callable(value) or isinstance(value, (property, classmethod, staticmethod)))
               for cls in classes for name, value in vars(cls).items())


def _registered_class(module: nn.Module) -> type | None:
    """The nearest class in the module's MRO with a rule, provided the module still computes what that class
    computes: no class between them overrides a method of the registered class (``forward``, ``_conv_forward``,
    ``__getattr__``...), or else the module is unknown (traced through, or refused when fx keeps it whole).
    A refusal (:class:`Refuse`) is kept by every subclass. torch's concrete classes (``nn.Conv2d``...) are
    registered themselves."""
    mro = type(module).__mro__
    for depth, cls in enumerate(mro):
        if cls in _RULES and cls is not nn.Module:
            if cls in _REFUSALS or not _overrides(mro[:depth], cls):
                return cls
            return None
    return None


def is_registered_module(module: nn.Module) -> bool:
    """Whether a module's class (or a base whose computation it keeps) has a rule: such modules are leaves of the
    trace."""
    return _registered_class(module) is not None


def describe_target(node: fx.Node, module: nn.Module | None) -> str:
    """How to name the op in messages and in ``register_rule`` examples."""
    if node.op == "call_module" and module is not None:
        cls = type(module)
        return f"{cls.__module__}.{cls.__qualname__}"
    if node.op == "call_method":
        return repr(node.target)
    target = node.target
    if target in vars(operator).values():
        return f"operator.{target.__name__}"
    module_name = getattr(target, "__module__", None) or "torch"
    return f"{module_name}.{getattr(target, '__name__', repr(target))}"
