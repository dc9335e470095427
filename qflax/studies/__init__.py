"""Numerical studies of quantizers: the ProxConnect++ decomposition check and pair plots.

* :func:`decomposition_violation` tests numerically whether a forward ``F`` equals ``P∘B`` for a
  monotone ``P`` (our reading of ProxConnect++'s decomposition criterion, METHODS.md §4);
  :func:`check_catalogue` runs it on every pair of :data:`qflax.quantizers.PAIRS`.
* :func:`plot_pair` / :func:`plot_catalogue` draw ``F``, ``B`` and ``B′`` to PNG files
  (matplotlib is imported only when a plot is made).
"""

from qflax.studies._decomposition import check_catalogue, decomposition_violation
from qflax.studies._plots import plot_catalogue, plot_pair

__all__ = ["check_catalogue", "decomposition_violation", "plot_catalogue", "plot_pair"]
