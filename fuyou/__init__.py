"""fuyou: full-parameter fine-tuning of large models on one GPU with NVMe SSDs as a third tier.

See DESIGN.md for the architecture. The package layout follows it:

- ``fuyou.models``  stage-wise GPT and Llama models (stateless templates called with parameter dicts)
- ``fuyou.data``    corpora, tokenizers, token memmaps, batch sampling
- ``fuyou.train``   the in-memory reference trainer, schedules, metrics and run directories
- ``fuyou.store``   the SSD tier: an aligned, asynchronous tensor store
- ``fuyou.optim``   the CPU AdamW (fused kernel in ``fuyou.kernels``) and its out-of-core driver
- ``fuyou.config``  the top-level configuration and its command-line overrides
"""

__version__ = "0.1.0"
