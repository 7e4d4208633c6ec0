"""queries.sql: the parser, and that the shipped file is well formed and complete."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from importwaves.db import queries as queries_module
from importwaves.db.queries import Q, all_queries, parse

PACKAGE = Path(queries_module.__file__).parent.parent


def test_parse_splits_on_headers_and_strips_semicolons() -> None:
    text = (
        "-- file comment\n\n"
        "-- name: first\n-- What it does.\nSELECT 1;\n\n"
        "-- name: second_q2\n-- Two lines.\nSELECT 2\nFROM t;\n"
    )
    out = parse(text)
    assert list(out) == ["first", "second_q2"]
    assert out["first"] == "-- What it does.\nSELECT 1"
    assert out["second_q2"].endswith("FROM t")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n", "duplicate query name 'a'"),
        ("-- name: a\n;\n-- name: b\nSELECT 1;\n", "query 'a' is empty"),
        ("-- name: a\n", "query 'a' is empty"),
    ],
)
def test_parse_rejects_bad_files(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(text)


def test_header_must_be_exact() -> None:
    # "-- name:" inside a line or with uppercase is not a header; the text stays in the body
    out = parse("-- name: a\nSELECT 1 -- name: b\n;\n-- Name: c\n")
    assert list(out) == ["a"]


def test_unknown_query_name() -> None:
    with pytest.raises(KeyError, match="no query named 'nope'"):
        Q("nope")


def test_shipped_queries_are_well_formed() -> None:
    queries = all_queries()
    assert len(queries) >= 40
    for name, stmt in queries.items():
        lines = stmt.splitlines()
        assert lines[0].startswith("-- "), f"{name}: no description line"
        body = "\n".join(lines[1:]).strip()
        assert body, name
        assert not body.rstrip().endswith(";"), name
        # values are parameters: only %(name)s placeholders (and %% for a literal percent)
        assert not re.search(r"%(?!\([a-z_]+\)s|%)", re.sub(r"%%", "", stmt)), name
        code = re.sub(r"--[^\n]*", "", re.sub(r"'(?:[^']|'')*'", "''", body))
        assert ";" not in code, f"{name}: more than one statement"


def test_every_query_the_code_names_exists() -> None:
    used: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        used |= set(re.findall(r'\bQ\("([a-z_0-9]+)"\)', path.read_text(encoding="utf-8")))
    # the worker picks its import query by name
    used |= {"import_customers", "import_transactions", "import_transaction_lines"}
    assert used, "no Q(...) call found"
    missing = sorted(used - set(all_queries()))
    assert not missing, missing


def test_completion_query_is_fenced_by_dispatch_seq() -> None:
    for name in ("batch_complete_notify", "batch_fail", "batch_claim", "batch_heartbeat"):
        assert "dispatch_seq = %(dispatch_seq)s" in Q(name), name
    assert "status IN ('dispatched', 'processing')" in Q("batch_complete_notify")
