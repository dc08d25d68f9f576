"""Reading and validating a store's manifest and directory markers; the free-space preflight."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fuyou.store import layout as L
from fuyou.store.errors import StoreCorruptError, StoreNotFoundError, StoreSpaceError, StoreUsageError

__all__ = ["preflight", "read_manifest"]


def preflight(need: dict[Path, int]) -> None:
    """Raise :class:`StoreSpaceError` when any directory lacks the bytes it must receive. A file system that
    reports no capacity at all (ramfs, some FUSE mounts: total 0) is not judged: its 0 bytes free meant
    nothing, and refused every state there."""
    usage = {d: shutil.disk_usage(d) for d in need}
    need = {d: n for d, n in need.items() if usage[d].total > 0}
    have = {d: usage[d].free for d in need}
    # directories on one file system share its free space
    by_dev: dict[int, int] = {}
    for d, n in need.items():
        by_dev[os.stat(d).st_dev] = by_dev.get(os.stat(d).st_dev, 0) + n
    if any(by_dev[os.stat(d).st_dev] > have[d] for d in need):
        raise StoreSpaceError({str(d): (n, have[d]) for d, n in need.items()})


def _well_formed(m: dict) -> bool:
    """The manifest's own fields have the types and ranges the store relies on (records are checked
    one by one when the store is built)."""
    ints = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    return (isinstance(m.get("uuid"), str) and ints(m.get("checksum_block")) and m["checksum_block"] > 0
            and isinstance(m.get("tensors"), dict) and isinstance(m.get("dirs"), list)
            and all(ints(x) for x in m["next_offsets"]) and ints(m.get("generation", 0)))


_GONE = ("Is a drive not mounted, or was the directory moved or deleted? Mount it, or resume (or export) with --ssd "
         "giving where the state's directories are now, in the run's order; else start a new run")


def _holds_anything(d: Path) -> bool:
    try:
        return any(d.iterdir())
    except OSError:  # (unreadable: it is there, and the marker's own error says why)
        return True


def read_manifest(paths: list[Path]) -> dict:
    mpath = paths[0] / L.MANIFEST
    if not mpath.exists():
        for i, d in enumerate(paths):
            try:
                marker = json.loads((d / L.MARKER).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(marker, dict) and marker.get("index") == i == 0:  # in its place, the manifest gone
                raise StoreCorruptError(None, str(mpath), f"the store's manifest is missing (deleted?) from {d}, "
                                        f"which holds the store's other files")
            if isinstance(marker, dict) and marker.get("index") == i:  # the others in place, the first not there
                raise StoreNotFoundError(f"{paths[0]} holds none of the training state's files while {d} is "
                                         f"directory {i} of it: the first directory is not there. {_GONE}")
            raise StoreUsageError(f"{d} is directory {marker.get('index')} of a store but was listed at position "
                                  f"{i}; list the store's directories in their original order (the first one "
                                  f"holds {L.MANIFEST})")
        raise StoreNotFoundError(f"no training state in {paths[0]} (missing {L.MANIFEST}): it was never "
                                 f"committed, it was deleted (a completed run removes its state), or it was moved "
                                 f"(resume with --ssd giving where its directories are now, in the run's order: "
                                 f"with torchrun each rank takes its share of them by position); else start a new run")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        ok = manifest.get("format") == L.FORMAT_VERSION and len(manifest["next_offsets"]) == len(manifest["dirs"])
        ok = ok and _well_formed(manifest)
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise StoreCorruptError(None, str(mpath), f"manifest unreadable ({exc})") from exc
    if not ok:
        raise StoreCorruptError(None, str(mpath), f"manifest format {manifest.get('format')!r} is not "
                                f"{L.FORMAT_VERSION} or its directory list is inconsistent")
    gone = ([str(d) for d in manifest["dirs"] if not (isinstance(d, str) and Path(d).is_dir())]
            if len(paths) < len(manifest["dirs"]) else [])  # (a caller that kept the directories it found)
    if gone:
        raise StoreNotFoundError(f"the training state's directories are {manifest['dirs']}; {', '.join(gone)} "
                                 f"{'is' if len(gone) == 1 else 'are'} not there. {_GONE}")
    if len(manifest["dirs"]) != len(paths):
        raise StoreUsageError(f"the store was created over {len(manifest['dirs'])} directories "
                              f"{manifest['dirs']}; {len(paths)} were given. List them all, in order.")
    for i, d in enumerate(paths):
        try:
            marker = json.loads((d / L.MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            if not d.is_dir() or not _holds_anything(d):
                raise StoreNotFoundError(f"{d} holds none of the training state's files: directory {i} of "
                                         f"{manifest['dirs']} is not there. {_GONE}") from exc
            raise StoreUsageError(f"{d} has no readable {L.MARKER}: it is not part of this store ({exc})") from exc
        if marker.get("uuid") != manifest["uuid"] or marker.get("index") != i:
            raise StoreUsageError(f"{d} belongs to another store or to position {marker.get('index')} of this "
                                  f"one; list the store's directories in their original order: {manifest['dirs']}")
    return manifest
