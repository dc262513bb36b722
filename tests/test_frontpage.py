"""The front page and the findings it opens with, from tiny generated metrics files: data sets
are the ones the metrics name (never cell names), settings are read from the metrics, each seed
work's table is there with its published rows labelled, and a method registered later appears
without a change to the page's code."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from test_comparison import SOURCES, _clustering, _detection, _write, project  # noqa: F401 (fixture)

from anomalib_study import comparison, findings, findings_html, frontpage, methods
from anomalib_study.published import DN2_ACCURACY, PATCHCORE
from anomalib_study.seed_tables import SeedTable


def _per_image(labels, predicted):
    return [
        {"path": f"p{i}", "label": y, "predicted": p, "score": float(p)}
        for i, (y, p) in enumerate(zip(labels, predicted))
    ]


@pytest.fixture
def study(tmp_path):
    """Reports whose cell names and study keys are not data set names: PatchCore on KolektorSDD
    under the key "kolektorsdd-322" in cell "kolektorsdd-322-keep-coreset10", two settings; kNN on
    two MVTec AD categories and the OOD set; both autoencoders; anomaly clustering."""
    reports = tmp_path / "reports"
    patchcore = reports / "02_patchcore"
    for cell, key, side, mode, ratio, auroc in (
        ("kolektorsdd-322-keep-coreset10", "kolektorsdd-322", 322, "keep", 0.1, 0.94),
        ("kolektorsdd-b1", "kolektorsdd", 224, "squash", 0.01, 0.86),
    ):
        metrics = _detection(
            "patchcore", key, "kolektorsdd", "kolektorsdd", "b1", auroc, variant=cell.split("-", 1)[1], pixel_auroc=0.9
        )
        metrics["_run"]["backbone"] = "b1"
        metrics["backbone"].update(image_size=side, preprocessing={"resize_mode": mode})
        metrics["params"]["coreset_ratio"] = ratio
        metrics["dataset"]["has_masks"] = True
        _write(patchcore, cell, metrics)
    _write(patchcore, "bottle-b1", _detection("patchcore", "bottle", "mvtec_ad", "mvtec_ad/bottle", "b1", 0.99))
    knn = reports / "01_knn_detection"
    for category, labels, predicted in (("bottle", (0, 1, 1), (0, 1, 0)), ("transistor", (0, 0, 1), (1, 0, 1))):
        metrics = _detection("knn", f"mvtec_ad-{category}", "mvtec_ad", f"mvtec_ad/{category}", "b1", 0.8)
        metrics["per_image"] = _per_image(labels, predicted)
        metrics["k_sweep"] = [{"k": 1, "image_auroc": 0.9}, {"k": 100, "image_auroc": 0.8}]
        _write(knn, f"mvtec_ad-{category}-b1", metrics)
    _write(knn, "ood-b1", _detection("knn", "ood", "ood", "ood/magnetic_tile", "b1", 0.99))  # no predictions kept
    autoencoders = reports / "03_autoencoder"
    for model, auroc in (("conv", 0.7), ("pretrained", 0.75)):
        metrics = _detection(
            "autoencoder",
            "bottle",
            "mvtec_ad",
            "mvtec_ad/bottle",
            "b1",
            auroc,
            variant=model,
            fit_timings={"train_s": 90},
        )
        metrics["params"].update(model=model, loss="mse_ssim")
        metrics["_run"]["backbone"] = "" if model == "conv" else "b1"
        _write(autoencoders, f"mvtec_ad-bottle-{model}", metrics)
    _write(reports / "04_anomaly_clustering", "bottle-b1", _clustering("bottle", "mvtec_ad/bottle", "mvtec_ad", "b1"))
    return reports


def _sources(frame: pd.DataFrame) -> list:
    column = next(c for c in frame.columns if (c[0] if isinstance(c, tuple) else c) == "source")
    return list(frame[column])


def _runs(reports):
    table = comparison.collect_reports(reports, sources_hash=SOURCES)
    return table, findings.annotate(table)


def test_headline_rows_are_data_sets_and_settings_come_from_the_metrics(study):
    table, runs = _runs(study)
    headline = findings.headline_table(runs)
    assert set(headline["data_set"]) == {"kolektorsdd", "mvtec_ad/bottle", "mvtec_ad/transistor", "ood/magnetic_tile"}
    assert not set(headline["data_set"]) & set(table["cell"]) and "kolektorsdd-322" not in set(headline["data_set"])
    best = headline[(headline["data_set"] == "kolektorsdd") & (headline["family"] == "PatchCore")].iloc[0]
    assert best["image_auroc"] == 0.94 and best["n_settings"] == 2
    assert best["setting"] == "b1 · 322 px keep · coreset 10 %"  # read from backbone and params, not the cell name
    assert findings.families(headline) == [
        "kNN (DN2)",
        "PatchCore",
        "convolutional autoencoder",
        "pretrained-encoder autoencoder",
    ]
    text = findings.headline_text(headline)
    assert list(text.index) == ["kolektorsdd", "mvtec_ad/bottle", "mvtec_ad/transistor", "ood/magnetic_tile"]
    assert text.loc["kolektorsdd", "PatchCore"].startswith("0.940 (b1 · 322 px keep · coreset 10 %; pixel 0.900")


def test_autoencoder_families_come_from_each_reports_model(study):
    _, runs = _runs(study)
    autoencoders = runs[runs["method"] == "autoencoder"].set_index("cell")
    assert autoencoders.loc["mvtec_ad-bottle-conv", "family"] == "convolutional autoencoder"
    assert autoencoders.loc["mvtec_ad-bottle-pretrained", "family"] == "pretrained-encoder autoencoder"
    assert autoencoders.loc["mvtec_ad-bottle-conv", "backbone"] == findings.NO_BACKBONE
    matrix = findings.heatmap_matrix(runs)
    assert list(matrix.columns) == ["kolektorsdd", "mvtec_ad/bottle", "mvtec_ad/transistor", "ood/magnetic_tile"]
    assert "convolutional autoencoder" in matrix.index and "pretrained-encoder autoencoder · b1" in matrix.index
    assert matrix.loc["PatchCore · b1", "kolektorsdd"] == 0.94  # the best of its settings


def test_every_seed_table_has_ours_and_the_published_figures_labelled(study):
    _, runs = _runs(study)
    seeds = findings.seed_tables(runs)
    assert [s.method for s in seeds] == ["knn", "patchcore", "autoencoder", "clustering"]
    for seed in seeds:
        sources = [s for _, frame in seed.tables for s in _sources(frame)]
        assert any(str(s).startswith("this study") for s in sources), seed.method
        assert any(str(s).startswith("published") for s in sources), seed.method
    knn = seeds[0]
    mvtec = next(frame for caption, frame in knn.tables if caption.startswith("MVTec"))
    ours = mvtec[mvtec["source"].str.startswith("this study")].set_index("class")
    assert ours.loc["accuracy", "support"] == 6 and ours.loc["accuracy", "f1-score"] == pytest.approx(4 / 6)  # pooled
    assert ours.loc["normal", "support"] == 3 and ours.loc["anomalous", "recall"] == pytest.approx(2 / 3)
    published = mvtec[mvtec["source"].str.startswith("published")].iloc[0]
    assert published["f1-score"] == DN2_ACCURACY["MVTec"] and published["precision"] is None  # never invented
    assert any("01_knn_detection/ood-b1" in note and "rerun" in note for note in knn.notes)
    patchcore = seeds[1].tables[0][1]
    paper = patchcore[patchcore["source"].str.startswith("published")].set_index("data set")
    assert paper.loc["mvtec_ad/bottle", "image AUROC"] == PATCHCORE["mvtec_ad/bottle"]["image_auroc"]
    autoencoder = seeds[2].tables[0][1]
    assert {"hazelnut", "zipper", "mvtec_ad/bottle", "training"} <= set(autoencoder.columns)
    assert set(autoencoder.loc[autoencoder["source"].str.startswith("published"), "hazelnut"]) >= {"0.70-0.80"}
    clustering = seeds[3].tables[0][1]
    assert ("unsupervised", "NMI") in clustering.columns and ("average", "NMI") in clustering.columns


def test_front_page_opens_with_the_findings_and_lists_every_report_collapsed(study):
    skipped = {("01_knn_detection", "kolektorsdd-b1"): "needs the real data"}
    page = frontpage.write_index(study, skipped=skipped, sources_hash=SOURCES).read_text()
    assert page == frontpage.write_index(study, skipped=skipped, sources_hash=SOURCES).read_text()  # deterministic
    assert len(page.encode()) < 600_000
    order = [page.index(f"id='{anchor}'") for anchor in ("found", "glance", "seed", "plots", "ablations", "reports")]
    assert order == sorted(order)
    assert page.index("report(s):") > page.index("id='reports'")  # the status line tops its own section
    assert "id='ablation-k'" in page and "k = 100" in page
    glance = re.sub(r"href='[^']*'", "", page[page.index("id='glance'") : page.index("id='seed'")])  # links aside
    assert "kolektorsdd-322" not in glance and "<b>kolektorsdd</b>" in glance and "0.940" in glance
    for method in ("knn", "patchcore", "autoencoder", "clustering"):
        section = page.split(f"id='seed-{method}'")[1].split("<h3")[0]
        assert "<tr class='published'>" in section and "this study" in section, method
    assert page.count("<details") == 4 and "<details open" not in page
    assert "skipped in the last run: needs the real data" in page
    assert "<script" not in page and not re.search(r"(src|href)=['\"]https?:", page)


def test_the_autoencoder_repeatability_benchmark_is_a_finding_when_present(study):
    import json

    page = frontpage.write_index(study, sources_hash=SOURCES).read_text()
    assert "spread from training alone" not in page  # no benchmark report: no finding
    bench = {
        "quick": False,
        "cell": "kolektorsdd-pretrained-efficientnet_lite0",
        "runs": [{"seed": s, "threads": t} for t in (1, 2) for s in (0, 1, 2)],
        "all_runs": {"image_auroc": {"min": 0.5587, "max": 0.6593, "range": 0.1006}},
        "machine": {"cpu": "Some CPU"},
    }
    (study / "benchmarks").mkdir()
    (study / "benchmarks" / "ae_reproducibility.json").write_text(json.dumps(bench))
    page = frontpage.write_index(study, sources_hash=SOURCES).read_text()
    findings_list = page.split("<ul class='findings'>")[1].split("</ul>")[0]
    assert (
        "<li>Autoencoder figures carry a spread from training alone: kolektorsdd-pretrained-efficientnet_lite0 "
        "trained 6 times (seeds 0, 1, 2 x 1 and 2 thread(s), Some CPU) gave image AUROC 0.559-0.659; " in findings_list
    )
    assert "<a href='benchmarks/ae_reproducibility.json'>" in findings_list
    (study / "benchmarks" / "ae_reproducibility.json").write_text(json.dumps({**bench, "quick": True}))
    assert "spread from training alone" not in frontpage.write_index(study, sources_hash=SOURCES).read_text()
    (study / "benchmarks" / "ae_reproducibility.json").write_text("{not json")
    assert "spread from training alone" not in frontpage.write_index(study, sources_hash=SOURCES).read_text()


def test_front_page_stays_small_with_many_reports(tmp_path):
    for i in range(40):
        _write(
            tmp_path / "01_knn_detection",
            f"set{i:02d}-b{i % 2}",
            _detection("knn", f"set{i // 2:02d}", "dagm", f"d{i // 2:02d}", f"b{i % 2}", 0.5 + i / 100),
        )
    page = frontpage.write_index(tmp_path, sources_hash=SOURCES)
    assert page.stat().st_size < 600_000
    assert "40 report(s): 40 ok" in page.read_text()


def toy_seed_table(runs: pd.DataFrame) -> SeedTable:
    """The seed table of the toy method registered by the test below."""
    rows = [
        {"source": "this study", "AUROC": float(runs["image_auroc"].max())},
        {"source": "published (toy)", "AUROC": 0.5},
    ]
    return SeedTable("toy", "Toy seed table", "A toy.", [("", pd.DataFrame(rows, dtype=object))], summary="Toy found.")


def test_a_method_registered_later_appears_without_a_change_to_the_page(study):
    entry = methods.MethodEntry(
        "toy", "nowhere.toy:SPEC", "Toy detector", "detection", seed_table="test_frontpage:toy_seed_table"
    )
    methods.register(entry)
    try:
        metrics = _detection("toy", "bottle", "mvtec_ad", "mvtec_ad/bottle", "b1", 0.66)
        _write(study / "06_toy", "bottle-b1", metrics)
        page = frontpage.write_index(study, sources_hash=SOURCES).read_text()
        glance = page[page.index("id='glance'") : page.index("id='seed'")]
        assert "<th>Toy detector</th>" in glance and "0.660" in glance
        assert "Toy seed table" in page and "Toy found." in page and "published (toy)" in page
        _, runs = _runs(study)
        assert "Toy detector · b1" in findings.heatmap_matrix(runs).index
    finally:
        methods.unregister("toy")


def test_table_html_spans_groups_and_marks_published_rows():
    frame = pd.DataFrame(
        [["a", "this study", 0.5, None], ["a", "published (x)", 0.25, 3], ["b", "this study", float("nan"), 4]],
        columns=["data set", "source", ("m", "NMI"), ("m", "n")],
        dtype=object,
    )
    html = findings_html.table_html(frame)
    assert "<th colspan='2'>m</th>" in html and "<th rowspan='2'>data set</th>" in html
    assert "<td rowspan='2' class='group'>a</td>" in html and html.count("<tr class='published'>") == 1
    assert "<td class='num'>0.500</td>" in html and "<td class='num'>3</td>" in html and html.count(">-<") == 2


def test_the_registry_hooks_resolve_and_a_bad_one_is_refused():
    for name, entry in methods.REGISTRY.items():
        if entry.seed_table:
            assert callable(methods.seed_table(name)), name
        assert bool(entry.families) == bool(entry.family_param), name
    assert methods.method_families("autoencoder") == ["convolutional autoencoder", "pretrained-encoder autoencoder"]
    assert methods.method_family("autoencoder", {"model": "pretrained"}) == "pretrained-encoder autoencoder"
    assert methods.method_family("knn", {"k": 5}) == "kNN (DN2)" and methods.method_families("knn") == ["kNN (DN2)"]
    with pytest.raises(methods.ParameterError, match="seed_table must read 'module:attribute'"):
        methods.MethodEntry("bad", "a:b", "bad", seed_table="no_colon")
