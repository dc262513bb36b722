"""Prints the PatchCore reports' figures beside the published ones, the coreset-ratio ablation,
the input-setting (resolution / resize-mode) ablation, the best pairs of two backbones' scores and
the fp32 / bf16 table, as Markdown.

    python scripts/results_table_patchcore.py [reports/02_patchcore]

The input-setting table is :func:`anomalib_study.comparison.settings_table` over the reports
folder (the same table notebook 05 shows); the fp32 / bf16 table is read from
``reports/benchmarks/patchcore_precision.json`` (``benchmarks/bench_patchcore_precision.py``).
The pairs table (:func:`best_pairs_table`) lives here, not in the package: it is a look at the
committed reports chosen on the test labels, not a result a report shows.
"""

import itertools
import json
import sys
from pathlib import Path

PAIR_COLUMNS = ("data", "cells", "backbones", "image_aurocs", "best_single_auroc", "fused_auroc", "gain", "n_test")


def fmt(value):
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/02_patchcore")
    print(
        "| report | data set | backbone | image AUROC (rw / max) | pixel AUROC | PRO | image F1-max | pixel F1-max | bank | published (PatchCore, WRN-50) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*.metrics.json")):
        m = json.loads(path.read_text())
        name = m["dataset"]["name"] + (" (synthetic)" if m.get("synthetic") else "")
        published = [r for r in m.get("published", [])[1:] if r.get("image_auroc") is not None]
        pub = (
            "; ".join(
                f"{r['data']} {fmt(r['image_auroc'])} / {fmt(r['pixel_auroc'])} / {fmt(r['pro'])} ({r['coreset']})"
                for r in published
            )
            or "none"
        )
        print(
            f"| {path.name.removesuffix('.metrics.json')} | {name} | {m['backbone']['name']} | {fmt(m['image_auroc_reweighted'])} / {fmt(m['image_auroc_max'])} | "
            f"{fmt(m['pixel_auroc'])} | {fmt(m['pro'])} | {fmt(m['image_f1_max'])} | {fmt(m['pixel_f1_max'])} | "
            f"{m['memory_bank_size']:,} | {pub} |"
        )
    print()
    print("Coreset-ratio ablation (at most 100 training images):")
    print(
        "| data set | backbone | coreset | bank | fit s | predict s | peak mem added MB | image AUROC rw | pixel AUROC | PRO |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*.metrics.json")):
        m = json.loads(path.read_text())
        for r in (m.get("ablation") or {}).get("rows", []):
            mem = r["peak_memory_added_mb"]
            print(
                f"| {m['dataset']['name']} | {m['backbone']['name']} | {100 * r['coreset_ratio']:g} % | {r['memory_bank_size']:,} | "
                f"{r['fit_s']:.1f} | {r['predict_s']:.1f} | {'-' if mem is None else f'{mem:.0f}'} | "
                f"{fmt(r['image_auroc_reweighted'])} | {fmt(r['pixel_auroc'])} | {fmt(r['pro'])} |"
            )

    from anomalib_study.comparison import collect_reports

    found = collect_reports(folder.parent)  # read once, for both tables
    print()
    settings(folder.parent, found)
    print()
    pairs(folder.parent, found=found)
    print()
    precision(folder.parent / "benchmarks" / "patchcore_precision.json")


def settings(reports: Path, found=None) -> None:
    """The data sets PatchCore ran with more than one input setting (notebook 05's table);
    ``found``: the reports already collected from ``reports`` (default: read them)."""
    from anomalib_study.comparison import collect_reports, settings_table

    found = collect_reports(reports) if found is None else found
    # one group per data set, whatever study key ran it (kolektorsdd, kolektorsdd-322-keep, kolektorsdd-322...)
    table = settings_table(found.assign(dataset=found["data"]))
    print("Input settings (resolution / resize mode; the main study's cells at 10 %, the ablation's at 1 %):")
    print(
        "| data set | backbone | side px | resize | coreset | image AUROC | pixel AUROC | PRO | fit s | test img/s | peak MB | cell |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(
            f"| {r.dataset} | {r.backbone} | {r.image_size:.0f} | {r.resize_mode} | {r.coreset} | {fmt(r.image_auroc)} | "
            f"{fmt(r.pixel_auroc)} | {fmt(r.pro)} | {r.fit_s:.0f} | {r.predict_images_per_s:.2f} | "
            f"{r.peak_rss_mb:.0f} | {r.cell} |"
        )


def best_pairs_table(reports, method: str = "patchcore", top: int = 3):
    """The ``top`` best pairs of two reports of ``method`` with different backbones, per data set.

    As :func:`anomalib_study.comparison.fusion_table` (each report's image scores divided by
    its calibrated threshold, the two summed), but over every report of the data set with
    numbers (``data``: every input setting, resolution and study; a report stale since the
    sources changed keeps the numbers of the code that ran), pairing each with each report of
    another backbone that scored the same test images in the same order. Ranked by the fused
    image AUROC, i.e. **chosen on the test labels**: an optimistic upper bound of what
    combining two settings gives, not a held-out result. Columns :data:`PAIR_COLUMNS`;
    ``gain`` = fused - the better report of the pair alone.
    """
    import numpy as np
    import pandas as pd

    from anomalib_study.comparison import _threshold_normalised
    from anomalib_study.metrics import image_auroc

    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    rows = []
    selected = reports[(reports["method"] == method) & reports["metrics"].notna()]
    for data, group in selected.sort_values(["data", "cell"]).groupby("data", sort=True):
        parts = []
        for report in group.itertuples():
            normalised = _threshold_normalised(report.metrics)
            if normalised is None:
                continue
            try:
                labels = [int(row["label"]) for row in report.metrics["per_image"]]
            except (KeyError, TypeError, ValueError):
                continue
            parts.append((report.cell, report.backbone, report.image_auroc, labels, *normalised))
        found = []
        for a, b in itertools.combinations(parts, 2):
            if a[1] == b[1] or a[4] != b[4]:
                continue
            fused = image_auroc(np.array(a[3]), a[5] + b[5])
            best = max(a[2], b[2])
            found.append(
                {
                    "data": data,
                    "cells": f"{a[0]} + {b[0]}",
                    "backbones": f"{a[1]} + {b[1]}",
                    "image_aurocs": f"{a[2]:.3f}, {b[2]:.3f}",
                    "best_single_auroc": best,
                    "fused_auroc": fused,
                    "gain": fused - best,
                    "n_test": len(a[3]),
                }
            )
        rows += sorted(found, key=lambda row: (-row["fused_auroc"], row["cells"]))[:top]
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def pairs(reports: Path, top: int = 3, found=None) -> None:
    """The best pairs of two backbones' reports on each data set (chosen on the test labels);
    ``found``: the reports already collected from ``reports`` (default: read them)."""
    from anomalib_study.comparison import collect_reports

    table = best_pairs_table(collect_reports(reports) if found is None else found, top=top)
    print(
        f"Two backbones' image scores combined, the best {top} pairs of any two settings per data set "
        "(each score / its calibrated threshold, summed; pairs chosen on the test labels: optimistic):"
    )
    print("| data set | cells | image AUROC each | better alone | combined | gain | test images |")
    print("|---|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(
            f"| {r.data} | {r.cells} | {r.image_aurocs} | {fmt(r.best_single_auroc)} | {fmt(r.fused_auroc)} | "
            f"{r.gain:+.3f} | {r.n_test} |"
        )


def precision(path: Path) -> None:
    """fp32 figures and the bf16 changes of every measured cell, and the re-rank hit rate."""
    if not path.is_file():
        print(f"(no {path}: run benchmarks/bench_patchcore_precision.py)")
        return
    report = json.loads(path.read_text())
    native = report.get("native_bf16_by_cell", {})
    print("fp32 -> bf16 (change = bf16 - fp32; tolerance 0.002):")
    print("| cell | image AUROC | change | pixel AUROC | change | PRO | change | re-rank hit rate | native bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in report["cells"].items():
        cells = []
        for key in ("image_auroc", "pixel_auroc", "pro"):
            value, change = row["fp32"].get(key), row["changes"].get(key)
            cells += [fmt(value), "-" if change is None else f"{change:+.4f}"]
        print(
            f"| {name} | {' | '.join(cells)} | {row['rerank_hit_rate']['hit_rate']:.4f} | "
            f"{'yes' if native.get(name) else 'no (emulated)'} |"
        )
    for name in report.get("not_measured", []):
        print(f"| {name} | not measured | | | | | | | |")
    print(
        f"largest change {report.get('max_abs_change')}; outside the tolerance: "
        f"{', '.join(report.get('cells_outside_tolerance', [])) or 'none'}; bf16 may be the default: "
        f"{report.get('bf16_default_allowed')}"
    )


if __name__ == "__main__":
    main()
