"""The ``fuyou`` command and its subcommands (``build_parser``)."""

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
        sys.stderr.write(f"fuyou: error{_rank_tag()}: {e}\n")  # one write: torchrun's ranks print beside each other
        sys.stderr.flush()
        _leave_ranks()
        return 2
    except KeyboardInterrupt:
        print("fuyou: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fuyou models | head`: the reader left; not an error
        sys.stderr.close()
        return 0


def _leave_ranks() -> None:
    """Leave torchrun's process group on an error: left to the interpreter's exit, its gloo threads ended in
    std::terminate (SIGABRT, "terminate called without an active exception") now and then."""
    from fuyou import distributed

    try:
        distributed.current().close()
    except Exception:  # noqa: BLE001 -- leaving is best effort; the error is already reported
        pass


def _rank_tag() -> str:
    """Under torchrun every rank reports its own error (one may differ: its SSD directories, its share),
    so each says which rank it is: " (rank 1 of 2)"; nothing in one process."""
    import os

    from fuyou.distributed import launched_world

    world = launched_world()
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""


def build_parser() -> argparse.ArgumentParser:
    from fuyou.data.formats import FORMATS  # (numpy only: the parser stays quick to build)

    p = argparse.ArgumentParser(prog="fuyou", description="fuyou: fine-tune GPT- and Llama-class models larger than "
                                "GPU or CPU memory on one GPU, with NVMe SSDs as a third memory tier. `fuyou COMMAND "
                                "--help` describes each command.")
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
    t.add_argument("--act-policy", help="activation policy (offload ssd): 'recompute', e.g. 'fc2,proj=ssd', "
                   "'30-39:all=gpu', or a JSON file from `fuyou plan --json`")
    t.add_argument("--plan", choices=["auto"], help="auto: probe (or load hardware.profile), plan the activation "
                   "policy and prefetch depth, print the schedule, train with it (offload ssd)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an SSD-offloaded run from its last commit "
                   "(its config.toml; overrides such as train.steps=N still apply)")
    t.add_argument("--init-from", metavar="DIR", help="start from these weights: a local Hugging Face model "
                   "directory (Llama/Mistral/Qwen2/GPT-2, safetensors) or a fuyou run directory (same as "
                   "model.init_from=DIR; its shape wins over the preset)")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--out", help="parent directory of run directories (default: runs)")
    t.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace of the second step (offload ssd)")
    t.set_defaults(func=_train)

    m = sub.add_parser("models", help="list model presets with parameter counts and training-state bytes")
    m.add_argument("--master", choices=["fp32", "bf16"], default="fp32", help="the master weights' format "
                   "(optim.master) the byte columns assume")
    m.add_argument("--moments", choices=["fp32", "bf16", "int8"], default="fp32", help="Adam moments' format "
                   "(optim.moments) the byte columns assume")
    m.set_defaults(func=_models)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(metavar="ACTION")
    prep = dsub.add_parser("prepare", help="tokenize text, prompt/completion, Alpaca or chat JSONL into memmaps",
                           description="Tokenize files once for `fuyou train data.path=OUT`: plain text becomes a "
                           "token stream; fine-tuning records (prompt/completion, instruction/input/output, chat "
                           "messages) become examples with a loss mask (fuyou/data/formats.py).")
    prep.add_argument("inputs", nargs="+", help="text files, .jsonl files or directories")
    prep.add_argument("--out", required=True, help="output directory (*.bin, meta.json)")
    prep.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer or model "
                      "directory (use the model's own: training checks that they match)")
    prep.add_argument("--format", default="auto", choices=list(FORMATS),
                      help="record format of JSON lines (auto: from the first record's keys)")
    prep.add_argument("--train-on-prompt", action="store_true", help="loss on prompts and user turns too")
    prep.add_argument("--eval", action="append", metavar="PATH",
                      help="a held-out file or directory, instead of --val-fraction (repeat it for several)")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share held out (of tokens for text, "
                      "of examples for fine-tuning records)")
    prep.add_argument("--jsonl-field", default="text", help="field with the text in JSON lines of plain text")
    prep.set_defaults(func=_prepare)
    _add_planner_parsers(sub)
    _add_hf_parsers(sub)
    return p


def _add_hf_parsers(sub) -> None:
    im = sub.add_parser("import", help="convert a local Hugging Face model into a run directory to train from",
                        description="Read a local Hugging Face model directory (config.json, *.safetensors, tokenizer "
                        "files; LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel) and write "
                        "RUN_DIR/model.safetensors (fp32, fuyou's names, streamed tensor by tensor), RUN_DIR/hf/ "
                        "(config and tokenizer) and RUN_DIR/config.toml; then: fuyou train --config "
                        "RUN_DIR/config.toml. The SSD training state is built from these weights when training starts.")
    im.add_argument("hf_dir", metavar="HF_DIR", help="local Hugging Face model directory")
    im.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create (new or empty)")
    im.set_defaults(func=_import)

    ex = sub.add_parser("export", help="write a run's weights as a Hugging Face model directory (a LoRA run: "
                        "a PEFT adapter, or with --merge the merged model)",
                        description="Write RUN_DIR/model.safetensors as sharded Hugging Face safetensors with "
                        "config.json and the tokenizer files of the model the run started from, loadable with "
                        "transformers.AutoModelForCausalLM.from_pretrained(HF_DIR). Memory is bounded by a shard. "
                        "A LoRA run (RUN_DIR/adapter.safetensors) is written as a PEFT adapter directory "
                        "(adapter_config.json, adapter_model.safetensors and the tokenizer files), loadable with "
                        "peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), HF_DIR) where "
                        "BASE is the run's model.init_from; with --merge, as the base with the adapters merged "
                        "into its weights: a full model directory as above, no PEFT needed.")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory, a snapshot "
                    "(RUN_DIR/snapshots/step-N) or one made by `fuyou import`")
    ex.add_argument("--out", required=True, metavar="HF_DIR", help="output directory (new or empty)")
    ex.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="dtype of the written weights (default fp32, the master weights as they are; bf16 halves the size)")
    ex.add_argument("--shard-size", default="2GiB", help="largest shard, e.g. 2GiB, 5GB (default 2GiB)")
    ex.add_argument("--merge", action="store_true",
                    help="LoRA runs: write the base model with the adapters merged (W + scale * B @ A) as a full "
                    "Hugging Face model directory instead of a PEFT adapter directory")
    ex.set_defaults(func=_export)

    rs = sub.add_parser("reshard", help="rewrite a stopped run's state for another number of data-parallel "
                        "processes (torchrun --nproc_per_node) before resuming it",
                        description="A run trained by N processes keeps one state per rank (full fine-tuning: "
                        "each rank the optimizer state of the stages it owns). Run this once, without torchrun, "
                        "between two launches to continue the run's last commit on another number of processes "
                        "of this machine; then `torchrun --nproc_per_node=M -m fuyou.cli train --resume RUN_DIR` "
                        "(M=1: `fuyou train --resume RUN_DIR`). The old state is replaced only once the new one is "
                        "complete; an interrupted reshard is finished by running it again.")
    rs.add_argument("run_dir", metavar="RUN_DIR", help="a stopped run directory")
    rs.add_argument("--nproc", type=int, required=True, metavar="M",
                    help="the number of processes the resume will run (torchrun --nproc_per_node)")
    rs.add_argument("--ssd", action="append", metavar="DIR",
                    help="the run's SSD directories, if they moved (repeat for several; give the resume the same)")
    rs.set_defaults(func=_reshard)


def _reshard(args) -> int:
    from fuyou.reshard import reshard

    print(reshard(args.run_dir, args.nproc, args.ssd))
    return 0


def _import(args) -> int:
    from fuyou.train.run import import_checkpoint

    out = import_checkpoint(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} into {out}; train with: fuyou train --config {out / 'config.toml'}")
    return 0


def _export(args) -> int:
    from pathlib import Path

    from fuyou.errors import ConfigError
    from fuyou.train.run import export_run_dir
    from fuyou.units import parse_size

    _check_out_dir(args.out)
    if not Path(args.run_dir).expanduser().is_dir():
        raise ConfigError(f"{args.run_dir} does not exist or is not a directory: give a run directory (the one "
                          f"`fuyou train` printed), a snapshot in it, or a directory made by `fuyou import`")
    files = export_run_dir(args.run_dir, args.out, args.dtype, parse_size(args.shard_size), merge=args.merge)
    kind = " as a PEFT adapter" if "adapter_config.json" in files else " merged" if args.merge else ""
    print(f"exported {args.run_dir} to {args.out}{kind} ({args.dtype}): {', '.join(files)}")
    return 0


def _add_planner_parsers(sub) -> None:
    pl = sub.add_parser("plan", help="predict step time, memory and the swap schedule (no GPU, no weights)",
                        description="Plan a run: bytes per tier, predicted step time and bottleneck, the swap "
                        "schedule and a timeline of one step. Hardware by preset (--gpu, --ssd NxNAME, --pcie), by "
                        "numbers, or --profile FILE from `fuyou probe`.")
    pl.add_argument("--model", default="gpt3-13b", help="model preset (see `fuyou models`), or a path: a Hugging "
                    "Face config.json or model directory, or a fuyou run directory (no weights are read)")
    pl.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                    help="overrides, as for fuyou train: model fields (model.n_layer=48), LoRA (lora.rank=16 "
                    "lora.targets=all-linear), engine settings "
                    "(offload.checkpoint_dtype=auto), train.precision, and the optimizer state's format "
                    "(optim.master=bf16 optim.moments=int8)")
    pl.add_argument("--batch", type=int, help="micro-batch size (sequences; default 16, or with --global-batch "
                    "the planner's split)")
    pl.add_argument("--seq", type=int, default=1024, help="sequence length")
    pl.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    pl.add_argument("--global-batch", help="sequences per optimizer step: the planner splits it into micro-batches "
                    "(or give --batch or --grad-accum too, to set the split); a range LOW-HIGH (e.g. 32-256) also "
                    "chooses the global batch that trains the most tokens per second")
    pl.add_argument("--gpus", type=int, default=1, help="data parallel on this many GPUs of the machine (torchrun "
                    "--nproc_per_node): each runs --grad-accum/N of the step's micro-batches (default --grad-accum: "
                    "one each) and owns the optimizer state of some stages; --cpu-mem and the SSDs are the machine's, "
                    "shared")
    pl.add_argument("--cpu-mem", help="CPU memory budget of the machine, e.g. 256GiB (default: the memory --profile "
                    "measured, else 256GiB)")
    pl.add_argument("--cpu-reserve", help="CPU memory the plan leaves unused, e.g. 8GiB (default: the process's fixed "
                    "overhead, 1.5 GiB with CUDA's context or 384 MiB on a CPU, and 2%% of --cpu-mem for heap "
                    "fragmentation); "
                    "`fuyou train --cpu-mem` takes the planned figure")
    pl.add_argument("--profile", help="hardware profile JSON written by `fuyou probe`")
    pl.add_argument("--gpu", help="GPU preset: rtx3090, rtx4090, a100-40gb, a100-80gb, h100, h200")
    pl.add_argument("--ssd", action="append", help="SSD preset with a count, e.g. 12xd7-p5510 (d7-p5510, 990-pro, "
                    "pcie4-generic); once (fuyou train's --ssd, one per drive, repeats)")
    pl.add_argument("--pcie", help="host link: gen3x16, gen4x16, gen5x16 (default: the GPU's)")
    pl.add_argument("--gpu-reserve", help="GPU memory the plan leaves unused, e.g. 2GiB (default: 768 MiB for the "
                    "CUDA context and 5%% of the rest, what the engine leaves by default)")
    for flag, what in (("--gpu-tflops", "sustained matmul TFLOPS"), ("--gpu-mem", "the GPU's memory, e.g. 24GiB"),
                       ("--ssd-read", "aggregate SSD read GB/s"), ("--ssd-write", "aggregate SSD write GB/s"),
                       ("--ssd-capacity", "SSD space, e.g. 30TB"), ("--pcie-bw", "PCIe GB/s each way"),
                       ("--ssd-tbw", "rated endurance of one drive, TB written (the datasheet's TBW)"),
                       ("--cpu-adam", "CPU AdamW parameters/s"),
                       ("--gpu-link", "GPU-to-GPU GB/s each way for --gpus' gradient sums (NVLink; 0: none, through "
                                      "host memory)")):
        pl.add_argument(flag, help=f"override: {what}")
    pl.add_argument("--act-policy", help="predict this activation policy instead of searching "
                    "(e.g. 'recompute' or 'fc2,proj=cpu;0-3:checkpoint=ssd')")
    pl.add_argument("--prefetch-depth", type=int, help="stages fetched ahead (offload.prefetch_depth): with "
                    "--act-policy, that policy's (default 2); without, the only depth the search tries (default: it "
                    "tries 1, 2 and 3)")
    pl.add_argument("--commit", choices=["cow", "none"],
                    help="cow (default): crash-safe commits and resume (extra state copies on SSD); none: no resume")
    pl.add_argument("--commit-every",
                    help="commit interval as train uses it: steps (1: every step) or a time such as 10min (default)")
    pl.add_argument("--grad-clip", default="1.0",
                    help="exact global-norm clipping threshold as train uses it (default 1.0), or none")
    pl.add_argument("--tokens", help="also give the time to train on this many tokens, e.g. 1G, 500M, 2e9 "
                    "(an epoch of your data)")
    pl.add_argument("--json", action="store_true", help="print JSON for tools instead of text")
    pl.add_argument("--plot", metavar="FILE.png", help="write a Gantt chart of one step (needs matplotlib)")
    pl.set_defaults(func=_plan)

    pr = sub.add_parser("probe", help="measure this machine (compute, PCIe, SSD via the store, CPU AdamW) "
                        "and write a hardware profile", description="Measure this machine with fuyou's own code "
                        "and write a profile for `fuyou plan --profile`.")
    pr.add_argument("--ssd", required=True, metavar="DIR", help="a directory on the SSD to measure")
    pr.add_argument("--out", default="profile.json", help="profile JSON to write (default: profile.json)")
    pr.add_argument("--model", help="model (a preset, or a path as for fuyou plan --model) whose block shapes to "
                    "time (default: a 125M/1.3B block)")
    pr.add_argument("--batch", type=int, help="micro-batch size for the compute probe (default 8 on a GPU, 4 on a "
                    "CPU; give the batch you will plan: a plan far from it extrapolates)")
    pr.add_argument("--seq", type=int, help="sequence length for the compute probe (default 1024 on a GPU, 256 on "
                    "a CPU, at most the model's positions)")
    pr.add_argument("--io-bytes", default="256MiB", help="bytes written and read in the SSD probe (default 256MiB, "
                    "at least 1MiB; the store's I/O unit rounds it up)")
    pr.add_argument("--adam-params", type=int, default=1 << 24, help="parameters in the AdamW probe (default 16777216, "
                    "at least 65536; the out-of-core job beside it updates one block of --model)")
    pr.add_argument("--repeats", type=int, default=3, help="timed repetitions, their median kept (default 3, at "
                    "least 1)")
    pr.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="compute dtype the block is timed in, as train.precision (default bf16)")
    pr.set_defaults(func=_probe)


def _token_count(text: str) -> int:
    """``--tokens``: a count such as 1G, 500M, 20k or 2e9 (decimal)."""
    from fuyou.errors import ConfigError

    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}
    t = text.strip().lower()
    try:
        n = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        n = -1
    if not n >= 1:
        raise ConfigError(f"--tokens {text!r}: give a positive count such as 1G, 500M or 2e9")
    return int(n)


def _global_batch(args) -> tuple[int, int] | None:
    """``fuyou plan --global-batch G`` or ``LOW-HIGH``: (low, high) for the planner to split, or None when
    the split is by hand (``--batch`` and ``--grad-accum`` are then set from it) or not asked for."""
    from fuyou.errors import ConfigError

    if args.global_batch is None:
        return None
    try:
        lo, _, hi = args.global_batch.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise ConfigError(f"--global-batch {args.global_batch!r}: give a number of sequences such as 64, or a range "
                          f"such as 32-256")
    if args.batch is None and args.grad_accum is None:
        return lo, hi
    if lo != hi:
        raise ConfigError("--global-batch with a range chooses the split itself: leave out --batch and --grad-accum")
    if args.batch is not None and args.grad_accum is not None and args.batch * args.grad_accum != lo:
        raise ConfigError(f"--batch {args.batch} x --grad-accum {args.grad_accum} is not --global-batch {lo}")
    part = args.batch or args.grad_accum
    if lo % part:
        raise ConfigError(f"--global-batch {lo} is not a multiple of {'--batch' if args.batch else '--grad-accum'} "
                          f"{part}")
    args.batch, args.grad_accum = (part, lo // part) if args.batch else (lo // part, part)
    return None


PLAN_SECTIONS = ("model", "offload", "train.precision", "train.grad_clip", "optim.master", "optim.moments", "lora")


def _plan_model_fields(model: str, overrides: list[str]) -> tuple[dict, dict]:
    """The model to plan: a preset or a path (``hf.source.model_shape``), with ``model.KEY=VALUE`` overrides;
    and the other sections' overrides plan takes (``PLAN_SECTIONS``), as {section: {key: value}}."""
    from pathlib import Path

    from fuyou.config import SECTIONS, _parse_value, refuse_implicit
    from fuyou.errors import ConfigError
    from fuyou.models import PRESETS, preset

    if model in PRESETS:
        fields = preset(model)
    elif not Path(model).expanduser().exists():
        if "/" in model or model.endswith(".json"):
            raise ConfigError(f"--model {model}: no such file or directory; give a preset (`fuyou models`), a Hugging "
                              f"Face config.json or model directory, or a fuyou run directory")
        fields = preset(model)  # an unknown name: the preset error lists the presets
    else:
        from fuyou.hf.source import model_shape

        fields = model_shape(model)
    other: dict[str, dict] = {}
    run_config = Path(model).expanduser() / "config.toml"
    if run_config.is_file():  # a fuyou run: plan its state as it trains it (the flags and overrides still win)
        # read as written, not validated as a config to train: its SSD directories need not exist to plan
        import tomllib

        raw = tomllib.loads(run_config.read_text())
        for section, keys in (("train", ("precision",)), ("optim", ("master", "moments"))):
            values = {k: raw[section][k] for k in keys if k in raw.get(section, {})}
            if values:
                other[section] = values
        if raw.get("lora", {}).get("rank"):  # (its adapter checkpoint, if any, plays no part in a plan)
            other["lora"] = {k: v for k, v in raw["lora"].items() if k != "init_from"}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or not name or not (section in PLAN_SECTIONS or key.strip() in PLAN_SECTIONS):
            raise ConfigError(f"plan override {item!r}: plan takes model.KEY=VALUE, offload.KEY=VALUE, lora.KEY=VALUE, "
                              f"train.precision, train.grad_clip, optim.master and optim.moments overrides (the batch "
                              f"(--batch, --grad-accum), sequence (--seq) and hardware have their own flags)")
        value = _parse_value(text.strip())
        if section in SECTIONS:
            refuse_implicit(SECTIONS[section], section, name, value)
        if section == "model":
            fields[name] = value
        else:
            other.setdefault(section, {})[name] = value
    return fields, other


def _model_config(fields: dict):
    """``ModelConfig(**fields)``, its validation errors as the sentences ``fuyou train`` gives."""
    from pydantic import ValidationError

    from fuyou.config import explain
    from fuyou.errors import ConfigError
    from fuyou.models import ModelConfig

    try:
        return ModelConfig(**fields)
    except ValidationError as e:
        raise ConfigError(explain(e, "model").replace("invalid configuration:", "invalid model:")) from None


def _plan_gpus(args, split) -> int:
    """``fuyou plan --gpus N``: the step's micro-batches must divide among the ranks (as ``fuyou train``
    under torchrun requires)."""
    from fuyou.errors import ConfigError

    n = args.gpus
    if n < 1:
        raise ConfigError(f"--gpus must be at least 1, got {n}")
    if args.grad_accum is not None and args.grad_accum % n:
        raise ConfigError(f"--grad-accum {args.grad_accum} does not divide among --gpus {n}: each GPU runs the same "
                          f"number of micro-batches; give a multiple of {n}")
    if split is not None and split[1] // n * n < split[0]:
        what = split[0] if split[0] == split[1] else f"{split[0]}-{split[1]}"
        raise ConfigError(f"--global-batch {what} has no global batch that divides among --gpus {n}; give a multiple "
                          f"of {n}")
    return n


def _plan_offload_flags(args, given: dict) -> None:
    """``offload.*`` overrides that plan has flags for, as fuyou train reads them, or refused where plan plans
    them itself; a new-user pass found offload.cpu_mem=150MiB planned as the default 256 GiB in silence.
    ``offload.cpu_mem`` is fuyou train's budget, the planned one: --cpu-mem of it with no reserve."""
    from fuyou.errors import ConfigError

    for key, flag in (("cpu_mem", "cpu_mem"), ("gpu_mem", "gpu_mem"), ("act_policy", "act_policy"),
                      ("prefetch_depth", "prefetch_depth")):
        if key in given and getattr(args, flag) is not None:
            raise ConfigError(f"offload.{key}={given[key]} and --{flag.replace('_', '-')} {getattr(args, flag)} "
                              f"both set it; give one")
    if "cpu_mem" in given:
        if args.cpu_reserve is not None:
            raise ConfigError("offload.cpu_mem is fuyou train's budget, planned as it is (no reserve); --cpu-reserve "
                              "applies to --cpu-mem, the machine's memory: give one of them")
        args.cpu_mem, args.cpu_reserve = str(given.pop("cpu_mem")), "0"
    if "gpu_mem" in given:  # fuyou train's device budget, as it is: --gpu-mem of it with no reserve
        if args.gpu_reserve is not None:
            raise ConfigError("offload.gpu_mem is fuyou train's device budget, planned as it is (no reserve); "
                              "--gpu-reserve applies to --gpu-mem, the GPU's memory: give one of them")
        args.gpu_mem, args.gpu_reserve = str(given.pop("gpu_mem")), "0"
    if "act_policy" in given:
        args.act_policy = str(given.pop("act_policy"))
    if "prefetch_depth" in given:  # (the search then tries that depth alone: Workload.depths)
        depth = given.pop("prefetch_depth")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"offload.prefetch_depth must be a whole number of stages, at least 1, got {depth!r}")
        args.prefetch_depth = depth
    if str(given.get("mode", "ssd")) != "ssd":
        raise ConfigError(f"offload.mode={given['mode']}: plan plans training offloaded to the SSD (offload.mode=ssd)")
    given.pop("mode", None)
    if "ssd_dirs" in given:
        raise ConfigError("offload.ssd_dirs: plan takes the drives as --ssd COUNTxPRESET (e.g. 2x990-pro), or "
                          "measured: --profile FILE from `fuyou probe --ssd DIR`")


def _plan(args) -> int:
    import json
    import math

    from fuyou.errors import ConfigError
    from fuyou.planner.config import HardwareConfig
    from fuyou.planner.cost import Workload
    from fuyou.planner.hardware import resolve
    from fuyou.policy import read_act_policy
    from fuyou.planner.report import plot, text, to_json
    from fuyou.planner.search import (CPU_FIX, CPU_RESERVE, CPU_RESERVE_FRACTION, search, search_global_batch,
                                      search_split)
    from fuyou.units import format_size, parse_size, unitless_hint

    if args.plot:  # checked before planning: a plot asked for and silently skipped is a surprise
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("--plot needs matplotlib: pip install 'fuyou[plot]'")
    if args.ssd and len(args.ssd) > 1:  # (fuyou train's --ssd is one directory a drive, and repeats)
        import re

        kinds = {re.sub(r"^\d+x", "", s.lower()) for s in args.ssd}
        counts = sum(int(m.group(1)) if (m := re.match(r"^(\d+)x", s.lower())) else 1 for s in args.ssd)
        dirs = any("/" in s for s in args.ssd)
        example = (f"--ssd {counts}x{kinds.pop()}" if len(kinds) == 1 and not dirs else
                   "--ssd COUNTxPRESET (e.g. 2x990-pro), or --profile FILE from `fuyou probe --ssd DIR`")
        raise ConfigError(f"--ssd names the drives once, with their count: {example} (got --ssd "
                          f"{' --ssd '.join(args.ssd)}" + ("; plan takes drive models, not directories" if dirs
                                                            else "") + ")")
    args.ssd = args.ssd[0] if args.ssd else None
    tokens_goal = _token_count(args.tokens) if args.tokens else None
    for name in ("batch", "seq", "grad_accum"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    split = _global_batch(args)
    gpus = _plan_gpus(args, split)
    fields, other = _plan_model_fields(args.model, args.overrides)
    given = other.setdefault("offload", {})
    _plan_offload_flags(args, given)
    if "grad_clip" in other.get("train", {}):  # as fuyou train spells it (the plan's what-ifs do): --grad-clip
        args.grad_clip = str(other["train"].pop("grad_clip"))
    cfg = _model_config(fields)
    if args.seq > cfg.max_seq_len:
        if cfg.family == "gpt":  # its learned position table grows with the length (fuyou train refuses it)
            from pathlib import Path

            if Path(args.model).expanduser().exists():  # a checkpoint: its learned positions are what they are
                raise ConfigError(f"--seq {args.seq} is beyond the checkpoint's {cfg.max_seq_len} learned positions "
                                  f"(a GPT's position table): fuyou train refuses a longer data.seq_len for it; plan "
                                  f"--seq {cfg.max_seq_len} or less")
            print(f"note: --seq {args.seq} is beyond the model's {cfg.max_seq_len} positions: planned with "
                  f"model.max_seq_len={args.seq} (give fuyou train the same, or a shorter data.seq_len)",
                  file=sys.stderr)
        cfg = cfg.model_copy(update={"max_seq_len": args.seq})
    nums = {k: getattr(args, k) for k in ("gpu_tflops", "ssd_read", "ssd_write", "pcie_bw", "cpu_adam", "ssd_tbw",
                                          "gpu_link")}
    try:
        nums = {k: float(v) for k, v in nums.items() if v is not None}
    except ValueError as e:
        raise ConfigError(f"a numeric hardware override is not a number: {e}") from None
    from pydantic import ValidationError

    from fuyou.config import explain

    try:
        hwc = HardwareConfig(profile=args.profile, gpu=args.gpu, ssd=args.ssd, pcie=args.pcie, gpu_mem=args.gpu_mem,
                             gpu_reserve=args.gpu_reserve, ssd_capacity=args.ssd_capacity, **nums)
    except ValidationError as e:  # in the flags' names: the hardware section's fields are plan's options
        import re

        text = explain(e, "hardware").replace("invalid configuration:", "invalid hardware option:")
        raise ConfigError(re.sub(r"hardware\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), text)) from None
    except ValueError as e:
        raise ConfigError(f"invalid hardware option: {e}") from None
    hw = resolve(hwc)
    from fuyou.engine.config import OffloadConfig

    try:
        for flag, key in (("commit", "commit"), ("commit_every", "commit_every")):
            value = getattr(args, flag)
            if value is not None and key in given and str(given[key]) != str(value):
                raise ConfigError(f"--{flag.replace('_', '-')} {value} and offload.{key}={given[key]} disagree; "
                                  f"give one")
        flags = {k: getattr(args, k) for k in ("commit", "commit_every") if getattr(args, k) is not None}
        try:
            off = OffloadConfig(**{**flags, **given})
        except ValidationError as e:
            raise ConfigError(explain(e, "offload").replace("invalid configuration:", "invalid offload override "
                                                            "(or --commit, --commit-every):")) from None
        if off.commit == "none" and "commit_every" in {**flags, **given}:
            raise ConfigError("--commit-every sets how often a crash-safe commit is made, and --commit none makes "
                              "none; give one")
        clip = None if args.grad_clip.lower() == "none" else float(args.grad_clip)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"invalid --commit-every, --grad-clip or offload override: {e}") from None
    precision = other.get("train", {}).get("precision", "bf16")
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision={precision}: bf16 or fp32")
    if clip is not None and not (0 < clip < float("inf")):
        raise ConfigError(f"--grad-clip must be a positive number or none, got {args.grad_clip}")
    from fuyou.optim.compressed import StateFormat

    try:
        fmt = StateFormat(**other.get("optim", {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid optim override: {e}") from None
    from fuyou.models.lora import LoRAConfig, resolve_targets

    try:
        lora = LoRAConfig(**other.get("lora", {}))
    except ValidationError as e:
        raise ConfigError(explain(e, "lora").replace("invalid configuration:", "invalid lora override:")) from None
    resolve_targets(cfg.family, lora.targets)
    if lora.enabled and not fmt.exact:
        raise ConfigError("optim.master/optim.moments apply to full fine-tuning; LoRA keeps the adapters' state in memory")
    w = Workload(cfg, args.batch or 16, args.seq, grad_accum=args.grad_accum or gpus, offload=off, grad_clip=clip,
                 csize=2 if precision == "bf16" else 4, fmt=fmt, lora=lora, ranks=gpus,
                 **({"depths": (args.prefetch_depth,)} if args.prefetch_depth else {}))
    if w.sharded and gpus > len(w.numels):
        raise ConfigError(f"--gpus {gpus} for a model of {len(w.numels)} stages: each rank owns the optimizer state of "
                          f"whole stages, so use at most {len(w.numels)} GPUs")
    policy = None
    if args.act_policy is not None:  # (an empty one is refused as such, not taken as "search")
        policy = read_act_policy(args.act_policy, cfg.n_layer,
                                 **({"prefetch_depth": args.prefetch_depth} if args.prefetch_depth else {}))
    if args.cpu_mem is None:  # the machine the profile measured, else the documented default
        measured = hw.cpu_mem if args.profile else None
        args.cpu_mem = str(measured) if measured else "256GiB"
        if measured:
            print(f"note: planning the {format_size(measured)} of CPU memory {args.profile} measured (--cpu-mem sets "
                  f"another budget)", file=sys.stderr)
    cpu_given = parse_size(args.cpu_mem)
    share = cpu_given // gpus  # each rank's share of the machine (fuyou/distributed.py: Dist.rank_config)
    reserve = (parse_size(args.cpu_reserve) if args.cpu_reserve is not None
               else CPU_RESERVE[hw.device] + int(share * CPU_RESERVE_FRACTION))
    cpu = share - reserve
    if cpu <= 0:
        each = f" (each of {gpus} ranks' share {format_size(share)})" if gpus > 1 else ""
        need = search(w, hw, 4096, policy, whatif=False, ladder=False).cpu_need  # what the smallest plan needs
        # the default reserve grows with the budget: CPU_RESERVE + CPU_RESERVE_FRACTION of it
        total = (need + reserve if args.cpu_reserve is not None else
                 math.ceil((need + CPU_RESERVE[hw.device]) / (1 - CPU_RESERVE_FRACTION))) if need else 0
        least = (f"; this model needs at least {format_size(total * gpus, up=True)} (--cpu-mem, with the reserve)"
                 if need else "")
        raise ConfigError(f"--cpu-reserve {format_size(reserve)} (memory the plan leaves to the process itself) leaves "
                          f"nothing of --cpu-mem {format_size(cpu_given)}{unitless_hint(cpu_given)}{each}{least}; or "
                          f"reserve less (--cpu-reserve 0 plans the whole budget)")
    if split is None:
        plan = search(w, hw, cpu, policy)
    elif split[0] == split[1]:
        plan = search_split(w, hw, cpu, split[0], policy)
    else:
        plan = search_global_batch(w, hw, cpu, *split, policy)
    plan.cpu_given = cpu_given
    plan.tokens_goal = tokens_goal
    if plan.cpu_need:  # the fix in --cpu-mem's terms: the planned budget plus the reserve, per rank, for the machine
        reserved = args.cpu_reserve is not None  # (else the default reserve, which grows with the budget)
        per = (plan.cpu_need + reserve if reserved
               else -(-(plan.cpu_need + CPU_RESERVE[hw.device]) // (1 - CPU_RESERVE_FRACTION)))
        fix = (f"{CPU_FIX} {format_size(int(per) * gpus, up=True)} (--cpu-mem; it plans "
               f"{format_size(plan.cpu_need, up=True)} after the "
               f"reserve of {format_size(reserve if reserved else int(per) - plan.cpu_need)}"
               + (f", for each of {gpus} ranks" if gpus > 1 else "") + ")" + plan.cpu_note)
        plan.fixes = [fix if f.startswith(CPU_FIX) else f for f in plan.fixes]
    print(json.dumps(to_json(plan), indent=1) if args.json else text(plan))
    if args.plot and plan.feasible:
        if plot(plan, args.plot):
            print(f"wrote {args.plot}", file=sys.stderr)
        else:
            print("fuyou: --plot needs matplotlib (pip install 'fuyou[plot]'); skipped", file=sys.stderr)
    return 0 if plan.feasible else 1


def _probe(args) -> int:
    from fuyou.planner.hardware import save_profile
    from fuyou.planner.probe import probe
    from fuyou.units import format_size, parse_size

    from fuyou.errors import ConfigError

    io_bytes = parse_size(args.io_bytes)
    for flag, value, least in (("--repeats", args.repeats, 1), ("--io-bytes", io_bytes, 1 << 20),
                               ("--adam-params", args.adam_params, 1 << 16)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    for flag in ("batch", "seq"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    from pathlib import Path

    out = Path(args.out).expanduser()
    if out.is_dir() or not out.parent.is_dir():  # checked before minutes of measuring, not after
        raise ConfigError(f"--out {args.out}: " + ("a directory; give a file name such as profile.json" if out.is_dir()
                                                   else f"its directory {out.parent} does not exist; create it first"))
    model = args.model
    if model is not None:  # a preset or a path, as fuyou plan --model takes
        fields, _ = _plan_model_fields(model, [])
        model = _model_config(fields)
    prof, meas = probe(args.ssd, model=model, batch=args.batch, seq=args.seq, io_bytes=io_bytes,
                       precision=args.precision,
                       adam_params=args.adam_params, repeats=args.repeats)
    save_profile(prof, args.out, meas)
    c = meas["compute"]
    print(f"compute ({prof.device}, {c['block_shape']}): block forward {prof.fwd_flops / 1e12:.3g} TFLOPS, "
          f"recompute+backward {prof.bwd_flops / 1e12:.3g}, matmuls {prof.matmul_flops / 1e12:.3g}")
    if prof.device == "cuda":
        print(f"PCIe: H2D {prof.h2d / 1e9:.3g} GB/s, D2H {prof.d2h / 1e9:.3g} GB/s (pinned)")
    print(f"SSD ({args.ssd}, through the store): write {prof.ssd_write / 1e9:.3g} GB/s, read {prof.ssd_read / 1e9:.3g} "
          f"GB/s, mixed factor {prof.ssd_mixed_factor:.2f}, free {format_size(prof.ssd_capacity)}")
    print(f"between processes (gloo, data parallel): broadcast {prof.gloo_broadcast / 1e9:.3g} GB/s, reduce "
          f"{prof.gloo_reduce / 1e9:.3g} GB/s")
    j = meas["adam_job"]
    print(f"out-of-core AdamW job ({j['params'] / 1e6:.1f}M params): {j['s'] * 1e3:.1f} ms, predicted "
          f"{j['predicted_s'] * 1e3:.1f} ms -> efficiency {prof.adam_io_efficiency:.2f}")
    print(f"CPU AdamW: {prof.cpu_adam / 1e9:.3g} G params/s; memory: CPU {format_size(prof.cpu_mem or 0)}, "
          f"device {format_size(prof.gpu_mem)}")
    print(f"wrote {args.out}")
    return 0


def _train(args) -> int:
    from fuyou.config import load_config
    from fuyou.train.loop import run_training

    flags = {
        "model.preset": args.model, "offload.mode": args.offload, "offload.ssd_dirs": args.ssd,
        "offload.cpu_mem": args.cpu_mem, "offload.gpu_mem": args.gpu_mem, "offload.act_policy": args.act_policy, "train.steps": args.steps,
        "run.out_dir": args.out, "model.init_from": args.init_from,
    }
    resume = None
    if args.resume:
        from pathlib import Path

        from fuyou.errors import ConfigError

        resume = Path(args.resume)
        if resume.is_file() and resume.name == "config.toml":
            raise ConfigError(f"--resume takes the run directory, not its config.toml: --resume {resume.parent}")
        if not (resume / "config.toml").is_file():
            raise ConfigError(f"{resume} is not a run directory (no config.toml); give the directory a run printed")
        if args.config:
            raise ConfigError("--resume uses the run's own config.toml; drop --config")
        given = [o.partition("=")[2] for o in args.overrides if o.partition("=")[0].strip() == "model.init_from"]
        if args.init_from or given:
            import tomllib

            saved = tomllib.loads((resume / "config.toml").read_text())
            start, lora = saved.get("model", {}).get("init_from"), saved.get("lora", {}).get("rank", 0) > 0
            raise ConfigError(f"a resume continues from {resume}'s committed state, which started from "
                              f"{start or 'a random initialisation'}; --init-from / model.init_from "
                              f"({args.init_from or given[-1]}) cannot change that. Drop it, or start a new run from "
                              f"it" + (" (with lora.init_from the run's exported adapter, to keep the adapters)"
                                       if lora else ""))
        ranks = [o.partition("=")[2].strip() for o in args.overrides if o.partition("=")[0].strip() == "lora.rank"]
        if ranks:  # a clearer refusal than the config's own checks give (LoRA settings without a rank)
            import tomllib

            from fuyou.config import _parse_value

            had = tomllib.loads((resume / "config.toml").read_text()).get("lora", {}).get("rank", 0)
            if _parse_value(ranks[-1]) != had:
                raise ConfigError(f"a resumed run cannot change lora.rank ({had!r} -> {ranks[-1]}): it fixes the shape "
                                  f"of its committed state. Resume with the run's own value, or start a new run")
        args.config = resume / "config.toml"
        # the weights come from the committed SSD state; the saved config already holds the shape and
        # tokenizer an init_from checkpoint gave, so that checkpoint need not exist any more
        args.overrides = ["model.init_from=none", *args.overrides]
    cfg = load_config(args.config, args.overrides, {k: v for k, v in flags.items() if v is not None})
    if args.ssd and cfg.offload.mode != "ssd":
        from fuyou.errors import ConfigError

        raise ConfigError(f"--ssd gives the SSD tier's directories, but this run does not offload to it "
                          f"(offload.mode={cfg.offload.mode!r}): add --offload ssd, or drop --ssd")
    if args.trace and cfg.offload.mode != "ssd":
        from fuyou.errors import ConfigError

        raise ConfigError("--trace records the three-tier engine's tasks; use it with --offload ssd")
    if args.trace:
        from pathlib import Path

        from fuyou.errors import ConfigError

        parent = Path(args.trace).resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"--trace {args.trace}: the directory {parent} does not exist; create it first")
        if Path(args.trace).is_dir():
            raise ConfigError(f"--trace {args.trace} is a directory; give a file name such as trace.json")
    return run_training(cfg, trace=args.trace, plan_auto=args.plan == "auto", resume=resume).exit_status


def _models(args) -> int:
    from fuyou.models import PRESETS, ModelConfig, StageModel, preset
    from fuyou.optim.compressed import StateFormat
    from fuyou.train.metrics import si
    from fuyou.units import format_size

    fmt = StateFormat(args.master, args.moments)
    small = StateFormat("bf16", "int8")
    w = max(len(name) for name in PRESETS)
    header = f"{'preset':<{w}} {'family':<6} {'layers':>6} {'width':>6} {'heads':>9} {'params':>10}  " \
             f"{args.master + ' master':>12} {'Adam m+v':>12} {'bf16 weights':>12} {'total':>12} {'bf16/int8':>12}"
    print(header)
    print("-" * len(header))
    for name in PRESETS:
        cfg = ModelConfig(**preset(name))
        model = StageModel(cfg)
        n = model.num_params
        b = model.state_bytes(fmt=fmt)
        if fmt.master == "bf16":  # the bf16 master is the compute copy: stored once, counted once
            b["compute_weights"] = 0
        heads = f"{cfg.n_head}" + (f"/{cfg.kv_heads}kv" if cfg.kv_heads != cfg.n_head else "")
        weights = format_size(b["compute_weights"]) if b["compute_weights"] else "(master)"
        print(f"{name:<{w}} {cfg.family:<6} {cfg.n_layer:>6} {cfg.d_model:>6} {heads:>9} {si(n).replace('G', 'B'):>10}  "
              f"{format_size(b['master']):>12} {format_size(b['moments']):>12} "
              f"{weights:>12} {format_size(sum(b.values())):>12} "
              f"{format_size(small.state_bytes(n)):>12}")
    print(f"\nTraining state per parameter: {fmt.describe()}, plus a bf16 compute copy of 2 B"
          + (" (the bf16 master is it, where the weights are not cached)" if fmt.master == "bf16" else "")
          + " (activations and gradients in flight come on top). The last column: optim.master=bf16 "
          f"optim.moments=int8, {small.bytes_per_param():.3g} B, the master being the compute weights "
          "(fuyou/optim/compressed.py).")
    return 0


def _check_out_dir(out: str) -> None:
    """An output directory that can be made and written, checked before any work."""
    import os
    from pathlib import Path

    from fuyou.errors import ConfigError

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {p} is a file; give a directory (new, or one to write into)")
    parent = next((q for q in [p, *p.parents] if q.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK) or (parent.is_dir() and _read_only_fs(parent)):
        raise ConfigError(f"--out {p}: {parent} cannot be written (read-only or no permission); choose another place")


def _read_only_fs(d) -> bool:
    import os

    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _prepare(args) -> int:
    from fuyou.data import ExampleData, tokenize_records
    from fuyou.data.dataset import write_prepared
    from fuyou.data.examples import write_examples

    if not 0 < args.val_fraction < 1:
        from fuyou.errors import ConfigError

        raise ConfigError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    import numpy as np

    _check_out_dir(args.out)
    from pathlib import Path

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / "meta.json").is_file():
            from fuyou.errors import ConfigError

            raise ConfigError(f"--out {out} holds other files than prepared data; give a new or empty directory")
        print(f"note: replacing the prepared data in {out}", file=sys.stderr)
    data = tokenize_records(args.inputs, args.tokenizer, args.format, args.train_on_prompt, args.val_fraction,
                            args.jsonl_field, args.eval)
    if isinstance(data, ExampleData):
        write_examples(args.out, data)
        info, ex = data.info, data.train
        formats = ", ".join(f"{n} {f}" if len(info["formats"]) > 1 else f for f, n in info["formats"].items())
        lengths = np.diff(ex.offsets) if len(ex) else np.zeros(1, np.int64)
        skipped = f", {info['skipped_no_answer']} skipped (nothing to learn)" if info.get("skipped_no_answer") else ""
        held = f", {info['held_records']} of them held-out (--eval)" if info.get("held_records") else ""
        print(f"read {info['records']} records ({formats}){held}{skipped}; wrote {data.summary()} "
              f"({ex.tokens.dtype}, tokenizer {data.tokenizer}; example length mean {lengths.mean():.0f}, "
              f"max {lengths.max()} tokens) to {args.out}")
        if info["last_turn_only"]:
            print(f"note: {info['last_turn_only']} conversations carry loss on their last assistant turn only: the "
                  f"chat template renders earlier turns differently once the conversation goes on")
    else:
        write_prepared(args.out, data)
        held = f", {data.held_documents} of them held-out (--eval)" if data.held_documents else ""
        print(f"read {data.documents} document{'s' if data.documents != 1 else ''}{held} (plain text: every token "
              f"carries loss); wrote {len(data.train)} train and {len(data.val)} val tokens ({data.train.dtype}, tokenizer "
              f"{data.tokenizer}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
