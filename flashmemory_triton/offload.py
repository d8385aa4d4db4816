"""The offload engine: full chunk history in host memory, a fixed device reserve (design §7).

:class:`ChunkHistory` is the append-only host store (one job: hold every chunk's bytes).
:class:`OffloadEngine` keeps a fixed number of *cells* on the device, each holding one page of
``page_size`` chunks, and a chunk -> slot lookup table (``slot = cell * page_size + offset``,
-1 when the chunk is not resident). Each cycle (:meth:`OffloadEngine.apply`) it takes a resident
set and:

1. plans, without touching any state: the pages the set needs, which are already in a cell
   (hits), which must be copied (misses), and which cells to reuse;
2. copies every missing page host -> device in ONE batched non-blocking copy (host pages
   gathered into a pinned staging buffer, then one ``.to(device, non_blocking=True)`` and one
   ``index_copy_`` on a side stream);
3. only after the bytes (the current stream waits on the copy's event) updates the page
   bookkeeping and the lookup table, which then maps exactly the resident set's chunks.

Eviction policy: a cell whose page left the resident set keeps its bytes (it may come back: a
free hit) until its cell is needed; cells are then reused empty-first, then the least recently
*selected* page first ("oldest first"; ties: the earlier load, then the lower cell). With
``retain_unselected=False`` every page that left the set is evicted at once. Either way the
lookup table never maps a chunk outside the current set, so a reader cannot see stale pages.

A set needing more pages than the reserve has cells raises ``ValueError`` before any state
changes. A page that gained chunks since it was copied (the growing last page) is stale and is
copied again (counted as a miss). If the copy or the bookkeeping after it fails (any exception,
KeyboardInterrupt included), the cells the cycle was writing or evicting are emptied and their
chunks dropped from the lookup table before the error propagates, so the engine never maps
corrupt bytes and the same ``apply`` can simply be retried (it then maps the same chunks to the
same bytes as an engine that never failed; only the cell placement may differ).
:meth:`OffloadEngine.append` is all or nothing: validated and staged first, committed last.

On a CPU device the same code runs with no pinning and no streams (the copy is synchronous).
Planning reads the resident mask on the host: the engine runs at cycle boundaries, outside
captured graphs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import _validate as V
from . import constants as C
from .selection import ResidentSet, pages_from_mask

__all__ = ["ChunkHistory", "OffloadEngine", "CycleStats", "OffloadPlan"]


def _has_data(name: str, t: torch.Tensor) -> None:
    """Any real device is fine (the engine moves what it reads); ``meta`` holds no values."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (no data); the engine needs its values "
                         f"on cpu or cuda, got {V.describe(t)}")


def _bytes_view(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``[*lead_dims, *row_shape]`` any dtype -> uint8 ``[*lead_dims, row_bytes]`` (no copy
    when contiguous)."""
    if t.numel() == 0:  # an empty tensor counts as contiguous with any strides: no view
        row_bytes = math.prod(t.shape[lead:]) * t.element_size()
        return torch.empty(*t.shape[:lead], row_bytes, dtype=torch.uint8, device=t.device)
    flat = t.contiguous().reshape(*t.shape[:lead], math.prod(t.shape[lead:]))
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _check_history_sizes(batch, row_bytes, page_size, capacity, lookup: bool = False,
                         row_name: str = "row_bytes") -> None:
    """The history's sizes are ints in range and its tensors addressable: ``data [batch,
    capacity (page-rounded), row_bytes]`` uint8, ``lengths [batch]`` int64 and, for an engine
    (``lookup``), the chunk lookup ``[batch, capacity]`` int64. Checked before anything is
    allocated, so an absurd size is a ValueError naming it, not torch's size overflow."""
    for name, v, lo in (("batch", batch, 1), ("row_bytes", row_bytes, 1),
                        ("page_size", page_size, 1), ("capacity", capacity, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    cap = -(-capacity // page_size) * page_size
    sizes = dict(batch=batch, capacity=capacity, page_size=page_size)
    V.addressable("the history", (batch, cap, row_bytes), 1, **sizes, **{row_name: row_bytes})
    V.addressable("the row lengths", (batch,), 8, batch=batch)
    if lookup:
        V.addressable("the chunk lookup", (batch, cap), 8, **sizes)


class ChunkHistory:
    """Append-only per-row chunk store: uint8 ``[B, capacity, row_bytes]`` plus row lengths.

    ``capacity`` is a multiple of ``page_size`` (so page ``p`` of row ``b`` is the contiguous
    block ``data[b, p*page_size:(p+1)*page_size]``) and doubles when exceeded, so appends cost
    amortized O(1) per chunk. Rows past a row's length are zero.
    """

    def __init__(self, batch: int, row_bytes: int, *, page_size: int = C.PAGE_CHUNKS,
                 device="cpu", pin_memory: bool = False, capacity: int = 0):
        _check_history_sizes(batch, row_bytes, page_size, capacity)
        self.batch, self.row_bytes, self.page_size = batch, row_bytes, page_size
        self.device = torch.device(device)
        self.pin_memory = bool(pin_memory)
        self.lengths = torch.zeros(batch, dtype=torch.int64)  # host bookkeeping
        self.data = self._alloc(self._round(capacity))

    def _round(self, n: int) -> int:
        return -(-n // self.page_size) * self.page_size

    def _alloc(self, capacity: int) -> torch.Tensor:
        return torch.zeros(self.batch, capacity, self.row_bytes, dtype=torch.uint8,
                           device=self.device, pin_memory=self.pin_memory)

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    @property
    def n_max(self) -> int:
        return int(self.lengths.max()) if self.batch else 0

    def capacity_for(self, n: int) -> int:
        """The capacity after making room for ``n`` chunks per row (doubling, page aligned)."""
        return self.capacity if n <= self.capacity else self._round(max(n, 2 * self.capacity))

    def ensure_capacity(self, n: int) -> None:
        """Make room for ``n`` chunks per row (doubling, page aligned)."""
        self.data = self._grown(n)

    def _grown(self, n: int) -> torch.Tensor:
        """``data`` itself if it holds ``n`` chunks a row, else a larger copy (``data`` kept)."""
        cap = self.capacity_for(n)
        if cap == self.capacity:
            return self.data
        new = self._alloc(cap)
        new[:, :self.capacity] = self.data
        return new

    def append(self, rows: torch.Tensor, counts=None) -> None:
        """Append uint8 ``rows [B, n, row_bytes]``; row b takes its first ``counts[b]`` (default n).

        All or nothing: the arguments are checked and the rows brought to the host first; if
        anything fails (including the copy itself) the history is exactly as before."""
        V.tensor("rows", rows, dtype=torch.uint8, ndim=3)
        _has_data("rows", rows)
        if rows.shape[0] != self.batch or rows.shape[2] != self.row_bytes:
            raise ValueError(f"rows must be [{self.batch}, n, {self.row_bytes}], got "
                             f"{V.describe(rows)}")
        n = rows.shape[1]
        counts = self._counts(counts, n)
        end = self.lengths + counts
        rows = rows.to(self.device)  # may fail (OOM, a device error): nothing changed yet
        data = self._grown(int(end.max()) if self.batch else 0)
        written = []
        try:
            for b in range(self.batch):  # host bookkeeping: one slice copy per row
                c, start = int(counts[b]), int(self.lengths[b])
                if c:
                    written.append((b, start, start + c))
                    data[b, start:start + c] = rows[b, :c]
        except BaseException:
            if data is self.data:  # rows past a row's length stay zero
                for b, lo, hi in written:
                    data[b, lo:hi] = 0
            raise
        self.data = data
        self.lengths = end

    def _counts(self, counts, n: int) -> torch.Tensor:
        if counts is None:
            return torch.full((self.batch,), n, dtype=torch.int64)
        try:
            counts = torch.as_tensor(counts)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            # A list torch cannot hold: ints past int64 are out of range, anything else is no int.
            if isinstance(counts, (list, tuple)) and all(
                    isinstance(c, int) and not isinstance(c, bool) for c in counts):
                raise ValueError(f"counts must be in [0, n={n}] (the rows given), "
                                 f"got {list(counts)}") from None
            raise TypeError(f"counts must be integers, got {counts!r}") from None
        if counts.dtype not in V._INT_DTYPES:
            raise TypeError(f"counts must be integers, got {V.describe(counts)}")
        counts = counts.to("cpu", torch.int64)
        if counts.shape != (self.batch,):
            raise ValueError(f"counts must have shape ({self.batch},), got {tuple(counts.shape)}")
        if bool((counts < 0).any()) or bool((counts > n).any()):
            raise ValueError(f"counts must be in [0, n={n}] (the rows given), "
                             f"got {counts.tolist()}")
        return counts


@dataclass(frozen=True)
class CycleStats:
    """What one :meth:`OffloadEngine.apply` did."""

    cycle: int
    pages_needed: int  # pages the resident set touches
    page_hits: int  # already in a cell with current bytes
    page_misses: int  # copied host -> device (new or stale pages)
    pages_evicted: int  # pages whose cell was taken (or dropped with retain_unselected=False)
    bytes_moved: int  # host -> device bytes this cycle
    chunks_resident: int  # chunks the lookup table maps after the cycle
    bytes_resident: int  # their payload bytes
    seconds: float


@dataclass
class OffloadPlan:
    """A cycle's decisions, computed from the current state without changing it (host tensors)."""

    need: torch.Tensor  # bool [B, P]: pages the set touches
    hits: torch.Tensor  # bool [B, P]
    load_b: torch.Tensor  # int64 [M]: pages to copy (row, page, destination cell)
    load_p: torch.Tensor
    load_cell: torch.Tensor
    load_valid: torch.Tensor  # int64 [M]: real chunks of each copied page
    evict_cells: torch.Tensor  # int64 [E]: cells whose page leaves the reserve
    chunks_resident: int


class OffloadEngine:
    """Host history + fixed device reserve + chunk lookup table (see the module doc).

    ``row_shape``/``dtype`` describe one chunk's payload: ``(C.ATTN_KV_BYTES,)`` uint8 (the
    default, a layer's attention KV), ``(C.CHUNK_BYTES,)`` uint8 (a compressed key), or any
    user tensor row. ``reserve_pages`` is the number of device cells, fixed for the engine's
    life. The host copy is pinned when ``device`` is CUDA (``pin_memory=None``).
    """

    def __init__(self, batch: int, row_shape=(C.ATTN_KV_BYTES,), dtype: torch.dtype = torch.uint8,
                 *, reserve_pages: int, page_size: int = C.PAGE_CHUNKS, device="cpu",
                 pin_memory: bool | None = None, retain_unselected: bool = True,
                 capacity: int = 0):
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        row_shape = (row_shape,) if isinstance(row_shape, int) else tuple(row_shape)
        if not row_shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                for d in row_shape):
            raise ValueError(f"row_shape must be positive ints, got {row_shape!r}")
        if (isinstance(reserve_pages, bool) or not isinstance(reserve_pages, int)
                or reserve_pages < 0):
            raise ValueError(f"reserve_pages must be a non-negative int, got {reserve_pages!r}")
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        if pin_memory is None:
            pin_memory = self.on_cuda
        self.row_shape, self.dtype = row_shape, dtype
        row_bytes = math.prod(row_shape) * torch.empty((), dtype=dtype).element_size()
        _check_history_sizes(batch, row_bytes, page_size, capacity, lookup=True,
                             row_name=f"row bytes (row_shape {row_shape} x {dtype})")
        self.history = ChunkHistory(batch, row_bytes, page_size=page_size, device="cpu",
                                    pin_memory=pin_memory, capacity=capacity)
        self.batch, self.page_size, self.row_bytes = batch, page_size, row_bytes
        self.n_cells = reserve_pages
        if reserve_pages * page_size * row_bytes >= 2 ** 63:  # past what torch can allocate
            raise ValueError(f"reserve_pages = {reserve_pages} x page_size = {page_size} chunks "
                             f"x {row_bytes} bytes is too large a reserve (past 2**63 bytes)")
        self.retain_unselected = bool(retain_unselected)
        self.reserve = torch.zeros(reserve_pages, page_size, row_bytes, dtype=torch.uint8,
                                   device=self.device)
        # Host bookkeeping, one entry per cell / per (row, page).
        self.cell_row = torch.full((reserve_pages,), -1, dtype=torch.int64)
        self.cell_page = torch.full((reserve_pages,), -1, dtype=torch.int64)
        self.cell_valid = torch.zeros(reserve_pages, dtype=torch.int64)  # chunks copied
        self.cell_loaded = torch.full((reserve_pages,), -1, dtype=torch.int64)  # load sequence
        self.cell_used = torch.full((reserve_pages,), -1, dtype=torch.int64)  # last cycle selected
        self.page_cell = self._page_table(self.history.capacity)
        self._lookup = torch.full((batch, self.history.capacity), -1, dtype=torch.int64,
                                  device=self.device)
        self.cycle = 0
        self._load_seq = 0
        self.totals = {"pages_moved": 0, "bytes_moved": 0, "page_hits": 0, "pages_evicted": 0}
        self._staging = None
        self._stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._copy_done = None  # CUDA event of the last copy (staging reuse waits on it)

    @classmethod
    def from_history(cls, history: torch.Tensor, *, reserve_pages: int, **kwargs) -> OffloadEngine:
        """Engine whose host copy starts as ``history [B, N, *row_shape]`` (any dtype)."""
        V.tensor("history", history)
        if history.dim() < 3:
            raise ValueError(f"history must be [B, N, *row_shape], got {V.describe(history)}")
        engine = cls(history.shape[0], tuple(history.shape[2:]), history.dtype,
                     reserve_pages=reserve_pages, capacity=history.shape[1], **kwargs)
        engine.append(history)
        return engine

    # --- sizes --------------------------------------------------------------------------------
    def _page_table(self, capacity: int) -> torch.Tensor:
        return torch.full((self.batch, capacity // self.page_size), -1, dtype=torch.int64)

    @property
    def n_chunks(self) -> torch.Tensor:
        """int64 ``[B]`` (host): chunks held per row."""
        return self.history.lengths.clone()

    @property
    def lookup(self) -> torch.Tensor:
        """int64 ``[B, n_max]`` on the device: reserve slot of each chunk, -1 if not resident."""
        return self._lookup[:, :self.history.n_max]

    @property
    def reserve_bytes(self) -> int:
        return self.n_cells * self.page_size * self.row_bytes

    @property
    def full_bytes(self) -> int:
        return int(self.history.lengths.sum()) * self.row_bytes

    def reserve_rows(self) -> torch.Tensor:
        """The reserve as ``[n_cells * page_size, *row_shape]`` of the payload dtype (a view)."""
        flat = self.reserve.view(-1, self.row_bytes)
        typed = flat if self.dtype == torch.uint8 else flat.view(self.dtype)
        return typed.view(-1, *self.row_shape)

    # --- history ------------------------------------------------------------------------------
    def append(self, payload: torch.Tensor, counts=None) -> None:
        """Append ``payload [B, n, *row_shape]`` (the engine's dtype) to the host history.

        Nothing moves to the device: new chunks become resident at the next :meth:`apply`
        that selects them (a resident page they extend is then re-copied as stale).
        """
        V.tensor("payload", payload, dtype=self.dtype)
        if payload.dim() != 2 + len(self.row_shape) or payload.shape[0] != self.batch \
                or tuple(payload.shape[2:]) != self.row_shape:
            raise ValueError(f"payload must be [{self.batch}, n, "
                             f"{', '.join(map(str, self.row_shape))}] "
                             f"{self.dtype}, got {V.describe(payload)}")
        _has_data("payload", payload)
        rows = _bytes_view(payload, 2)
        # Everything that can fail comes before the history changes: the counts check, the
        # grown page table and lookup table (allocated, not yet installed), then the history's
        # own all-or-nothing append; the tables are installed only after it succeeded.
        n = self.history._counts(counts, rows.shape[1])
        old_cap = self.history.capacity
        new_cap = self.history.capacity_for(int((self.history.lengths + n).max()))
        table = lookup = None
        if new_cap != old_cap:  # grow the per-page and per-chunk tables with the history
            table = self._page_table(new_cap)
            table[:, :self.page_cell.shape[1]] = self.page_cell
            lookup = torch.full((self.batch, new_cap), -1, dtype=torch.int64, device=self.device)
            lookup[:, :old_cap] = self._lookup
        self.history.append(rows, n)
        if table is not None:
            self.page_cell, self._lookup = table, lookup

    # --- planning (pure) ----------------------------------------------------------------------
    def _resident_mask(self, resident) -> torch.Tensor:
        mask = resident.mask if isinstance(resident, ResidentSet) else resident
        V.tensor("resident mask", mask, dtype=torch.bool, ndim=2)
        _has_data("resident mask", mask)
        if mask.shape[0] != self.batch:
            raise ValueError(f"resident mask must be [{self.batch}, N], got {V.describe(mask)}")
        return mask

    def _host_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Host copy of ``mask`` checked against the history, cut to the table's width."""
        host = mask.to("cpu")
        lengths = self.history.lengths
        beyond = host & (torch.arange(host.shape[1])[None, :] >= lengths[:, None])
        if bool(beyond.any()):
            b = int(beyond.any(dim=1).nonzero()[0])
            raise ValueError(f"resident mask selects chunks past row {b}'s history "
                             f"({int(lengths[b])} chunks held); append them first")
        return host[:, :self.history.capacity]  # columns past the capacity are all False

    def plan(self, resident) -> OffloadPlan:
        """The cycle's decisions for ``resident`` (a ResidentSet or bool mask ``[B, N]``)."""
        mask = self._host_mask(self._resident_mask(resident))
        ps = self.page_size
        lengths = self.history.lengths
        need = pages_from_mask(mask, ps)  # [B, P]
        P = need.shape[1]
        n_need = int(need.sum())
        if n_need > self.n_cells:
            per_row = need.sum(dim=1).tolist()
            raise ValueError(f"the resident set needs {n_need} pages (per row {per_row}) but the "
                             f"reserve has reserve_pages={self.n_cells}; raise reserve_pages or "
                             f"lower max_pages/max_resident/top_k")
        p = torch.arange(P)
        real_count = (lengths[:, None] - p[None, :] * ps).clamp(0, ps)  # [B, P]
        cell = self.page_cell[:, :P]
        present = cell >= 0
        # Bytes valid in each page's cell (0 where none; index n_cells reads the appended 0, so
        # this works with reserve_pages=0 too).
        valid = torch.cat([self.cell_valid, self.cell_valid.new_zeros(1)])
        fresh = present & (valid[torch.where(present, cell, self.n_cells)] >= real_count)
        hits = need & fresh
        load = need & ~fresh
        stale = load & present  # re-copied into their own cell
        new = load & ~present

        occupied = self.cell_row >= 0
        in_range = occupied & (self.cell_page < P)
        cell_needed = torch.zeros(self.n_cells, dtype=torch.bool)
        cell_needed[in_range] = need[self.cell_row[in_range], self.cell_page[in_range]]
        free = (~occupied).nonzero().flatten()
        evictable = (occupied & ~cell_needed).nonzero().flatten()
        # Oldest first: least recently selected, then earliest loaded, then lower cell.
        evictable = evictable[torch.sort(self.cell_loaded[evictable], stable=True).indices]
        evictable = evictable[torch.sort(self.cell_used[evictable], stable=True).indices]
        n_new = int(new.sum())
        if self.retain_unselected:
            evict = evictable[:max(0, n_new - free.numel())]
        else:
            evict = evictable
        targets = torch.cat([free, evict])[:n_new]

        new_b, new_p = new.nonzero(as_tuple=True)
        stale_b, stale_p = stale.nonzero(as_tuple=True)
        load_b = torch.cat([new_b, stale_b])
        load_p = torch.cat([new_p, stale_p])
        load_cell = torch.cat([targets, cell[stale_b, stale_p]])
        return OffloadPlan(need=need, hits=hits, load_b=load_b, load_p=load_p,
                           load_cell=load_cell, load_valid=real_count[load_b, load_p],
                           evict_cells=evict, chunks_resident=int(mask.sum()))

    # --- the cycle ----------------------------------------------------------------------------
    def apply(self, resident) -> CycleStats:
        """Make ``resident`` (ResidentSet or bool mask ``[B, N]``) the resident set."""
        t0 = time.perf_counter()
        mask = self._resident_mask(resident)
        plan = self.plan(mask)  # raises before any state changes
        mask = mask[:, :self.history.capacity]
        n_load = plan.load_b.numel()
        try:
            if n_load:
                self._copy_pages(plan)
            self._commit(plan, mask)
        except BaseException:
            # A failed copy or a commit cut short (OOM, KeyboardInterrupt): forget every cell
            # this cycle touched, so nothing maps bytes that were (being) overwritten.
            self._drop_cells(torch.cat([plan.load_cell, plan.evict_cells]))
            raise
        stats = CycleStats(cycle=self.cycle, pages_needed=int(plan.need.sum()),
                           page_hits=int(plan.hits.sum()), page_misses=n_load,
                           pages_evicted=plan.evict_cells.numel(),
                           bytes_moved=n_load * self.page_size * self.row_bytes,
                           chunks_resident=plan.chunks_resident,
                           bytes_resident=plan.chunks_resident * self.row_bytes,
                           seconds=time.perf_counter() - t0)
        self.totals["pages_moved"] += stats.page_misses
        self.totals["bytes_moved"] += stats.bytes_moved
        self.totals["page_hits"] += stats.page_hits
        self.totals["pages_evicted"] += stats.pages_evicted
        self.cycle += 1
        return stats

    def _copy_pages(self, plan: OffloadPlan) -> None:
        """One batched host -> device copy of the planned pages into their cells."""
        n = plan.load_b.numel()
        # 2-D views: index_select over whole page rows is a plain memcpy per page.
        host_pages = self.history.data.view(-1, self.page_size * self.row_bytes)
        src = plan.load_b * (self.history.capacity // self.page_size) + plan.load_p  # int64
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous copy may still be reading staging
        if self._staging is None or self._staging.shape[0] < n:
            grown = 2 * (0 if self._staging is None else self._staging.shape[0])
            self._staging = torch.empty(max(n, grown),
                                        self.page_size, self.row_bytes, dtype=torch.uint8,
                                        pin_memory=self.history.pin_memory)
        staging = self._staging[:n]
        torch.index_select(host_pages, 0, src, out=staging.view(n, -1))
        if self._stream is None:
            self.reserve.index_copy_(0, plan.load_cell.to(self.device), staging.to(self.device))
            return
        current = torch.cuda.current_stream(self.device)
        # Cells being overwritten may still be read by work queued before this cycle.
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            pages = staging.to(self.device, non_blocking=True)
            cells = plan.load_cell.to(self.device, non_blocking=True)
            self.reserve.index_copy_(0, cells, pages)
            pages.record_stream(self._stream)
            self._copy_done = torch.cuda.Event()
            self._copy_done.record(self._stream)
        current.wait_event(self._copy_done)  # the lookup-table update below comes after the bytes

    def _drop_cells(self, cells: torch.Tensor) -> None:
        """Empty ``cells`` and unmap their chunks (used when a copy into them failed)."""
        for c in cells.tolist():
            b, p = int(self.cell_row[c]), int(self.cell_page[c])
            if b >= 0:
                self.page_cell[b, p] = -1
            self.cell_row[c] = self.cell_page[c] = self.cell_loaded[c] = self.cell_used[c] = -1
            self.cell_valid[c] = 0
        # A commit cut short may have pointed pages at these cells before recording the owner.
        self.page_cell[torch.isin(self.page_cell, cells)] = -1
        dead = torch.zeros(self.n_cells + 1, dtype=torch.bool, device=self.device)
        dead[cells.to(self.device)] = True
        cell_of = torch.where(self._lookup >= 0, self._lookup // self.page_size, self.n_cells)
        self._lookup.masked_fill_(dead[cell_of], -1)

    def _commit(self, plan: OffloadPlan, mask: torch.Tensor) -> None:
        """Bookkeeping and the lookup table, after the bytes are in place."""
        ev = plan.evict_cells
        if ev.numel():
            self.page_cell[self.cell_row[ev], self.cell_page[ev]] = -1
            self.cell_row[ev] = self.cell_page[ev] = self.cell_loaded[ev] = self.cell_used[ev] = -1
            self.cell_valid[ev] = 0
        cells = plan.load_cell
        if cells.numel():
            self.page_cell[plan.load_b, plan.load_p] = cells
            self.cell_row[cells], self.cell_page[cells] = plan.load_b, plan.load_p
            self.cell_valid[cells] = plan.load_valid
            self.cell_loaded[cells] = torch.arange(cells.numel()) + self._load_seq
            self._load_seq += cells.numel()
        need_b, need_p = plan.need.nonzero(as_tuple=True)
        self.cell_used[self.page_cell[need_b, need_p]] = self.cycle
        # Lookup table: slot of every chunk in the set, -1 elsewhere (computed on the device).
        B, N = mask.shape
        P = plan.need.shape[1]
        ps = self.page_size
        page_cell = self.page_cell[:, :P].to(self.device)
        n = torch.arange(N, device=self.device, dtype=torch.int64)
        slot = page_cell.repeat_interleave(ps, dim=1)[:, :N] * ps + (n % ps)[None, :]
        self._lookup.fill_(-1)
        self._lookup[:, :N] = torch.where(mask.to(self.device), slot, torch.full_like(slot, -1))

    # --- reading ------------------------------------------------------------------------------
    def read(self, chunks: torch.Tensor):
        """Rows of ``chunks`` (int64 ``[B, S]``, -1 = none) read through the lookup table.

        Returns ``(rows [B, S, *row_shape] of the payload dtype, present bool [B, S])``;
        non-resident chunks read as zeros. Only the device reserve is touched.
        """
        V.tensor("chunks", chunks, integer=True, ndim=2)
        _has_data("chunks", chunks)
        if chunks.shape[0] != self.batch:
            raise ValueError(f"chunks must be [{self.batch}, S], got {V.describe(chunks)}")
        chunks = chunks.to(self.device, torch.int64)
        inside = (chunks >= 0) & (chunks < self._lookup.shape[1])
        slot = self._lookup.gather(1, torch.where(inside, chunks, torch.zeros_like(chunks)))
        present = inside & (slot >= 0)
        flat = self.reserve.view(-1, self.row_bytes)
        rows = flat.index_select(0, torch.where(present, slot, torch.zeros_like(slot)).flatten())
        rows = rows.view(*chunks.shape, self.row_bytes) * present[..., None].to(torch.uint8)
        if self.dtype != torch.uint8:
            rows = rows.view(self.dtype)
        return rows.view(*chunks.shape, *self.row_shape), present

    def check_consistency(self) -> None:
        """Raise ``RuntimeError`` if any cell, page-table or lookup entry disagrees with the
        host."""
        ps = self.page_size
        for c in range(self.n_cells):
            b, p = int(self.cell_row[c]), int(self.cell_page[c])
            if b < 0:
                continue
            if int(self.page_cell[b, p]) != c:
                raise RuntimeError(f"cell {c} holds (row {b}, page {p}) but the page table says "
                                   f"{int(self.page_cell[b, p])}")
            v = int(self.cell_valid[c])
            host = self.history.data[b, p * ps:p * ps + v]
            if not torch.equal(self.reserve[c, :v].cpu(), host):
                raise RuntimeError(f"cell {c} bytes differ from host (row {b}, page {p})")
        lookup = self._lookup.cpu()
        rows, chunks = (lookup >= 0).nonzero(as_tuple=True)
        for b, n in zip(rows.tolist(), chunks.tolist()):
            slot = int(lookup[b, n])
            c, off = divmod(slot, ps)
            if (int(self.page_cell[b, n // ps]) != c or off != n % ps
                    or off >= int(self.cell_valid[c])):
                raise RuntimeError(f"lookup[{b}, {n}] = {slot} does not point at that chunk")
