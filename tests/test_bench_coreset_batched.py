"""benchmarks/bench_coreset_batched.py: both selections compared on generated rows (known answers:
one centre per well-separated cluster leaves no near-tie; a changed pick is reported at its step)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _load():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "bench_coreset_batched", REPO / "benchmarks" / "bench_coreset_batched.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_separated_rows_give_the_same_sequence_both_ways():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=50.0, size=(40, 160)).astype(np.float32)
    rows = (centres[rng.integers(40, size=4000)] + rng.normal(size=(4000, 160))).astype(np.float32)
    result = bench.compare(rows, ratio=0.01)  # one centre per cluster: every farthest point far ahead of the next
    assert result["selected"] == 40 and result["same_sequence"] and result["first_differing_step"] is None
    assert result["selection_overlap"] == 1.0 and result["rows_only_in_one"] == 0
    assert result["speedup"] > 0 and result["batched_64_s"] >= 0


def test_a_difference_is_reported_with_its_first_step(monkeypatch):
    from anomalib_study.methods import coreset

    real = coreset.GreedyCoresetSampler.run

    def run(self, features):  # the batched side picks one other row at step 3
        selected = real(self, features)
        if self.batch_centres > 1:
            selected = selected.copy()
            selected[3] = next(i for i in range(len(features)) if i not in set(selected.tolist()))
        return selected

    monkeypatch.setattr(coreset.GreedyCoresetSampler, "run", run)
    rows = np.random.default_rng(1).normal(size=(2000, 160)).astype(np.float32)
    result = bench.compare(rows, ratio=0.05)
    assert not result["same_sequence"] and result["first_differing_step"] == 3
    assert result["rows_only_in_one"] == 1 and result["selection_overlap"] == 0.99
