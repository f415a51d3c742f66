"""Capture: the torch.fx trace of a model in eval mode, its effects checked, and the reduced graph of rules."""
