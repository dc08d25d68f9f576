"""Fixtures of the store tests: small blocks so odd sizes cross every boundary quickly.

``cfg`` runs every test that takes it once per I/O backend (the native C++ one and the Python-thread
fallback): both must give the same bytes, checksums and typed errors.
"""

from __future__ import annotations

import pytest
from store_testutil import SMALL

from fuyou.store import StoreConfig
from fuyou.store.native import native_available


@pytest.fixture(params=["native", "threads"])
def cfg(request) -> StoreConfig:
    if request.param == "native" and not native_available():
        pytest.skip("the native store I/O library could not be built here")
    return StoreConfig(**SMALL, backend=request.param)
