"""The study runner on a real Dask cluster: a LocalCluster of two worker processes on loopback.

A tiny notebook written here reads the synthetic set and its parameters and writes
deterministic metrics; the grid run through the cluster must give the reports of a local
``jobs=1`` run, and a worker killed in the middle of a cell must lead to that cell being run
again elsewhere and written exactly once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
import types
from pathlib import Path

import nbformat
import pytest
import yaml

from anomalib_study import dask_cluster, runner
from anomalib_study.cli import main
from anomalib_study.errors import ParameterError, StudyError

distributed = pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # a cluster start and a few kernels: ~1 minute on 2 cores

PARAMETERS = """dataset = "dagm"      # layout
root = ""             # data folder
backbone = "tiny"     # backbone
x = 0.0               # shifts the metric
side = False          # also write a side file beside metrics_out
hold = ""             # marker file: the first run that finds it missing writes its pids there, then waits
metrics_out = ""      # metrics JSON
report_name = ""      # report title
"""
BODY = """import json, os, time
from pathlib import Path
images = sorted(Path(root).rglob("*.PNG")) if Path(root).is_dir() else []
print("IMAGES", len(images), report_name, os.path.basename(os.getcwd()))
if hold and not os.path.exists(hold):
    Path(hold + ".tmp").write_text(f"{os.getppid()} {os.getpid()}")
    os.replace(hold + ".tmp", hold)
    time.sleep(120)
with open(metrics_out, "w") as handle:
    json.dump({"image_auroc": 0.5 + x, "n_images": len(images), "image_bytes": sum(p.stat().st_size for p in images),
               "backbone": backbone, "threads": os.environ.get("OMP_NUM_THREADS"), "parent_pid": os.getppid()}, handle)
if side:
    with open(metrics_out.replace(".metrics.json", ".scores.csv"), "w") as handle:
        handle.write("path,score\\n" + "".join(f"{p.name},{i}\\n" for i, p in enumerate(images[:3])))
"""
VARYING_RUN = ("duration_s", "started_at", "host", "files")  # differ between two runs of the same cell (files:
# the sha256 of the executed notebook and page, which hold cell ids and temporary paths)
VARYING_METRICS = ("threads", "parent_pid")  # the executing process, not the result


def _write_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny cluster notebook"), params, nbformat.v4.new_code_cell(BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _write_study(path: Path, datasets: dict) -> Path:
    study = {
        "notebook": "notebooks/tiny.ipynb",
        "title": "Tiny cluster study",
        "headline": ["image_auroc"],
        "parameters": {"x": 0.1},
        "backbones": ["tiny"],
        "datasets": datasets,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes (one thread each) under nannies, on loopback."""
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
    ) as local:
        yield local


@pytest.fixture
def project(tmp_path, monkeypatch):
    _write_notebook(tmp_path / "notebooks" / "tiny.ipynb")
    # other engineers edit the package while tests run: keep the sources part of the hash fixed
    monkeypatch.setattr(runner, "package_sources_hash", lambda: "fixed")
    monkeypatch.delenv("ANOMALIB_STUDY_DATA", raising=False)
    return tmp_path


def _comparable(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    for key in VARYING_METRICS:
        metrics.pop(key)
    for key in VARYING_RUN:
        metrics["_run"].pop(key)
    return metrics


def _html(path: Path) -> str:
    """The report without its cell ids (papermill gives its injected cell a new one each run)."""
    return re.sub(r'id="cell-id=[^"]*"', "", path.read_text())


def _outputs(path: Path) -> list:
    """Every code cell's source and outputs, but papermill's injected parameters (its metrics_out is a
    temporary path)."""
    cells = nbformat.read(path, as_version=4).cells
    return [(c.source, c.get("outputs")) for c in cells if "injected-parameters" not in c.metadata.get("tags", [])]


@pytest.mark.slow
def test_grid_on_the_cluster_equals_a_local_run(project, cluster, capsys):
    study = _write_study(
        project / "studies" / "tiny.yaml",
        {
            "synth": {"dataset": "dagm", "root": "{synthetic}", "side": True},
            "plain": {"dataset": "dagm", "root": "/nowhere/plain", "x": 0.3},
        },
    )
    synthetic = runner.synthetic_path()
    assert not synthetic.exists()  # the client only names it: a worker generates it

    assert (
        main(["run", str(study), "--reports", str(project / "on_cluster"), "--scheduler", cluster.scheduler_address])
        == 0
    )
    log = capsys.readouterr().out
    assert (
        f"Dask scheduler {cluster.scheduler_address}" in log and log.count(f"sent to {cluster.scheduler_address}") == 2
    )
    assert (synthetic / "synthetic.json").is_file()
    stamp = json.loads((synthetic / "synthetic.json").read_text())["params"]

    lines = []
    local = runner.run_study(study, reports_dir=project / "local", jobs=1, log=lines.append)
    assert [r.status for r in local] == ["ok"] * 2

    cells = ["synth-tiny", "plain-tiny"]
    on_cluster, here = project / "on_cluster" / "tiny", project / "local" / "tiny"
    files = sorted(p.name for p in here.iterdir())
    assert files == sorted(
        [f"{c}.{ext}" for c in cells for ext in ("html", "ipynb", "metrics.json")] + ["synth-tiny.scores.csv"]
    )
    assert sorted(p.name for p in on_cluster.iterdir()) == files  # no staging leftovers, no failed cell
    for cell in cells:
        assert _comparable(on_cluster / f"{cell}.metrics.json") == _comparable(here / f"{cell}.metrics.json")
        assert _html(on_cluster / f"{cell}.html") == _html(here / f"{cell}.html")
        assert _outputs(on_cluster / f"{cell}.ipynb") == _outputs(here / f"{cell}.ipynb")
    scores = (on_cluster / "synth-tiny.scores.csv").read_text()
    assert scores == (here / "synth-tiny.scores.csv").read_text() and len(scores.splitlines()) == 4

    metrics = json.loads((on_cluster / "synth-tiny.metrics.json").read_text())
    n_images = stamp["n_classes"] * (stamp["n_train"] + stamp["n_test_normal"] + stamp["n_test_defect"])
    assert metrics["n_images"] == n_images and metrics["image_auroc"] == pytest.approx(0.6)
    assert metrics["synthetic"] is True and metrics["_run"]["parameters"]["root"] == str(synthetic)
    assert metrics["_run"]["host"] and metrics["parent_pid"] != os.getpid()  # ran in a worker, not here
    assert json.loads((here / "synth-tiny.metrics.json").read_text())["parent_pid"] == os.getpid()
    assert (
        "IMAGES" in (on_cluster / "synth-tiny.html").read_text()
        and "notebooks" in (on_cluster / "synth-tiny.html").read_text()
    )
    # the host's cores shared by its 2 workers of 1 thread each (a client's own setting wins)
    assert metrics["threads"] == (os.environ.get("OMP_NUM_THREADS") or str(max(1, os.cpu_count() // 2)))
    assert json.loads((here / "synth-tiny.metrics.json").read_text())["threads"] == (
        os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    )
    index = (project / "on_cluster" / "index.html").read_text()
    assert all(f"tiny/{cell}.html" in index for cell in cells)

    # unchanged cells are not sent again
    again = runner.run_study(
        study, reports_dir=project / "on_cluster", scheduler=cluster.scheduler_address, log=lines.append
    )
    assert [r.status for r in again] == ["unchanged"] * 2


@pytest.mark.slow
def test_the_grid_benchmark_quick_run_writes_its_report(cluster, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_dask_grid", REPO / "benchmarks" / "bench_dask_grid.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dask_grid.json"
    assert bench.main(["--quick", "--scheduler", cluster.scheduler_address, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["settings"]["cells"] == 1
    assert report["jobs_1"]["wall_s"] > 0 and report["cluster"]["wall_s"] > 0
    assert report["speedup_jobs_1_over_cluster"] == pytest.approx(
        report["jobs_1"]["wall_s"] / report["cluster"]["wall_s"], abs=1e-3
    )
    assert set(report["cluster"]["cell_durations_s"]) == {"synthetic_dagm-k5"}
    assert report["headline_metrics"]["cluster"]["synthetic_dagm-k5"]["image_auroc"] == pytest.approx(1 / 6)
    assert report["headline_max_abs_difference"] == 0


@pytest.mark.slow
def test_a_worker_killed_mid_cell_is_retried_and_written_once(project, cluster):
    marker = project / "held"
    study = _write_study(
        project / "studies" / "tiny.yaml", {"plain": {"dataset": "dagm", "root": "/nowhere/plain", "hold": str(marker)}}
    )
    lines, outcome = [], {}

    def run():
        try:
            outcome["results"] = runner.run_study(
                study, reports_dir=project / "reports", scheduler=cluster.scheduler_address, log=lines.append
            )
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), f"the cell never started: {lines}"
    worker_pid, kernel_pid = map(int, marker.read_text().split())
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        assert worker_pid in client.run(os.getpid).values()  # the kernel's parent is a worker process
    os.kill(worker_pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive(), f"the study did not finish: {lines}"
    if "error" in outcome:
        raise outcome["error"]

    (result,) = outcome["results"]
    assert result.status == "ok" and result.metrics["image_auroc"] == pytest.approx(0.6)
    assert result.metrics["parent_pid"] not in (worker_pid, os.getpid())  # run again by another worker
    out = project / "reports" / "tiny"
    assert sorted(p.name for p in out.iterdir()) == ["plain-tiny.html", "plain-tiny.ipynb", "plain-tiny.metrics.json"]
    assert sum("plain-tiny: ok in" in line for line in lines) == 1 and not any("FAILED" in line for line in lines)
    metrics = json.loads((out / "plain-tiny.metrics.json").read_text())
    assert metrics["_run"]["status"] == "ok" and metrics["image_auroc"] == pytest.approx(0.6)
    # the killed worker's kernel does not outlive it (ipykernel polls its parent)
    deadline = time.monotonic() + 20
    while _alive(kernel_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive(kernel_pid)
    if alive:
        os.kill(kernel_pid, signal.SIGKILL)
    assert not alive, "the orphaned kernel kept running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------- without a cluster


def test_a_path_the_host_does_not_see_fails_the_cell_naming_it_and_the_host(tmp_path):
    missing = tmp_path / "data" / "mvtec_ad"
    task = runner.CellTask(
        name="d-b",
        notebook=str(_write_notebook(tmp_path / "tiny.ipynb")),
        notebook_bytes=b"{}",
        parameters={"root": str(missing)},
        kernel="python3",
        cwd=str(tmp_path),
        needs=(("parameter root", str(missing)),),
    )
    output = runner.execute_cell(task)
    assert output.error[0] == "MissingPath" and output.notebook is None and output.metrics is None
    assert str(missing) in output.error[1] and output.host in output.error[1] and "parameter root" in output.error[1]


def test_a_cell_whose_workers_keep_dying_fails_with_the_reason(tmp_path):
    task = runner.CellTask(name="d-b", notebook="n.ipynb", notebook_bytes=b"{}", parameters={}, kernel="k", cwd="/")
    last_worker = types.SimpleNamespace(address="tcp://127.0.0.1:1")
    output = runner._lost(task, distributed.scheduler.KilledWorker("d-b", last_worker, 3))
    assert output.error[0] == "KilledWorker" and output.notebook is None
    assert "allowed-failures" in output.error[1] and "tcp://127.0.0.1:1" in output.error[1]
    output = runner._lost(task, ModuleNotFoundError("No module named 'anomalib_study'"))
    assert "install anomalib_study on every worker" in output.error[1]


def test_scheduler_and_jobs_are_exclusive_and_missing_distributed_is_explained(project, monkeypatch, capsys):
    study = _write_study(project / "studies" / "tiny.yaml", {"plain": {"dataset": "dagm"}})
    with pytest.raises(ParameterError, match="exclusive"):
        runner.run_study(study, jobs=2, scheduler="tcp://127.0.0.1:8786", log=lambda line: None)
    assert main(["run", str(study), "--jobs", "2", "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    assert "--jobs 2 and --scheduler are exclusive" in capsys.readouterr().err
    with pytest.raises(ParameterError, match="scheduler address"):
        runner.run_study(study, scheduler=" ", log=lambda line: None)
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(StudyError, match=r"pip install 'anomalib-study\[cluster\]'"):
        runner.run_study(
            study, reports_dir=project / "reports", scheduler="tcp://127.0.0.1:8786", log=lambda line: None
        )


def test_an_unreachable_scheduler_is_one_clear_error(project, monkeypatch):
    study = _write_study(project / "studies" / "tiny.yaml", {"plain": {"dataset": "dagm"}})
    monkeypatch.setattr(dask_cluster, "CONNECT_TIMEOUT_S", 1)  # looked up by connect_cluster there
    with pytest.raises(StudyError, match=r"cannot reach the Dask scheduler at 'tcp://127\.0\.0\.1:1'.*dask scheduler"):
        runner.run_study(study, reports_dir=project / "reports", scheduler="tcp://127.0.0.1:1", log=lambda line: None)
    assert not (project / "reports").exists()  # nothing ran, nothing written
