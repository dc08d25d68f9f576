"""What a quantised base costs LoRA in model quality (issue 16): ``lora.base=int8`` and ``lora.base=nf4``
against the base in the compute dtype.

For a small GPT (gpt-tiny, 4 x 256) and a small Llama (4 x 256, GQA, SwiGLU): pretrain once with fp32
AdamW on the embedded corpus (the base), then train LoRA adapters over it on a second real text (the
Python reference documentation shipped with every Python), the same adapters, data and schedule, with
the base in fp32, as int8 (per-output-channel codes, fp32 scales) and as NF4 (QLoRA's 4-bit NormalFloat,
an fp32 absmax per block of 64) and as NF4 with QLoRA's double quantisation of the absmax (nf4dq):
fuyou/models/quant.py.
Compute in fp32, so the base's storage is the only difference. The in-memory reference trainer runs
each; the offloaded engine equals it bit for bit with every base (tests/engine/test_lora.py).

Reported: the base's evaluation loss on the new text before any adapter training (the quantisation's
direct cost), the final evaluation loss after LoRA, and the relative change.

    python bench/lora_base_quality.py [--pretrain 400] [--steps 200] [--markdown bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine_header, publish  # noqa: E402
from compressed_quality import MODELS, choices, corpus_path, make_cfg, train  # noqa: E402


BASES = ("compute", "int8", "nf4", "nf4dq")


def lora_run(cfg, init, eval_every: int) -> dict:
    """LoRA from ``init``: the evaluation loss before the first step, then every ``eval_every`` steps."""
    from fuyou.data import load_data
    from fuyou.train.reference import ReferenceTrainer

    tr = ReferenceTrainer(cfg, load_data(cfg.data), init_values=init)
    evals = [(0, tr.evaluate())]
    t0 = time.perf_counter()
    for s in range(cfg.train.steps):
        tr.train_step(s)
        if (s + 1) % eval_every == 0 or s + 1 == cfg.train.steps:
            evals.append((s + 1, tr.evaluate()))
    return {"evals": evals, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain", type=int, default=400, help="fp32 pretraining steps of the base (embedded corpus)")
    ap.add_argument("--steps", type=int, default=200, help="LoRA steps on the second text")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--models", default="gpt,llama")
    ap.add_argument("--markdown", help="append the report to this file (bench/RESULTS.md)")
    args = ap.parse_args()
    if args.steps < 1 or args.pretrain < 0 or args.rank < 1:
        raise SystemExit("--steps and --rank must be at least 1, --pretrain at least 0")
    models = choices(args.models, MODELS, "--models")

    import torch

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="fuyou-lora-quality-"))
    try:
        rows = run_all(args, models, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, rows)


def run_all(args, models: list[str], tmp: Path) -> list:
    rows = []
    for model in models:
        pre = train(make_cfg(model, corpus_path("builtin", tmp), 1e-3, args.pretrain, ["train.seed=1"]), None,
                    "torch fp32", args.pretrain)
        ckpt = pre["state"]

        def init(stage, ckpt=ckpt):
            return {stage.key(n): ckpt[stage.key(n)].clone() for n in stage.params}

        print(f"{model}: pretrained {args.pretrain} steps, eval loss {pre['evals'][-1][1]:.4f}", file=sys.stderr)
        got = {}
        for base in BASES:
            cfg = make_cfg(model, corpus_path("pydoc", tmp), args.lr, args.steps,
                           ["train.seed=2", f"lora.rank={args.rank}", f"lora.alpha={2 * args.rank}",
                            f"lora.targets={args.targets}", f"lora.base={base}"])
            got[base] = lora_run(cfg, init, max(1, args.steps // 10))
            ev = got[base]["evals"]
            print(f"{model} base={base}: eval {ev[0][1]:.5f} before, {ev[-1][1]:.5f} after "
                  f"({got[base]['seconds']:.0f} s)", file=sys.stderr)
        rows.append((model, pre["evals"][-1][1], got))
    return rows


def report(args, rows: list) -> None:
    lines = ["", f"### LoRA over a quantised base: model quality (`python bench/lora_base_quality.py "
             f"{' '.join(shlex.quote(a) for a in sys.argv[1:])}`)", "",
             machine_header(), "",
             f"A base pretrained {args.pretrain} steps on the embedded corpus (fp32 AdamW), then LoRA rank {args.rank} "
             f"({args.targets}) for {args.steps} steps on the Python reference text, fp32 compute, same data and "
             f"schedule; evaluation loss on that text.", "",
             "| model | base | eval loss of the base, before LoRA | after LoRA | change against the fp32 base after LoRA |",
             "|---|---|---|---|---|"]
    for model, _, got in rows:
        a = got["compute"]["evals"]
        for base in BASES:
            b = got[base]["evals"]
            lines.append(f"| {model} | {'fp32' if base == 'compute' else base} | {b[0][1]:.5f} "
                         f"({100 * (b[0][1] / a[0][1] - 1):+.3f} %) | {b[-1][1]:.5f} | "
                         f"{100 * (b[-1][1] / a[-1][1] - 1):+.3f} % |")
    lines.append("")
    publish(lines, args.markdown)


if __name__ == "__main__":
    main()
