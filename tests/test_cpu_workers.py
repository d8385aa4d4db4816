"""The CPU path's serial workers (flashmemory_triton.cpu_workers): every item once, each on a
worker at one intra-op thread, errors raised to the caller, the caller's thread settings left as
they were, and a working pool in a child process after fork."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from flashmemory_triton import cpu_workers


def _record(n_items, threads=None):
    seen = []
    lock = threading.Lock()

    def work(i, state):
        state.setdefault("owner", threading.get_ident())
        with lock:
            seen.append((i, threading.get_ident(), state["owner"], torch.get_num_threads()))

    cpu_workers.run_items(work, n_items, threads)
    return seen


@pytest.mark.parametrize("n_items", [0, 1, 2, 57])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_item_once_with_private_state(n_items, threads):
    seen = _record(n_items, threads)
    assert sorted(i for i, *_ in seen) == list(range(n_items))
    # a worker's state is its own: made by the thread that uses it
    assert all(tid == owner for _, tid, owner, _ in seen)
    if threads > 1 and n_items > 1:
        main = threading.get_ident()
        assert all(tid != main and n == 1 for _, tid, _, n in seen), "not on serial workers"


def test_first_error_is_raised_and_the_pool_still_works():
    def work(i, state):
        if i == 5:
            raise KeyError("item 5")

    with pytest.raises(KeyError, match="item 5"):
        cpu_workers.run_items(work, 40, 2)
    assert sorted(i for i, *_ in _record(9, 2)) == list(range(9))


def test_caller_and_later_threads_keep_their_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _record(8, threads=3)  # a new pool: its workers set 1 for themselves
        assert torch.get_num_threads() == 2
        later = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [2], "a thread started after the pool inherited the workers' 1"
    finally:
        torch.set_num_threads(before)


def _child(queue):
    queue.put(sorted(i for i, *_ in _record(6, 2)))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_pool_works_in_a_forked_child():
    _record(4, 2)  # the parent's pool exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(queue,))
    p.start()
    p.join(60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive, "run_items hung in a forked child (the parent's dead pool reused)"
    assert queue.get(timeout=5) == list(range(6))


@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
def test_workers_run_in_the_callers_autograd_mode(mode):
    """Grad and inference mode are per thread: a caller in inference mode gets inference-tensor
    outputs that only inference mode may write (the demo's call failed so), and a worker must
    not record a graph the caller did not ask for."""
    ctx = {"inference": torch.inference_mode, "no_grad": torch.no_grad,
           "grad": torch.enable_grad}[mode]
    seen = []
    with ctx():
        out = torch.zeros(6)

        def work(i, state):
            out[i] = i  # an inference tensor under inference_mode: writable only there
            seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

        cpu_workers.run_items(work, 6, 2)
    assert out.tolist() == list(range(6))
    assert set(seen) == {(mode == "inference", mode == "grad")}


def test_cpu_scorer_under_inference_mode_on_workers():
    """The CPU path called as the demo calls it: several blocks, on the workers, inside
    torch.inference_mode(), logits requested."""
    from flashmemory_triton import cpu_path
    from kernel_cases import make_keys
    g = torch.Generator().manual_seed(0)
    q, w = torch.randn(3, 2, 4, 128, generator=g), torch.randn(3, 2, 4, generator=g)
    keys = make_keys((2, 300), g)
    want = cpu_path.score_prepared_cpu(q, w, keys, return_logits=True, block_chunks=64)
    with torch.inference_mode():
        got = cpu_path.score_prepared_cpu(q, w, keys, return_logits=True, block_chunks=64)
    for a, b in zip(got, want):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
