import mmap
import time

from anomalib_study.profiling import PeakMemory, current_rss_mb


def test_peak_memory_sees_a_temporary_allocation():
    assert current_rss_mb() > 0
    with PeakMemory(interval=0.001) as outer:
        # a fresh anonymous mapping, every page written: new resident memory whatever the allocator
        # already holds (a numpy array may reuse memory an earlier test freed)
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\1" * (64 * 2**20))
        time.sleep(0.1)  # the sampler runs between Python steps: give it a few
        block.close()
    assert outer.added_mb > 40  # the peak saw the 64 MiB even though it was freed before the end
    with PeakMemory() as idle:
        pass
    assert idle.added_mb < 20
