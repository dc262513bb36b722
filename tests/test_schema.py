"""The metrics layout is versioned: the schema names what a file lacks, the migration from the
unversioned layout adds keys and changes no value, and every committed report is at the
current layout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from anomalib_study import schema
from conftest import REPO


def _detection(**extra):
    return {
        "schema": schema.SCHEMA_VERSION,
        "method": "knn",
        "task": "detection",
        "dataset": {"name": "dagm"},
        "n_train": 10,
        "n_test": 4,
        "timings": {},
        "environment": {},
        "image_auroc": 0.9,
        "per_image": [],
        **extra,
    }


def test_a_complete_file_has_no_problem_and_a_missing_key_is_named():
    assert schema.problems(_detection()) == []
    missing = _detection()
    del missing["per_image"]
    assert schema.problems(missing) == ["(top level): 'per_image' is a required property"]
    wrong = _detection(n_test=-1, task="detection")
    assert any(line.startswith("n_test:") for line in schema.problems(wrong))
    clustering = {**_detection(task="clustering"), "modes": {}}
    assert schema.problems(clustering) == []
    assert schema.problems({"schema": 2, "method": "comparison", "task": "comparison", "n_reports": 3}) == []
    assert schema.problems([1, 2]) == ["not a JSON object but list"]


def test_an_old_file_names_the_migration_and_a_newer_one_the_update():
    old = {k: v for k, v in _detection().items() if k != "schema"}
    assert schema.version(old) == 1
    assert "scripts/migrate_metrics.py" in schema.problems(old)[0]
    assert "newer than this code" in schema.problems(_detection(schema=9))[0]


def test_the_migration_adds_keys_and_changes_no_value():
    old = {
        "method": "patchcore",
        "dataset": {"name": "mvtec_ad"},
        "n_train": 20,
        "n_test": 8,
        "timings": {"fit_s": 1.5},
        "environment": {"anomalib_study": "0.1.0", "cpu_model": "CPU A", "cpu_count": 2, "threads": {"torch": 2}},
        "image_auroc": 0.75,
        "per_image": [{"score": 1.25}],
        "memory_bank_size": 123,
        "_run": {"status": "ok"},
    }
    new, changes = schema.migrate(old)
    assert list(new)[:2] == ["schema", "task"] and new["task"] == "detection" and new["n_bank"] == 123
    assert new["_run"]["provenance"]["cpu_model"] == "CPU A" and new["_run"]["provenance"]["from"] == "environment"
    assert new["_run"]["provenance"]["logical_cores"] == 2 and new["_run"]["provenance"]["threads"]["torch"] == 2
    for key, value in old.items():  # every old value is still there, unchanged
        if key != "_run":
            assert new[key] == value
    assert new["_run"]["status"] == "ok" and "status" in old["_run"] and "provenance" not in old["_run"]
    assert schema.problems(new) == [] and changes[0] == "schema: 2"
    assert schema.migrate(new) == (new, [])  # a current file is left as it is
    knn, _ = schema.migrate({"method": "knn", "n_train": 7})
    assert knn["n_bank"] == 7
    clustering, _ = schema.migrate({"method": "clustering", "modes": {}})
    assert clustering["task"] == "clustering" and "n_bank" not in clustering


def test_every_committed_report_is_at_the_current_layout():
    found = sorted(p for p in (REPO / "reports").glob("*/*.metrics.json") if not p.name.startswith("."))
    assert found
    bad = {str(p.relative_to(REPO)): schema.problems(json.loads(p.read_text())) for p in found}
    assert not {k: v for k, v in bad.items() if v}


@pytest.mark.slow
def test_the_migration_script_leaves_a_current_folder_as_it_is(tmp_path):
    folder = tmp_path / "reports" / "01_knn_detection"
    folder.mkdir(parents=True)
    old = {k: v for k, v in _detection().items() if k != "schema"}
    (folder / "a.metrics.json").write_text(json.dumps(old))
    script = REPO / "scripts" / "migrate_metrics.py"
    check = subprocess.run([sys.executable, script, tmp_path / "reports", "--check"], capture_output=True, text=True)
    assert check.returncode == 0 and "would migrate 1 of 1" in check.stdout
    assert json.loads((folder / "a.metrics.json").read_text()) == old  # --check writes nothing
    done = subprocess.run([sys.executable, script, tmp_path / "reports"], capture_output=True, text=True)
    assert done.returncode == 0 and "migrated 1 of 1" in done.stdout
    assert json.loads((folder / "a.metrics.json").read_text())["schema"] == schema.SCHEMA_VERSION
    again = subprocess.run([sys.executable, script, tmp_path / "reports"], capture_output=True, text=True)
    assert "migrated 0 of 1" in again.stdout


def test_the_front_page_names_an_old_layout_and_never_calls_it_current(tmp_path):
    from anomalib_study import comparison, io

    folder = tmp_path / "reports" / "01_knn_detection"
    old = {"method": "knn", "dataset": {"name": "dagm"}, "image_auroc": 0.8, "_run": {"status": "ok"}}
    io.write_json(folder / "a.metrics.json", old)
    (folder / "a.html").write_text("<html></html>")
    row = comparison.collect_reports(tmp_path / "reports").iloc[0]
    assert row["freshness"] == "unknown" and "scripts/migrate_metrics.py" in row["note"]
    assert row["image_auroc"] == 0.8  # read as far as it goes
    assert comparison.published_table(comparison.collect_reports(tmp_path / "reports")).empty
