"""The engine's memory plan: what must fit in the CPU and device budgets, checked before any work.

CPU budget (``offload.cpu_mem``) covers everything the engine allocates in CPU memory:

* ``optimizer buffers``: the out-of-core AdamW's chunk buffers (``OutOfCoreAdamW.max_buffer_bytes``);
* ``weight buffers``: ``prefetch_depth + 1`` stages' compute weights read from SSD (stages not cached);
* ``gradients in flight``: ``max_pending + 2`` stages' flattened gradients on their way to the optimizer;
* on a CPU compute device, what a GPU would otherwise hold: stage-input checkpoints, the working
  memory of one stage's recompute and backward (an estimate: 4 bytes x batch x seq x (16 d + 4 ff)
  plus attention scores and, for the head, three logits-sized tensors), gradient accumulators
  (``grad_accum > 1``: 4 bytes per parameter) and the tied embedding's pending gradient;
* ``I/O bounce buffers`` of the store's threads, and a fixed ``allocator and thread slack``
  (``engine.RUNTIME_SLACK``, measured);
* ``weight cache``: whatever is left, filled with stages' compute weights in forward order.

Not counted: the *fixed overhead* of the process before the engine starts (interpreter, torch and
its libraries, the token arrays), measured as resident memory at engine start and reported. The
promise is: peak resident memory <= fixed overhead + ``cpu_mem``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fuyou.errors import BudgetError
from fuyou.units import format_size


@dataclass
class MemoryPlan:
    cpu_budget: int
    cpu_items: dict[str, int] = field(default_factory=dict)
    device_budget: int | None = None
    device_items: dict[str, int] = field(default_factory=dict)
    cached_stages: list[int] = field(default_factory=list)
    cache_bytes: int = 0

    @property
    def cpu_required(self) -> int:
        return sum(self.cpu_items.values())

    @property
    def device_required(self) -> int:
        return sum(self.device_items.values())

    def check(self) -> None:
        if self.cpu_required > self.cpu_budget:
            raise BudgetError(
                f"the CPU memory budget {format_size(self.cpu_budget)} cannot hold the engine's minimum of "
                f"{format_size(self.cpu_required)}:\n{_lines(self.cpu_items)}\nraise offload.cpu_mem (--cpu-mem) to at "
                f"least {format_size(self.cpu_required)}, or lower the batch, sequence length, prefetch_depth, "
                f"optimizer_chunk or grad_accum"
            )
        if self.device_budget is not None and self.device_required > self.device_budget:
            raise BudgetError(
                f"the device memory budget {format_size(self.device_budget)} cannot hold one stage's working set "
                f"of {format_size(self.device_required)}:\n{_lines(self.device_items)}\nraise offload.gpu_mem "
                f"(--gpu-mem), or lower train.micro_batch_size, data.seq_len or offload.prefetch_depth"
            )

    def describe(self) -> str:
        out = [f"CPU budget {format_size(self.cpu_budget)}:"]
        out += [f"  {k:<26} {format_size(v):>12}" for k, v in self.cpu_items.items()]
        out.append(f"  {'weight cache':<26} {format_size(self.cache_bytes):>12} ({len(self.cached_stages)} stages)")
        if self.device_items:
            b = "unlimited" if self.device_budget is None else format_size(self.device_budget)
            out.append(f"device budget {b}:")
            out += [f"  {k:<26} {format_size(v):>12}" for k, v in self.device_items.items()]
        return "\n".join(out)


def _lines(items: dict[str, int]) -> str:
    return "\n".join(f"  {k}: {format_size(v)}" for k, v in items.items())


def activation_bytes(cfg_model, batch: int, seq: int) -> dict[str, int]:
    """Estimated device bytes of stage inputs and of one stage's recompute+backward working set."""
    d, ff, h, v = cfg_model.d_model, cfg_model.ff_dim, cfg_model.n_head, cfg_model.vocab_size
    tokens = batch * seq
    checkpoint = 4 * tokens * d
    block = 4 * tokens * (16 * d + 4 * ff) + 4 * batch * h * seq * seq
    head = 3 * 4 * tokens * v + 8 * tokens * d
    return {"checkpoint": checkpoint, "block_work": block, "head_work": head}
