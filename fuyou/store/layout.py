"""Where a stored tensor lives: the record type, striping arithmetic and the manifest file.

One :class:`TensorRecord` per stored tensor. Its states:

* **allocated** -- the extent(s) are reserved (``posix_fallocate``) and every checksum is ``None``;
  reading returns whatever the disk holds (zeros on a fresh file) unchecked.
* **written** -- blocks written with ``verify_checksums`` carry a CRC32 of their logical bytes;
  blocks written without it (or through kvikio from GPU memory) go back to ``None`` (unchecked).

Striping (RAID-0 style): the tensor's bytes, padded to 4 KiB, are cut into ``stripe_unit`` pieces;
piece ``s`` goes to lane ``s % lanes``, at offset ``(s // lanes) * stripe_unit`` inside that lane's
extent. Each lane is one contiguous extent in one directory's data file. A tensor no larger than
``stripe_unit`` has one lane.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fuyou.store.aligned import round_up
from fuyou.store.config import ALIGNMENT as ALIGN

MANIFEST = "fuyou-store.json"
MARKER = "fuyou-store.id"
LOCK = "fuyou-store.lock"
FORMAT_VERSION = 1

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64",
                 "bool", "complex64", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
    if hasattr(torch, name)
}
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_DTYPES.values())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPES[name]


def data_file_name(index: int) -> str:
    return f"fuyou-store.{index}.dat"


@dataclass(frozen=True)
class Extent:
    """A contiguous byte range of one directory's data file (offset and length multiples of 4 KiB)."""

    dir_index: int
    offset: int
    length: int


@dataclass(frozen=True)
class TensorMeta:
    """What a caller needs to know about a stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    @property
    def numel(self) -> int:
        return self.nbytes // torch.empty((), dtype=self.dtype).element_size()


@dataclass
class TensorRecord:
    """The one record of a stored tensor: shape, dtype, location (striped extents) and checksums.

    ``checksums[i]`` is the CRC32 of logical bytes ``[i*checksum_block, (i+1)*checksum_block)``
    (clipped to ``nbytes``), or ``None`` when unchecked (see the module docstring for states).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    stripe_unit: int
    extents: tuple[Extent, ...]
    checksum_block: int
    checksums: list[int | None] = field(default_factory=list)
    tag: str | None = None  # the caller's label of what the tensor holds (the engine: "step N" when committed)

    @property
    def meta(self) -> TensorMeta:
        return TensorMeta(self.shape, self.dtype, self.nbytes)

    @property
    def padded(self) -> int:
        return round_up(max(self.nbytes, 1))

    def locate(self, byte_offset: int) -> tuple[Extent, int, int]:
        """(extent, file offset, bytes left in this stripe piece) of a logical byte offset."""
        su, lanes = self.stripe_unit, len(self.extents)
        s = byte_offset // su
        ext = self.extents[s % lanes]
        inner = (s // lanes) * su + byte_offset % su
        return ext, ext.offset + inner, su - byte_offset % su

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": dtype_name(self.dtype), "nbytes": self.nbytes,
                "stripe_unit": self.stripe_unit, "checksum_block": self.checksum_block,
                "extents": [[e.dir_index, e.offset, e.length] for e in self.extents],
                "checksums": self.checksums, **({"tag": self.tag} if self.tag is not None else {})}

    @classmethod
    def from_json(cls, key: str, d: dict[str, Any], ndirs: int | None = None) -> "TensorRecord":
        """The record of ``key``; with ``ndirs``, also checked for consistency (ValueError saying what
        is wrong: a manifest edited or damaged must not be used)."""
        rec = cls(key=key, shape=tuple(int(x) for x in d["shape"]), dtype=dtype_from_name(d["dtype"]),
                  nbytes=int(d["nbytes"]), stripe_unit=int(d["stripe_unit"]),
                  extents=tuple(Extent(int(a), int(b), int(c)) for a, b, c in d["extents"]),
                  checksum_block=int(d["checksum_block"]),
                  checksums=[None if c is None else int(c) for c in d["checksums"]], tag=d.get("tag"))
        if ndirs is not None:
            rec.check(ndirs)
        return rec

    def check(self, ndirs: int) -> None:
        """Raise ValueError when the record cannot describe a real tensor of this store."""
        item = torch.empty((), dtype=self.dtype).element_size()
        if any(s < 0 for s in self.shape) or self.nbytes != item * math.prod(self.shape):
            raise ValueError(f"shape {list(self.shape)} of {dtype_name(self.dtype)} is not {self.nbytes} bytes")
        if self.stripe_unit <= 0 or self.stripe_unit % ALIGN or self.checksum_block <= 0:
            raise ValueError("stripe unit or checksum block is not a positive multiple of 4 KiB")
        if not self.extents or any(not 0 <= e.dir_index < ndirs or e.offset < 0 or e.length <= 0 or e.offset % ALIGN
                                   for e in self.extents):
            raise ValueError(f"an extent lies outside the store's {ndirs} directories or is misaligned")
        if sum(e.length for e in self.extents) < self.padded:
            raise ValueError("its extents are shorter than the tensor")
        if len(self.checksums) != -(-self.nbytes // self.checksum_block) or any(
                c is not None and not 0 <= c < 2**32 for c in self.checksums):
            raise ValueError("its checksum list does not match its size")
        if self.tag is not None and not isinstance(self.tag, str):
            raise ValueError("its tag is not a string")


def plan_extents(padded: int, stripe_unit: int, next_offsets: list[int]) -> tuple[int, tuple[Extent, ...]]:
    """Place ``padded`` bytes: one extent in the least-used directory, or striped over all of them.

    Returns (stripe_unit used, extents). Does not change ``next_offsets``.
    """
    ndirs = len(next_offsets)
    order = sorted(range(ndirs), key=lambda i: (next_offsets[i], i))
    if padded <= stripe_unit or ndirs == 1:
        d = order[0]
        return max(padded, stripe_unit), (Extent(d, next_offsets[d], padded),)
    pieces = -(-padded // stripe_unit)
    lanes = min(ndirs, pieces)
    extents = []
    for lane in range(lanes):
        n_lane = len(range(lane, pieces, lanes))
        last_is_here = (pieces - 1) % lanes == lane
        length = n_lane * stripe_unit - ((pieces * stripe_unit - padded) if last_is_here else 0)
        d = order[lane]
        extents.append(Extent(d, next_offsets[d], length))
    return stripe_unit, tuple(extents)


def manifest_bytes(nbytes: int, n_tensors: int, checksum_block: int, stripe_unit: int) -> int:
    """An upper bound of the manifest's size for ``n_tensors`` tensors of ``nbytes`` in all: a record of about
    200 bytes each (key, shape, dtype, tag), an extent of 40 per stripe unit, a CRC-32 of up to 11 digits per
    checksum block (a 175B model's three copies of fp32 state: about 90 MB), twice over: it is rewritten
    beside itself (``write_json_atomic``). It lives in the first directory."""
    one = 256 * n_tensors + 40 * (-(-nbytes // stripe_unit) + n_tensors) + 12 * -(-nbytes // checksum_block)
    return 2 * one


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON durably: tmp file, fsync, rename over ``path``, fsync the directory."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")  # one name per writer
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written temporary left beside the state
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(d: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
