"""The ``fuyou`` command and its subcommands (``build_parser``)."""

from __future__ import annotations

import argparse
import sys

from fuyou.errors import FuyouError
from fuyou.planner.cli import add_parsers as add_planner_parsers


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # (before the command started: building the parser, importing; a traceback: a pass)
        print("fuyou: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["launch"]:  # torchrun's options, not ours; its help is ours (before the command's train)
        from fuyou.launch import wants_help

        if not wants_help(given[1:]):
            return _guarded(lambda: _launch(given[1:]))
        given = ["launch", "--help"]
    parser = build_parser()
    # key=value overrides may come before or after options: collect the ones argparse left over.
    args, extra = parser.parse_known_args(given)
    if extra:
        takes = isinstance(getattr(args, "overrides", None), list)  # (train and plan)
        if takes and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:  # the command's own usage, with the option it may have meant (it printed the top's: a pass)
            import difflib

            own = getattr(args, "command_parser", parser)
            options = [o for a in own._actions for o in a.option_strings]
            close = [m for e in extra if e.startswith("--")
                     for m in difflib.get_close_matches(e.split("=")[0], options, n=1)]
            own.error(f"unrecognized arguments: {' '.join(extra)}" + (f" (did you mean {', '.join(close)}?)"
                                                                       if close else ""))
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return _guarded(lambda: args.func(args) or 0)


def _guarded(command) -> int:
    """Run ``command`` and turn fuyou's errors, Ctrl-C and a closed pipe into exit statuses."""
    try:
        _quiet_other_ranks()  # (it imports torch: a Ctrl-C then was a traceback, not "interrupted": a pass)
        return command()
    except FuyouError as e:
        sys.stderr.write(f"fuyou: error{_rank_tag()}: {e}\n")  # one write: torchrun's ranks print beside each other
        sys.stderr.flush()
        _leave_ranks()
        return e.exit_status  # what to do next, 2 to 5 (fuyou/errors.py)
    except KeyboardInterrupt:
        print("fuyou: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fuyou models | head`: the reader left; not an error
        sys.stderr.close()
        return 0


class _NotesDropped:
    """A rank other than 0's stderr under torchrun: its notes (``NOTES``) are rank 0's to print (the same
    lines from every rank, interleaved: a pass); its errors, warnings and anything else pass, a line at a time."""

    NOTES = ("note:", "fuyou: note:", "fuyou: data:")

    def __init__(self, stream):
        self.stream, self.part = stream, ""

    def write(self, text: str) -> int:
        *lines, self.part = (self.part + text).split("\n")
        kept = [line for line in lines if not line.startswith(self.NOTES)]
        if kept:
            self.stream.write("\n".join(kept) + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _quiet_other_ranks() -> None:
    import atexit
    import os

    from fuyou.distributed import launched_world

    if launched_world() > 1 and os.environ.get("RANK", "0") != "0" and not isinstance(sys.stderr, _NotesDropped):
        sys.stderr = quiet = _NotesDropped(sys.stderr)
        atexit.register(lambda: quiet.part and quiet.stream.write(quiet.part))


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


class _Once(argparse.Action):
    """An option that takes one value: given twice, the second replaced the first in silence (two --config
    files trained the second's model: a pass); refused instead."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            hint = (" (several config files are not merged; put the settings in one, or give the others as "
                    "KEY=VALUE overrides)" if self.dest == "config" else "")
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r} and {values!r}): give it "
                         f"once{hint}")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    from fuyou.data.formats import FORMATS  # (numpy only: the parser stays quick to build)

    p = argparse.ArgumentParser(prog="fuyou", description="fuyou: fine-tune GPT- and Llama-class models larger than "
                                "GPU or CPU memory on one GPU, with NVMe SSDs as a third memory tier. `fuyou COMMAND "
                                "--help` describes each command.")
    sub = p.add_subparsers(metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (default: a small GPT on the embedded corpus, on the CPU)",
                       description="Train a model. Overrides are section.key=value, e.g. train.steps=100 "
                       "model.preset=gpt3-125m optim.lr=3e-4 (sections: model data train optim offload lora hardware "
                       "run).")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    t.add_argument("--config", action=_Once, help="a TOML config file (see configs/)")
    t.add_argument("--model", action=_Once, help="model preset (same as model.preset=NAME)")
    t.add_argument("--offload", action=_Once, choices=["none", "ssd"], help="where the training state lives")
    t.add_argument("--ssd", action="append", metavar="DIR", help="an SSD directory (repeat for several drives)")
    t.add_argument("--cpu-mem", action=_Once, help="CPU memory budget, e.g. 8GiB")
    t.add_argument("--gpu-mem", action=_Once, help="GPU memory budget, e.g. 20GiB")
    t.add_argument("--act-policy", action=_Once,
                   help="activation policy (offload ssd): 'recompute', e.g. 'fc2,proj=ssd', "
                   "'30-39:all=gpu', or a JSON file from `fuyou plan --json`")
    t.add_argument("--plan", action=_Once,
                   choices=["auto"], help="auto: probe (or load hardware.profile), plan the activation "
                   "policy and prefetch depth, print the schedule, train with it (offload ssd)")
    t.add_argument("--resume", action=_Once,
                   metavar="RUN_DIR", help="continue an SSD-offloaded run from its last commit "
                   "(its config.toml; overrides such as train.steps=N still apply)")
    t.add_argument("--init-from", action=_Once,
                   metavar="DIR", help="start from these weights: a local Hugging Face model "
                   "directory (Llama/Mistral/Qwen2/GPT-2, safetensors) or a fuyou run directory (same as "
                   "model.init_from=DIR; its shape wins over the preset)")
    t.add_argument("--steps", action=_Once, type=int, help="optimizer steps")
    t.add_argument("--out", action=_Once, help="parent directory of run directories (default: runs)")
    t.add_argument("--trace", action=_Once,
                   metavar="FILE", help="write a Chrome/Perfetto trace of the second step (offload ssd)")
    t.set_defaults(func=_train, command_parser=t)

    m = sub.add_parser("models", help="list model presets with parameter counts and training-state bytes")
    m.add_argument("--master", choices=["fp32", "bf16"], default="fp32", help="the master weights' format "
                   "(optim.master) the byte columns assume")
    m.add_argument("--moments", choices=["fp32", "bf16", "int8"], default="fp32", help="Adam moments' format "
                   "(optim.moments) the byte columns assume")
    m.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="the compute precision "
                   "(train.precision) the byte columns assume: the weights streamed to the device are a copy in it, "
                   "unless the master is in it too (default: bf16, what train.precision=auto takes on a GPU of "
                   "compute capability 8.0 or later)")
    m.set_defaults(func=_models)

    d = sub.add_parser("data", help="data tools")
    d.set_defaults(func=lambda args: (d.print_help(), 2)[1])  # no action: this command's help, not the top's
    dsub = d.add_subparsers(metavar="ACTION")
    prep = dsub.add_parser("prepare", help="tokenize text, prompt/completion, Alpaca or chat JSONL into memmaps",
                           description="Tokenize files once for `fuyou train data.path=OUT`: plain text becomes a "
                           "token stream; fine-tuning records (prompt/completion, instruction/input/output, chat "
                           "messages) become examples with a loss mask (fuyou/data/formats.py).")
    prep.add_argument("inputs", nargs="+", help="text files, .jsonl files or directories")
    prep.add_argument("--out", required=True, help="output directory (*.bin, meta.json); prepared data already "
                      "there is replaced, whole, once the new data is written")
    prep.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer or model "
                      "directory (use the model's own: training checks that they match)")
    prep.add_argument("--format", default="auto", choices=list(FORMATS),
                      help="record format of JSON lines (auto: from the first record's keys)")
    prep.add_argument("--train-on-prompt", action="store_true", help="loss on prompts and user turns too")
    prep.add_argument("--eval", action="append", metavar="PATH",
                      help="a held-out file or directory, instead of --val-fraction (repeat it for several)")
    prep.add_argument("--val-fraction", type=float, default=None, help="share held out (default 0.05; of tokens "
                      "for text; of examples for fine-tuning records, each by its content: about that share, repeats "
                      "together)")
    prep.add_argument("--jsonl-field", default="text", help="field with the text in JSON lines of plain text")
    prep.set_defaults(func=_prepare, command_parser=prep)
    add_planner_parsers(sub)
    _add_hf_parsers(sub)
    _own_usage(p)
    return p


def _own_usage(parser: argparse.ArgumentParser) -> None:
    """Every command's parser is the one whose usage (and did-you-mean) an unknown option gets (``main``): plan
    and models printed the top's (a pass)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if child.get_default("command_parser") is None:
                    child.set_defaults(command_parser=child)
                _own_usage(child)


def _add_hf_parsers(sub) -> None:
    im = sub.add_parser("import", help="convert a local Hugging Face model into a run directory to train from",
                        description="Read a local Hugging Face model directory (config.json, *.safetensors, tokenizer "
                        "files; LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                        "GPT2LMHeadModel) and write RUN_DIR/model.safetensors (fp32, fuyou's names, streamed tensor "
                        "by tensor), RUN_DIR/hf/ "
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
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (finished; or offloaded and stopped or "
                    "still training: its last commit), a snapshot (RUN_DIR/snapshots/step-N) or one made by "
                    "`fuyou import`")
    ex.add_argument("--out", required=True, metavar="HF_DIR", help="output directory (new or empty)")
    ex.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="dtype of the written weights (default fp32, the master weights as they are; bf16 halves the size)")
    ex.add_argument("--shard-size", default="2GiB", help="largest shard, e.g. 2GiB, 5GB (default 2GiB)")
    ex.add_argument("--merge", action="store_true",
                    help="LoRA runs: write the base model with the adapters merged (W + scale * B @ A) as a full "
                    "Hugging Face model directory instead of a PEFT adapter directory")
    ex.add_argument("--ssd", action="append", metavar="DIR",
                    help="a stopped run's SSD directories, if its state moved (repeat for several, as the run had "
                    "them; train --resume and reshard take the same)")
    ex.set_defaults(func=_export)

    la = sub.add_parser("launch", help="train on several processes (data parallel): torchrun, exiting with the "
                        "ranks' status", usage="fuyou launch [TORCHRUN OPTIONS] train [TRAIN ARGUMENTS]",
                        description="Starts `fuyou train` on several processes through torchrun's launcher "
                        "(torch.distributed.run, with its options: --nproc_per_node, --nnodes, --node_rank, "
                        "--master_addr, --rdzv_endpoint, ...; `torchrun --help` lists them) and exits with the "
                        "ranks' status (fuyou/errors.py), which torchrun reduces to 1: 0 when every rank finished, "
                        "else the failed ranks' (one that a retry cannot mend first: 1, 2, 3, 5; then 4 or "
                        "128 + a signal's number), 128 + N when signal N stopped it. Example: fuyou launch "
                        "--nproc_per_node=2 train --offload ssd --ssd /nvme0 --ssd /nvme1 --cpu-mem 64GiB "
                        "train.grad_accum=8")
    la.set_defaults(func=lambda args: la.print_help() or 2)

    rs = sub.add_parser("reshard", help="rewrite a stopped run's state for another number of data-parallel "
                        "processes (fuyou launch / torchrun --nproc_per_node) before resuming it",
                        description="A run trained by N processes keeps one state per rank (full fine-tuning: "
                        "each rank the optimizer state of the stages it owns). Run this once, without torchrun, "
                        "between two launches to continue the run's last commit on another number of processes "
                        "of this machine; then `fuyou launch --nproc_per_node=M train --resume RUN_DIR` "
                        "(M=1: `fuyou train --resume RUN_DIR`). The old state is replaced only once the new one is "
                        "complete; an interrupted reshard is finished by running it again.")
    rs.add_argument("run_dir", metavar="RUN_DIR", help="a stopped run directory")
    rs.add_argument("--nproc", type=int, required=True, metavar="M",
                    help="the number of processes the resume will run (torchrun --nproc_per_node)")
    rs.add_argument("--ssd", action="append", metavar="DIR",
                    help="the run's SSD directories, if they moved (repeat for several; give the resume the same)")
    rs.set_defaults(func=_reshard)


def _launch(argv: list[str]) -> int:
    from fuyou.launch import launch

    return launch(argv)


def _reshard(args) -> int:
    from fuyou.reshard import reshard

    print(reshard(args.run_dir, args.nproc, args.ssd))
    return 0


def _import(args) -> int:
    from fuyou.train.run import import_checkpoint

    _check_out_dir(args.out)  # (a file as --out: a NotADirectoryError traceback)
    out = import_checkpoint(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} into {out}; train with: fuyou train --config {out / 'config.toml'}")
    return 0


def _export(args) -> int:
    from pathlib import Path

    from fuyou.config import given_run_dir
    from fuyou.errors import ConfigError
    from fuyou.train.run import export_run_dir
    from fuyou.units import parse_size

    _check_out_dir(args.out)
    if not Path(args.run_dir).expanduser().is_dir():
        raise ConfigError(f"{args.run_dir} does not exist or is not a directory: give a run directory (the one "
                          f"`fuyou train` printed), a snapshot in it, or a directory made by `fuyou import`")
    out = Path(args.out).expanduser()
    made = not out.exists()
    try:
        files = export_run_dir(given_run_dir(args.run_dir), args.out, args.dtype, parse_size(args.shard_size),
                               merge=args.merge, ssd_dirs=args.ssd)
    except Exception as e:
        # a full or failing disk (OSError, or safetensors' own error for the same): a sentence, not a traceback,
        # and nothing half-written left in --out (it was new or empty: export_run_dir checks that first)
        from fuyou.train.run import ExportBusy

        if isinstance(e, ExportBusy):  # (the directory may be the other export's, still empty: a review)
            raise
        if isinstance(e, FuyouError) and made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # (a refusal said "nothing was written" and left the directory it made: a pass)
        if isinstance(e, FuyouError) or not (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):
            raise
        _clear_export(out, made)
        from fuyou.train.run import SaveError

        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        raise SaveError(f"the export to {out} failed: {getattr(e, 'strerror', None) or e}{where}. Free space or fix "
                        f"the disk that names (writing to {out}, or reading the run) and export again; nothing was "
                        f"kept in {out}, and the run is unchanged") from e
    kind = " as a PEFT adapter" if "adapter_config.json" in files else " merged" if args.merge else ""
    print(f"exported {args.run_dir} to {args.out}{kind} ({args.dtype}): {', '.join(files)}")
    return 0



def _clear_export(out, made: bool) -> None:
    """Remove what a failed export wrote to ``out`` (new, or empty before it: nothing of the user's)."""
    import shutil

    if made:
        shutil.rmtree(out, ignore_errors=True)
        return
    for f in list(out.iterdir()) if out.is_dir() else []:
        shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)


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

        from fuyou.config import given_run_dir

        resume = given_run_dir(args.resume)  # (`--resume .` looked for the state ".fuyou-state": a pass)
        if resume.is_file() and resume.name == "config.toml":
            raise ConfigError(f"--resume takes the run directory, not its config.toml: --resume {resume.parent}")
        if not resume.exists():
            raise ConfigError(f"{resume} does not exist; --resume takes the run directory a run printed (`run "
                              f"directory: ...`)")
        if not (resume / "config.toml").is_file():
            raise ConfigError(f"{resume} is not a run directory (no config.toml); give the directory a run printed")
        from fuyou.hf.source import snapshot_run

        run = snapshot_run(resume.resolve())
        if run is not None:  # (a new-user pass got "holds no model", or "cannot change model.preset")
            raise ConfigError(f"{resume} is a snapshot: weights only, no optimizer state or place in the data. "
                              f"Resume its run from the run's last commit (--resume {run}), or start a new run from "
                              f"the snapshot's weights (--init-from {resume})")
        if args.config:
            raise ConfigError("--resume uses the run's own config.toml; drop --config")
        from fuyou.tomlfile import read_toml

        saved = read_toml(resume / "config.toml")  # (read once, for the refusals below that name its values)
        model, lora = (saved.get(k) if isinstance(saved.get(k), dict) else None for k in ("model", "lora"))
        given = [o.partition("=")[2] for o in args.overrides if o.partition("=")[0].strip() == "model.init_from"]
        start = (model or {}).get("init_from")
        if (args.init_from or given) and _same_place(args.init_from or given[-1], start):  # (a hostile pass: the
            # run's own start was "cannot change that")
            print(f"fuyou: note: --init-from / model.init_from is where {resume} started; a resume continues from its "
                  f"committed state", file=sys.stderr)
            args.init_from, given = None, []
            args.overrides = [o for o in args.overrides if o.partition("=")[0].strip() != "model.init_from"]
        if args.init_from or given:
            adapted = ((lora or {}).get("rank") or 0) > 0
            raise ConfigError(f"a resume continues from {resume}'s committed state, which started from "
                              f"{start or 'a random initialisation'}; --init-from / model.init_from "
                              f"({args.init_from or given[-1]}) cannot change that. Drop it, or start a new run from "
                              f"it" + (" (with lora.init_from the run's exported adapter, to keep the adapters)"
                                       if adapted else ""))
        # (before the config's own checks, which blamed the preset's family: a pass; [model] no table: they say so)
        presets = [o.partition("=")[2].strip().strip("'\"") for o in args.overrides
                   if o.partition("=")[0].strip() == "model.preset"]  # (as an override it was blamed on n_kv_head)
        preset = args.model or (presets[-1] if presets else None)
        if preset and model is not None and preset != model.get("preset"):
            raise ConfigError(f"a resumed run cannot change model.preset ({model.get('preset')!r} -> {preset!r}): "
                              f"its committed state has the run's model. Drop "
                              f"{'--model' if args.model else 'model.preset'}, or start a new run")
        placed = [o.partition("=")[0].strip() for o in args.overrides
                  if o.partition("=")[0].strip() in ("run.out_dir", "run.name")] + (["--out"] if args.out else [])
        if placed:  # (ignored in silence: a pass)
            print(f"fuyou: note: {', '.join(placed)} name a new run's directory; a resume continues in {resume}",
                  file=sys.stderr)
        ranks = [o.partition("=")[2].strip() for o in args.overrides if o.partition("=")[0].strip() == "lora.rank"]
        if ranks:  # a clearer refusal than the config's own checks give (LoRA settings without a rank)
            from fuyou.config import _parse_value

            had = (lora or {}).get("rank", 0)
            if _parse_value(ranks[-1]) != had:
                raise ConfigError(f"a resumed run cannot change lora.rank ({had!r} -> {ranks[-1]}): it fixes the shape "
                                  f"of its committed state. Resume with the run's own value, or start a new run")
        args.config = resume / "config.toml"
        # the weights come from the committed SSD state; the saved config already holds the shape and
        # tokenizer an init_from checkpoint gave, so that checkpoint need not exist any more
        args.overrides = ["model.init_from=none", *_run_tokenizer(resume, args.overrides), *args.overrides]
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

        trace = Path(args.trace)
        parent = trace.resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"--trace {args.trace}: {parent} " + ("is not a directory" if parent.exists() else
                                                                    "does not exist; create it first"))
        if trace.is_dir():
            raise ConfigError(f"--trace {args.trace} is a directory; give a file name such as trace.json")
        if trace.exists() and not _is_trace(trace):  # (a pass wrote it over the run's config.toml, and a --config)
            raise ConfigError(f"--trace {args.trace} exists and is not a trace fuyou wrote: give a new file name (a "
                              f"trace is replaced)")
        from fuyou.planner.cli import check_writable

        check_writable(trace, "--trace")
    return run_training(cfg, trace=args.trace, plan_auto=args.plan == "auto", resume=resume).exit_status


def _is_trace(path) -> bool:
    """Whether ``path`` holds a Chrome/Perfetto trace (JSON with ``traceEvents``) or nothing, which --trace may
    replace."""
    import json
    from pathlib import Path

    try:
        if Path(path).stat().st_size == 0:
            return True
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "traceEvents" in data


def _run_tokenizer(run, overrides: list[str]) -> list[str]:
    """A resume whose tokenizer was the checkpoint it started from, now gone (a cleared model cache), reads
    the copy the run keeps of it (``RUN/hf``): ``data.tokenizer=RUN/hf``, with a note. Nothing otherwise."""
    from pathlib import Path

    from fuyou.errors import ConfigError
    from fuyou.hf.source import tokenizer_dir
    from fuyou.tomlfile import read_toml

    try:
        tok = read_toml(run / "config.toml").get("data", {}).get("tokenizer")
    except (ConfigError, OSError, AttributeError):  # (load_config says what is wrong with the file)
        return []
    if not isinstance(tok, str) or tok in ("byte", "auto") or Path(tok).expanduser().exists() or \
            any(o.partition("=")[0].strip() == "data.tokenizer" for o in overrides):
        return []
    copy = tokenizer_dir(run)
    if copy is None or copy.resolve() == Path(tok).expanduser().resolve():
        return []
    print(f"fuyou: note: the run's tokenizer {tok} no longer exists: reading the copy the run keeps, {copy}",
          file=sys.stderr)
    return [f"data.tokenizer={copy.resolve()}"]  # (relative, it was a change again from another directory: a pass)


def _models(args) -> int:
    from fuyou.models import PRESETS, ModelConfig, StageModel, preset
    from fuyou.models.precision import DTYPES
    from fuyou.optim.compressed import StateFormat
    from fuyou.train.metrics import si
    from fuyou.units import format_size

    fmt = StateFormat(args.master, args.moments)
    small = StateFormat("bf16", "int8")
    compute = DTYPES[args.precision]
    csize = compute.itemsize

    def total(f: StateFormat, n: int) -> int:  # one copy of the state, and the compute copy where it is apart
        return f.state_bytes(n) + (0 if f.master_is_compute(compute) else csize * n)

    w = max(len(name) for name in PRESETS)
    header = f"{'preset':<{w}} {'family':<6} {'layers':>6} {'width':>6} {'heads':>9} {'params':>10}  " \
             f"{args.master + ' master':>12} {'Adam m+v':>12} {args.precision + ' weights':>12} {'total':>12} " \
             f"{'bf16/int8':>12}"
    print(header)
    print("-" * len(header))
    for name in PRESETS:
        cfg = ModelConfig(**preset(name))
        model = StageModel(cfg)
        n = model.num_params
        b = model.state_bytes(compute_bytes=csize, fmt=fmt)
        if fmt.master_is_compute(compute):  # the master is the compute copy: stored once, counted once
            b["compute_weights"] = 0
        heads = f"{cfg.n_head}" + (f"/{cfg.kv_heads}kv" if cfg.kv_heads != cfg.n_head else "")
        weights = format_size(b["compute_weights"]) if b["compute_weights"] else "(master)"
        print(f"{name:<{w}} {cfg.family:<6} {cfg.n_layer:>6} {cfg.d_model:>6} {heads:>9} {si(n).replace('G', 'B'):>10}  "
              f"{format_size(b['master']):>12} {format_size(b['moments']):>12} "
              f"{weights:>12} {format_size(sum(b.values())):>12} "
              f"{format_size(total(small, n)):>12}")
    # (fp32 compute was counted with bf16's 2 B copy, the default's, though auto takes fp32 on most CPUs: a pass)
    copy = f"a {args.precision} compute copy of {csize} B"
    if fmt.master_is_compute(compute):
        copy += f" (the {fmt.master} master is it, where the weights are not cached)"
    small_note = (f"{small.bytes_per_param():.3g} B, the master being the compute weights"
                  if small.master_is_compute(compute) else
                  f"{small.bytes_per_param():.3g} B and the fp32 compute copy's 4 B: under fp32 compute a bf16 "
                  "master is not the compute weights")
    print(f"\nTraining state per parameter: {fmt.describe()}, plus {copy} (activations and gradients in flight come "
          f"on top). The last column: optim.master=bf16 optim.moments=int8 under {args.precision} compute, "
          f"{small_note} (fuyou/optim/compressed.py). These are one copy of the state; an SSD-offloaded run keeps "
          "more on its drives (the crash-safe commit's copies of the master and moments): `fuyou plan` gives that "
          "footprint.")
    return 0


def _check_out_dir(out: str) -> None:
    """An output directory that can be made and written, checked before any work."""
    import os
    from pathlib import Path

    from fuyou.errors import ConfigError

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {p} is a file; give a directory (new, or one to write into)")
    dead = next((q for q in [p, *p.parents] if q.is_symlink() and not q.exists()), None)
    if dead is not None:  # (was "cannot be made (File exists)": a pass; DEADLINK/sub too: a review)
        raise ConfigError(f"--out {p}: {dead} is a link to {os.readlink(dead)}, which does not exist; remove the link "
                          f"or make its target, or choose another place")
    parent = next((q for q in [p, *p.parents] if q.exists()), Path("."))
    if not parent.is_dir():  # (afile/sub: was "cannot be written (read-only or no permission)")
        raise ConfigError(f"--out {p}: {parent} is a file, not a directory; choose another place")
    if not os.access(parent, os.W_OK | os.X_OK) or (parent.is_dir() and _read_only_fs(parent)):
        raise ConfigError(f"--out {p}: {parent} cannot be written (read-only or no permission); choose another place")
    made = [q for q in [p, *p.parents] if not q.exists()]
    try:  # made and taken away again: /proc and /sys pass the checks above and refuse a directory
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {p} cannot be made ({e.strerror}); choose another place") from None
    for q in made:
        q.rmdir()


def _read_only_fs(d) -> bool:
    import os

    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _files_digest(paths) -> str:
    """A digest of the files at ``paths`` (a directory: its files, by name under it), by content: which
    held-out files a prepare read, wherever they sit (a resume compares it: train.records.prepared_settings)."""
    import hashlib
    from pathlib import Path

    h = hashlib.blake2b(digest_size=16)
    for p in map(Path, paths):
        for f in (sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")) if p.is_dir() else [p]):
            h.update((str(f.relative_to(p)) if p.is_dir() else "").encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return "blake2b:" + h.hexdigest()


def _prepare(args) -> int:
    from fuyou.data import ExampleData, tokenize_records
    from fuyou.data.dataset import replace_prepared, write_prepared
    from fuyou.data.examples import write_examples

    from fuyou.errors import ConfigError

    if args.val_fraction is not None and args.eval:  # (the share was dropped without a word: a pass)
        raise ConfigError("--val-fraction and --eval both choose the held-out data: --eval's files are held out "
                          "instead of a share of the inputs; give one of them")
    if args.val_fraction is None:
        args.val_fraction = 0.05
    if not 0 <= args.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be at least 0 (nothing held out) and below 1, got {args.val_fraction}")
    import numpy as np

    _check_out_dir(args.out)
    from pathlib import Path

    out = Path(args.out)
    name = out.resolve().name
    if out.is_dir():  # (leftovers of a killed prepare inside it are not "other files")
        from fuyou.data.dataset import sweep_leftovers

        sweep_leftovers(out, name)
        sweep_leftovers(out.resolve().parent, name)
    if out.is_dir() and any(not p.name.startswith(f".{name}.") for p in out.iterdir()):
        if not (out / "meta.json").is_file():
            from fuyou.errors import ConfigError

            raise ConfigError(f"--out {out} holds other files than prepared data; give a new or empty directory")
    replacing = (out / "meta.json").is_file()
    data = tokenize_records(args.inputs, args.tokenizer, args.format, args.train_on_prompt, args.val_fraction,
                            args.jsonl_field, args.eval)
    if isinstance(data, ExampleData) and not data.train.loss_tokens:  # (prepared, then refused by train: a pass)
        from fuyou.errors import DataError

        raise DataError(f"no training example has a token to learn ({data.summary()}): every answer is empty or the "
                        f"examples are a single token; nothing was written to {out}")
    try:  # a new directory put in the old one's place (replace_prepared): the old data or the new, whole
        # which held-out files: a resume compares them and names them (train.records.prepared_settings)
        extra = ({"eval_paths": [str(Path(e).resolve()) for e in args.eval], "eval_content": _files_digest(args.eval)}
                 if args.eval else None)
        replace_prepared(out, lambda d: (write_examples if isinstance(data, ExampleData) else write_prepared)(
            d, data, extra))
    except OSError as e:
        import errno

        from fuyou.errors import DataError

        # (numpy's tofile says "N requested and M written", with no errno: a full disk too, a pass)
        full = e.errno in (errno.ENOSPC, errno.EDQUOT) or (e.errno is None and "written" in str(e))
        raise DataError(f"writing the prepared data to {out} failed ({e.strerror or e}): "
                        + ("its previous data is intact" if replacing else "nothing was left there")
                        + ("; free space (or choose another --out) and run the command again" if full else
                           "; choose another --out (or fix what the error names) and run the command again")) from None
    if replacing:  # (it said "replacing" before tokenizing, also when the prepare then failed: a pass)
        print(f"note: replaced the prepared data in {out}", file=sys.stderr)
    if isinstance(data, ExampleData):
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
        held = f", {data.held_documents} of them held-out (--eval)" if data.held_documents else ""
        print(f"read {data.documents} document{'s' if data.documents != 1 else ''}{held} (plain text: every token "
              f"carries loss); wrote {len(data.train)} train and {len(data.val)} val tokens ({data.train.dtype}, "
              f"tokenizer "
              f"{data.tokenizer}) to {args.out}")
    return 0


def _same_place(given: str, start) -> bool:
    """Whether an ``--init-from`` names the place a run started from (its config's ``model.init_from``)."""
    from pathlib import Path

    if not isinstance(start, str) or not given or given.strip() in ("none", ""):
        return False
    try:
        return Path(given.strip().strip("'\"")).expanduser().resolve() == Path(start).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
