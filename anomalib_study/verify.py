"""Check that the committed reports regenerate: ``anomalib-study verify``.

For each committed ``<reports>/<notebook>/<cell>.metrics.json`` selected, the cell is run
again, from the study file named in its ``_run["study"]``, with
:func:`anomalib_study.runner.run_study` (``force=True``) into a scratch folder (a temporary
one, or ``scratch``), and the two metrics are compared key by key; the committed reports
folder is only read, never written. Nested dicts and lists are flattened to keys such as
``classification_report.normal.precision`` or ``per_image[3].score``:

* numbers (not bools) match when they differ by at most ``tolerance`` (absolute; the
  default 0 means exact: the figures are deterministic on one machine); NaN matches NaN;
* everything else (strings, bools, None, a number against a string) must be equal;
* a key present on one side only is a drift.

Keys are left out of the comparison when any part of their path matches one of
:data:`UNCOMPARED` (``fnmatch`` patterns): who, where and when (``_run``, ``environment``,
``provenance``, ``weights_sha256``: reported as provenance differences instead), timings
(``*_s``, ``*seconds*``, ``*minutes*``, ``*per_s``, ``*timings*``, and ``training``, the
training time in the published comparison tables), memory (``peak_memory*``, ``peak_rss*``, ``*_mb``) and
paths (``path``, ``root``, ``*_path``, ``*_dir``), which change with the machine.

Provenance differences (package version, git commit, CPU, cores, threads, GPU, python and
torch versions, platform, backbone weights hash, seed, device, the runner's inputs hash, the
cell's parameters) are
printed one line each: they explain a drift but are not one. A cell that needs the real data
when none is given is ``"skipped"``, with the reason.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from anomalib_study import comparison, runner, schema
from anomalib_study.errors import ParameterError, StudyError
from anomalib_study.report_files import report_files_match

__all__ = [
    "UNCOMPARED",
    "MISSING",
    "Drift",
    "VerifyResult",
    "compare_metrics",
    "committed_reports",
    "exit_code",
    "flatten",
    "format_table",
    "provenance_differences",
    "verify_reports",
]

#: fnmatch patterns: a key whose path has a part matching one of these is not compared
UNCOMPARED = (
    "_run",
    "environment",
    "provenance",
    "weights_sha256",  # provenance: reported separately
    "*_s",
    "*seconds*",
    "*minutes*",
    "*per_s",
    "*timings*",
    "training",  # wall-clock times
    "peak_memory*",
    "peak_rss*",
    "*_mb",  # memory
    "path",
    "root",
    "*_path",
    "*_dir",  # paths on the machine that ran it
)
#: the statuses of a :class:`VerifyResult`; the first two are the only ones that pass
STATUSES = ("matched", "skipped", "drifted", "failed")


class _Missing:
    """The value of a key one side of a comparison does not have."""

    def __repr__(self) -> str:
        return "MISSING"


#: stands for the value of a key absent from one side (``Drift.committed`` or ``Drift.new``)
MISSING = _MISSING = _Missing()


@dataclass(frozen=True)
class Drift:
    """One key whose re-run value differs: ``committed`` / ``new`` (:data:`MISSING` when that
    side lacks the key), ``difference`` = |new - committed| for two numbers, else None."""

    key: str
    committed: Any
    new: Any
    difference: float | None = None

    def describe(self) -> str:
        gap = "" if self.difference is None else f" (|difference| {self.difference:.3g})"
        return f"{self.key}: committed {_show(self.committed)}, re-run {_show(self.new)}{gap}"


@dataclass
class VerifyResult:
    """The verdict on one committed report.

    Attributes:
        report: ``<notebook folder>/<cell>``.
        status: ``"matched"`` (every compared key within tolerance), ``"drifted"`` (see
            ``drifts``), ``"failed"`` (the re-run failed, or the study file or cell is gone;
            see ``message``) or ``"skipped"`` (not runnable here, e.g. the real data is
            absent; see ``message``).
        compared: keys compared; ``matched``: of those, the ones within tolerance.
        drifts: the keys that differ (missing ones included).
        differences: one line per provenance field that differs (commit, CPU, ...).
        message: why it failed or was skipped ("" otherwise).
        committed: the committed metrics file; ``rerun``: the re-run's (None if none,
            and gone with a temporary scratch folder).
        freshness: the committed report's freshness by the front page's rule
            (:func:`anomalib_study.comparison.freshness`): ``"current"``, ``"stale: <why>"``
            or ``"unknown: <why>"``.
    """

    report: str
    status: str
    compared: int = 0
    matched: int = 0
    drifts: list[Drift] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    message: str = ""
    committed: Path | None = None
    rerun: Path | None = None
    freshness: str = ""

    @property
    def worst(self) -> Drift | None:
        """The numeric drift of largest difference, else the first drift, else None."""
        numeric = [d for d in self.drifts if d.difference is not None]
        if numeric:
            return max(numeric, key=lambda d: d.difference if not math.isnan(d.difference) else math.inf)
        return self.drifts[0] if self.drifts else None


# --------------------------------------------------------------------------- comparing


def _compared(part: str) -> bool:
    return not any(fnmatch.fnmatchcase(part, pattern) for pattern in UNCOMPARED)


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, leaf)`` pairs of nested dicts and lists, keys left out by :data:`UNCOMPARED` dropped."""
    if isinstance(value, Mapping):
        for name, item in value.items():
            if _compared(str(name)):
                yield from flatten(item, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from flatten(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_metrics(
    committed: Mapping[str, Any], new: Mapping[str, Any], tolerance: float = 0.0
) -> tuple[int, int, list[Drift]]:
    """Compare two metrics dicts (see the module docstring); returns ``(compared, matched, drifts)``."""
    tolerance = _check_tolerance(tolerance)
    old, fresh = dict(flatten(committed)), dict(flatten(new))
    keys = list(old) + [key for key in fresh if key not in old]
    drifts = []
    for key in keys:
        a, b = old.get(key, _MISSING), fresh.get(key, _MISSING)
        if _is_number(a) and _is_number(b):
            if math.isnan(a) and math.isnan(b):
                continue
            if a == b:  # also equal infinities
                continue
            difference = abs(float(b) - float(a))
            if difference <= tolerance:
                continue
            drifts.append(Drift(key, a, b, difference))
        elif a is _MISSING or b is _MISSING or type(a) is not type(b) or a != b:
            drifts.append(Drift(key, a, b))
    return len(keys), len(keys) - len(drifts), drifts


def _check_tolerance(tolerance: Any) -> float:
    if not _is_number(tolerance) or not math.isfinite(tolerance) or tolerance < 0:
        raise ParameterError(f"tolerance must be a finite number >= 0 (0: exact), got {tolerance!r}")
    return float(tolerance)


# --------------------------------------------------------------------------- provenance


def _get(data: Mapping[str, Any], *path: str) -> Any:
    for name in path:
        if not isinstance(data, Mapping) or name not in data:
            return _MISSING
        data = data[name]
    return data


#: label -> where the value is read, first path found wins (a report migrated from the first layout holds
#: in ``_run.provenance`` what its kernel recorded in ``environment``: :func:`anomalib_study.schema.migrate`)
_PROVENANCE_FIELDS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("package version", (("_run", "provenance", "package_version"),)),
    ("commit", (("_run", "provenance", "git_commit"),)),
    ("uncommitted changes", (("_run", "provenance", "git_dirty"),)),
    ("CPU", (("_run", "provenance", "cpu_model"),)),
    ("logical cores", (("_run", "provenance", "logical_cores"),)),
    ("threads (OMP_NUM_THREADS)", (("_run", "provenance", "threads", "OMP_NUM_THREADS"),)),
    ("torch threads", (("environment", "threads", "torch"),)),
    ("GPU", (("_run", "provenance", "gpu"),)),
    ("python", (("_run", "provenance", "python"),)),
    ("torch", (("_run", "provenance", "torch"),)),
    ("platform", (("_run", "provenance", "platform"),)),
    ("weights hash", (("environment", "weights_sha256"), ("backbone", "weights_sha256"))),
    ("seed", (("environment", "seed"),)),
    ("device", (("environment", "device"),)),
    ("inputs hash (notebook, parameters or data folder changed)", (("_run", "inputs_hash"),)),
)


def _first(data: Mapping[str, Any], paths: Sequence[tuple[str, ...]]) -> Any:
    for path in paths:
        value = _get(data, *path)
        if value is not _MISSING:
            return value
    return _MISSING


def provenance_differences(committed: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One line per provenance field that differs between two reports' metrics (with their
    ``_run``), e.g. ``"commit: 16ec360e0189 -> 2b1cd2f0a3c4"``; a field the committed report
    does not record (written before it was) reads ``not recorded``. Parameters that differ
    are named too. Empty when everything recorded is the same."""
    lines = []
    unrecorded = _get(committed, "_run", "provenance") is _MISSING
    if unrecorded:
        lines.append(
            "the committed report has no _run.provenance (written before it was recorded): "
            "its commit, CPU and threads are unknown"
        )
    for label, paths in _PROVENANCE_FIELDS:
        old, fresh = _first(committed, paths), _first(new, paths)
        if old is _MISSING and unrecorded and paths[0][:2] == ("_run", "provenance"):
            continue  # said once above
        if old != fresh:
            lines.append(f"{label}: {_show_provenance(old)} -> {_show_provenance(fresh)}")
    old_params, new_params = _get(committed, "_run", "parameters"), _get(new, "_run", "parameters")
    if isinstance(old_params, Mapping) and isinstance(new_params, Mapping):
        for name in list(old_params) + [n for n in new_params if n not in old_params]:
            a, b = old_params.get(name, _MISSING), new_params.get(name, _MISSING)
            if a != b:
                lines.append(f"parameter {name}: {_show_provenance(a)} -> {_show_provenance(b)}")
    return lines


def _show_provenance(value: Any) -> str:
    if value is _MISSING:
        return "not recorded"
    if isinstance(value, str) and len(value) == 40 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a git commit
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256
    return json.dumps(value) if not isinstance(value, str) else value


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(missing)"
    if isinstance(value, float):
        return repr(value)
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- re-running


@dataclass
class _Committed:
    report: str  # <notebook folder>/<cell>
    folder: str
    cell: str
    path: Path
    metrics: dict[str, Any]


def committed_reports(reports_dir: str | os.PathLike = "reports") -> list[tuple[str, Path]]:
    """``(<notebook folder>/<cell>, metrics file)`` of every committed report, sorted."""
    reports = Path(reports_dir)
    if not reports.is_dir():
        raise StudyError(
            f"reports folder {reports} not found: pass --reports DIR (the folder `anomalib-study run` wrote)"
        )
    found = []
    for folder in sorted(
        p for p in reports.iterdir() if p.is_dir() and p.name != "benchmarks" and not p.name.startswith(".")
    ):
        for path in sorted(folder.glob("*.metrics.json")):
            if not path.name.startswith("."):
                found.append((f"{folder.name}/{path.name[: -len('.metrics.json')]}", path))
    return found


def _select(found: Sequence[tuple[str, Path]], only: str | Iterable[str] | None) -> list[tuple[str, Path]]:
    patterns = [] if only is None else [only] if isinstance(only, str) else list(only)
    if not patterns:
        return list(found)

    def matches(report: str, pattern: str) -> bool:
        return fnmatch.fnmatchcase(report, pattern) or fnmatch.fnmatchcase(report.split("/", 1)[1], pattern)

    for pattern in patterns:
        if not any(matches(report, pattern) for report, _ in found):
            names = ", ".join(report for report, _ in found[:8]) + (", ..." if len(found) > 8 else "")
            raise StudyError(
                f"--only {pattern!r} matches no committed report (cell name or <notebook>/<cell>, "
                f"glob allowed; reports: {names})"
            )
    return [(report, path) for report, path in found if any(matches(report, p) for p in patterns)]


def _study_file(named: str, metrics_path: Path, reports: Path) -> Path:
    """The study file a report names, found as given, from the current folder or the
    reports folder's parent (the repository); StudyError saying where it looked."""
    given = Path(named)
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, reports.resolve().parent / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise StudyError(
        f"study file {named} (named by {metrics_path} in _run.study) not found (looked at "
        f"{', '.join(dict.fromkeys(map(str, candidates)))}): restore it, or run verify from the "
        "repository that holds it"
    )


@contextlib.contextmanager
def _scratch_folder(scratch: str | os.PathLike | None, reports: Path) -> Iterator[Path]:
    if scratch is None:
        with tempfile.TemporaryDirectory(prefix="anomalib-study-verify-") as folder:
            yield Path(folder)
        return
    folder = Path(scratch).resolve()
    committed = reports.resolve()
    if folder == committed or committed in folder.parents or folder in committed.parents:
        raise ParameterError(
            f"--keep-scratch {scratch}: the scratch folder must lie outside the reports folder "
            f"{reports} (verify never writes into it); choose another folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


def verify_reports(
    reports_dir: str | os.PathLike = "reports",
    only: str | Iterable[str] | None = None,
    tolerance: float = 0.0,
    data_root: str | os.PathLike | None = None,
    scratch: str | os.PathLike | None = None,
    *,
    kernel_name: str | None = None,
    log: Callable[[str], None] = print,
) -> list[VerifyResult]:
    """Re-run committed reports in a scratch folder and compare their metrics with the committed ones.

    Args:
        reports_dir: the committed reports (``<reports_dir>/<notebook>/<cell>.metrics.json``);
            only read.
        only: cell names or ``<notebook>/<cell>``, glob patterns allowed (None: every report);
            a pattern that matches nothing is a StudyError.
        tolerance: largest absolute difference of two numbers that still matches (0: exact).
        data_root: the real data folder (default $ANOMALIB_STUDY_DATA); without it, cells
            that need it are skipped.
        scratch: where the re-runs go, kept afterwards (None: a temporary folder, removed);
            must lie outside ``reports_dir``.
        kernel_name: the Jupyter kernel (see :func:`anomalib_study.runner.run_study`).
        log: called with the runner's progress lines, then the table (:func:`format_table`).

    Returns one :class:`VerifyResult` per selected report (use :func:`exit_code`).
    """
    tolerance = _check_tolerance(tolerance)
    reports = Path(reports_dir)
    selected = _select(committed_reports(reports), only)
    if not selected:
        raise StudyError(
            f"no committed reports under {reports}/<notebook>/ (nothing to verify): run "
            "`anomalib-study run STUDY` first"
        )
    results: dict[str, VerifyResult] = {}
    by_study: dict[Path, list[_Committed]] = {}
    for report, path in selected:
        folder, cell = report.split("/", 1)
        problem, metrics = _read_committed(path)
        if problem:
            results[report] = VerifyResult(report, "failed", committed=path, message=problem)
            continue
        named = metrics["_run"]["study"]
        try:
            study = _study_file(str(named), path, reports)
        except StudyError as error:
            results[report] = VerifyResult(report, "failed", committed=path, message=str(error))
            continue
        by_study.setdefault(study, []).append(_Committed(report, folder, cell, path, metrics))

    with _scratch_folder(scratch, reports) as out:
        for study_path, entries in by_study.items():
            for entry, result in _rerun_study(study_path, entries, out, tolerance, data_root, kernel_name, log):
                results[entry.report] = result
        ordered = [results[report] for report, _ in selected]
        for result, (_, path) in zip(ordered, selected):
            result.freshness = _freshness(path)
        if scratch is None:  # the temporary folder goes: no path into it may be handed back
            for result in ordered:
                result.rerun = None
    log(format_table(ordered, tolerance))
    return ordered


#: the files of a committed report beside its metrics (a report is all of them)
REPORT_FILES = (".ipynb", ".html")


def _read_committed(path: Path) -> tuple[str, dict[str, Any]]:
    """``(problem, metrics)`` of a committed report's metrics file: the problem ("" if none)
    names a missing report file, a JSON error (with where it is), another layout, or a
    file the runner did not write."""
    stem = path.name[: -len(".metrics.json")]
    missing = [f"{stem}{suffix}" for suffix in REPORT_FILES if not path.with_name(f"{stem}{suffix}").is_file()]
    if missing:
        return (
            f"the report is incomplete: {', '.join(missing)} missing beside {path.name}: restore it "
            f"(git checkout -- {path.parent}) or run the cell again",
            {},
        )
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): restore it", {}
    except (OSError, UnicodeDecodeError) as error:
        return f"{path} cannot be read ({error})", {}
    layout = schema.problems(metrics)
    if layout:
        return f"{path} is not of the current layout: {layout[0]}", {}
    run = metrics.get("_run") if isinstance(metrics, dict) else None
    if not isinstance(run, dict) or not isinstance(run.get("study"), str):
        return f"{path} is not a report written by `anomalib-study run` (no _run.study naming its study file)", {}
    if not report_files_match(path.parent, run):
        return (
            f"the files of the report do not match its metrics ({', '.join(sorted(run['files']))} recorded in "
            f"{path.name}): it was replaced in part; run the cell again",
            {},
        )
    return "", metrics


def _freshness(metrics_path: Path) -> str:
    """The committed report's freshness, by the front page's rule (:func:`comparison.report_freshness`)."""
    cell = metrics_path.name[: -len(".metrics.json")]
    metrics = comparison.io.read_json_object(metrics_path)
    fresh, why = comparison.report_freshness(
        comparison.Report(metrics_path.parent.name, cell, metrics_path.parent, metrics, None)
    )
    return fresh if not why else f"{fresh}: {why}"


def _rerun_study(
    study_path: Path,
    entries: list[_Committed],
    out: Path,
    tolerance: float,
    data_root: str | os.PathLike | None,
    kernel_name: str | None,
    log: Callable[[str], None],
) -> Iterator[tuple[_Committed, VerifyResult]]:
    try:  # a study file, or a suite whose parts run several notebooks
        studies = {study.notebook.stem: study for study in runner.read_studies(study_path)}
        cells = {stem: {cell.name for cell in runner.expand_grid(study)} for stem, study in studies.items()}
    except StudyError as error:
        for entry in entries:
            yield entry, VerifyResult(entry.report, "failed", committed=entry.path, message=str(error))
        return
    runnable = []
    for entry in entries:
        if entry.folder not in studies:
            ran_now = ", ".join(sorted(f"{stem}.ipynb" for stem in studies))
            yield (
                entry,
                VerifyResult(
                    entry.report,
                    "failed",
                    committed=entry.path,
                    message=(f"study file {study_path} now runs {ran_now}, not the notebook of {entry.folder}/"),
                ),
            )
        elif entry.cell not in cells[entry.folder]:
            yield (
                entry,
                VerifyResult(
                    entry.report,
                    "failed",
                    committed=entry.path,
                    message=(
                        f"cell {entry.cell} is no longer in study file {study_path} "
                        f"(its cells: {', '.join(sorted(cells[entry.folder]))})"
                    ),
                ),
            )
        else:
            runnable.append(entry)
    if not runnable:
        return
    try:
        ran = runner.run_study(
            study_path,
            reports_dir=out,
            only=[f"{e.folder}/{e.cell}" for e in runnable],
            force=True,
            data_root=data_root,
            kernel_name=kernel_name,
            log=log,
        )
    except StudyError as error:
        for entry in runnable:
            yield entry, VerifyResult(entry.report, "failed", committed=entry.path, message=str(error))
        return
    by_name = {(result.notebook, result.name): result for result in ran}
    for entry in runnable:
        cell = by_name[(entry.folder, entry.cell)]
        new_path = out / entry.folder / f"{entry.cell}.metrics.json"
        if cell.status == "skipped":
            yield entry, VerifyResult(entry.report, "skipped", committed=entry.path, message=cell.message)
            continue
        if cell.status != "ok":
            yield (
                entry,
                VerifyResult(
                    entry.report,
                    "failed",
                    committed=entry.path,
                    rerun=cell.html,
                    message=f"the re-run failed: {cell.message}",
                ),
            )
            continue
        new = json.loads(new_path.read_text(encoding="utf-8"))
        compared, matched, drifts = compare_metrics(entry.metrics, new, tolerance)
        yield (
            entry,
            VerifyResult(
                entry.report,
                "drifted" if drifts else "matched",
                compared,
                matched,
                drifts,
                provenance_differences(entry.metrics, new),
                committed=entry.path,
                rerun=new_path,
            ),
        )


# --------------------------------------------------------------------------- output


def format_table(results: Sequence[VerifyResult], tolerance: float = 0.0, drifts_shown: int = 5) -> str:
    """The verdict as text: one row per report (status, keys compared, matched, drifted, the
    worst drift), then per report the keys found on one side only, the first values that
    drifted, its provenance differences and messages."""
    import pandas as pd

    rows = []
    for result in results:
        worst = result.worst
        rows.append(
            {
                "report": result.report,
                "status": result.status,
                "compared": result.compared,
                "matched": result.matched,
                "drifted": len(result.drifts),
                "worst drift": worst.describe()
                if worst
                else (result.message.splitlines()[0] if result.message else ""),
            }
        )
    table = pd.DataFrame(rows, columns=["report", "status", "compared", "matched", "drifted", "worst drift"])
    rule = "exact" if tolerance == 0 else f"absolute tolerance {tolerance:g}"
    lines = [f"verify: {len(results)} report(s), numbers compared {rule}", table.to_string(index=False, justify="left")]
    for result in results:
        details = []
        for side, attribute in (("the committed report", "new"), ("the re-run", "committed")):
            only = [d.key for d in result.drifts if getattr(d, attribute) is MISSING]
            if only:  # e.g. a report written by older code, before a key was added
                shown = ", ".join(only[:drifts_shown]) + (
                    f" and {len(only) - drifts_shown} more" if len(only) > drifts_shown else ""
                )
                details.append(f"  {len(only)} key(s) only in {side}: {shown}")
        valued = [d for d in result.drifts if d.committed is not MISSING and d.new is not MISSING]
        details += [f"  drift {d.describe()}" for d in valued[:drifts_shown]]
        if len(valued) > drifts_shown:
            details.append(f"  ... and {len(valued) - drifts_shown} more drifted value(s)")
        details += [f"  differs: {line}" for line in result.differences]
        if result.freshness and result.freshness != "current":
            details.append(f"  freshness of the committed report: {result.freshness}")
        if result.message and result.status in ("failed", "skipped"):
            details.append(f"  {result.status}: {result.message}")
        if details:
            lines += [f"{result.report}:"] + details
    counts = {status: sum(r.status == status for r in results) for status in STATUSES}
    lines.append("verify: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n))
    return "\n".join(lines)


def exit_code(results: Iterable[VerifyResult]) -> int:
    """1 if any report drifted or could not be re-run, else 0 (skipped reports pass)."""
    return int(any(result.status in ("drifted", "failed") for result in results))
