"""`anomalib-study cluster` / cluster_folder on a folder of generated defect images of three kinds."""

from __future__ import annotations

import json
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


def test_cluster_groups_the_kinds_and_writes_its_files(tmp_path, capsys):
    kinds = _defects(tmp_path / "rejected")
    (tmp_path / "rejected" / "broken.png").write_bytes(b"\x89PNG not really")
    code, run = _run(tmp_path, "--n-clusters", "3", "--normal-dir", str(_normals(tmp_path / "normal")))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1 of 19 images could not be read" in captured.err and "results in" in captured.out
    table = pd.read_csv(run / "clusters.csv")
    assert list(table.columns) == ["path", "cluster", "top_weight", "weight_share", "top_patch"] and len(table) == 18
    truth = [kinds[Path(p).name] for p in table.path]
    assert clustering_metrics(truth, table.cluster)["f1"] >= 0.8
    assert pd.read_csv(run / "skipped.csv").path.map(lambda p: Path(p).name).tolist() == ["broken.png"]
    assert sorted(p.name for p in run.glob("cluster_*.jpg")) == ["cluster_0.jpg", "cluster_1.jpg", "cluster_2.jpg"]
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["mode"] == "semi_supervised" and config["n_clusters_rule"] == "given: 3"
    assert config["n_skipped"] == 1 and config["n_clustered"] == 18 and "label-free" in config["tau_rule"]


def test_cluster_chooses_the_number_and_says_how(tmp_path, capsys):
    _defects(tmp_path / "rejected", n_per=5)
    code, run = _run(tmp_path, "--max-clusters", "6")
    out = capsys.readouterr().out
    assert code == 0 and "silhouette" in out and "unsupervised" in out
    config = json.loads((run / "config.json").read_text())
    assert 2 <= config["n_clusters"] <= 6 and sorted(config["silhouette"]) == [str(k) for k in range(2, 7)]
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
