"""Anomaly clustering's label-free choices, measured on every labelled set we have. Writes one JSON report.

    python benchmarks/bench_clustering_rules.py [--data DIR] [--sets a,b] [--configs eff,dino]
                                                [--parts criteria,tau,embeddings] [--cache DIR]
                                                [--out reports/benchmarks/clustering_rules.json]

Not a speed benchmark: what each label-free rule gives against the true defect types (NMI), so
that the defaults are chosen on evidence and the evidence is kept. The labels only score the
choices; no rule looks at them. Sets: Magnetic-tile (5 defect types + normal), MVTec AD bottle
(3 + normal) and transistor (4 + normal), MVTec 3D tire (3 + normal, ``combined`` removed),
NEU-DET (6, no normal images). Protocols: ``all`` (the reproduction's: normal test images one
more class) and ``anom`` (the defect images alone: the number of defect types a person
grouping a folder of rejected parts wants).

Each set and configuration (backbone, layers, input) is computed once and kept in ``--cache``
(patch embeddings as float16, unsupervised and semi-supervised patch scores, classes): the
parts read them.

Parts:

1. ``criteria``: every criterion of :mod:`anomalib_study.methods.n_clusters` on the image
   embeddings of each mode (the default tau rule: one label-free tau), its number of clusters against the true
   one and the NMI at it, under both protocols; per criterion, on how many sets it is within
   one of the true number with at least 0.9 of the NMI at the true number.
2. ``tau``: NMI at the true number of clusters for the single-tau rule at several effective
   shares, the multi-tau rule and a co-association consensus over the same taus (the two
   candidates that were tried against it); the oracle (the best point of the tau curve, labels) and a split-half
   oracle (tau picked with the labels of half the images, scored on the other half, 50
   seeded splits): how much of the oracle's lead over a label-free rule is real.
3. ``embeddings``: unsupervised and average NMI of other embeddings on the two MVTec AD
   sets: ViT blocks 10 + 11 (the reproduction's) against 5 + 8, the whole image squashed
   against the centre crop, 448 px against 224 px, patch neighbourhood 1 / 3 / 5, CNN stages
   3 + 4 against 2 + 3.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _folder in (REPO, REPO / "benchmarks"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from anomalib_study.io import cache_root, data_root, write_json  # noqa: E402

DEFAULT_OUT = REPO / "reports" / "benchmarks" / "clustering_rules.json"
PARTS = ("criteria", "tau", "embeddings")
SETS = {
    "mvtec_ad-bottle": {"layout": "mvtec_ad", "folder": "mvtec_ad", "category": "bottle"},
    "mvtec_ad-transistor": {"layout": "mvtec_ad", "folder": "mvtec_ad", "category": "transistor"},
    "mvtec_3d-tire": {"layout": "mvtec_3d", "folder": "mvtec_3d", "category": "tire"},
    "neu_det": {"layout": "neu_det", "folder": "neu_det"},
    "magnetic_tile": {
        "layout": "magnetic_tile",
        "folder": "magnetic_tile",
        "options": {"resize_mode": "squash", "coreset_ratio": 0.01},
    },
}
#: configuration -> AnomalyClustering options; the first two are the study's backbones
CONFIGS = {
    "eff": {"backbone": "efficientnet_lite0"},
    "dino": {"backbone": "dinov2_vits14"},
    "dino1011": {"backbone": "dinov2_vits14", "layers": ["block10", "block11"]},
    "dinosq": {"backbone": "dinov2_vits14", "resize_mode": "squash"},
    "dino448": {"backbone": "dinov2_vits14", "image_size": 448},
    "effp1": {"backbone": "efficientnet_lite0", "patch_size": 1},
    "effp5": {"backbone": "efficientnet_lite0", "patch_size": 5},
    "effsq": {"backbone": "efficientnet_lite0", "resize_mode": "squash"},
    "eff34": {"backbone": "efficientnet_lite0", "layers": ["stage3", "stage4"]},
}
ABLATIONS = ("dino1011", "dinosq", "dino448", "effp1", "effp5", "effsq", "eff34")
SHARES = (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7)
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench_clustering_rules {time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def cached(cache: Path, data: Path, name: str, config: str, semi: bool) -> dict:
    """The set's patch embeddings and patch scores under ``config``, computed once."""
    from anomalib_study.data.readers import load_dataset
    from anomalib_study.methods.clustering import AnomalyClustering

    path = cache / f"{name}__{config}.npz"
    if not path.exists():
        spec = SETS[name]
        dataset = load_dataset(spec["layout"], data / spec["folder"], spec.get("category"))
        records = [r for r in dataset.test if r.defect_type != "combined"]
        options = {**spec.get("options", {}), **CONFIGS[config]}
        started = time.perf_counter()
        model = AnomalyClustering(mode="unsupervised", progress=False, **options).fit(None)
        Z, _ = model.extract([r.path for r in records])
        su = model.patch_scores(Z)
        ss = np.zeros(0)
        if semi and dataset.train and any(r.label == 0 for r in records):
            semi_model = AnomalyClustering(mode="semi_supervised", progress=False, **options)
            normal, _ = semi_model.extract([r.path for r in dataset.train])
            semi_model.fit(normal)
            del normal
            ss = semi_model.patch_scores(Z)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, Z=Z.astype(np.float16), su=su, ss=ss, classes=np.array([r.defect_type for r in records]))
        log(f"{name} {config}: {Z.shape} in {time.perf_counter() - started:.0f} s")
    loaded = np.load(path)
    return {
        "Z": loaded["Z"].astype(np.float32),
        "unsupervised": loaded["su"],
        "semi_supervised": loaded["ss"] if loaded["ss"].size else None,
        "classes": loaded["classes"],
    }


def _nmi(classes, labels) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return round(float(normalized_mutual_info_score(classes, labels)), 4)


def _protocols(classes: np.ndarray) -> dict[str, np.ndarray]:
    keep = {"all": np.ones(len(classes), dtype=bool)}
    if (classes == "good").any():
        keep["anom"] = classes != "good"
    return keep


def _mode_embeddings(entry: dict) -> dict[str, np.ndarray]:
    """Each mode's image embeddings under the default tau rule (one label-free tau)."""
    from anomalib_study.methods.clustering_steps import label_free_tau, patch_weights, weighted_embeddings

    out = {}
    for mode in ("unsupervised", "semi_supervised"):
        if entry[mode] is not None:
            s = entry[mode]
            out[mode] = weighted_embeddings(entry["Z"], patch_weights(s, label_free_tau(s, 0.1)))
    out["average"] = entry["Z"].mean(axis=1)
    return out


def part_criteria(entries: dict) -> dict:
    from anomalib_study.methods.clustering_steps import cluster_embeddings
    from anomalib_study.methods.n_clusters import CRITERIA, criteria_table

    rows = []
    for (name, config), entry in entries.items():
        for mode, X_all in _mode_embeddings(entry).items():
            for protocol, keep in _protocols(entry["classes"]).items():
                X, classes = X_all[keep], entry["classes"][keep]
                true = int(np.unique(classes).size)
                at_true = _nmi(classes, cluster_embeddings(X, true))
                table = criteria_table(X)
                chosen = {c: v["chosen"] for c, v in table.items()}
                nmi = {c: _nmi(classes, cluster_embeddings(X, k)) for c, k in chosen.items()}
                rows.append(
                    {
                        "set": name,
                        "config": config,
                        "mode": mode,
                        "protocol": protocol,
                        "true": true,
                        "nmi_at_true": at_true,
                        "chosen": chosen,
                        "nmi_at_chosen": nmi,
                    }
                )
                log(f"criteria {name} {config} {mode} {protocol}: true {true}, chosen {chosen}")
    summary = {}
    for protocol in ("anom", "all"):
        for mode in ("unsupervised", "semi_supervised", "average"):
            group = [r for r in rows if r["protocol"] == protocol and r["mode"] == mode]
            if not group:
                continue
            summary[f"{protocol}/{mode}"] = {
                c: {
                    "within_one": sum(abs(r["chosen"][c] - r["true"]) <= 1 for r in group),
                    "within_one_and_0.9_nmi": sum(
                        abs(r["chosen"][c] - r["true"]) <= 1 and r["nmi_at_chosen"][c] >= 0.9 * r["nmi_at_true"]
                        for r in group
                    ),
                    "of": len(group),
                }
                for c in CRITERIA
            }
    return {"rows": rows, "summary": summary}


def part_tau(entries: dict, splits: int = 50) -> dict:
    from sklearn.cluster import AgglomerativeClustering

    from anomalib_study.methods.clustering_steps import (
        MULTI_TAU_FACTORS,
        cluster_embeddings,
        label_free_tau,
        multi_tau_embeddings,
        patch_weights,
        weighted_embeddings,
    )

    rng = np.random.default_rng(0)
    rows = []
    for (name, config), entry in entries.items():
        Z, classes = entry["Z"], entry["classes"]
        k = int(np.unique(classes).size)
        for mode in ("unsupervised", "semi_supervised"):
            scores = entry[mode]
            if scores is None:
                continue
            grid = [round(0.1 * f, 6) for f in MULTI_TAU_FACTORS]
            single = {}  # every share of the single-rule sweep and of the multi-tau grid, clustered once
            for share in sorted(set(SHARES) | set(grid)):
                single[share] = cluster_embeddings(
                    weighted_embeddings(Z, patch_weights(scores, label_free_tau(scores, share))), k
                )
            around = [single[s] for s in grid]
            together = np.mean([(lab[:, None] == lab[None, :]) for lab in around], axis=0)
            consensus = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(
                1 - together
            )
            multi = cluster_embeddings(multi_tau_embeddings(Z, scores, 0.1)[0], k)
            # the tau curve as the reports draw it: multiples of the single rule's tau, 0 and uniform
            centre = label_free_tau(scores, 0.1)
            curve = {}
            for factor in (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, np.inf):
                weights = (
                    np.full(scores.shape, 1 / scores.shape[1])
                    if np.isinf(factor)
                    else patch_weights(scores, centre * factor)
                )
                curve[factor] = cluster_embeddings(weighted_embeddings(Z, weights), k)
            held_free, held_oracle = [], []
            for _ in range(splits):
                order = rng.permutation(len(classes))
                a, b = order[: len(order) // 2], order[len(order) // 2 :]
                best = max(curve, key=lambda f: _nmi(classes[a], curve[f][a]))
                held_oracle.append(_nmi(classes[b], curve[best][b]))
                held_free.append(_nmi(classes[b], curve[1.0][b]))
            row = {
                "set": name,
                "config": config,
                "mode": mode,
                "true": k,
                "single": {str(s): _nmi(classes, single[s]) for s in SHARES},
                "multi": _nmi(classes, multi),
                "consensus": _nmi(classes, consensus),
                "oracle": max(_nmi(classes, lab) for lab in curve.values()),
                "split_half": {
                    "single_rule": round(float(np.mean(held_free)), 4),
                    "tau_picked_on_other_half": round(float(np.mean(held_oracle)), 4),
                },
            }
            rows.append(row)
            log(
                f"tau {name} {config} {mode}: single {row['single']['0.1']}, multi {row['multi']}, "
                f"consensus {row['consensus']}, oracle {row['oracle']}"
            )
    means = (
        {
            rule: round(float(np.mean([r[rule] if rule != "single" else r["single"]["0.1"] for r in rows])), 4)
            for rule in ("single", "multi", "consensus", "oracle")
        }
        if rows
        else {}
    )
    return {"rows": rows, "mean_nmi": means}


def part_embeddings(cache: Path, data: Path, sets) -> dict:
    from anomalib_study.methods.clustering_steps import (
        cluster_embeddings,
        label_free_tau,
        patch_weights,
        weighted_embeddings,
    )

    rows = []
    for name in sets:
        for config in ("eff", "dino") + ABLATIONS:
            entry = cached(cache, data, name, config, semi=False)
            classes = entry["classes"]
            k = int(np.unique(classes).size)
            s = entry["unsupervised"]
            X = weighted_embeddings(entry["Z"], patch_weights(s, label_free_tau(s, 0.1)))
            rows.append(
                {
                    "set": name,
                    "config": config,
                    "options": CONFIGS[config],
                    "nmi_unsupervised": _nmi(classes, cluster_embeddings(X, k)),
                    "nmi_average": _nmi(classes, cluster_embeddings(entry["Z"].mean(axis=1), k)),
                }
            )
            log(f"embeddings {name} {config}: {rows[-1]['nmi_unsupervised']} / {rows[-1]['nmi_average']}")
    return {"rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--configs", default="eff,dino")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from bench_knn import machine_info

    data = args.data or data_root()
    if data is None or not Path(data).is_dir():
        print("bench_clustering_rules: the real data are needed: pass --data ../shared/data", file=sys.stderr)
        return 2
    cache = args.cache or cache_root() / "clustering_rules"
    sets = [s for s in args.sets.split(",") if s]
    configs = [c for c in args.configs.split(",") if c]
    parts = [p for p in args.parts.split(",") if p]
    report = {"machine": machine_info(), "sets": sets, "configs": configs, "parts": {}}
    if args.out.is_file():  # parts measured by an earlier run are kept, those run now replaced
        import json

        report["parts"] = json.loads(args.out.read_text()).get("parts", {})
    entries = {}
    if {"criteria", "tau"} & set(parts):
        entries = {(s, c): cached(cache, Path(data), s, c, semi=True) for s in sets for c in configs}
    for part in parts:
        started = time.perf_counter()
        if part == "criteria":
            report["parts"][part] = part_criteria(entries)
        elif part == "tau":
            report["parts"][part] = part_tau(entries)
        elif part == "embeddings":
            report["parts"][part] = part_embeddings(cache, Path(data), [s for s in sets if s.startswith("mvtec_ad")])
        report["parts"][part]["seconds"] = round(time.perf_counter() - started, 1)
        write_json(args.out, report)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
