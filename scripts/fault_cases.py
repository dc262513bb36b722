"""Run the hostile cases of the faults issue as a user would, and print one table row each:
the case, the command, its exit status, the message it printed, and what is on disk after.

    python scripts/fault_cases.py --work /tmp/faults                       # every case but the full disk
    python scripts/fault_cases.py --work /tmp/faults --full /mnt/small     # and the full-disk cases

``--full`` names the mount point of a small file system the script may fill (e.g. as root:
``mount -t tmpfs -o size=2M tmpfs /mnt/small``); it is filled to a few kB before the
full-disk cases and emptied after. Every command runs in a subprocess, as typed; the
images are the synthetic DAGM-layout set (seconds to generate), the backbone the real
EfficientNet-Lite0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, int, str, str]] = []


def sh(command: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[int, str]:
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=900
    )
    lines = [
        line
        for line in (done.stderr + done.stdout).splitlines()
        if "error:" in line or "warning:" in line or "in use by" in line
    ]
    lines = [line for line in lines if "Kernel is running over TCP" not in line]
    return done.returncode, (lines[0] if lines else (done.stdout.strip().splitlines() or [""])[-1])


def row(case: str, command: list[str], code: int, message: str, disk: str) -> None:
    shown = " ".join(str(part) for part in command).replace(str(WORK), "$W")
    ROWS.append((case, shown, code, message.replace(str(WORK), "$W").replace("|", "/")[:300], disk))
    print(f"[{len(ROWS)}] {case}: exit {code}: {message[:160]}", flush=True)


def listing(folder: Path) -> str:
    if not folder.exists():
        return f"{folder.name}: absent"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return f"{folder.name}/: " + (", ".join(names[:8]) + (f" (+{len(names) - 8})" if len(names) > 8 else "") or "empty")


def fill(mount: Path, leave_kb: int = 4) -> None:
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave_kb * 1024))


def main() -> int:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    parser.add_argument("--full", type=Path, default=None, help="mount point of a small file system to fill")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (Markdown) here")
    args = parser.parse_args()
    WORK = args.work.resolve()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    cli = [sys.executable, "-m", "anomalib_study.cli"]
    from anomalib_study.data.synthetic import make_synthetic_dagm

    synthetic = Path(
        make_synthetic_dagm(
            WORK / "synthetic", seed=0, n_classes=1, n_train=12, n_test_normal=4, n_test_defect=6, image_size=64
        )
    )
    normal, test = WORK / "normal", WORK / "test"
    shutil.copytree(synthetic / "Class1" / "Train", normal)
    shutil.copytree(synthetic / "Class1" / "Test", test)
    evaluate = [*cli, "evaluate", "--dataset", "dagm", "--root", str(synthetic), "--k", "3"]
    small = ["--image-size", "64", "--num-workers", "0"]
    cache = {"ANOMALIB_STUDY_CACHE": str(WORK / "cache")}

    # ------------------------------------------------------------------ output options that cannot work
    taken = WORK / "taken"
    taken.write_text("a file")
    command = [*evaluate, "--out", str(taken)]
    code, message = sh(command, cache)
    row("evaluate --out names a file", command, code, message, listing(WORK / "taken_dir"))
    command = [*cli, "cluster", str(test), "--out", str(taken)]
    code, message = sh(command, cache)
    row(
        "cluster --out names a file (refused before any image is read)",
        command,
        code,
        message,
        "taken: the file, unchanged",
    )

    # ------------------------------------------------------------------ detect database messages and locks
    db = WORK / "db"
    command = [*cli, "detect", str(test), "--db-dir", str(db), "--result-dir", str(WORK / "r0"), *small]
    code, message = sh(command, cache, cwd=WORK)
    row("detect: a new database without --image-dir", command, code, message, listing(db))
    command = [
        *cli,
        "detect",
        str(test),
        "--db-dir",
        str(db),
        "--image-dir",
        str(normal),
        "--result-dir",
        str(WORK / "r1"),
        *small,
    ]
    first = subprocess.Popen(
        command, env={**os.environ, **cache}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.5)  # both start; one holds the database folder's lock while it builds, the other waits
    code, message = sh(command, cache)
    _, first_err = first.communicate(timeout=900)
    waited = [line for line in first_err.splitlines() if "in use by" in line]
    stored = json.loads((db / "database.json").read_text())
    from anomalib_study.io import sha256_file

    model_ok = sha256_file(db / stored["model_file"]) == stored.get("model_sha256", stored.get("sha256"))
    row(
        "two detect calls build one new database at once",
        command + ["(twice)"],
        code,
        f"first exit {first.returncode}: {waited[0] if waited else '(no wait)'}; second exit {code}: {message}",
        f"db/: one database ({stored['method']}, {stored['n_images']} images); its model file's sha256 "
        f"{'matches' if model_ok else 'does NOT match'} database.json",
    )
    command = [*cli, "detect", str(test), "--db-dir", str(db), "--result-dir", str(WORK / "r2"), *small]
    code, message = sh(command, cache, cwd=WORK)
    row("detect: reuse a database without --image-dir", command, code, message, listing(WORK / "r2"))

    # ------------------------------------------------------------------ studies that cannot run
    study = WORK / "broken.yaml"
    study.write_text(
        textwrap.dedent(f"""
        notebook: {REPO / "notebooks" / "01_knn_detection.ipynb"}
        title: broken
        parameters: {{k: "ten"}}
        backbones: [efficientnet_lite0, no_such_net]
        datasets:
          bottle: {{dataset: mvtec_ad, root: "{{data}}/mvtec_ad", category: cable}}
        """)
    )
    reports = WORK / "reports"
    data = Path(os.environ.get("ANOMALIB_STUDY_DATA", REPO.parent / "shared" / "data"))
    command = [*cli, "run", str(study), "--data", str(data), "--reports", str(reports)]
    code, message = sh(command)
    row('a study with k: "ten", an unknown backbone and a missing category', command, code, message, listing(reports))
    command = [*cli, "run", str(study), "--data", str(WORK / "no_such_data"), "--reports", str(reports)]
    code, message = sh(command)
    row("run with a --data that does not exist", command, code, message, listing(reports))

    tiny = WORK / "tiny.yaml"
    tiny.write_text(
        textwrap.dedent(f"""
        notebook: {REPO / "notebooks" / "01_knn_detection.ipynb"}
        title: tiny
        parameters: {{k: 3, image_size: 64, k_sweep: [1, 3]}}
        backbones: [efficientnet_lite0]
        datasets:
          synth: {{dataset: dagm, root: "{synthetic}", category: Class1}}
        """)
    )
    command = [*cli, "run", str(tiny), "--reports", str(reports)]
    holder = subprocess.Popen(
        command, env={**os.environ, **cache}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(4)
    code, message = sh(command, cache)
    holder.communicate(timeout=900)
    row(
        "two runs on one reports folder",
        command + ["(twice)"],
        code,
        f"first exit {holder.returncode}; second: " + message,
        listing(reports / "01_knn_detection"),
    )
    notebook = reports / "01_knn_detection" / "synth-efficientnet_lite0.ipynb"
    notebook.write_bytes(notebook.read_bytes() + b"\n")  # as if a later run had replaced this file only
    code, message = sh(command, cache)
    row("rerun after a report was replaced in part", command, code, message, listing(reports / "01_knn_detection"))

    # ------------------------------------------------------------------ verify tampering
    notebook.unlink()
    command = [*cli, "verify", "--reports", str(reports)]
    code, message = sh(command, cache, cwd=WORK)
    incomplete = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **cache}, cwd=WORK).stdout
    detail = next((line.strip() for line in incomplete.splitlines() if "incomplete" in line), message)
    row("verify: a report whose .ipynb was deleted", command, code, detail, listing(reports / "01_knn_detection"))
    metrics = reports / "01_knn_detection" / "synth-efficientnet_lite0.metrics.json"
    shutil.copy(reports / "01_knn_detection" / "synth-efficientnet_lite0.html", notebook)  # present again
    metrics.write_text(metrics.read_text()[:200])
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **cache}, cwd=WORK)
    detail = next((line.strip() for line in out.stdout.splitlines() if "JSON" in line), out.stdout[-200:])
    row("verify: a metrics.json cut short", command, out.returncode, detail, "reports: only read")

    # ------------------------------------------------------------------ cluster edge cases, folder layout
    copies = WORK / "copies"
    copies.mkdir()
    first_image = sorted(test.iterdir())[0]
    for i in range(5):
        shutil.copy(first_image, copies / f"copy{i}.png")
    command = [*cli, "cluster", str(copies), "--out", str(WORK / "clusters"), "--image-size", "64"]
    code, message = sh(command, cache)
    row("cluster a folder of identical images", command, code, message, listing(WORK / "clusters"))
    mixed = WORK / "mixed"
    shutil.copytree(test, mixed)
    for i in range(3):
        shutil.copy(first_image, mixed / f"again{i}.png")
    command = [*cli, "cluster", str(mixed), "--out", str(WORK / "clusters"), "--image-size", "64", "--n-clusters", "3"]
    code, message = sh(command, cache)
    row("cluster a folder holding copies", command, code, message, listing(WORK / "clusters"))
    tree = WORK / "tree"
    shutil.copytree(normal, tree / "ok_parts")
    command = [*cli, "evaluate", "--dataset", "folder", "--root", str(tree), "--out", str(WORK / "f")]
    code, message = sh(command, cache)
    row("evaluate --dataset folder on another layout", command, code, message, listing(WORK / "f"))

    # ------------------------------------------------------------------ a full disk
    if args.full is not None:
        mount = args.full
        for case, command, folder, env in (
            ("evaluate --out on a full disk", [*evaluate, "--out", str(mount / "ev")], mount / "ev", cache),
            (
                "detect: the database on a full disk",
                [
                    *cli,
                    "detect",
                    str(test),
                    "--image-dir",
                    str(normal),
                    "--db-dir",
                    str(mount / "db"),
                    "--result-dir",
                    str(WORK / "rf"),
                    *small,
                ],
                mount / "db",
                cache,
            ),
            (
                "detect: the feature cache on a full disk",
                [
                    *cli,
                    "detect",
                    str(test),
                    "--image-dir",
                    str(normal),
                    "--db-dir",
                    str(WORK / "db2"),
                    "--result-dir",
                    str(WORK / "rc"),
                    *small,
                ],
                WORK / "rc",
                {"ANOMALIB_STUDY_CACHE": str(mount / "cache")},
            ),
            (
                "detect --method patchcore: overlays on a full disk",
                [
                    *cli,
                    "detect",
                    str(test),
                    "--method",
                    "patchcore",
                    "--image-dir",
                    str(normal),
                    "--db-dir",
                    str(WORK / "pcdb"),
                    "--result-dir",
                    str(mount / "pr"),
                    *small,
                ],
                mount / "pr",
                cache,
            ),
            (
                "cluster --out on a full disk",
                [*cli, "cluster", str(test), "--out", str(mount / "cl"), "--image-size", "64"],
                mount / "cl",
                cache,
            ),
            (
                "run: a study's reports on a full disk",
                [*cli, "run", str(tiny), "--reports", str(mount / "reports"), "--force"],
                mount / "reports",
                cache,
            ),
        ):
            fill(mount)
            code, message = sh(command, env)
            row(case, command, code, message, listing(folder) + f"; {shutil.disk_usage(mount).free // 1024} kB free")
            for path in mount.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    table = ["| case | command | exit | message | on disk afterwards |", "|---|---|---|---|---|"]
    table += [f"| {c} | `{cmd}` | {code} | {msg} | {disk} |" for c, cmd, code, msg, disk in ROWS]
    text = "\n".join(table)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


WORK = Path(".")

if __name__ == "__main__":
    sys.exit(main())
