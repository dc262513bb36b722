"""Greedy k-centre coreset and random sampler: hand-computed sequences, determinism, bounded memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from anomalib_study.errors import ParameterError
from anomalib_study.methods.coreset import GreedyCoresetSampler, RandomSampler, coreset_size, selection_overlap

# five points on a line (embedded in 2-D): x = 0, 1, 3, 7, 15
LINE = np.array([[0, 0], [1, 0], [3, 0], [7, 0], [15, 0]], dtype=np.float32)


def _naive_greedy(x: np.ndarray, m: int, start: int) -> list[int]:
    selected, d = [start], ((x - x[start]) ** 2).sum(1)
    for _ in range(m - 1):
        pick = int(np.argmax(d))
        selected.append(pick)
        d = np.minimum(d, ((x - x[pick]) ** 2).sum(1))
    return selected


@pytest.mark.parametrize(
    "seed, expected",
    [
        # seed 11 starts at x=0: farthest 15, then 7 (7 from 0 vs 8 from 15), then 3 (3 from 0 vs 4 from 7)
        (11, [0, 4, 3, 2]),
        # seed 1 starts at x=3: farthest 15 (12), then 7 (min(4, 8) = 4 beats 0's 3 and 1's 2), then 0 (3)
        (1, [2, 4, 3, 0]),
    ],
)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_farthest_point_sequence_by_hand(seed, expected, precision):
    # the gaps (7 vs 8, 3 vs 4) are far above bf16's rounding: every precision picks the same points
    chosen = GreedyCoresetSampler(ratio=0.8, projection_dim=None, seed=seed, precision=precision).run(LINE)
    assert chosen.tolist() == expected


def test_selection_overlap_by_hand():
    assert selection_overlap([4, 1, 2], [1, 2, 3, 9]) == 0.5
    assert selection_overlap([3, 2, 1], [1, 2, 3]) == 1.0 and selection_overlap([7], [1, 2]) == 0.0
    with pytest.raises(ParameterError, match="non-empty"):
        selection_overlap([1], [])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_selection_against_float32(precision):
    """Half-precision distance updates: a valid coreset, mostly the float32 one, as good a k-centre cover."""
    rng = np.random.default_rng(7)
    centres = rng.normal(scale=6.0, size=(40, 16)) + 20.0  # far from the origin: centring matters
    x = (centres[rng.integers(0, 40, 6000)] + rng.normal(size=(6000, 16))).astype(np.float32)

    def radius(idx):  # the k-centre objective: largest distance of a point to its nearest centre
        return float(np.sqrt(((x[:, None, :] - x[idx][None]) ** 2).sum(-1).min(axis=1).max()))

    reference = GreedyCoresetSampler(ratio=0.02, projection_dim=None, seed=0).run(x)
    low = GreedyCoresetSampler(ratio=0.02, projection_dim=None, seed=0, precision=precision).run(x)
    assert len(low) == len(reference) == 120 and len(set(low.tolist())) == 120 and low[0] == reference[0]
    overlap = selection_overlap(low, reference)
    assert overlap >= 0.5, overlap  # measured: bf16 0.86, fp16 0.97 (near-ties within clusters break differently)
    assert radius(low) <= 1.05 * radius(reference)
    # with the projection: same checks, deterministic
    projected = GreedyCoresetSampler(ratio=0.02, projection_dim=8, seed=1, precision=precision)
    assert np.array_equal(projected.run(x), projected.run(x))


def test_matches_the_plain_algorithm_and_is_deterministic():
    x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    sampler = GreedyCoresetSampler(ratio=0.05, projection_dim=None, seed=3, chunk_size=333)
    first = sampler.run(x)
    assert first.tolist() == _naive_greedy(x, 100, int(first[0]))
    assert np.array_equal(first, GreedyCoresetSampler(ratio=0.05, projection_dim=None, seed=3).run(x))
    assert not np.array_equal(first, GreedyCoresetSampler(ratio=0.05, projection_dim=None, seed=4).run(x))


def test_batched_passes_pick_the_same_points_as_one_pass_per_centre():
    """Once pruning stops paying, each pass computes the distances to the 64 farthest points at once;
    every step still picks the plain loop's farthest point: the same set (near-tied pairs may come in
    the other order, the distances coming from a matrix-matrix instead of a matrix-vector product)."""
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(6000, 24)) @ rng.normal(size=(24, 48)) + rng.normal(size=(6000, 48))).astype(np.float32)
    plain = GreedyCoresetSampler(ratio=0.05, projection_dim=None, seed=0, batch_centres=1).run(x)
    for batch in (2, 7, 64):
        batched = GreedyCoresetSampler(ratio=0.05, projection_dim=None, seed=0, batch_centres=batch).run(x)
        assert len(batched) == 300 and set(batched.tolist()) == set(plain.tolist())
        assert batched[0] == plain[0]
    assert batched.tolist() == _naive_greedy(x, 300, int(batched[0]))


def test_projection_is_seeded_and_used_above_projection_dim():
    x = np.random.default_rng(1).normal(size=(500, 64)).astype(np.float32)
    a = GreedyCoresetSampler(ratio=0.1, projection_dim=16, seed=0).run(x)
    b = GreedyCoresetSampler(ratio=0.1, projection_dim=16, seed=0).run(x)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 50
    projected = GreedyCoresetSampler(projection_dim=16).project(x)
    assert tuple(projected.shape) == (500, 16)
    # Johnson-Lindenstrauss: squared norms kept on average
    ratio = float((projected.numpy() ** 2).sum() / (x**2).sum())
    assert 0.6 < ratio < 1.4


def test_coverage_radius_beats_random():
    # k-centre objective: max distance of any point to the coreset; greedy is a 2-approximation
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(990, 2)), rng.normal(size=(10, 2)) + 25]).astype(np.float32)

    def radius(idx):
        return np.sqrt(((x[:, None] - x[idx][None]) ** 2).sum(-1)).min(1).max()

    greedy = GreedyCoresetSampler(ratio=0.02, projection_dim=None).run(x)
    random = RandomSampler(ratio=0.02, seed=0).run(x)
    assert (greedy >= 990).any()  # the far-away cluster is always represented
    assert radius(greedy) < radius(random)


def test_ratio_one_returns_everything_and_sizes():
    assert GreedyCoresetSampler(ratio=1.0).run(LINE).tolist() == [0, 1, 2, 3, 4]
    assert RandomSampler(ratio=1.0).run(LINE).tolist() == [0, 1, 2, 3, 4]
    assert coreset_size(1000, 0.01) == 10 and coreset_size(5, 0.01) == 1 and coreset_size(7, 1.0) == 7


def test_random_sampler_is_seeded_and_unique():
    x = np.zeros((100, 3), dtype=np.float32)
    a = RandomSampler(ratio=0.25, seed=5).run(x)
    assert len(a) == 25 and len(set(a.tolist())) == 25
    assert np.array_equal(a, RandomSampler(ratio=0.25, seed=5).run(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": "a"}, "ratio"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"precision": "fp8"}, "coreset precision must be one of fp32, bf16, fp16"),
        ({"precision": None}, "precision"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ParameterError, match=match):
        GreedyCoresetSampler(**kwargs).run(LINE)


def test_bad_features():
    with pytest.raises(ParameterError, match="2-D"):
        GreedyCoresetSampler().run(np.zeros((3, 4, 5)))


@pytest.mark.slow
def test_memory_stays_bounded_for_200k_points():
    """200k x 16 points: an N x N float32 matrix would need 160 GB; N x M (M = 100) 80 MB.
    The peak resident memory of the run must stay within a few N-sized vectors."""
    code = textwrap.dedent("""
        import numpy as np, torch
        from anomalib_study.methods.coreset import GreedyCoresetSampler
        x = np.random.default_rng(0).normal(size=(200_000, 16)).astype(np.float32)
        GreedyCoresetSampler(ratio=0.0005, projection_dim=None).run(x[:1000])  # warm up torch
        def rss():
            return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
        before = rss()
        idx = GreedyCoresetSampler(ratio=0.0005, projection_dim=None, chunk_size=16384).run(x)
        assert len(idx) == 100
        print((rss() - before) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    grown_mb = float(result.stdout.strip().splitlines()[-1])
    # data 12.8 MB; working set: a few (N,) vectors and chunk copies; N x M would add 80 MB
    assert grown_mb < 40, f"peak memory grew by {grown_mb:.0f} MB"
