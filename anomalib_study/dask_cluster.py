"""The Dask client of a study run on a cluster (dask.distributed imported lazily).

``run_study(..., scheduler="tcp://host:8786")`` sends every cell's :func:`anomalib_study.execution.execute_cell`
to the workers of an existing Dask cluster (``distributed.Client(address).submit(execute_cell, task)``,
one cell per worker thread; ``jobs`` must then stay 1). :func:`connect_cluster` connects to its
scheduler and waits for a first worker; :func:`cluster_kernel_threads` gives each kernel
``cores // cells at once`` OpenMP/MKL threads, per host, the smallest over the hosts.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from anomalib_study.errors import StudyError

CONNECT_TIMEOUT_S = 30  # waiting for the scheduler to answer
WORKER_WAIT_S = 120  # waiting for a first worker to join it


def connect_cluster(address: str) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address`` with at least one worker.

    Raises StudyError when dask.distributed is not installed, the scheduler does not
    answer, or no worker joins it within ``WORKER_WAIT_S``."""
    try:
        from distributed import Client
    except ImportError:
        raise StudyError(
            "--scheduler needs dask.distributed, which is not installed: "
            "pip install 'anomalib-study[cluster]' (or pip install distributed)"
        ) from None
    try:
        client = Client(address, set_as_default=False, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        raise StudyError(
            f"cannot reach the Dask scheduler at {address!r} ({exc}): start one with `dask scheduler` "
            "and pass the address it prints, e.g. --scheduler tcp://10.0.0.5:8786"
        ) from None
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        client.close()
        raise StudyError(
            f"no Dask worker joined the scheduler at {address} within {WORKER_WAIT_S} s: "
            f"start workers with `dask worker {address}`"
        ) from None
    return client


def cluster_kernel_threads(client: Any) -> int:
    """OpenMP/MKL threads per kernel on the cluster: per host, its cores // the cells it runs at
    once (the threads of its workers); the smallest over the hosts."""
    machines = client.run(_host_and_cores, on_error="ignore")  # worker address -> (host name, cores)
    slots: dict[str, int] = {}
    cores: dict[str, int] = {}
    for address, threads in client.nthreads().items():
        host, count = machines.get(address, (address, 1))
        slots[host] = slots.get(host, 0) + int(threads)
        cores[host] = int(count or 1)
    return max(1, min((cores[host] // slots[host] for host in slots), default=1))


def _host_and_cores() -> tuple[str, int | None]:
    return socket.gethostname(), os.cpu_count()
