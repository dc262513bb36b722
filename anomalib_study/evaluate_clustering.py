"""The clustering path of :func:`anomalib_study.evaluate.evaluate` (task ``"clustering"``).

The test images a protocol (:data:`CLUSTERING_PROTOCOLS`) selects are grouped label-free by
the method, then each of its variants (modes) is scored against the defect types: NMI, ARI
and F1, the curve over the method's free parameter (tau), its best point as an oracle
(chosen with the labels: never the result) and the confusion of clusters and classes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from anomalib_study.errors import StudyError
from anomalib_study.io import as_json
from anomalib_study.methods.base import MethodSpec, RunOptions
from anomalib_study.profiling import peak_rss_mb as _peak_rss_mb

#: evaluation protocols of the clustering task: which test images are grouped, and into how many clusters
CLUSTERING_PROTOCOLS = {
    "reproduction": "the test images of the data set, 'combined' (several defects in one image) removed, the normal "
    "test images kept as one more class; as many clusters as classes (the anomaly-clustering "
    "reproduction's protocol, which produced its published table)",
    "anomalous_only": "the anomalous test images only ('combined' removed), as many clusters as defect types",
}


def _criteria(X, classes: np.ndarray, params: dict) -> dict | None:
    """Every label-free criterion's number of clusters for image embeddings ``X``, and the NMI
    / ARI / F1 of the clustering at that number (the labels score the choices; they never
    make them). None where there are too few images or fewer than two classes."""
    from anomalib_study.methods.clustering_steps import cluster_embeddings
    from anomalib_study.methods.n_clusters import DEFAULT_CRITERION, candidates_for, criteria_table
    from anomalib_study.metrics import clustering_metrics

    if X is None or len(X) < 4 or np.unique(classes).size < 2:
        return None
    linkage, seed = params.get("linkage", "ward"), int(params.get("seed", 0) or 0)
    table = criteria_table(X, candidates_for(len(X), params.get("max_clusters") or 10), linkage=linkage, seed=seed)
    scored = {}
    for k in sorted({entry["chosen"] for entry in table.values()}):
        found = clustering_metrics(classes, cluster_embeddings(X, k, linkage, seed))
        scored[k] = {key: found[key] for key in ("nmi", "ari", "f1")}
    return {
        "true": int(np.unique(classes).size),
        "default": params.get("n_clusters_criterion") or DEFAULT_CRITERION,
        "chosen": {name: entry["chosen"] for name, entry in table.items()},
        "scores_at_chosen": {name: scored[entry["chosen"]] for name, entry in table.items()},
        "curves": {name: {str(k): v for k, v in entry["scores"].items()} for name, entry in table.items()},
    }


def _criteria_by_protocol(
    variant: dict, classes: np.ndarray, anomalous: np.ndarray, protocol: str, params: dict
) -> dict:
    """:func:`_criteria` on the protocol's images and, where it keeps normal images, on the
    anomalous ones alone (the same embeddings, the normal test images left out): the number of
    defect types a person grouping a folder of rejected parts would want."""
    X = variant.get("embeddings")
    found = {protocol: _criteria(X, classes, params)}
    if X is not None and protocol != "anomalous_only" and not anomalous.all():
        found["anomalous_only"] = _criteria(np.asarray(X)[anomalous], classes[anomalous], params)
    return found


def evaluate_clustering(
    spec: MethodSpec,
    dataset,
    backbone,
    params: dict,
    run: RunOptions,
    protocol: str | None = None,
    return_maps: bool = False,
) -> dict[str, Any]:
    """Group the protocol's test images with ``spec``'s method (label-free), then score each
    variant against the defect types: NMI, ARI, F1, the curve over the method's free
    parameter and its best point as an oracle (chosen with the labels: never the result)."""
    from anomalib_study.metrics import clustering_metrics

    protocol = "reproduction" if protocol is None else protocol
    if protocol not in CLUSTERING_PROTOCOLS:
        raise StudyError(f"protocol must be one of {', '.join(CLUSTERING_PROTOCOLS)}, got {protocol!r}")
    records = [r for r in dataset.test if r.defect_type != "combined"]
    if protocol == "anomalous_only":
        records = [r for r in records if r.label == 1]
    classes = np.array([r.defect_type for r in records])
    anomalous = np.array([r.label == 1 for r in records], dtype=bool)
    n_classes = int(np.unique(classes).size) if len(records) else 0
    if n_classes < 2:
        raise StudyError(
            f"{dataset.name}: protocol {protocol!r} leaves {len(records)} image(s) of {n_classes} "
            "type(s): clustering needs at least two types"
        )
    n_clusters = params.get("n_clusters") or n_classes
    if n_clusters > len(records):
        raise StudyError(f"n_clusters={n_clusters} is more than the {len(records)} images protocol {protocol!r} groups")
    normal_paths = [r.path for r in dataset.train]
    started = time.perf_counter()
    grouped = spec.cluster_images(backbone, [r.path for r in records], normal_paths, params, run, n_clusters)
    timings = {"cluster_total_s": time.perf_counter() - started, **grouped["timings"]}
    counts = {str(k): int(v) for k, v in zip(*np.unique(classes, return_counts=True))}
    result: dict[str, Any] = {
        "params": params,
        "protocol": {
            "name": protocol,
            "description": CLUSTERING_PROTOCOLS[protocol],
            "n_images": len(records),
            "class_counts": counts,
            "n_classes": n_classes,
            "n_clusters": int(n_clusters),
            "n_clusters_rule": ("given" if params.get("n_clusters") else "as many as classes (protocol)"),
            "n_normal_images_available": len(normal_paths),
            "n_normal_images": len(normal_paths)
            if "semi_supervised" in [variant["name"] for variant in grouped["runs"]]
            else 0,
        },
        "grid": grouped.get("grid"),
        "modes": {},
    }
    per_image = [{"path": str(r.path), "label": int(r.label), "defect_type": r.defect_type} for r in records]
    in_memory = {}
    for variant in grouped["runs"]:
        name = variant["name"]
        scores = clustering_metrics(classes, variant["labels"])
        curve = [
            {
                "tau": point["value"],
                "relative": point["relative"],
                **{k: v for k, v in clustering_metrics(classes, point["labels"]).items() if k in ("nmi", "ari", "f1")},
            }
            for point in variant["curve"]
        ]
        best = max(curve, key=lambda point: point["nmi"]) if curve else None
        clusters = np.unique(variant["labels"])
        kinds = sorted(counts)
        contingency = [[int(np.sum((variant["labels"] == c) & (classes == k))) for k in kinds] for c in clusters]
        result["modes"][name] = {
            **as_json(variant["description"]),  # settings and what the method chose; the scores below win
            **{k: scores[k] for k in ("nmi", "ari", "f1", "matching")},
            "n_clusters": scores["n_clusters"],  # clusters found (can be fewer than asked, e.g. one empty)
            "tau_curve": curve,
            "oracle": None
            if best is None
            else {
                **best,
                "note": "tau picked by looking at the labels (the best NMI on the curve): an upper bound, "
                "never our result",
            },
            "confusion": {"clusters": [int(c) for c in clusters], "classes": kinds, "counts": contingency},
            "n_clusters_criteria": _criteria_by_protocol(variant, classes, anomalous, protocol, params),
        }
        for key in ("nmi", "ari", "f1"):
            result[f"{key}_{name}"] = scores[key]
        for row, label in zip(per_image, variant["labels"]):
            row[f"cluster_{name}"] = int(label)
        if return_maps:
            in_memory[name] = {k: variant.get(k) for k in ("labels", "weights", "embeddings", "patch_scores")}
    first_mode = next(iter(result["modes"]))
    first = result["modes"][first_mode]["n_clusters_criteria"][protocol]
    if first is not None:  # the first mode's choice (unsupervised where it runs), every criterion beside it
        result["n_clusters_chosen"] = first["chosen"][first["default"]]
        result["n_clusters_criteria"] = {
            "mode": first_mode,
            "protocol": protocol,
            **{key: first[key] for key in ("true", "default", "chosen")},
        }
    result["per_image"] = per_image
    result["timings"] = timings
    result["peak_memory"] = {
        "peak_rss_mb": _peak_rss_mb(),
        "how": "resource.getrusage(RUSAGE_SELF).ru_maxrss: the process's peak resident memory",
    }
    if return_maps:
        result["clustering_runs"] = in_memory
        result["records"] = records
    return result
