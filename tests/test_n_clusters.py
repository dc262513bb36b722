"""The label-free criteria for the number of clusters, on blobs with a known number."""

import numpy as np
import pytest

from anomalib_study.errors import ParameterError
from anomalib_study.methods import n_clusters as nc


def _blobs(k=4, per=20, d=6, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (k, d)) + 10  # away from the origin: the cosine silhouette sees directions
    return np.vstack([c + rng.normal(0, spread, (per, d)) for c in centres]).astype(np.float32)


@pytest.mark.parametrize("criterion", sorted(nc.CRITERIA))
def test_each_criterion_finds_well_separated_blobs(criterion):
    chosen, scores = nc.choose_n_clusters(_blobs(), criterion=criterion)
    assert chosen == 4 and sorted(scores) == list(range(2, 11))


def test_the_table_has_every_criterion_and_the_default_is_one():
    table = nc.criteria_table(_blobs(k=3), candidates=range(2, 7))
    assert set(table) == set(nc.CRITERIA) and nc.DEFAULT_CRITERION in nc.CRITERIA
    assert all(entry["chosen"] in range(2, 7) for entry in table.values())


def test_candidates_and_bad_input():
    assert nc.candidates_for(5) == [2, 3, 4] and nc.candidates_for(100, 6) == [2, 3, 4, 5, 6]
    with pytest.raises(ParameterError, match="criterion"):
        nc.choose_n_clusters(_blobs(), criterion="elbow")
    with pytest.raises(ParameterError, match="at least 3 images"):
        nc.choose_n_clusters(_blobs()[:2])
    with pytest.raises(ParameterError, match="no candidate"):
        nc.choose_n_clusters(_blobs(), candidates=[1, 500])
