"""Serial torch workers for the CPU path: the work split over threads by the caller, not by
torch's intra-op pool.

Why: every torch op on the intra-op pool ends in a barrier of its OpenMP threads. The CPU
scorer runs about ten ops a block; on a machine where other processes compete for the cores,
an OpenMP thread that the scheduler has taken off its core holds every barrier up for a time
slice, and with the default wait policy the waiting threads spin through theirs. Measured on
the project's 2-core Xeon with other jobs running (N = 65536, B = 1, the scorer alone): 1.39 s
on the intra-op pool against 0.11 s on one thread. Here each worker thread runs whole blocks
with ONE intra-op thread (no barrier at all) and pulls the next block when it is done, so a
descheduled worker delays only its own block; the caller waits once, at the end.

The workers are ``torch.get_num_threads()`` Python threads (torch releases the GIL inside every
op), started on first use and kept; a new pool is made when that count changes, or in a child
process after ``fork`` (threads do not survive it). Each sets its own intra-op thread count to
1 (per-thread state in OpenMP and MKL); ``torch.set_num_threads`` also stores the count as the
default for threads that start later, so the caller's count is stored back once the workers are
up: threads started afterwards get the caller's count, not 1.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["run_items", "worker_count"]

_lock = threading.Lock()
_pool: tuple[ThreadPoolExecutor, int, int] | None = None  # (executor, threads, pid)


def worker_count() -> int:
    """Workers a call uses: the caller's torch intra-op thread count."""
    return max(1, torch.get_num_threads())


def _start_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of exactly ``threads`` started workers, each at one intra-op thread."""
    caller_threads = torch.get_num_threads()
    ready = threading.Barrier(threads + 1)

    def init():
        torch.get_num_threads()  # this thread's lazy thread-count set-up first, so 1 sticks
        torch.set_num_threads(1)
        ready.wait()  # every worker blocks here until all have started: `threads` threads

    executor = ThreadPoolExecutor(threads, thread_name_prefix="flashmemory-cpu")
    started = [executor.submit(init) for _ in range(threads)]
    ready.wait()
    for f in started:
        f.result()
    torch.set_num_threads(caller_threads)  # the default for threads started from now on
    return executor


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        pid = os.getpid()
        if _pool is None or _pool[1] != threads or _pool[2] != pid:
            if _pool is not None and _pool[2] == pid:
                _pool[0].shutdown(wait=False)
            _pool = (_start_pool(threads), threads, pid)
        return _pool[0]


def run_items(work: Callable[[int, dict], None], n_items: int,
              threads: int | None = None) -> None:
    """``work(i, state)`` for every ``i < n_items``, on ``threads`` serial workers (default
    :func:`worker_count`), each pulling the next item when done; ``state`` is a dict private
    to one worker for this call (its reusable buffers). Items must write disjoint outputs.
    One worker or one item: run here, on the caller's thread (torch's own pool). The first
    exception raised by an item is raised here, after every worker has stopped."""
    threads = worker_count() if threads is None else threads
    if threads <= 1 or n_items <= 1:
        state: dict = {}
        for i in range(n_items):
            work(i, state)
        return
    pool = _executor(threads)
    next_item = iter(range(n_items))
    take = threading.Lock()
    failed = threading.Event()
    # torch's autograd, inference and autocast modes are per thread: the workers run under the
    # caller's (outputs made in the caller's inference mode are inference tensors, which only
    # inference mode may write; q made with grad enabled must not record a graph in a worker).
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")

    def drain():
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
            _drain()

    def _drain():
        state: dict = {}
        while not failed.is_set():
            with take:
                i = next(next_item, None)
            if i is None:
                return
            try:
                work(i, state)
            except BaseException:
                failed.set()  # the others stop at their next item
                raise

    futures = [pool.submit(drain) for _ in range(min(threads, n_items))]
    errors = [f.exception() for f in futures]  # waits for every worker
    for e in errors:
        if e is not None:
            raise e
