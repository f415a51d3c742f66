"""Errors raised to users, worded for them."""
from __future__ import annotations

REGISTER_HINT = """\
To bound it, register a rule for it, e.g.
    import lipreg
    lipreg.register_rule({target}, 2.0)                      # a known Lipschitz constant
    lipreg.register_rule({target}, lipreg.ops.LinearOp())  # a linear (affine) op: its norm by the power method
    lipreg.register_rule({target}, lipreg.ops.Activation(0.0, 1.0))  # elementwise, slopes in [a, b]"""


class UnsupportedOpError(TypeError):
    """A model, or one op in it, that lipreg cannot bound: the message names the op, the node and the fix."""
