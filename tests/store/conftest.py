"""Fixtures of the store tests: small blocks so odd sizes cross every boundary quickly."""

from __future__ import annotations

import pytest
from store_testutil import SMALL

from fuyou.store import StoreConfig


@pytest.fixture
def cfg() -> StoreConfig:
    return StoreConfig(**SMALL)
