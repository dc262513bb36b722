"""anomalib 2.7.0's PatchCore, timed: run INSIDE anomalib's own venv (benchmarks/setup_anomalib_venv.sh).

    /work/.venvs/anomalib-2.7.0/bin/python benchmarks/anomalib_side.py \
        --train-list train.txt --test-list test.txt --preprocessing '{"resize": 256, ...}' \
        [--coreset-ratio 0.1] [--batch-size 8] [--device cpu]

This file imports only anomalib, torch, torchvision and PIL (never ``anomalib_study``, which
is not installed in that venv). It does what anomalib's ``Engine.fit`` / ``Engine.predict``
do with ``anomalib.models.Patchcore``, minus Lightning's loop and data module:

* fit = for each training batch, ``PatchcoreModel.forward`` in training mode (the body of
  ``Patchcore.training_step``: timm feature extraction, 3x3 average pooling, layer3
  upsampled to layer2 and concatenated, appended to ``memory_bank``), then
  ``PatchcoreModel.subsample_embedding(ratio)`` (the body of ``Patchcore.fit``: anomalib's
  ``KCenterGreedy`` on the stacked bank, 128-d sparse random projection then one full
  distance update per selected centre). The two phases are timed separately.
* predict = ``PatchcoreModel.forward`` in eval mode on each test batch (nearest neighbour
  search against the coreset, the paper's reweighted image score, anomaly map upsampled and
  Gaussian-blurred); images/s over the test list.

Images are decoded with PIL and preprocessed by the same torchvision pipeline as
``anomalib_study`` (the ``--preprocessing`` dict of our backbone: resize, centre crop,
ImageNet normalisation), so both sides see identical tensors. The backbone is
``wide_resnet50_2`` with random initialisation (``pre_trained=False``): timm builds it
without touching the network (the hub is also forced offline below).

CPU seconds (user + system of all threads, ``fit_cpu_s`` / ``predict_cpu_s``) are reported
beside the wall times: other programs on a shared machine inflate them less. Peak memory is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of this process (the resident
set's high-water mark, which includes torch's native allocations; tracemalloc would miss
them). It is reported after fit and at the end. Prints one JSON object on stdout; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

# nothing in this process may reach the network (random-init weights, no hub lookups)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TIMM_USE_OLD_CACHE", "0")


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) used by this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _log(message: str) -> None:
    print(f"[anomalib_side] {message}", file=sys.stderr, flush=True)


def _read_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        paths = [line.strip() for line in handle if line.strip()]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"anomalib_side: {len(missing)} image(s) listed in {path} do not exist, e.g. {missing[0]}")
    return paths


def _transform(pre: dict):
    from torchvision import transforms

    modes = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}
    return transforms.Compose(
        [
            transforms.Resize(pre["resize"], interpolation=modes[pre["interpolation"]]),
            transforms.CenterCrop(pre["crop"]),
            transforms.ToTensor(),
            transforms.Normalize(pre["mean"], pre["std"]),
        ]
    )


def _batches(paths: list[str], transform, batch_size: int, device):
    """Decoded, preprocessed batches (N, 3, crop, crop) float32, in order."""
    import torch
    from PIL import Image

    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        yield torch.stack(images).to(device)


def run(args: argparse.Namespace) -> dict:
    import anomalib
    import torch
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    pre = json.loads(args.preprocessing)
    transform = _transform(pre)
    train_paths = _read_list(args.train_list) if args.train_list else []
    test_paths = _read_list(args.test_list) if args.test_list else []
    result: dict = {
        "side": "anomalib",
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "n_train": len(train_paths),
        "n_test": len(test_paths),
        "parameters": {
            "backbone": args.backbone,
            "layers": list(args.layers),
            "pre_trained": False,
            "coreset_sampling_ratio": args.coreset_ratio,
            "num_neighbors": args.num_neighbors,
            "batch_size": args.batch_size,
            "preprocessing": pre,
        },
        "load_average_start": _load(),
        "rss_before_model_mb": _rss_mb(),
    }

    model = PatchcoreModel(
        layers=list(args.layers), backbone=args.backbone, pre_trained=False, num_neighbors=args.num_neighbors
    ).to(device)
    result["rss_after_model_mb"] = _rss_mb()
    if args.bank_rows:
        return _predict_only(args, model, transform, test_paths, device, result)

    # ---- fit: Patchcore.training_step on every batch, then Patchcore.fit ----------------
    model.train()
    cpu_start = _cpu_s()
    start = time.perf_counter()
    for i, batch in enumerate(_batches(train_paths, transform, args.batch_size, device)):
        model(batch)
        if i % 10 == 0:
            _log(f"fit: batch {i + 1}/{-(-len(train_paths) // args.batch_size)}")
    extract_s = time.perf_counter() - start
    # anomalib 2.7 keeps the training embeddings in a list; subsample_embedding stacks them
    bank_rows = sum(int(e.shape[0]) for e in model.embedding_store)
    bank_dim = int(model.embedding_store[0].shape[1])
    result["load_average_after_extract"] = _load()
    _log(f"bank {bank_rows} x {bank_dim}; coreset (KCenterGreedy, ratio {args.coreset_ratio}) ...")
    start = time.perf_counter()
    model.subsample_embedding(args.coreset_ratio)
    coreset_s = time.perf_counter() - start
    result.update(
        {
            "fit_cpu_s": _cpu_s() - cpu_start,
            "fit_extract_s": extract_s,
            "fit_coreset_s": coreset_s,
            "fit_s": extract_s + coreset_s,
            "bank_rows": bank_rows,
            "bank_dim": bank_dim,
            "coreset_rows": int(model.memory_bank.shape[0]),
            "coreset_s_per_train_image": coreset_s / max(len(train_paths), 1),
            "peak_rss_after_fit_mb": _rss_mb(),
            "load_average_after_fit": _load(),
        }
    )
    _log(f"fit done: extract {extract_s:.1f} s, coreset {coreset_s:.1f} s")

    # ---- predict: Engine.predict's forward in eval mode --------------------------------
    if test_paths:
        model.eval()
        scores = []
        cpu_start = _cpu_s()
        start = time.perf_counter()
        with torch.no_grad():
            for batch in _batches(test_paths, transform, args.batch_size, device):
                out = model(batch)
                scores.extend(float(s) for s in out.pred_score.reshape(-1).cpu())
        predict_s = time.perf_counter() - start
        result.update(
            {
                "predict_cpu_s": _cpu_s() - cpu_start,
                "predict_s": predict_s,
                "predict_images_per_s": len(test_paths) / predict_s,
                "image_scores": scores,
                "anomaly_map_shape": list(out.anomaly_map.shape[1:]),
                "load_average_after_predict": _load(),
            }
        )
        _log(f"predict: {len(test_paths) / predict_s:.2f} images/s")
    result["peak_rss_mb"] = _rss_mb()
    result["peak_memory_note"] = "ru_maxrss of this process (resident-set high-water mark, MiB)"
    return result


def _predict_only(args, model, transform, test_paths, device, result: dict) -> dict:
    """Predict timing only: the memory bank is ``--bank-rows`` x ``--bank-dim`` seeded random
    rows (the shape of the coreset of a fit; the search cost depends on the shape only), one
    untimed warm-up batch, then every test image timed as in :func:`run`."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    model.memory_bank = torch.randn(args.bank_rows, args.bank_dim, generator=generator).to(device)
    model.eval()
    with torch.no_grad():
        model(next(_batches(test_paths[: args.batch_size], transform, args.batch_size, device)))  # warm-up
        cpu_start = _cpu_s()
        start = time.perf_counter()
        for batch in _batches(test_paths, transform, args.batch_size, device):
            model(batch)
        predict_s = time.perf_counter() - start
    result.update(
        {
            "mode": "predict only (random bank of the coreset's shape)",
            "bank_rows": args.bank_rows,
            "bank_dim": args.bank_dim,
            "predict_cpu_s": _cpu_s() - cpu_start,
            "predict_s": predict_s,
            "predict_images_per_s": len(test_paths) / predict_s,
            "load_average_after_predict": _load(),
            "peak_rss_mb": _rss_mb(),
        }
    )
    _log(f"predict only: {len(test_paths) / predict_s:.2f} images/s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-list", default=None, help="text file: one training image path a line")
    parser.add_argument("--test-list", default=None, help="text file: one test image path a line (predict timing)")
    parser.add_argument(
        "--preprocessing",
        required=True,
        help='JSON: {"resize": int, "crop": int, "interpolation": "bilinear", "mean": [...], "std": [...]}',
    )
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--layers", nargs="+", default=["layer2", "layer3"])
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--num-neighbors", type=int, default=9, help="anomalib's default")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bank-rows", type=int, default=0, help="predict timing only: a random memory bank of this many rows (no fit)"
    )
    parser.add_argument("--bank-dim", type=int, default=1536, help="columns of that bank (layer2 + layer3: 1536)")
    args = parser.parse_args(argv)
    if not args.bank_rows and not args.train_list:
        parser.error("--train-list is required (unless --bank-rows is given for a predict-only timing)")
    if args.bank_rows and not args.test_list:
        parser.error("--bank-rows (predict only) needs --test-list")
    if not 0 < args.coreset_ratio <= 1:
        parser.error(f"--coreset-ratio must be in (0, 1], got {args.coreset_ratio}")
    result = run(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
