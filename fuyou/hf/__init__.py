"""Hugging Face interop: start training from a local Hugging Face model, export a run as one.

- ``source``: what ``model.init_from`` points at (a Hugging Face directory or a fuyou run directory),
  the model shape it fixes, its tokenizer;
- ``config_map``: ``config.json`` <-> ``ModelConfig`` for the supported architectures
  (``SUPPORTED``), refusing what fuyou does not compute;
- ``weights``: the name/layout table, tensor-at-a-time safetensors readers (``init_values``) and the
  streaming safetensors writer;
- ``importer`` / ``export``: the conversions behind ``fuyou import`` and ``fuyou export``;
- ``peft``: ``fuyou export`` of a LoRA run: a PEFT adapter directory, or the base with the adapters
  merged (``--merge``).

Reading and writing weights needs only ``safetensors`` (a core dependency); the tokenizer and the
tests need the ``hf`` extra (transformers, tokenizers).
"""

from fuyou.hf.config_map import SUPPORTED
from fuyou.hf.export import export_run
from fuyou.hf.importer import convert_checkpoint
from fuyou.hf.peft import write_merged, write_peft_adapter
from fuyou.hf.source import Checkpoint, open_checkpoint, tokenizer_dir

__all__ = ["SUPPORTED", "Checkpoint", "convert_checkpoint", "export_run", "open_checkpoint", "tokenizer_dir",
           "write_merged", "write_peft_adapter"]
