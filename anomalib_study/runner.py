"""Run a study: execute a notebook over a grid of data sets x backbones (or variants) and render the reports.

A study file (YAML) names one notebook and the grid::

    notebook: notebooks/01_knn_detection.ipynb   # relative to the study file's folder or its parent
    title: Deep nearest-neighbour detection
    headline: [image_auroc, accuracy]             # metric keys shown in the index
    parameters: {k: 100, thres_ratio: 0.92}       # shared by every cell
    backbones: [efficientnet_lite0, dinov2_vits14]
    datasets:
      synthetic_dagm: {dataset: dagm, root: "{synthetic}"}
      mvtec_ad-bottle: {dataset: mvtec_ad, root: "{data}/mvtec_ad", category: bottle}

Each grid cell ``<dataset key>-<backbone>`` runs the notebook once with papermill, with the
parameters ``shared parameters + dataset entry + backbone`` (later ones win), plus
``metrics_out`` and ``report_name``, which the runner sets.

Instead of ``backbones`` (exactly one of the two), the second axis can be ``variants``: a
mapping of names to parameters, for studies whose columns are not backbones (e.g. the
models of one method)::

    variants:
      conv: {model: conv}
      pretrained-efficientnet_lite0: {model: pretrained, backbone: efficientnet_lite0}

Each cell is then ``<dataset key>-<variant name>`` with the parameters ``shared parameters +
dataset entry + variant entry`` (later ones win); a variant, a dataset entry or the shared
parameters may set ``backbone`` (with ``backbones`` only the list sets it). In string parameters,
``{data}`` becomes the real-data folder (``--data`` or $ANOMALIB_STUDY_DATA; a cell that
needs it while it is unset or missing is skipped, with a message), ``{synthetic}`` the
synthetic DAGM-layout set (generated once, into ``cache_root() / "synthetic_dagm"``) and
``{reports}`` the reports folder (for a notebook that reads the other reports, e.g. the
comparison; its inputs hash then covers every other ``*/*.metrics.json`` and ``*.failed.json``).
A dataset entry names a layout (``dataset:``) unless the notebook has no ``dataset`` parameter.
In a backbones grid, a dataset entry may narrow its row to some of the grid's backbones with
``backbones: [dinov2_vits14]`` (for a setting too costly or pointless for the others); that key is
not passed to the notebook.

A suite file (``title`` + ``studies:``, a list of study files or inline studies) runs several
studies in order into the same reports folder, e.g. ``studies/default.yaml``: every method
family on the synthetic set, then the comparison (see :func:`read_studies`).

The kernel starts in the notebook's own folder (as in JupyterLab), so a notebook opened by
hand and one run here see the same relative paths; every path the runner passes is absolute.

Outputs, per cell, under ``reports/<notebook stem>/``:
``<cell>.ipynb`` (executed), ``<cell>.html`` (nbconvert, code inputs hidden, cells tagged
``remove`` dropped) and ``<cell>.metrics.json`` (the notebook's metrics + ``_run``: the study,
cell, resolved parameters, inputs hash, kernel, duration, status and ``provenance``, what
produced the report: package version, git commit of the notebook's checkout and whether it was
dirty, CPU model, logical cores, threads (``OMP_NUM_THREADS``), GPU or "none", python and torch
versions, from :func:`anomalib_study.provenance.collect`; ``anomalib-study verify`` re-runs
reports and names what differs). The
notebook receives ``metrics_out = <scratch folder>/<cell>.metrics.json``; other files it
writes beside it named ``<cell>.<suffix>`` (e.g. ``<cell>.all_results.csv``) are written
beside the report when the cell succeeds (and dropped when it fails). Every
file is written to a temporary name and moved into place, the metrics last, so a crash
never leaves a half-written report. A cell whose notebook raises keeps its last good
report and gets ``<cell>.failed.html`` / ``.failed.ipynb`` / ``.failed.json`` instead;
these are removed by its next successful run. ``reports/index.html`` (:mod:`anomalib_study.frontpage`)
is the front page: the comparison across the reports, then every report with its status.
``_run`` records ``notebook_sha256`` and ``code`` (the package modules loaded in the kernel,
each hashed on its syntax tree without docstrings: :mod:`anomalib_study.freshness`; the
runner appends a cell that writes them and removes it from the executed notebook) beside
``inputs_hash``, so that the index can tell a report whose notebook or code it ran changed
since (stale); a docstring edit or a change to a module the report did not load leaves it
current.

A cell is skipped (status ``"unchanged"``) when its inputs hash (notebook bytes, resolved
parameters, the data-root path) equals the one stored in its metrics file, none of the
modules its kernel loaded changed, its HTML exists and its last run succeeded;
``force=True`` reruns it. (Reports from before ``code`` was recorded hold the hash of every
package source file in their inputs hash instead: for them any package change counts.)

Execution: every cell goes through one picklable function, :func:`execute_cell`
(:class:`CellTask` in, :class:`CellOutput` out), which runs papermill in a scratch folder of
its own and returns everything by value (the executed notebook, the metrics or the error,
the side files, duration, host); it writes no report file. The client renders the HTML
and writes the reports as each result arrives. ``jobs=N`` runs it in N threads here;
``scheduler="tcp://host:8786"`` sends it to the workers of an existing Dask cluster
(``distributed.Client(address).submit(execute_cell, task)``, one cell per worker thread;
``jobs`` must then stay 1). A worker that dies mid-cell makes the scheduler run the cell
again elsewhere (up to ``distributed.scheduler.allowed-failures``, default 3); as nothing
is written before the client holds the result, each report is written exactly once. The
workers must see the notebook's folder and every ``{data}`` path at the client's paths
(else the cell fails, naming the path and the worker's host) and have the kernel
installed; the ``{synthetic}`` folder is named by the client and generated by a worker
that lacks it (seeded: the same set). Each kernel gets ``cores // cells at once``
OpenMP/MKL threads (on a cluster per host, the smallest), passed in the task as the
kernel's environment; variables the client sets win.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import functools
import glob
import html
import json
import os
import re
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from anomalib_study import freshness, io, provenance
from anomalib_study.errors import ParameterError, StudyError

PREFERRED_KERNEL = "anomalib-study"
STUDY_KEYS = ("notebook", "title", "headline", "parameters", "backbones", "variants", "datasets")
SUITE_KEYS = ("title", "studies")
AXES = ("backbones", "variants")  # the grid's second axis: a study file gives exactly one
RUNNER_PARAMETERS = ("metrics_out", "report_name")  # set by the runner, never by a study file
DATASET_BACKBONES = "backbones"  # in a dataset entry of a backbones grid: run only these of the grid's backbones
REPORT_SIZE_WARNING = 1_500_000  # bytes; reports embed their images, notebooks keep them small
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
NEEDS_DATA = "needs the real data: set ANOMALIB_STUDY_DATA or pass --data"

_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_PLACEHOLDERS = ("data", "synthetic", "reports")


@dataclass(frozen=True)
class Study:
    """A validated study file.

    Attributes:
        path: the study file.
        notebook: the notebook it runs (absolute).
        title: shown in the index.
        headline: metric keys shown in the index, in order.
        parameters: shared by every cell.
        backbones: backbone names (one grid column each); empty when the file gives ``variants``.
        datasets: dataset key -> that row's parameters (``dataset`` at least).
        variants: variant name -> that column's parameters (one grid column each); None
            when the file gives ``backbones``.
    """

    path: Path
    notebook: Path
    title: str
    headline: tuple[str, ...]
    parameters: dict[str, Any]
    backbones: tuple[str, ...]
    datasets: dict[str, dict[str, Any]]
    variants: dict[str, dict[str, Any]] | None = None

    @property
    def axis(self) -> str:
        """What the grid's columns are: ``"backbone"`` or ``"variant"``."""
        return "backbone" if self.variants is None else "variant"


@dataclass(frozen=True)
class Cell:
    """One grid cell: a (dataset key, backbone or variant) pair and its unresolved parameters.

    ``backbone`` is the column's backbone (for a variants grid the ``backbone`` parameter
    the cell sets, "" if none); ``variant`` the variant's name (None in a backbones grid).
    """

    name: str
    dataset: str
    backbone: str
    parameters: dict[str, Any]
    variant: str | None = None


@dataclass
class CellResult:
    """What happened to one grid cell.

    Attributes:
        name: ``<dataset key>-<backbone>`` (or ``<dataset key>-<variant>``).
        status: ``"ok"`` (ran), ``"unchanged"`` (inputs unchanged, not rerun),
            ``"failed"`` (the notebook raised; see ``message``) or ``"skipped"``
            (not runnable here, e.g. the real data is absent; see ``message``).
        metrics: the notebook's metrics (the last good ones for ``"unchanged"``), else {}.
        duration_s: execution time of this run (0 when not run).
        html: the report to read: the new or kept report, the ``.failed.html`` of a
            failed cell, None when skipped.
        message: why a cell failed or was skipped ("" otherwise).
        notebook: the stem of the notebook it ran (its reports folder), e.g. ``01_knn_detection``.
    """

    name: str
    dataset: str
    backbone: str
    status: str
    parameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    html: Path | None = None
    message: str = ""
    variant: str | None = None
    notebook: str = ""


# --------------------------------------------------------------------------- study files


def _load_yaml(study_file: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    path = Path(study_file)
    if not path.is_file():
        raise StudyError(f"study file {path} not found: pass a YAML file such as studies/default.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise StudyError(f"study file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise StudyError(
            f"study file {path}: expected a mapping with the keys {', '.join(STUDY_KEYS)} "
            f"(or, for a suite, {', '.join(SUITE_KEYS)})"
        )
    return path, data


def read_study(study_file: str | os.PathLike) -> Study:
    """Read and validate a study file; raises StudyError naming the file and the bad key.

    A suite file (``studies:``) is refused here: :func:`read_studies` reads both kinds."""
    path, data = _load_yaml(study_file)
    if "studies" in data:
        raise StudyError(f"study file {path} is a suite of studies (key 'studies'): read it with read_studies")
    return _parse_study(data, path, f"study file {path}")


def read_studies(study_file: str | os.PathLike) -> list[Study]:
    """The studies a file runs, in order: the file itself, or the parts of a suite.

    A suite file has the keys ``title`` (optional) and ``studies``: a list whose entries are
    study file paths (relative to the suite's folder) or inline study mappings (their
    ``notebook`` resolved like a study file's). Its parts run one after the other, so a part
    may read the reports of the ones before it (e.g. the comparison notebook)::

        title: The whole study on the synthetic set
        studies:
          - knn_quick.yaml
          - {notebook: notebooks/02_patchcore.ipynb, backbones: [efficientnet_lite0],
             datasets: {synthetic_quick: {dataset: dagm, root: "{synthetic}"}}}
    """
    path, data = _load_yaml(study_file)
    if "studies" not in data:
        return [_parse_study(data, path, f"study file {path}")]
    unknown = sorted(set(map(str, data)) - set(SUITE_KEYS))
    if unknown:
        raise StudyError(
            f"study file {path}: key '{unknown[0]}' is not a suite key (a suite has only "
            f"{', '.join(SUITE_KEYS)}; put study keys inside its parts)"
        )
    parts = data["studies"]
    if not isinstance(parts, list) or not parts:
        raise StudyError(f"study file {path}: key 'studies' must be a non-empty list of study files or inline studies")
    studies = []
    for number, part in enumerate(parts):
        where = f"study file {path}: studies[{number}]"
        if isinstance(part, str):
            sub = path.parent / part
            if not sub.is_file():
                raise StudyError(f"{where} names {part}, which is not found (looked at {sub})")
            sub_path, sub_data = _load_yaml(sub)
            if "studies" in sub_data:
                raise StudyError(f"{where} names the suite {part}: a suite's parts must be studies, not suites")
            studies.append(_parse_study(sub_data, sub_path, f"study file {sub_path}"))
        elif isinstance(part, dict):
            studies.append(_parse_study(part, path, where))
        else:
            raise StudyError(f"{where} must be a study file path or a study mapping, got {type(part).__name__}")
    seen: dict[str, Path] = {}
    for study in studies:  # two parts writing the same report would overwrite each other
        for cell in expand_grid(study):
            key = f"{study.notebook.stem}/{cell.name}"
            if key in seen:
                raise StudyError(
                    f"study file {path}: two parts ({seen[key]} and {study.path}) give the report {key}: "
                    "rename a dataset key"
                )
            seen[key] = study.path
    return studies


def _parse_study(data: Mapping[str, Any], path: Path, origin: str) -> Study:
    def bad(key: str, why: str) -> StudyError:
        return StudyError(f"{origin}: key '{key}' {why}")

    unknown = sorted(set(map(str, data)) - set(STUDY_KEYS))
    if unknown:
        raise bad(unknown[0], f"is not a study key (known: {', '.join(STUDY_KEYS)})")

    notebook = data.get("notebook")
    if not isinstance(notebook, str) or not notebook:
        raise bad("notebook", "is missing: name the notebook to run, e.g. notebooks/01_knn_detection.ipynb")
    candidates = (
        [Path(notebook)] if Path(notebook).is_absolute() else [path.parent / notebook, path.parent.parent / notebook]
    )
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise bad("notebook", f"names {notebook}, which is not found (looked at {', '.join(map(str, candidates))})")

    title = data.get("title", found.stem)
    if not isinstance(title, str):
        raise bad("title", "must be a string")
    headline = data.get("headline", [])
    if not isinstance(headline, list) or not all(isinstance(h, str) for h in headline):
        raise bad("headline", "must be a list of metric keys, e.g. [image_auroc, accuracy]")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad("parameters", "must be a mapping of notebook parameters, e.g. {k: 100}")

    given = [axis for axis in AXES if axis in data]
    if len(given) != 1:
        why = (
            "and 'variants' are both given: use one of the two as the grid's second axis"
            if given
            else "is missing: give either 'backbones' (a list of backbone names) or 'variants' "
            "(a mapping of variant name -> parameters)"
        )
        raise bad("backbones", why)
    backbones, variants = data.get("backbones"), None
    if given == ["backbones"]:
        if not isinstance(backbones, list) or not backbones:
            raise bad("backbones", "must be a non-empty list of backbone names (the grid would be empty)")
        for name in backbones:
            if not isinstance(name, str) or not _NAME.match(name):
                raise bad("backbones", f"has the entry {name!r}: use names of letters, digits, '_', '.' and '-'")
        if len(set(backbones)) != len(backbones):
            raise bad("backbones", "lists a backbone twice")
    else:
        backbones, variants = [], data["variants"]
        if not isinstance(variants, dict) or not variants:
            raise bad(
                "variants", "must be a non-empty mapping of name -> {parameter: value, ...} (the grid would be empty)"
            )
        for key, entry in variants.items():
            if not isinstance(key, str) or not _NAME.match(key):
                raise bad(f"variants.{key}", "is not a usable name: use letters, digits, '_', '.' and '-'")
            if not isinstance(entry, dict):
                raise bad(
                    f"variants.{key}", "must be a mapping of notebook parameters, e.g. {model: conv} ({} for none)"
                )

    datasets = data.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise bad(
            "datasets",
            "must be a non-empty mapping of name -> {dataset: <layout>, root: ...} (the grid would be empty)",
        )
    # a notebook without a `dataset` parameter (e.g. the comparison over the reports) takes no layout
    takes_layout = "dataset" in (notebook_parameters(found) or ["dataset"])
    for key, entry in datasets.items():
        if not isinstance(key, str) or not _NAME.match(key):
            raise bad(f"datasets.{key}", "is not a usable name: use letters, digits, '_', '.' and '-'")
        if not isinstance(entry, dict) or (takes_layout and not isinstance(entry.get("dataset"), str)):
            raise bad(f"datasets.{key}", "must be a mapping with at least 'dataset: <layout name>'")
        if "dataset" in entry:
            _check_layout(entry["dataset"], lambda why, key=key: bad(f"datasets.{key}.dataset", why))
        if DATASET_BACKBONES in entry:  # this data set's cells: a subset of the grid's backbones
            only = entry[DATASET_BACKBONES]
            if variants is not None:
                raise bad(f"datasets.{key}.backbones", "only narrows a 'backbones' grid: this study has 'variants'")
            if not isinstance(only, list) or not only or len(set(map(str, only))) != len(only):
                raise bad(f"datasets.{key}.backbones", "must be a non-empty list of backbone names, each once")
            unknown = [name for name in only if name not in backbones]
            if unknown:
                raise bad(
                    f"datasets.{key}.backbones",
                    f"names {unknown[0]!r}, which is not in the study's "
                    f"'backbones' ({', '.join(backbones)}): add it there or remove it here",
                )

    sections = (
        [("parameters", parameters)]
        + [(f"datasets.{k}", v) for k, v in datasets.items()]
        + [(f"variants.{k}", v) for k, v in (variants or {}).items()]
    )
    for where, mapping in sections:
        for name, value in mapping.items():
            if name == DATASET_BACKBONES and where.startswith("datasets."):
                continue  # checked above; not a notebook parameter
            if name in RUNNER_PARAMETERS:
                raise bad(f"{where}.{name}", "is set by the runner for each cell: remove it")
            if name == "backbone" and variants is None:
                raise bad(f"{where}.{name}", "is set per cell from 'backbones': list it there")
            for placeholder in _PLACEHOLDER.findall(value) if isinstance(value, str) else ():
                if placeholder not in _PLACEHOLDERS:
                    raise bad(
                        f"{where}.{name}",
                        f"uses the unknown placeholder {{{placeholder}}} (known: {{data}}, {{synthetic}}, {{reports}})",
                    )

    study = Study(
        path=path,
        notebook=found.resolve(),
        title=title,
        headline=tuple(headline),
        parameters=dict(parameters),
        backbones=tuple(backbones),
        datasets={k: dict(v) for k, v in datasets.items()},
        variants=None if variants is None else {k: dict(v) for k, v in variants.items()},
    )
    names = [cell.name for cell in expand_grid(study)]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # e.g. dataset "a-b" x column "c" and dataset "a" x column "b-c"
        raise bad("datasets", f"and the {study.axis}s give the cell name {twice[0]!r} twice: rename one")
    return study


def _check_layout(layout: str, bad: Callable[[str], StudyError]) -> None:
    try:
        from anomalib_study.data.readers import LAYOUTS
    except ImportError:  # the data layer validates the layout when the notebook runs
        return
    if layout not in LAYOUTS:
        raise bad(f"names the unknown layout {layout!r} (known: {', '.join(sorted(LAYOUTS))})")


def expand_grid(study: Study) -> list[Cell]:
    """The grid, datasets (file order) x backbones or variants (file order); parameters not yet resolved.

    A backbones grid's cell has ``shared + dataset entry + {"backbone": name}``, a variants
    grid's ``shared + dataset entry + variant entry`` (later ones win)."""
    cells = []
    for key, entry in study.datasets.items():
        only = entry.get(DATASET_BACKBONES)
        entry = {name: value for name, value in entry.items() if name != DATASET_BACKBONES}
        if study.variants is None:
            for backbone in study.backbones:
                if only is not None and backbone not in only:
                    continue
                parameters = {**study.parameters, **entry, "backbone": backbone}
                cells.append(Cell(name=f"{key}-{backbone}", dataset=key, backbone=backbone, parameters=parameters))
        else:
            for variant, settings in study.variants.items():
                parameters = {**study.parameters, **entry, **settings}
                cells.append(
                    Cell(
                        name=f"{key}-{variant}",
                        dataset=key,
                        backbone=str(parameters.get("backbone", "")),
                        parameters=parameters,
                        variant=variant,
                    )
                )
    return cells


def notebook_parameters(notebook: str | os.PathLike) -> list[str] | None:
    """Names assigned in the notebook's code cell tagged ``parameters`` (None if it has none).

    Read with ``ast``, not ``papermill.inspect_notebook``, whose line parser drops a
    parameter whose comment contains ``=`` (it still receives its value when run).
    """
    import ast

    import nbformat

    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            try:
                tree = ast.parse(cell.source)
            except SyntaxError as error:
                raise StudyError(f"notebook {notebook}: its parameters cell is not plain Python ({error})") from None
            names = []
            for node in tree.body:
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign)
                    else []
                )
                names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
            return names
    return None


def check_notebook_parameters(study: Study, cells: Sequence[Cell]) -> None:
    """Every parameter a cell sets must be declared in the notebook's ``parameters`` cell."""
    declared = notebook_parameters(study.notebook)
    if declared is None:
        raise StudyError(
            f"notebook {study.notebook} has no code cell tagged 'parameters': tag one (papermill reads it)"
        )
    for name in RUNNER_PARAMETERS + (("backbone",) if study.variants is None else ()):
        if name not in declared:
            raise StudyError(
                f"notebook {study.notebook} does not declare '{name}' in its parameters cell: the runner sets it"
            )
    for cell in cells:
        for name in cell.parameters:
            if name not in declared:
                where = (
                    "parameters"
                    if name in study.parameters
                    else f"datasets.{cell.dataset}"
                    if name in study.datasets.get(cell.dataset, {})
                    else f"variants.{cell.variant}"
                )
                raise StudyError(
                    f"study file {study.path}: key '{where}.{name}' is not a parameter of {study.notebook.name} "
                    f"(its parameters: {', '.join(declared)})"
                )


def select_cells(cells: Sequence[Cell], only: str | Iterable[str] | None) -> list[Cell]:
    """Keep the cells whose name matches one of ``only`` (names or glob patterns); None keeps all."""
    if only is None:
        return list(cells)
    patterns = [only] if isinstance(only, str) else list(only)
    if not patterns:
        return list(cells)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(cell.name, pattern) for cell in cells):
            raise StudyError(
                f"--only {pattern!r} matches no cell of the study (cells: {', '.join(c.name for c in cells)})"
            )
    return [cell for cell in cells if any(fnmatch.fnmatchcase(cell.name, p) for p in patterns)]


def resolve_parameters(
    parameters: Mapping[str, Any], *, data: Path | None, synthetic: Callable[[], Path], reports: Path | None = None
) -> tuple[dict[str, Any], str | None]:
    """Replace ``{data}`` / ``{synthetic}`` / ``{reports}`` in string values.

    Returns ``(parameters, reason)``: ``reason`` is None when the cell can run, else why it
    is skipped (the real data is unset, or the folder it names does not exist; no reports
    folder given for ``{reports}``). ``synthetic`` is only called when a value uses ``{synthetic}``.
    """
    resolved = {}
    for name, value in parameters.items():
        if isinstance(value, str) and "{reports}" in value:
            if reports is None:
                return dict(parameters), "needs the reports folder ({reports}): run it through run_study"
            value = value.replace("{reports}", str(reports))
        if isinstance(value, str) and "{data}" in value:
            if data is None:
                return dict(parameters), NEEDS_DATA
            value = value.replace("{data}", str(data))
            if name == "root" and not Path(value).exists():
                return dict(parameters), f"{NEEDS_DATA} ({value} does not exist)"
        if isinstance(value, str) and "{synthetic}" in value:
            value = value.replace("{synthetic}", str(synthetic()))
        resolved[name] = value
    return resolved, None


SYNTHETIC_SEED = 0  # the seed of the synthetic set behind {synthetic}


def synthetic_path() -> Path:
    """Where the synthetic set behind ``{synthetic}`` lives: ``cache_root() / "synthetic_dagm"`` (not generated)."""
    return io.cache_root() / "synthetic_dagm"


def synthetic_root() -> Path:
    """The synthetic DAGM-layout set behind ``{synthetic}`` (the folder notebook 01 uses too), generated if missing."""
    from anomalib_study.data.synthetic import make_synthetic_dagm

    return Path(make_synthetic_dagm(synthetic_path(), seed=SYNTHETIC_SEED))


# --------------------------------------------------------------------------- hashing


def package_sources_hash() -> str:
    """sha256 over the package's ``*.py`` files (:func:`anomalib_study.io.package_sources_hash`)."""
    return io.package_sources_hash()


def uses_reports(parameters: Mapping[str, Any]) -> bool:
    """Whether a cell reads the other reports (a parameter uses ``{reports}``)."""
    return any(isinstance(value, str) and "{reports}" in value for value in parameters.values())


def reports_hash(reports_dir: Path, exclude: Path | None = None) -> str:
    """sha256 over every ``*/*.metrics.json`` and ``*/*.failed.json`` under ``reports_dir``
    (relative path and bytes, sorted), the folder ``exclude`` left out: the inputs of a cell
    that reads the other reports, so that it reruns exactly when one of them changes."""
    reports_dir = Path(reports_dir)
    skipped = Path(exclude).resolve() if exclude is not None else None
    digest = []
    for pattern in ("*/*.metrics.json", "*/*.failed.json"):
        for path in sorted(reports_dir.glob(pattern)):
            if path.name.startswith(".") or path.parent.resolve() == skipped:
                continue
            digest.append(f"{path.relative_to(reports_dir).as_posix()}:{io.sha256_file(path)}")
    return io.sha256_bytes("\n".join(sorted(digest)).encode())


def inputs_hash(
    notebook: Path, parameters: Mapping[str, Any], data: Path | None, sources_hash: str | None = None
) -> str:
    """sha256 of what a cell's report depends on besides the package code (recorded apart,
    per module: :mod:`anomalib_study.freshness`); ``metrics_out`` (a temporary path) is left
    out. ``sources_hash``: the hash of every package source file, as the reports from
    before the per-module record held it in their inputs hash."""
    kept = {k: v for k, v in parameters.items() if k != "metrics_out"}
    inputs = {"notebook": io.sha256_file(notebook), "parameters": kept, "data_root": str(data) if data else ""}
    if sources_hash is not None:
        inputs["sources"] = sources_hash
    return io.sha256_bytes(json.dumps(inputs, sort_keys=True, default=str).encode())


#: the tag of the cell the runner appends to record the code the kernel loaded (removed from the report)
CODE_RECORD_TAG = "anomalib-study-code-record"
CODE_RECORD_FILE = ".code-record.json"  # in the scratch folder; hidden, so never taken for a side file


def _with_code_record_cell(notebook_bytes: bytes, path: Path) -> bytes:
    """The notebook with a last cell that writes :func:`anomalib_study.freshness.code_record` to ``path``."""
    import nbformat

    node = nbformat.reads(notebook_bytes.decode("utf-8"), as_version=4)
    cell = nbformat.v4.new_code_cell(
        f"import anomalib_study.freshness as _anomalib_study_freshness\n"
        f"_anomalib_study_freshness.write_code_record({str(path)!r})",
        metadata={"tags": [CODE_RECORD_TAG]},
    )
    node.cells.append(cell)
    return nbformat.writes(node).encode("utf-8")


def _without_code_record_cell(node: Any) -> Any:
    node.cells = [cell for cell in node.cells if CODE_RECORD_TAG not in cell.get("metadata", {}).get("tags", [])]
    return node


# --------------------------------------------------------------------------- execution


def choose_kernel(kernel_name: str | None, notebook: Path) -> str:
    """``kernel_name`` if given (must be installed), else "anomalib-study" if installed,
    else the notebook's own kernelspec, else "python3"."""
    from jupyter_client.kernelspec import KernelSpecManager

    installed = KernelSpecManager().find_kernel_specs()
    if kernel_name:
        if kernel_name not in installed:
            raise StudyError(
                f"kernel {kernel_name!r} is not installed (installed: {', '.join(sorted(installed))}); "
                "`bash scripts/install.sh` installs 'anomalib-study'"
            )
        return kernel_name
    if PREFERRED_KERNEL in installed:
        return PREFERRED_KERNEL
    import nbformat

    own = nbformat.read(notebook, as_version=4).metadata.get("kernelspec", {}).get("name")
    return own if own in installed else "python3"


def render_html(notebook_node: Any, title: str) -> str:
    """The report: nbconvert HTML with code inputs hidden, outputs kept, cells tagged ``remove`` dropped."""
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    config = Config()
    config.HTMLExporter.exclude_input = True
    config.HTMLExporter.exclude_input_prompt = True
    config.HTMLExporter.exclude_output_prompt = True
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_cell_tags = {"remove"}
    body, _ = HTMLExporter(config=config).from_notebook_node(notebook_node, resources={"metadata": {"name": title}})
    return body


def kernel_env(threads: int) -> dict[str, str]:
    """The OpenMP/MKL thread variables for a kernel: the client's own values where it sets them, else ``threads``."""
    return {name: os.environ.get(name) or str(threads) for name in THREAD_VARIABLES}


@functools.cache
def _kernel_manager_class() -> type:
    """A jupyter_client kernel manager that adds its ``extra_env`` to the kernel's environment
    (the process's own environment is never changed: safe in threads and on shared workers)."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import Dict

    class KernelWithEnv(AsyncKernelManager):
        extra_env = Dict(config=True, help="variables set in the kernel's environment")

        async def start_kernel(self, **kw: Any) -> None:
            kw["env"] = {**kw.get("env", os.environ), **self.extra_env}
            await super().start_kernel(**kw)

    return KernelWithEnv


@dataclass(frozen=True)
class CellTask:
    """Everything one execution of a cell needs, by value (picklable: sent as is to a Dask worker).

    Attributes:
        name: the cell's name; the executed notebook and the side files are named after it.
        notebook: the study notebook's path (recorded in the executed notebook).
        notebook_bytes: the notebook to execute: the client's copy, the one the inputs hash covers.
        parameters: the resolved parameters (``report_name`` included; ``metrics_out`` is set
            by :func:`execute_cell`, in its scratch folder).
        kernel: the Jupyter kernel's name (it must be installed where the cell runs).
        cwd: the kernel's working folder (the notebook's folder, as in JupyterLab).
        env: variables set in the kernel's environment (the OpenMP/MKL thread counts).
        needs: ``(what, path)`` pairs: paths the executing host must see (the notebook's
            folder, the ``{data}`` paths), else the cell fails naming the path and the host.
        synthetic: the synthetic set's folder, generated there first if missing (None:
            the cell does not use it, or the client generated it already).
    """

    name: str
    notebook: str
    notebook_bytes: bytes
    parameters: dict[str, Any]
    kernel: str
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[tuple[str, str], ...] = ()
    synthetic: str | None = None


@dataclass
class CellOutput:
    """What one execution gives back, by value; :func:`execute_cell` writes no report file.

    Attributes:
        name: the cell's name.
        notebook: the executed notebook (nbformat JSON, UTF-8), None if nothing was executed.
        metrics: what the notebook wrote to ``metrics_out`` (None when it failed).
        error: ``(ename, evalue)`` when the cell failed, else None.
        side_files: file name -> bytes: the other ``<cell>.<suffix>`` files the notebook
            wrote beside ``metrics_out`` (only when it succeeded).
        duration_s: the notebook's execution time.
        started_at: when it started (ISO 8601, local time of the executing host).
        host: the executing host's name.
        code: the package modules the kernel loaded, hashed
            (:func:`anomalib_study.freshness.code_record`); None if not recorded.
    """

    name: str
    notebook: bytes | None
    metrics: dict[str, Any] | None
    error: tuple[str, str] | None
    side_files: dict[str, bytes] = field(default_factory=dict)
    duration_s: float = 0.0
    started_at: str = ""
    host: str = ""
    code: dict[str, Any] | None = None


def execute_cell(task: CellTask) -> CellOutput:
    """Execute one cell with papermill in a scratch folder of its own and return everything by value.

    Runs the same locally (a thread of ``--jobs``) and on a Dask worker. Before executing,
    the paths in ``task.needs`` are checked and the synthetic set is generated if
    ``task.synthetic`` names a missing one. Never raises for a failing cell: the error
    comes back in ``CellOutput.error`` (a notebook that raised, a kernel that died or is not
    installed, a path this host does not see, no metrics written).
    """
    host = socket.gethostname()
    started_at = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    try:
        return _execute_in_scratch(task, host, started_at)
    except Exception as exc:  # the host's own trouble (disk full, ...) is this cell's failure, by value too
        return CellOutput(
            task.name, None, None, (type(exc).__name__, f"on host {host}: {exc}"), started_at=started_at, host=host
        )


def _execute_in_scratch(task: CellTask, host: str, started_at: str) -> CellOutput:
    with tempfile.TemporaryDirectory(prefix=f"anomalib-study-{task.name}-") as folder:
        scratch = Path(folder)
        executed = scratch / f"{task.name}.ipynb"
        metrics_out = scratch / f"{task.name}.metrics.json"
        error, duration = _prepare_host(task, host), 0.0
        if error is None:
            error, duration = _papermill(
                task, scratch / "input" / Path(task.notebook).name, executed, metrics_out, host
            )

        metrics = None
        if error is None:
            metrics = io.read_json_object(metrics_out)
            if metrics is None:
                error = (
                    "MissingMetrics",
                    f"the notebook did not write a JSON object to metrics_out ({metrics_out.name})",
                )
        side_files = (
            {}
            if error is not None
            else {
                path.name: path.read_bytes()
                for path in sorted(scratch.glob(f"{glob.escape(task.name)}.*"))
                if path not in (executed, metrics_out) and path.is_file()
            }
        )
        notebook = None
        if executed.is_file():
            import nbformat

            node = _without_code_record_cell(nbformat.read(executed, as_version=4))
            node.metadata.setdefault("papermill", {})["input_path"] = task.notebook  # not the scratch copy
            notebook = nbformat.writes(node).encode("utf-8")
        code = freshness.read_code_record(scratch / CODE_RECORD_FILE) if error is None else None
    return CellOutput(
        task.name, notebook, metrics if error is None else None, error, side_files, duration, started_at, host, code
    )


def _prepare_host(task: CellTask, host: str) -> tuple[str, str] | None:
    """Check that this host sees the paths the cell needs; generate the synthetic set if missing."""
    for what, path in task.needs:
        if not Path(path).exists():
            return (
                "MissingPath",
                f"host {host} does not see {path} ({what}): every worker needs the data and "
                "the project at the same paths as the client (shared or mounted there)",
            )
    if task.synthetic is not None:
        try:
            _ensure_synthetic(Path(task.synthetic))
        except Exception as exc:
            return (
                type(exc).__name__,
                f"could not generate the synthetic set at {task.synthetic} on host {host}: "
                f"{exc}; set ANOMALIB_STUDY_CACHE on the client to a folder the workers can write",
            )
    return None


def _ensure_synthetic(root: Path) -> None:
    """Generate the synthetic set at ``root`` unless it is there; a lock file serialises the
    cells (threads, worker processes) of one host that would generate it at once."""
    import fcntl

    from anomalib_study.data.synthetic import make_synthetic_dagm

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        make_synthetic_dagm(root, seed=SYNTHETIC_SEED)  # a no-op when the set is there


def _papermill(
    task: CellTask, source: Path, executed: Path, metrics_out: Path, host: str
) -> tuple[tuple[str, str] | None, float]:
    """Run papermill; returns ``(error, seconds)``: ``error`` is ``(ename, evalue)`` if the cell
    failed, else None; the clock starts after the imports (seconds in a fresh worker)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    from traitlets.config import Config

    source.parent.mkdir()
    source.write_bytes(_with_code_record_cell(task.notebook_bytes, executed.parent / CODE_RECORD_FILE))
    manager = _kernel_manager_class()
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters={**task.parameters, "metrics_out": str(metrics_out)},
            kernel_name=task.kernel,
            progress_bar=False,
            log_output=False,
            # the kernel's working folder, set without papermill's process-wide chdir (unsafe in threads)
            resources={"metadata": {"path": task.cwd}},
            kernel_manager_class=manager,
            config=Config({manager.__name__: {"extra_env": dict(task.env)}}),
        )
        error = None
    except PapermillExecutionError as exc:
        error = (exc.ename, str(exc.evalue))
    except Exception as exc:  # kernel died, would not start, ...: still a failed cell, not a crashed study
        error = (type(exc).__name__, str(exc))
        if error[0] == "NoSuchKernel":
            error = (
                error[0],
                f"kernel {task.kernel!r} is not installed on host {host}: "
                "`bash scripts/install.sh` there installs 'anomalib-study'",
            )
    return error, round(time.perf_counter() - start, 2)


CONNECT_TIMEOUT_S = 30  # waiting for the scheduler to answer
WORKER_WAIT_S = 120  # waiting for a first worker to join it


def connect_cluster(address: str) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address`` with at least one worker.

    Raises StudyError when dask.distributed is not installed, the scheduler does not
    answer, or no worker joins it within ``WORKER_WAIT_S``."""
    try:
        from distributed import Client
    except ImportError:
        raise StudyError(
            "--scheduler needs dask.distributed, which is not installed: "
            "pip install 'anomalib-study[cluster]' (or pip install distributed)"
        ) from None
    try:
        client = Client(address, set_as_default=False, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise StudyError(
            f"cannot reach the Dask scheduler at {address!r} ({exc}): start one with `dask scheduler` "
            "and pass the address it prints, e.g. --scheduler tcp://10.0.0.5:8786"
        ) from None
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        client.close()
        raise StudyError(
            f"no Dask worker joined the scheduler at {address} within {WORKER_WAIT_S} s: "
            f"start workers with `dask worker {address}`"
        ) from None
    return client


def cluster_kernel_threads(client: Any) -> int:
    """OpenMP/MKL threads per kernel on the cluster: per host, its cores // the cells it runs at
    once (the threads of its workers); the smallest over the hosts."""
    machines = client.run(_host_and_cores, on_error="ignore")  # worker address -> (host name, cores)
    slots: dict[str, int] = {}
    cores: dict[str, int] = {}
    for address, threads in client.nthreads().items():
        host, count = machines.get(address, (address, 1))
        slots[host] = slots.get(host, 0) + int(threads)
        cores[host] = int(count or 1)
    return max(1, min((cores[host] // slots[host] for host in slots), default=1))


def _host_and_cores() -> tuple[str, int | None]:
    return socket.gethostname(), os.cpu_count()


def _unlink(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _headline_text(metrics: Mapping[str, Any], headline: Sequence[str]) -> str:
    from anomalib_study.frontpage import format_value

    return " ".join(f"{key}={format_value(metrics.get(key))}" for key in headline)


@dataclass
class _Pending:
    """A cell to execute: its task and what the client needs to write its report."""

    index: int
    tag: str
    cell: Cell
    parameters: dict[str, Any]
    digest: str
    task: CellTask


class _Runner:
    """Prepares the cells of one study and writes their reports into ``reports/<notebook stem>/``.

    ``on_cluster``: the cells run on Dask workers, which generate the synthetic set
    themselves (the client only names its folder) and are named in the log."""

    def __init__(
        self,
        study: Study,
        out_dir: Path,
        kernel: str,
        data: Path | None,
        force: bool,
        log: Callable[[str], None],
        total: int,
        env: Mapping[str, str],
        on_cluster: bool = False,
    ):
        self.study, self.out_dir, self.kernel, self.data, self.force = study, out_dir, kernel, data, force
        self.log, self.total, self.env, self.on_cluster = log, total, dict(env), on_cluster
        self.sources_hash = package_sources_hash()  # for the reports from before the per-module record
        self.notebook_bytes = study.notebook.read_bytes()
        self._synthetic: Path | None = None

    def synthetic_root(self) -> Path:
        if self._synthetic is None:  # generated once per study (on a cluster by the workers that lack it)
            self._synthetic = synthetic_path() if self.on_cluster else synthetic_root()
        return self._synthetic

    def prepare(self, index: int, cell: Cell) -> CellResult | _Pending:
        """The cell's result when it is not run (skipped, unchanged), else what to execute."""
        tag = f"[{index}/{self.total}] {cell.name}"
        parameters, reason = resolve_parameters(
            cell.parameters, data=self.data, synthetic=self.synthetic_root, reports=self.out_dir.parent
        )
        if reason:
            self.log(f"{tag}: skipped, {reason}")
            return CellResult(
                cell.name, cell.dataset, cell.backbone, "skipped", parameters, message=reason, variant=cell.variant
            )
        parameters["report_name"] = cell.name
        paths = self.paths(cell.name)
        previous = io.read_json_object(paths["metrics"]) or {}
        run_info = previous.get("_run", {})
        legacy = "code" not in run_info  # run before the per-module record: every source file counts
        digest = inputs_hash(self.study.notebook, parameters, self.data)
        recorded_digest = (
            inputs_hash(self.study.notebook, parameters, self.data, self.sources_hash) if legacy else digest
        )
        if uses_reports(cell.parameters):  # its inputs are the other reports, too
            others = reports_hash(self.out_dir.parent, exclude=self.out_dir)
            digest, recorded_digest = (io.sha256_bytes(f"{d}:{others}".encode()) for d in (digest, recorded_digest))

        code_current = legacy or freshness.changed_modules(run_info.get("code")) == []
        if (
            not self.force
            and run_info.get("inputs_hash") == recorded_digest
            and code_current
            and run_info.get("status") == "ok"
            and paths["html"].is_file()
            and not paths["failed_json"].exists()
        ):
            metrics = {k: v for k, v in previous.items() if k != "_run"}
            self.log(f"{tag}: unchanged, not rerun ({_headline_text(metrics, self.study.headline)})".replace(" ()", ""))
            return CellResult(
                cell.name,
                cell.dataset,
                cell.backbone,
                "unchanged",
                parameters,
                metrics,
                html=paths["html"],
                variant=cell.variant,
            )

        uses_synthetic = any(isinstance(value, str) and "{synthetic}" in value for value in cell.parameters.values())
        needs = [("the notebook's folder, where its kernel starts", str(self.study.notebook.parent))]
        needs += [
            (f"parameter {name}", str(parameters[name]))
            for name, value in cell.parameters.items()
            if isinstance(value, str) and "{data}" in value and Path(parameters[name]).exists()
        ]
        task = CellTask(
            name=cell.name,
            notebook=str(self.study.notebook),
            notebook_bytes=self.notebook_bytes,
            parameters=parameters,
            kernel=self.kernel,
            cwd=str(self.study.notebook.parent),
            env=self.env,
            needs=tuple(needs),
            synthetic=str(self.synthetic_root()) if self.on_cluster and uses_synthetic else None,
        )
        return _Pending(index, tag, cell, parameters, digest, task)

    def paths(self, name: str) -> dict[str, Path]:
        base = self.out_dir / name
        return {
            "ipynb": base.with_name(f"{name}.ipynb"),
            "html": base.with_name(f"{name}.html"),
            "metrics": base.with_name(f"{name}.metrics.json"),
            "failed_ipynb": base.with_name(f"{name}.failed.ipynb"),
            "failed_html": base.with_name(f"{name}.failed.html"),
            "failed_json": base.with_name(f"{name}.failed.json"),
        }

    def record(self, pending: _Pending, output: CellOutput) -> CellResult:
        """Render and write the report of an executed cell (every file atomically, the metrics
        last); a failed cell keeps its last good report and gets ``<cell>.failed.*``."""
        import nbformat

        cell, parameters, tag, paths = pending.cell, pending.parameters, pending.tag, self.paths(pending.cell.name)
        error, duration = output.error, output.duration_s
        run = {
            "study": str(self.study.path),
            "title": self.study.title,
            "notebook": str(self.study.notebook),
            "cell": cell.name,
            "dataset": cell.dataset,
            "backbone": cell.backbone,
            "headline": list(self.study.headline),
            "parameters": parameters,
            "inputs_hash": pending.digest,
            "kernel": self.kernel,
            "duration_s": duration,
            "started_at": output.started_at,
            # recorded apart from inputs_hash, so that the index can tell a stale report
            "notebook_sha256": io.sha256_bytes(self.notebook_bytes),
            "code": output.code,
            # the client's provenance; the kernel's torch reads OMP_NUM_THREADS and evaluate records the
            # count it ran with (on a cluster, evaluate's environment describes the worker's machine)
            "provenance": provenance.collect(self.study.notebook, torch_threads=False),
        }
        run["host"] = output.host
        if cell.variant is not None:  # a variants grid: the index's second column names the variant
            run["variant"] = cell.variant
        title = f"{self.study.title}: {cell.name}"
        node = nbformat.reads(output.notebook.decode("utf-8"), as_version=4) if output.notebook is not None else None
        page = ""
        if error is None:
            try:
                page = render_html(node, title)
            except Exception as exc:  # a report that cannot be rendered is a failed cell, too
                error, node = (type(exc).__name__, f"rendering the report failed: {exc}"), None
        where = f" on {output.host}" if self.on_cluster and output.host else ""

        run["status"] = "ok" if error is None else "failed"
        if error is not None:
            run["error"] = {"ename": error[0], "evalue": error[1]}
            if output.notebook is not None:
                with io.atomic_write(paths["failed_ipynb"]) as handle:
                    handle.write(output.notebook)
            else:  # nothing was executed: no stale failed notebook may pose as this run's
                _unlink(paths["failed_ipynb"])
            try:  # the executed notebook shows the error cell; without one, a plain page says it
                page = render_html(node, f"FAILED {title}") if node is not None else _error_page(title, *error)
            except Exception:
                page = _error_page(title, *error)
            with io.atomic_write(paths["failed_html"], "w") as handle:
                handle.write(page)
            io.write_json(paths["failed_json"], {"_run": run})
            self.log(
                f"{tag}: FAILED after {duration:.1f} s{where}: {error[0]}: {_first_line(error[1])} "
                f"(see {paths['failed_html']})"
            )
            return CellResult(
                cell.name,
                cell.dataset,
                cell.backbone,
                "failed",
                parameters,
                {},
                duration,
                paths["failed_html"],
                f"{error[0]}: {error[1]}",
                variant=cell.variant,
            )

        metrics = dict(output.metrics or {})
        metrics.setdefault(
            "synthetic", any(isinstance(v, str) and "{synthetic}" in v for v in cell.parameters.values())
        )
        metrics["_run"] = run
        with io.atomic_write(paths["ipynb"]) as handle:
            handle.write(output.notebook)
        for name, data in sorted(output.side_files.items()):  # the notebook's side files (tables, ...)
            if Path(name).name == name and name.startswith(f"{cell.name}."):
                with io.atomic_write(self.out_dir / name) as handle:
                    handle.write(data)
        with io.atomic_write(paths["html"], "w") as handle:
            handle.write(page)
        io.write_json(paths["metrics"], metrics)  # last: a complete report is one with matching metrics
        _unlink(paths["failed_ipynb"], paths["failed_html"], paths["failed_json"])
        size = paths["html"].stat().st_size
        if size > REPORT_SIZE_WARNING:
            self.log(
                f"{tag}: warning: {paths['html']} is {size / 1e6:.1f} MB; keep the notebook's images "
                "small (JPEG thumbnails)"
            )
        metrics.pop("_run")
        self.log(f"{tag}: ok in {duration:.1f} s{where} {_headline_text(metrics, self.study.headline)}".rstrip())
        return CellResult(
            cell.name,
            cell.dataset,
            cell.backbone,
            "ok",
            parameters,
            metrics,
            duration,
            paths["html"],
            variant=cell.variant,
        )


def _lost(task: CellTask, exc: BaseException) -> CellOutput:
    """The output of a cell whose execution raised instead of returning (e.g. its worker died
    more often than the scheduler allows, or could not import the package)."""
    ename = type(exc).__name__
    try:
        detail = str(exc)
    except Exception:  # an exception rebuilt on the client may lack what its __str__ reads
        detail = repr(exc.args)
    if ename == "KilledWorker":
        evalue = (
            f"the workers running this cell died repeatedly ({detail}); raise the scheduler's "
            "distributed.scheduler.allowed-failures or give the workers more memory"
        )
    elif isinstance(exc, ImportError):
        evalue = f"{detail}: install anomalib_study on every worker (bash scripts/install.sh)"
    else:
        evalue = detail or "the cell's task was cancelled or its result lost (see the scheduler's log)"
    return CellOutput(task.name, None, None, (ename, evalue))


def _run_local(runner: _Runner, pending: Sequence[_Pending], jobs: int) -> list[CellResult]:
    """Execute in this process, ``jobs`` cells at once (threads, each driving its own kernel)."""

    def execute(item: _Pending) -> CellOutput:
        runner.log(f"{item.tag}: start")
        return execute_cell(item.task)

    if jobs == 1:
        return [runner.record(item, execute(item)) for item in pending]
    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(execute, item): item for item in pending}
        for future in as_completed(futures):  # written as each arrives
            item = futures[future]
            try:
                output = future.result()
            except Exception as exc:
                output = _lost(item.task, exc)
            results.append(runner.record(item, output))
    return results


def _run_on_cluster(runner: _Runner, pending: Sequence[_Pending], client: Any, address: str) -> list[CellResult]:
    """Send each cell to the Dask cluster and write its report when its result arrives.

    A worker that dies mid-cell makes the scheduler run the cell again elsewhere (up to
    ``distributed.scheduler.allowed-failures`` times); nothing is written before the
    client holds the result, so each report is written exactly once. No ``retries``: a
    failing notebook comes back by value, and running it again would fail again."""
    from distributed import as_completed as cluster_completed

    futures, items = [], {}
    for item in pending:
        # a deterministic key: the same cell with the same inputs is one task on the cluster
        future = client.submit(execute_cell, item.task, key=f"anomalib-study-{item.cell.name}-{item.digest[:16]}")
        futures.append(future)
        items[future.key] = item
        runner.log(f"{item.tag}: sent to {address}")
    results = []
    for future in cluster_completed(futures, loop=client.loop):  # written as each arrives
        item = items[future.key]
        try:
            output = future.result()
        except Exception as exc:
            output = _lost(item.task, exc)
        results.append(runner.record(item, output))
        future.release()
    return results


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _error_page(title: str, ename: str, evalue: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>FAILED {html.escape(title)}</title></head>"
        f"<body><h1>FAILED {html.escape(title)}</h1><pre>{html.escape(ename)}: {html.escape(evalue)}</pre>"
        "</body></html>\n"
    )


def run_study(
    study_file: str | os.PathLike,
    *,
    reports_dir: str | os.PathLike = "reports",
    jobs: int = 1,
    data_root: str | os.PathLike | None = None,
    only: str | Iterable[str] | None = None,
    force: bool = False,
    kernel_name: str | None = None,
    device: str | None = None,
    scheduler: str | None = None,
    log: Callable[[str], None] = print,
) -> list[CellResult]:
    """Execute a study's grid and render its reports; returns one CellResult per selected cell.

    Args:
        study_file: the YAML study file (see the module docstring), or a suite of studies
            (``studies:``, see :func:`read_studies`), whose parts run in order.
        reports_dir: reports go to ``reports_dir/<notebook stem>/``; the index to
            ``reports_dir/index.html`` (rewritten at the end).
        jobs: grid cells run at once in this process (each in its own kernel process with
            ``cpu_count // jobs`` OpenMP/MKL threads unless those variables are set). Must
            be 1 with ``scheduler``.
        data_root: the real data folder for ``{data}`` (default $ANOMALIB_STUDY_DATA).
        only: cell names or glob patterns to run, or ``<notebook stem>/<cell>`` (None = all; in a
            suite, across its parts).
        force: rerun cells whose inputs did not change.
        kernel_name: Jupyter kernel (default "anomalib-study" if installed, else the
            notebook's own, else "python3").
        device: if given, the ``device`` parameter of every cell (e.g. "cuda").
        scheduler: the address of a Dask scheduler (e.g. ``"tcp://10.0.0.5:8786"``): the
            cells run on its workers, as many at once as they have threads, and the
            reports are written here as each result arrives (see the module docstring).
        log: called with one line per cell start / finish.

    A failing notebook does not stop the study: its cell has status ``"failed"`` (use
    :func:`exit_code`). Bad study files raise StudyError before anything runs.
    """
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ParameterError(f"jobs must be a whole number >= 1, got {jobs!r}")
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
        raise ParameterError(
            f"scheduler must be a Dask scheduler address such as tcp://10.0.0.5:8786, got {scheduler!r}"
        )
    if scheduler is not None and jobs != 1:
        raise ParameterError(
            f"--jobs {jobs} and --scheduler are exclusive: on a Dask cluster the workers' threads "
            "set how many cells run at once (`dask worker --nthreads N`)"
        )
    studies = read_studies(study_file)
    grids = []
    for study in studies:
        cells = expand_grid(study)
        if device is not None:
            cells = [dataclasses.replace(c, parameters={**c.parameters, "device": device}) for c in cells]
        check_notebook_parameters(study, cells)
        grids.append(cells)
    patterns = [] if only is None else [only] if isinstance(only, str) else list(only)
    if patterns:  # a pattern must match a cell of some part; each part keeps its matches

        def matches(study: Study, cell: Cell, pattern: str) -> bool:
            return fnmatch.fnmatchcase(cell.name, pattern) or fnmatch.fnmatchcase(
                f"{study.notebook.stem}/{cell.name}", pattern
            )

        for pattern in patterns:
            if not any(matches(s, c, pattern) for s, cells in zip(studies, grids) for c in cells):
                names = ", ".join(f"{s.notebook.stem}/{c.name}" for s, cells in zip(studies, grids) for c in cells)
                raise StudyError(f"--only {pattern!r} matches no cell of the study (cells: {names})")
        grids = [[c for c in cells if any(matches(s, c, p) for p in patterns)] for s, cells in zip(studies, grids)]
    data = io.data_root(data_root)
    reports = Path(reports_dir).resolve()  # absolute: the kernel runs in the notebook's folder
    results: list[CellResult] = []
    skipped: dict[tuple[str, str], str] = {}  # (notebook stem, cell) -> why, listed on the front page
    sources: str | None = None

    client = connect_cluster(scheduler) if scheduler is not None else None
    try:
        threads = cluster_kernel_threads(client) if client is not None else max(1, (os.cpu_count() or 1) // jobs)
        for study, cells in zip(studies, grids):  # parts in order: a later part may read the earlier reports
            if not cells:
                continue
            kernel = choose_kernel(kernel_name, study.notebook)
            runner = _Runner(
                study,
                reports / study.notebook.stem,
                kernel,
                data.resolve() if data else None,
                force,
                log,
                len(cells),
                kernel_env(threads),
                on_cluster=client is not None,
            )
            where = f"Dask scheduler {scheduler}" if client is not None else f"jobs {jobs}"
            log(f"study {study.path}: {len(cells)} cell(s) of {study.notebook.name}, kernel {kernel}, {where}")
            prepared = [runner.prepare(i, cell) for i, cell in enumerate(cells, 1)]
            pending = [item for item in prepared if isinstance(item, _Pending)]
            if client is not None:
                executed = _run_on_cluster(runner, pending, client, scheduler)
            else:
                executed = _run_local(runner, pending, jobs)
            by_name = {result.name: result for result in executed}
            part = [by_name[item.cell.name] if isinstance(item, _Pending) else item for item in prepared]
            for result in part:
                result.notebook = study.notebook.stem
            results += part
            skipped.update({(study.notebook.stem, r.name): r.message for r in part if r.status == "skipped"})
            sources = runner.sources_hash
    finally:
        if client is not None:
            client.close()

    index = write_index(reports, skipped=skipped, sources_hash=sources)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "unchanged", "failed", "skipped")}
    log(f"study {study_file}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; index {index}")
    return results


def exit_code(results: Iterable[CellResult]) -> int:
    """1 if any cell failed, else 0 (skipped cells are not failures)."""
    return int(any(r.status == "failed" for r in results))


# --------------------------------------------------------------------------- index


def write_index(
    reports_dir: str | os.PathLike = "reports",
    *,
    skipped: Mapping[tuple[str, str], str] | None = None,
    sources_hash: str | None = None,
) -> Path:
    """Write the front page ``reports_dir/index.html`` (:func:`anomalib_study.frontpage.write_index`).

    ``skipped``: (notebook stem, cell name) -> why, for the cells of the run just made that
    could not run here (listed with their reason); ``sources_hash``: the package sources its
    cells ran with (default: now's)."""
    from anomalib_study import frontpage

    return frontpage.write_index(reports_dir, skipped=dict(skipped or {}), sources_hash=sources_hash)
