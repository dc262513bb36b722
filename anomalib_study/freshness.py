"""Which package code a report's numbers depend on, and whether it changed since.

A report is stale when code it ran changed, and only then. The runner records, for each
executed notebook, the package modules loaded in its kernel by the end of the run (what
:func:`code_record` returns, written by :func:`write_code_record` from a cell the runner
appends and removes again), each hashed on its syntax tree without docstrings
(:func:`module_hash`): a docstring, a comment or a reformatting leaves the hash as it is,
a change to a statement changes it. :func:`changed_modules` compares a record with the
code as it is now; the front page (:mod:`anomalib_study.comparison`), the runner's
"unchanged, not rerun" test and ``verify`` all use it.

Reports run before this record existed carry only ``sources_hash`` (every ``.py`` file of
the package, bytes included): for them any change to the package counts
(:func:`anomalib_study.io.package_sources_hash`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from anomalib_study import io

__all__ = [
    "RULE",
    "PACKAGE_ROOT",
    "source_hash",
    "module_hash",
    "code_record",
    "code_version",
    "library_versions",
    "FEATURE_LIBRARIES",
    "write_code_record",
    "read_code_record",
    "changed_modules",
    "describe_changes",
]

#: the name of the hashing rule, recorded with the hashes (a new rule makes every record unknown, never current)
RULE = "ast-without-docstrings-v1"

#: the package folder whose modules are hashed
PACKAGE_ROOT = Path(__file__).resolve().parent

_PACKAGE = "anomalib_study"


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


def source_hash(source: str | bytes) -> str:
    """sha256 of a module's syntax tree with its docstrings removed (comments, blank lines and
    layout are not in the tree); the bytes' sha256 when the source does not parse."""
    try:
        tree = _strip_docstrings(ast.parse(source))
    except SyntaxError:
        data = source.encode() if isinstance(source, str) else source
        return "bytes:" + hashlib.sha256(data).hexdigest()
    return hashlib.sha256(ast.dump(tree, annotate_fields=True, include_attributes=False).encode()).hexdigest()


_CACHE: dict[tuple[str, int, int], str] = {}


def module_hash(path: str | os.PathLike) -> str | None:
    """:func:`source_hash` of the file at ``path`` (None when it does not exist); cached by
    path, modification time and size."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        _CACHE[key] = source_hash(path.read_bytes())
    return _CACHE[key]


def code_record(modules: Mapping[str, Any] | None = None, package_root: str | os.PathLike | None = None) -> dict:
    """``{"rule": RULE, "modules": {relative path: hash}}`` of the package modules loaded in
    this process (``modules``: default ``sys.modules``), sorted by path."""
    root = Path(package_root or PACKAGE_ROOT).resolve()
    modules = sys.modules if modules is None else modules
    found: dict[str, str] = {}
    for name, module in list(modules.items()):
        if name != _PACKAGE and not name.startswith(_PACKAGE + "."):
            continue
        file = getattr(module, "__file__", None)
        if not file:
            continue
        try:
            relative = Path(file).resolve().relative_to(root).as_posix()
        except ValueError:  # loaded from another copy of the package
            continue
        digest = module_hash(root / relative)
        if digest is not None:
            found[relative] = digest
    return {"rule": RULE, "modules": dict(sorted(found.items()))}


#: the libraries whose code computes features beside ours (decoding, the networks): their
#: versions are part of :func:`code_version` with ``libraries=True``
FEATURE_LIBRARIES = ("torch", "torchvision", "timm", "pillow", "numpy")


def library_versions(names: Iterable[str] = FEATURE_LIBRARIES) -> dict[str, str | None]:
    """The installed version of each distribution (None where it is not installed)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_version(modules: Iterable[str], package_root: str | os.PathLike | None = None, libraries: bool = False) -> str:
    """sha256 (first 16 hex digits) of the :func:`module_hash` of each named package module
    (paths relative to the package, e.g. ``"features.py"``), in the order given, and with
    ``libraries`` the versions of :data:`FEATURE_LIBRARIES`: what a cache keys its entries by,
    so that an entry computed by other code (not a docstring, comment or layout edit) is a miss
    rather than a stale hit. A module that does not exist counts as None. A cache computes it
    when its module is imported, so that an edit made while a process runs (a kernel) does not
    label what the loaded code computes with the edited code's version."""
    root = Path(package_root or PACKAGE_ROOT)
    hashes = [[relative, module_hash(root / relative)] for relative in modules]
    versions = library_versions() if libraries else None
    return hashlib.sha256(json.dumps([RULE, hashes, versions]).encode()).hexdigest()[:16]


def write_code_record(path: str | os.PathLike) -> None:
    """Write :func:`code_record` to ``path`` as JSON (the runner's appended cell calls it)."""
    io.write_json(path, code_record())


def changed_modules(
    record: Mapping[str, Any] | None, package_root: str | os.PathLike | None = None
) -> list[str] | None:
    """The recorded modules whose code is not the same now (a module gone counts), sorted;
    None when ``record`` is missing or of another rule (the freshness is then unknown)."""
    if not isinstance(record, Mapping) or record.get("rule") != RULE or not isinstance(record.get("modules"), Mapping):
        return None
    root = Path(package_root or PACKAGE_ROOT)
    return sorted(relative for relative, digest in record["modules"].items() if module_hash(root / relative) != digest)


def describe_changes(changed: list[str], limit: int = 4) -> str:
    """``"methods/knn.py and evaluate.py changed"`` (the first ``limit`` named, then a count)."""
    names = [f"anomalib_study/{name}" for name in changed[:limit]]
    if len(changed) > limit:
        names.append(f"{len(changed) - limit} other module(s)")
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{text} changed"


def read_code_record(path: str | os.PathLike) -> dict | None:
    """The record :func:`write_code_record` wrote at ``path``, or None (missing or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
