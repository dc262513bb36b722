"""How ``anomalib-study verify`` compares a committed report's metrics with its re-run's:
the numbers apart from the bookkeeping.

Both metrics dicts are walked side by side (nested dicts and lists; keys read
``classification_report.normal.precision`` or ``per_image[3].score``). Keys are left out
when any part of their path matches one of :data:`UNCOMPARED` (``fnmatch`` patterns): who,
where and when (``_run``, ``environment``, ``provenance``, ``weights_sha256``: reported as
provenance differences instead, :func:`provenance_differences`), timings (``*_s``,
``*seconds*``, ``*minutes*``, ``*per_s``, ``*timings*``, and ``training``, the training time
in the published comparison tables) and memory (``peak_memory*``, ``peak_rss*``, ``*_mb``).
Every other difference is one of three kinds (:attr:`Drift.kind`):

* ``"number"``, a **drift**: two numbers further apart than their tolerance; a number or a
  bool against another value (None, a string, another bool); a list that holds numbers (a
  table: ``per_image``, ``history``, ``train_scores``) of another length (key
  ``len(per_image)``); a label, category or class string inside such a table
  (``per_image[3].defect_type``, a cluster's ``matching``, ``confusion.classes``:
  :data:`LABEL_KEYS`), or a numbered row missing. Only drifts make a report "drifted".
* ``"schema"``: a key only one side has (``n_bank`` that newer code writes, a key that
  older code wrote): listed, not a drift.
* ``"wording"``: text that differs (a reworded ``threshold_rule``, a dataset note, a list
  of warnings of another length): listed, not a drift.

Paths are compared relative to their root, in every string, free text included: the data
folder (``--data`` / ``$ANOMALIB_STUDY_DATA``), the feature cache
(:func:`anomalib_study.io.cache_root`), the reports folder, the Python environment
(``site-packages``, ``sys.prefix``) and the home folder, each written ``<data>``,
``<cache>``, ``<reports>``, ``<site-packages>``, ``<prefix>``, ``<home>``
(:func:`machine_roots`, :func:`normaliser`). The committed report's roots are read off the
paths both reports hold (:func:`infer_roots`: ``/work/shared/data/mvtec_ad`` against the
re-run's ``/other/data/mvtec_ad`` under data root ``/other/data`` says the committed data
root was ``/work/shared/data``), else taken to be this machine's; any ``.../site-packages``
or ``/home/<user>``, ``/Users/<user>``, ``/root`` is recognised wherever it lies.

Numbers are exact up to float rounding (:data:`EXACT`: relative 1e-9) except the families
a method declares in its registry entry (:attr:`anomalib_study.methods.MethodEntry.tolerances`),
where training on another CPU cannot be bit-exact. :func:`tolerance_table` lists them all,
one row per family with its reason; today the autoencoder's (training is gradient descent,
and a float sum's order differs between CPUs, so its trajectory drifts slightly):

* ``history.train_loss``, ``history.val_loss``: absolute 1e-3 (seen: 1e-4 to 7e-4);
* its reconstruction-based scores ``per_image.score``, ``per_image.score_*``,
  ``per_image.map_max``, ``train_scores``, ``threshold``, ``image_f1_threshold``,
  ``pixel_f1_threshold``: relative 5e-2.

Every figure computed from the scores (AUROC, PRO, F1, accuracy, predicted labels), the
epoch counts and the learning rates stay exact. ``--tolerance`` (absolute) widens every
number's tolerance on top.

A report made on another CPU than the re-run (both name it: ``environment.cpu_model``)
holds every number outside a method's declared families to :data:`OTHER_CPU` (relative
1e-4) instead: float32 kernels sum in another order there (an AVX-512 Xeon against an EPYC
moved kNN distances by 1e-7 and PatchCore thresholds by about 1e-5, AUROC equal). Labels,
counts and text stay exact; the numbers that differ are named as tolerated.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from anomalib_study import io
from anomalib_study.errors import ParameterError
from anomalib_study.methods import REGISTRY, Tolerance, family_key

__all__ = [
    "EXACT",
    "LABEL_KEYS",
    "MISSING",
    "UNCOMPARED",
    "Comparison",
    "Drift",
    "check_tolerance",
    "compare",
    "compare_metrics",
    "family_key",
    "flatten",
    "infer_roots",
    "machine_roots",
    "other_cpu",
    "OTHER_CPU",
    "normaliser",
    "provenance_differences",
    "tolerance_table",
    "tolerances_for",
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
    "patch_cache",  # whether the patch features were read from the cache or extracted: the same features
    "feature_cache",  # the same for the embeddings (kNN)
)

#: fnmatch patterns on a key's last name: a string there, inside a table (a list, or a dict
#: keyed by numbers), is a value, compared as a number is (a flipped label is a drift)
LABEL_KEYS = (
    "label",
    "labels",
    "*_label",
    "predicted",
    "predicted_*",
    "defect_type",
    "class",
    "classes",
    "*_class",
    "category",
    "cluster",
    "clusters",
    "cluster_*",
    "matching",
)

#: every number not of a declared family: exact up to float rounding
EXACT = Tolerance(
    ("*",),
    relative=1e-9,
    reason="no training whose rounding accumulates: exact up to float rounding (the last digits of a float)",
)


#: every number not of a declared family, when the report was made on another CPU than the re-run's
OTHER_CPU = Tolerance(
    ("*",),
    relative=1e-4,
    reason=(
        "made on another CPU: its float32 kernels (convolutions, matrix products) sum in another order, so "
        "features and what is computed from them differ in the last digits (seen: 1e-7 relative for kNN "
        "distances, 1e-5 for PatchCore thresholds); labels, counts and text stay exact"
    ),
)


def other_cpu(committed: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(committed CPU, re-run CPU)`` when both reports name their CPU (``environment.cpu_model``)
    and the names differ, else None."""
    names = [((report.get("environment") or {}).get("cpu_model")) for report in (committed, new)]
    if all(isinstance(name, str) and name for name in names) and names[0] != names[1]:
        return names[0], names[1]
    return None


class _Missing:
    """The value of a key one side of a comparison does not have."""

    def __repr__(self) -> str:
        return "MISSING"


#: stands for the value of a key absent from one side (``Drift.committed`` or ``Drift.new``)
MISSING = _MISSING = _Missing()


@dataclass(frozen=True)
class Drift:
    """One key whose re-run value differs: ``committed`` / ``new`` (:data:`MISSING` when that
    side lacks the key), ``difference`` = |new - committed| for two numbers, else None;
    ``kind``: ``"number"`` (a drift), ``"schema"`` (a key on one side only) or ``"wording"``
    (text); ``tolerance``: the rule the numbers were held to (``"relative 1e-09"``)."""

    key: str
    committed: Any
    new: Any
    difference: float | None = None
    kind: str = "number"
    tolerance: str = ""

    @property
    def family(self) -> str:
        """The key with its list indices dropped (``per_image.score``)."""
        return family_key(self.key)

    def describe(self) -> str:
        if self.kind == "schema":
            side, value = ("re-run", self.new) if self.committed is _MISSING else ("committed report", self.committed)
            return f"{self.key}: only in the {side} ({_show(value)})"
        if isinstance(self.committed, str) and isinstance(self.new, str):
            old, new = _text_difference(self.committed, self.new)
            return f"{self.key}: committed {old}, re-run {new}"
        gap = "" if self.difference is None else f" (|difference| {self.difference:.3g})"
        rule = f", tolerance {self.tolerance}" if self.tolerance else ""
        return f"{self.key}: committed {_show(self.committed)}, re-run {_show(self.new)}{gap}{rule}"


@dataclass
class Comparison:
    """What :func:`compare` found. ``compared``: the values both sides hold (numbers and
    text); ``matched``: of those, the ones equal or within tolerance; ``drifts``: numbers
    beyond their tolerance (:attr:`Drift.kind` ``"number"``); ``schema``: keys on one side
    only; ``wording``: text that differs; ``tolerated``: numbers that differ within a
    method's declared tolerance or ``--tolerance`` (matched, named)."""

    compared: int = 0
    matched: int = 0
    drifts: list[Drift] = field(default_factory=list)
    schema: list[Drift] = field(default_factory=list)
    wording: list[Drift] = field(default_factory=list)
    tolerated: list[Drift] = field(default_factory=list)


# --------------------------------------------------------------------------- tolerances


def tolerances_for(method: Any) -> tuple[Tolerance, ...]:
    """The tolerances a report of ``method`` is held to, first match wins: the families its
    registry entry declares, then :data:`EXACT`."""
    entry = REGISTRY.get(method) if isinstance(method, str) else None
    return (*(entry.tolerances if entry is not None else ()), EXACT)


def tolerance_table() -> list[dict[str, str]]:
    """One row per tolerance family (``method``, ``keys``, ``tolerance``, ``reason``): every
    registered method's declared ones, then the rule for every other number."""
    rows = [
        {"method": name, "keys": ", ".join(t.keys), "tolerance": t.describe(), "reason": t.reason}
        for name, entry in REGISTRY.items()
        for t in entry.tolerances
    ]
    rows.append(
        {"method": "every method", "keys": "any other number", "tolerance": EXACT.describe(), "reason": EXACT.reason}
    )
    rows.append(
        {
            "method": "every method, report from another CPU",
            "keys": "any other number",
            "tolerance": OTHER_CPU.describe(),
            "reason": OTHER_CPU.reason,
        }
    )
    return rows


def check_tolerance(tolerance: Any) -> float:
    """``tolerance`` as a float; ParameterError unless a finite number >= 0."""
    if not _is_number(tolerance) or not math.isfinite(tolerance) or tolerance < 0:
        raise ParameterError(f"tolerance must be a finite number >= 0 (0: exact), got {tolerance!r}")
    return float(tolerance)


# --------------------------------------------------------------------------- roots of paths

_END = r"(?=[/\\\s'\",;:)\]]|$)"  # a root ends at a separator, the text's end or punctuation
_START = r"(?<![^\s'\"(=\[:])"  # a path starts at the text's start, after a space, quote, bracket or colon
_GENERIC = (
    (re.compile(_START + r"/[^\s'\",;()]*?/(?:site|dist)-packages" + _END), "<site-packages>"),
    (re.compile(_START + r"(?:/home/[^/\s'\"]+|/Users/[^/\s'\"]+|/root)" + _END), "<home>"),
    (re.compile(r"<home>/\.cache/anomalib_study" + _END), "<cache>"),  # the default cache folder
)


def _folder(path: Any) -> str:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).as_posix()


def machine_roots(
    data_root: str | os.PathLike | None = None, reports: str | os.PathLike | None = None
) -> list[tuple[str, str]]:
    """``(name, folder)`` of this machine's roots: ``data`` (``data_root``, else
    $ANOMALIB_STUDY_DATA; left out when neither), ``cache`` (:func:`io.cache_root`),
    ``reports`` (when given), ``site-packages`` (the environment's), ``prefix``
    (``sys.prefix``) and ``home``; each as given and resolved when that differs."""
    named: list[tuple[str, Any]] = []
    data = io.data_root(data_root)
    if data is not None:
        named.append(("data", data))
    named.append(("cache", io.cache_root()))
    if reports is not None:
        named.append(("reports", reports))
    paths = sysconfig.get_paths()
    named += [("site-packages", paths["purelib"]), ("site-packages", paths["platlib"])]
    named += [("prefix", sys.prefix), ("prefix", sys.base_prefix), ("home", Path.home())]
    roots: list[tuple[str, str]] = []
    for name, folder in named:
        for form in (_folder(folder), Path(_folder(folder)).resolve().as_posix()):
            if form != "/" and (name, form) not in roots:
                roots.append((name, form))
    return roots


def _relative(path: str, folder: str) -> str | None:
    if path == folder:
        return ""
    return path[len(folder) + 1 :] if path.startswith(folder + "/") else None


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("/") and not any(c.isspace() for c in value)


def infer_roots(
    committed: Mapping[str, Any], new: Mapping[str, Any], roots: Sequence[tuple[str, str]]
) -> dict[str, str]:
    """name -> folder of the committed report's roots, read off the paths both reports hold
    under the same key: where the re-run's path lies under its root ``R`` at ``R/rest``, the
    committed path ending in ``/rest`` says where that root was (the folder most paths say)."""
    old, fresh = dict(flatten(committed)), dict(flatten(new))
    ordered = sorted(roots, key=lambda root: len(root[1]), reverse=True)
    votes: dict[str, Counter] = {}
    for key, value in fresh.items():
        other = old.get(key)
        if not (_is_path(value) and _is_path(other)):
            continue
        for name, folder in ordered:
            rest = _relative(value, folder)
            if rest is None:
                continue
            if rest == "" or other.endswith("/" + rest):
                found = other.rstrip("/") if rest == "" else other[: -len(rest) - 1]
                if found:
                    votes.setdefault(name, Counter())[found] += 1
            break  # the deepest root the path lies under decides
    return {name: counter.most_common(1)[0][0] for name, counter in votes.items()}


def normaliser(roots: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    """A function writing each root of ``roots`` (deepest first) as ``<name>`` in a string,
    then any ``.../site-packages`` and home folder left."""
    ordered = sorted({(folder, name) for name, folder in roots if folder not in ("", "/")}, key=lambda r: -len(r[0]))
    patterns = [(re.compile(_START + re.escape(folder) + _END), f"<{name}>") for folder, name in ordered]
    patterns += _GENERIC

    def normalise(text: str) -> str:
        if "/" not in text:
            return text
        for pattern, token in patterns:
            text = pattern.sub(token, text)
        return text

    return normalise


def _normalisers(
    committed: Mapping[str, Any],
    new: Mapping[str, Any],
    roots: Sequence[tuple[str, str]] | None,
    committed_roots: Mapping[str, str] | None,
) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """The :func:`normaliser` of each side: the re-run's ``roots`` (default: this machine's),
    the committed report's as given, else read off the paths both hold, else the re-run's."""
    roots = machine_roots() if roots is None else list(roots)
    found = {**infer_roots(committed, new, roots), **(committed_roots or {})}
    old_roots = list(found.items()) + [(name, folder) for name, folder in roots if name not in found]
    return normaliser(old_roots), normaliser(roots)


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


def _is_value(value: Any) -> bool:
    """A number or a bool: what a drift is made of."""
    return isinstance(value, (int, float))


def _holds_values(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(_holds_values(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_values(item) for item in value)
    return _is_value(value)


def _numbered(value: Mapping) -> bool:
    return bool(value) and all(str(name).isdigit() for name in value)


def _last_name(key: str) -> str:
    parts = [part for part in re.split(r"[.\[\]]", key) if part and not part.isdigit()]
    return parts[-1] if parts else ""


def _is_label(key: str) -> bool:
    return any(fnmatch.fnmatchcase(_last_name(key), pattern) for pattern in LABEL_KEYS)


class _Walk:
    """Both metrics walked side by side into a :class:`Comparison`."""

    def __init__(self, tolerances: Sequence[Tolerance], tolerance: float, old: Callable, new: Callable) -> None:
        self.tolerances, self.tolerance = tolerances, tolerance
        self.old, self.new = old, new
        self.found = Comparison()

    def walk(self, a: Any, b: Any, key: str, in_table: bool) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            numbered = _numbered(a) or _numbered(b)
            for name in list(a) + [name for name in b if name not in a]:
                if not _compared(str(name)):
                    continue
                sub = f"{key}.{name}" if key else str(name)
                if name in a and name in b:
                    self.walk(a[name], b[name], sub, in_table or numbered)
                elif numbered:  # a numbered row (a cluster's match) missing
                    self._differs(sub, a.get(name, _MISSING), b.get(name, _MISSING), "number")
                else:
                    self.found.schema.append(Drift(sub, a.get(name, _MISSING), b.get(name, _MISSING), kind="schema"))
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            for i, (x, y) in enumerate(zip(a, b)):
                self.walk(x, y, f"{key}[{i}]", True)
            if len(a) != len(b):
                kind = "number" if _holds_values(a) or _holds_values(b) else "wording"
                self._differs(f"len({key})", len(a), len(b), kind, float(abs(len(a) - len(b))))
        elif isinstance(a, (Mapping, list, tuple)) or isinstance(b, (Mapping, list, tuple)):
            kind = "number" if _holds_values(a) or _holds_values(b) else "wording"
            self._differs(key, a, b, kind)  # a structure against a value (None against a dict, ...)
        else:
            self._leaf(a, b, key, in_table)

    def _differs(self, key: str, a: Any, b: Any, kind: str, difference: float | None = None) -> None:
        self.found.compared += 1
        drift = Drift(key, a, b, difference, kind)
        (self.found.drifts if kind == "number" else self.found.wording).append(drift)

    def _leaf(self, a: Any, b: Any, key: str, in_table: bool) -> None:
        if _is_number(a) and _is_number(b):
            self.found.compared += 1
            if a == b or (math.isnan(a) and math.isnan(b)):  # equal infinities too
                self.found.matched += 1
                return
            rule = next(t for t in self.tolerances if t.matches(key))
            difference = abs(float(b) - float(a))
            described = rule.describe() + (f" or absolute {self.tolerance:g}" if self.tolerance else "")
            if rule.allows(a, b) or difference <= self.tolerance:
                self.found.matched += 1
                if not EXACT.allows(a, b):  # more than float rounding apart: named
                    self.found.tolerated.append(Drift(key, a, b, difference, "number", described))
                return
            self.found.drifts.append(Drift(key, a, b, difference, "number", described))
            return
        if isinstance(a, str):
            a = self.old(a)
        if isinstance(b, str):
            b = self.new(b)
        if type(a) is type(b) and a == b:
            self.found.compared += 1
            self.found.matched += 1
        elif _is_value(a) or _is_value(b) or (in_table and _is_label(key)):
            self._differs(key, a, b, "number")
        else:
            self._differs(key, a, b, "wording")


def compare(
    committed: Mapping[str, Any],
    new: Mapping[str, Any],
    tolerance: float = 0.0,
    *,
    roots: Sequence[tuple[str, str]] | None = None,
    committed_roots: Mapping[str, str] | None = None,
    tolerances: Sequence[Tolerance] | None = None,
) -> Comparison:
    """Compare two metrics dicts (see the module docstring).

    Args:
        committed, new: the committed report's metrics and the re-run's.
        tolerance: absolute, on top of each number's own tolerance (0: none).
        roots: ``(name, folder)`` of the re-run's roots (default :func:`machine_roots`).
        committed_roots: name -> folder where the committed report's roots were (those not
            given are read off the paths both hold, :func:`infer_roots`, else taken to be
            the re-run's).
        tolerances: the tolerance families, first match wins (default
            :func:`tolerances_for` the report's ``method``).
    """
    tolerance = check_tolerance(tolerance)
    old_normalise, new_normalise = _normalisers(committed, new, roots, committed_roots)
    if tolerances is None:
        tolerances = tolerances_for(new.get("method", committed.get("method")))
        if other_cpu(committed, new):
            tolerances = (*tolerances[:-1], OTHER_CPU)
    if not tolerances or tolerances[-1] is not EXACT:
        tolerances = (*tolerances, EXACT)
    walk = _Walk(tuple(tolerances), tolerance, old_normalise, new_normalise)
    walk.walk(committed, new, "", False)
    return walk.found


def compare_metrics(
    committed: Mapping[str, Any], new: Mapping[str, Any], tolerance: float = 0.0, **options: Any
) -> tuple[int, int, list[Drift]]:
    """``(compared, matched, drifts)`` of :func:`compare` (``options``: its keywords): the
    values both sides hold, those that match, and the numbers that drifted. Keys on one side
    only and text that differs are neither matched nor drifts (:func:`compare` lists them)."""
    found = compare(committed, new, tolerance, **options)
    return found.compared, found.matched, found.drifts


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


def provenance_differences(
    committed: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    roots: Sequence[tuple[str, str]] | None = None,
    committed_roots: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per provenance field that differs between two reports' metrics (with their
    ``_run``), e.g. ``"commit: 16ec360e0189 -> 2b1cd2f0a3c4"``; a field the committed report
    does not record (written before it was) reads ``not recorded``. Parameters that differ
    are named too, a path parameter only when it differs relative to its root (``roots``,
    ``committed_roots``: as :func:`compare` takes them). Empty when everything recorded is
    the same."""
    old_normalise, new_normalise = _normalisers(committed, new, roots, committed_roots)
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
            if isinstance(a, str) and isinstance(b, str) and old_normalise(a) == new_normalise(b):
                continue  # the same path under another root
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


def _text_difference(a: str, b: str, context: int = 24, width: int = 60) -> tuple[str, str]:
    """Two strings shown around where they differ (``...`` marks what is left out), quoted."""
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    first = max(0, start - context)

    def cut(text: str) -> str:
        middle = text[first : len(text) - max(0, end - context)]
        head = "..." if first else ""
        tail = "..." if len(text) - max(0, end - context) < len(text) else ""
        if len(middle) > width:
            middle, tail = middle[:width], "..."
        return json.dumps(head + middle + tail)

    return cut(a), cut(b)
