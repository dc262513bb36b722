"""Run a study: execute a notebook over a grid of data sets x backbones (or variants) and render the reports.

This module orchestrates: which cells run, where, and the reports they leave. The study file,
its grid and the cells' parameters are :mod:`anomalib_study.studies`; executing one cell is
:mod:`anomalib_study.execution` (the Dask client: :mod:`anomalib_study.dask_cluster`); writing
one cell's report files is :mod:`anomalib_study.report_files`. Their public names are
re-exported here (``from anomalib_study.runner import read_studies, execute_cell`` works); a
name is looked up in the module that uses it, so patch it there (``synthetic_root`` and
``package_sources_hash`` are looked up here).

A suite file (``title`` + ``studies:``) runs its studies in order into the same reports folder,
so a later part may read the earlier reports (e.g. the comparison; see :func:`read_studies`).

One cell per distinct computation: a study file that repeats a computation of another study
file in its folder (or writes one of its reports with other parameters) is refused before
anything runs (:func:`refuse_duplicates`). The cells a study ``uses`` (defined by another study
file) are never run for it, nor with ``force``: they are listed after its own cells,
``"unchanged"`` when their report is current, else ``"skipped"`` naming the command that runs them.

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
each hashed on its syntax tree without docstrings: :mod:`anomalib_study.freshness`;
:func:`execute_cell` appends a cell that writes them and removes it from the executed notebook) beside
``inputs_hash``, so that the index can tell a report whose notebook or code it ran changed
since (stale); a docstring edit or a change to a module the report did not load leaves it
current.

A cell is skipped (status ``"unchanged"``) when its inputs hash (notebook bytes, resolved
parameters, the data-root path) equals the one stored in its metrics file, none of the
modules its kernel loaded changed, its HTML exists and its last run succeeded;
``force=True`` reruns it. (Reports from before ``code`` was recorded hold the hash of every
package source file in their inputs hash instead: for them any package change counts.)

Where cells run: every cell goes through :func:`execute_cell`, which writes no report file;
the client writes the reports as each result arrives. ``jobs=N`` runs it in N threads here;
``scheduler="tcp://host:8786"`` sends it to the workers of an existing Dask cluster (one cell
per worker thread; ``jobs`` must then stay 1). A worker that dies mid-cell makes the
scheduler run the cell again elsewhere (up to ``distributed.scheduler.allowed-failures``,
default 3); as nothing is written before the client holds the result, each report is
written exactly once. Each kernel gets ``cores // cells at once`` OpenMP/MKL threads (on a
cluster per host, the smallest), passed in the task as the kernel's environment; variables
the client sets win.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from anomalib_study import freshness, io

# ``name as name``: re-exported, not used here (every public name that lived in this module still does)
from anomalib_study.dask_cluster import CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S
from anomalib_study.dask_cluster import WORKER_WAIT_S as WORKER_WAIT_S
from anomalib_study.dask_cluster import cluster_kernel_threads, connect_cluster
from anomalib_study.errors import ParameterError, StudyError
from anomalib_study.execution import CODE_RECORD_FILE as CODE_RECORD_FILE
from anomalib_study.execution import CODE_RECORD_TAG as CODE_RECORD_TAG
from anomalib_study.execution import PREFERRED_KERNEL as PREFERRED_KERNEL
from anomalib_study.execution import THREAD_VARIABLES as THREAD_VARIABLES
from anomalib_study.execution import CellOutput, CellTask, choose_kernel, execute_cell, kernel_env
from anomalib_study.execution import render_html as render_html
from anomalib_study.report_files import REPORT_SIZE_WARNING as REPORT_SIZE_WARNING
from anomalib_study.report_files import CellResult, ReportWriter, headline_text, report_files_match
from anomalib_study.studies import AXES as AXES
from anomalib_study.studies import DATASET_BACKBONES as DATASET_BACKBONES
from anomalib_study.studies import NEEDS_DATA as NEEDS_DATA
from anomalib_study.studies import RUNNER_PARAMETERS as RUNNER_PARAMETERS
from anomalib_study.studies import STUDY_KEYS as STUDY_KEYS
from anomalib_study.studies import SUITE_KEYS as SUITE_KEYS
from anomalib_study.studies import SYNTHETIC_SEED as SYNTHETIC_SEED
from anomalib_study.studies import (
    Cell,
    Study,
    check_cells,
    check_notebook_parameters,
    expand_grid,
    read_studies,
    resolve_parameters,
    synthetic_path,
    synthetic_root,
    used_cells,
)
from anomalib_study.studies import notebook_parameters as notebook_parameters
from anomalib_study.studies import read_study as read_study
from anomalib_study.studies import select_cells as select_cells
from anomalib_study.study_duplicates import duplicate_cells

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
    """Prepares the cells of one study and writes their reports into ``reports/<notebook stem>/``
    (through its :class:`~anomalib_study.report_files.ReportWriter`, ``reports``).

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
        self.reports = ReportWriter(study, out_dir, kernel, self.notebook_bytes, log, on_cluster)

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
        digest, current = self.current_report(cell, parameters)
        if current is not None and not self.force:
            self.log(f"{tag}: unchanged, not rerun ({self.headline(current)})".replace(" ()", ""))
            return current

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

    def current_report(self, cell: Cell, parameters: Mapping[str, Any]) -> tuple[str, CellResult | None]:
        """The cell's inputs hash, and its report as an ``"unchanged"`` result when that report is
        current (same inputs hash, none of the modules its kernel loaded changed, its last run
        succeeded, its files whole), else None. ``parameters``: resolved, with ``report_name``."""
        paths = self.reports.paths(cell.name)
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
        if not (
            run_info.get("inputs_hash") == recorded_digest
            and code_current
            and run_info.get("status") == "ok"
            and paths["html"].is_file()
            and not paths["failed_json"].exists()
            and report_files_match(self.out_dir, run_info)  # a half-replaced report is rerun
        ):
            return digest, None
        metrics = {k: v for k, v in previous.items() if k != "_run"}
        result = CellResult(
            cell.name,
            cell.dataset,
            cell.backbone,
            "unchanged",
            dict(parameters),
            metrics,
            html=paths["html"],
            variant=cell.variant,
        )
        return digest, result

    def headline(self, result: CellResult) -> str:
        return headline_text(result.metrics, self.study.headline)

    def referenced(self, index: int, cell: Cell, user: Path) -> CellResult:
        """The result of a cell this runner's study defines and the study ``user`` uses: never
        run here. ``"unchanged"`` when its report is current (``defined_by`` names its study),
        ``"skipped"`` otherwise, the message naming the command that runs it."""
        tag = f"[{index}/{self.total}] {cell.name}"
        defined = str(self.study.path)
        parameters, reason = resolve_parameters(
            cell.parameters, data=self.data, synthetic=self.synthetic_root, reports=self.out_dir.parent
        )
        if not reason:
            parameters["report_name"] = cell.name
            _, current = self.current_report(cell, parameters)
            if current is not None:
                current.defined_by = defined
                line = f"{tag}: defined by {defined}, current, not run here ({self.headline(current)})"
                self.log(line.replace(" ()", ""))
                return current
            paths = self.reports.paths(cell.name)
            state = "failed" if paths["failed_json"].exists() else "stale" if paths["metrics"].exists() else "missing"
            reason = (
                f"{state}; used by {user}, defined by {defined}: run "
                f"`anomalib-study run {defined} --only '{cell.name}'`"
            )
        else:
            reason = f"{reason} (defined by {defined}, used by {user})"
        self.log(f"{tag}: skipped, {reason}")
        return CellResult(
            cell.name,
            cell.dataset,
            cell.backbone,
            "skipped",
            parameters,
            message=reason,
            variant=cell.variant,
            defined_by=defined,
        )

    def record(self, pending: _Pending, output: CellOutput) -> CellResult:
        """Write the report of an executed cell (:meth:`anomalib_study.report_files.ReportWriter.write`)."""
        return self.reports.write(pending.cell, pending.parameters, pending.digest, pending.tag, output)


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
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> list[CellResult]:
    """Execute a study's grid and render its reports; returns one CellResult per selected cell.

    Args:
        study_file: the YAML study file (see :mod:`anomalib_study.studies`), or a suite of studies
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
        threads: the OpenMP/MKL threads of every kernel, in place of ``cpu_count // jobs`` and of the
            client's own variables (``verify`` re-runs a report with the count it recorded: training
            sums in an order set by the threads). Not with ``scheduler``.
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
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ParameterError(f"threads must be a whole number >= 1, got {threads!r}")
    if scheduler is not None and threads is not None:
        raise ParameterError("threads and scheduler are exclusive: on a Dask cluster the workers set the threads")
    studies = read_studies(study_file)
    refuse_duplicates(study_file, studies)

    def with_device(cells: list[Cell]) -> list[Cell]:
        if device is None:
            return cells
        return [dataclasses.replace(c, parameters={**c.parameters, "device": device}) for c in cells]

    grids, used = [], []  # per part: its own cells; the cells it uses, with their defining studies
    own = set()  # (study file, notebook, cell) run by this run: a part using one of them lists it no more
    for study in studies:
        cells = with_device(expand_grid(study))
        check_notebook_parameters(study, cells)
        grids.append(cells)
        own |= {(study.path.resolve(), study.notebook.stem, cell.name) for cell in cells}
    for study in studies:
        pairs = []
        for owner, cell in used_cells(study):
            if (owner.path.resolve(), owner.notebook.stem, cell.name) not in own:
                pairs += [(owner, with_device([cell])[0])]
        used.append(pairs)
    patterns = [] if only is None else [only] if isinstance(only, str) else list(only)
    if patterns:  # a pattern must match a cell of some part (its own or one it uses); each part keeps its matches

        def matches(study: Study, cell: Cell, pattern: str) -> bool:
            return fnmatch.fnmatchcase(cell.name, pattern) or fnmatch.fnmatchcase(
                f"{study.notebook.stem}/{cell.name}", pattern
            )

        every = [(s, c) for s, cells in zip(studies, grids) for c in cells] + [pair for pairs in used for pair in pairs]
        for pattern in patterns:
            if not any(matches(s, c, pattern) for s, c in every):
                names = ", ".join(f"{s.notebook.stem}/{c.name}" for s, c in every)
                raise StudyError(f"--only {pattern!r} matches no cell of the study (cells: {names})")
        grids = [[c for c in cells if any(matches(s, c, p) for p in patterns)] for s, cells in zip(studies, grids)]
        used = [[(s, c) for s, c in pairs if any(matches(s, c, p) for p in patterns)] for pairs in used]
    data = io.data_root(data_root)
    if data is not None and not data.is_dir():
        given = "--data" if data_root else "ANOMALIB_STUDY_DATA"
        raise StudyError(f"{given} {data} is not a folder: pass the real data folder (e.g. ../shared/data)")
    for study, cells in zip(studies, grids):  # everything a kernel would find wrong, found before one starts
        check_cells(study, cells, data.resolve() if data else None)
    reports = io.check_output_folder(Path(reports_dir), "--reports").resolve()  # absolute: kernels run elsewhere
    results: list[CellResult] = []
    skipped: dict[tuple[str, str], str] = {}  # (notebook stem, cell) -> why, listed on the front page
    sources: str | None = None

    # one run at a time writes a reports folder (its lock file lies beside it: nothing is written into the
    # folder before a cell runs); a second run is refused, told who holds it
    with io.folder_lock(reports_lock(reports), f"the reports folder {reports}", wait=False):
        client = connect_cluster(scheduler) if scheduler is not None else None
        try:
            pinned = threads is not None
            if client is not None:
                threads = cluster_kernel_threads(client)
            elif threads is None:
                threads = max(1, (os.cpu_count() or 1) // jobs)
            # parts in order: a later part may read the earlier reports
            for study, cells, uses in zip(studies, grids, used):
                if not cells and not uses:
                    continue
                kernel = choose_kernel(kernel_name, study.notebook)
                total = len(cells) + len(uses)

                def runner_for(owner: Study, kernel: str = kernel, total: int = total) -> _Runner:
                    return _Runner(
                        owner,
                        reports / owner.notebook.stem,
                        kernel,
                        data.resolve() if data else None,
                        force,
                        log,
                        total,
                        kernel_env(threads, pinned=pinned),
                        on_cluster=client is not None,
                    )

                runner = runner_for(study)
                where = f"Dask scheduler {scheduler}" if client is not None else f"jobs {jobs}"
                listed = f" (+ {len(uses)} used, defined by other studies)" if uses else ""
                log(
                    f"study {study.path}: {len(cells)} cell(s){listed} of {study.notebook.name}, kernel {kernel}, "
                    f"{where}"
                )
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
                owners: dict[Path, _Runner] = {}  # the used cells: reported, never run here
                for index, (owner, cell) in enumerate(uses, len(cells) + 1):
                    if owner.path not in owners:
                        owners[owner.path] = runner_for(owner)
                    result = owners[owner.path].referenced(index, cell, study.path)
                    result.notebook = owner.notebook.stem
                    part.append(result)
                results += part
                skipped.update({(r.notebook, r.name): r.message for r in part if r.status == "skipped"})
                sources = runner.sources_hash
        finally:
            if client is not None:
                client.close()

        index = write_index(reports, skipped=skipped, sources_hash=sources)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "unchanged", "failed", "skipped")}
    log(f"study {study_file}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"; index {index}")
    return results


def refuse_duplicates(study_file: str | os.PathLike, studies: Sequence[Study]) -> None:
    """Refuse to run a study file one of whose cells is the same computation as a cell of
    another study file in its folder, or writes the same report with other parameters
    (:func:`anomalib_study.study_duplicates.duplicate_cells`; files there that cannot be read are passed
    over): StudyError naming both cells and the fix, before anything runs."""
    path = Path(study_file)
    files = sorted({path, *path.parent.glob("*.yaml")})  # in name order, whichever of them runs
    involving = [path, *(study.path for study in studies)]
    problems = duplicate_cells(files, involving=involving, skip_unreadable=True)
    if not problems:
        return
    if len(problems) == 1:
        raise StudyError(f"study {path} cannot run (nothing was run or written): {problems[0]}")
    shown = "\n".join(f"  - {problem}" for problem in problems)
    raise StudyError(
        f"study {path} cannot run ({len(problems)} cells break one cell per distinct computation; nothing was "
        f"run or written):\n{shown}"
    )


def reports_lock(reports: Path) -> Path:
    """The lock file a run holds while it writes ``reports`` (beside it, hidden, ignored by git)."""
    return reports.parent / f".{reports.name}.run.lock"


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
