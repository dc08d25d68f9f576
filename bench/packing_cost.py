"""What packing's attention mask costs: one forward and backward of a model on rows holding several
examples (positions restarting, attention masked at each boundary: ``fuyou.models.layers.attention_mask``)
against the same rows as one document each (plain causal attention, no mask), same shapes, same run.

    python bench/packing_cost.py --model llama-test --layers 4 --width 256 --batch 4 --seq 512 --docs 4 \\
        --markdown bench/RESULTS.md

The ratio is the price of exactness per step; packing itself saves the padding a padded batch would
run (the real-token share of rows is what `fuyou train` prints at start). Medians of ``--repeats``
alternating runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_header, publish  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-test")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--docs", type=int, default=4, help="examples per packed row (equal lengths)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--markdown")
    args = p.parse_args(argv)

    from fuyou.models import StageModel
    from fuyou.models.config import ModelConfig, preset
    from fuyou.models.precision import autocast

    cfg = ModelConfig(**{**preset(args.model), "n_layer": args.layers, "d_model": args.width,
                         "n_head": max(1, args.width // 64), "n_kv_head": None, "d_ff": None,
                         "max_seq_len": args.seq})
    model = StageModel(cfg)
    params = {k: v.requires_grad_(True) for k, v in model.init_params(0).items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
    doc = -(-args.seq // args.docs)
    pos = (torch.arange(args.seq) % doc)[None].expand(args.batch, -1).contiguous()
    dev = torch.device("cpu")

    def step(positions) -> float:
        t0 = time.perf_counter()
        with autocast(dev, args.precision):
            loss = model.forward_loss(params, x, y, positions)
        loss.backward()
        for v in params.values():
            v.grad = None
        return time.perf_counter() - t0

    step(None), step(pos)  # warm-up
    plain, packed = [], []
    for _ in range(args.repeats):
        plain.append(step(None))
        packed.append(step(pos))
    a, b = statistics.median(plain), statistics.median(packed)
    tokens = args.batch * args.seq
    lines = [
        f"\n### Packing's attention mask: {args.model} shape, {args.layers} blocks of width {args.width}, "
        f"batch {args.batch} x {args.seq}, {args.docs} examples a row, {args.precision}, CPU "
        f"({time.strftime('%Y-%m-%d')})",
        "", f"Machine: {machine_header()}.", "",
        f"Command: `python bench/packing_cost.py {' '.join(argv or sys.argv[1:])}`", "",
        "| rows | forward+backward (median of %d) | tokens/s |" % args.repeats, "|---|---|---|",
        f"| one document each (causal, no mask) | {a * 1e3:.1f} ms | {tokens / a:,.0f} |",
        f"| {args.docs} examples each (mask, positions) | {b * 1e3:.1f} ms | {tokens / b:,.0f} |",
        "", f"Packed / plain step time: **{b / a:.2f}x**.",
    ]
    publish(lines, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
