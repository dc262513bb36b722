"""Smoke tests of benchmarks/bench_patchcore.py, OUR side only (never needs anomalib's venv).

Tiny generated Magnetic-tile trees and hand-computed ratios; the one run of our PatchCore
uses a random ResNet-18 on a few 64 px images (seconds).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_study.errors import DataError, ParameterError, StudyError

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_patchcore", REPO / "benchmarks" / "bench_patchcore.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_patchcore"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _tile(path: Path, seed: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _magnetic_tile(root: Path, n_free: int = 8, n_train: int = 6, n_defect: int = 4) -> Path:
    """root/magnetic_tile with MT_Free (n_free, n_train listed for training) and MT_Blowhole."""
    base = root / "magnetic_tile"
    names = [f"exp0_num_{i}.jpg" for i in range(n_free)]
    for i, name in enumerate(names):
        _tile(base / "MT_Free" / "Imgs" / name, i)
    for i in range(n_defect):
        _tile(base / "MT_Blowhole" / "Imgs" / f"exp1_num_{i}.jpg", 100 + i)
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(base / "MT_Blowhole" / "Imgs" / f"exp1_num_{i}.png")
    (base / "mtd_train_filenames.txt").write_text("\n".join(names[:n_train]) + "\n")
    return root


def test_lists_are_the_split_and_seeded(tmp_path):
    data = _magnetic_tile(tmp_path)
    train, test = bench.magnetic_tile_lists(data, n_train=4, n_test=3, seed=0)
    assert len(train) == 4 and len(test) == 3
    listed = (data / "magnetic_tile" / "mtd_train_filenames.txt").read_text().split()
    assert all(p.name in listed for p in train)
    assert not set(train) & set(test)  # never a training image among the test images
    assert test == bench.magnetic_tile_lists(data, n_train=4, n_test=3, seed=0)[1]
    assert test == sorted(test)
    # 2 held-out normals + 4 defects = 6 test images: asking for more is a clear error
    with pytest.raises(DataError, match="test images"):
        bench.magnetic_tile_lists(data, n_train=4, n_test=7)
    with pytest.raises(DataError, match="training images"):
        bench.magnetic_tile_lists(data, n_train=7, n_test=1)
    with pytest.raises(DataError, match="--data"):
        bench.magnetic_tile_lists(tmp_path / "nowhere", n_train=1, n_test=1)


def test_write_list_hash_names_the_content(tmp_path):
    first = bench.write_list([tmp_path / "a.jpg", tmp_path / "b.jpg"], tmp_path / "l.txt")
    assert (tmp_path / "l.txt").read_text().splitlines() == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    assert first != bench.write_list([tmp_path / "b.jpg", tmp_path / "a.jpg"], tmp_path / "l.txt")


def test_ratios_hand_computed():
    ours = {"fit_s": 10.0, "fit_coreset_s": 2.0, "predict_images_per_s": 4.0, "peak_rss_mb": 900.0,
            "rss_after_imports_mb": 500.0}
    theirs = {"fit_s": 150.0, "fit_coreset_s": 100.0, "predict_images_per_s": 0.8, "peak_rss_mb": 3000.0,
              "rss_before_model_mb": 1000.0}
    got = bench.ratios(ours, theirs)
    assert got["fit_speedup"] == pytest.approx(15.0)
    assert got["predict_speedup"] == pytest.approx(5.0)
    assert got["peak_memory_ratio"] == pytest.approx(0.3)
    assert got["peak_memory_above_imports_ratio"] == pytest.approx(400.0 / 2000.0)
    assert got["coreset_speedup"] == pytest.approx(50.0)
    assert bench.ratios({}, theirs)["fit_speedup"] is None


def test_quadratic_extrapolation_recovers_a_quadratic():
    sizes = [50, 100, 150]
    seconds = [0.01 * n * n + 2 * n for n in sizes]
    assert bench.quadratic_extrapolation(sizes, seconds, 300) == pytest.approx(0.01 * 300 ** 2 + 600)
    # two points are enough for a*n^2 + b*n
    assert bench.quadratic_extrapolation(sizes[:2], seconds[:2], 300) == pytest.approx(1500.0)
    with pytest.raises(ParameterError, match="distinct sizes"):
        bench.quadratic_extrapolation([50, 50], [1.0, 1.0], 300)


def test_format_table():
    text = bench.format_table([{"n": 50, "x": 1.23456, "y": None}], ["n", "x", "y"])
    lines = text.splitlines()
    assert lines[0].split() == ["n", "x", "y"] and lines[1].split() == ["50", "1.23", "-"]


def test_missing_venv_is_a_clear_error(tmp_path):
    with pytest.raises(StudyError, match="setup_anomalib_venv.sh"):
        bench.anomalib_python(tmp_path / "no-venv")


@pytest.fixture(scope="module")
def resnet18_random(tmp_path_factory) -> Path:
    """A random torchvision ResNet-18 state dict (the same kind of file as the benchmark's WideResNet).

    Shapes come from the architecture built on the meta device (no slow initialisation);
    values are small Gaussians, running variances 1.
    """
    import torch
    import torchvision

    with torch.device("meta"):
        shapes = torchvision.models.resnet18(weights=None).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, value in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.ones(value.shape)
        else:
            state[key] = 0.05 * torch.randn(value.shape, generator=generator)
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(state, path)
    return path


def test_our_side_fits_and_scores_with_known_sizes(tmp_path, resnet18_random, capsys):
    """The child-process entry point (``--our-side``) on 3 + 2 tiny images, JSON on stdout."""
    data = _magnetic_tile(tmp_path)
    train, test = bench.magnetic_tile_lists(data, n_train=3, n_test=2)
    bench.write_list(train, tmp_path / "train.txt")
    bench.write_list(test, tmp_path / "test.txt")
    code = bench.main(["--our-side", "--train-list", str(tmp_path / "train.txt"), "--test-list",
                       str(tmp_path / "test.txt"), "--backbone", "resnet18", "--weights", str(resnet18_random),
                       "--layers", "layer2", "layer3", "--coreset-ratio", "0.5", "--threads", "1",
                       "--image-size", "64"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["side"] == "anomalib_study" and result["n_train"] == 3 and result["n_test"] == 2
    # 64 px -> layer2 grid 8 x 8 = 64 patches per image; D = 128 + 256
    assert result["bank_rows"] == 3 * 64 and result["bank_dim"] == 384
    assert result["coreset_rows"] == 96
    assert result["fit_s"] >= result["fit_coreset_s"] > 0
    assert result["predict_images_per_s"] > 0 and len(result["image_scores"]) == 2
    assert result["anomaly_map_shape"] == [64, 64]
    assert result["peak_rss_mb"] >= result["rss_after_imports_mb"] > 0
    assert result["bank_mb"] == pytest.approx(192 * 384 * 4 / 2**20)
    assert result["parameters"]["calibration_fraction"] == 0.0  # every training image in the bank, as anomalib
    same = bench.ratios(result, result)
    assert same["fit_speedup"] == same["predict_speedup"] == same["peak_memory_ratio"] == 1.0
    # CPU-time ratios are None where a tiny run measured 0 CPU seconds
    assert {v for v in same.values() if v is not None} == {1.0}


def test_bad_weights_file_is_one_clear_error(tmp_path, capsys):
    data = _magnetic_tile(tmp_path)
    train, test = bench.magnetic_tile_lists(data, n_train=2, n_test=1)
    bench.write_list(train, tmp_path / "train.txt")
    code = bench.main(["--our-side", "--train-list", str(tmp_path / "train.txt"), "--backbone", "resnet18",
                       "--weights", str(tmp_path / "missing.pth")])
    assert code == 2
    assert "missing.pth" in capsys.readouterr().err


def test_our_predict_only_side_and_the_headline_uses_the_side_by_side_timing(tmp_path, resnet18_random, capsys):
    data = _magnetic_tile(tmp_path)
    _, test = bench.magnetic_tile_lists(data, n_train=3, n_test=2)
    bench.write_list(test, tmp_path / "test.txt")
    code = bench.main(["--our-side", "--test-list", str(tmp_path / "test.txt"), "--backbone", "resnet18",
                       "--weights", str(resnet18_random), "--layers", "layer2", "layer3", "--threads", "1",
                       "--bank-rows", "100"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 224 px -> layer2 grid 28 x 28 = 784 patches an image: 100 rows round up to one image's worth
    assert result["bank_rows"] == 784 and result["bank_dim"] == 384 and result["predict_images_per_s"] > 0
    side = {"50": {"predict_speedup": 1.5}}
    report = bench.build_report([], [], {}, "now", side)
    assert report["predict_speedup"] == {"50": 1.5} and report["predict_speedup_source"] == "predict_side_by_side"
    assert bench.build_report([], [], {}, "now")["predict_speedup_source"].startswith("comparison")
