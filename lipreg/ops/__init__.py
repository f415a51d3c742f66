"""Lipschitz rules, one per kind of op, in a registry (:func:`register_rule`)."""
from . import elementwise, linear, pooling, refused, resample, split, structural  # noqa: F401  (the built-in rules)
from .base import Activation, Call, Concat, Constant, LinearOp, NodeInfo, Refuse, Rule, Sum
from .registry import describe_target, is_registered_module, register_rule, registered, rule_factory, unregister_rule

__all__ = ["Activation", "Call", "Concat", "Constant", "LinearOp", "NodeInfo", "Refuse", "Rule", "Sum",
           "describe_target", "is_registered_module", "register_rule", "registered", "rule_factory",
           "unregister_rule"]
