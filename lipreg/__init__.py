"""lipreg: estimate, log and penalise the Lipschitz constant of a network while it trains.

Scaman & Virmaux, "Lipschitz regularity of deep neural networks: analysis and efficient estimation",
NeurIPS 2018: AutoLip (Alg. 1), the power method through autograd (Alg. 2) and SeqLip (eq. 8).
"""
from . import rules
from .errors import UnsupportedOpError
from .estimator import LipschitzEstimator
from .oneshot import autolip, seqlip
from .power import power_method
from .rules import register_rule

__all__ = ["LipschitzEstimator", "UnsupportedOpError", "autolip", "power_method", "register_rule", "rules",
           "seqlip"]
