"""Plots of forward/backward quantizer pairs (ProxConnect++, METHODS.md §4): ``F``, ``B``, ``B′``.

Drawn with matplotlib's object API on an Agg canvas (no ``pyplot``, no global backend change);
matplotlib is imported only when a plot is made, so ``import qflax.studies`` stays cheap.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qflax.studies._decomposition import _default_grid, decomposition_violation

__all__ = ["plot_catalogue", "plot_pair"]


def _derivative(fn: Callable[..., Any], x: jax.Array, kwargs: Mapping[str, Any]) -> np.ndarray:
    grad = jax.grad(lambda v: jnp.sum(jnp.asarray(fn(v, **kwargs))))
    return np.asarray(grad(x), np.float64)


def plot_pair(
    pair: Any,
    path: str | pathlib.Path,
    *,
    grid: jax.typing.ArrayLike | None = None,
    title: str | None = None,
) -> pathlib.Path:
    """Draws a pair's forward ``F``, backward ``B`` and ``B′`` (its gradient) to a PNG.

    Left panel: ``F(x)`` and ``B(x)``; right panel: ``B′(x)``, the factor the pair's VJP applies
    to the incoming gradient. The title gives the pair and the :func:`decomposition_violation`
    result.

    Args:
      pair: a :class:`qflax.quantizers.QuantizerPair` (anything with ``forward``, ``backward``,
        ``forward_kwargs`` and ``backward_kwargs``).
      path: the PNG file to write (its directory must exist).
      grid: 1-D inputs; default ``jnp.linspace(-3, 3, 2001)``.
      title: the figure title; default ``repr(pair)``.

    Returns:
      ``path`` as a :class:`pathlib.Path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = _default_grid() if grid is None else jnp.asarray(grid, jnp.float32)
    fk, bk = dict(pair.forward_kwargs), dict(pair.backward_kwargs)
    f = np.asarray(pair.forward(x, **fk), np.float64)
    b = np.asarray(pair.backward(x, **bk), np.float64)
    db = _derivative(pair.backward, x, bk)
    check = decomposition_violation(
        pair.forward, pair.backward, grid=x, forward_kwargs=fk, backward_kwargs=bk
    )
    xs = np.asarray(x, np.float64)

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_value, ax_grad = fig.subplots(1, 2)
    ax_value.plot(xs, f, label="F (forward)", lw=2)
    ax_value.plot(xs, b, label="B (backward)", lw=1.5, ls="--")
    ax_value.set_xlabel("x")
    ax_value.set_title("values")
    ax_value.legend(loc="best", fontsize="small")
    ax_grad.plot(xs, db, color="C2", label="B′ (gradient factor)")
    ax_grad.set_xlabel("x")
    ax_grad.set_title("B′")
    ax_grad.legend(loc="best", fontsize="small")
    for ax in (ax_value, ax_grad):
        ax.grid(True, alpha=0.3)
    verdict = "F = P∘B, P monotone: " + (
        "consistent" if check["consistent"] else f"violated by {check['violation']:.3g}"
    )
    fig.suptitle(f"{title or repr(pair)}\n{verdict}", fontsize="small")
    path = pathlib.Path(path)
    fig.savefig(path, format="png", dpi=90)
    return path


def _file_name(name: str) -> str:
    safe = name.replace("+", "_plus")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in safe) + ".png"


def plot_catalogue(
    directory: str | pathlib.Path,
    catalogue: Mapping[str, Callable[[], Any]] | None = None,
    *,
    grid: jax.typing.ArrayLike | None = None,
) -> dict[str, pathlib.Path]:
    """One PNG per pair of a catalogue (default ``PAIRS``), named after the pair.

    ``+`` in a name becomes ``_plus`` (``bnn++`` → ``bnn_plus_plus.png``). The directory is
    created if needed. Returns ``{name: path}``.
    """
    if catalogue is None:
        from qflax.quantizers import PAIRS

        catalogue = PAIRS
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return {
        name: plot_pair(factory(), directory / _file_name(name), grid=grid, title=name)
        for name, factory in catalogue.items()
    }
