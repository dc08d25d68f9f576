"""``fuyou launch``: torchrun, with the ranks' exit status (fuyou/errors.py) as its own.

torchrun exits 1 whatever its workers exited with (a refused config's 2, a damaged state's 5, a failure a
retry mends, 4): a scheduler that launches data-parallel training through it cannot tell a retry from a
dead end. ``fuyou launch [TORCHRUN OPTIONS] train ARGS`` starts the same processes through the same
launcher (``torch.distributed.run``, in this process, with torchrun's own options and defaults) and exits
with what its ranks say:

- 0 when every rank finished;
- else the status of the ranks that failed, one that says a retry cannot help first: a bug's 1, a
  mistake's 2, a divergence's 3, a damaged state's 5 (of several, the first seen to fail's), then
  128 + a signal's number (a rank killed outright), 4 (a rank that failed while running, or stopped by
  another's failure), and last the SIGTERM the launcher ends the other ranks with once one has failed;
- 128 + N when signal N stopped the launcher (Ctrl-C: every rank commits its step and stops, as under
  torchrun).

The ranks' advice names the command that resumes the run as it was launched (``fuyou launch
--nproc_per_node=N train --resume RUN``: ``LAUNCHER_ENV``).
"""

from __future__ import annotations

import os
import signal
import sys

from fuyou.errors import ConfigError, FuyouError

#: set in the ranks' environment by ``fuyou launch``: their resume advice names it (fuyou.distributed)
LAUNCHER_ENV = "FUYOU_LAUNCHER"

#: the ranks' statuses that a retry cannot mend (fuyou/errors.py; 1: a traceback, a bug)
FINAL = (1, 2, 3, 5)

USAGE = ("fuyou launch [TORCHRUN OPTIONS] train [TRAIN ARGUMENTS], e.g. fuyou launch --nproc_per_node=2 train "
         "--offload ssd --ssd /nvme0 --ssd /nvme1 --cpu-mem 64GiB train.grad_accum=8")


def _parser():
    """torchrun's parser, under this command's name and usage (its errors said "usage: fuyou ...
    training_script", a script this command refuses: a pass)."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog, parser.usage = "fuyou launch", USAGE.split(", e.g.")[0]
    return parser


def _command_start(argv: list[str], parser) -> int | None:
    """Where the fuyou command starts in ``argv``: its first ``train`` that is not an option's value
    (``--role train``: a pass); None: no command."""
    takes_value = {o for a in parser._actions if a.nargs != 0 for o in a.option_strings}
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "train":
            return i
        else:
            skip = a in takes_value
    return None


def split(argv: list[str], parser=None) -> tuple[list[str], list[str]]:
    """torchrun's options and the fuyou command (``_command_start``)."""
    i = _command_start(argv, parser or _parser())
    if i is None:
        raise ConfigError(f"fuyou launch runs `fuyou train` on several processes: {USAGE} (the other commands run "
                          f"once, without it)")
    return argv[:i], argv[i:]


def wants_help(argv: list[str]) -> bool:
    """Whether torchrun's options in ``argv`` (all of it, without a command) ask for help: this command's."""
    i = _command_start(argv, _parser())
    return bool({"-h", "--help"} & set(argv[:i]))


def command(nproc: int) -> str:
    """The command that trains on ``nproc`` processes of a machine (advice: the resume, the plan's line)."""
    return f"fuyou launch --nproc_per_node={nproc} train"


def launched() -> bool:
    """Whether this process is a rank ``fuyou launch`` started (its advice then names it, not torchrun)."""
    return os.environ.get(LAUNCHER_ENV) == "fuyou launch"


def torchrun_args(argv: list[str]):
    """torchrun's parsed arguments for ``argv`` (``split``), its program fuyou's train: an option that names
    another program (however abbreviated, or set in torchrun's environment form), or a program given, is
    refused."""
    parser = _parser()
    opts, given = split(argv, parser)
    args = parser.parse_args([*opts, "-m", "fuyou.cli", *given])
    named = [a for a in opts if a.split("=")[0] in ("-m", "--module")]
    if args.no_python or args.run_path or named:
        given = named or [a for a in opts if a.startswith("--")
                          and any(o.startswith(a.split("=")[0]) for o in ("--no-python", "--no_python", "--run-path",
                                                                          "--run_path"))]
        raise ConfigError(f"fuyou launch names the program itself (fuyou's train); drop "
                          f"{' '.join(given) or 'PET_NO_PYTHON / PET_RUN_PATH from the environment'}: {USAGE}")
    if args.training_script != "fuyou.cli" or list(args.training_script_args) != given:
        raise ConfigError(f"fuyou launch names the program itself (fuyou's train), but {args.training_script} "
                          f"was given as one: {USAGE}")
    _check_counts(args)
    return args


def _check_counts(args) -> None:
    """Refuse counts torchrun takes only to fail on (an AssertionError's traceback: --nproc_per_node=0, --nnodes=2:1,
    --max_restarts=-1) or to wait on for ever (--node_rank=5 of --nnodes=2: no rendezvous completes). Words
    torchrun reads itself (--nproc_per_node=gpu, auto) are its own to check."""
    def count(name: str, value: str) -> int | None:
        try:
            n = int(value)
        except (TypeError, ValueError):
            return None
        if n < 1:
            raise ConfigError(f"{name}={value}: it counts, so it is at least 1: {USAGE}")
        return n

    count("--nproc_per_node", args.nproc_per_node)
    low, _, high = str(args.nnodes).partition(":")
    least, most = count("--nnodes", low), count("--nnodes", high or low)
    if least is not None and most is not None and least > most:
        raise ConfigError(f"--nnodes={args.nnodes}: a range MIN:MAX with MIN at most MAX: {USAGE}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max_restarts={args.max_restarts}: it is 0 or more: {USAGE}")
    if args.node_rank < 0 or (most is not None and args.node_rank >= most):
        raise ConfigError(f"--node_rank={args.node_rank}: this machine's place among the --nnodes={args.nnodes} "
                          f"machines, 0 to {'N - 1' if most is None else most - 1}: {USAGE}")


def exit_status(failures: dict[int, object]) -> tuple[int, int]:
    """(rank, status) of a failed launch from torchrun's ``ProcessFailure`` per global rank (``exitcode``:
    the status, or minus the signal that killed it; ``timestamp``: when it was seen to fail): the module
    docstring's order. Of the statuses a retry may mend, a rank killed outright (SIGKILL: the out-of-memory
    killer, a user) comes first, before the others' 4 (another rank stopped), and one killed by SIGTERM last:
    the launcher sends it to the ranks still running once one has failed, and they are seen to fail at the
    same moment."""
    def status(f) -> int:
        return 128 - f.exitcode if f.exitcode < 0 else f.exitcode

    def order(r):
        f = failures[r]
        kind = (0 if status(f) in FINAL else 3 if f.exitcode == -signal.SIGTERM else 1 if f.exitcode < 0 else 2)
        return kind, f.timestamp, r

    rank = min(failures, key=order)
    return rank, status(failures[rank])


def launch(argv: list[str]) -> int:
    from torch.distributed.run import run

    args = torchrun_args(argv)
    # torchrun's launcher sets this process's environment (OMP_NUM_THREADS=1, its signals) and signal handlers
    # for its workers; they are put back once it is done, for a caller in the same process (a test run in
    # process after one left a later training on one thread: its weights then differed in the last bits)
    environ, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM,
                                                                             signal.SIGHUP, signal.SIGQUIT)}
    os.environ[LAUNCHER_ENV] = "fuyou launch"  # (the ranks inherit it: their resume advice names it)
    try:
        return _run(run, args)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for s, h in handlers.items():
            if h is not None:
                signal.signal(s, h)


def _run(run, args) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    try:
        run(args)
    except ValueError as e:  # torchrun's reading of its options (--nproc_per_node=abc: a traceback, 1: a pass)
        raise ConfigError(f"a torchrun option of fuyou launch: {e}: {USAGE}") from None
    except (DistError, RendezvousError) as e:  # the launcher could not meet the others: a retry may
        said = (str(e.args[0]) if e.args else repr(e)).strip().splitlines() or [""]
        raise FuyouError(f"fuyou launch could not start or meet the other machines' launchers "
                         f"({type(e).__name__}: {said[0]}): a port taken, a machine not started or not reachable; "
                         f"once mended, the same command starts again") from None
    except ChildFailedError as e:
        rank, status = exit_status(e.failures)
        codes = ", ".join(f"rank {r}: {_said(f.exitcode)}" for r, f in sorted(e.failures.items()))
        print(f"fuyou launch: the ranks failed ({codes}); exit status {status}, rank {rank}'s "
              f"(fuyou/errors.py says what each means)", file=sys.stderr)
        return status
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def _said(code: int) -> str:
    if code >= 0:
        return f"status {code}"
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
