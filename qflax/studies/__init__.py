"""Numerical studies of quantizers: the ProxConnect++ decomposition check and pair plots.

* :func:`decomposition_violation` tests numerically whether a forward ``F`` equals ``P∘B`` for a
  monotone ``P`` (our reading of ProxConnect++'s decomposition criterion, METHODS.md §4);
  :func:`check_catalogue` runs it on every pair of :data:`qflax.quantizers.PAIRS`;
  :func:`pair_criterion` says which condition of the construction a pair (catalogue, composed
  or the user's own) fails and where, each marked [paper] or [inferred]; every pair run writes it
  into ``summary.json``.
* :func:`plot_pair` / :func:`plot_catalogue` draw ``F``, ``B`` and ``B′`` to PNG files
  (matplotlib is imported only when a plot is made).
* :func:`gradient_variance` measures, per layer, the bias and variance of a fully quantized
  training gradient against the QAT gradient over K keys, and each gradient quantizer's
  variance on the layer's real ``∇Y`` next to the paper's bound;
  :func:`write_gradient_report` writes the table, JSON and plot.
"""

from qflax.studies._decomposition import (
    CRITERION_CONDITIONS,
    check_catalogue,
    decomposition_violation,
    pair_criterion,
)
from qflax.studies._gradients import gradient_table, gradient_variance, write_gradient_report
from qflax.studies._plots import plot_catalogue, plot_pair
from qflax.studies._reports import REPORTERS, register_reporter, run_reports

__all__ = [
    "CRITERION_CONDITIONS",
    "check_catalogue",
    "decomposition_violation",
    "gradient_table",
    "gradient_variance",
    "pair_criterion",
    "plot_catalogue",
    "plot_pair",
    "REPORTERS",
    "register_reporter",
    "run_reports",
    "write_gradient_report",
]
