"""Errors raised to users, worded for them."""
from __future__ import annotations

REGISTER_HINT = """\
If it is Lipschitz, register the rule that describes it, with values you have proved for this op:
    import lipreg
    lipreg.register_rule({target}, L)                            # its Lipschitz constant L (a float)
    lipreg.register_rule({target}, lipreg.ops.LinearOp())        # only if affine in its input (norm computed)
    lipreg.register_rule({target}, lipreg.ops.Activation(a, b))  # only if elementwise, slopes in [a, b] everywhere"""


class UnsupportedOpError(TypeError):
    """A model, or one op in it, that lipreg cannot bound: the message names the op, the node and the fix."""
