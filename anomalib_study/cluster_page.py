"""The page of a cluster run: ``index.html``, one self-contained file (its images embedded as
base64 PNG / JPEG; no script, font or style sheet from the network), drawn from a
:class:`~anomalib_study.cluster_run.ClusterRun` alone, so that a regroup redraws it without
the backbone or the images.

It shows the run's facts (folder, images, backbone, mode, tau and how it was chosen, the
number of clusters and how), the criterion's score per number of clusters with the chosen
one marked (read from the method's ``describe()``: ``n_clusters_criterion``,
``n_clusters_scores``), the Ward dendrogram of the image embeddings, a 2-D map of the images
(their first two principal components, coloured by cluster), and one section per cluster:
its size, how tight it is (the mean distance of its images to their centre, and their mean
silhouette), and up to :data:`MAX_SHOWN` thumbnails, most typical first (nearest the
centre), each with its patch weights drawn over it as a translucent heat map: where the
method looked. :func:`render_run` returns the page and one JPEG sheet per cluster
(``cluster_<k>.jpg``: the same thumbnails).
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from anomalib_study.cluster_run import ClusterRun, centre_distances, jpeg_bytes

__all__ = ["MAX_SHOWN", "cluster_colour", "render_run", "weight_overlay"]

#: thumbnails shown per cluster (the full list is clusters.csv)
MAX_SHOWN = 24
_DPI = 80


def cluster_colour(k: int, n_clusters: int) -> str:
    """The colour of cluster ``k`` everywhere on the page (tab10, tab20 past 10 clusters)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return to_hex(colormaps["tab10" if n_clusters <= 10 else "tab20"](k % (10 if n_clusters <= 10 else 20)))


def weight_overlay(thumbnail: bytes, weights: np.ndarray, grid: tuple[int, int], strength: float = 0.6):
    """The thumbnail (JPEG bytes) with the patch weights (P,) on ``grid`` (h, w) drawn over it:
    upsampled bilinearly, scaled to the image's largest weight, in ``jet``, more opaque where
    the weight is larger (at most ``strength``). Returns a PIL RGB image."""
    from matplotlib import colormaps
    from PIL import Image

    base = Image.open(io.BytesIO(thumbnail)).convert("RGB")
    alpha = Image.fromarray(np.asarray(weights, dtype=np.float32).reshape(grid), mode="F")
    scaled = np.asarray(alpha.resize(base.size, Image.BILINEAR), dtype=np.float64)
    scaled = np.clip(scaled / max(float(np.max(weights)), 1e-12), 0.0, 1.0)
    heat = colormaps["jet"](scaled)[..., :3] * 255.0
    opacity = (strength * scaled)[..., None]
    blended = (1.0 - opacity) * np.asarray(base, dtype=np.float64) + opacity * heat
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))


def _figure_png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.05, facecolor="white")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _criterion_figure(scores: dict[int, float], chosen: int, criterion: str, note: str):
    import matplotlib.pyplot as plt

    ks = sorted(scores)
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ax.plot(ks, [scores[k] for k in ks], "o-", color="0.35", markersize=4)
    if chosen in scores:
        ax.plot([chosen], [scores[chosen]], "o", color="tab:red", markersize=9, label=f"{note}: {chosen}")
        ax.legend(fontsize=8, loc="best")
    else:
        ax.axvline(chosen, color="tab:red", linestyle="--", label=f"{note}: {chosen}")
        ax.legend(fontsize=8, loc="best")
    ax.set(xlabel="number of clusters", ylabel=criterion, xticks=ks)
    ax.set_title(f"{criterion} per number of clusters", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _map_figure(embeddings: np.ndarray, labels: np.ndarray, n_clusters: int):
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    X = np.asarray(embeddings, dtype=np.float64)
    components = min(2, X.shape[0], X.shape[1])
    pca = PCA(n_components=components, svd_solver="full").fit(X)
    xy = np.zeros((len(X), 2))
    xy[:, :components] = pca.transform(X)
    ratios = list(pca.explained_variance_ratio_) + [0.0] * (2 - components)
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for k in range(n_clusters):
        members = labels == k
        colour = cluster_colour(k, n_clusters)
        ax.scatter(xy[members, 0], xy[members, 1], s=14, color=colour, alpha=0.75, linewidths=0)
        centre = xy[members].mean(axis=0)
        label_box = {"boxstyle": "circle,pad=0.2", "facecolor": "white", "edgecolor": colour, "alpha": 0.85}
        ax.text(*centre, str(k), fontsize=9, weight="bold", ha="center", va="center", bbox=label_box)
    ax.set_xlabel(f"PC 1 ({ratios[0]:.0%} of the variance)", fontsize=8)
    ax.set_ylabel(f"PC 2 ({ratios[1]:.0%})", fontsize=8)
    ax.set_title("images: weighted embeddings, PCA", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _dendrogram_figure(embeddings: np.ndarray, labels: np.ndarray, n_clusters: int, cut: bool):
    """Ward merge heights (scipy) of the embeddings, the last 40 merges; links inside one
    cluster in its colour, the dashed line where the tree is cut into ``n_clusters`` (ward only)."""
    import matplotlib.pyplot as plt
    from scipy.cluster import hierarchy

    X = np.asarray(embeddings, dtype=np.float64)
    n = len(X)
    tree = hierarchy.linkage(X, method="ward")
    owner = list(labels) + [-1] * (n - 1)  # the cluster of every node, -1 when its leaves are mixed
    for i, (a, b) in enumerate(tree[:, :2].astype(int)):
        owner[n + i] = owner[a] if owner[a] == owner[b] else -1
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    hierarchy.dendrogram(
        tree,
        truncate_mode="lastp",
        p=min(40, n),
        no_labels=True,
        ax=ax,
        link_color_func=lambda node: "#999999" if owner[node] < 0 else cluster_colour(owner[node], n_clusters),
    )
    if cut and 2 <= n_clusters < n:
        heights = tree[:, 2]
        between = (heights[n - n_clusters - 1] + heights[n - n_clusters]) / 2
        ax.axhline(between, color="tab:red", linestyle="--", linewidth=1, label=f"cut: {n_clusters} clusters")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_ylabel("Ward merge height", fontsize=8)
    ax.set_title("dendrogram (last merges)", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _scores(description: dict) -> dict[int, float] | None:
    scores = description.get("n_clusters_scores")
    return None if not scores else {int(k): float(v) for k, v in scores.items()}


def _tightness(embeddings: np.ndarray, labels: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Distances to the centres (n,), and the silhouette of each image (None with one cluster)."""
    from sklearn.metrics import silhouette_samples

    distances = centre_distances(embeddings, labels)
    silhouettes = None
    if 2 <= n_clusters < len(labels):
        silhouettes = silhouette_samples(np.asarray(embeddings, dtype=np.float64), labels)
    return distances, silhouettes


_STYLE = """
body{font-family:sans-serif;margin:20px;max-width:1360px;color:#222;font-size:14px}
h1{font-size:21px;margin:0 0 8px} h2{font-size:17px;margin:22px 0 4px}
table.facts td{padding:2px 10px 2px 0;vertical-align:top} table.facts td:first-child{color:#666;white-space:nowrap}
.figures img{margin:4px 8px 4px 0;border:1px solid #ddd}
.swatch{display:inline-block;width:13px;height:13px;border-radius:3px;margin-right:6px;vertical-align:-1px}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:128px;font-size:10px;color:#444} figure img{width:128px;height:128px;display:block}
figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.note{color:#666;font-size:12px} nav a{margin-right:12px}
"""


def _cell(label: str, value: str) -> str:
    return f"<tr><td>{html.escape(label)}</td><td>{value}</td></tr>"


def _facts(run: ClusterRun, n_clusters: int, scale: float) -> str:
    d, info, esc = run.description, run.info, html.escape
    settings = d.get("settings", {})
    n = len(run.relatives)
    images = f"{n} grouped"
    if info.get("skipped"):
        images += f", {len(info['skipped'])} unreadable left out (<a href='skipped.csv'>skipped.csv</a>)"
    if info.get("n_distinct", n) < n:
        images += f", {n - info['n_distinct']} of them byte-for-byte copies of others"
    if settings.get("mode") == "semi_supervised":
        mode = (
            f"semi-supervised: each patch scored by its distance to the nearest patch of "
            f"{info.get('n_normal_images', '?')} normal images ({esc(str(info.get('normal_dir')))})"
        )
    else:
        mode = "unsupervised: each patch scored by its mean distance to the nearest patch of the other images"
    grid = "&times;".join(str(v) for v in run.grid)
    size = (info.get("preprocessing") or {}).get("crop", "?")
    rows = [
        _cell("folder", esc(run.folder)),
        _cell("images", images),
        _cell("backbone", f"{esc(str(info.get('backbone')))}, input {size} px, patch grid {grid}"),
        _cell("mode", mode),
        _cell("tau", esc(str(d.get("tau_rule")))),
        _cell("clusters", f"<b>{n_clusters}</b>: {esc(str(d.get('n_clusters_rule')))}"),
    ]
    if info.get("from_run"):
        rows.append(_cell("regrouped from", esc(str(info["from_run"])) + " (its embeddings; no image was read)"))
    rows.append(
        _cell(
            "tightness",
            "per cluster, the mean distance of its images to their centre (the distance of the "
            f"weighted embeddings; all images to the overall centre: {scale:.3g}) and the mean silhouette of "
            "its images (-1..1: higher = closer to their own cluster than to the next)",
        )
    )
    rows.append(
        _cell(
            "files",
            "<a href='clusters.csv'>clusters.csv</a> (every image, its cluster and distance), "
            "<a href='config.json'>config.json</a>, <a href='embeddings.npz'>embeddings.npz</a>",
        )
    )
    return "<table class='facts'>" + "".join(rows) + "</table>"


def render_run(run: ClusterRun, max_shown: int = MAX_SHOWN) -> dict[str, bytes]:
    """The page and sheets of ``run``: ``{"index.html": ..., "cluster_<k>.jpg": ...}``."""
    labels = np.asarray(run.labels)
    n_clusters = int(labels.max()) + 1
    d, esc = run.description, html.escape
    distances, silhouettes = _tightness(run.embeddings, labels, n_clusters)
    X = np.asarray(run.embeddings, dtype=np.float64)
    scale = float(np.linalg.norm(X - X.mean(axis=0), axis=1).mean())
    criterion = str(d.get("n_clusters_criterion") or "criterion")
    figures = []
    scores, note = _scores(d), "chosen"
    if scores is None and run.info.get("criterion_of_source"):
        scores, note = _scores(run.info["criterion_of_source"]), "given here"
        criterion = str(run.info["criterion_of_source"].get("n_clusters_criterion") or criterion)
    if scores:
        figures.append(_figure_png(_criterion_figure(scores, n_clusters, criterion, note)))
    figures.append(_figure_png(_map_figure(X, labels, n_clusters)))
    if len(X) >= 3:
        cut = d.get("settings", {}).get("linkage") == "ward"
        figures.append(_figure_png(_dendrogram_figure(X, labels, n_clusters, cut)))
    sizes = np.bincount(labels, minlength=n_clusters)
    nav = " ".join(
        f"<a href='#cluster-{k}'><span class='swatch' style='background:{cluster_colour(k, n_clusters)}'></span>"
        f"cluster {k} ({sizes[k]})</a>"
        for k in range(n_clusters)
    )
    files: dict[str, bytes] = {}
    sections = []
    for k in range(n_clusters):
        members = np.flatnonzero(labels == k)
        members = members[np.argsort(distances[members], kind="stable")]  # most typical first
        shown = members[:max_shown]
        tiles = [weight_overlay(run.thumbnails[i], run.weights[i], run.grid) for i in shown]
        cells = []
        for i, tile in zip(shown, tiles):
            data = base64.b64encode(jpeg_bytes(tile, quality=75)).decode("ascii")
            name = esc(run.relatives[i])
            cells.append(
                f"<figure title='{name}'><img src='data:image/jpeg;base64,{data}' alt='{name}'>"
                f"<figcaption>{name}</figcaption><figcaption>distance {distances[i]:.3g}</figcaption></figure>"
            )
        more = len(members) - len(shown)
        tight = f"mean distance to its centre {distances[members].mean():.3g}"
        if silhouettes is not None:
            tight += f", mean silhouette {silhouettes[members].mean():.2f}"
        sections.append(
            f"<section class='cluster' id='cluster-{k}' data-cluster='{k}' data-size='{len(members)}'>"
            f"<h2><span class='swatch' style='background:{cluster_colour(k, n_clusters)}'></span>Cluster {k}: "
            f"{len(members)} image{'s' if len(members) != 1 else ''}</h2><p class='note'>{tight}; most typical "
            f"first (nearest the centre)</p><div class='thumbs'>{''.join(cells)}</div>"
            + (f"<p class='note'>and {more} more (all in <a href='clusters.csv'>clusters.csv</a>)</p>" if more else "")
            + "</section>"
        )
        files[f"cluster_{k}.jpg"] = jpeg_bytes(_sheet(tiles), quality=80)
    title = f"{len(labels)} images in {n_clusters} clusters"
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Anomaly clustering: {esc(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>Anomaly clustering: {esc(title)}</h1>{_facts(run, n_clusters, scale)}"
        "<div class='figures'>" + "".join(f"<img src='{uri}' alt='figure'>" for uri in figures) + "</div>"
        "<p class='note'>On each thumbnail, the image's patch weights as a heat map (red = its largest weight): "
        "where the method looked. The thumbnail is the backbone's input (resized and cropped).</p>"
        f"<nav>{nav}</nav>" + "".join(sections) + "</body></html>\n"
    )
    files["index.html"] = page.encode("utf-8")
    return files


def _sheet(tiles: list, columns: int = 8, gap: int = 4):
    """The tiles (PIL images of one size) in a grid on white: one cluster's sheet."""
    from PIL import Image

    if not tiles:
        return Image.new("RGB", (1, 1), (255, 255, 255))
    side = tiles[0].size[0]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (side + gap) - gap, rows * (side + gap) - gap), (255, 255, 255))
    for j, tile in enumerate(tiles):
        sheet.paste(tile, ((j % columns) * (side + gap), (j // columns) * (side + gap)))
    return sheet
