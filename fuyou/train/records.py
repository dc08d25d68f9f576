"""What a run records of its data, and how a resume's data is checked against it: the data files'
fingerprint (``data_fingerprint``, ``record_data``), the vocabulary and the prepared data's settings, the
held-out split; ``load_training_data`` loads a run's tokens with those checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fuyou import distributed
from fuyou.config import FuyouConfig
from fuyou.data import load_data
from fuyou.errors import DataError
from fuyou.train.run import DATA_FILES, recorded_data
from fuyou.units import format_size


def data_fingerprint(cfg: FuyouConfig, like: dict | None = None) -> dict:
    """What a resume compares to tell whether the run's data changed: each data.path and data.eval_path
    entry's size and modification time (a directory's file count, total size and newest time; a moved
    file keeps its figures; prepared data: a digest of its meta.json and of samples of its files instead of
    the time, so that data prepared again the same compares equal: a pass was told its data changed, and
    its rows' order too), and with train.epochs the steps they made. ``like``: a record to match the form of
    (a run recorded before prepared data had a digest: its times)."""
    from fuyou.data.config import is_prepared
    from fuyou.data.dataset import PREPARED_FILES
    from fuyou.hf.peft import files_fingerprint

    def one(p: Path, then):
        if p.is_file():
            st = p.stat()
            return [st.st_size, st.st_mtime_ns]
        if p.is_dir():
            if is_prepared(p) and not (isinstance(then, list) and len(then) == 3 and isinstance(then[2], int)):
                # its own files only (a killed prepare's hidden leftovers, other files beside it: a review), by a
                # sampled fingerprint, which reads the small meta.json whole, and so its hash of all the tokens
                paths = [p / n for n in PREPARED_FILES if (p / n).is_file()]
                return [len(paths), sum(f.stat().st_size for f in paths),
                        "sha256:" + files_fingerprint(paths)[:32]]
            files = [f.stat() for f in sorted(p.rglob("*")) if f.is_file()]
            return [len(files), sum(f.st_size for f in files), max((f.st_mtime_ns for f in files), default=0)]
        return None
    paths = [] if cfg.data.source in ("synthetic", "builtin") else [*cfg.data.path, *cfg.data.eval_path]
    then = (like or {}).get("files") if isinstance(like, dict) else None
    then = then if isinstance(then, list) else []
    return {"files": [one(Path(p), then[i] if i < len(then) else None) for i, p in enumerate(paths)],
            "steps": cfg.train.steps if cfg.train.epochs is not None else None}


def data_files_change(cfg: FuyouConfig, then: list, now: list, split: str = "content",
                       then_paths: list | None = None) -> str:
    """``data_fingerprint``'s figures that changed, in words (the raw lists go to resumes.jsonl).
    ``then_paths``: the run's data.path and data.eval_path entries before the resume, named beside the
    new ones where they differ (the old figures stood under the new name)."""
    import datetime
    import itertools

    def words(f) -> str:  # (False: no such entry, the number of paths changed; None: the path is missing)
        if f is False or f is None:
            return "not given" if f is False else "missing"
        if isinstance(f[-1], str):  # prepared data's digest
            return f"{f[0]} files, {format_size(f[1])}, content {f[-1].removeprefix('sha256:')[:12]}"
        when = datetime.datetime.fromtimestamp(f[-1] / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        return (f"{format_size(f[0])}, modified {when}" if len(f) == 2 else
                f"{f[0]} files, {format_size(f[1])}, newest modified {when}")

    paths = [*cfg.data.path, *cfg.data.eval_path]
    if then_paths is not None:  # "old -> new" where the entry is another path now
        paths = [p if p is False or q is False or user_paths(q) == user_paths(p) else f"{q} -> {p}"
                 for p, q in itertools.zip_longest(paths, then_paths, fillvalue=False)]
    parts = [f"{p if p is not False else 'a path no longer given'}: {words(a)} -> {words(b)}"
             for p, a, b in itertools.zip_longest(paths, then, now, fillvalue=False) if a != b]
    held = ("" if cfg.data.eval_path or not cfg.data.val_fraction or cfg.data.source == "prepared" else
            "; of data.val_fraction's held-out share, " + (
                "fine-tuning examples keep their side (each is held out by its content)" if split == "content" else
                "fine-tuning examples are drawn again (this run started before fuyou held them out by content), "
                "possibly among the examples trained on") + ", and plain text's is the tail of the changed token "
            "stream: evaluation losses from before and after this resume are not comparable")
    return "the data changed since the run started (" + "; ".join(parts) + ")" + held


def record_data(run_dir: Path, cfg: FuyouConfig, fp: dict | None = None, split: str = "content",
                vocabulary: dict | None = None) -> None:
    """Write ``data_fingerprint`` (``fp`` when already taken) into a resumable run's directory (SSD
    offload, data from files), with how its fine-tuning examples are held out (``split``) and the data's
    vocabulary (``load_training_data``'s record), which a resume's data must share."""
    import json

    fp = fp or data_fingerprint(cfg)
    vocabulary = {k: v for k, v in (vocabulary or {}).items() if k != "chat_template"}  # (its own file)
    if cfg.offload.mode == "ssd" and (fp["files"] or vocabulary.get("vocabulary")):  # (builtin: its vocabulary)
        (run_dir / DATA_FILES).write_text(json.dumps({**fp, "split": split, **vocabulary}) + "\n")


def record_chat_template(run_dir: Path, vocabulary: dict | None) -> None:
    """The chat template of fuyou's fallback format (``fuyou.data.formats.fallback_chat_template``), where the
    run's conversations were rendered in it, kept in the run directory: an export writes it as the model's."""
    from fuyou.hf.source import RUN_CHAT_TEMPLATE

    template = (vocabulary or {}).get("chat_template")
    if isinstance(template, str):
        (run_dir / RUN_CHAT_TEMPLATE).write_text(template)


def run_vocabulary(run_dir: Path) -> dict:
    """The vocabulary a run being resumed recorded for its data (``record_data``): ``{"vocabulary":
    fingerprint, "tokenizer": name}``, or {} for a run from before the record (nothing to compare)."""
    rec = recorded_data(run_dir)
    if not isinstance(rec, dict) or not isinstance(rec.get("vocabulary"), str):
        return {}
    from fuyou.hf.source import tokenizer_dir

    copy = tokenizer_dir(run_dir)  # the copy of its tokenizer the run keeps, if any (for the advice)
    kept = copy is not None and copy.resolve().is_relative_to(Path(run_dir).resolve())
    return {"vocabulary": rec["vocabulary"], "tokenizer": str(rec.get("tokenizer")),
            **({"copy": str(copy.resolve())} if kept else {}),
            **({"prepared": rec["prepared"]} if isinstance(rec.get("prepared"), dict) else {})}


def prepared_settings(path) -> dict | None:
    """What `fuyou data prepare` fixed of the prepared data at ``path`` that a resume must keep, as its
    meta.json records it: the kind (examples or text), the held-out share or the held-out files given
    instead, and for fine-tuning examples whether prompts carry loss. A field an earlier fuyou did not
    record is left out (and so not compared); None: no meta.json to read."""
    import json

    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    out = {"kind": "examples" if meta.get("kind") == "examples" else "text"}  # (--format text made examples text)
    if isinstance(meta.get("eval_paths"), list):  # named in the messages; compared by their content
        out["eval_paths"] = meta["eval_paths"]
    if isinstance(meta.get("eval_content"), str):
        out["eval_content"] = meta["eval_content"]
    if meta.get("kind") == "examples":
        if "val_fraction" in info:
            out["val_fraction"] = info["val_fraction"]
        if "held_records" in info:
            out["eval_files"] = bool(info["held_records"])
        if "train_on_prompt" in info:
            out["train_on_prompt"] = bool(info["train_on_prompt"])
    elif "held_documents" in meta:
        out.update(val_fraction=meta.get("val_fraction"), eval_files=bool(meta["held_documents"]))
    elif meta.get("val_fraction") is not None:
        out["val_fraction"] = meta["val_fraction"]
    return out


def check_prepared_settings(run: dict, now: dict | None, cfg: FuyouConfig) -> None:
    """Prepared data prepared again with another held-out share, other held-out files or another loss on
    prompts under a run being resumed: refused as those settings are when given to the resume (a new-user
    pass: four of seven new held-out examples had been trained on, and the masks changed mid-run, while the
    resume said only "the data changed"). Only what both records hold is compared."""
    then = run.get("prepared")
    if not isinstance(then, dict) or now is None:
        return
    # (held-out files are compared by content: the same files elsewhere, a copied data directory, are the same)
    both = then.keys() & now.keys()
    changed = {k for k in both if then[k] != now[k] and not (k == "eval_paths" and "eval_content" in both)}
    if not changed:
        return

    def flags(d: dict) -> str:
        if d.get("eval_paths"):
            out = [f"--eval {p}" for p in d["eval_paths"]]
        elif d.get("eval_files"):
            out = ["--eval FILES"]
        elif d.get("val_fraction") is not None:
            out = [f"--val-fraction {d['val_fraction']:g}"]
        else:
            out = ["a held-out share it did not record"]
        if d.get("train_on_prompt"):
            out.append("--train-on-prompt")
        return " ".join(out)
    what = []
    if "kind" in changed:  # (--format text made the run's examples a token stream: a hostile pass)
        kinds = {"examples": "fine-tuning examples", "text": "plain text"}
        what.append(f"its {kinds[then['kind']]} became {kinds[now['kind']]}: which tokens carry loss and what is "
                    f"held out changed")
    if changed & {"val_fraction", "eval_files", "eval_paths", "eval_content"}:
        held = "examples" if "train_on_prompt" in now else "tokens"
        what.append(f"its held-out {held} could be ones the run trained on")
    if "train_on_prompt" in changed:
        what.append("the tokens that carry loss changed")
    restore = flags(then) if (then.get("eval_paths") or then.get("val_fraction") is not None) else "as it was"
    if "kind" in changed:
        restore += " --format auto" if then["kind"] == "examples" else " --format text"
    raise DataError(f"{cfg.data.path[0]} was prepared again with {flags(now)} where this run started on data "
                    f"prepared with {flags(then)}: {' and '.join(what)}. Prepare it as it was (`fuyou data prepare "
                    f"... --out {cfg.data.path[0]} {restore}`), or start a new run from this run's weights; "
                    f"nothing was changed")


def run_split(run_dir: Path) -> str:
    """How a run being resumed holds its fine-tuning examples out: as recorded, else as fuyou did before
    it recorded it (a seeded shuffle): its resume keeps the run's held-out set (examples held out by their
    content from then on would have put examples it trained on among them, in silence)."""
    rec = recorded_data(run_dir)
    return rec.get("split", "shuffle") if isinstance(rec, dict) else "shuffle"


def user_paths(paths) -> list[str]:
    """Paths as config.toml records them (``config.user_path``), so that the same ones compare equal."""
    from fuyou.config import user_path

    paths = [paths] if isinstance(paths, str) else paths
    return [str(user_path(p)) for p in paths]


def load_training_data(cfg: FuyouConfig, resume: bool = False, split: str = "content",
                       vocabulary: dict | None = None):
    """The run's tokens (None: synthetic), checked against the model's vocabulary; with ``train.epochs``,
    ``train.steps`` is set to the steps that make them (before the schedule is read). A resume does not
    refuse what its saved config says of prepared data (``fuyou.data.load_data``). ``vocabulary``: the
    run's record of its data's vocabulary, which the data must share (a resume: ``run_vocabulary``;
    its checkpoint, which ``check_tokenizer`` compares with, is not read again), else filled in with it."""
    from fuyou.hf.source import tokenizer_dir

    model_tok = tokenizer_dir(cfg.model.init_from) if cfg.model.init_from else None  # (for a held-out file of
    # prepared data whose tokenizer has gone: the error advised model.init_from, which was never tried; a pass)
    data = load_data(cfg.data, check_prepared=not resume, split=split,
                     model_tokenizer=str(model_tok) if model_tok is not None else None)
    if data is not None:
        check_tokenizer(cfg, data)
        if vocabulary is not None and data.fingerprint:
            check_vocabulary(vocabulary, data, cfg)
            vocabulary.pop("copy", None)
            vocabulary.update(vocabulary=data.fingerprint, tokenizer=data.tokenizer)
            template = (getattr(data, "info", None) or {}).get("chat_template")
            if isinstance(template, str):  # fuyou's fallback chat format, as a template (``record_chat_template``)
                vocabulary["chat_template"] = template
        if vocabulary is not None and cfg.data.source == "prepared":
            settings = prepared_settings(cfg.data.path[0])
            check_prepared_settings(vocabulary, settings, cfg)
            if settings is not None:  # (else the run's record stays, for a later resume to compare)
                vocabulary["prepared"] = settings
    if cfg.train.epochs is not None:  # the steps that make the epochs, from the data
        from fuyou.data.batches import make_batches

        t = cfg.train
        sampler, _ = make_batches(cfg, data, quiet=True)
        per_step = t.micro_batch_size * t.grad_accum
        object.__setattr__(t, "steps", sampler.steps_for(t.epochs, per_step))
        drawn = t.steps * per_step / sampler.per_epoch()
        if drawn > 1.25 * t.epochs and distributed.current().is_main:  # a step larger than the data asked for
            print(f"note: train.epochs={t.epochs} of {sampler.per_epoch():.0f} sequences at {per_step} a step rounds "
                  f"up to {t.steps} step(s), which draw {drawn:.2f} epochs"
                  f"{' (sequences repeat)' if drawn > 1 else ''}; lower train.micro_batch_size or train.grad_accum "
                  f"for closer to {t.epochs}", file=sys.stderr)
    return data


def check_tokenizer(cfg: FuyouConfig, data) -> None:
    """Data tokenized with another vocabulary than the model's trains silently into nonsense: when the
    model starts from a checkpoint with a tokenizer, the data must have been made with that tokenizer
    (the same vocabulary, compared by fingerprint: ``fuyou.data.tokenizer``)."""
    if not cfg.model.init_from:
        return
    from fuyou.hf.source import tokenizer_dir

    tok_dir = tokenizer_dir(cfg.model.init_from)
    if tok_dir is None or data.tokenizer == f"hf:{tok_dir}":
        return
    if data.tokenizer == "byte":
        how = (f"prepare the data again with it (`fuyou data prepare ... --tokenizer {tok_dir}`)"
               if cfg.data.source == "prepared" else
               f"leave data.tokenizer at 'auto' (the model's tokenizer), or prepare the data with it (`fuyou data "
               f"prepare ... --tokenizer {tok_dir}`)")
        raise DataError(f"the data was tokenized byte by byte, but model.init_from={cfg.model.init_from} was trained "
                        f"with the tokenizer in {tok_dir}; {how}")
    from fuyou.data.tokenizer import HFTokenizer

    ours = HFTokenizer(tok_dir)
    want = ours.fingerprint
    if data.fingerprint != want:
        raise DataError(f"the data was tokenized with {data.tokenizer} (vocabulary {data.fingerprint or 'unknown'}), "
                        f"but model.init_from={cfg.model.init_from} uses the tokenizer in {tok_dir} (vocabulary "
                        f"{want}); " + (f"prepare the data again with --tokenizer {tok_dir}" if cfg.data.source ==
                                        "prepared" else "leave data.tokenizer at 'auto' (the model's tokenizer)"))
    theirs = Path(data.tokenizer.removeprefix("hf:"))  # the same vocabulary: another chat template is said (a pass)
    if data.tokenizer.startswith("hf:") and theirs.is_dir() and distributed.current().is_main:
        other = HFTokenizer(theirs)
        if (ours.chat_template, ours.eos_id) != (other.chat_template, other.eos_id):
            what = " and ".join(w for w, differ in (("chat template", ours.chat_template != other.chat_template),
                                                   ("EOS token", ours.eos_id != other.eos_id)) if differ)
            verb = "differ" if " and " in what else "differs"
            print(f"fuyou: note: the data was tokenized with {theirs}, whose {what} {verb} from the tokenizer of "
                  f"model.init_from ({tok_dir}): the model learns {theirs}'s, and `fuyou export` carries its files",
                  file=sys.stderr)


def check_vocabulary(run: dict, data, cfg: FuyouConfig) -> None:
    """A resume's data must have the vocabulary the run trained on (``run``: ``run_vocabulary``): data
    prepared again with another tokenizer at the same path, or another data.tokenizer, trained the model on
    token ids that mean other text, and its export shipped the first tokenizer with it (a new-user pass;
    a resume reads no checkpoint, so ``check_tokenizer`` had nothing to compare with)."""
    if not run.get("vocabulary") or run["vocabulary"] == data.fingerprint:
        return
    if data.tokenizer == run.get("tokenizer"):  # the same place, another vocabulary: nothing to name but that
        raise DataError(f"the tokenizer {data.tokenizer.removeprefix('hf:')} has another vocabulary now "
                        f"({data.fingerprint}) than when this run started ({run['vocabulary']}): replaced or edited "
                        f"since? Give the run the tokenizer it trained with (data.tokenizer="
                        f"{run.get('copy', 'DIR')}{': the copy the run keeps' if 'copy' in run else ''}), or start a "
                        f"new run from its weights; nothing was changed")
    how = (f"prepare the data again with the run's tokenizer (`fuyou data prepare ... --tokenizer "
           f"{run['tokenizer'].removeprefix('hf:')}`)" if cfg.data.source == "prepared" else
           f"resume with the run's own data.tokenizer ({run['tokenizer'].removeprefix('hf:')})")
    raise DataError(f"the data was tokenized with {data.tokenizer} (vocabulary {data.fingerprint}), but this run "
                    f"trained on data tokenized with {run['tokenizer']} (vocabulary {run['vocabulary']}): its token "
                    f"ids would mean other text to the model. {how[0].upper() + how[1:]}, or start a new run from its "
                    f"weights; nothing was changed")

