"""Reading a cubin without a GPU: resource usage and the steady-state loop's instruction mix.

Both come from the NVIDIA tools shipped inside the Triton wheel (``triton/backends/nvidia/bin``):
``cuobjdump --dump-resource-usage`` (registers, stack frame) and ``cuobjdump --dump-sass`` (one
SASS instruction a line, ``/*0a40*/  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], ... ;``).

The cost model of the compile report (design §12) counts, per warp and per tile of work:

* instructions: SASS instructions a warp issues for one tile. A persistent kernel's tile is one
  trip of its steady-state loop, the backward-branch range (a ``BRA`` whose target lies below
  it) that holds the tensor-core instructions; a one-tile-per-program kernel's tile is the
  whole program. Loops nested inside the tile (a runtime layer loop) count ``inner_trips``
  times.
* tensor-core instructions (``HGMMA``/``QGMMA`` on sm_90, ``HMMA`` on sm_80, ``QMMA`` for fp8
  on sm_89) and global loads
  (``LDG``, ``LDGSTS``, the bulk/tensor copies) in the same range, weighted the same way.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import triton

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;")
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\S+)?\s+(?:`?\(?)(0x[0-9a-f]+)")
MMA_OPS = ("HGMMA", "QGMMA", "HMMA", "QMMA", "IMMA")
GLOBAL_LOAD_OPS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP", "LDGDEPBAR")


def tool(name: str) -> str:
    return os.path.join(_BIN, name)


def _run_on_cubin(cubin: bytes, args: list[str]) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool("cuobjdump"), *args, f.name], capture_output=True,
                              text=True, check=False).stdout


def resource_usage(cubin: bytes) -> dict:
    """``regs``, ``stack_bytes`` and ``local_bytes`` per thread (``n_regs`` of a compiled kernel
    is only filled once it is loaded on a GPU)."""
    out = _run_on_cubin(cubin, ["--dump-resource-usage"])
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump reported no resource usage:\n{out[-2000:]}")
    return {"regs": int(found["REG"]), "stack_bytes": int(found["STACK"]),
            "local_bytes": int(found["LOCAL"])}


def disassemble(cubin: bytes) -> list[tuple[int, str]]:
    """``[(address, instruction text)]`` of the cubin's one kernel, trailing padding dropped."""
    text = _run_on_cubin(cubin, ["--dump-sass"])
    ins = [(int(a, 16), body) for a, body in _LINE.findall(text)]
    if not ins:
        raise RuntimeError("cuobjdump printed no SASS")
    while ins and (ins[-1][1].startswith("NOP") or _self_branch(ins[-1])):
        ins.pop()
    return ins


def _opcode(body: str) -> str:
    body = re.sub(r"^@!?U?P\w+\s+", "", body)
    return body.split()[0] if body else ""


def _self_branch(instr) -> bool:
    m = _BRANCH.match(instr[1])
    return bool(m) and int(m.group(1), 16) == instr[0]


def loops(ins) -> list[tuple[int, int]]:
    """Backward-branch ranges ``(first address, branch address)``."""
    out = []
    for addr, body in ins:
        m = _BRANCH.match(body)
        if m and int(m.group(1), 16) < addr:
            out.append((int(m.group(1), 16), addr))
    return out


def mma_flops(op: str) -> tuple[int, int]:
    """``(FLOP, warps that issue it together)`` of one tensor-core instruction: ``HGMMA`` /
    ``QGMMA.MxNxK`` are warpgroup-wide (4 warps), ``HMMA.16816`` (m16 n8 k16), ``HMMA.16832``
    and ``QMMA.16832`` (fp8 on sm_89) and ``HMMA.1688`` per warp."""
    m = re.match(r"[HQ]GMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)), 4
    m = re.match(r"[HQ]MMA\.(16832|16816|1688|884)", op)
    if m:
        mnk = {"16832": (16, 8, 32), "16816": (16, 8, 16), "1688": (16, 8, 8),
               "884": (8, 8, 4)}[m.group(1)]
        return 2 * mnk[0] * mnk[1] * mnk[2], 1
    return 0, 1


@dataclasses.dataclass
class TileCounts:
    instructions: float  # per warp per tile
    mma: float
    global_loads: float
    mma_flops_per_warp: float  # tensor-core FLOP a warp takes part in (per warpgroup op: 1/4)
    loop: tuple[int, int] | None  # the steady-state loop's address range, None: whole program
    opcodes: dict  # opcode -> weighted count in the tile


def tile_counts(ins, persistent: bool, inner_trips: int = 1,
                innermost: bool = False) -> TileCounts:
    """Count one tile's instructions (see the module docstring). ``persistent``: the tile is one
    trip of the outermost loop holding tensor-core instructions (``innermost``: the innermost
    one, for a tile loop nested in a walk over requests; without any, the largest loop; error
    if there is no loop); otherwise the whole program. Loops nested inside count
    ``inner_trips`` times each level."""
    all_loops = loops(ins)
    region = (ins[0][0], ins[-1][0])
    outer = None
    if persistent:
        mma_addrs = [a for a, b in ins if _opcode(b).split(".")[0] in MMA_OPS]
        holding = [lp for lp in all_loops if any(lp[0] <= a <= lp[1] for a in mma_addrs)]
        if not mma_addrs:
            holding = all_loops  # no tensor cores (the exact fp32 mode): the largest loop
        if not holding:
            raise RuntimeError("persistent kernel without a loop around its tensor-core work")
        pick = min if innermost and mma_addrs else max
        outer = pick(holding, key=lambda lp: lp[1] - lp[0])
        region = outer
    inner = [lp for lp in all_loops if lp != outer and region[0] <= lp[0] and lp[1] <= region[1]]
    counts = {"instructions": 0.0, "mma": 0.0, "global_loads": 0.0, "mma_flops_per_warp": 0.0}
    opcodes: dict[str, float] = {}
    for addr, body in ins:
        if not region[0] <= addr <= region[1]:
            continue
        weight = float(inner_trips) ** sum(lo <= addr <= hi for lo, hi in inner)
        op = _opcode(body)
        base = op.split(".")[0]
        counts["instructions"] += weight
        opcodes[base] = opcodes.get(base, 0.0) + weight
        if base in MMA_OPS:
            counts["mma"] += weight
            flop, warps = mma_flops(op)
            counts["mma_flops_per_warp"] += weight * flop / warps
        if base in GLOBAL_LOAD_OPS and base != "LDGDEPBAR":
            counts["global_loads"] += weight
    return TileCounts(loop=outer, opcodes=opcodes, **counts)


# Dense tensor-core FLOP per SM per clock (sm_90: H100/H200; sm_80: A100; sm_89: L40S, whose
# 362 bf16 TFLOP/s over 142 SMs at 2.52 GHz is 1024). fp8 on sm_80 runs as bf16 (the keys are
# decoded). The exact fp32 mode uses no tensor cores: no bound is modeled.
TENSOR_FLOP_PER_CLOCK = {
    ("sm_90", "bf16"): 4096, ("sm_90", "fp8"): 8192, ("sm_90", "tf32"): 2048,
    ("sm_80", "bf16"): 2048, ("sm_80", "fp8"): 2048, ("sm_80", "tf32"): 1024,
    ("sm_89", "bf16"): 1024, ("sm_89", "fp8"): 2048, ("sm_89", "tf32"): 512,
}
SCHEDULERS_PER_SM = 4
# Per-SM limits: registers, shared memory (and the 1 KB the driver reserves per CTA), warps, CTAs.
SM_LIMITS = {"sm_90": dict(regs=65536, smem=233472, warps=64, ctas=32),
             "sm_80": dict(regs=65536, smem=167936, warps=64, ctas=32),
             "sm_89": dict(regs=65536, smem=102400, warps=48, ctas=24)}


def ctas_per_sm(target: str, regs: int, smem_bytes: int, warps: int) -> int:
    """Occupancy from registers (allocated per warp in 256-register units), shared memory and
    the warp and CTA limits."""
    lim = SM_LIMITS[target]
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (lim["regs"] // per_warp) // warps if per_warp else lim["ctas"]
    by_smem = lim["smem"] // (smem_bytes + 1024)
    return max(0, min(by_regs, by_smem, lim["warps"] // warps, lim["ctas"]))


def issue_bound(target: str, precision: str, flops_per_tile: float, instructions: float,
                warps: int) -> tuple[float | None, float | None, float]:
    """``(bound, tensor cycles, issue cycles)`` per tile: ``tensor / max(tensor, issue)`` with
    ``issue = instructions per warp x warps / 4`` (4 schedulers, one instruction a clock each)
    and ``tensor = FLOPs / the SM's dense rate``. ``None`` where no tensor cores are used."""
    issue = instructions * warps / SCHEDULERS_PER_SM
    rate = TENSOR_FLOP_PER_CLOCK.get((target, precision))
    if rate is None:
        return None, None, issue
    tensor = flops_per_tile / rate
    return tensor / max(tensor, issue), tensor, issue
