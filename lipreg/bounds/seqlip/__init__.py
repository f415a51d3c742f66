r"""SeqLip (Scaman & Virmaux 2018, eq. 8) on every maximal chain of the graph; AutoLip everywhere else.

**Chains** (:mod:`.chains`). A chain is a maximal path ``A_1 -> rho_1 -> A_2 -> ... -> A_K`` of linear nodes
``A_i`` and elementwise activations ``rho_i`` of slopes in ``[a_i, b_i]``, ``a_i >= 0``; its Jacobian is
``A_K D_{K-1} ... D_1 A_1``. The graph bound is AutoLip with each chain's product of factors replaced by the chain's
SeqLip bound (a residual block ``x + g(x)`` gets ``1 + SeqLip(g)``).

**The bound** (eq. 8). With ``A_i = U_i Sigma_i V_i^T`` (thin SVD of the operator as an ``n_out x n_in`` matrix of
the flattened per-sample map, :mod:`.factors`),

    ``L(chain) <= prod_{i<K} max_{sigma_i} || R_{i+1} diag(sigma_i) L_i ||_2``,
    ``L_i = U_i Sigma~_i``, ``R_{i+1} = Sigma~_{i+1} V_{i+1}^T``,

with ``Sigma~ = Sigma`` for the first and the last operator and ``Sigma^{1/2}`` for the inner ones (for ``K = 2`` this
is exactly ``max_sigma ||A_2 D A_1||``). The norm is convex in ``sigma``, so the max over the box is attained at a
vertex ``sigma_k in {a, b}`` (:mod:`.search`).

**Searches** (``search=``), per pair of the chain:

* ``"exact"``: every vertex (``2^n``), by branch and bound (:func:`exact_search`);
* ``"greedy"``: local search from the previous pattern (:func:`greedy_local_max`);
* ``"lowrank"``: operators replaced by their top-``E`` singular triplets (``BoundPolicy.lowrank_rank``), found by
  warm-started subspace iteration, never forming the matrix; the greedy search then runs on ``E x E`` pair
  matrices. An **estimate**, not a bound;
* ``"auto"`` (default): exact when the pair's width is at most ``BoundPolicy.exact_search_units``, greedy otherwise;
  per operator a full SVD when it is small enough (``BoundPolicy.seqlip_dense_entries`` and
  ``seqlip_dense_rank``), low-rank otherwise (:mod:`.plan`).

Only exact search on full SVDs of every operator is certified (:attr:`SeqLip.certified`); its pair norms carry a
float64 rounding slack (:func:`rounding_slack`), and the estimator then evaluates the chain from float64 weights.
All search and small linear algebra is done in float64, whatever the estimator's dtype.

**Gradients** (:mod:`.gradient`). With the patterns fixed, the bound is a differentiable function of the weights;
its gradient is given, finite for repeated or zero singular values, by a surrogate whose value is discarded.

**Warm state** (:mod:`.state`): patterns, subspaces and pair vectors are buffers of :class:`SeqLip`, and a warm
call (``est()``) does a bounded amount of work, like one power iteration: ``n_iter`` subspace iterations per
low-rank operator (the last one sharing its products with the factor), ``BoundPolicy.greedy_rounds_per_call`` rounds
of each greedy search from the stored pattern, and a full SVD only of the operators below
``BoundPolicy.seqlip_dense_entries``. The warm start at construction and ``est.converge()`` iterate the subspaces to
convergence and the searches to a local max; the patterns then follow the weights from call to call.
"""
from .chains import Chain, find_chains
from .search import (exact_search, greedy_local_max, greedy_search, pair_matrix, rounding_slack, top_singular,
                     vertex_sigma)
from .state import SEARCHES, SeqLip

__all__ = ["SEARCHES", "Chain", "SeqLip", "exact_search", "find_chains", "greedy_local_max", "greedy_search",
           "pair_matrix", "rounding_slack", "top_singular", "vertex_sigma"]
