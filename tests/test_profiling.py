import time

import numpy as np

from anomalib_study.profiling import PeakMemory, current_rss_mb


def test_peak_memory_sees_a_temporary_allocation():
    assert current_rss_mb() > 0
    with PeakMemory(interval=0.001) as outer:
        block = np.ones((64, 2**20 // 8))  # 64 MiB, touched
        block += 1
        time.sleep(0.1)  # the sampler runs between Python steps: give it a few
        del block
    assert outer.added_mb > 40  # the peak saw the 64 MiB even though it was freed before the end
    with PeakMemory() as idle:
        pass
    assert idle.added_mb < 20
