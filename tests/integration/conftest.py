"""Integration fixtures: engines wired to the session's real PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from helpers import make_engine
from importwaves.engine.app import Engine

_DEFAULT = object()


@pytest.fixture
def engines(dsn: str, tenant: str, redis_url: str) -> Iterator[Callable[..., Engine]]:
    """make(tenant=..., redis_url=..., **Engine kwargs) -> Engine, closed after the test."""
    made: list[Engine] = []

    def make(schema: str | None = None, url: Any = _DEFAULT, **kwargs: Any) -> Engine:
        engine = make_engine(dsn, schema or tenant, redis_url if url is _DEFAULT else url, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def engine(engines: Callable[..., Engine]) -> Engine:
    return engines()
