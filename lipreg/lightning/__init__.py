"""The Lightning layer of lipreg, the only package that imports Lightning: :class:`LipschitzCallback`, a proper
callback under ``lightning.pytorch`` and ``pytorch_lightning`` alike."""
from .callback import LipschitzCallback

__all__ = ["LipschitzCallback"]
