import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def broken_kernel_build(monkeypatch):
    """Every C++ library of fuyou.kernels fails to build (a compile error of several lines), in a fresh
    build state; the real state comes back after the test."""
    from fuyou.kernels import build

    def broken(what):
        raise RuntimeError(f"Error building extension 'fuyou_{what}'\nlong compiler output\n...")

    monkeypatch.setattr(build, "_build", broken)
    monkeypatch.setattr(build, "_STATE", {})
    monkeypatch.delenv("FUYOU_NO_EXT", raising=False)
    return build
