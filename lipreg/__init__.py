"""lipreg: estimate, log and penalise the Lipschitz constant of a network while it trains.

Scaman & Virmaux, "Lipschitz regularity of deep neural networks: analysis and efficient estimation",
NeurIPS 2018: AutoLip (Alg. 1), the power method through autograd (Alg. 2) and SeqLip (eq. 8).
"""
from . import metrics, rules
from .errors import UnsupportedOpError
from . import autolip as _autolip_module, seqlip as _seqlip_module  # noqa: F401  (bound before the one-shot functions shadow these names)
from .callback import LipschitzCallback
from .estimator import LipschitzEstimator
from .penalty import LipschitzPenalty
from .losses import LipschitzMarginLoss
from .oneshot import autolip, seqlip
from .power import power_method
from .rules import register_rule

__all__ = ["LipschitzCallback", "LipschitzEstimator", "LipschitzMarginLoss", "LipschitzPenalty", "UnsupportedOpError", "autolip", "metrics",
           "power_method", "register_rule", "rules", "seqlip"]
