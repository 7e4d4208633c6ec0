"""Load `queries.sql` once and hand out each statement by name."""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from typing import LiteralString, cast

_HEADER = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, LiteralString]:
    """Split a queries file into {name: sql}; the description line stays as a comment."""
    parts = _HEADER.split(text)
    out: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in out:
            raise ValueError(f"queries.sql: duplicate query name {name!r}")
        stmt = body.strip().rstrip(";").strip()
        if not stmt:
            raise ValueError(f"queries.sql: query {name!r} is empty")
        out[name] = cast(LiteralString, stmt)
    return out


@cache
def all_queries() -> dict[str, LiteralString]:
    return parse(files("importwaves.db").joinpath("queries.sql").read_text(encoding="utf-8"))


def Q(name: str) -> LiteralString:
    """The statement called `name` in queries.sql."""
    try:
        return all_queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in queries.sql") from None
