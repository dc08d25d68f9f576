"""``StageModel``: a model as its list of stages, with counts, FLOPs and bytes computed from shapes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from fuyou.models.config import ModelConfig
from fuyou.models.stages import EmbeddingStage, GPTBlock, HeadStage, LlamaBlock, ParamSpec, Stage


class StageModel:
    """Embedding, ``n_layer`` blocks and the head, run one after another.

    ``forward_loss`` runs the stages in order on one parameter dict; it is the whole-model reference
    that stage-wise execution (the engine) must reproduce.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        block = GPTBlock if cfg.family == "gpt" else LlamaBlock
        self.stages: list[Stage] = [EmbeddingStage(cfg)]
        self.stages += [block(cfg, i) for i in range(cfg.n_layer)]
        self.stages.append(HeadStage(cfg))

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    # -- shapes and counts (no allocation) ---------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        """Every owned parameter, by global key, in stage order."""
        return {s.key(local): spec for s in self.stages for local, spec in s.params.items()}

    @property
    def num_params(self) -> int:
        return sum(s.num_params for s in self.stages)

    @property
    def matmul_params(self) -> int:
        return sum(s.matmul_params for s in self.stages)

    def flops_per_token(self, seq_len: int, frozen: bool = False) -> float:
        """Model FLOPs of one token's forward and backward (no recomputation counted).

        ``6 * N + 12 * n_layer * q_width * seq_len``, where N counts the parameters used as matmul
        weights (every block matrix and the LM head; embedding look-ups are free), and the second
        term is attention's score and value matmuls (``q_width`` = heads x head width: d_model except
        for models such as Qwen3 that set the head width apart) (2 matmuls x 2 FLOPs x 3 for fwd+bwd, with the
        causal mask's masked half counted, as in the PaLM paper's MFU formula). ``frozen``: a base whose
        weights get no gradient (LoRA's), ``4 * N`` (forward, and the inputs' gradients; the adapters' few
        FLOPs left out): 6 N made a LoRA plan's model TFLOPS exceed the GPU's sustained rate (a pass).
        """
        return (4.0 if frozen else 6.0) * self.matmul_params + 12.0 * self.cfg.n_layer * self.cfg.q_width * seq_len

    def state_bytes(self, compute_bytes: int = 2, fmt=None) -> dict[str, int]:
        """Bytes the training state needs: master weights, Adam m and v (with their int8 block scales),
        compute-precision copy; ``fmt``: how the optimizer state is stored (default fp32)."""
        from fuyou.optim.compressed import StateFormat

        fmt, n = fmt or StateFormat(), self.num_params
        sizes = {t.role: t.numel(n) * t.itemsize for t in fmt.tensors}
        master = sizes.pop("master")
        return {"master": master, "moments": sum(sizes.values()), "compute_weights": compute_bytes * n}

    # -- materialisation ---------------------------------------------------------------------------
    def init_params(self, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """All parameters, stage by stage (each stage seeded independently, see ``Stage.init_params``)."""
        out: dict[str, Tensor] = {}
        for s in self.stages:
            out.update(s.init_params(seed, dtype))
        return out

    def forward_loss(self, params: dict[str, Tensor], tokens: Tensor, targets: Tensor, pos: Tensor | None = None,
                     loss_tokens: int | None = None) -> Tensor:
        """Mean loss over the tokens with a target (``loss_tokens``: the sum divided by this count)."""
        x = tokens
        for s in self.stages[:-1]:
            x = s.forward(s.bind(params), x, pos=pos)
        head = self.stages[-1]
        return head.forward(head.bind(params), x, targets, loss_tokens=loss_tokens)

    def logits(self, params: dict[str, Tensor], tokens: Tensor, pos: Tensor | None = None) -> Tensor:
        x = tokens
        for s in self.stages:
            x = s.forward(s.bind(params), x, pos=pos)
        return x
