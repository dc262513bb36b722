"""Measuring a block's peak memory: the resident set size sampled in a background thread.

``resource.getrusage(...).ru_maxrss`` only ever grows over a process's life, so it cannot
tell the peak of one step among several run in the same process; sampling
``/proc/self/statm`` can. Linux only (elsewhere the figures are ``None``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_mb() -> float | None:
    """This process's resident memory now, in MiB (None where /proc is absent)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return None


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started, in MiB
    (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, kilobytes on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class PeakMemory:
    """Peak resident memory during a ``with`` block, sampled every ``interval`` seconds.

    After the block: ``start_mb`` (before), ``peak_mb`` (highest seen) and ``added_mb``
    (peak minus start: what the block needed on top of what was already there).
    """

    interval: float = 0.01
    start_mb: float | None = None
    peak_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        self.start_mb = self.peak_mb = current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = current_rss_mb()
            if now is not None and (self.peak_mb is None or now > self.peak_mb):
                self.peak_mb = now
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()

    def _sample_once(self) -> None:
        now = current_rss_mb()
        if now is not None and (self.peak_mb is None or now > self.peak_mb):
            self.peak_mb = now

    @property
    def added_mb(self) -> float | None:
        if self.start_mb is None or self.peak_mb is None:
            return None
        return self.peak_mb - self.start_mb
