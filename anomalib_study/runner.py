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
notebook receives ``metrics_out = <staging folder>/<cell>.metrics.json``; other files it
writes beside it named ``<cell>.<suffix>`` (e.g. ``<cell>.all_results.csv``) are moved
beside the report when the cell succeeds (and dropped when it fails). Every
file is written to a temporary name and moved into place, the metrics last, so a crash
never leaves a half-written report. A cell whose notebook raises keeps its last good
report and gets ``<cell>.failed.html`` / ``.failed.ipynb`` / ``.failed.json`` instead;
these are removed by its next successful run. ``reports/index.html`` (:mod:`anomalib_study.frontpage`)
is the front page: the comparison across the reports, then every report with its status.
``_run`` records ``notebook_sha256`` and ``sources_hash`` beside ``inputs_hash``, so that the
index can tell a report whose notebook or package code changed since it ran (stale).

A cell is skipped (status ``"unchanged"``) when its inputs hash (notebook bytes, resolved
parameters, the package's source files, the data-root path) equals the one stored in its
metrics file, its HTML exists and its last run succeeded; ``force=True`` reruns it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import glob
import html
import json
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import yaml

from anomalib_study import io, provenance
from anomalib_study.errors import ParameterError, StudyError

PREFERRED_KERNEL = "anomalib-study"
STUDY_KEYS = ("notebook", "title", "headline", "parameters", "backbones", "variants", "datasets")
SUITE_KEYS = ("title", "studies")
AXES = ("backbones", "variants")  # the grid's second axis: a study file gives exactly one
RUNNER_PARAMETERS = ("metrics_out", "report_name")  # set by the runner, never by a study file
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
        raise StudyError(f"study file {path}: expected a mapping with the keys {', '.join(STUDY_KEYS)} "
                         f"(or, for a suite, {', '.join(SUITE_KEYS)})")
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
        raise StudyError(f"study file {path}: key '{unknown[0]}' is not a suite key (a suite has only "
                         f"{', '.join(SUITE_KEYS)}; put study keys inside its parts)")
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
                raise StudyError(f"study file {path}: two parts ({seen[key]} and {study.path}) give the report {key}: "
                                 "rename a dataset key")
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
    candidates = [Path(notebook)] if Path(notebook).is_absolute() else [path.parent / notebook, path.parent.parent / notebook]
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
        why = ("and 'variants' are both given: use one of the two as the grid's second axis"
               if given else "is missing: give either 'backbones' (a list of backbone names) or 'variants' "
               "(a mapping of variant name -> parameters)")
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
            raise bad("variants", "must be a non-empty mapping of name -> {parameter: value, ...} (the grid would be empty)")
        for key, entry in variants.items():
            if not isinstance(key, str) or not _NAME.match(key):
                raise bad(f"variants.{key}", "is not a usable name: use letters, digits, '_', '.' and '-'")
            if not isinstance(entry, dict):
                raise bad(f"variants.{key}", "must be a mapping of notebook parameters, e.g. {model: conv} ({} for none)")

    datasets = data.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise bad("datasets", "must be a non-empty mapping of name -> {dataset: <layout>, root: ...} (the grid would be empty)")
    # a notebook without a `dataset` parameter (e.g. the comparison over the reports) takes no layout
    takes_layout = "dataset" in (notebook_parameters(found) or ["dataset"])
    for key, entry in datasets.items():
        if not isinstance(key, str) or not _NAME.match(key):
            raise bad(f"datasets.{key}", "is not a usable name: use letters, digits, '_', '.' and '-'")
        if not isinstance(entry, dict) or (takes_layout and not isinstance(entry.get("dataset"), str)):
            raise bad(f"datasets.{key}", "must be a mapping with at least 'dataset: <layout name>'")
        if "dataset" in entry:
            _check_layout(entry["dataset"], lambda why, key=key: bad(f"datasets.{key}.dataset", why))

    sections = ([("parameters", parameters)] + [(f"datasets.{k}", v) for k, v in datasets.items()]
                + [(f"variants.{k}", v) for k, v in (variants or {}).items()])
    for where, mapping in sections:
        for name, value in mapping.items():
            if name in RUNNER_PARAMETERS:
                raise bad(f"{where}.{name}", "is set by the runner for each cell: remove it")
            if name == "backbone" and variants is None:
                raise bad(f"{where}.{name}", "is set per cell from 'backbones': list it there")
            for placeholder in _PLACEHOLDER.findall(value) if isinstance(value, str) else ():
                if placeholder not in _PLACEHOLDERS:
                    raise bad(f"{where}.{name}", f"uses the unknown placeholder {{{placeholder}}} "
                                         "(known: {data}, {synthetic}, {reports})")

    study = Study(path=path, notebook=found.resolve(), title=title, headline=tuple(headline),
                  parameters=dict(parameters), backbones=tuple(backbones),
                  datasets={k: dict(v) for k, v in datasets.items()},
                  variants=None if variants is None else {k: dict(v) for k, v in variants.items()})
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
        if study.variants is None:
            for backbone in study.backbones:
                parameters = {**study.parameters, **entry, "backbone": backbone}
                cells.append(Cell(name=f"{key}-{backbone}", dataset=key, backbone=backbone, parameters=parameters))
        else:
            for variant, settings in study.variants.items():
                parameters = {**study.parameters, **entry, **settings}
                cells.append(Cell(name=f"{key}-{variant}", dataset=key, backbone=str(parameters.get("backbone", "")),
                                  parameters=parameters, variant=variant))
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
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
                names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
            return names
    return None


def check_notebook_parameters(study: Study, cells: Sequence[Cell]) -> None:
    """Every parameter a cell sets must be declared in the notebook's ``parameters`` cell."""
    declared = notebook_parameters(study.notebook)
    if declared is None:
        raise StudyError(f"notebook {study.notebook} has no code cell tagged 'parameters': tag one (papermill reads it)")
    for name in RUNNER_PARAMETERS + (("backbone",) if study.variants is None else ()):
        if name not in declared:
            raise StudyError(f"notebook {study.notebook} does not declare '{name}' in its parameters cell: the runner sets it")
    for cell in cells:
        for name in cell.parameters:
            if name not in declared:
                where = ("parameters" if name in study.parameters
                         else f"datasets.{cell.dataset}" if name in study.datasets.get(cell.dataset, {})
                         else f"variants.{cell.variant}")
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
            raise StudyError(f"--only {pattern!r} matches no cell of the study (cells: {', '.join(c.name for c in cells)})")
    return [cell for cell in cells if any(fnmatch.fnmatchcase(cell.name, p) for p in patterns)]


def resolve_parameters(parameters: Mapping[str, Any], *, data: Path | None,
                       synthetic: Callable[[], Path], reports: Path | None = None) -> tuple[dict[str, Any], str | None]:
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


def synthetic_root() -> Path:
    """The synthetic DAGM-layout set behind ``{synthetic}`` (the folder notebook 01 uses too)."""
    from anomalib_study.data.synthetic import make_synthetic_dagm

    return Path(make_synthetic_dagm(io.cache_root() / "synthetic_dagm", seed=0))


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


def inputs_hash(notebook: Path, parameters: Mapping[str, Any], data: Path | None, sources_hash: str) -> str:
    """sha256 of what a cell's report depends on; ``metrics_out`` (a temporary path) is left out."""
    kept = {k: v for k, v in parameters.items() if k != "metrics_out"}
    payload = json.dumps(
        {"notebook": io.sha256_file(notebook), "parameters": kept, "sources": sources_hash,
         "data_root": str(data) if data else ""},
        sort_keys=True, default=str,
    )
    return io.sha256_bytes(payload.encode())


# --------------------------------------------------------------------------- execution


def choose_kernel(kernel_name: str | None, notebook: Path) -> str:
    """``kernel_name`` if given (must be installed), else "anomalib-study" if installed,
    else the notebook's own kernelspec, else "python3"."""
    from jupyter_client.kernelspec import KernelSpecManager

    installed = KernelSpecManager().find_kernel_specs()
    if kernel_name:
        if kernel_name not in installed:
            raise StudyError(f"kernel {kernel_name!r} is not installed (installed: {', '.join(sorted(installed))}); "
                             "`bash scripts/install.sh` installs 'anomalib-study'")
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


@contextlib.contextmanager
def _kernel_threads(jobs: int) -> Iterator[int]:
    """Give each kernel cores // jobs threads (unless the user set them), restored afterwards."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    try:
        for name in THREAD_VARIABLES:
            os.environ.setdefault(name, str(threads))
        yield threads
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unlink(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _headline_text(metrics: Mapping[str, Any], headline: Sequence[str]) -> str:
    return " ".join(f"{key}={_format_value(metrics.get(key))}" for key in headline)


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


class _Runner:
    """Runs the cells of one study into ``reports/<notebook stem>/``."""

    def __init__(self, study: Study, out_dir: Path, kernel: str, data: Path | None, force: bool,
                 log: Callable[[str], None], total: int):
        self.study, self.out_dir, self.kernel, self.data, self.force = study, out_dir, kernel, data, force
        self.log, self.total = log, total
        self.sources_hash = package_sources_hash()
        self._synthetic: Path | None = None
        self._lock = threading.Lock()

    def synthetic_root(self) -> Path:
        with self._lock:  # generated once per study, even with several jobs
            if self._synthetic is None:
                self._synthetic = synthetic_root()
            return self._synthetic

    def run(self, index: int, cell: Cell) -> CellResult:
        tag = f"[{index}/{self.total}] {cell.name}"
        parameters, reason = resolve_parameters(cell.parameters, data=self.data, synthetic=self.synthetic_root,
                                                reports=self.out_dir.parent)
        if reason:
            self.log(f"{tag}: skipped, {reason}")
            return CellResult(cell.name, cell.dataset, cell.backbone, "skipped", parameters, message=reason,
                              variant=cell.variant)
        parameters["report_name"] = cell.name
        digest = inputs_hash(self.study.notebook, parameters, self.data, self.sources_hash)
        if uses_reports(cell.parameters):  # its inputs are the other reports, too
            digest = io.sha256_bytes(f"{digest}:{reports_hash(self.out_dir.parent, exclude=self.out_dir)}".encode())

        paths = self.paths(cell.name)
        previous = _read_json(paths["metrics"]) or {}
        run_info = previous.get("_run", {})
        if (not self.force and run_info.get("inputs_hash") == digest and run_info.get("status") == "ok"
                and paths["html"].is_file() and not paths["failed_json"].exists()):
            metrics = {k: v for k, v in previous.items() if k != "_run"}
            self.log(f"{tag}: unchanged, not rerun ({_headline_text(metrics, self.study.headline)})".replace(" ()", ""))
            return CellResult(cell.name, cell.dataset, cell.backbone, "unchanged", parameters, metrics,
                              html=paths["html"], variant=cell.variant)

        self.log(f"{tag}: start")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{cell.name}-", dir=self.out_dir))
        try:
            return self._execute(tag, cell, parameters, digest, paths, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def paths(self, name: str) -> dict[str, Path]:
        base = self.out_dir / name
        return {
            "ipynb": base.with_name(f"{name}.ipynb"), "html": base.with_name(f"{name}.html"),
            "metrics": base.with_name(f"{name}.metrics.json"),
            "failed_ipynb": base.with_name(f"{name}.failed.ipynb"),
            "failed_html": base.with_name(f"{name}.failed.html"),
            "failed_json": base.with_name(f"{name}.failed.json"),
        }

    def _execute(self, tag: str, cell: Cell, parameters: dict[str, Any], digest: str,
                 paths: dict[str, Path], staging: Path) -> CellResult:
        import nbformat
        import papermill
        from papermill.exceptions import PapermillExecutionError

        executed = staging / f"{cell.name}.ipynb"
        metrics_tmp = staging / f"{cell.name}.metrics.json"
        started_at = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        start = time.perf_counter()
        error: tuple[str, str] | None = None
        try:
            papermill.execute_notebook(
                str(self.study.notebook), str(executed), parameters={**parameters, "metrics_out": str(metrics_tmp)},
                kernel_name=self.kernel, progress_bar=False, log_output=False,
                # the kernel's working folder, set without papermill's process-wide chdir (unsafe in threads)
                resources={"metadata": {"path": str(self.study.notebook.parent)}},
            )
        except PapermillExecutionError as exc:
            error = (exc.ename, str(exc.evalue))
        except Exception as exc:  # kernel died, would not start, ...: still a failed cell, not a crashed study
            error = (type(exc).__name__, str(exc))
        duration = round(time.perf_counter() - start, 2)

        metrics: dict[str, Any] = {}
        if error is None:
            loaded = _read_json(metrics_tmp)
            if loaded is None:
                error = ("MissingMetrics", f"the notebook did not write a JSON object to metrics_out ({metrics_tmp.name})")
            else:
                metrics = loaded
        run = {
            "study": str(self.study.path), "title": self.study.title, "notebook": str(self.study.notebook),
            "cell": cell.name, "dataset": cell.dataset, "backbone": cell.backbone,
            "headline": list(self.study.headline), "parameters": parameters, "inputs_hash": digest,
            "kernel": self.kernel, "duration_s": duration, "started_at": started_at,
            # recorded apart from inputs_hash, so that the index can tell a stale report
            "notebook_sha256": io.sha256_file(self.study.notebook), "sources_hash": self.sources_hash,
            # the kernel's torch reads OMP_NUM_THREADS; evaluate records the count it ran with
            "provenance": provenance.collect(self.study.notebook, torch_threads=False),
        }
        if cell.variant is not None:  # a variants grid: the index's second column names the variant
            run["variant"] = cell.variant
        title = f"{self.study.title}: {cell.name}"
        node = nbformat.read(executed, as_version=4) if executed.is_file() else None
        page = ""
        if error is None:
            try:
                page = render_html(node, title)
            except Exception as exc:  # a report that cannot be rendered is a failed cell, too
                error, node = (type(exc).__name__, f"rendering the report failed: {exc}"), None

        run["status"] = "ok" if error is None else "failed"
        if error is not None:
            run["error"] = {"ename": error[0], "evalue": error[1]}
            if executed.is_file():
                os.replace(executed, paths["failed_ipynb"])
            else:  # nothing was executed: no stale failed notebook may pose as this run's
                _unlink(paths["failed_ipynb"])
            try:  # the executed notebook shows the error cell; without one, a plain page says it
                page = render_html(node, f"FAILED {title}") if node is not None else _error_page(title, *error)
            except Exception:
                page = _error_page(title, *error)
            with io.atomic_write(paths["failed_html"], "w") as handle:
                handle.write(page)
            io.write_json(paths["failed_json"], {"_run": run})
            self.log(f"{tag}: FAILED after {duration:.1f} s: {error[0]}: {_first_line(error[1])} "
                     f"(see {paths['failed_html']})")
            return CellResult(cell.name, cell.dataset, cell.backbone, "failed", parameters, {}, duration,
                              paths["failed_html"], f"{error[0]}: {error[1]}", variant=cell.variant)

        metrics.setdefault("synthetic", any(isinstance(v, str) and "{synthetic}" in v for v in cell.parameters.values()))
        metrics["_run"] = run
        os.replace(executed, paths["ipynb"])
        for extra in sorted(staging.glob(f"{glob.escape(cell.name)}.*")):  # the notebook's side files (tables, ...)
            if extra != metrics_tmp and extra.is_file():
                os.replace(extra, self.out_dir / extra.name)
        with io.atomic_write(paths["html"], "w") as handle:
            handle.write(page)
        io.write_json(paths["metrics"], metrics)  # last: a complete report is one with matching metrics
        _unlink(paths["failed_ipynb"], paths["failed_html"], paths["failed_json"])
        size = paths["html"].stat().st_size
        if size > REPORT_SIZE_WARNING:
            self.log(f"{tag}: warning: {paths['html']} is {size / 1e6:.1f} MB; keep the notebook's images "
                     "small (JPEG thumbnails)")
        metrics.pop("_run")
        self.log(f"{tag}: ok in {duration:.1f} s {_headline_text(metrics, self.study.headline)}".rstrip())
        return CellResult(cell.name, cell.dataset, cell.backbone, "ok", parameters, metrics, duration, paths["html"],
                          variant=cell.variant)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _error_page(title: str, ename: str, evalue: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>FAILED {html.escape(title)}</title></head>"
            f"<body><h1>FAILED {html.escape(title)}</h1><pre>{html.escape(ename)}: {html.escape(evalue)}</pre>"
            "</body></html>\n")


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
    log: Callable[[str], None] = print,
) -> list[CellResult]:
    """Execute a study's grid and render its reports; returns one CellResult per selected cell.

    Args:
        study_file: the YAML study file (see the module docstring), or a suite of studies
            (``studies:``, see :func:`read_studies`), whose parts run in order.
        reports_dir: reports go to ``reports_dir/<notebook stem>/``; the index to
            ``reports_dir/index.html`` (rewritten at the end).
        jobs: grid cells run at once (each in its own kernel process with
            ``cpu_count // jobs`` OpenMP/MKL threads unless those variables are set).
        data_root: the real data folder for ``{data}`` (default $ANOMALIB_STUDY_DATA).
        only: cell names or glob patterns to run, or ``<notebook stem>/<cell>`` (None = all; in a
            suite, across its parts).
        force: rerun cells whose inputs did not change.
        kernel_name: Jupyter kernel (default "anomalib-study" if installed, else the
            notebook's own, else "python3").
        device: if given, the ``device`` parameter of every cell (e.g. "cuda").
        log: called with one line per cell start / finish.

    A failing notebook does not stop the study: its cell has status ``"failed"`` (use
    :func:`exit_code`). Bad study files raise StudyError before anything runs.
    """
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ParameterError(f"jobs must be a whole number >= 1, got {jobs!r}")
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
            return (fnmatch.fnmatchcase(cell.name, pattern)
                    or fnmatch.fnmatchcase(f"{study.notebook.stem}/{cell.name}", pattern))

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
    for study, cells in zip(studies, grids):  # parts in order: a later part may read the earlier reports
        if not cells:
            continue
        kernel = choose_kernel(kernel_name, study.notebook)
        runner = _Runner(study, reports / study.notebook.stem, kernel, data.resolve() if data else None, force, log,
                         len(cells))
        log(f"study {study.path}: {len(cells)} cell(s) of {study.notebook.name}, kernel {kernel}, jobs {jobs}")
        with _kernel_threads(jobs):
            if jobs == 1:
                part = [runner.run(i, cell) for i, cell in enumerate(cells, 1)]
            else:
                with ThreadPoolExecutor(max_workers=jobs) as pool:
                    part = list(pool.map(lambda pair: runner.run(*pair), enumerate(cells, 1)))
        for result in part:
            result.notebook = study.notebook.stem
        results += part
        skipped.update({(study.notebook.stem, r.name): r.message for r in part if r.status == "skipped"})
        sources = runner.sources_hash

    index = write_index(reports, skipped=skipped, sources_hash=sources)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "unchanged", "failed", "skipped")}
    log(f"study {study_file}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; index {index}")
    return results


def exit_code(results: Iterable[CellResult]) -> int:
    """1 if any cell failed, else 0 (skipped cells are not failures)."""
    return int(any(r.status == "failed" for r in results))


# --------------------------------------------------------------------------- index


def write_index(reports_dir: str | os.PathLike = "reports", *, skipped: Mapping[tuple[str, str], str] | None = None,
                sources_hash: str | None = None) -> Path:
    """Write the front page ``reports_dir/index.html`` (:func:`anomalib_study.frontpage.write_index`).

    ``skipped``: (notebook stem, cell name) -> why, for the cells of the run just made that
    could not run here (listed with their reason); ``sources_hash``: the package sources its
    cells ran with (default: now's)."""
    from anomalib_study import frontpage

    return frontpage.write_index(reports_dir, skipped=dict(skipped or {}), sources_hash=sources_hash)
