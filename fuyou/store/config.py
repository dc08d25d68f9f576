"""Configuration of the SSD tier (:class:`StoreConfig`).

The defaults of ``block_size`` and ``queue_depth`` were measured on the development machine (2 vCPU,
virtio NVMe-backed ext4, Linux 6.18) with ``bench/io_bench.py``; see ``fuyou/store/io.py`` for the
figures and ``bench/RESULTS.md`` (issue 3) for the command. Re-measured against DeepSpeed's ``aio_handle``
at 4 GiB (``bench/RESULTS.md``, issue 3): 2 or 4 MiB syscalls with 2-4 threads cost less CPU but were
no faster, 16 threads were slower, so 1 MiB x 8 stays; the native backend (C++ threads, ``native.py``)
was re-measured at the same setting. ``block_size`` and ``checksum_block`` are
independent: a unit of work is ``max`` of the two, checksummed per ``checksum_block``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fuyou.units import format_size, parse_size

ALIGNMENT = 4096
"""O_DIRECT alignment of file offsets, transfer sizes and buffer addresses (bytes)."""

KiB, MiB = 1024, 1024 * 1024


class StoreConfig(BaseModel):
    """How the tensor store lays out and moves bytes. Sizes accept ints or strings such as ``"1MiB"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(
        default=1 * MiB, ge=ALIGNMENT, le=256 * MiB,
        description="bytes per read/write syscall (a multiple of 4 KiB); larger requests are split into "
                    "blocks issued in parallel. Measured default: 1 MiB.")
    queue_depth: int = Field(
        default=8, ge=1, le=256,
        description="I/O requests in flight at once (= I/O worker threads of the 'threads' backend, each "
                    "with one blocking preadv/pwritev outstanding). Measured default: 8.")
    backend: Literal["auto", "native", "threads"] = Field(
        default="auto",
        description="I/O backend. 'native': C++ threads run whole units (CRC + pread/pwrite) without the "
                    "GIL (fuyou/store/native.py); 'threads': Python worker threads issuing preadv/pwritev "
                    "(fuyou/store/io.py); 'auto': native where its library builds, else threads.")
    stripe_unit: int = Field(
        default=16 * MiB, ge=ALIGNMENT,
        description="tensors larger than this many bytes are striped round-robin across all directories "
                    "in units of this size (a multiple of checksum_block).")
    checksum_block: int = Field(
        default=1 * MiB, ge=ALIGNMENT, le=256 * MiB,
        description="bytes covered by one CRC32 (a multiple of 4 KiB); fixed when the store is created "
                    "and recorded in the manifest. Chunked reads/writes must start and end on multiples "
                    "of it (or at the tensor's end).")
    verify_checksums: bool = Field(
        default=True,
        description="compute a CRC-32 per checksum block on write and verify it on read (about 22 GB/s "
                    "per I/O thread with the isal package installed, 4 GB/s with zlib's; see "
                    "fuyou/store/checksum.py); when false, written blocks are recorded as unchecked.")
    direct_io: bool = Field(
        default=True,
        description="open data files with O_DIRECT so the page cache neither doubles memory use nor "
                    "inflates speed; falls back to buffered I/O with a warning where unsupported.")
    preallocate: bool = Field(
        default=True,
        description="reserve each tensor's extent with posix_fallocate at allocate time, so a full disk "
                    "is found then and not in the middle of training.")
    use_kvikio: bool = Field(
        default=True,
        description="move CUDA tensors SSD<->GPU through kvikio (GPUDirect Storage or its compatibility "
                    "mode) when kvikio is installed; otherwise CUDA tensors are rejected.")

    @field_validator("block_size", "stripe_unit", "checksum_block", mode="before")
    @classmethod
    def _parse_size(cls, v: object) -> int:
        return parse_size(v)  # type: ignore[arg-type]

    @field_validator("block_size", "stripe_unit", "checksum_block")
    @classmethod
    def _aligned(cls, v: int) -> int:
        if v % ALIGNMENT:
            raise ValueError(f"{v} bytes is not a multiple of 4 KiB (O_DIRECT alignment); use for example "
                             f"{format_size((v // ALIGNMENT + 1) * ALIGNMENT)}")
        return v

    @model_validator(mode="after")
    def _stripe_holds_checksum_blocks(self) -> "StoreConfig":
        if self.stripe_unit % self.checksum_block:
            raise ValueError(
                f"stripe_unit ({format_size(self.stripe_unit)}) must be a multiple of checksum_block "
                f"({format_size(self.checksum_block)}) so no checksum block spans two drives")
        return self
