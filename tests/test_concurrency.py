"""Concurrency and state (issue 7.5): threads, several devices, and an offload cycle cut short.

* The retriever holds no mutable cache: RoPE rows are computed per call from the
  ``rope_freqs`` buffer (32 floats, moved by ``.to()``), so concurrent calls from several
  threads equal serial calls bit for bit, and a copy on another device never disturbs the
  original.
* The Triton INTERPRETER (``TRITON_INTERPRET=1``) is not thread-safe: triton 3.6 keeps the
  current grid in a module-level builder, and concurrent launches fail (``InterpreterError:
  y >= grid_dim[1]``) or could mix programs. On a CPU the triton backend is therefore driven
  from several threads under one lock here (what an application must do, see
  ``docs/validation.md``); on a GPU (``--device cuda``) the same test launches concurrently.
* An offload cycle interrupted by an exception anywhere after planning (the copy, or the
  bookkeeping after it; KeyboardInterrupt included) leaves a consistent engine that maps only
  correct bytes, and retrying the cycle gives exactly the state of an engine that never failed.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flashmemory_triton import ops, select_resident
from flashmemory_triton import reference as ref
from flashmemory_triton.offload import OffloadEngine
from flashmemory_triton.utils import _device
from test_retriever_api import build, inputs

THREADS = 4


def _workload(device, n_jobs):
    """Different shapes, layouts and positions per job, so a shared-state bug shows up."""
    jobs = []
    for i in range(n_jobs):
        B, N = 1 + i % 3, 17 + 11 * i
        hidden, ck, pos = inputs(device, B, N, seed=i, L=3, per_layer_hidden=bool(i % 2),
                                 per_layer_keys=bool(i % 3 == 1))
        jobs.append((hidden, ck, (pos * (i + 1) * 997) % 70000))
    return jobs


def _call(model, job, i):
    hidden, ck, pos = job
    if i % 3 == 0:
        return model.logits(hidden, ck, pos)
    if i % 3 == 1:
        return model.ensemble(hidden, ck, pos, mode="mean")
    return model.select_topk(hidden, ck, pos, top_k=5)


def test_torch_backend_threads_equal_serial(device):
    model, _ = build(device, backend="torch")
    jobs = _workload(device, 24)
    serial = [_call(model, job, i) for i, job in enumerate(jobs)]
    for _ in range(2):  # a second round, with the threads started in another order
        with ThreadPoolExecutor(THREADS) as pool:
            parallel = list(pool.map(lambda a: _call(model, *a),
                                     reversed(list(zip(jobs, range(24))))))
        for got, want in zip(reversed(parallel), serial):
            assert torch.equal(got, want)


def test_functional_ops_threads_equal_serial(device):
    """ops.prepare_queries without a rope_freqs argument builds the RoPE frequencies per call;
    select_resident is pure: both are safe to call concurrently."""
    g = torch.Generator().manual_seed(0)
    jobs = [(torch.randn(3, 2, 4, 128, generator=g).to(device),
             (torch.randn(3, 2, 4, generator=g) / 64).to(device),
             torch.randint(0, 2 ** 21, (2,), generator=g).to(device)) for _ in range(16)]

    def run(job):
        prepared = ops.prepare_queries(*job, backend="torch", precision="fp8")
        scores = torch.sigmoid(prepared.q.sum(-1).flatten(1))  # stand-in scores [L, B*H]
        return prepared.q, prepared.w, select_resident(scores, mode="topk", top_k=3).mask

    serial = [run(j) for j in jobs]
    with ThreadPoolExecutor(THREADS) as pool:
        parallel = list(pool.map(run, jobs))
    for got, want in zip(parallel, serial):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.interpreter
def test_triton_backend_from_several_threads(device):
    """Several threads share one triton-backend retriever. Under the interpreter the launches
    must be serialized (one lock); on CUDA they run concurrently. Either way each thread gets
    exactly its serial result."""
    model, _ = build(device, backend="triton")
    jobs = _workload(device, 6)
    serial = [_call(model, job, i) for i, job in enumerate(jobs)]
    lock = threading.Lock() if _device.interpreter_enabled() else contextlib.nullcontext()

    def run(args):
        job, i = args
        with lock:
            return _call(model, job, i)

    with ThreadPoolExecutor(THREADS) as pool:
        parallel = list(pool.map(run, zip(jobs, range(len(jobs)))))
    for got, want in zip(parallel, serial):
        assert torch.equal(got, want)


def _other_device(device):
    return torch.device("meta") if device.type == "cpu" else torch.device("cpu")


def test_copies_on_other_devices_leave_the_original_alone(device):
    """A copy of the retriever on another device (meta on a CPU run: shapes only, no data;
    the CPU on a GPU run) works there, and the original's results do not change: no cached
    RoPE table or other state is shared between them."""
    model, _ = build(device, backend="auto")
    hidden, ck, pos = inputs(device, 3, 21)
    before = model.logits(hidden, ck, pos)
    other_dev = _other_device(device)
    other = copy.deepcopy(model).to(other_dev)
    assert other.rope_freqs.device.type == other_dev.type
    assert model.rope_freqs.device.type == device.type
    assert "rope_freqs" not in model.state_dict()  # recomputed, never checkpointed
    h2, k2, p2 = hidden.to(other_dev), ck.to(other_dev), pos.to(other_dev)
    out = other.logits(h2, k2, p2)
    assert out.shape == before.shape and out.device.type == other_dev.type
    assert other.select_topk(h2, k2, p2, top_k=4).shape == (3, 21)
    if other_dev.type != "meta":  # real data on both sides: same model, same numbers
        torch.testing.assert_close(out.to(device), before, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.logits(hidden, ck, pos), before)
    assert torch.equal(ref.freqs_cis_at(pos, 4096, model.rope_freqs),
                       ref.freqs_cis_at(pos, 4096))  # the buffer is design §3's 32 frequencies


@pytest.mark.gpu
def test_cpu_and_gpu_retrievers_side_by_side(device):
    """CPU and CUDA copies used alternately from two threads: each keeps matching the other
    (fp32 reference on both; projections differ only by GEMM rounding)."""
    cpu_model, _ = build(torch.device("cpu"), backend="torch")
    gpu_model = copy.deepcopy(cpu_model).to(device)
    jobs = _workload(torch.device("cpu"), 8)

    def run(args):
        job, i = args
        model, dev = (cpu_model, "cpu") if i % 2 else (gpu_model, device)
        return _call(model, tuple(t.to(dev) for t in job), 0).cpu()

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(run, zip(jobs, range(len(jobs)))))
    for i, job in enumerate(jobs):
        want = _call(cpu_model, job, 0)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


# --- the offload engine, interrupted --------------------------------------------------------------
PS, N0 = 4, 24


def _engine(history):
    return OffloadEngine.from_history(history, reserve_pages=3, page_size=PS)


def _pages(*pages):
    m = torch.zeros(1, N0, dtype=torch.bool)
    for p in pages:
        m[0, p * PS:(p + 1) * PS] = True
    return m


def _reads_are_true(engine, history):
    """Every chunk the lookup table maps reads its own bytes."""
    engine.check_consistency()
    ids = torch.arange(N0)[None]
    rows, present = engine.read(ids)
    for n in present[0].nonzero().flatten().tolist():
        assert torch.equal(rows[0, n], history[0, n]), f"chunk {n} maps wrong bytes"
    return present


def _fail_copy_at_start(engine, monkeypatch):
    def boom(plan):
        raise RuntimeError("simulated: copy failed before writing")
    monkeypatch.setattr(engine, "_copy_pages", boom)


def _interrupt_copy_midway(engine, monkeypatch):
    def half(plan):  # the first planned cell gets garbage, then the user hits Ctrl-C
        engine.reserve[plan.load_cell[:1]] = 0xCD
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "_copy_pages", half)


def _fail_in_commit(engine, monkeypatch):
    # The bytes are copied; then building the new lookup table fails (a device OOM, say),
    # after the page bookkeeping was already half rewritten.
    def boom(*args, **kwargs):
        raise RuntimeError("simulated: failure while committing")
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", boom)


@pytest.mark.parametrize("inject,exc", [
    pytest.param(_fail_copy_at_start, RuntimeError, id="copy-fails"),
    pytest.param(_interrupt_copy_midway, KeyboardInterrupt, id="copy-interrupted"),
    pytest.param(_fail_in_commit, RuntimeError, id="commit-fails"),
])
def test_offload_cycle_interrupted_then_retried(inject, exc, monkeypatch):
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, 256, (1, N0, 16), dtype=torch.uint8, generator=g)
    engine, twin = _engine(history), _engine(history)
    for e in (engine, twin):
        e.apply(_pages(0, 1, 2))
    target = _pages(1, 3, 4)  # one hit, two misses evicting pages 0 and 2
    twin.apply(target)
    with monkeypatch.context() as m:
        inject(engine, m)
        with pytest.raises(exc):
            engine.apply(target)
    present = _reads_are_true(engine, history)
    assert not bool(present[0, :PS].any()) and not bool(present[0, 2 * PS:3 * PS].any()), \
        "chunks of evicted pages must not stay mapped to cells that were being overwritten"
    stats = engine.apply(target)  # the retry
    assert stats.chunks_resident == int(target.sum())
    assert torch.equal(_reads_are_true(engine, history), _reads_are_true(twin, history))
    assert torch.equal(engine.lookup >= 0, twin.lookup >= 0)
    for mask in (_pages(0, 5), _pages(5, 4, 3)):  # and later cycles go on as if nothing happened
        engine.apply(mask)
        twin.apply(mask)
        assert torch.equal(_reads_are_true(engine, history), _reads_are_true(twin, history))
        assert torch.equal(engine.lookup >= 0, mask)
