"""Running the localization chunks on a Dask distributed cluster.

`--scheduler ADDRESS` joins an existing cluster (`dask scheduler` plus
`dask worker ADDRESS` on each machine, all with smartscope installed and the
stacks at the same paths); `--workers N` starts a LocalCluster of N worker
processes (one thread each, and one ONNX Runtime thread per worker: a process
is one core's worth of localization).
Each chunk is one task with a key of its own; results come back to the
client as they finish, and only the client writes (one file per chunk, once).
A worker lost mid-run costs only the chunks it was holding: the scheduler
runs them again on the others, and chunks already back are not recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from smartscope.analysis.localize import LocalizeSettings, localize_chunk
from smartscope.analysis.sources import Stack

Task = tuple[int, Stack, int, int, float]  # (stack index, stack, start, stop, pixel size nm)


class ClusterError(ValueError):
    """The cluster cannot be reached, and where it was looked for."""


@contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator:
    """A client of the cluster at `scheduler`, or of a LocalCluster of `workers` processes, closed on exit."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def run_tasks(client, tasks: list[Task], settings: LocalizeSettings, job: str,
              done: Callable[[Task, dict[str, np.ndarray]], None]) -> None:
    """Submit every task, hand each result to `done` (on this process) as it arrives."""
    from dask.distributed import as_completed

    futures = {client.submit(localize_chunk, stack, start, stop, settings, pixel_nm, 1, pure=False,
                             key=f"smartscope-localize-{job}-{i}-{start}"): (i, stack, start, stop, pixel_nm)
               for i, stack, start, stop, pixel_nm in tasks}
    for future in as_completed(futures):
        table = future.result()
        future.release()  # the cluster may forget it: it is this process's now
        done(futures.pop(future), table)
