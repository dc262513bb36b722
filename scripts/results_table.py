"""Prints the headline figures of every rendered report as one Markdown table.

python scripts/results_table.py [reports/01_knn_detection] [--keys image_auroc accuracy]
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="reports/01_knn_detection")
    parser.add_argument("--keys", nargs="+", default=["image_auroc", "accuracy"])
    args = parser.parse_args()
    rows = {}
    for path in sorted(Path(args.folder).glob("*.metrics.json")):
        metrics = json.loads(path.read_text())
        name = metrics["dataset"]["name"] + (" (synthetic)" if metrics.get("synthetic") else "")
        backbone = metrics["backbone"]["name"]
        rows.setdefault(name, {})[backbone] = [metrics.get(k) for k in args.keys] + [
            metrics["n_train"],
            metrics["n_test"],
        ]
    backbones = sorted({b for r in rows.values() for b in r})
    head = ["data set", "train / test"] + [f"{b} {k}" for b in backbones for k in args.keys]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, per in rows.items():
        counts = next(iter(per.values()))[-2:]
        cells = [name, f"{counts[0]} / {counts[1]}"]
        for b in backbones:
            values = per.get(b, [None] * (len(args.keys) + 2))[: len(args.keys)]
            cells += ["-" if v is None else f"{v:.3f}" for v in values]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
