"""How far one autoencoder cell's figures move with the seed and the thread count, on this CPU.

    python benchmarks/bench_ae_reproducibility.py --data ../shared/data
        [--cell kolektorsdd-pretrained-efficientnet_lite0] [--seeds 0,1,2] [--threads 1,2]
        [--out reports/benchmarks/ae_reproducibility.json] [--quick]

The cell's parameters are read from ``studies/autoencoder.yaml`` (default: KolektorSDD with the
pretrained EfficientNet-Lite0 encoder, MSE + SSIM, at most 30 epochs with early stopping). It is
trained once per seed and thread count, each run in its own process with ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` and ``torch.set_num_threads`` set to that count, and the first setting twice
(is a repeat bit for bit the same?). Printed and written: each run's stopping epoch, best epoch,
image AUROC, pixel AUROC, PRO and seconds; the spread of each figure over the seeds at each thread
count and over the thread counts at each seed; the committed report's figures with the CPU and
thread count it recorded; the machine (CPU, native bf16, load before and after).

Why: the seeded training is deterministic only for one CPU and one thread count. A convolution's
backward pass sums in an order set by its threads and the CPU's kernels, so the weights differ in
their last bits after the first step; Adam's normalised steps and early stopping amplify that into
other weights, another stopping epoch and other figures. A tolerance cannot cover it (verify reports
it as drift); this measures how large it is beside what the seed alone does.

``--quick`` trains the synthetic DAGM-layout set at 64 px for 1 epoch (smoke test; writes nothing
unless ``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_study import machine_now  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "autoencoder.yaml"
COMMITTED = REPO / "reports" / "03_autoencoder"
DEFAULT_CELL = "kolektorsdd-pretrained-efficientnet_lite0"
DEFAULT_OUT = REPO / "reports" / "benchmarks" / "ae_reproducibility.json"
FIGURES = ("image_auroc", "pixel_auroc", "pro")
NOTEBOOK_ONLY = ("ablation_losses",)  # notebook 03 parameters that are not evaluate's


def cell_arguments(cell: str, data: Path | None, quick: bool) -> dict[str, Any]:
    """``evaluate`` keyword arguments of ``cell`` in the autoencoder study (the synthetic set when ``quick``)."""
    from anomalib_study.runner import expand_grid, read_study, resolve_parameters, synthetic_root

    if quick:
        return {
            "dataset": "dagm",
            "root": str(synthetic_root()),
            "model": "conv",
            "loss": "mse_ssim",
            "epochs": 1,
            "image_size": 64,
        }
    cells = {c.name: c for c in expand_grid(read_study(STUDY))}
    if cell not in cells:
        raise SystemExit(
            f"--cell {cell!r} is not a cell of {STUDY.relative_to(REPO)} (cells: {', '.join(sorted(cells))})"
        )
    parameters, reason = resolve_parameters(cells[cell].parameters, data=data, synthetic=synthetic_root)
    if reason:
        raise SystemExit(f"--cell {cell}: {reason}; pass --data ../shared/data")
    return {k: v for k, v in parameters.items() if k not in NOTEBOOK_ONLY}


def worker(arguments: dict[str, Any], seed: int, threads: int, out: Path) -> None:
    """One training run in this process (started by :func:`train` with the thread variables set)."""
    import torch

    torch.set_num_threads(threads)
    from anomalib_study.evaluate import evaluate

    kwargs = dict(arguments)
    dataset, root = kwargs.pop("dataset"), kwargs.pop("root")
    started = time.perf_counter()
    metrics = evaluate("autoencoder", dataset, root, seed=seed, progress=False, **kwargs)
    history = metrics.get("history") or []
    row = {
        "seed": seed,
        "threads": torch.get_num_threads(),
        "epochs_run": metrics.get("epochs_run"),
        "best_epoch": metrics.get("best_epoch"),
        "stopped_early": metrics.get("stopped_early"),
        **{name: metrics.get(name) for name in FIGURES},
        "val_loss_epoch_1": history[0]["val_loss"] if history else None,
        "val_losses": [h["val_loss"] for h in history],
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.write_text(json.dumps(row))


def train(arguments: dict[str, Any], seed: int, threads: int, work: Path) -> dict[str, Any]:
    """One run in a fresh process with ``threads`` OpenMP/MKL threads."""
    out = work / f"seed{seed}-threads{threads}-{time.monotonic_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "import bench_ae_reproducibility as b; "
        "b.worker(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))"
    )
    command = [
        sys.executable,
        "-c",
        code,
        str(Path(__file__).resolve().parent),
        json.dumps(arguments),
        str(seed),
        str(threads),
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the run with seed {seed} and {threads} thread(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def spread(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per figure: min, max and max - min over ``rows``; the stopping epochs seen."""
    result: dict[str, Any] = {"runs": len(rows), "epochs_run": sorted({r["epochs_run"] for r in rows})}
    for name in FIGURES:
        values = [r[name] for r in rows if r.get(name) is not None]
        if values:
            result[name] = {"min": min(values), "max": max(values), "range": max(values) - min(values)}
    return result


def committed_figures(cell: str) -> dict[str, Any] | None:
    path = COMMITTED / f"{cell}.metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    environment = metrics.get("environment") or {}
    return {
        **{name: metrics.get(name) for name in ("epochs_run", "best_epoch", *FIGURES)},
        "seed": (metrics.get("params") or {}).get("seed"),
        "cpu": environment.get("cpu_model"),
        "threads": (environment.get("threads") or {}).get("torch"),
        "git_commit": environment.get("git_commit"),
    }


def run(cell: str, data: Path | None, seeds: Sequence[int], threads: Sequence[int], quick: bool) -> dict[str, Any]:
    arguments = cell_arguments(cell, data, quick)
    machine = machine_now()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_ae_repro_") as work:
        settings = list(itertools.product(threads, seeds))
        for i, (count, seed) in enumerate(settings + settings[:1], 1):
            print(f"[{i}/{len(settings) + 1}] seed {seed}, {count} thread(s)", flush=True)
            row = train(arguments, seed, count, Path(work))
            rows.append(row)
            print(
                f"  {row['epochs_run']} epochs (best {row['best_epoch']}), image AUROC {row['image_auroc']:.6f}, "
                f"pixel AUROC {row['pixel_auroc']:.6f}, PRO {row['pro']:.6f}, {row['seconds']} s",
                flush=True,
            )
    first, repeat = rows[0], rows[-1]
    runs = rows[:-1]
    return {
        "benchmark": "ae_reproducibility",
        "quick": quick,
        "cell": None if quick else cell,
        "arguments": {k: v for k, v in arguments.items() if k != "root"},
        "runs": runs,
        "repeat": {
            "of": {"seed": first["seed"], "threads": first["threads"]},
            "identical": all(first[k] == repeat[k] for k in ("val_losses", "epochs_run", *FIGURES)),
            "run": repeat,
        },
        "over_seeds": {str(count): spread([r for r in runs if r["threads"] == count]) for count in threads},
        "over_threads": {str(seed): spread([r for r in runs if r["seed"] == seed]) for seed in seeds},
        "all_runs": spread(runs),
        "committed_report": None if quick else committed_figures(cell),
        "machine": machine,
        "machine_after": machine_now(),
    }


def summary(report: dict[str, Any]) -> list[str]:
    lines = [
        f"{report['cell'] or 'synthetic (quick)'}: {report['all_runs']['runs']} runs on {report['machine']['cpu']} "
        f"(native bf16 {report['machine']['native_bf16']})"
    ]
    repeat = report["repeat"]
    lines.append(
        f"repeat of seed {repeat['of']['seed']} with {repeat['of']['threads']} thread(s): "
        + ("bit for bit the same" if repeat["identical"] else "DIFFERENT (not deterministic on one machine)")
    )
    for count, s in report["over_seeds"].items():
        lines.append(
            f"over seeds, {count} thread(s): image AUROC {s['image_auroc']['min']:.4f}-{s['image_auroc']['max']:.4f}"
            f" (range {s['image_auroc']['range']:.4f}), stopping epochs {s['epochs_run']}"
        )
    for seed, s in report["over_threads"].items():
        lines.append(
            f"over thread counts, seed {seed}: image AUROC range {s['image_auroc']['range']:.4f}, "
            f"stopping epochs {s['epochs_run']}"
        )
    committed = report.get("committed_report")
    if committed:
        lines.append(
            f"committed report: image AUROC {committed['image_auroc']:.6f}, {committed['epochs_run']} epochs, "
            f"seed {committed['seed']}, {committed['threads']} thread(s) on {committed['cpu']}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="the real data folder (../shared/data)")
    parser.add_argument("--cell", default=DEFAULT_CELL, help=f"a cell of {STUDY.relative_to(REPO)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--quick", action="store_true", help="synthetic set, 64 px, 1 epoch (smoke test)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}; --quick writes nothing unless given)",
    )
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error("--seeds and --threads take comma-separated integers, e.g. --seeds 0,1,2 --threads 1,2")
    if not seeds or not threads or min(threads) < 1:
        parser.error("--threads takes counts of at least 1")
    data = args.data or (Path(os.environ["ANOMALIB_STUDY_DATA"]) if os.environ.get("ANOMALIB_STUDY_DATA") else None)
    report = run(args.cell, data.resolve() if data else None, seeds, threads, args.quick)
    out = args.out if args.out else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        from anomalib_study.io import write_json

        write_json(out, report)
    for line in summary(report):
        print(line)
    if out is not None:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
