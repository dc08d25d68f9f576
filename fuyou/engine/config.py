"""Offload settings: where the training state lives and the memory budgets that must be kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fuyou.units import parse_size


#: a run's SSD state directory is ``<run name>.fuyou-state`` in each SSD directory (data parallel: rank r > 0's
#: ``<run name>.fuyou-state.rank<r>``, ``fuyou.distributed``); ``fuyou.engine.commit.state_name``
STATE_SUFFIX = ".fuyou-state"


def no_storage(d: str) -> bool:
    """A pseudo file system (proc, sysfs: no blocks, and a directory cannot be made there). Some network file
    systems report no blocks too, and do hold files: those are tried with a directory made and removed."""
    import os
    import tempfile

    try:
        if os.statvfs(d).f_blocks:
            return False
        os.rmdir(tempfile.mkdtemp(dir=d, prefix=".fuyou-probe-"))
        return False
    except OSError:
        return True


class OffloadConfig(BaseModel):
    """'none' trains in memory (the reference); 'ssd' keeps fp32 weights and Adam moments on SSDs."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "ssd"] = Field(
        "none", description="'none': in-memory training; 'ssd': the three-tier engine (SSD, CPU, GPU)."
    )
    ssd_dirs: list[str] = Field(
        default_factory=list,
        description="Directories on the SSDs (one per drive; large tensors are striped across all of them).",
    )
    cpu_mem: int = Field(
        8 * 1024**3, ge=0, description="CPU memory budget in bytes (or '8GiB'); peak resident memory stays under it."
    )
    gpu_mem: int | None = Field(
        None, ge=0, description="GPU memory budget in bytes (or '20GiB'); default: the device's free memory."
    )
    prefetch_depth: int = Field(2, ge=1, description="Stages whose weights are fetched ahead of compute.")
    cache_weights: bool = Field(
        True, description="Keep compute-precision weights in CPU memory as far as the budget allows (else SSD)."
    )
    handoff_weights: bool = Field(
        True, description="Where the master weights are the compute weights (optim.master=bf16 under bf16, fp32 under "
        "fp32), keep the weights a streamed stage's backward read for its update, which then reads no master from the "
        "SSD: when the memory plan finds the buffers (max_pending_updates + 2 stages) save more SSD bytes than the "
        "weight cache would in their place. false: updates read every master the cache does not hold from the SSD.",
    )
    resident_mem: int | None = Field(
        None, ge=0, description="CPU memory (bytes or '2GiB') for fp32 master weights and Adam moments of the stages "
        "updated last (embedding, first blocks), kept resident after the weight cache: their updates read nothing "
        "from SSD and stop delaying the next step's forward; the state is still written to SSD every step. "
        "Default: whatever the budget leaves; 0: none.",
    )
    resident_spare: bool = Field(
        True, description="Under exact clipping (train.grad_clip), a second copy of the last resident stages' state "
        "in the CPU memory the resident state leaves over (within resident_mem): their updates read one copy and "
        "write the other during backward, like streamed stages, instead of waiting for the gradient norm; a redo "
        "reads the intact copy. false: none.",
    )
    optimizer_chunk: int = Field(
        1 << 20, ge=1, description="Elements per chunk of the out-of-core AdamW pipeline (rounded to the store's blocks)."
    )
    optimizer_depth: int = Field(2, ge=1, description="Chunks read ahead and written behind by the out-of-core AdamW.")
    optimizer_threads: int | None = Field(
        None, ge=1, description="Threads of the AdamW kernel (default: torch's thread count)."
    )
    max_pending_updates: int = Field(
        2, ge=1, description="Stage updates queued for the optimizer before backward waits (bounds gradient memory)."
    )
    act_policy: str = Field(
        "recompute",
        description="Activation policy: 'recompute', rules such as 'fc2,proj=ssd' or '30-39:all=gpu' "
        "(see fuyou/policy.py), or a policy JSON file from `fuyou plan --json`.",
    )
    checkpoint_dtype: Literal["fp32", "compute", "auto"] = Field(
        "fp32", description="dtype of the block-input checkpoints the activation policy does not set: 'fp32' (exact), "
        "'compute' (train.precision's: 2 bytes under bf16, the block's input rounded to bf16 in forward and "
        "backward alike, as Megatron-LM's bf16 residual; fuyou/policy.py, Note: [Checkpoint dtype]), 'auto' "
        "(`fuyou plan` and --plan auto choose per block: fp32 everywhere when every checkpoint fits on the GPU in "
        "fp32; else bf16 for those the GPU keeps, twice as many, and fp32 for those that go off it).",
    )
    act_cpu_mem: int | None = Field(
        None, ge=0, description="CPU memory for activations of tier 'cpu' (bytes or '1GiB'); beyond it they "
        "overflow to SSD. Default: a quarter of cpu_mem when the policy uses the cpu tier, else 0.",
    )
    act_chunk: int = Field(8 * 1024**2, ge=4096, description="Bytes per staging chunk of the activation swap pipeline "
                           "(rounded up to whole checksum blocks of the store, 1 MiB).")
    act_staging_chunks: int = Field(4, ge=1, description="Staging chunks of the activation swap pipeline (bounds its CPU memory).")
    act_prefetch_blocks: int = Field(2, ge=0, description="Blocks whose kept activations are fetched back ahead of backward.")
    io_threads: int = Field(8, ge=1, description="SSD I/O threads (requests in flight at the drives).")
    verify_checksums: bool = Field(True, description="Check a CRC32 of every block read back from the SSD.")
    commit: Literal["cow", "none"] = Field(
        "cow", description="'cow': crash-safe commits of the fp32 state on SSD (a second copy, a third with exact "
        "clipping and an interval: fuyou/engine/layout.py), so a killed run resumes exactly from the last commit "
        "(`fuyou train --resume RUN_DIR`); 'none': no commits, no resume.",
    )
    commit_every: int | str = Field(
        "10min", description="How often a crash-safe commit is made: a number of steps (1: every step) or a time "
        "('30s', '10min', '1h'; committed at the first step boundary after it). A commit writes the resident "
        "optimizer state to SSD and fsyncs; a run also commits when it ends or is stopped. Resume restarts at the "
        "last commit, bit-exactly.",
    )
    clip_schedule: Literal["auto", "speculate", "defer"] = Field(
        "auto", description="Exact clipping's schedule: 'speculate' updates each stage during backward and redoes "
        "the step's updates when the norm exceeds train.grad_clip; 'defer' saves gradients to SSD and updates after "
        "backward (no overlap, no redo); 'auto' speculates unless the previous step clipped.",
    )
    stall_timeout: float = Field(
        600.0, gt=0, description="Seconds any wait of the engine (a weight load, a pool buffer, the optimizer, an "
        "SSD request, an activation) may last before the run stops with an error naming what it waited for "
        "(the last commit stays intact). Waits for a large transfer get at least bytes / 20 MB/s; a collective "
        "between data-parallel ranks at least 60 s (torch.distributed's deadline: a rank may be committing).",
    )
    replace_state: bool = Field(
        False, description="A new run whose name already has a committed SSD state deletes it and starts afresh "
        "(default: refused, so that `--resume` can continue it). A state that was never committed (a run killed "
        "before its first commit) is always replaced.",
    )
    keep_state: bool = Field(
        False, description="Keep the SSD training state after a completed run (default: delete it once the weights are "
        "saved; a stopped or failed run always keeps it for --resume)."
    )

    @field_validator("commit_every", mode="before")
    @classmethod
    def _interval(cls, v):
        if isinstance(v, bool):
            raise ValueError("offload.commit_every is a number of steps (>= 1) or a time such as '10min'")
        if isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()):
            if int(v) < 1:
                raise ValueError("offload.commit_every must be at least 1 step (or a time such as '10min')")
            return int(v)
        from fuyou.units import parse_duration

        try:
            secs = parse_duration(v)
        except Exception as e:  # ConfigError: pydantic needs a ValueError to report the field
            raise ValueError(str(e)) from None
        if secs <= 0:  # (as 0 steps is: '0s' was taken, "commits every 0s", a pass)
            raise ValueError(f"offload.commit_every={v!r}: a time must be above 0 (or give 1 for every step)")
        return v

    @property
    def commit_steps(self) -> int | None:
        """The commit interval in steps, or None when it is a time (``commit_secs``)."""
        return self.commit_every if isinstance(self.commit_every, int) else None

    @property
    def commit_secs(self) -> float | None:
        from fuyou.units import parse_duration

        return None if isinstance(self.commit_every, int) else parse_duration(self.commit_every)

    def store_config(self):
        """The SSD store these settings make (``fuyou.store.StoreConfig``): the engine builds it, and the planner
        counts its bounce buffers by it (the plan had its own, which left out offload.io_threads: a pass)."""
        from fuyou.store import StoreConfig

        return StoreConfig(queue_depth=self.io_threads, verify_checksums=self.verify_checksums)

    def steps_per_commit(self, step_s: float) -> float:
        """Steps between two commits at ``step_s`` seconds a step: the interval in steps, or a time's worth
        of steps (committed at the first step boundary after it: at most once a step). The planner's and the
        end-of-run summary's commit cadence."""
        return self.commit_steps or max(1.0, self.commit_secs / max(step_s, 1e-9))

    @field_validator("ssd_dirs", mode="before")
    @classmethod
    def _one_dir(cls, v):
        v = [v] if isinstance(v, str) else v  # (~ as a shell would, as data.path and run.out_dir: a pass)
        return [os.path.expanduser(d) if isinstance(d, str) else d for d in v] if isinstance(v, list) else v

    @field_validator("cpu_mem", "gpu_mem", "act_cpu_mem", "act_chunk", "resident_mem", mode="before")
    @classmethod
    def _size(cls, v):
        return None if v is None else parse_size(v)

    @model_validator(mode="after")
    def _check_dirs(self) -> "OffloadConfig":
        if self.mode == "ssd":
            if not self.ssd_dirs:
                raise ValueError("offload.mode='ssd' needs at least one directory in offload.ssd_dirs (--ssd DIR)")
            for d in self.ssd_dirs:
                if not str(d).strip():  # (--ssd '' was "on a file system with no storage": a pass)
                    raise ValueError("an SSD directory is an empty path; give a directory on the SSD (--ssd DIR)")
                if Path(d).exists() and not Path(d).is_dir():
                    raise ValueError(f"SSD directory {d!r} is a file, not a directory; give a directory on the SSD")
                if not Path(d).is_dir():
                    raise ValueError(f"SSD directory {d!r} does not exist; create it first (a resume whose SSD "
                                     f"directories moved: give their new place with --ssd)")
                inside = next((p for p in (Path(d).resolve(), *Path(d).resolve().parents)
                               if p.name.endswith(STATE_SUFFIX) or STATE_SUFFIX + ".rank" in p.name), None)
                if inside is not None:  # (a new-user pass: the run that owned it deleted the state inside)
                    raise ValueError(f"SSD directory {d!r} is inside {inside}, a run's SSD state, which fuyou "
                                     f"deletes when that run ends; give the directory that holds the states")
                if no_storage(d):  # (/proc passed, and the state's mkdir failed as "deleted while in use": a pass)
                    raise ValueError(f"SSD directory {d!r} is on a file system with no storage (such as /proc or "
                                     f"/sys); give a directory on the SSD")
        return self
