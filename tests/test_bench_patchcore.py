"""Smoke tests of benchmarks/bench_patchcore.py, OUR side only (never needs anomalib's venv).

Tiny generated Magnetic-tile trees and hand-computed ratios and floors; the runs of our
PatchCore use a random ResNet-18 on a few 64 px images (seconds), with a small
matrix-product probe (bf16 is emulated, and slow, on CPUs without it).
"""

from __future__ import annotations

import importlib.util
import json
import os
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
    ours = {
        "fit_s": 10.0,
        "fit_coreset_s": 2.0,
        "predict_images_per_s": 4.0,
        "peak_rss_mb": 900.0,
        "rss_after_imports_mb": 500.0,
    }
    theirs = {
        "fit_s": 150.0,
        "fit_coreset_s": 100.0,
        "predict_images_per_s": 0.8,
        "peak_rss_mb": 3000.0,
        "rss_before_model_mb": 1000.0,
    }
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
    assert bench.quadratic_extrapolation(sizes, seconds, 300) == pytest.approx(0.01 * 300**2 + 600)
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
    code = bench.main(
        [
            "--our-side",
            "--train-list",
            str(tmp_path / "train.txt"),
            "--test-list",
            str(tmp_path / "test.txt"),
            "--backbone",
            "resnet18",
            "--weights",
            str(resnet18_random),
            "--layers",
            "layer2",
            "layer3",
            "--coreset-ratio",
            "0.5",
            "--threads",
            "1",
            "--precision",
            "fp32@full",  # faiss's exhaustive search: the floor below has no re-ranking
            "--image-size",
            "64",
            "--matmul-shape",
            "64",
            "64",
            "64",
        ]
    )
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
    # the floor beside the predict timing, from this process's own throughput
    assert result["precision_used"] == "fp32" and result["matmul_throughput"]["shape_mkn"] == [64, 64, 64]
    floor = result["floor"]
    assert floor["precision"] == "fp32" and floor["throughput_gflops"] == result["matmul_throughput"]["fp32_gflops"]
    # 2 test images x (64 patches + 1 support query) x 96 bank rows x 384 dims, 2 FLOPs each, no re-ranking
    assert floor["search_gflop"] == pytest.approx(2 * 2 * 65 * 96 * 384 / 1e9)
    assert floor["floor_s"] == pytest.approx(floor["forward_floor_s"] + floor["search_floor_s"])
    assert result["limit_ratio"] == pytest.approx(result["predict_s"] / floor["floor_s"])
    assert 0 <= result["rerank_hit_rate"]["hit_rate"] <= 1 and result["rerank_hit_rate"]["n_queries"] == 128
    # a setting with fewer search dimensions: its floor counts 32 of the 384 columns, the projection, 8 re-ranked
    code = bench.main(
        [
            "--our-side",
            "--train-list",
            str(tmp_path / "train.txt"),
            "--test-list",
            str(tmp_path / "test.txt"),
            "--backbone",
            "resnet18",
            "--weights",
            str(resnet18_random),
            "--layers",
            "layer2",
            "layer3",
            "--coreset-ratio",
            "0.5",
            "--threads",
            "1",
            "--image-size",
            "64",
            "--matmul-shape",
            "64",
            "64",
            "64",
            "--precision",
            "fp32@32",
        ]
    )
    assert code == 0
    projected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert projected["parameters"]["search_dim"] == 32 and projected["precision_used"] == "fp32"
    q = 2 * 65
    assert projected["floor"]["search_gflop"] == pytest.approx(
        (2 * q * 96 * 32 + 2 * q * 384 * 32 + 3 * q * 8 * 384) / 1e9
    )
    assert 0 <= projected["rerank_hit_rate"]["hit_rate"] <= 1


def test_floor_and_search_flops_by_hand():
    assert bench.search_flops(10, 100, 8) == {"products": 16000, "projection": 0, "rerank": 0}
    assert bench.search_flops(10, 100, 8, rerank=4) == {"products": 16000, "projection": 0, "rerank": 960}
    # candidates from 2 of the 8 dimensions: a quarter of the products, plus projecting the queries
    assert bench.search_flops(10, 100, 8, rerank=4, candidate_dim=2) == {
        "products": 4000,
        "projection": 320,
        "rerank": 960,
    }
    assert bench.search_flops(10, 100, 8, candidate_dim=16)["products"] == 16000  # never more than d
    throughput = {"fp32_gflops": 100.0, "bf16_gflops": 400.0}
    searched = {"products": 8e9, "rerank": 1e9}
    fp32 = bench.physical_floor(10, int(2e9), searched, throughput, "fp32")
    assert fp32["forward_floor_s"] == pytest.approx(0.2) and fp32["search_floor_s"] == pytest.approx(0.09)
    assert fp32["floor_s"] == pytest.approx(0.29) and fp32["forward_gflop"] == pytest.approx(20.0)
    bf16 = bench.physical_floor(10, int(2e9), searched, throughput, "bf16")
    # forward and products at the bf16 rate, the float32 re-ranking at the fp32 rate
    assert bf16["forward_floor_s"] == pytest.approx(0.05) and bf16["search_floor_s"] == pytest.approx(0.02 + 0.01)
    projected = bench.physical_floor(10, int(2e9), {**searched, "projection": 2e9}, throughput, "bf16")
    # the query projection runs in float32 too
    assert projected["search_floor_s"] == pytest.approx(0.02 + 0.01 + 0.02) and projected["search_gflop"] == 11.0


def test_settings_name_a_precision_and_optional_search_dimensions(capsys):
    assert bench.parse_setting("fp32") == ("fp32", "default") and bench.parse_setting("bf16@256") == ("bf16", 256)
    assert bench.parse_setting("fp32@full") == ("fp32", None)
    assert bench.parse_setting("auto@64") == ("auto", 64)
    for bad in ("fp16", "bf16@", "bf16@0", "bf16@x", "@256"):
        with pytest.raises(StudyError, match="unknown setting"):
            bench.parse_setting(bad)
    assert bench.main(["--quick", "--precisions", "bf16@0"]) == 2
    assert "unknown setting 'bf16@0'" in capsys.readouterr().err


def test_forward_flops_are_counted_not_typed():
    import torch

    # a one-convolution stand-in with the Backbone call signature: 2 * C_out * C_in * k^2 * H_out * W_out FLOPs
    class Tiny(torch.nn.Module):
        image_size = 8
        device = torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x, layers=None, embedding=True):
            return {"c": self.conv(x)}

    assert bench.forward_flops_per_image(Tiny(), ["c"]) == 2 * 4 * 3 * 9 * 8 * 8


def test_matmul_throughput_and_coreset_check_keys():
    out = bench.matmul_throughput((32, 32, 32), repeats=2)
    assert out["fp32_gflops"] > 0 and out["bf16_gflops"] > 0 and 1 <= out["fp32_timed_products"] <= 2
    features = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    check = bench.coreset_precision_check(features, ratio=0.1, projection_dim=8)
    assert check["fp32"]["overlap_with_fp32"] == 1.0 and check["fp32"]["covering_radius_vs_fp32"] == 1.0
    for precision in ("bf16", "fp16"):
        assert 0 <= check[precision]["overlap_with_fp32"] <= 1 and check[precision]["n_centres"] == 40
        assert check[precision]["covering_radius_vs_fp32"] > 0 and check[precision]["seconds"] > 0


@pytest.mark.slow
def test_quick_run_writes_both_precisions(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    assert os.environ["ANOMALIB_STUDY_PATCH_CACHE_GB"] == "0"  # every round extracts its own patch features
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["precisions"] == ["fp32", "bf16"]
    assert isinstance(report["machine"]["native_bf16"], bool) and report["machine"]["cpu_capability"]
    for precision in ("fp32", "bf16"):
        ours = report["ours_by_precision"][precision]
        assert ours["precision_used"] == precision and ours["limit_ratio"] > 0
        assert report["limit_ratio"][precision] == ours["limit_ratio"]
        assert report["rerank_hit_rate"][precision] == ours["rerank_hit_rate"]["hit_rate"]
        assert report["predict_only_by_precision"][precision]["floor"]["floor_s"] > 0
    assert report["coreset_precision"]["bf16"]["n_centres"] == report["coreset_precision"]["fp32"]["n_centres"]
    assert "limit_ratio" in capsys.readouterr().out
    assert bench.main(["--quick", "--precisions"]) == 2  # nothing to measure: a clear refusal


def test_bad_weights_file_is_one_clear_error(tmp_path, capsys):
    data = _magnetic_tile(tmp_path)
    train, test = bench.magnetic_tile_lists(data, n_train=2, n_test=1)
    bench.write_list(train, tmp_path / "train.txt")
    code = bench.main(
        [
            "--our-side",
            "--train-list",
            str(tmp_path / "train.txt"),
            "--backbone",
            "resnet18",
            "--weights",
            str(tmp_path / "missing.pth"),
        ]
    )
    assert code == 2
    assert "missing.pth" in capsys.readouterr().err


def test_our_predict_only_side_and_the_headline_uses_the_side_by_side_timing(tmp_path, resnet18_random, capsys):
    data = _magnetic_tile(tmp_path)
    _, test = bench.magnetic_tile_lists(data, n_train=3, n_test=2)
    bench.write_list(test, tmp_path / "test.txt")
    code = bench.main(
        [
            "--our-side",
            "--test-list",
            str(tmp_path / "test.txt"),
            "--backbone",
            "resnet18",
            "--weights",
            str(resnet18_random),
            "--layers",
            "layer2",
            "layer3",
            "--threads",
            "1",
            "--precision",
            "fp32@full",
            "--bank-rows",
            "100",
            "--matmul-shape",
            "64",
            "64",
            "64",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 224 px -> layer2 grid 28 x 28 = 784 patches an image: 100 rows round up to one image's worth
    assert result["bank_rows"] == 784 and result["bank_dim"] == 384 and result["predict_images_per_s"] > 0
    assert result["precision_used"] == "fp32" and result["limit_ratio"] > 0
    assert "rerank_hit_rate_random_bank" not in result  # measured only where the search ran in bf16
    side = {
        "50": {
            "predict_speedup": 1.5,
            "ours_by_precision": {
                "fp32": {"predict_speedup": 1.5, "limit_ratio": 4.0},
                "bf16": {"predict_speedup": 2.5, "limit_ratio": 2.0},
            },
        }
    }
    report = bench.build_report([], [], {}, "now", side)
    assert report["predict_speedup"] == {"50": 1.5} and report["predict_speedup_source"] == "predict_side_by_side"
    assert report["predict_speedup_by_precision"] == {"fp32": {"50": 1.5}, "bf16": {"50": 2.5}}
    assert report["limit_ratio"] == {"fp32": {"50": 4.0}, "bf16": {"50": 2.0}}
    assert report["precisions"] == ["bf16", "fp32"]
    assert bench.build_report([], [], {}, "now")["predict_speedup_source"].startswith("comparison")


def test_report_and_tables_carry_both_precisions(capsys):
    theirs = {"fit_s": 300.0, "predict_images_per_s": 1.0, "peak_rss_mb": 2000.0, "fit_coreset_s": 200.0}

    def ours(fit_s, images_per_s, limit, hit):
        return {
            "fit_s": fit_s,
            "predict_s": 50 / images_per_s,
            "predict_images_per_s": images_per_s,
            "peak_rss_mb": 1000.0,
            "fit_coreset_s": 10.0,
            "limit_ratio": limit,
            "floor": {"floor_s": 1.0},
            "rerank_hit_rate": {"hit_rate": hit},
        }

    mine = {"fp32": ours(15.0, 3.0, 2.0, 1.0), "bf16": ours(10.0, 6.0, 1.2, 0.99)}
    row = {
        "n_train": 300,
        "n_test": 50,
        "anomalib": theirs,
        "ours": mine["fp32"],
        "ratios": bench.ratios(mine["fp32"], theirs),
        "ours_by_precision": mine,
        "ratios_by_precision": {p: bench.ratios(m, theirs) for p, m in mine.items()},
    }
    report = bench.build_report([row], [], {}, "now")
    assert report["fit_speedup_by_precision"] == {"fp32": {"300": 20.0}, "bf16": {"300": 30.0}}
    assert report["peak_memory_ratio_by_precision"]["bf16"] == {"300": 0.5}
    assert report["limit_ratio_in_fit_runs"] == {"fp32": {"300": 2.0}, "bf16": {"300": 1.2}}
    assert report["rerank_hit_rate"] == {"fp32": {"300": 1.0}, "bf16": {"300": 0.99}}
    assert report["goals"]["limit_ratio_of_our_predict"] == "<= 1.5"
    report["coreset_precision"] = bench.coreset_precision_check(
        np.random.default_rng(1).normal(size=(200, 8)).astype(np.float32), ratio=0.1, projection_dim=4
    )
    bench.print_tables(report)
    printed = capsys.readouterr().out
    assert "Our fit + predict by precision" in printed and "bf16" in printed and "Greedy coreset" in printed


def test_scaling_table_not_measured_again_is_carried_over_and_labelled(tmp_path):
    """--scaling-sizes with no sizes: the earlier report's scaling table is kept, with the date of the run that
    measured it; nothing is invented when the earlier report had none (or there is none)."""
    report = bench.build_report([], [], {}, "now")
    bench.carry_over_scaling(report, tmp_path / "missing.json")
    assert report["scaling"] == [] and "scaling_carried_over" not in report
    previous = tmp_path / "patchcore.json"
    previous.write_text(
        json.dumps(
            {
                "started": "2026-11-23T18:56:18",
                "machine": {"cpu_count": 2},
                "scaling": [{"backbone": "x", "n_train": 100, "fit_s": 1.0}],
                "scaling_memory_check": {"ok": True},
            }
        )
    )
    bench.carry_over_scaling(report, previous)
    assert report["scaling"] == [{"backbone": "x", "n_train": 100, "fit_s": 1.0}]
    assert report["scaling_memory_check"] == {"ok": True}
    assert report["scaling_carried_over"]["from_run_started"] == "2026-11-23T18:56:18"
    assert any("carried over" in note for note in report["notes"])
    # carried over again: still the run that measured it, not the report that carried it
    previous.write_text(json.dumps({**report, "started": "2026-12-06T22:31:37"}))
    again = bench.build_report([], [], {}, "later")
    bench.carry_over_scaling(again, previous)
    assert again["scaling_carried_over"]["from_run_started"] == "2026-11-23T18:56:18"
    assert again["scaling_carried_over"]["machine"] == {"cpu_count": 2}
    assert any("2026-11-23T18:56:18" in note for note in again["notes"])
    empty = bench.build_report([], [], {}, "now")
    previous.write_text(json.dumps({"started": "then", "scaling": []}))
    bench.carry_over_scaling(empty, previous)
    assert "scaling_carried_over" not in empty


def test_coreset_rate_profile_reads_tqdm_and_gives_the_undisturbed_estimate():
    """Steps per second per minute of anomalib's coreset loop, from its progress log: a minute slowed to half speed
    shows, and the loop's time at the fastest sustained rate is the conservative estimate."""
    lines, done, t = [], 0, 0
    for minute in range(5):
        rate = 5 if minute == 2 else 10  # the third minute ran beside another process
        for _ in range(6):  # an update every 10 s
            t += 10
            done += rate * 10
            lines.append(
                f"Selecting Coreset Indices.:  50%|#####     | {done}/2700 [{t // 60:02d}:{t % 60:02d}<00:10, "
                f"{rate}.00it/s]"
            )
    profile = bench.coreset_rate_profile("\r".join(lines))
    assert profile["rates"] == [10.0, 10.0, 5.0, 10.0, 10.0] and profile["steps"] == 2700
    assert profile["p90_rate"] == 10.0 and profile["median_rate"] == 10.0 and profile["slowest_rate"] == 5.0
    assert profile["seconds_below_80pct_of_p90"] == 60.0 and profile["coreset_s_at_p90_rate"] == 270.0
    assert bench.coreset_rate_profile("no progress here") is None
    # hours in the elapsed time
    assert (
        bench.coreset_rate_profile(
            "Selecting Coreset Indices.:  1%|| 10/99 [1:00:00<1:00:00, 1it/s]"
            "Selecting Coreset Indices.:  2%|| 100/99 [1:02:00<0:00, 1it/s]"
        )["steps"]
        == 99
    )
    theirs = {"fit_s": 400.0, "fit_coreset_s": 300.0, "coreset_rate_profile": profile}
    ratios = bench.ratios({"fit_s": 37.0}, theirs)
    assert ratios["fit_speedup"] == pytest.approx(400 / 37) and ratios[
        "fit_speedup_at_anomalib_p90_rate"
    ] == pytest.approx(370 / 37)
    assert bench.ratios({"fit_s": 37.0}, {"fit_s": 400.0})["fit_speedup_at_anomalib_p90_rate"] is None
