"""SSD <-> GPU through kvikio (run on a CUDA machine: pytest -m gpu tests/store)."""

from __future__ import annotations

import pytest
import torch

from fuyou.store import TensorStore
from fuyou.store.kvikio_backend import kvikio_available


@pytest.mark.gpu
@pytest.mark.skipif(not kvikio_available(), reason="needs a CUDA GPU and kvikio")
def test_gpu_round_trip_striped(tmp_path, cfg):
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    src = torch.randn(1_000_003, device="cuda").bfloat16()
    with TensorStore.create(dirs, cfg) as store:
        store.allocate("w", src.shape, src.dtype)
        store.write_from("w", src).result()
        out = torch.empty_like(src)
        store.read_into("w", out).result()
        torch.cuda.synchronize()
        assert torch.equal(out, src)
        host = torch.empty(src.shape, dtype=src.dtype)       # GPU-written data read through the CPU path
        store.read_into("w", host).result()
        assert torch.equal(host, src.cpu())
        part = torch.empty(8192 * 3, dtype=src.dtype, device="cuda")
        store.read_into("w", part, start=8192).result()
        assert torch.equal(part, src[8192:8192 * 4])
