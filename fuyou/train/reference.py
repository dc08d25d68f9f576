"""The in-memory reference trainer: plain PyTorch on the stage model.

Every parameter, gradient and Adam moment lives in memory on one device. This is ``--offload none``
and the ground truth of every equivalence test: the offloaded engine must reproduce its weights
(exactly in fp32 where the arithmetic order matches).

One optimizer step: for each of ``grad_accum`` micro-batches, the loss divided by ``grad_accum`` is
back-propagated (gradients accumulate in fp32, in micro-batch order; a tied embedding's two uses are
summed over the micro-batches separately, then added); then the global gradient norm is clipped, the
learning rate set from the schedule and ``torch.optim.AdamW(fused=True)`` (fp32) steps. The fused
variant because fuyou's CPU kernel reproduces it bit for bit (the single-tensor one differs by an
ulp: torch's CPU ``sqrt`` there is not correctly rounded), so the engine can match exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fuyou.config import FuyouConfig
from fuyou.errors import ConfigError, NonFiniteError
from fuyou.data import TokenData
from fuyou.data.batches import check_sequence_length, make_batches
from fuyou.models.precision import autocast, round_stage_input
from fuyou.optim.compressed import StateFormat, decode_state, new_state, reference_adamw_, sr_key
from fuyou.policy import stage_input_dtypes
from fuyou.trainer import EvaluationStopped, StepStats
from fuyou.models import StageModel
from fuyou.models.lora import attach, dropout_key, init_adapters
from fuyou.optim.schedule import lr_of


def resolve_device(name: str) -> torch.device:
    if name == "fake":  # the engine's fake CUDA device computes on the CPU (fuyou.engine.device)
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but no CUDA GPU is available; use train.device=cpu or auto")
    return torch.device(name)


def param_groups(model: StageModel, params: dict[str, Tensor], weight_decay: float) -> list[dict]:
    specs = model.param_specs()
    decay = [params[k] for k, s in specs.items() if s.decay]
    no_decay = [params[k] for k, s in specs.items() if not s.decay]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_in_memory_fits(cfg: FuyouConfig, model: StageModel, device: torch.device) -> None:
    """Refuse, with the numbers, an in-memory run that cannot fit the machine (before allocating it):
    fp32 weights, gradients and Adam moments (16 B/param) and the activations autograd keeps for every
    block of a micro-batch (the engine's per-block estimate, ``budget.activation_bytes``)."""
    from fuyou.engine.budget import activation_bytes
    from fuyou.errors import BudgetError
    from fuyou.units import format_size

    act = activation_bytes(cfg.model, cfg.train.micro_batch_size, cfg.data.seq_len)
    need = {"weights, gradients and Adam moments (16 B/param)": 16 * model.num_params,
            "activations of one micro-batch (estimate)": cfg.model.n_layer * act["block_work"] + act["head_work"]}
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[0], "free GPU memory"
    else:
        have, where = _available_memory(), "available CPU memory"
    if have and sum(need.values()) > have:
        items = "; ".join(f"{k} {format_size(v)}" for k, v in need.items())
        raise BudgetError(f"training in memory needs about {format_size(sum(need.values()))} ({items}), more than "
                          f"the {format_size(have)} of {where}: lower train.micro_batch_size or data.seq_len, or "
                          f"keep the training state on SSD (--offload ssd --ssd DIR)")


def _available_memory() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ReferenceTrainer:
    """In-memory training of ``StageModel`` (see the module docstring)."""

    def __init__(self, cfg: FuyouConfig, data: TokenData | None | Callable[[], TokenData | None], init_values=None):
        """``data``: the tokens, or a function that loads them, called once the model is known to fit
        (as the engine's). ``init_values(stage) -> {global key: fp32 tensor}``: initial weights (default:
        seeded init)."""
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.model = StageModel(cfg.model)
        check_sequence_length(cfg)
        check_in_memory_fits(cfg, self.model, self.device)
        if callable(data):
            data = data()
        init = init_values or (lambda stage: stage.init_params(cfg.train.seed))
        self.lora = attach(self.model, cfg.lora)  # LoRA: the base is frozen, the adapters train
        if self.lora and cfg.lora.base != "compute":  # the quantised base's values (fuyou/models/quant.py)
            from fuyou.models.quant import fake_quantise

            plain = init
            init = lambda st: fake_quantise(st, plain(st), cfg.lora.base)  # noqa: E731
        self.params = {
            k: v.to(self.device).requires_grad_(not self.lora) for st in self.model.stages for k, v in init(st).items()
        }
        if cfg.lora.init_from:  # a PEFT adapter's A and B (fuyou.hf.peft.load_peft_adapter)
            from fuyou.hf.peft import load_peft_adapter

            start = load_peft_adapter(cfg.lora.init_from, self.model.stages, cfg.model.family, cfg.lora)
        else:
            start = {k: v for st in self.model.stages for k, v in init_adapters(st, cfg.lora, cfg.train.seed).items()}
        self.adapters = {k: v.to(self.device).requires_grad_(True) for k, v in start.items()}
        o = cfg.optim
        self.fmt = StateFormat.of(o)
        if self.lora:  # the adapters are matrices: weight decay applies to them (as transformers' Trainer does)
            self.opt = torch.optim.AdamW([{"params": list(self.adapters.values()), "weight_decay": o.weight_decay}],
                                         lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        elif self.fmt.exact:
            self.opt = torch.optim.AdamW(
                param_groups(self.model, self.params, o.weight_decay),
                lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True,
            )
        else:  # compressed state (fuyou/optim/compressed.py): the reference math on each stage's flat state
            self.opt = CompressedReference(self.model, self.params, o, cfg.train.seed)
        self.batches, self.eval_batches = make_batches(cfg, data)
        self.clipping = cfg.train.grad_clip is not None
        # Blocks whose input the engine rounds for a bf16 checkpoint (fuyou/policy.py, Note: [Checkpoint
        # dtype]): training rounds them here too; evaluation does not, in either.
        self.rounded = stage_input_dtypes(cfg)
        self.start_step, self.resumed, self.failed, self.completed = 0, False, False, False
        self.trace_step = -1  # nothing to trace: one process, no background work

    # -- the Trainer protocol (fuyou.trainer) beyond stepping and evaluating -----------------------------
    def startup_lines(self) -> list[str]:
        if not self.lora:
            return []
        n = sum(v.numel() for v in self.adapters.values())
        base = f", over the {self.cfg.lora.base} base" if self.cfg.lora.base != "compute" else ""
        return [f"LoRA: rank {self.cfg.lora.rank} adapters on {', '.join(self.lora)} of every block{base}, {n:,} "
                f"trainable parameters ({100 * n / self.model.num_params:.2f}% of the {self.model.num_params:,} base "
                f"parameters, which stay frozen)"]

    def step_counters(self) -> dict | None:
        return None

    def commit(self, steps_done: int) -> None:
        """In memory nothing outlives the process: there is nothing to commit."""

    def write_trace(self, path) -> None:
        raise NotImplementedError("--trace records the SSD-offloaded engine's tasks (--offload ssd)")

    def state_location(self) -> str | None:
        return None

    def train_step(self, step: int) -> StepStats:
        t = self.cfg.train
        total = 0.0
        head = self.model.stages[-1]
        # A tied LM head reads its weight through a leaf of its own: its gradient and the embedding's
        # are summed over the micro-batches separately and added once (``_add_shared_grads``), the
        # order the layer-major engine can follow without keeping a gradient per micro-batch.
        shared = {g: self.params[g].detach().requires_grad_(not self.lora) for g in head.shared.values()}
        batches = [self.batches.batch(step * t.grad_accum + j) for j in range(t.grad_accum)]
        n_loss = sum(b.loss_tokens for b in batches)  # each token with a target weighs 1 / n_loss
        weights = {**self.params, **self.adapters}
        for j, b in enumerate(batches):
            x, y = b.tokens.to(self.device), b.targets.to(self.device)
            pos = None if b.positions is None else b.positions.to(self.device)
            key = dropout_key(t.seed, step, j)
            with autocast(self.device, t.precision):
                h = x
                for s in self.model.stages[:-1]:
                    if s.index - 1 in self.rounded:  # a block whose checkpoint is bf16
                        h = round_stage_input(h, self.rounded[s.index - 1])
                    h = s.forward(s.bind(weights), h, pos=pos, key=key)
                    if s.index == 0:
                        h = h.float()  # the residual stream is fp32, as in the engine
                loss = head.forward(head.bind({**weights, **shared}), h, y, loss_tokens=n_loss)
            loss.backward()
            total += loss.detach()
        self._add_shared_grads(shared)
        grad_norm = None
        if t.grad_clip is not None:
            trained = self.adapters if self.lora else self.params
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(trained.values()), t.grad_clip))
        # Not finite: no update (it went on training NaN weights, which then rotated the good snapshots away:
        # a pass); the loop keeps the weights before the step as a snapshot, as the engine keeps its last commit.
        loss = float(total)  # (a sync point on CUDA, which the step's end had anyway)
        for what, v in (("loss", loss), ("gradient norm", grad_norm)):
            if v is not None and not math.isfinite(v):
                self.opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"the {what} of step {step + 1} is {v}: the run stopped before that step's "
                                     f"update", step + 1)
        lr = lr_of(self.cfg, step)
        for g in self.opt.param_groups:
            if isinstance(g["lr"], Tensor):  # optimizers that keep lr as a tensor (torchao's) update it in place
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        tokens = t.grad_accum * t.micro_batch_size * self.cfg.data.seq_len
        return StepStats(loss, lr, grad_norm, tokens, n_loss)

    @torch.no_grad()
    def _add_shared_grads(self, shared: dict[str, Tensor]) -> None:
        for key, leaf in shared.items():
            p = self.params[key]
            if leaf.grad is None:
                continue
            if p.grad is None:
                p.grad = leaf.grad
            else:
                p.grad.add_(leaf.grad)

    @torch.no_grad()
    def evaluate(self, should_stop=None) -> float | None:
        if self.eval_batches is None:
            return None
        total, count = 0.0, 0
        for b in self.eval_batches:  # a mean over the held-out tokens with a target, as in training
            if should_stop is not None and should_stop():
                raise EvaluationStopped
            pos = None if b.positions is None else b.positions.to(self.device)
            with autocast(self.device, self.cfg.train.precision):
                total += float(self.model.forward_loss({**self.params, **self.adapters}, b.tokens.to(self.device),
                                                       b.targets.to(self.device), pos=pos, loss_tokens=1))
            count += b.loss_tokens
        return total / count

    def state(self) -> dict[str, Tensor]:
        """Weights by global key (fp32); with LoRA the adapters' too."""
        return {k: v.detach() for k, v in {**self.params, **self.adapters}.items()}

    def adapter_state(self) -> dict[str, Tensor]:
        """LoRA's adapters by global key (fp32)."""
        return {k: v.detach() for k, v in self.adapters.items()}

    def master_chunks(self):
        """The fp32 weights as one flat stream, in parameter order (for ``write_safetensors``)."""
        for k in self.model.param_specs():
            yield self.params[k].detach()

    def close(self) -> None:
        pass

    def optimizer_state(self) -> dict[str, dict[str, Tensor]]:
        """Adam moments by global key: {"exp_avg": ..., "exp_avg_sq": ...}."""
        if not self.fmt.exact:
            return self.opt.moments()
        by_id = {id(p): k for k, p in {**self.params, **self.adapters}.items()}
        return {by_id[id(p)]: {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]} for p, s in self.opt.state.items()}


class CompressedReference:
    """AdamW over a compressed state, in memory, as the engine lays it out: each stage's parameters
    flattened in ``Stage.params`` order with its weight-decay segments, the state stored in the format's
    tensors and updated by ``reference_adamw_`` (plain PyTorch), the stochastic rounding keyed by
    (seed, step, stage). The model's fp32 parameters hold the decoded master after each step (a bf16
    master's values), as the engine's compute weights do. The minimal optimizer interface the reference
    trainer uses: ``param_groups`` (the lr), ``step()``, ``zero_grad()``."""

    def __init__(self, model, params: dict[str, Tensor], o, seed: int):
        from fuyou.engine.layout import build_states

        self.fmt, self.o, self.seed, self.params = StateFormat.of(o), o, seed, params
        self.layout = build_states(model.stages, o.weight_decay, n_copies=1)
        self.param_groups = [{"lr": o.lr}]
        self.t = 0
        self.state = []
        with torch.no_grad():
            for st in self.layout:
                flat = torch.cat([params[st.stage.key(n)].detach().reshape(-1).cpu() for n in st.slots])
                self.state.append(new_state(self.fmt, flat))
                self._load(st, self.state[-1])  # a bf16 master starts rounded: so do the weights

    def _load(self, st, state: dict[str, Tensor]) -> None:
        master = state["master"].float()
        for n, view in st.views(master).items():
            self.params[st.stage.key(n)].data.copy_(view)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        o = self.o
        for st, state in zip(self.layout, self.state):
            grad = torch.cat([(self.params[st.stage.key(n)].grad if self.params[st.stage.key(n)].grad is not None
                               else torch.zeros(s.shape)).detach().reshape(-1).float().cpu()
                              for n, s in st.slots.items()])
            reference_adamw_(self.fmt, state, grad, segments=[(g.start, g.end, g.weight_decay) for g in st.segments],
                             lr=self.param_groups[0]["lr"], beta1=o.beta1, beta2=o.beta2, eps=o.eps, step=self.t,
                             key=sr_key(self.seed, self.t, st.index))
            self._load(st, state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params.values():
            p.grad = None

    def moments(self) -> dict[str, dict[str, Tensor]]:
        out = {}
        for st, state in zip(self.layout, self.state):
            _, m, v = decode_state(self.fmt, state)
            mv, vv = st.views(m), st.views(v)
            for n in st.slots:
                out[st.stage.key(n)] = {"exp_avg": mv[n].clone(), "exp_avg_sq": vv[n].clone()}
        return out
