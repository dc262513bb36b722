"""The layout of a report's ``metrics.json``, versioned, and the one migration from the
unversioned layout.

``evaluate`` (and the comparison's summary) writes ``"schema": SCHEMA_VERSION`` first in
every metrics file; the runner adds ``_run``. :data:`METRICS_SCHEMA` (JSON Schema, checked
with ``jsonschema``) says what every version-2 file holds: the method and its task; for a
detection or clustering report the data set, the image counts, the timings and the
environment, and its headline figures (detection: ``image_auroc`` and ``per_image``;
clustering: ``modes``); for the comparison, ``n_reports``. :func:`problems` lists what a file lacks,
naming the key.

Version 1 is the layout before the version was recorded. :func:`migrate` turns a version 1
file into version 2 without changing any number: it adds ``schema``, ``task`` (read from
the layout: a file with ``modes`` is a clustering report), ``n_bank`` where the model's bank
size is recorded under another key (PatchCore's ``memory_bank_size``; kNN's bank is its
``n_train`` normal images), and ``_run.provenance`` from the ``environment`` block that
``evaluate`` recorded in the kernel (marked ``"from": "environment"``; what it did not
record stays None). ``scripts/migrate_metrics.py`` migrated the committed reports once; the
readers (:mod:`anomalib_study.comparison`, :mod:`anomalib_study.verify`) read version 2
only and name the migration for an older file.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

__all__ = ["SCHEMA_VERSION", "METRICS_SCHEMA", "version", "problems", "migrate"]

#: the layout ``evaluate`` writes now
SCHEMA_VERSION = 2

_NUMBER_OR_NULL = {"type": ["number", "null"]}

#: JSON Schema (draft 2020-12) of a version-2 metrics file
METRICS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["schema", "method", "task"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "method": {"type": "string", "minLength": 1},
        "task": {"enum": ["detection", "clustering", "comparison"]},
        "_run": {"type": "object"},
    },
    "allOf": [
        {
            "if": {"properties": {"task": {"enum": ["detection", "clustering"]}}},
            "then": {
                "required": ["dataset", "n_train", "n_test", "timings", "environment"],
                "properties": {
                    "dataset": {"type": "object", "required": ["name"]},
                    "n_train": {"type": "integer", "minimum": 0},
                    "n_test": {"type": "integer", "minimum": 0},
                    "timings": {"type": "object"},
                    "environment": {"type": "object"},
                },
            },
        },
        {
            "if": {"properties": {"task": {"const": "detection"}}},
            "then": {
                "required": ["image_auroc", "per_image"],
                "properties": {"image_auroc": _NUMBER_OR_NULL, "per_image": {"type": "array"}},
            },
        },
        {
            "if": {"properties": {"task": {"const": "clustering"}}},
            "then": {"required": ["modes"], "properties": {"modes": {"type": "object"}}},
        },
        {
            "if": {"properties": {"task": {"const": "comparison"}}},
            "then": {"required": ["n_reports"], "properties": {"n_reports": {"type": "integer", "minimum": 0}}},
        },
    ],
}

MIGRATE_COMMAND = "python scripts/migrate_metrics.py <reports folder>"


def version(metrics: Mapping[str, Any]) -> int:
    """The layout version of a metrics dict (1: written before the version was recorded)."""
    value = metrics.get("schema", 1)
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def problems(metrics: Any) -> list[str]:
    """What keeps ``metrics`` from being a version-2 metrics file, one line per problem
    naming the key (empty when it is one). A version-1 file gets one line naming the
    migration. A file with neither ``schema`` nor ``method`` is a notebook's own metrics
    (a study of a notebook that is not one of the study's methods), not checked: []."""
    from jsonschema import Draft202012Validator

    if not isinstance(metrics, Mapping):
        return [f"not a JSON object but {type(metrics).__name__}"]
    if "schema" not in metrics and "method" not in metrics:
        return []  # a notebook's own metrics (no method of the study): not this layout, not checked
    if version(metrics) < SCHEMA_VERSION:
        return [f"metrics layout version {version(metrics)} (this code reads {SCHEMA_VERSION}): run {MIGRATE_COMMAND}"]
    if version(metrics) > SCHEMA_VERSION:
        return [f"metrics layout version {version(metrics)} is newer than this code's {SCHEMA_VERSION}: update it"]
    found = []
    for error in sorted(Draft202012Validator(METRICS_SCHEMA).iter_errors(dict(metrics)), key=lambda e: list(e.path)):
        where = ".".join(str(part) for part in error.path) or "(top level)"
        found.append(f"{where}: {error.message}")
    return found


def migrate(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(version-2 metrics, what changed)`` of a version-1 metrics dict; a version-2 one
    comes back as it is, with no change. No number is changed, only keys added."""
    data = copy.deepcopy(dict(metrics))
    if version(data) >= SCHEMA_VERSION:
        return data, []
    changes = [f"schema: {SCHEMA_VERSION}"]
    added: dict[str, Any] = {"schema": SCHEMA_VERSION}
    if "task" not in data:
        added["task"] = (
            "comparison"
            if data.get("method") == "comparison"
            else "clustering"
            if isinstance(data.get("modes"), Mapping)
            else "detection"
        )
        changes.append(f"task: {added['task']} (from the layout)")
    if "n_bank" not in data and added.get("task", data.get("task")) == "detection":
        if isinstance(data.get("memory_bank_size"), int):
            data["n_bank"] = data["memory_bank_size"]
            changes.append("n_bank: memory_bank_size")
        elif data.get("method") == "knn" and isinstance(data.get("n_train"), int):
            data["n_bank"] = data["n_train"]
            changes.append("n_bank: n_train (a kNN bank holds every normal image)")
    run = data.get("_run")
    if isinstance(run, dict) and not isinstance(run.get("provenance"), Mapping):
        environment = data.get("environment") if isinstance(data.get("environment"), Mapping) else {}
        threads = environment.get("threads") if isinstance(environment.get("threads"), Mapping) else {}
        run["provenance"] = {
            "package_version": environment.get("anomalib_study"),
            "git_commit": environment.get("git_commit"),
            "git_dirty": environment.get("git_dirty"),
            "cpu_model": environment.get("cpu_model"),
            "logical_cores": environment.get("cpu_count"),
            "threads": {"OMP_NUM_THREADS": None, "torch": threads.get("torch")},
            "gpu": environment.get("gpu"),
            "python": environment.get("python"),
            "torch": environment.get("torch"),
            "platform": None,
            "from": "environment",
        }
        changes.append("_run.provenance: from environment")
    return {**added, **data}, changes
