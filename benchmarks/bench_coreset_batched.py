"""The greedy coreset's batched passes against the matrix-vector loop, side by side on a real bank.

    python benchmarks/bench_coreset_batched.py --data ../shared/data
        [--dataset magnetic_tile] [--category C] [--backbone dinov2_vits14] [--image-size 224]
        [--resize-mode squash] [--ratio 0.1] [--batch-size 8] [--out reports/benchmarks/coreset_batched.json]

The training patches of one data set are built as notebook 02 builds its bank (``PatchCore``'s
defaults for the backbone, the calibration images held out, the patch cache used: the default
case, Magnetic-tile with DINOv2 ViT-S/14 at 224 px squashed, is the study cell
``02_patchcore/magnetic_tile-dinov2_vits14``, so its features are read back when that cell ran on
this machine). Then :class:`~anomalib_study.methods.coreset.GreedyCoresetSampler` selects the
coreset twice in this process: ``batch_centres=64`` (the default: the distances to the 64 farthest
points per pass, one matrix-matrix product) and ``batch_centres=1`` (one matrix-vector product
per centre: the loop before the batched passes). Printed and written: each side's seconds, the
speed-up, whether the two selections are the same sequence, the first step where they differ,
:func:`~anomalib_study.methods.coreset.selection_overlap`, and the machine (CPU, native bf16,
load).

The two compute the same distances up to float rounding (the products' kernels sum in another
order), so a near-tie for the farthest point can go either way; this measures how often that
happens on real features, which a test on generated data cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_study import machine_now  # noqa: E402


def training_rows(
    data: Path,
    dataset: str,
    category: str | None,
    backbone: str,
    image_size: int | None,
    resize_mode: str,
    batch_size: int,
) -> tuple[np.ndarray, dict]:
    """The bank rows (N, D) PatchCore's fit would subsample, and what they are."""
    from anomalib_study.backbones import load_backbone
    from anomalib_study.data import load_dataset
    from anomalib_study.methods.patchcore import PatchCore

    records = load_dataset(dataset, data / dataset, category=category)
    paths = [r.path for r in records.train]
    module = load_backbone(backbone, image_size=image_size, resize_mode=resize_mode)
    model = PatchCore(backbone=module, batch_size=batch_size, progress=True)
    started = time.perf_counter()
    patches, _ = model.extract_patches(paths, desc="PatchCore train features")
    extract_s = time.perf_counter() - started
    held = model.calibration_images(len(paths))
    kept = np.setdiff1d(np.arange(len(paths)), held)
    rows = np.ascontiguousarray(patches[kept].reshape(-1, patches.shape[-1]))
    return rows, {
        "images": len(paths),
        "calibration_images": int(held.size),
        "rows": int(rows.shape[0]),
        "dim": int(rows.shape[1]),
        "extract_s": round(extract_s, 2),
        "patch_cache": model.patch_cache_used(),
    }


def compare(rows: np.ndarray, ratio: float, seed: int = 0) -> dict:
    """Both selections on ``rows``, timed one after the other in this process."""
    from anomalib_study.methods.coreset import GreedyCoresetSampler, selection_overlap

    sides = {}
    for name, centres in (("batched_64", 64), ("matrix_vector", 1)):
        sampler = GreedyCoresetSampler(ratio=ratio, projection_dim=128, seed=seed, batch_centres=centres)
        started = time.perf_counter()
        selected = np.asarray(sampler.run(rows))
        sides[name] = (selected, time.perf_counter() - started)
        print(f"{name}: {selected.size} rows selected in {sides[name][1]:.1f} s", flush=True)
    (batched, batched_s), (plain, plain_s) = sides["batched_64"], sides["matrix_vector"]
    if batched.shape != plain.shape:
        raise RuntimeError(f"the two samplers selected {batched.size} and {plain.size} rows: a bug in the sampler")
    same = bool((batched == plain).all())
    differing = np.flatnonzero(batched != plain)
    return {
        "selected": int(plain.size),
        "batched_64_s": round(batched_s, 2),
        "matrix_vector_s": round(plain_s, 2),
        "speedup": round(plain_s / batched_s, 2) if batched_s > 0 else None,
        "same_sequence": same,
        "first_differing_step": None if same else int(differing[0]),
        "selection_overlap": float(selection_overlap(batched, plain)),
        "rows_only_in_one": int(plain.size - len(np.intersect1d(batched, plain))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the real data folder (../shared/data)")
    parser.add_argument("--dataset", default="magnetic_tile")
    parser.add_argument("--category", default=None)
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize-mode", default="squash")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (notebook 02's default: 8)")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/coreset_batched.json"))
    args = parser.parse_args(argv)
    from anomalib_study.io import write_json

    machine = machine_now()
    rows, bank = training_rows(
        args.data, args.dataset, args.category, args.backbone, args.image_size, args.resize_mode, args.batch_size
    )
    result = compare(rows, args.ratio)
    report = {
        "benchmark": "coreset_batched",
        "setting": {
            "dataset": args.dataset,
            "category": args.category,
            "backbone": args.backbone,
            "image_size": args.image_size,
            "resize_mode": args.resize_mode,
            "coreset_ratio": args.ratio,
            "projection_dim": 128,
            "seed": 0,
        },
        "bank": bank,
        "result": result,
        "machine": machine,
        "machine_after": machine_now(),
    }
    write_json(args.out, report)
    print(json.dumps(result, indent=1))
    print(
        f"batched passes {result['speedup']}x the matrix-vector loop; "
        + (
            "the same selection, step for step"
            if result["same_sequence"]
            else f"selections differ from step {result['first_differing_step']} "
            f"({result['rows_only_in_one']} of {result['selected']} rows)"
        )
        + f"; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
