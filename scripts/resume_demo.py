"""An autoencoder training run killed in the middle (SIGKILL) and resumed from its checkpoint,
against an uninterrupted run with the same seed: prints both runs' figures and their differences.

    python scripts/resume_demo.py [--epochs 6] [--kill-after 3] [--image-size 64] [--model conv]

The synthetic DAGM-layout set (Class1, generated in seconds) is used. Run A trains
uninterrupted. Run B trains in a child process with ``checkpoint_dir``; the parent kills it
with SIGKILL as soon as the checkpoint on disk holds epoch ``--kill-after``, then makes the
same call again, which resumes from the checkpoint. Both runs then score the test images.
Exit code 0 when every per-epoch validation loss, the threshold and every test score are
identical, 1 otherwise. (``tests/test_methods_autoencoder.py::
test_resume_after_a_crash_is_bit_identical`` checks the same on every CI run, in process.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from anomalib_study.data import load_dataset
from anomalib_study.data.synthetic import make_synthetic_dagm
from anomalib_study.methods.autoencoder import CHECKPOINT_NAME, AutoEncoder
from anomalib_study.metrics import image_auroc


def _model(args, checkpoint_dir: Path | None) -> AutoEncoder:
    return AutoEncoder(
        model=args.model,
        image_size=args.image_size,
        epochs=args.epochs,
        seed=0,
        patience=args.epochs,
        checkpoint_dir=checkpoint_dir,
        progress=False,
    )


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["epoch"])
    except Exception:  # not written yet, or being replaced
        return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--kill-after", type=int, default=3, help="kill run B once its checkpoint holds this epoch")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--model", default="conv", choices=("conv", "pretrained"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "CHECKPOINT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # run B's first attempt, in its own process, killed by the parent
        torch.set_num_threads(args.threads)
        _model(args, Path(args.child[1])).fit_paths(
            [r.path for r in load_dataset("dagm", args.child[0], category="Class1").train]
        )
        return 0
    if not 1 <= args.kill_after < args.epochs:
        parser.error(f"--kill-after must be between 1 and --epochs - 1 (got {args.kill_after}, epochs {args.epochs})")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="resume_demo_") as scratch:
        root = make_synthetic_dagm(Path(scratch) / "synthetic_dagm", seed=0)
        data = load_dataset("dagm", root, category="Class1")
        train = [r.path for r in data.train]
        test = [r.path for r in data.test]
        labels = np.array([r.label for r in data.test])

        started = time.perf_counter()
        a = _model(args, None).fit_paths(train)
        a_seconds = time.perf_counter() - started

        folder = Path(scratch) / "checkpoint"
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--epochs",
                str(args.epochs),
                "--image-size",
                str(args.image_size),
                "--model",
                args.model,
                "--threads",
                str(args.threads),
                "--child",
                str(root),
                str(folder),
            ]
        )
        while child.poll() is None and _checkpoint_epoch(folder / CHECKPOINT_NAME) < args.kill_after:
            time.sleep(0.05)
        killed_at = _checkpoint_epoch(folder / CHECKPOINT_NAME)
        child.kill()  # SIGKILL: no clean-up, as when a machine or a job scheduler stops a run
        child.wait()
        print(
            f"run B: child killed (exit code {child.returncode}) with epoch {killed_at} of {args.epochs} checkpointed"
        )
        if killed_at >= args.epochs:
            print("run B finished before it could be killed: use more --epochs", file=sys.stderr)
            return 1
        b = _model(args, folder).fit_paths(train)

        scores_a, scores_b = a.score_paths(test), b.score_paths(test)
    rows = []
    for name, run in (("A uninterrupted", a), ("B killed + resumed", b)):
        scores = scores_a if run is a else scores_b
        rows.append(
            (
                name,
                run.resumed_from_epoch_,
                run.epochs_run_,
                image_auroc(labels, scores["image_scores_residual"]),
                image_auroc(labels, scores["image_scores_mse"]),
                run.threshold_,
            )
        )
    print(
        f"synthetic Class1, {args.model}, {args.image_size} px, {args.epochs} epochs, seed 0, {args.threads} threads; "
        f"run A {a_seconds:.1f} s"
    )
    print("| run | resumed from epoch | epochs run | image AUROC (residual) | image AUROC (mse) | threshold |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:.4f} | {row[4]:.4f} | {row[5]:.6g} |")
    val_a = [h["val_loss"] for h in a.history_]
    val_b = [h["val_loss"] for h in b.history_]
    print("validation loss per epoch, A:", ", ".join(f"{v:.6f}" for v in val_a))
    print("validation loss per epoch, B:", ", ".join(f"{v:.6f}" for v in val_b))
    largest = max(
        float(np.max(np.abs(scores_a[k] - scores_b[k])))
        for k in ("image_scores_residual", "image_scores_mse", "anomaly_maps")
    )
    same = val_a == val_b and a.threshold_ == b.threshold_ and largest == 0.0
    print(
        f"largest difference over the {len(test)} test images' scores and anomaly maps: {largest:g}; identical: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
