"""What a training run reports about its quantizers: instruments registered per family.

A reporter is ``fn(spec, workdir) -> {section: {key: value}}`` registered for a family name
with :func:`register_reporter`; :func:`run_reports` calls the reporter of every spec a model
uses and merges the sections (``summary.json`` gets them). The pair family's reporter is
registered here: each pair a run trains with gets its ProxConnect++ criterion
(:func:`~qflax.studies.pair_criterion`) under ``pair_criterion`` and its plot (``F``, ``B``,
``B′``) as ``pair_<name>.png`` in the workdir. A user's family registers its own the same way.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterable
from typing import Any

from qflax.studies._decomposition import pair_criterion
from qflax.studies._plots import _file_name, plot_pair

__all__ = ["REPORTERS", "register_reporter", "run_reports"]

Reporter = Callable[[Any, "pathlib.Path | None"], dict[str, dict[str, Any]]]
REPORTERS: dict[str, Reporter] = {}


def register_reporter(kind: str, reporter: Reporter) -> Reporter:
    """Registers ``reporter(spec, workdir) -> {section: {key: value}}`` for family ``kind``."""
    if not callable(reporter):
        raise ValueError(f"reporter={reporter!r} is not callable; allowed: fn(spec, workdir)")
    REPORTERS[kind] = reporter
    return reporter


def run_reports(specs: Iterable[Any], workdir: str | pathlib.Path | None) -> dict[str, Any]:
    """The merged reports of ``specs`` (each distinct spec once); ``workdir`` None: no files."""
    path = None if workdir is None else pathlib.Path(workdir)
    out: dict[str, dict[str, Any]] = {}
    seen = set()
    for spec in specs:
        if spec is None or spec in seen or spec.kind not in REPORTERS:
            continue
        seen.add(spec)
        for section, entries in REPORTERS[spec.kind](spec, path).items():
            out.setdefault(section, {}).update(entries)
    return out


def _pair_report(spec: Any, workdir: pathlib.Path | None) -> dict[str, dict[str, Any]]:
    cfg = spec.config
    q = cfg.make()
    result = pair_criterion(q)
    result = {
        "forward": getattr(q.forward, "__name__", repr(q.forward)),
        "backward": getattr(q.backward, "__name__", repr(q.backward)),
        "kwargs": dict(cfg.kwargs),
        **result,
    }
    if workdir is not None:
        name = "pair_" + _file_name(cfg.label.replace("/", "-"))
        plot_pair(q, workdir / name, title=f"{cfg.label}: {q!r}")
        result["plot"] = name
    return {"pair_criterion": {cfg.label: result}}


register_reporter("pair", _pair_report)
