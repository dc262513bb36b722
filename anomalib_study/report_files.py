"""The report of one executed cell: its files under ``reports/<notebook stem>/``, written by the client.

Per cell: ``<cell>.ipynb`` (executed), ``<cell>.html`` (nbconvert, code inputs hidden, cells
tagged ``remove`` dropped) and ``<cell>.metrics.json`` (the notebook's metrics + ``_run``, see
:mod:`anomalib_study.runner`), plus the side files the notebook wrote. Every file is written
to a temporary name and moved into place, the metrics last, so a crash never leaves a
half-written report. A cell whose notebook raised keeps its last good report and gets
``<cell>.failed.html`` / ``.failed.ipynb`` / ``.failed.json`` instead; these are removed by
its next successful run.
"""

from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from anomalib_study import io, provenance
from anomalib_study.execution import CellOutput, render_html
from anomalib_study.studies import Cell, Study

REPORT_SIZE_WARNING = 1_500_000  # bytes; reports embed their images, notebooks keep them small


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
        defined_by: for a cell the study only uses (``uses``), the study file that defines and
            runs it (never run by the study that uses it); "" for the study's own cells.
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
    defined_by: str = ""


class ReportWriter:
    """Writes the reports of one study's executed cells into ``out_dir`` (``reports/<notebook stem>/``).

    ``notebook_bytes``: the notebook the cells ran (its sha256 is recorded); ``on_cluster``:
    the cells ran on Dask workers, whose host the log names."""

    def __init__(
        self,
        study: Study,
        out_dir: Path,
        kernel: str,
        notebook_bytes: bytes,
        log: Callable[[str], None],
        on_cluster: bool = False,
    ):
        self.study, self.out_dir, self.kernel, self.notebook_bytes = study, out_dir, kernel, notebook_bytes
        self.log, self.on_cluster = log, on_cluster

    def paths(self, name: str) -> dict[str, Path]:
        """The report files of the cell ``name``, by kind."""
        base = self.out_dir / name
        return {
            "ipynb": base.with_name(f"{name}.ipynb"),
            "html": base.with_name(f"{name}.html"),
            "metrics": base.with_name(f"{name}.metrics.json"),
            "failed_ipynb": base.with_name(f"{name}.failed.ipynb"),
            "failed_html": base.with_name(f"{name}.failed.html"),
            "failed_json": base.with_name(f"{name}.failed.json"),
        }

    def write(self, cell: Cell, parameters: dict[str, Any], digest: str, tag: str, output: CellOutput) -> CellResult:
        """Render and write the report of an executed cell (every file atomically, the metrics
        last); a failed cell keeps its last good report and gets ``<cell>.failed.*``.

        ``parameters``: the cell's resolved parameters; ``digest``: its inputs hash; ``tag``:
        how the log names it."""
        import nbformat

        paths = self.paths(cell.name)
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
            "inputs_hash": digest,
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
        if output.kernel_env.get("OMP_NUM_THREADS"):  # what the kernel was given, not this process's variable
            run["provenance"]["threads"]["OMP_NUM_THREADS"] = output.kernel_env["OMP_NUM_THREADS"]
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
        side_files = {
            name: data  # the notebook's side files (tables, ...)
            for name, data in sorted(output.side_files.items())
            if Path(name).name == name and name.startswith(f"{cell.name}.")
        }
        html = page.encode("utf-8")
        # the sha256 of every other file of the report: a report is replaced as one unit, and one whose
        # files do not all match its metrics (a run killed, or a disk full, between the renames) is rerun
        run["files"] = {
            paths["ipynb"].name: io.sha256_bytes(output.notebook),
            paths["html"].name: io.sha256_bytes(html),
            **{name: io.sha256_bytes(data) for name, data in side_files.items()},
        }
        metrics["_run"] = run
        with io.atomic_write(paths["ipynb"]) as handle:
            handle.write(output.notebook)
        for name, data in side_files.items():
            with io.atomic_write(self.out_dir / name) as handle:
                handle.write(data)
        with io.atomic_write(paths["html"]) as handle:
            handle.write(html)
        io.write_json(paths["metrics"], metrics)  # last: a complete report is one with matching metrics
        _unlink(paths["failed_ipynb"], paths["failed_html"], paths["failed_json"])
        size = paths["html"].stat().st_size
        if size > REPORT_SIZE_WARNING:
            self.log(
                f"{tag}: warning: {paths['html']} is {size / 1e6:.1f} MB; keep the notebook's images "
                "small (JPEG thumbnails)"
            )
        metrics.pop("_run")
        self.log(f"{tag}: ok in {duration:.1f} s{where} {headline_text(metrics, self.study.headline)}".rstrip())
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


def _unlink(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def headline_text(metrics: Mapping[str, Any], headline: Sequence[str]) -> str:
    """The headline metrics as the log shows them, e.g. ``image_auroc=0.912 accuracy=0.875``."""
    from anomalib_study.frontpage import format_value

    return " ".join(f"{key}={format_value(metrics.get(key))}" for key in headline)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _error_page(title: str, ename: str, evalue: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>FAILED {html.escape(title)}</title></head>"
        f"<body><h1>FAILED {html.escape(title)}</h1><pre>{html.escape(ename)}: {html.escape(evalue)}</pre>"
        "</body></html>\n"
    )


def report_files_match(folder: Path, run: dict) -> bool:
    """Whether every file a report's ``_run["files"]`` records is there with those bytes
    (True for a report from before the record: its metrics and HTML are all that is known)."""
    recorded = run.get("files")
    if not isinstance(recorded, dict):
        return True
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file() or io.sha256_file(path) != digest:
            return False
    return True
