"""`anomalib-study cluster` / cluster_folder on a folder of generated defect images of three kinds."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anomalib_study.cli import main
from anomalib_study.metrics import clustering_metrics


def _defects(folder: Path, n_per: int = 6, seed: int = 0) -> dict[str, str]:
    """Grey textured parts with one of three defects (red spot, dark vertical scratch, bright
    corner); returns file name -> kind."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for kind in ("spot", "scratch", "corner"):
        for i in range(n_per):
            pixels = 128 + rng.normal(0, 12, (96, 96, 3))
            x, y = rng.integers(20, 70, size=2)
            if kind == "spot":
                pixels[y : y + 14, x : x + 14] = [230, 30, 30]
            elif kind == "scratch":
                pixels[5:90, x : x + 4] = 20
            else:
                pixels[:30, :30] = 250
            name = f"{kind}_{i}.png" if i % 2 else f"part{len(kinds):02d}.png"  # names do not give the kind away
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
            kinds[name] = kind
    return kinds


def _normals(folder: Path, n: int = 8, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.clip(128 + rng.normal(0, 12, (96, 96, 3)), 0, 255).astype(np.uint8)).save(
            folder / f"{i}.png"
        )
    return folder


def _run(tmp_path, *extra) -> tuple[int, Path]:
    code = main(["cluster", str(tmp_path / "rejected"), "--out", str(tmp_path / "out"), "--image-size", "64", *extra])
    runs = (
        sorted(p for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
        if (tmp_path / "out").is_dir()
        else []
    )
    return code, (runs[-1] if runs else None)


def _page_sections(run: Path) -> dict[int, int]:
    """cluster -> size, read from the sections of the run's index.html (checked self-contained)."""
    page = (run / "index.html").read_text()
    assert "<script" not in page and "http" not in page  # nothing fetched: opens offline
    sources = re.findall(r"src='([^']*)'", page)
    assert sources and all(source.startswith("data:image/") for source in sources)
    found = re.findall(r"<section class='cluster' id='cluster-\d+' data-cluster='(\d+)' data-size='(\d+)'>", page)
    return {int(k): int(size) for k, size in found}


def test_cluster_groups_the_kinds_and_writes_its_files(tmp_path, capsys):
    kinds = _defects(tmp_path / "rejected")
    (tmp_path / "rejected" / "broken.png").write_bytes(b"\x89PNG not really")
    code, run = _run(tmp_path, "--n-clusters", "3", "--normal-dir", str(_normals(tmp_path / "normal")))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 of 19 images could not be read" in captured.err and "results in" in captured.out
    table = pd.read_csv(run / "clusters.csv")
    columns = ["path", "cluster", "distance_to_centre", "top_weight", "weight_share", "top_patch"]
    assert list(table.columns) == columns and len(table) == 18
    truth = [kinds[Path(p).name] for p in table.path]
    assert clustering_metrics(truth, table.cluster)["f1"] >= 0.8
    assert pd.read_csv(run / "skipped.csv").path.map(lambda p: Path(p).name).tolist() == ["broken.png"]
    assert sorted(p.name for p in run.glob("cluster_*.jpg")) == ["cluster_0.jpg", "cluster_1.jpg", "cluster_2.jpg"]
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["mode"] == "semi_supervised" and config["n_clusters_rule"] == "given: 3"
    assert config["n_skipped"] == 1 and config["n_clustered"] == 18 and "label-free" in config["tau_rule"]
    sizes = _page_sections(run)
    assert len(sizes) == 3 and sum(sizes.values()) == 18 and sizes == table.cluster.value_counts().to_dict()
    page = (run / "index.html").read_text()
    assert "semi-supervised" in page and "broken.png" not in page and (run / "embeddings.npz").is_file()


def test_cluster_chooses_the_number_and_says_how(tmp_path, capsys):
    _defects(tmp_path / "rejected", n_per=5)
    code, run = _run(tmp_path, "--max-clusters", "6")
    out = capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert code == 0 and config["n_clusters_criterion"] in out and "unsupervised" in out
    assert 2 <= config["n_clusters"] <= 6 and sorted(config["n_clusters_scores"], key=int) == [
        str(k) for k in range(2, 7)
    ]
    assert code == 0 and len(list((tmp_path / "out").iterdir())) == 1
    code, second = _run(tmp_path, "--n-clusters", "3")  # a second run never overwrites the first
    assert code == 0 and second != run and run.is_dir()


@pytest.mark.parametrize("case", ["empty", "strict", "too_many", "too_few"])
def test_cluster_bad_input_is_one_line(tmp_path, capsys, case):
    folder = tmp_path / "rejected"
    folder.mkdir()
    extra = []
    if case == "strict":
        _defects(folder, n_per=2)
        (folder / "zero.png").write_bytes(b"")
        extra = ["--strict"]
    elif case == "too_many":
        _defects(folder, n_per=1)
        extra = ["--n-clusters", "5"]
    elif case == "too_few":
        _defects(folder, n_per=1)
        for path in list(folder.iterdir())[1:]:
            path.write_bytes(b"")
    code, run = _run(tmp_path, *extra)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and run is None
    expected = {
        "empty": "holds no image files",
        "strict": "zero.png",
        "too_many": "more than the 3 readable",
        "too_few": "1 readable image(s)",
    }[case]
    assert expected in err


def test_detect_refuses_the_clustering_method(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["detect", str(tmp_path), "--method", "clustering"])
    assert stopped.value.code == 2 and "invalid choice: 'clustering'" in capsys.readouterr().err
    from anomalib_study.detect import detect_abnormal
    from anomalib_study.errors import ParameterError

    with pytest.raises(ParameterError, match="use `anomalib-study cluster`"):
        detect_abnormal(tmp_path, method="clustering")


def test_an_out_that_is_a_file_is_refused_before_any_image_is_read(tmp_path, capsys, monkeypatch):
    from anomalib_study.data import decode

    _defects(tmp_path / "rejected", n_per=2)
    (tmp_path / "out").write_text("a file, not a folder")
    monkeypatch.setattr(
        decode, "list_images", lambda *a, **k: pytest.fail("images were listed before --out was checked")
    )
    code = main(["cluster", str(tmp_path / "rejected"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "out is a file, not a folder" in err


def test_identical_images_are_refused_and_copies_are_said(tmp_path, capsys):
    folder = tmp_path / "rejected"
    kinds = _defects(folder, n_per=2)
    first = folder / next(iter(kinds))
    copies = tmp_path / "copies"
    copies.mkdir()
    for i in range(5):
        (copies / f"copy{i}.png").write_bytes(first.read_bytes())
    code = main(["cluster", str(copies), "--out", str(tmp_path / "out1"), "--image-size", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "are all the same image (identical files): there is nothing to group" in err
    for i in range(3):
        (folder / f"again{i}.png").write_bytes(first.read_bytes())
    code, run = _run(tmp_path, "--n-clusters", "3")
    err = capsys.readouterr().err
    assert code == 0 and "3 of the 9 images" in err and "byte-for-byte copies of others" in err
    table = pd.read_csv(run / "clusters.csv")
    copies_of_first = table[table["path"].str.contains("again") | (table["path"] == str(first))]
    assert copies_of_first["cluster"].nunique() == 1  # copies share a cluster
    code, _ = _run(tmp_path, "--n-clusters", "7")
    assert code == 2 and "more than the 6 distinct images" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["cluster", "detect", "evaluate"])
def test_help_shows_words_for_values(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "METHOD_" not in out and "--model-seed SEED" in out and "--index FACTORY" in out
    if command != "detect":
        for shown in ("--tau TAU", "--n-clusters K", "--max-clusters K", "--patch-size N", "--weight-share SHARE"):
            assert shown in out


def test_from_run_regroups_without_backbone_or_images(tmp_path, capsys, monkeypatch):
    from anomalib_study import backbones, patches

    _defects(tmp_path / "rejected", n_per=5)
    code, first = _run(tmp_path, "--max-clusters", "6")
    assert code == 0
    first_config = json.loads((first / "config.json").read_text())
    first_files = {p.name: p.read_bytes() for p in first.iterdir()}
    shutil.rmtree(tmp_path / "rejected")  # a regroup reads no image
    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("a regroup loaded the backbone"))
    monkeypatch.setattr(patches, "collect_patch_features", lambda *a, **k: pytest.fail("a regroup extracted"))
    capsys.readouterr()

    def regroup(*extra) -> tuple[Path, dict]:
        before = set((tmp_path / "out").iterdir())
        assert main(["cluster", "--from", str(first), *extra]) == 0, capsys.readouterr().err
        (run,) = set((tmp_path / "out").iterdir()) - before  # a new folder beside the first run
        return run, json.loads((run / "config.json").read_text())

    run, config = regroup("--n-clusters", "4")
    assert "regrouped from" in capsys.readouterr().out
    sizes = _page_sections(run)
    assert config["n_clusters"] == 4 and len(sizes) == 4 and sum(sizes.values()) == 15
    assert config["from_run"] == str(first.resolve()) and config["n_clusters_rule"] == "given: 4"
    assert config["settings"]["mode"] == "unsupervised" and config["tau"] == first_config["tau"]
    assert pd.read_csv(run / "clusters.csv").cluster.nunique() == 4 and (run / "embeddings.npz").is_file()
    again, config = regroup()  # without --n-clusters: chosen again, as the first run chose it
    assert config["n_clusters"] == first_config["n_clusters"] and config["n_clusters_scores"]
    assert config["n_clusters_scores"] == pytest.approx(first_config["n_clusters_scores"])
    assert pd.read_csv(again / "clusters.csv").equals(pd.read_csv(first / "clusters.csv"))
    _, config = regroup("--from", str(run), "--n-clusters", "2", "--linkage", "average")  # a regroup of a regroup
    assert config["n_clusters"] == 2 and config["settings"]["linkage"] == "average"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == first_files  # the first run is left as it was


def _tiny_run(run_dir: Path) -> Path:
    """A run folder written without any backbone: 9 images of 3 kinds on a 2 x 2 grid."""
    from anomalib_study.cluster_run import ClusterRun, jpeg_bytes, save_run

    rng = np.random.default_rng(0)
    embeddings = np.repeat(np.eye(3, 4) * 10, 3, axis=0) + rng.normal(0, 0.1, (9, 4))
    thumbnail = jpeg_bytes(Image.fromarray(np.full((128, 128, 3), 128, dtype=np.uint8)))
    description = {"settings": {"mode": "unsupervised", "linkage": "ward", "max_clusters": 5, "seed": 0}}
    run = ClusterRun(
        folder=str(run_dir.parent / "images"),
        relatives=[f"{i}.png" for i in range(9)],
        embeddings=embeddings,
        weights=np.full((9, 4), 0.25),
        grid=(2, 2),
        labels=np.repeat([0, 1, 2], 3),
        thumbnails=[thumbnail] * 9,
        description={**description, "tau_rule": "given: tau = 1", "n_clusters_rule": "given: 3", "tau": 1.0},
        info={"backbone": "stub", "preprocessing": {"crop": 64}, "n_listed": 9, "skipped": {}},
    )
    save_run(run_dir / "embeddings.npz", run)
    (run_dir / "config.json").write_text("{}")
    return run_dir


def test_from_a_written_run_without_a_backbone(tmp_path):
    from anomalib_study.cluster import regroup_run

    run = regroup_run(_tiny_run(tmp_path / "runs" / "first"), n_clusters=None)
    config = json.loads((run / "config.json").read_text())
    timings = config["timings"]
    assert run.parent == tmp_path / "runs" and config["n_clusters"] == 3 and timings["page_s"] < 5
    assert timings["total_s"] >= timings["regroup_s"] + timings["page_s"]
    assert _page_sections(run) == {0: 3, 1: 3, 2: 3}


@pytest.mark.parametrize("case", ["missing", "not_a_run", "older", "damaged", "newer", "parent", "with_folder"])
def test_from_a_bad_run_is_one_line_naming_it(tmp_path, capsys, monkeypatch, case):
    from anomalib_study import cluster_run

    run = tmp_path / "out" / "20240101-000000-000000"
    extra = []
    if case == "not_a_run":
        run.mkdir(parents=True)
    elif case == "older":  # a run of the first format: no embeddings.npz
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"folder": "/data/rejects"}))
        (run / "clusters.csv").write_text("path,cluster\n")
    elif case in ("damaged", "newer", "parent", "with_folder"):
        _tiny_run(run)
        if case == "damaged":
            data = (run / "embeddings.npz").read_bytes()
            (run / "embeddings.npz").write_bytes(data[: len(data) // 2])
        elif case == "newer":
            monkeypatch.setattr(cluster_run, "RUN_VERSION", 0)
        elif case == "with_folder":
            extra = [str(tmp_path), "--tau", "0.5"]
    target = run.parent if case == "parent" else run
    code = main(["cluster", "--from", str(target), "--n-clusters", "2", *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and str(target) in errors[0]
    expected = {
        "missing": "no such folder",
        "not_a_run": "not a cluster run folder (no embeddings.npz)",
        "older": "older format (it has no embeddings.npz",
        "damaged": "embeddings.npz is incomplete or damaged",
        "newer": "written by a newer anomalib_study",
        "parent": f"pass one of them, e.g. --from {run}",
        "with_folder": "FOLDER, --tau would need them made again",
    }[case]
    assert expected in errors[0]
    if case == "older":
        assert "anomalib-study cluster /data/rejects" in errors[0]
