"""Prints the PatchCore reports' figures beside the published ones as one Markdown table.

    python scripts/results_table_patchcore.py [reports/02_patchcore]
"""

import json
import sys
from pathlib import Path


def fmt(value):
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/02_patchcore")
    print("| data set | backbone | image AUROC (rw / max) | pixel AUROC | PRO | image F1-max | pixel F1-max | bank | published (PatchCore, WRN-50) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*.metrics.json")):
        m = json.loads(path.read_text())
        name = m["dataset"]["name"] + (" (synthetic)" if m.get("synthetic") else "")
        published = [r for r in m.get("published", [])[1:] if r.get("image_auroc") is not None]
        pub = "; ".join(
            f"{r['data']} {fmt(r['image_auroc'])} / {fmt(r['pixel_auroc'])} / {fmt(r['pro'])} ({r['coreset']})" for r in published
        ) or "none"
        print(f"| {name} | {m['backbone']['name']} | {fmt(m['image_auroc_reweighted'])} / {fmt(m['image_auroc_max'])} | "
              f"{fmt(m['pixel_auroc'])} | {fmt(m['pro'])} | {fmt(m['image_f1_max'])} | {fmt(m['pixel_f1_max'])} | "
              f"{m['memory_bank_size']:,} | {pub} |")
    print()
    print("Coreset-ratio ablation (at most 100 training images):")
    print("| data set | backbone | coreset | bank | fit s | predict s | peak mem added MB | image AUROC rw | pixel AUROC | PRO |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(folder.glob("*.metrics.json")):
        m = json.loads(path.read_text())
        for r in (m.get("ablation") or {}).get("rows", []):
            mem = r["peak_memory_added_mb"]
            print(f"| {m['dataset']['name']} | {m['backbone']['name']} | {100 * r['coreset_ratio']:g} % | {r['memory_bank_size']:,} | "
                  f"{r['fit_s']:.1f} | {r['predict_s']:.1f} | {'-' if mem is None else f'{mem:.0f}'} | "
                  f"{fmt(r['image_auroc_reweighted'])} | {fmt(r['pixel_auroc'])} | {fmt(r['pro'])} |")


if __name__ == "__main__":
    main()
