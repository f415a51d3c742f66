"""``BoundPolicy``: every size limit and cost setting of the bounds, in one frozen dataclass.

The algorithms (dense or iterative certificates, exact or greedy SeqLip search, full or low-rank factorisations)
are chosen by the size of each operator or layer. Those thresholds live here and nowhere else: the estimator
takes one policy (``LipschitzEstimator(..., policy=BoundPolicy(...))``) and hands it to every place that decides.
The search functions of :mod:`lipreg.bounds.seqlip.search` and the certificates of :mod:`lipreg.linalg.certify`
and :mod:`lipreg.linalg.conv` take the defaults of their direct calls from this class (so this module imports
nothing of lipreg); the library always passes them the estimator's policy.

Numeric types are not a setting: certificates are computed from the weights in float64 and rounded upwards, and
the SeqLip searches run in float64, whatever the estimator's ``dtype`` (the computation dtype of the estimates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class BoundPolicy:
    """The limits that pick an algorithm, and the sizes of the iterative ones. All counts are ``>= 0``."""

    dense_entries: int = 2**20
    """An operator with at most this many matrix entries (``n_in n_out``) is certified by the exact norm of its
    dense matrix, built from its action on the identity basis of the smaller side; so is a thin one, whose smaller
    side is at most ``sqrt(dense_entries)`` with at most 16 times as many entries (a pooling, flatten and linear
    layer on a 512-channel 1x1 map: 512 x 4096). Larger ones get the product of their ops' certificates (FFT bound
    of convolutions, Gram iteration, Schur test). 2^20 (a 1024-square Gram matrix) keeps the eigendecomposition
    well under a second on a CPU; 0 forces the per-op certificates."""

    conv_dense_entries: int = 2**24
    """A convolution's own certificate (:func:`~lipreg.linalg.conv.conv_spectral_bound`, on the per-op route) is
    the exact norm of its dense matrix, group by group, when one group's block has at most this many entries (and
    all groups' eigensolves together cost at most one of that size: :func:`~lipreg.linalg.conv.dense_route`); else
    the FFT bound of its circular embedding, loose by a few percent on small maps. 2^24 covers 3x3 convs of up to
    64 channels on 8x8 maps (a 4096-square Gram matrix, about a second on a CPU by a verified Cholesky
    factorisation), 128 on 4x4, and grouped / depthwise convs on larger maps. 0 keeps the FFT bound alone."""

    exact_eig_max_dim_cpu: float = math.inf
    """Largest ``min(m, n)`` of a dense matrix whose norm is computed exactly (``eigvalsh`` of its Gram matrix) on
    the CPU; beyond it, the Gram-iteration upper bound. On the CPU the exact route costs about as much as the Gram
    iteration at every size, hence no limit."""

    exact_eig_max_dim_accelerator: float = 32
    """The same limit on CUDA and other devices: their batched eigensolvers cover only small matrices (cuSOLVER's
    ``syevjBatched``: up to 32 x 32) and solve larger ones one by one, while the Gram iteration is a few batched
    matrix products."""

    seqlip_dense_entries: int = 2**16
    """A SeqLip chain operator with at most this many matrix entries gets a full SVD of its dense matrix in every
    warm call (and in a certified chain); a larger one a warm low-rank subspace (an estimate). 2^16 (a 256-square
    matrix) keeps the dense matrix and its SVD a small part of a training step."""

    seqlip_dense_rank: int = 512
    """... and only when ``min(n_in, n_out)`` is at most this: the greedy search costs ``O(n r^2)`` per flip in the
    rank ``r`` of the factors."""

    exact_search_units: int = 16
    """``search="auto"`` searches a SeqLip pair exactly (all ``2^n`` activation patterns, certified) when its
    activation has at most this many units, greedily otherwise: 2^16 patterns take a fraction of a second, cheap
    enough for every training step."""

    exact_search_limit: int = 22
    """No exhaustive search over more than ``2^exact_search_limit`` patterns per pair, even with
    ``search="exact"`` (refused with an error beforehand): 2^22 patterns take minutes."""

    lowrank_rank: int = 32
    """``E``, the number of top singular triplets a low-rank SeqLip operator keeps (at most its true rank): the
    pair matrices are ``E x E``, so the greedy's cost grows as ``E^2`` per flip, and each warm call applies the
    operator and its adjoint to ``E + lowrank_oversample`` vectors. The estimate drops the spectrum's tail, so it
    grows with ``E``: raise it for a closer SeqLip estimate at a proportional cost."""

    lowrank_oversample: int = 10
    """Extra vectors in the low-rank subspace iteration (the block has ``E + oversample`` columns): the top ``E``
    converge faster and more accurately than with exactly ``E``."""

    greedy_max_rounds: int | None = None
    """Cap on the rounds of a whole greedy search per pair (at the warm start and in ``est.converge()``); ``None``:
    ``4 n + 10`` for a pair of width ``n``, which a local search almost never reaches (each round strictly raises the
    norm)."""

    greedy_rounds_per_call: int = 1
    """Rounds of the greedy SeqLip search per pair in each warm call (``est()``), from the pattern the last call left
    (a round: at most this many alternating steps, then one batch of improving flips; never more than
    :attr:`greedy_max_rounds`). The patterns carry over between calls as the power-iteration vectors do, and the
    warm start and ``est.converge()`` run each search to a local max: one round per call costs ``O(n E^2)`` per pair
    of width ``n`` and rank ``E``, about one pair matrix, so a SeqLip training step costs a few plain ones."""

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if value is None and spec.name == "greedy_max_rounds":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"BoundPolicy.{spec.name} must be a number >= 0, got {value!r}")
        if self.lowrank_rank < 1:
            raise ValueError(f"BoundPolicy.lowrank_rank must be >= 1, got {self.lowrank_rank}")
        if self.exact_search_units > self.exact_search_limit:
            raise ValueError(f"BoundPolicy.exact_search_units={self.exact_search_units} exceeds "
                             f"exact_search_limit={self.exact_search_limit}: search='auto' would plan exact "
                             "searches that are refused")

    def dense_node(self, n_in: int, n_out: int) -> bool:
        """Whether a whole operator ``n_out x n_in`` is certified from its dense matrix (:attr:`dense_entries`)."""
        entries = n_in * n_out
        return entries <= self.dense_entries or (min(n_in, n_out) ** 2 <= self.dense_entries
                                                 and entries <= 16 * self.dense_entries)

    def exact_eig_max_dim(self, device_type: str) -> float:
        """The exact-norm limit (``min(m, n)``) of dense matrices on a device of this type (``"cpu"``, ``"cuda"``)."""
        return self.exact_eig_max_dim_cpu if device_type == "cpu" else self.exact_eig_max_dim_accelerator
