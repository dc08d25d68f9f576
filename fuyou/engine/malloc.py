"""glibc tuning and resident-memory readings: how the engine keeps its CPU memory within the plan.

The plan (``budget.py``) counts what the engine allocates; glibc decides how much of what is freed it
keeps. ``bound_malloc`` sets its thresholds from the block sizes the engine will allocate, so peak
resident memory stays within fixed overhead + ``offload.cpu_mem`` without making compute pay page
faults for its temporaries. ``resident_bytes`` reads what the process holds (the figure the budget
promise is checked against).
"""

from __future__ import annotations

import ctypes
from pathlib import Path


def bound_malloc(threshold: int = 256 * 1024, trim: int | None = None) -> None:
    """Bound what glibc keeps resident, without making compute pay page faults for its temporaries.

    By default glibc raises its mmap threshold dynamically (up to 32 MiB) after large blocks are
    freed, and gives each thread its own arena; both let resident memory drift above what the engine
    holds. Fixing the mmap threshold at ``threshold``, trimming free heap beyond ``trim`` (default:
    ``threshold``) and capping arenas at 2 keeps peak resident memory within the plan. The engine
    passes the size of a block's largest temporary (:func:`malloc_threshold`) and, as ``trim``, a
    block's gradients plus that: temporaries up to that size come from the heap and are reused from
    one block to the next (the plan's working-memory item holds them), while stage-sized blocks
    (weights, flattened gradients) are mmap'ed and go back to the OS when freed. A fixed 256 KiB (the
    earlier setting) kept the budget too, but made every temporary above it a fresh mmap whose pages
    faulted in on first touch: measured on a GPT-3 350M block (b1 s512, bf16, 2 cores) forward 31.7
    -> 22.9 ms and backward 65.0 -> 43.2 ms with a 32 MiB threshold. A trim threshold below a block's
    gradients returns them to the OS after every block and faults them in again in the next one
    (GPT d=768, b1 s64: 3,100 faults, 6.4 -> 14 ms per block backward). No-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, int(trim if trim is not None else threshold))  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim(0), which also releases free pages in
    the middle of the heap, not only at its top). A step's and an evaluation's temporaries below the mmap
    threshold come from the heap in another order each time; what they free there stays resident, and the
    next pass's temporaries are laid out beside it: measured on a LoRA step (Llama, vocabulary 32k, 2 cores)
    144 MiB of free heap at the evaluation after a step, which took the run 20-30 % over its CPU budget
    (a planner pass). Called by the engine after the head, between steps and after evaluations, where
    compute runs on the CPU. What it costs: the walk (about 15 ms for 144 MiB of free heap in 64 KiB
    pieces, a review's C measurement) and the pages faulted in again by the next pass (about 60 ms for
    those); on that LoRA run the step's tokens/s did not move (1.22-1.30k before, 1.25-1.26k after, 2 cores).
    No-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def malloc_threshold(cfg_model, batch: int, seq: int, grad_bytes: int = 0) -> int:
    """The largest temporary of one block's forward or backward, rounded up to a power of two above
    it, within [256 KiB, 32 MiB] (glibc's range): an activation (fp32 B x T x max(d, ff)), the
    attention scores (B x H x T x T), or ``grad_bytes``, the gradient of the block's largest weight,
    which autograd allocates fresh for every block. Below this size a block's temporaries come from
    the heap and are reused from one block to the next; with weight gradients left out, each of them
    was an mmap that faulted in on first touch (measured: GPT d=768, b1 s64, bf16, 2 cores, 2,300
    page faults and +3.4 ms on a 6.5 ms block backward)."""
    d, ff = cfg_model.d_model, cfg_model.ff_dim
    biggest = max(4 * batch * seq * max(d, ff), 4 * batch * cfg_model.n_head * seq * seq, grad_bytes)
    return min(32 * 1024 * 1024, max(256 * 1024, 1 << int(biggest).bit_length()))


def resident_bytes(field: str = "VmRSS") -> int:
    """Resident memory of this process from /proc/self/status (VmRSS now, VmHWM peak); 0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
