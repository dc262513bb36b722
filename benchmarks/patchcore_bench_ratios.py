"""The ratios of bench_patchcore.py (ours against anomalib's), the rate profile of anomalib's
coreset loop read from its progress log, the quadratic extrapolation and the plain-text table.
"""

from __future__ import annotations

import re
from typing import Sequence


# --------------------------------------------------------------------------------------
# Ratios, extrapolation, table
# --------------------------------------------------------------------------------------
def ratios(ours: dict, theirs: dict) -> dict[str, float | None]:
    """The comparison of one training-set size (None where a side lacks the figure).

    ``fit_speedup`` = anomalib fit s / our fit s (> 1: we are faster);
    ``predict_speedup`` = our images/s / anomalib's (> 1: we are faster);
    ``peak_memory_ratio`` = our peak RSS / anomalib's (< 1: we use less), whole processes;
    ``peak_memory_above_imports_ratio``: the same on (peak - RSS after imports), which
    discounts the ~1 GB that importing anomalib's whole package costs before any work;
    ``fit_cpu_speedup`` / ``predict_cpu_speedup``: the same on CPU seconds (user + system),
    which other programs on a shared machine disturb less than wall time.
    """

    def div(a, b):
        return None if a is None or b in (None, 0) else float(a) / float(b)

    def above(side):
        base = side.get("rss_after_imports_mb", side.get("rss_before_model_mb"))
        return None if base is None or side.get("peak_rss_mb") is None else side["peak_rss_mb"] - base

    return {
        "fit_speedup": div(theirs.get("fit_s"), ours.get("fit_s")),
        "predict_speedup": div(ours.get("predict_images_per_s"), theirs.get("predict_images_per_s")),
        "peak_memory_ratio": div(ours.get("peak_rss_mb"), theirs.get("peak_rss_mb")),
        "peak_memory_above_imports_ratio": div(above(ours), above(theirs)),
        "coreset_speedup": div(theirs.get("fit_coreset_s"), ours.get("fit_coreset_s")),
        "fit_cpu_speedup": div(theirs.get("fit_cpu_s"), ours.get("fit_cpu_s")),
        "predict_cpu_speedup": div(theirs.get("predict_cpu_s"), ours.get("predict_cpu_s")),
        # anomalib's fit had its coreset loop run at its fastest sustained rate throughout (an estimate that
        # removes any slowing by other processes from anomalib's side only: the conservative fit ratio)
        "fit_speedup_at_anomalib_p90_rate": div(_fit_at_p90_rate(theirs), ours.get("fit_s")),
    }


def _fit_at_p90_rate(theirs: dict) -> float | None:
    """anomalib's fit seconds with its coreset loop at ``coreset_rate_profile.p90_rate`` (None without a profile)."""
    profile = theirs.get("coreset_rate_profile") or {}
    estimate = profile.get("coreset_s_at_p90_rate")
    if estimate is None or theirs.get("fit_s") is None or theirs.get("fit_coreset_s") is None:
        return None
    return (
        float(theirs["fit_s"]) - float(theirs["fit_coreset_s"]) + min(float(estimate), float(theirs["fit_coreset_s"]))
    )


_TQDM = re.compile(r"Selecting Coreset Indices\.:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


def coreset_rate_profile(log_text: str, window_s: float = 60.0) -> dict | None:
    """How steadily anomalib's coreset loop ran, read from its tqdm progress lines in ``log_text``.

    Each greedy step costs the same (a distance update over every bank row), so on a quiet
    machine the steps per second stay flat; another process on the same cores slows them for
    as long as it runs. Returns, over ``window_s``-second windows of the loop's elapsed time:
    ``rates`` (steps/s of each full window), ``median_rate``, ``p90_rate`` (a fast, sustained
    rate: the undisturbed speed unless most of the run was disturbed), ``slowest_rate``,
    ``seconds_below_80pct_of_p90``, ``steps``, ``elapsed_s`` and ``coreset_s_at_p90_rate``
    (the loop's time had it run at ``p90_rate`` throughout: an estimate, for reading a ratio
    measured under load). None when the log holds no coreset progress.
    """
    import math

    import numpy as np

    points = []
    for match in _TQDM.finditer(log_text):
        done, total, hours, minutes, seconds = match.groups()
        points.append((int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds), int(done), int(total)))
    if len(points) < 2:
        return None
    elapsed, steps = points[-1][0], points[-1][2]
    ends = {}
    for t, done, _ in points:  # the last count seen in each window (a count at t = 60 s closes the first)
        if t > 0:
            ends[math.ceil(t / window_s) - 1] = done
    rates, previous, last = [], 0, -1
    for window in range(int(elapsed // window_s)):  # full windows only
        if window in ends:  # (a window without an update joins the next one)
            rates.append((ends[window] - previous) / (window_s * (window - last)))
            previous, last = ends[window], window
    if not rates:
        return None
    p90 = float(np.percentile(rates, 90))
    return {
        "window_s": window_s,
        "rates": [round(r, 3) for r in rates],
        "median_rate": float(np.median(rates)),
        "p90_rate": p90,
        "slowest_rate": float(min(rates)),
        "seconds_below_80pct_of_p90": window_s * sum(r < 0.8 * p90 for r in rates),
        "steps": steps,
        "elapsed_s": float(elapsed),
        "coreset_s_at_p90_rate": steps / p90 if p90 > 0 else None,
    }


def quadratic_extrapolation(sizes: Sequence[float], seconds: Sequence[float], target: float) -> float:
    """Least-squares ``a * n**2 + b * n`` through the measured (size, seconds), evaluated at ``target``.

    No constant term: zero images cost zero. Needs at least two distinct sizes. Used ONLY
    for anomalib sizes that could not be measured, and labelled as an extrapolation.
    """
    import numpy as np

    from anomalib_study.errors import ParameterError

    n = np.asarray(sizes, dtype=float)
    if len(set(n.tolist())) < 2 or len(n) != len(seconds):
        raise ParameterError(f"quadratic_extrapolation needs >= 2 distinct sizes with one time each, got {list(sizes)}")
    design = np.stack([n**2, n], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.asarray(seconds, dtype=float), rcond=None)
    return float(a * target**2 + b * target)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) in ``columns`` order; floats with 3 significant digits."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)
