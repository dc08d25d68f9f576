"""`fuyou plan` and `fuyou probe`: their flags, and how the flags become a workload and hardware to plan
(the rest of the command line is ``fuyou.cli``)."""

from __future__ import annotations

import sys


def add_parsers(sub) -> None:
    """The `fuyou plan` and `fuyou probe` subcommands."""
    pl = sub.add_parser("plan", help="predict step time, memory and the swap schedule (no GPU, no weights)",
                        description="Plan a run: bytes per tier, predicted step time and bottleneck, the swap "
                        "schedule and a timeline of one step. Hardware by preset (--gpu, --ssd NxNAME, --pcie), by "
                        "numbers, or --profile FILE from `fuyou probe`.")
    pl.add_argument("--model", "--init-from", help="model preset (see `fuyou models`), or a path: a "
                    "Hugging Face config.json or model directory, or a fuyou run directory (planned as its config.toml "
                    "trains it, as --config plans a file; no weights are read); default: --config's model, else "
                    "gpt3-13b. --init-from DIR, model.init_from=DIR and model.preset=NAME, as train takes them, "
                    "are the same")
    pl.add_argument("--config", help="a fuyou train config file (see configs/): plan the run it describes (its model, "
                    "sequence, batch, precision, clipping, optimizer state, LoRA, offload settings and hardware "
                    "section); flags and overrides given here win over it")
    pl.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                    help="overrides, as for fuyou train: model fields (model.n_layer=48), LoRA (lora.rank=16 "
                    "lora.targets=all-linear), data settings (data.path=chat.jsonl: packed rows), engine settings "
                    "(offload.checkpoint_dtype=auto), train.precision, and the optimizer state's format "
                    "(optim.master=bf16 optim.moments=int8)")
    pl.add_argument("--batch", type=int, help="micro-batch size (sequences; default 16, or with --global-batch "
                    "the planner's split)")
    pl.add_argument("--seq", type=int, help="sequence length (default: data.seq_len when given, a run directory's, "
                    "else 1024)")
    pl.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    pl.add_argument("--global-batch", help="sequences per optimizer step: the planner splits it into micro-batches "
                    "(or give --batch or --grad-accum too, to set the split); a range LOW-HIGH (e.g. 32-256) also "
                    "chooses the global batch that trains the most tokens per second")
    pl.add_argument("--gpus", type=int, help="data parallel on this many GPUs of the machine (torchrun "
                    "--nproc_per_node): each runs --grad-accum/N of the step's micro-batches (default --grad-accum: "
                    "one each) and owns the optimizer state of some stages; --cpu-mem and the SSDs are the machine's, "
                    "shared (default 1, or the processes that trained a --model run directory)")
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
    pl.add_argument("--grad-clip",
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
    pr.add_argument("--precision", choices=_precisions(), default="auto",
                    help="compute dtype the block is timed in, as train.precision (default auto: bf16 where the "
                    "device computes it natively, else fp32, as train resolves it)")
    pr.set_defaults(func=_probe)


def _precisions() -> tuple[str, ...]:
    """train.precision's values, as its config declares them."""
    import typing

    from fuyou.train.config import TrainConfig

    return typing.get_args(TrainConfig.model_fields["precision"].annotation)


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


PLAN_SECTIONS = ("model", "offload", "train.precision", "train.grad_clip", "optim.master", "optim.moments", "lora",
                 "data")
RUN_DATA_KEYS = ("source", "path", "format", "packing", "seq_len")  # a run's rows: packed or not, and their length


def _plan_config_file(args) -> dict:
    """``fuyou plan --config FILE``: the run a ``fuyou train`` config file describes, as plan's own inputs
    (a pass: `plan --config configs/gpt3-1.3b-ssd.toml` was refused, and the file had to be typed again as
    flags). Its model (unless --model), its sequence and batch, precision and clipping, optimizer state, LoRA
    and offload settings, as {section: {key: value}} for ``_plan_model_fields`` beneath the command line's
    overrides; its hardware section and the flags it has (offload.cpu_mem: train's budget, planned as it is)
    where the command line leaves them out. Read as written, not validated as a config to train: its SSD
    directories and data need not exist to plan."""
    from pathlib import Path

    from pydantic import ValidationError

    from fuyou.config import explain, validate_keys
    from fuyou.errors import ConfigError
    from fuyou.tomlfile import read_toml

    p = Path(args.config).expanduser()
    if p.is_dir():
        raise ConfigError(f"--config {p} is a directory; give the TOML file itself (a run directory: --model DIR)")
    if not p.is_file():
        raise ConfigError(f"--config {p} does not exist; see configs/ for examples")
    raw = read_toml(p)
    named = p.parent if getattr(args, "from_run", False) else p  # (a run directory is named as the user gave it)
    validate_keys(raw)
    sec = {name: dict(raw.get(name) or {}) for name in ("model", "data", "train", "optim", "lora", "offload",
                                                        "hardware")}
    out: dict[str, dict] = {}
    model = sec["model"]
    if getattr(args, "model_override", None) or getattr(args, "unset_init_from", False):  # model.preset=/init_from=
        # given beside --config: the file's model with that one field replaced (``_model_from_overrides``)
        key, value = getattr(args, "model_override", None) or ("init_from", None)
        model.pop("init_from", None)
        if key == "init_from" and value is not None:
            model.pop("preset", None)
        if value is not None:
            model[key] = value
    if args.model is None:  # (--model replaces the file's model, its fields too)
        init = model.pop("init_from", None)
        args.model = str(Path(init).expanduser()) if init else str(model.pop("preset", "gpt-tiny"))
        if init:  # the checkpoint's shape wins over the file's, as in train (hf.source.checkpoint_model_fields)
            from fuyou.hf.config_map import SHAPE_FIELDS

            model = {k: v for k, v in model.items() if k != "preset" and k not in SHAPE_FIELDS}
        out["model"] = model
    # where the file is silent, train's defaults, not plan's (a review: seq 1024 and 256 GiB were planned for a
    # file train runs at 128 tokens and 8 GiB)
    from fuyou.data.config import DataConfig
    from fuyou.engine.config import OffloadConfig
    from fuyou.train.config import TrainConfig

    out["run_data"] = {"seq_len": DataConfig.model_fields["seq_len"].default,
                       **{k: v for k, v in sec["data"].items() if k in RUN_DATA_KEYS}}
    args.seq_file_default = "seq_len" not in sec["data"]  # (train's default: a short GPT lowers it, as train does)
    train = sec["train"]
    out["train"] = {k: train[k] for k in ("precision",) if k in train}
    if args.grad_clip is None:  # (none: validate_keys made it None)
        clip = train.get("grad_clip", TrainConfig.model_fields["grad_clip"].default)
        args.grad_clip = "none" if clip is None else str(clip)
    given = {k: train[k] for k in ("micro_batch_size", "grad_accum", "global_batch") if train.get(k) is not None}
    try:  # split as train splits it (a review: 5 x 6 was planned for global_batch 32, which train refuses)
        split = TrainConfig(**given)
    except ValidationError as e:
        raise ConfigError(f"{named}: " + explain(e, "train").replace("invalid configuration:\n  ", "")) from None
    out["run_batch"] = {"micro_batch_size": split.micro_batch_size, "grad_accum": split.grad_accum,
                        **({"global_batch": given["global_batch"]} if "global_batch" in given else {})}
    out["optim"] = {k: sec["optim"][k] for k in ("master", "moments") if k in sec["optim"]}
    if sec["lora"].get("rank"):
        out["lora"] = {k: v for k, v in sec["lora"].items() if k != "init_from"}
    off = sec["offload"]
    mode = str(off.pop("mode", OffloadConfig.model_fields["mode"].default))
    if mode != "ssd":
        print(f"note: {named} trains in memory (offload.mode={mode}); planned offloaded to the SSD, what plan plans "
              f"(fuyou train --offload ssd --ssd DIR)", file=sys.stderr)
    off.pop("ssd_dirs", None)  # (the drives: --ssd COUNTxPRESET or the hardware section's ssd)
    for key, flag in (("cpu_mem", "cpu_mem"), ("gpu_mem", "gpu_mem"), ("act_policy", "act_policy"),
                      ("prefetch_depth", "prefetch_depth"), ("commit", "commit"), ("commit_every", "commit_every")):
        if getattr(args, flag) is not None or (key == "cpu_mem" and args.cpu_reserve is not None):
            if key in ("cpu_mem", "gpu_mem") and key in off:  # (a budget is not a machine's memory: said, a review)
                flags = " and ".join(f"--{f.replace('_', '-')}" for f in (flag, "cpu_reserve")
                                     if getattr(args, f) is not None and (f == flag or key == "cpu_mem"))
                print(f"note: {flags} given: {named}'s offload.{key}={off[key]} (train's budget) is not planned",
                      file=sys.stderr)
            off.pop(key, None)  # the command line's wins
    if args.cpu_mem is None and args.cpu_reserve is None and "cpu_mem" not in off:
        off["cpu_mem"] = OffloadConfig.model_fields["cpu_mem"].default  # train's budget when the file is silent
    out["offload"] = off
    hardware = sec["hardware"]
    if "gpu_mem" in off:  # (train's device budget, beside which the GPU's own memory and reserve are not asked)
        hardware.pop("gpu_mem", None)
        hardware.pop("gpu_reserve", None)
    given = [k for k in ("profile", "gpu", "ssd", "pcie", "gpu_tflops", "ssd_read", "ssd_write", "pcie_bw", "cpu_adam")
             if getattr(args, k, None) is not None]
    profile = hardware.pop("profile", None)
    if profile is not None and not given:  # (with --gpu given, a run's own profile was refused as --profile: a review)
        if Path(str(profile)).expanduser().is_file():
            args.profile = str(profile)
            print(f"note: planned with {named}'s hardware.profile {profile}" + (
                " (the machine --plan auto measured)" if Path(str(profile)).name == "hardware-profile.json" else "")
                + "; hardware flags plan another", file=sys.stderr)
        else:
            print(f"note: {named}'s hardware.profile {profile} is not there (moved?): give --profile or presets",
                  file=sys.stderr)
    for key, value in hardware.items():
        if value is not None and getattr(args, key, None) is None:
            setattr(args, key, [str(value)] if key == "ssd" else str(value))
    return {k: v for k, v in out.items() if v}


def _plan_run_batch(args, run: dict) -> None:
    """The batch of a run directory or --config file (``run``: its micro_batch_size and grad_accum, and a file's
    global_batch where it gave one), beneath the command line's, which it gives way to as ``fuyou train --config
    FILE`` has its file's: two of the three are kept, those given here first (a run's grad_accum with --batch; a
    file's global batch split by --batch or --grad-accum). ``args.accum_from`` names where grad_accum came from."""
    from fuyou.errors import ConfigError

    if not run or args.global_batch is not None or (args.batch is not None and args.grad_accum is not None):
        return
    src = args.model if getattr(args, "from_run", False) else args.config or args.model
    mbs, accum, gb = (run.get(k) for k in ("micro_batch_size", "grad_accum", "global_batch"))
    if args.batch is None and args.grad_accum is None:
        args.batch, args.grad_accum = mbs, accum
        if accum is not None:
            args.accum_from = f"train.grad_accum={accum} (of {src})"
        return
    given, part = ("--batch", args.batch) if args.batch is not None else ("--grad-accum", args.grad_accum)
    if gb is not None and gb % part:
        raise ConfigError(f"train.global_batch={gb} (of {src}) is not a multiple of {given} {part}; give {given} a "
                          f"divisor of it, or --global-batch")
    if args.batch is not None:
        args.grad_accum = gb // part if gb is not None else accum
        if args.grad_accum is not None:
            args.accum_from = (f"grad_accum {args.grad_accum} (train.global_batch={gb} of {src} over --batch {part})"
                               if gb is not None else f"train.grad_accum={accum} (of {src})")
    else:
        args.batch = gb // part if gb is not None else mbs


def _plan_model_fields(model: str, overrides: list[str], base: dict | None = None) -> tuple[dict, dict]:
    """The model to plan: a preset or a path (``hf.source.model_shape``), with ``model.KEY=VALUE`` overrides;
    and the other sections' overrides plan takes (``PLAN_SECTIONS``), as {section: {key: value}}. ``base``:
    the same from a config file (``_plan_config_file``), beneath the overrides."""
    import json
    from pathlib import Path

    from fuyou.config import SECTIONS, _parse_value, _text_field, refuse_implicit
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
    base = {k: dict(v) for k, v in (base or {}).items()}
    fields.update(base.pop("model", {}))
    other: dict[str, dict] = base
    run_config = Path(model).expanduser() / "config.toml"
    if run_config.is_file():  # a fuyou run: plan its state as it trains it (the flags and overrides still win)
        # read as written, not validated as a config to train: its SSD directories need not exist to plan
        from fuyou.tomlfile import read_toml

        raw = read_toml(run_config)
        for section, keys in (("train", ("precision",)), ("optim", ("master", "moments"))):
            values = {k: raw[section][k] for k in keys if k in raw.get(section, {})}
            if values:  # (over a --config file's: --model RUN_DIR is the command line's)
                other.setdefault(section, {}).update(values)
        if raw.get("lora", {}).get("rank"):  # (its adapter checkpoint, if any, plays no part in a plan)
            other["lora"] = {k: v for k, v in raw["lora"].items() if k != "init_from"}
        run_data = {k: raw["data"][k] for k in RUN_DATA_KEYS if k in raw.get("data", {})}
        if run_data:
            other.setdefault("run_data", {}).update(run_data)
        train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
        # (whole numbers >= 1 only: "x" was a traceback, -3 planned "batch -3": a pass)
        batch = {k: train[k] for k in ("micro_batch_size", "grad_accum")
                 if isinstance(train.get(k), int) and not isinstance(train.get(k), bool) and train[k] >= 1}
        if batch:  # (its sequence was planned, its batch was not: 16, and the notes asked to probe at 16; a pass)
            other["run_batch"] = batch
        from fuyou.distributed import WORLD_FILE

        try:  # the processes that trained it (planned as one: a pass)
            world = json.loads((Path(model).expanduser() / WORLD_FILE).read_text())["world_size"]
        except (OSError, ValueError, KeyError, TypeError):
            world = None
        if isinstance(world, int) and not isinstance(world, bool) and world > 1:
            other["run_world"] = world
    for item in overrides:
        key, sep, text = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or not name or not (section in PLAN_SECTIONS or key.strip() in PLAN_SECTIONS):
            raise ConfigError(f"plan override {item!r}: plan takes model.KEY=VALUE, offload.KEY=VALUE, lora.KEY=VALUE, "
                              f"data.KEY=VALUE, train.precision, train.grad_clip, optim.master and optim.moments "
                              f"overrides (the batch (--batch, --grad-accum) and hardware have their own flags)")
        value = _parse_value(text.strip())
        if not isinstance(value, str) and _text_field(key.strip()):  # (as train reads it: a path is its text)
            value = text.strip()
        if section in SECTIONS:
            refuse_implicit(SECTIONS[section], section, name, value)
        if section == "model":
            fields[name] = value
        else:
            other.setdefault(section, {})[name] = value
    return fields, other


def _plan_data(other: dict, args) -> bool:
    """The data plan is told of (``data.KEY=VALUE``, as fuyou train takes them, over what a run directory's
    config says): whether its rows may pack several examples, so that attention takes a mask, which the
    activations' and the working set's estimates count (``DataConfig.may_pack``); and ``data.seq_len`` as
    the sequence to plan (``--seq`` must agree with it)."""
    from pathlib import Path

    from pydantic import ValidationError

    from fuyou.config import explain
    from fuyou.data.config import DataConfig
    from fuyou.errors import ConfigError

    given, run = other.pop("data", {}), other.pop("run_data", {})
    if "seq_len" in given:
        if args.seq is not None and args.seq != given["seq_len"]:
            raise ConfigError(f"--seq {args.seq} and data.seq_len={given['seq_len']} disagree; give one")
        args.seq = given["seq_len"]
    # (a GPT's shorter position table then lowers it; a --config file silent on it has train's default: a review)
    args.seq_default = args.seq is None and (getattr(args, "seq_file_default", False) or not run.get("seq_len"))
    args.seq = args.seq or run.get("seq_len") or 1024  # (a run directory: the sequence it trains)
    if not given and not run:
        return False
    try:
        return DataConfig(**{**run, **given}).may_pack
    except ValidationError as e:
        gone = all(x["type"] == "value_error" and "does not exist" in x["msg"] for x in e.errors())
        if not (run and gone) or "path" in given or "source" in given:
            raise ConfigError(explain(e, "data").replace("invalid configuration:", "invalid data override:")) from None
    # the run's data is gone (moved, or on another machine): its settings say whether rows packed
    merged = {**run, **given}
    packed = DataConfig.model_construct(**{**DataConfig().model_dump(), **merged}).may_pack
    named = [merged.get(k) or [] for k in ("path", "eval_path")]  # (data.path or eval_path: a string or a list)
    missing = ", ".join(str(p) for ps in named for p in ([ps] if isinstance(ps, str) else ps)
                        if not Path(str(p)).expanduser().exists())
    print(f"note: the data {missing} does not exist here: planned with "  # (in silence: a pass)
          f"{'packed' if packed else 'unpacked'} rows, as its settings say without the data (give data.path=... of "
          f"the data here, or data.packing)", file=sys.stderr)
    return packed


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
        # (named as given: a run directory's grad_accum was called "--grad-accum", a flag never given: a pass)
        accum = getattr(args, "accum_from", None) or f"--grad-accum {args.grad_accum}"
        raise ConfigError(f"{accum} does not divide among --gpus {n}: each GPU runs the same number of "
                          f"micro-batches; give a multiple of {n}")
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
        args.gpu_mem, args.gpu_reserve, args.gpu_budget = str(given.pop("gpu_mem")), "0", True
    if "act_policy" in given:
        args.act_policy = str(given.pop("act_policy"))
    if args.prefetch_depth is not None and args.prefetch_depth < 1:  # (0 was "not given"; -3 a traceback)
        raise ConfigError(f"--prefetch-depth must be at least 1 stage, got {args.prefetch_depth}")
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


def _model_from_overrides(args) -> None:
    """``model.preset=NAME`` or ``model.init_from=DIR``, as train takes them, choose the model as --model does
    (they were model fields plan did not read: gpt3-13b was planned, as "gpt-tiny" for model.preset=gpt-tiny)."""
    from fuyou.errors import ConfigError

    chosen = [o for o in args.overrides if o.partition("=")[0].strip() in ("model.preset", "model.init_from")]
    if not chosen:
        return
    if len(chosen) > 1 or args.model is not None:
        given = ([f"--model {args.model}"] if args.model is not None else []) + chosen
        raise ConfigError(f"{' and '.join(given)} each name the model to plan; give one")
    from pathlib import Path

    from fuyou.config import _parse_value

    args.overrides = [o for o in args.overrides if o not in chosen]
    key, _, text = (part.strip() for part in chosen[0].partition("="))
    value = _parse_value(text)  # (as train reads it: "gpt3-125m" quoted, none)
    if value is None or (key == "model.init_from" and str(value).lower() in ("none", "null")):
        # (model.init_from=none: train's way to unset a file's; the file's model, or the default)
        args.unset_init_from = key == "model.init_from"
        return
    model = str(value)
    if not model:
        raise ConfigError(f"{chosen[0]}: give the model (a preset, or a model directory)")
    if key == "model.init_from" and not Path(model).expanduser().exists():
        raise ConfigError(f"{chosen[0]}: no such file or directory; give a Hugging Face model directory or a fuyou "
                          f"run directory")
    if args.config is not None:  # the file's other model fields still apply, as in train (n_layer=2 over a preset)
        args.model_override = (key.partition(".")[2], model)
        return
    args.model = model


def _plan(args) -> int:
    import json
    import math
    from pathlib import Path

    from fuyou.errors import ConfigError
    from fuyou.planner.config import HardwareConfig
    from fuyou.planner.cost import Workload
    from fuyou.planner.hardware import resolve
    from fuyou.policy import read_act_policy
    from fuyou.planner.report import plot, text, to_json
    from fuyou.planner.search import (CPU_FIX, CPU_RESERVE, CPU_RESERVE_FRACTION, search, search_global_batch,
                                      search_split)
    from fuyou.units import format_size, parse_size, unitless_hint

    # plan's own flags for train settings, as train is given them (the "train as planned" line left them out, and
    # that run clipped and committed otherwise than the plan: a pass)
    as_train = [f"{key}={getattr(args, flag)}" for flag, key in (("grad_clip", "train.grad_clip"),
                                                                 ("commit_every", "offload.commit_every"),
                                                                 ("commit", "offload.commit"))
                if getattr(args, flag) is not None]
    if args.plot:  # checked before planning: a plot asked for and silently skipped is a surprise
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("--plot needs matplotlib: pip install 'fuyou[plot]'")
    _model_from_overrides(args)
    if args.config is None and args.model and (Path(args.model).expanduser() / "config.toml").is_file():
        # a run directory: the run as its config.toml trains it, as --config plans a file (its shape, batch and
        # state format were taken; its clipping, commits, policy and budget were plan's defaults: a pass)
        args.config, args.from_run = str(Path(args.model).expanduser() / "config.toml"), True
    from_file = _plan_config_file(args) if args.config else {}  # (first: it sets flags left out)
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
    args.model = args.model or "gpt3-13b"
    fields, other = _plan_model_fields(args.model, args.overrides, from_file)
    _plan_run_batch(args, other.pop("run_batch", {}))
    run_world = other.pop("run_world", None)
    if args.gpus is None and run_world:
        args.gpus = run_world
        print(f"note: {args.model} was trained by {run_world} processes: planned on {run_world} GPUs (--gpus sets "
              f"another number)", file=sys.stderr)
    args.gpus = 1 if args.gpus is None else args.gpus
    split = _global_batch(args)
    gpus = _plan_gpus(args, split)
    packed = _plan_data(other, args)
    given = other.setdefault("offload", {})
    _plan_offload_flags(args, given)
    if "grad_clip" in other.get("train", {}):  # as fuyou train spells it (the plan's what-ifs do): --grad-clip
        args.grad_clip = str(other["train"].pop("grad_clip"))
    args.grad_clip = args.grad_clip or "1.0"
    cfg = _model_config(fields)
    if args.seq > cfg.max_seq_len and cfg.family == "gpt" and getattr(args, "seq_default", False):
        print(f"note: planned with --seq {cfg.max_seq_len}, the model's positions (a GPT's learned position table; "
              f"--seq's default {args.seq} is beyond them)", file=sys.stderr)
        args.seq = cfg.max_seq_len
    if args.seq > cfg.max_seq_len:
        if cfg.family == "gpt":  # its learned position table grows with the length (fuyou train refuses it)
            if Path(args.model).expanduser().exists():  # a checkpoint: its learned positions are what they are
                raise ConfigError(f"--seq {args.seq} is beyond the checkpoint's {cfg.max_seq_len} learned positions "
                                  f"(a GPT's position table): fuyou train refuses a longer data.seq_len for it; plan "
                                  f"--seq {cfg.max_seq_len} or less")
            print(f"note: --seq {args.seq} is beyond the model's {cfg.max_seq_len} positions: planned with "
                  f"model.max_seq_len={args.seq} (give fuyou train the same, or a shorter data.seq_len)",
                  file=sys.stderr)
        cfg = cfg.model_copy(update={"max_seq_len": args.seq})
    from fuyou.hf.config_map import unexportable

    if unexportable(cfg):  # (it planned and trained, and export refused it at the end: a pass)
        print(f"note: {unexportable(cfg)}: this model trains, but `fuyou export` cannot write it for transformers",
              file=sys.stderr)
    nums = {k: getattr(args, k) for k in ("gpu_tflops", "ssd_read", "ssd_write", "pcie_bw", "cpu_adam", "ssd_tbw",
                                          "gpu_link")}
    units = {"gpu_tflops": "TFLOPS", "ssd_read": "GB/s", "ssd_write": "GB/s", "pcie_bw": "GB/s",
             "cpu_adam": "parameters/s", "ssd_tbw": "TB written", "gpu_link": "GB/s"}
    overrides, nums = nums, {}
    for k, v in overrides.items():
        try:
            if v is not None:
                nums[k] = float(v)
        except ValueError:
            raise ConfigError(f"--{k.replace('_', '-')} {v}: give a plain number, in {units[k]}") from None
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
    hw = resolve(hwc, getattr(args, "gpu_budget", False))  # (a budget was told as "the GPU has", "a GPU with": a pass)
    for flag in ("gpu_mem", "gpu_tflops", "pcie_bw", "gpu_link"):  # (a pass: taken, and nothing changed)
        if hw.device == "cpu" and getattr(args, flag, None) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} is a GPU's, and {args.profile} was measured on a CPU (its "
                              f"compute device is the CPU, whose memory is --cpu-mem): drop it, or plan with a GPU "
                              f"profile or --gpu")
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
        if gpus > 1:  # the machine's caps, each rank's share of them (as train's Dist.rank_config divides them)
            off = off.model_copy(update={k: getattr(off, k) // gpus for k in ("act_cpu_mem", "resident_mem")
                                         if getattr(off, k) is not None})
        if off.commit == "none" and "commit_every" in {**flags, **given}:
            raise ConfigError("--commit-every sets how often a crash-safe commit is made, and --commit none makes "
                              "none; give one")
        clip = None if args.grad_clip.lower() == "none" else float(args.grad_clip)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"invalid --commit-every, --grad-clip or offload override: {e}") from None
    precision = other.get("train", {}).get("precision", "auto")
    if precision not in _precisions():
        raise ConfigError(f"train.precision={precision}: one of {', '.join(_precisions())}")
    if precision == "auto":  # as train resolves it on the planned device
        precision = "bf16" if hw.computes_bf16() else "fp32"
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
        raise ConfigError("optim.master/optim.moments apply to full fine-tuning; LoRA keeps the adapters' state "
                          "in memory")
    w = Workload(cfg, args.batch or 16, args.seq, grad_accum=args.grad_accum or gpus, offload=off, grad_clip=clip,
                 csize=2 if precision == "bf16" else 4, fmt=fmt, lora=lora, ranks=gpus, cuda=hw.device == "cuda",
                 packed=packed, store=off.store_config(),  # (the store train builds: its bounce buffers)
                 **({"depths": (args.prefetch_depth,)} if args.prefetch_depth is not None else {}))
    if lora.enabled and lora.init_from:  # the adapter train starts from fits these settings (refused there, taken
        from fuyou.hf.peft import load_peft_adapter  # here for a plan of them: a new-user pass)

        load_peft_adapter(lora.init_from, w.stage_model.stages, cfg.family, lora)
    if w.sharded and gpus > len(w.numels):
        raise ConfigError(f"--gpus {gpus} for a model of {len(w.numels)} stages: each rank owns the optimizer state of "
                          f"whole stages, so use at most {len(w.numels)} GPUs")
    policy = None
    if args.act_policy is not None:  # (an empty one is refused as such, not taken as "search")
        policy = read_act_policy(args.act_policy, cfg.n_layer,
                                 **({"prefetch_depth": args.prefetch_depth} if args.prefetch_depth is not None
                                    else {}))
    if args.cpu_mem is None:  # the machine the profile measured, else the documented default
        measured = hw.cpu_mem if args.profile else None
        args.cpu_mem = str(measured) if measured else "256GiB"
        if measured:
            print(f"note: planning the {format_size(measured)} of CPU memory {args.profile} measured (--cpu-mem sets "
                  f"another budget)", file=sys.stderr)
    cpu_given = parse_size(args.cpu_mem)
    if hw.cpu_mem and cpu_given > hw.cpu_mem:  # (a pass: "fits" at 64 GiB on a profile of a 23.5 GiB machine)
        print(f"note: --cpu-mem {format_size(cpu_given)} is more than the {format_size(hw.cpu_mem)} of memory of the "
              f"machine the profile measured: a plan that needs it there would swap or be stopped; give at most what "
              f"that machine can spare", file=sys.stderr)
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
        asked = f"{format_size(cpu_given)}{unitless_hint(cpu_given, args.cpu_mem)}"
        raise ConfigError(f"--cpu-reserve {format_size(reserve)} (memory the plan leaves to the process itself) leaves "
                          f"nothing of --cpu-mem {asked}{each}{least}; or "
                          f"reserve less (--cpu-reserve 0 plans the whole budget)")
    if split is None:
        plan = search(w, hw, cpu, policy)
    elif split[0] == split[1]:
        plan = search_split(w, hw, cpu, split[0], policy)
    else:
        plan = search_global_batch(w, hw, cpu, *split, policy)
    plan.cpu_given = cpu_given
    plan.tokens_goal = tokens_goal
    # the settings given to plan that train must be given too to run this plan (its own choices, the policy and
    # the memory caps, are on the line already; the model's are the "..." of the line)
    mine = {"offload.cpu_mem", "offload.act_policy", "offload.mode", "offload.ssd_dirs"}
    plan.train_settings = as_train + [o.strip() for o in args.overrides
                                      if not o.strip().startswith("model.") and o.partition("=")[0].strip() not in mine]
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
    from fuyou.planner.probe import cpu_memory, probe
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

    if not args.ssd.strip():  # (an empty "$SSD": Path("") is the current directory; a traceback)
        raise ConfigError("--ssd is empty: give a directory on the SSD to measure")
    # the SSD probe holds --io-bytes in memory and writes it under --ssd: both checked before the compute probe
    # (a pass: --io-bytes 1TB ended in an ENOMEM traceback, after minutes of measuring)
    memory = cpu_memory()
    # (it holds about 3x --io-bytes in memory, two pinned buffers and the random source, and writes two tensors)
    if memory and 3 * io_bytes > memory // 2:
        raise ConfigError(f"--io-bytes {format_size(io_bytes)}: the SSD probe holds about 3x that in memory, more "
                          f"than half this machine's {format_size(memory)}; give less (the default, 256MiB, "
                          f"measures the drives)")
    if memory and 16 * args.adam_params > memory // 2:  # fp32 weights and moments, a bf16 gradient and copy out
        raise ConfigError(f"--adam-params {args.adam_params}: the AdamW probe holds 16 B a parameter "
                          f"({format_size(16 * args.adam_params)}), more than half this machine's "
                          f"{format_size(memory)}; give fewer (the default, {1 << 24}, measures the kernel)")
    if Path(args.ssd).is_dir():
        from fuyou.engine.config import no_storage

        if no_storage(args.ssd):  # (it was told to give less --io-bytes: a pass)
            raise ConfigError(f"--ssd {args.ssd} is on a file system with no storage (such as /proc or /sys); give "
                              f"a directory on the SSD to measure")

    out = Path(args.out).expanduser()
    if out.is_file() and not _is_profile(out):  # (a new-user pass overwrote a model's config.json)
        raise ConfigError(f"--out {args.out} exists and is not a hardware profile: give a new file name (a profile "
                          f"fuyou probe wrote is replaced)")
    if out.is_dir() or not out.parent.is_dir():  # checked before minutes of measuring, not after
        raise ConfigError(f"--out {args.out}: " + ("a directory; give a file name such as profile.json" if out.is_dir()
                                                   else f"its directory {out.parent} does not exist; create it first"))
    check_writable(out)
    fs = _filesystem(Path(args.ssd))
    if fs in ("tmpfs", "ramfs"):
        print(f"fuyou: note: --ssd {args.ssd} is on {fs}, which is memory: its figures are memory's, not an SSD's, "
              f"and what it holds takes this machine's memory; a plan from this profile counts that memory twice",
              file=sys.stderr)
    model = args.model
    if model is not None:  # a preset or a path, as fuyou plan --model takes
        fields, _ = _plan_model_fields(model, [])
        model = _model_config(fields)
    import signal

    from fuyou.planner.probe import exit_on_signal

    previous = signal.signal(signal.SIGTERM, exit_on_signal)  # (a probe stopped so left its store: a pass)
    try:
        prof, meas = probe(args.ssd, model=model, batch=args.batch, seq=args.seq, io_bytes=io_bytes,
                           precision=args.precision,
                           adam_params=args.adam_params, repeats=args.repeats)
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        save_profile(prof, args.out, meas)
    except OSError as e:  # (a full disk after minutes of measuring: a traceback, the figures lost)
        import json

        print(json.dumps({"profile": prof.model_dump(), "measurements": meas}, indent=2))
        raise ConfigError(f"writing --out {args.out} failed ({e.strerror or e}); the profile is printed above: save "
                          f"it to a file and give that to --profile") from e
    c = meas["compute"]
    chosen = " (--precision auto)" if args.precision == "auto" else ""
    if prof.compute_precision == "bf16" and prof.bf16_native is False:
        print(f"fuyou probe: warning: --precision bf16 on a {prof.device} without native bf16: it computes bf16 tens "
              f"of times slower than fp32, and train.precision=auto computes in fp32 there", file=sys.stderr)
    print(f"compute ({prof.device}, {c['block_shape']}, {prof.compute_precision}{chosen}): block forward "
          f"{prof.fwd_flops / 1e12:.3g} TFLOPS, "
          f"recompute+backward {prof.bwd_flops / 1e12:.3g}, matmuls {prof.matmul_flops / 1e12:.3g}; with LoRA "
          f"({c['lora']}) {prof.lora_fwd_flops / 1e12:.3g} and {prof.lora_bwd_flops / 1e12:.3g}; the head "
          f"{prof.head_flops / 1e12:.3g} ({prof.lora_head_flops / 1e12:.3g} frozen)")
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
    small = [f for f, v, d in (("--io-bytes", io_bytes, 64 << 20), ("--adam-params", args.adam_params, 1 << 22))
             if v < d]
    if small:  # (a pass: --io-bytes 1MiB --adam-params 65536 measured the I/O CPU 7.5x and AdamW 3.7x off)
        print(f"note: {' and '.join(small)} below the defaults: start-up costs weigh on so small a measurement, "
              f"and its figures can be several times off (the defaults, 256MiB and {1 << 24}, measure the drives "
              f"and the kernel)", file=sys.stderr)
    if args.repeats < 3:  # (a pass: a --repeats 1 profile was 30x off on a busy machine, without a word)
        each = "one timing" if args.repeats == 1 else "a median of two"
        print(f"note: --repeats {args.repeats}: each figure is {each}, which a busy machine can make far off; the "
              f"default 3 keeps the median of three", file=sys.stderr)
    return 0


def check_writable(out, flag: str = "--out") -> None:
    """``out``'s directory takes a new file, checked before the work that writes it (a pass: `probe --out /proc/..`
    after minutes of measuring, and `train --trace` after step 2, were tracebacks)."""
    import os

    from fuyou.errors import ConfigError

    probe = out.parent / f".{out.name}.{os.getpid()}.check"
    try:
        probe.write_bytes(b"{}")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {out}: cannot write there ({e.strerror or e}); give a file in a writable "
                          f"directory") from e


def _filesystem(path) -> str | None:
    """The file system type of the mount that holds ``path`` (``/proc/mounts``), or None."""
    from pathlib import Path

    try:
        real = str(path.resolve())
        best, kind = "", None
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
        return kind
    except OSError:
        return None


def _is_profile(path) -> bool:
    """Whether ``path`` holds a hardware profile (a JSON object with the fields ``fuyou probe`` writes)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    prof = data.get("profile") if isinstance(data, dict) else None  # (save_profile's layout)
    return isinstance(prof, dict) and {"fwd_flops", "ssd_write"} <= prof.keys()
