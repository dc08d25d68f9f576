"""The store's CRC-32: every implementation equals zlib's, and a store naming another algorithm is refused."""

import json
import subprocess
import sys
import zlib

import pytest
import torch

from fuyou.store import StoreUsageError, TensorStore
from fuyou.store.checksum import ALGORITHM, IMPLEMENTATION, crc32


def test_crc_equals_zlib():
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8).numpy().tobytes()
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[5:70000]) == zlib.crc32(data[5:70000])
    assert IMPLEMENTATION in ("isal", "zlib-ng", "zlib")


def test_store_written_with_fast_crc_reads_with_zlib(tmp_path):
    with TensorStore.create([tmp_path]) as s:
        s.allocate("x", (1 << 20,), torch.float32)
        s.write_from("x", torch.arange(1 << 20, dtype=torch.float32)).result()
    code = (f"import torch; from fuyou.store import TensorStore; s = TensorStore.open([{str(tmp_path)!r}]); "
            "t = torch.empty(1 << 20); s.read_into('x', t).result(); "
            "assert torch.equal(t, torch.arange(1 << 20, dtype=torch.float32)); s.close()")
    env = {"FUYOU_STORE_CRC": "zlib", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr


def test_foreign_checksum_algorithm_is_refused(tmp_path):
    with TensorStore.create([tmp_path]) as s:
        s.allocate("x", (1024,), torch.float32)
    manifest = tmp_path / "fuyou-store.json"
    m = json.loads(manifest.read_text())
    assert m["checksum"] == ALGORITHM
    m["checksum"] = "crc32c"
    manifest.write_text(json.dumps(m))
    with pytest.raises(StoreUsageError, match="crc32c"):
        TensorStore.open([tmp_path])


CROSS = (
    "import sys, torch; from fuyou.store import StoreConfig, TensorStore; from fuyou.store.native import crc_function\n"
    "d, mode, backend = sys.argv[1:4]\n"
    "cfg = StoreConfig(block_size='16KiB', checksum_block='16KiB', stripe_unit='64KiB', backend=backend)\n"
    "x = (torch.arange(300_001, dtype=torch.int64) * 2654435761 % 251).to(torch.uint8)\n"
    "if mode == 'write':\n"
    "    s = TensorStore.create([d], cfg); s.allocate('x', x.shape, x.dtype); s.write_from('x', x).result()\n"
    "else:\n"
    "    s = TensorStore.open([d], cfg); t = torch.empty_like(x); s.read_into('x', t).result()\n"
    "    assert torch.equal(t, x)\n"
    "s.close(); print(s.backend_name, crc_function()[2] if backend == 'native' else '-')\n")


@pytest.mark.parametrize("writer,reader,crc", [("native", "threads", "auto"), ("threads", "native", "auto"),
                                                ("native", "threads", "zlib"), ("threads", "native", "zlib")])
def test_backends_and_crc_implementations_agree(tmp_path, writer, reader, crc):
    """A store written by one backend (ISA-L's or libz's C CRC-32) verifies with the other (Python's)."""
    from fuyou.store.native import native_available
    if not native_available():
        pytest.skip("the native store I/O library could not be built here")
    env = {"PATH": "/usr/bin:/bin", "FUYOU_STORE_CRC": crc}
    for mode, backend in (("write", writer), ("read", reader)):
        out = subprocess.run([sys.executable, "-c", CROSS, str(tmp_path), mode, backend], capture_output=True,
                             text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        if backend == "native":
            assert out.stdout.split() == ["native", "zlib" if crc == "zlib" else "isal"]
