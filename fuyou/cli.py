"""The ``fuyou`` command: ``train``, ``models``, ``data prepare``."""

from __future__ import annotations

import argparse
import sys

from fuyou.errors import FuyouError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options: collect the ones argparse left over.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "func", None) is _train and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except FuyouError as e:
        print(f"fuyou: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fuyou: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fuyou models | head`: the reader left; not an error
        sys.stderr.close()
        return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuyou", description=__doc__)
    sub = p.add_subparsers(metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (default: a small GPT on the embedded corpus, on the CPU)",
                       description="Train a model. Overrides are section.key=value, e.g. train.steps=100 "
                       "model.preset=gpt3-125m optim.lr=3e-4 (sections: model data train optim offload hardware run).")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    t.add_argument("--config", help="a TOML config file (see configs/)")
    t.add_argument("--model", help="model preset (same as model.preset=NAME)")
    t.add_argument("--offload", choices=["none", "ssd"], help="where the training state lives")
    t.add_argument("--ssd", action="append", metavar="DIR", help="an SSD directory (repeat for several drives)")
    t.add_argument("--cpu-mem", help="CPU memory budget, e.g. 8GiB")
    t.add_argument("--gpu-mem", help="GPU memory budget, e.g. 20GiB")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--out", help="parent directory of run directories (default: runs)")
    t.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace of the second step (offload ssd)")
    t.set_defaults(func=_train)

    m = sub.add_parser("models", help="list model presets with parameter counts and training-state bytes")
    m.set_defaults(func=_models)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(metavar="ACTION")
    prep = dsub.add_parser("prepare", help="tokenize text/JSONL files or directories into a token memmap")
    prep.add_argument("inputs", nargs="+", help="text files, .jsonl files or directories")
    prep.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    prep.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer directory")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share of tokens held out")
    prep.add_argument("--jsonl-field", default="text", help="field with the text in JSON lines")
    prep.set_defaults(func=_prepare)
    return p


def _train(args) -> int:
    from fuyou.config import load_config
    from fuyou.train.loop import run_training

    flags = {
        "model.preset": args.model, "offload.mode": args.offload, "offload.ssd_dirs": args.ssd,
        "offload.cpu_mem": args.cpu_mem, "offload.gpu_mem": args.gpu_mem, "train.steps": args.steps,
        "run.out_dir": args.out,
    }
    cfg = load_config(args.config, args.overrides, {k: v for k, v in flags.items() if v is not None})
    if args.trace and cfg.offload.mode != "ssd":
        from fuyou.errors import ConfigError

        raise ConfigError("--trace records the three-tier engine's tasks; use it with --offload ssd")
    run_training(cfg, trace=args.trace)
    return 0


def _models(args) -> int:
    from fuyou.models import PRESETS, ModelConfig, StageModel, preset
    from fuyou.train.metrics import si
    from fuyou.units import format_size

    header = f"{'preset':<12} {'family':<6} {'layers':>6} {'width':>6} {'heads':>9} {'params':>10}  " \
             f"{'fp32 master':>12} {'Adam m+v':>12} {'bf16 weights':>12} {'total':>12}"
    print(header)
    print("-" * len(header))
    for name in PRESETS:
        cfg = ModelConfig(**preset(name))
        model = StageModel(cfg)
        b = model.state_bytes()
        heads = f"{cfg.n_head}" + (f"/{cfg.kv_heads}kv" if cfg.kv_heads != cfg.n_head else "")
        total = sum(b.values())
        print(f"{name:<12} {cfg.family:<6} {cfg.n_layer:>6} {cfg.d_model:>6} {heads:>9} {si(model.num_params).replace('G', 'B'):>10}  "
              f"{format_size(b['master_fp32']):>12} {format_size(b['adam_m'] + b['adam_v']):>12} "
              f"{format_size(b['compute_weights']):>12} {format_size(total):>12}")
    print("\nTraining state: fp32 master 4 B, Adam m and v 8 B, bf16 compute copy 2 B per parameter "
          "(activations and gradients in flight come on top).")
    return 0


def _prepare(args) -> int:
    from fuyou.data import iter_documents, tokenize_documents
    from fuyou.data.dataset import write_prepared

    if not 0 < args.val_fraction < 1:
        from fuyou.errors import ConfigError

        raise ConfigError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    docs = list(iter_documents(args.inputs, args.jsonl_field))
    data = tokenize_documents(docs, args.tokenizer, args.val_fraction)
    write_prepared(args.out, data)
    print(f"wrote {len(data.train)} train and {len(data.val)} val tokens ({data.train.dtype}, "
          f"tokenizer {data.tokenizer}, {len(docs)} documents) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
