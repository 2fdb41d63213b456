"""A small thread pool for the reference's elementwise work.

NumPy releases the GIL inside ufuncs and copies, so splitting a large elementwise pass into
contiguous chunks and running them on a few threads uses every core, as torch's CPU kernels do.
BLAS calls are threaded by the BLAS library itself and are not split here.

The number of threads is ``GPU_NN_REFERENCE_THREADS`` when set, else the CPUs this process may
run on (at most 8). Work smaller than ``min_chunk`` elements per thread runs inline: thread
hand-off costs tens of microseconds.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def num_threads() -> int:
    env = os.environ.get("GPU_NN_REFERENCE_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=num_threads(), thread_name_prefix="gpu_nn_ref")
        return _pool


def parallel_ranges(total: int, fn, min_chunk: int = 1 << 16) -> None:
    """Call ``fn(start, stop)`` over a split of ``range(total)`` into contiguous pieces, one per
    thread, and wait for all of them; exceptions propagate. ``fn`` must write disjoint outputs."""
    threads = min(num_threads(), max(1, total // max(min_chunk, 1)))
    if threads <= 1 or threading.current_thread().name.startswith("gpu_nn_ref"):
        fn(0, total)
        return
    bounds = [total * i // threads for i in range(threads + 1)]
    futures = [_executor().submit(fn, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    fn(bounds[0], bounds[1])  # the calling thread does the first piece
    for f in futures:
        f.result()
