"""Shared test setup."""
import torch

# The tests work on tiny tensors, with two pytest-xdist workers on two cores: torch's default of one intra-op
# thread per core oversubscribes the machine, which makes small convolutions 10 to 50 times slower.
torch.set_num_threads(1)
