"""One cell per distinct computation: what two study files may not both define.

:func:`duplicate_cells` lists, over a set of study files (a suite's inline parts included; a
cell a suite runs from another file, or one a study ``uses``, counts once, where it is
defined), every pair of cells that are the same computation (the same notebook with the same
parameters after the notebook's defaults, the same data) or that would write the same report
with different parameters. The runner refuses a study file that adds such a pair
(:func:`anomalib_study.runner`), and a test runs it over ``studies/*.yaml``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from anomalib_study.errors import StudyError
from anomalib_study.studies import (
    RUNNER_PARAMETERS,
    Cell,
    _load_yaml,
    _relative,
    expand_grid,
    notebook_defaults,
    read_studies,
)

__all__ = ["DATA_PARAMETERS", "duplicate_cells", "resolved_cell_parameters"]

DATA_PARAMETERS = ("dataset", "root", "category")  # the data a cell reads


@dataclass(frozen=True)
class _Site:
    """A cell where a study file defines it (an inline part of a suite: the suite, ``inline``)."""

    file: Path
    notebook: Path
    cell: Cell
    inline: bool = False

    @property
    def identity(self) -> tuple[Path, Path, str]:
        return self.file.resolve(), self.notebook, self.cell.name

    def __str__(self) -> str:
        return f"{self.file} cell {self.cell.name}"


def _defined_sites(study_file: str | os.PathLike) -> list[_Site]:
    """The cells a study file runs, each where it is defined (a suite's part naming a study
    file runs that file's cells: they are defined there)."""
    path, data = _load_yaml(study_file)
    suite = "studies" in data
    return [
        _Site(study.path, study.notebook, cell, inline=suite and study.path == path)
        for study in read_studies(path)
        for cell in expand_grid(study)
    ]


def _canonical(value: Any) -> Any:
    """A value as the computation sees it: 1 and 1.0 alike, tuples as lists."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _canonical(item) for key, item in value.items()}
    return str(value)


def resolved_cell_parameters(notebook: Path, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a cell runs its notebook with, the notebook's defaults filled in and the
    runner's own (``metrics_out``, ``report_name``) left out; values canonical (1 == 1.0)."""
    merged = {**notebook_defaults(notebook), **parameters}
    return {name: _canonical(value) for name, value in merged.items() if name not in RUNNER_PARAMETERS}


def duplicate_cells(
    study_files: Iterable[str | os.PathLike],
    *,
    involving: Iterable[str | os.PathLike] | None = None,
    skip_unreadable: bool = False,
) -> list[str]:
    """What breaks "one cell per distinct computation" among the cells the study files define
    (a suite's inline parts included; a cell a suite runs from another file, or one a study
    ``uses``, counts once, where it is defined). One line per problem, naming both files and
    both cells:

    * two cells that are the same computation: the same notebook with the same parameters
      after the notebook's defaults (a parameter given at its default counts as not given),
      the data (``dataset``, ``root``, ``category``) included, whatever the cells are named;
    * two cells that write the same report (``reports/<notebook stem>/<cell>``) with different
      parameters: whichever ran last would replace the other.

    ``involving``: keep only the problems one of whose cells these files define (None: all);
    ``skip_unreadable``: pass over a file that cannot be read (StudyError otherwise)."""
    sites: dict[tuple[Path, Path, str], _Site] = {}
    for study_file in study_files:
        try:
            found = _defined_sites(study_file)
        except StudyError:
            if skip_unreadable:
                continue
            raise
        for site in found:
            sites.setdefault(site.identity, site)
    shown = {key: {**notebook_defaults(site.notebook), **site.cell.parameters} for key, site in sites.items()}
    computations = {
        key: (site.notebook, json.dumps(resolved_cell_parameters(site.notebook, shown[key]), sort_keys=True))
        for key, site in sites.items()
    }

    problems: list[tuple[_Site, _Site, str]] = []
    first_of: dict[tuple[str, str], tuple[Path, Path, str]] = {}
    for key, computation in computations.items():
        earlier = next(k for k, c in computations.items() if c == computation)
        if earlier != key:
            kept, other = sites[earlier], sites[key]
            if kept.inline and not other.inline:  # a suite's inline part refers to a study file's cell, not back
                kept, other = other, kept
            problems.append((kept, other, _same_computation(kept, other, shown[key])))
            continue
        report = (sites[key].notebook.stem, sites[key].cell.name)
        if report in first_of:
            first = first_of[report]
            problems.append(
                (sites[first], sites[key], _same_report(sites[first], sites[key], shown[first], shown[key]))
            )
        else:
            first_of[report] = key
    if involving is not None:
        files = {Path(path).resolve() for path in involving}
        problems = [p for p in problems if p[0].file.resolve() in files or p[1].file.resolve() in files]
    return [text for _, _, text in problems]


def _same_computation(kept: _Site, other: _Site, parameters: Mapping[str, Any]) -> str:
    data = ", ".join(f"{name} {parameters.get(name)!r}" for name in DATA_PARAMETERS if name in parameters)
    given = sorted(set(kept.cell.parameters) ^ set(other.cell.parameters))
    at_default = f"; {', '.join(given)} given in one of them at the notebook's default" if given else ""
    target = _relative(kept.file, other.file.parent)
    fix = (
        f"make that part {{study: {target}, only: [{kept.cell.name}]}}"
        if other.inline
        else f"list it there as uses: {{{target}: [{kept.cell.name}]}}"
    )
    return (
        f"{kept} and {other} are the same computation ({kept.notebook.name}, data {data or 'none'}, every other "
        f"parameter equal after the notebook's defaults{at_default}): define it in one file only, e.g. drop "
        f"{other.cell.name} from {other.file} and {fix}"
    )


def _same_report(first: _Site, second: _Site, a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    differ = [
        name
        for name in sorted(set(a) | set(b))
        if name not in RUNNER_PARAMETERS and _canonical(a.get(name)) != _canonical(b.get(name))
    ]
    shown = ", ".join(f"{name} {a.get(name)!r} vs {b.get(name)!r}" for name in differ[:4])
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    return (
        f"{first} and {second} write the same report reports/{first.notebook.stem}/{first.cell.name}.* with "
        f"different parameters ({shown}{more}): whichever runs last replaces the other; rename the dataset key "
        f"in one of them"
    )
