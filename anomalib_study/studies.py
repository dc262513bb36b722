"""Study files: read and validate them, expand their grid, resolve the cells' parameters.

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

One cell per distinct computation: a study may list cells another study file defines, under
``uses`` (study file, relative to this one's folder -> cell names)::

    uses:   # shown with this study's cells, defined and run by patchcore_resolution.yaml
      patchcore_resolution.yaml: [magnetic_tile-dinov2_vits14-448-keep]

A used cell belongs to its defining study: the runner never runs it for the study that uses it,
it reports it (current: ``"unchanged"``; missing, stale or failed: ``"skipped"``, naming the
command that runs it). Its report is the defining study's, in the same reports folder, so the
front page and the notebooks that read ``{reports}`` find it like any other.
:func:`anomalib_study.study_duplicates.duplicate_cells` finds two cells of the study files that are one computation (the
same notebook, data and parameters after the notebook's defaults) or that write one report
with different parameters; ``anomalib-study run`` refuses to run either.

The runner (:mod:`anomalib_study.runner`) decides which of the cells run, executes them
(:mod:`anomalib_study.execution`) and writes their reports.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from anomalib_study import io
from anomalib_study.errors import StudyError

STUDY_KEYS = ("notebook", "title", "headline", "parameters", "backbones", "variants", "datasets", "uses")
SUITE_KEYS = ("title", "studies")
SUITE_PART_KEYS = ("study", "only")  # a suite part running some cells of a study file, as that file's
AXES = ("backbones", "variants")  # the grid's second axis: a study file gives exactly one
RUNNER_PARAMETERS = ("metrics_out", "report_name")  # set by the runner, never by a study file
DATASET_BACKBONES = "backbones"  # in a dataset entry of a backbones grid: run only these of the grid's backbones
NEEDS_DATA = "needs the real data: set ANOMALIB_STUDY_DATA or pass --data"
SYNTHETIC_SEED = io.SHARED_SYNTHETIC_SEED  # the seed of the synthetic set behind {synthetic}

_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_PLACEHOLDERS = ("data", "synthetic", "reports")


@dataclass(frozen=True)
class CellRef:
    """A cell another study file defines, listed in a study's ``uses``: ``study_file`` (the
    defining file, resolved against the using file's folder) and the cell's name."""

    study_file: Path
    cell: str


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
        uses: cells other study files define, listed with this study's, never run by it.
        only: the cells of the grid a suite part runs (names or glob patterns; None: all).
    """

    path: Path
    notebook: Path
    title: str
    headline: tuple[str, ...]
    parameters: dict[str, Any]
    backbones: tuple[str, ...]
    datasets: dict[str, dict[str, Any]]
    variants: dict[str, dict[str, Any]] | None = None
    uses: tuple[CellRef, ...] = ()
    only: tuple[str, ...] | None = None

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
    study = _parse_study(data, path, f"study file {path}")
    used_cells(study)  # every cell it uses exists
    return study


def read_studies(study_file: str | os.PathLike) -> list[Study]:
    """The studies a file runs, in order: the file itself, or the parts of a suite.

    A suite file has the keys ``title`` (optional) and ``studies``: a list whose entries are
    study file paths (relative to the suite's folder), ``{study: <path>, only: [cells]}`` (some
    cells of a study file, names or glob patterns: they stay that file's cells, with its reports;
    the cells that file ``uses`` are not listed)
    or inline study mappings (their ``notebook`` resolved like a study file's). Its parts run one
    after the other, so a part may read the reports of the ones before it (e.g. the comparison
    notebook)::

        title: The whole study on the synthetic set
        studies:
          - {study: knn.yaml, only: [synthetic_dagm-efficientnet_lite0]}
          - {notebook: notebooks/02_patchcore.ipynb, backbones: [efficientnet_lite0],
             datasets: {synthetic_quick: {dataset: dagm, root: "{synthetic}"}}}
          - comparison.yaml
    """
    path, data = _load_yaml(study_file)
    if "studies" not in data:
        study = _parse_study(data, path, f"study file {path}")
        used_cells(study)
        return [study]
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
        only = None
        if isinstance(part, dict) and "study" in part:  # some cells of a study file
            unknown = sorted(set(map(str, part)) - set(SUITE_PART_KEYS))
            if unknown:
                raise StudyError(
                    f"{where}: key '{unknown[0]}' does not go with 'study' (a part naming a study file has only "
                    f"{', '.join(SUITE_PART_KEYS)})"
                )
            only = part.get("only")
            if not isinstance(only, list) or not only or not all(isinstance(n, str) and n for n in only):
                raise StudyError(f"{where}: key 'only' must be a non-empty list of the study's cell names (or globs)")
            part = part["study"]
            if not isinstance(part, str) or not part:
                raise StudyError(f"{where}: key 'study' must name a study file, e.g. knn.yaml")
        if isinstance(part, str):
            sub = path.parent / part
            if not sub.is_file():
                raise StudyError(f"{where} names {part}, which is not found (looked at {sub})")
            sub_path, sub_data = _load_yaml(sub)
            if "studies" in sub_data:
                raise StudyError(f"{where} names the suite {part}: a suite's parts must be studies, not suites")
            study = _parse_study(sub_data, sub_path, f"study file {sub_path}")
            if only is not None:
                try:
                    select_cells(expand_grid(study), only)
                except StudyError as error:
                    raise StudyError(f"{where}: 'only' {str(error).removeprefix('--only ')}") from None
                study = replace(study, only=tuple(only), uses=())  # those cells only: not the ones it uses
            studies.append(study)
        elif isinstance(part, dict):
            studies.append(_parse_study(part, path, where))
        else:
            raise StudyError(f"{where} must be a study file path or a study mapping, got {type(part).__name__}")
        used_cells(studies[-1])
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

    uses = data.get("uses") or {}
    if not isinstance(uses, dict):
        raise bad(
            "uses", "must be a mapping of study file -> [cell names], e.g. {knn.yaml: [synthetic_dagm-dinov2_vits14]}"
        )
    refs = []
    for other, names in uses.items():
        if not isinstance(other, str) or not other:
            raise bad("uses", f"has the key {other!r}: name a study file, e.g. knn.yaml")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and _NAME.match(n) for n in names):
            raise bad(f"uses.{other}", "must be a non-empty list of the cell names that study file defines")
        if len(set(names)) != len(names):
            raise bad(f"uses.{other}", "lists a cell twice")
        defining = path.parent / other
        if not defining.is_file():
            raise bad(f"uses.{other}", f"names a study file that is not found (looked at {defining})")
        refs += [CellRef(defining, name) for name in names]

    study = Study(
        path=path,
        notebook=found.resolve(),
        title=title,
        headline=tuple(headline),
        parameters=dict(parameters),
        backbones=tuple(backbones),
        datasets={k: dict(v) for k, v in datasets.items()},
        variants=None if variants is None else {k: dict(v) for k, v in variants.items()},
        uses=tuple(refs),
    )
    names = [cell.name for cell in expand_grid(study)]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # e.g. dataset "a-b" x column "c" and dataset "a" x column "b-c"
        raise bad("datasets", f"and the {study.axis}s give the cell name {twice[0]!r} twice: rename one")
    return study


def used_cells(study: Study) -> list[tuple[Study, Cell]]:
    """The cells ``study`` uses, each with the study that defines it, in the order of ``uses``.

    StudyError when a defining file is a suite, lacks the cell (or only uses it itself: name
    the file that defines it), or when a used cell would write one of ``study``'s own reports.
    The defining files' own ``uses`` are not followed."""
    found: list[tuple[Study, Cell]] = []
    defining: dict[Path, Study] = {}
    own = {(study.notebook.stem, cell.name) for cell in expand_grid(study)}
    for ref in study.uses:
        where = f"study file {study.path}: key 'uses.{_relative(ref.study_file, study.path.parent)}'"
        if ref.study_file not in defining:
            path, data = _load_yaml(ref.study_file)
            if "studies" in data:
                raise StudyError(f"{where} names a suite: name the study file that defines the cell")
            defining[ref.study_file] = _parse_study(data, path, f"study file {path}")
        other = defining[ref.study_file]
        cells = {cell.name: cell for cell in expand_grid(other)}
        if ref.cell not in cells:
            via = next((r.study_file for r in other.uses if r.cell == ref.cell), None)
            why = (
                f"only uses it: name {_relative(via, study.path.parent)}, which defines it"
                if via is not None
                else f"does not define it (its cells: {', '.join(cells)})"
            )
            raise StudyError(f"{where} names the cell {ref.cell}, but {ref.study_file} {why}")
        if (other.notebook.stem, ref.cell) in own:
            raise StudyError(
                f"{where} names {ref.cell}, which is also one of this study's own cells "
                f"(reports/{other.notebook.stem}/{ref.cell}): remove one of the two"
            )
        found.append((other, cells[ref.cell]))
    return found


def _relative(path: Path, folder: Path) -> str:
    """``path`` as a study file in ``folder`` names it (relative where it can be)."""
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # another drive
        return str(path)


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
    grid's ``shared + dataset entry + variant entry`` (later ones win). A suite part's ``only``
    keeps the cells it names; the cells a study ``uses`` are not in its grid (:func:`used_cells`)."""
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
    return cells if study.only is None else select_cells(cells, study.only)


def _parameter_assignments(notebook: str | os.PathLike) -> list[tuple[str, Any]] | None:
    """``(name, value node)`` of each assignment in the notebook's code cell tagged
    ``parameters``, in order (None if it has none; the value node None for a bare annotation)."""
    import ast

    import nbformat

    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            try:
                tree = ast.parse(cell.source)
            except SyntaxError as error:
                raise StudyError(f"notebook {notebook}: its parameters cell is not plain Python ({error})") from None
            found = []
            for node in tree.body:
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign)
                    else []
                )
                found += [(t.id, node.value) for t in targets if isinstance(t, ast.Name)]
            return found
    return None


def notebook_parameters(notebook: str | os.PathLike) -> list[str] | None:
    """Names assigned in the notebook's code cell tagged ``parameters`` (None if it has none).

    Read with ``ast``, not ``papermill.inspect_notebook``, whose line parser drops a
    parameter whose comment contains ``=`` (it still receives its value when run).
    """
    found = _parameter_assignments(notebook)
    if found is None:
        return None
    return list(dict.fromkeys(name for name, _ in found))


def notebook_defaults(notebook: str | os.PathLike) -> dict[str, Any]:
    """name -> the default value the notebook's parameters cell gives it (the last assignment
    wins), read with ``ast`` like :func:`notebook_parameters` (for the same reason). A default
    that is not a literal (``Path("x")``) is kept as its source text, marked, so that it equals
    no value a study file could give."""
    import ast

    defaults: dict[str, Any] = {}
    for name, node in _parameter_assignments(notebook) or []:
        if node is None:
            continue
        try:
            defaults[name] = ast.literal_eval(node)
        except ValueError:
            defaults[name] = ("<expression>", ast.unparse(node))
    return defaults


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


def synthetic_path() -> Path:
    """Where the synthetic set behind ``{synthetic}`` lives (not generated): the study's shared one."""
    return io.shared_synthetic_path()


def synthetic_root() -> Path:
    """The synthetic DAGM-layout set behind ``{synthetic}`` (the notebooks' fallback too), generated if missing."""
    from anomalib_study.data.synthetic import shared_synthetic_set

    return shared_synthetic_set()


# --------------------------------------------------------------------------- checks before any kernel starts
def declared_types(notebook: str | os.PathLike) -> dict[str, str]:
    """name -> the type the notebook's parameters cell declares (``papermill.inspect_notebook``'s
    ``inferred_type_name``: ``"int"``, ``"Optional[str]"``, ``"list[int]"``, ...; names it
    cannot read are left out)."""
    import papermill

    try:
        found = papermill.inspect_notebook(str(notebook))
    except Exception:  # an unreadable cell is named by check_notebook_parameters
        return {}
    return {name: str(entry.get("inferred_type_name") or "") for name, entry in found.items()}


def _is_number(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def value_matches(value: Any, declared: str) -> bool:
    """Whether ``value`` (from a study file) is of the type ``declared`` (a parameters cell's
    annotation); an annotation this does not know accepts anything."""
    declared = declared.replace(" ", "")
    if declared.startswith("Optional[") and declared.endswith("]"):
        return value is None or value_matches(value, declared[len("Optional[") : -1])
    checks = {
        "int": lambda v: _is_number(v, int),
        "float": lambda v: _is_number(v, (int, float)),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
    }
    if declared in checks:
        return checks[declared](value)
    if declared.lower().startswith(("list", "tuple", "sequence")):
        return isinstance(value, (list, tuple))
    if declared.lower().startswith("dict"):
        return isinstance(value, dict)
    return True


def check_cells(study: Study, cells: Sequence[Cell], data: Path | None) -> None:
    """Everything about the cells that can be checked before a kernel starts, all at once:
    each parameter's value against the type the notebook declares, the backbone against the
    registry, and, with the real data folder, that each ``{data}`` root (and its category)
    exists. StudyError listing every problem; nothing has been run or written. (The backbone
    is checked in the notebooks of the registered methods, which load it from the registry.)"""
    from anomalib_study import methods

    problems: list[str] = []
    types = declared_types(study.notebook)
    registered: Sequence[str] | None = None
    # a method notebook loads its backbone from the registry; another notebook may name its axis as it likes
    loads_backbones = study.notebook.stem in {entry.notebook for entry in methods.REGISTRY.values()}
    for cell in cells:
        for name, value in cell.parameters.items():
            declared = types.get(name, "")
            if declared and not value_matches(value, declared):
                problems.append(
                    f"cell {cell.name}: {name}={value!r} is a {type(value).__name__}, but {study.notebook.name} "
                    f"declares {name}: {declared}"
                )
        backbone = cell.parameters.get("backbone")
        if loads_backbones and isinstance(backbone, str) and "{" not in backbone:
            if registered is None:
                from anomalib_study.backbones import available_backbones

                registered = available_backbones()
            if backbone not in registered:
                problems.append(f"cell {cell.name}: backbone {backbone!r} is not registered ({', '.join(registered)})")
        root = cell.parameters.get("root")
        if data is not None and isinstance(root, str) and "{data}" in root:
            path = Path(root.replace("{data}", str(data)))
            category = cell.parameters.get("category")
            if not path.is_dir():
                problems.append(f"cell {cell.name}: {path} (root {root} with --data {data}) does not exist")
            elif isinstance(category, str) and not (path / category).is_dir():
                problems.append(f"cell {cell.name}: category {category!r} is not a folder of {path}")
    if problems:
        shown = "\n".join(f"  - {problem}" for problem in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise StudyError(
            f"study {study.path} cannot run ({len(problems)} problem(s); nothing was run or written):\n{shown}{more}"
        )
