"""Check that the committed reports regenerate: ``anomalib-study verify``.

For each committed ``<reports>/<notebook>/<cell>.metrics.json`` selected, the cell is run
again, from the study file named in its ``_run["study"]``, with
:func:`anomalib_study.runner.run_study` into a scratch folder (a temporary one, or
``scratch``, kept: verify then resumes, comparing the re-runs already there that are current
instead of running them again), and the two metrics are compared key by key
(:mod:`anomalib_study.verify_compare`); the committed reports folder is only read, never
written, unless ``adopt`` is given: then each committed report that is not current (stale, or
of unknown freshness) and whose re-run matched, and is current, is replaced by the re-run, so
that one pass over every report both checks the committed figures and regenerates them at the
code it checked (:func:`adopt_rerun`; the front page is written again). A cell that reads the
other reports (the comparison, notebook 05) is never adopted: its re-run read the scratch
folder's reports; run it with ``anomalib-study run`` once the others are current. With
``adopt_drifted`` a drifted re-run is adopted too (its figures change: the output lists each
one's drifts, and a verify resumed from the same scratch folder still reports them as drifts
from the report replaced). The comparison tells numbers from bookkeeping:

* numbers decide: a report is ``"matched"`` when every number (ints, floats, lists of them,
  the per-image scores, labels inside those tables) is equal up to float rounding, or within
  the tolerance its method declares for figures that cannot be bit-exact on another CPU
  (the autoencoder's training losses and reconstruction-based scores:
  :func:`anomalib_study.verify_compare.tolerance_table`), or within ``tolerance``; else
  ``"drifted"``;
* keys only one side has (written by newer or older code) are **schema differences** and
  text that differs (a reworded rule, a note) **wording differences**: listed, not drifts;
* paths are compared relative to their root (the data folder, the cache, the reports
  folder, the Python environment, the home folder), inside free text too; times, memory and
  provenance are left out (:data:`UNCOMPARED`).

Each cell is re-run with the thread count its committed report recorded (:func:`rerun_threads`):
a seeded training repeats bit for bit only with the same threads on the same CPU.

Provenance differences (package version, git commit, CPU, cores, threads, GPU, python and
torch versions, platform, backbone weights hash, seed, device, the runner's inputs hash, the
cell's parameters) are printed one line each: they explain a drift but are not one. A cell
that needs the real data when none is given is ``"skipped"``, with the reason. The output
ends with one line per notebook and the overall count (:func:`format_table`).
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

from anomalib_study import comparison, io, runner, schema
from anomalib_study.errors import ParameterError, StudyError
from anomalib_study.io import atomic_write
from anomalib_study.methods import Tolerance
from anomalib_study.report_files import CellResult, report_files_match
from anomalib_study.verify_compare import (
    MISSING,
    UNCOMPARED,
    Comparison,
    Drift,
    check_tolerance,
    compare,
    compare_metrics,
    flatten,
    machine_roots,
    provenance_differences,
    tolerance_table,
)

__all__ = [
    "UNCOMPARED",
    "MISSING",
    "Comparison",
    "Drift",
    "VerifyResult",
    "adopt_rerun",
    "compare",
    "compare_metrics",
    "committed_reports",
    "exit_code",
    "flatten",
    "format_table",
    "judge",
    "notebook_summaries",
    "provenance_differences",
    "recorded_threads",
    "rerun_threads",
    "tolerance_table",
    "verify_reports",
]

#: the statuses of a :class:`VerifyResult`; the first two are the only ones that pass
STATUSES = ("matched", "skipped", "drifted", "failed")


@dataclass
class VerifyResult:
    """The verdict on one committed report.

    Attributes:
        report: ``<notebook folder>/<cell>``.
        status: ``"matched"`` (every number within its tolerance), ``"drifted"`` (see
            ``drifts``), ``"failed"`` (the re-run failed, or the study file or cell is gone;
            see ``message``) or ``"skipped"`` (not runnable here, e.g. the real data is
            absent; see ``message``).
        compared: values compared (numbers and text both sides hold); ``matched``: of
            those, the ones equal or within tolerance.
        drifts: the numbers beyond their tolerance.
        differences: one line per provenance field that differs (commit, CPU, ...).
        message: why it failed or was skipped ("" otherwise).
        committed: the committed metrics file; ``rerun``: the re-run's (None if none,
            and gone with a temporary scratch folder).
        freshness: the committed report's freshness by the front page's rule
            (:func:`anomalib_study.comparison.freshness`): ``"current"``, ``"stale: <why>"``
            or ``"unknown: <why>"``.
        schema: keys only one side has; ``wording``: text that differs; ``tolerated``:
            numbers that differ within their tolerance (all three: not drifts).
        resumed: when the re-run compared is one an earlier verify left in the kept scratch
            folder (current, so not run again), when that re-run started; else "".
        adopted: the re-run replaced the committed report (``adopt``; in a verify resumed
            from the same scratch folder, an earlier verify did, and the comparison is with the
            report it replaced); ``freshness`` is then the replaced report's.
        reads_reports: the cell reads the other reports (notebook 05's comparison): never adopted.
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
    schema: list[Drift] = field(default_factory=list)
    wording: list[Drift] = field(default_factory=list)
    tolerated: list[Drift] = field(default_factory=list)
    resumed: str = ""
    adopted: bool = False
    reads_reports: bool = False

    @property
    def notebook(self) -> str:
        """The notebook folder of the report (``02_patchcore``)."""
        return self.report.split("/", 1)[0]

    @property
    def worst(self) -> Drift | None:
        """The numeric drift of largest difference, else the first drift, else None."""
        numeric = [d for d in self.drifts if d.difference is not None]
        if numeric:
            return max(numeric, key=lambda d: d.difference if not math.isnan(d.difference) else math.inf)
        return self.drifts[0] if self.drifts else None


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


def _as_named(study_path: Path) -> Path:
    """The study file as reports name it: relative to the current folder when it lies under it
    (``studies/knn.yaml``, as ``anomalib-study run studies/knn.yaml`` records it), so that a re-run,
    adopted or not, names it as the committed reports do and a clone elsewhere finds it."""
    try:
        return study_path.relative_to(Path.cwd().resolve())
    except ValueError:
        return study_path


#: the file verify writes into a kept scratch folder: only a folder holding it is resumed from
SCRATCH_MARKER = ".anomalib-study-verify"


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
            f"{reports} (the re-runs must not mix with the reports they are compared with); choose another folder"
        )
    marker = folder / SCRATCH_MARKER
    if folder.is_dir() and any(folder.iterdir()) and not marker.is_file():
        # reports there that verify did not re-run (another study's output, a clone's reports/) must
        # never be compared as if they were re-runs
        raise ParameterError(
            f"--keep-scratch {scratch}: the folder holds files an earlier verify did not leave (no "
            f"{SCRATCH_MARKER} in it); give a new or empty folder, or the one a verify kept"
        )
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(marker, "w") as handle:
        handle.write(
            "re-runs of `anomalib-study verify`, kept with --keep-scratch: a verify given this folder resumes\n"
        )
    yield folder


def verify_reports(
    reports_dir: str | os.PathLike = "reports",
    only: str | Iterable[str] | None = None,
    tolerance: float = 0.0,
    data_root: str | os.PathLike | None = None,
    scratch: str | os.PathLike | None = None,
    *,
    adopt: bool = False,
    adopt_drifted: bool = False,
    kernel_name: str | None = None,
    log: Callable[[str], None] = print,
) -> list[VerifyResult]:
    """Re-run committed reports in a scratch folder and compare their metrics with the committed ones.

    Args:
        reports_dir: the committed reports (``<reports_dir>/<notebook>/<cell>.metrics.json``);
            only read, unless ``adopt``.
        only: cell names or ``<notebook>/<cell>``, glob patterns allowed (None: every report);
            a pattern that matches nothing is a StudyError.
        tolerance: largest absolute difference of two numbers that still matches, on top of
            each number's own tolerance (0: none; :func:`tolerance_table`).
        data_root: the real data folder (default $ANOMALIB_STUDY_DATA); without it, cells
            that need it are skipped.
        scratch: where the re-runs go, kept afterwards (None: a temporary folder, removed);
            must lie outside ``reports_dir``. A kept folder resumes: a re-run already in it
            and current (same notebook, parameters, data and code, by the runner's rule) is
            compared without running it again, so a verify over every report can be spread
            over several sessions.
        adopt: replace each committed report that is not current and whose re-run matched
            (and is itself current) by that re-run (:func:`adopt_rerun`), under the reports
            folder's lock, as soon as its study file's re-runs are compared (a verify stopped
            midway keeps what it adopted), then write the front page again; drifted, failed
            and current reports, and cells that read the other reports, are left as they
            are. Not with ``tolerance``: a report adopted must hold the committed numbers by
            each number's own rule.
        adopt_drifted: with ``adopt``, a drifted re-run replaces its committed report too: for
            a drift understood (a report run by older code or on another CPU), it saves running
            the cell once more; its drifts stay in the output and in every resumed verify.
        kernel_name: the Jupyter kernel (see :func:`anomalib_study.runner.run_study`).
        log: called with the runner's progress lines, then the table (:func:`format_table`).

    Returns one :class:`VerifyResult` per selected report (use :func:`exit_code`).
    """
    tolerance = check_tolerance(tolerance)
    if adopt_drifted and not adopt:
        raise ParameterError("--adopt-drifted needs --adopt")
    if adopt and tolerance:
        raise ParameterError(
            f"--adopt with --tolerance {tolerance:g}: a report is adopted only when every number matched by its "
            "own rule; drop --tolerance"
        )
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

    adopted_any = False
    with _scratch_folder(scratch, reports) as out:
        # paths compared relative to their roots: the re-run's on this machine, the committed
        # reports folder for the re-runs' scratch folder; the committed data and cache roots
        # are read off the paths both reports hold
        roots = machine_roots(data_root, reports=out)
        committed_roots = {"reports": Path(os.path.abspath(reports)).as_posix()}
        for study_path, entries in by_study.items():
            for entry, result in _rerun_study(
                study_path,
                entries,
                out,
                tolerance,
                data_root,
                kernel_name,
                log,
                roots,
                committed_roots,
                resume=scratch is not None,
            ):
                if not result.freshness:
                    result.freshness = _freshness(entry.path)
                if _adoptable(adopt, result, entry, adopt_drifted):
                    with io.folder_lock(runner.reports_lock(reports), f"the reports folder {reports}", wait=False):
                        if _read_committed(entry.path)[1] == entry.metrics:  # not replaced since it was compared
                            adopt_rerun(result, log)
                            adopted_any = True
                        else:
                            log(f"{entry.report}: not adopted: the committed report changed while it was re-run")
                results[entry.report] = result
        ordered = [results[report] for report, _ in selected]
        for result, (_, path) in zip(ordered, selected):
            result.freshness = result.freshness or _freshness(path)
        if adopted_any:
            runner.write_index(reports)
            log(
                f"verify: wrote {reports / 'index.html'}; run the comparison again (anomalib-study run "
                "studies/comparison.yaml) once every other report is current"
            )
        if scratch is None:  # the temporary folder goes: no path into it may be handed back
            for result in ordered:
                result.rerun = None
    log(format_table(ordered, tolerance))
    return ordered


def _adoptable(adopt: bool, result: VerifyResult, entry: _Committed, drifted: bool = False) -> bool:
    """Whether ``--adopt`` replaces this committed report by its re-run: it matched (or, with
    ``drifted``, drifted), was not current, the re-run is current, and the cell does not read
    the other reports."""
    statuses = ("matched", "drifted") if drifted else ("matched",)
    if not adopt or result.adopted or result.status not in statuses or result.rerun is None or result.reads_reports:
        return False
    if result.freshness.startswith("current"):
        return False
    return _freshness(result.rerun).startswith("current")


def _replaced_path(rerun: Path) -> Path:
    """Where :func:`adopt_rerun` keeps the metrics of the report a re-run replaced (beside the re-run)."""
    return rerun.with_name(rerun.name[: -len(".metrics.json")] + ".replaced-by-verify.json")


def adopt_rerun(result: VerifyResult, log: Callable[[str], None] = print) -> None:
    """Replace the committed report of ``result`` (matched, or drifted under ``adopt_drifted``)
    by its re-run: every file the
    re-run's ``_run["files"]`` records, then its metrics (each written atomically, the metrics
    last, as the runner writes a report); side files only the replaced report recorded, and
    its ``.failed.*`` files, are removed. Sets ``result.adopted``.

    The replaced metrics are kept beside the re-run (``<cell>.replaced-by-verify.json``): a
    verify resumed from that scratch folder compares the re-run with them, not with its own
    copy, so its summary still says how the regenerated report compares with the one it replaced."""
    if result.status not in ("matched", "drifted") or result.rerun is None or result.committed is None:
        raise ValueError(f"{result.report}: only a matched or drifted report with its re-run can be adopted")
    source, target = result.rerun.parent, result.committed.parent
    with atomic_write(_replaced_path(result.rerun)) as handle:  # what a resumed verify compares it with
        handle.write(result.committed.read_bytes())
    new_metrics = result.rerun.read_bytes()
    cell = result.committed.name[: -len(".metrics.json")]

    def own(files: Any) -> list[str]:  # the report's own files, beside its metrics (never a path elsewhere)
        names = list(files) if isinstance(files, dict) else []
        return [n for n in names if Path(n).name == n and n.startswith(f"{cell}.")]

    new_files = own(json.loads(new_metrics)["_run"]["files"])
    old_files = own(json.loads(result.committed.read_text(encoding="utf-8")).get("_run", {}).get("files"))
    for name in new_files:
        with atomic_write(target / name) as handle:
            handle.write((source / name).read_bytes())
    with atomic_write(result.committed) as handle:  # last: a complete report is one with matching metrics
        handle.write(new_metrics)
    gone = [name for name in old_files if name not in new_files]
    gone += [f"{cell}.failed.{suffix}" for suffix in ("ipynb", "html", "json")]
    for name in gone:
        with contextlib.suppress(FileNotFoundError):
            (target / name).unlink()
    result.adopted = True
    worst = result.worst
    changed = f"; its figures change, worst {worst.describe()}" if result.status == "drifted" and worst else ""
    log(f"{result.report}: {result.status}; the re-run replaces the committed report ({result.freshness}){changed}")


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


def _freshness(metrics_path: Path, metrics: dict[str, Any] | None = None) -> str:
    """A report's freshness, by the front page's rule (:func:`comparison.report_freshness`);
    ``metrics``: its metrics when not read from ``metrics_path`` (a replaced report's)."""
    cell = metrics_path.name[: -len(".metrics.json")]
    if metrics is None:
        metrics = io.read_json_object(metrics_path)
    fresh, why = comparison.report_freshness(
        comparison.Report(metrics_path.parent.name, cell, metrics_path.parent, metrics, None)
    )
    return fresh if not why else f"{fresh}: {why}"


def recorded_threads(metrics: Mapping[str, Any]) -> int | None:
    """The threads a report's kernel computed with: torch's count in ``environment.threads``, else the
    ``OMP_NUM_THREADS`` the runner gave it (``_run.provenance.threads``); None where neither is recorded."""
    environment = metrics.get("environment") or {}
    provenance = (metrics.get("_run") or {}).get("provenance") or {}
    for value in (
        (environment.get("threads") or {}).get("torch"),
        (environment.get("threads") or {}).get("OMP_NUM_THREADS"),
        (provenance.get("threads") or {}).get("OMP_NUM_THREADS"),
    ):
        try:
            count = int(value)
        except (TypeError, ValueError):
            continue
        if count >= 1:
            return count
    return None


def rerun_threads(
    metrics: Mapping[str, Any], cores: int | None = None, log: Callable[[str], None] = print, report: str = ""
) -> int | None:
    """The thread count to re-run a committed report with: the one it recorded (a seeded training is
    repeatable only with the same threads, on the same CPU), unless this machine has fewer cores
    (then None, the runner's default, and a line saying so: oversubscribed threads only slow it down)."""
    count = recorded_threads(metrics)
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if count is not None and count > cores:
        log(
            f"verify: {report or 'a report'} ran with {count} threads; this machine has {cores} cores: re-run with "
            "the default (a trained model may drift for that alone)"
        )
        return None
    return count


def _kept_with_other_threads(kept: Path, threads: int | None) -> bool:
    """Whether the re-run kept at ``kept`` (a scratch folder's) ran with other threads than ``threads``."""
    if threads is None or not kept.is_file():
        return False
    try:
        return recorded_threads(json.loads(kept.read_text(encoding="utf-8"))) not in (None, threads)
    except (OSError, ValueError):
        return False


def _rerun_groups(
    entries: Sequence[_Committed],
    reads_reports: Mapping[str, set[str]],
    out: Path,
    resume: bool,
    log: Callable[[str], None] = print,
) -> list[tuple[int | None, bool, list[_Committed]]]:
    """``(threads, force, entries)`` per :func:`runner.run_study` call, in order: each re-run with the
    thread count its committed report ran with (:func:`rerun_threads`); resuming, a re-run kept in ``out``
    with other threads is run again (``force``: the runner's "current" test does not look at threads);
    a cell that reads the other reports (the comparison) after every other group, as a suite orders it."""
    groups: dict[tuple[bool, int | None, bool], list[_Committed]] = {}
    for entry in entries:
        threads = rerun_threads(entry.metrics, log=log, report=entry.report)
        force = not resume or _kept_with_other_threads(out / entry.folder / f"{entry.cell}.metrics.json", threads)
        reads = entry.cell in reads_reports.get(entry.folder, set())
        groups.setdefault((reads, threads, force), []).append(entry)
    return [(threads, force, group) for (_, threads, force), group in sorted(groups.items(), key=lambda i: i[0][0])]


def _rerun_study(
    study_path: Path,
    entries: list[_Committed],
    out: Path,
    tolerance: float,
    data_root: str | os.PathLike | None,
    kernel_name: str | None,
    log: Callable[[str], None],
    roots: list[tuple[str, str]],
    committed_roots: dict[str, str],
    resume: bool = False,
) -> Iterator[tuple[_Committed, VerifyResult]]:
    try:  # a study file, or a suite whose parts run several notebooks
        studies = {study.notebook.stem: study for study in runner.read_studies(study_path)}
        grids = {stem: runner.expand_grid(study) for stem, study in studies.items()}
        cells = {stem: {cell.name for cell in grid} for stem, grid in grids.items()}
        reads_reports = {
            stem: {cell.name for cell in grid if runner.uses_reports(cell.parameters)} for stem, grid in grids.items()
        }
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
    ran: list[CellResult] = []
    for threads, force, group in _rerun_groups(runnable, reads_reports, out, resume, log):
        if threads is not None:
            log(f"verify: {len(group)} report(s) re-run with {threads} thread(s) per kernel, as committed")
        try:
            ran += runner.run_study(
                _as_named(study_path),
                reports_dir=out,
                only=[f"{e.folder}/{e.cell}" for e in group],
                force=force,  # resume: a current re-run in the kept scratch folder is not run again
                data_root=data_root,
                kernel_name=kernel_name,
                threads=threads,
                log=log,
            )
        except StudyError as error:
            for entry in group:
                yield entry, VerifyResult(entry.report, "failed", committed=entry.path, message=str(error))
            runnable = [entry for entry in runnable if entry not in group]
    by_name = {(result.notebook, result.name): result for result in ran}
    for entry in runnable:
        cell = by_name[(entry.folder, entry.cell)]
        new_path = out / entry.folder / f"{entry.cell}.metrics.json"
        if cell.status == "skipped":
            yield entry, VerifyResult(entry.report, "skipped", committed=entry.path, message=cell.message)
            continue
        if cell.status not in ("ok", "unchanged"):
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
        committed, adopted = entry.metrics, False
        replaced = _replaced_path(new_path)
        if cell.status == "unchanged" and replaced.is_file() and entry.path.read_bytes() == new_path.read_bytes():
            # this re-run was adopted by an earlier verify: the committed report is now a copy of it, so the
            # comparison that counts is the one with the report it replaced, kept beside the re-run
            committed, adopted = json.loads(replaced.read_text(encoding="utf-8")), True
        result = judge(entry.report, committed, new, tolerance, roots=roots, committed_roots=committed_roots)
        result.committed, result.rerun, result.adopted = entry.path, new_path, adopted
        result.reads_reports = entry.cell in reads_reports.get(entry.folder, set())
        if adopted:
            result.freshness = _freshness(entry.path, committed)
        if cell.status == "unchanged":  # a current re-run an earlier verify left in the kept folder
            result.resumed = str(new.get("_run", {}).get("started_at") or "an earlier verify")
        yield entry, result


def judge(
    report: str,
    committed: Mapping[str, Any],
    new: Mapping[str, Any],
    tolerance: float = 0.0,
    *,
    roots: Sequence[tuple[str, str]] | None = None,
    committed_roots: Mapping[str, str] | None = None,
    tolerances: Sequence[Tolerance] | None = None,
) -> VerifyResult:
    """The verdict on report ``report`` (``<notebook>/<cell>``) from its committed metrics and
    its re-run's (the keywords: :func:`anomalib_study.verify_compare.compare`'s):
    ``"drifted"`` when a number drifted beyond its tolerance, else ``"matched"``, with the
    schema and wording differences and the provenance that differs."""
    found = compare(committed, new, tolerance, roots=roots, committed_roots=committed_roots, tolerances=tolerances)
    return VerifyResult(
        report,
        "drifted" if found.drifts else "matched",
        found.compared,
        found.matched,
        found.drifts,
        provenance_differences(committed, new, roots=roots, committed_roots=committed_roots),
        schema=found.schema,
        wording=found.wording,
        tolerated=found.tolerated,
    )


# --------------------------------------------------------------------------- output


def _families(drifts: Sequence[Drift]) -> list[tuple[Drift, int]]:
    """The first difference of each key family (list indices dropped) and how many there are."""
    first: dict[str, Drift] = {}
    counts: dict[str, int] = {}
    for drift in drifts:
        first.setdefault(drift.family, drift)
        counts[drift.family] = counts.get(drift.family, 0) + 1
    return [(drift, counts[name]) for name, drift in first.items()]


def _listed(names: Sequence[str], shown: int) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _times(count: int) -> str:
    return f" ({count} times)" if count > 1 else ""


def _details(result: VerifyResult, shown: int) -> list[str]:
    """The lines under a report: its schema and wording differences (one per key family),
    the numbers within tolerance, the drifts, provenance, freshness and messages."""
    details = []
    for side, attribute in (("the committed report", "new"), ("the re-run", "committed")):
        only = [d for d in result.schema if getattr(d, attribute) is MISSING]
        families = [f"{d.key}{_times(n)}" for d, n in _families(only)]
        if families:  # e.g. a report written by older code, before a key was added
            details.append(f"  schema: {len(families)} key(s) only in {side}: {_listed(families, shown)}")
    wording = _families(result.wording)
    details += [f"  wording: {d.describe()}{_times(n)}" for d, n in wording[:shown]]
    if len(wording) > shown:
        details.append(f"  wording: ... and {len(wording) - shown} more key(s)")
    if result.tolerated:
        largest = max(result.tolerated, key=lambda d: d.difference or 0.0)
        details.append(f"  within tolerance: {len(result.tolerated)} number(s); largest {largest.describe()}")
    drifted = _families(result.drifts)
    details += [f"  drift {d.describe()}{_times(n)}" for d, n in drifted[:shown]]
    if len(drifted) > shown:
        details.append(f"  ... and {len(drifted) - shown} more drifted key(s)")
    details += [f"  differs: {line}" for line in result.differences]
    if result.resumed:
        details.append(f"  re-run not repeated: the current one kept in the scratch folder, run {result.resumed}")
    if result.freshness and result.freshness != "current":
        details.append(f"  freshness of the committed report: {result.freshness}")
    if result.adopted:
        details.append(
            "  adopted: the re-run replaced the committed report (--adopt"
            + (", --adopt-drifted: the drifts above are the figures that changed)" if result.drifts else ")")
        )
    if result.message and result.status in ("failed", "skipped"):
        details.append(f"  {result.status}: {result.message}")
    return details


def _counts(results: Sequence[VerifyResult], shown: int = 3) -> tuple[list[str], list[str]]:
    """``(["11 matched", "1 drifted (image_auroc)"], ["3 with schema differences"])``: the
    statuses, then how many reports have schema and wording differences."""
    statuses = []
    for status in STATUSES:
        chosen = [r for r in results if r.status == status]
        if chosen:
            keys = list(dict.fromkeys(d.family for r in chosen for d in r.drifts))
            statuses.append(f"{len(chosen)} {status}" + (f" ({_listed(keys, shown)})" if keys else ""))
    kinds = [f"{n} with {kind} differences" for kind in ("schema", "wording") if (n := _with(results, kind))]
    if adopted := _with(results, "adopted"):
        kinds.append(f"{adopted} adopted (the re-run replaced a committed report that was not current)")
    return statuses, kinds


def _with(results: Sequence[VerifyResult], kind: str) -> int:
    return sum(bool(getattr(result, kind)) for result in results)


def notebook_summaries(results: Sequence[VerifyResult]) -> list[str]:
    """One line per notebook folder, in order of first appearance:
    ``"02_patchcore: 12 reports: 11 matched, 1 drifted (image_auroc), 3 with schema differences"``."""
    by_notebook: dict[str, list[VerifyResult]] = {}
    for result in results:
        by_notebook.setdefault(result.notebook, []).append(result)
    return [
        f"{notebook}: {len(chosen)} report{'s' if len(chosen) != 1 else ''}: {', '.join(sum(_counts(chosen), []))}"
        for notebook, chosen in by_notebook.items()
    ]


def format_table(results: Sequence[VerifyResult], tolerance: float = 0.0, drifts_shown: int = 5) -> str:
    """The verdict as text: one row per report (status; values compared and matched; number
    drifts, schema and wording differences; the worst drift), then per report its details
    (:func:`_details`), one summary line per notebook (:func:`notebook_summaries`) and the
    overall count, last."""
    import pandas as pd

    columns = ["report", "status", "compared", "matched", "drifted", "schema", "wording", "worst drift"]
    rows = []
    for result in results:
        worst = result.worst
        message = result.message.splitlines()[0] if result.message else ""
        rows.append(
            dict(
                zip(
                    columns,
                    (
                        result.report,
                        result.status,
                        result.compared,
                        result.matched,
                        len(result.drifts),
                        len(_families(result.schema)),
                        len(_families(result.wording)),
                        worst.describe() if worst else message,
                    ),
                )
            )
        )
    table = pd.DataFrame(rows, columns=columns)
    extra = f", or within absolute {tolerance:g} (--tolerance)" if tolerance else ""
    lines = [
        f"verify: {len(results)} report(s); numbers exact up to float rounding, or within their method's "
        f"declared tolerance{extra}; schema and wording differences are listed, not drifts",
        table.to_string(index=False, justify="left"),
    ]
    for result in results:
        details = _details(result, drifts_shown)
        if details:
            lines += [f"{result.report}:"] + details
    lines += notebook_summaries(results)
    statuses, kinds = _counts(results)
    lines.append("verify: " + ", ".join(statuses) + (f"; {', '.join(kinds)}" if kinds else ""))
    return "\n".join(lines)


def exit_code(results: Iterable[VerifyResult]) -> int:
    """1 if a number drifted beyond its tolerance or a report could not be re-run, else 0
    (skipped reports, schema and wording differences pass)."""
    return int(any(result.status in ("drifted", "failed") for result in results))
