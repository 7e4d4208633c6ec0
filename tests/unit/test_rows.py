"""engine/rows.py: the pure decisions behind data-level completion (planning verdict, completion
problems, the rows block)."""

from __future__ import annotations

import pytest

from importwaves.engine.model import DERIVED, MAIN, WaveState
from importwaves.engine.rows import (
    Code,
    RowCounts,
    TypeRows,
    TypeStaging,
    completion_problems,
    planning_verdict,
    rows_by_name,
    staging_report,
)

CUSTOMER = TypeStaging(-2, "Customer", 100)
ORDER = TypeStaging(-30, "SalesOrder", 500)
LINES = TypeStaging(-13, "TransactionLine", 2500)


def test_rows_the_plan_covers_are_planned() -> None:
    v = planning_verdict("acme", "imp-1", [CUSTOMER, ORDER, LINES], "Fail")
    assert v.ok and v.code == Code.NONE and v.skipped == {}


def test_no_staging_rows_is_invalid_naming_tenant_and_import_id() -> None:
    empty = [TypeStaging(-2, "Customer", 0), TypeStaging(-30, "SalesOrder", 0)]
    v = planning_verdict("acme", "imp-typo", empty, "Fail")
    assert not v.ok
    assert v.code == Code.NO_STAGING_RECORDS == "NoStagingRecords"
    assert "'imp-typo'" in v.message and "'acme'" in v.message


@pytest.mark.parametrize("policy", ["Fail", "Skip"])
def test_only_uncoverable_rows_is_still_no_staging_records(policy: str) -> None:
    """Rows exist, but none the plan can cover (all orphans or of unknown types): Skip cannot
    turn that into an import of nothing."""
    types = [
        TypeStaging(-2, "Customer", 0),
        TypeStaging(-13, "TransactionLine", 3, 3, (7, 8, 9)),
        TypeStaging(-99, None, 2, 2, (1, 2)),
    ]
    v = planning_verdict("acme", "imp", types, policy)
    assert not v.ok and v.code == Code.NO_STAGING_RECORDS
    assert "5 uncovered row(s)" in v.message
    assert "first ids 7, 8, 9" in v.message and "first ids 1, 2" in v.message


def test_uncovered_rows_block_by_default_with_count_and_first_ids() -> None:
    orphans = TypeStaging(-13, "TransactionLine", 2503, 3, (11, 12, 13))
    unknown = TypeStaging(-99, None, 4, 4, (1, 2, 3, 4))
    v = planning_verdict("acme", "imp", [CUSTOMER, ORDER, orphans, unknown], "Fail")
    assert not v.ok
    assert v.code == Code.UNCOVERED_STAGING_ROWS == "UncoveredStagingRows"
    assert v.message.startswith("7 staging row(s) of import id 'imp' (tenant 'acme')")
    assert "TransactionLine (-13): 3 row(s), parent_id null or no staged parent" in v.message
    assert "(first ids 11, 12, 13)" in v.message
    assert "record type -99: 4 row(s), not in the spec (first ids 1, 2, 3, 4)" in v.message
    assert "uncoveredRows: Skip" in v.message
    assert v.skipped == {}


def test_skip_plans_and_records_what_it_skips() -> None:
    orphans = TypeStaging(-13, "TransactionLine", 2503, 3, (11, 12, 13))
    unknown = TypeStaging(-99, None, 4, 4, (1, 2, 3, 4))
    v = planning_verdict("acme", "imp", [CUSTOMER, ORDER, orphans, unknown], "Skip")
    assert v.ok and v.code == Code.NONE
    assert v.skipped == {-13: 3, -99: 4}
    report = staging_report([CUSTOMER, orphans, unknown], v)
    assert report["types"][1] == {
        "recordTypeId": -13,
        "name": "TransactionLine",
        "staged": 2503,
        "uncovered": 3,
        "firstIds": [11, 12, 13],
        "skipped": 3,
    }
    assert report["types"][2]["name"] is None and report["types"][2]["skipped"] == 4


def test_first_ids_are_capped_and_marked_as_more() -> None:
    many = TypeStaging(-13, "TransactionLine", 1000, 50, tuple(range(1, 51)))
    v = planning_verdict("acme", "imp", [CUSTOMER, many], "Fail")
    assert "(first ids 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ...)" in v.message


def test_rows_that_add_up_complete() -> None:
    rows = [
        TypeRows(-2, "Customer", staged=100, planned=100, written=100),
        TypeRows(-13, "TransactionLine", staged=2503, planned=2500, written=2500, skipped=3),
    ]
    assert completion_problems(rows) == []


def test_written_short_of_planned_blocks_completion() -> None:
    rows = [TypeRows(-30, "SalesOrder", staged=500, planned=500, written=499)]
    assert completion_problems(rows) == ["SalesOrder (-30): 499 row(s) written, 500 planned"]


def test_a_batch_completed_without_a_row_count_blocks_completion() -> None:
    rows = [TypeRows(-2, "Customer", staged=100, planned=100, written=50, uncounted=1)]
    got = completion_problems(rows)
    assert got[0] == (
        "Customer (-2): 1 completed batch(es) recorded no row count (completed outside the "
        "worker contract)"
    )
    assert got[1] == "Customer (-2): 50 row(s) written, 100 planned"


@pytest.mark.parametrize("staged", [99, 101])
def test_staging_changed_after_planning_blocks_completion(staged: int) -> None:
    rows = [TypeRows(-2, "Customer", staged=staged, planned=100, written=100)]
    assert completion_problems(rows) == [
        f"Customer (-2): {staged} row(s) staged now, 100 planned + 0 skipped (staging changed "
        "after planning)"
    ]


def test_zero_rows_everywhere_is_not_a_problem_here() -> None:
    """An empty import never gets this far (planning refuses it): the check compares only."""
    assert completion_problems([TypeRows(-2, "Customer", 0, 0, 0)]) == []


def test_rows_block_from_waves_and_the_planning_report() -> None:
    waves = [
        WaveState(1, -2, "Customer", MAIN, rows_staged=100, rows_written=40),
        WaveState(
            3, -13, "TransactionLine", DERIVED, rows_staged=2503, rows_written=0, rows_skipped=3
        ),
    ]
    report = {
        "types": [
            {"recordTypeId": -2, "name": "Customer", "staged": 100, "skipped": 0},
            {"recordTypeId": -99, "name": None, "staged": 4, "skipped": 4},
        ]
    }
    assert rows_by_name(waves, report) == {
        "Customer": RowCounts(100, 40, 0),
        "TransactionLine": RowCounts(2503, 0, 3),
        "recordType-99": RowCounts(4, 0, 4),
    }


def test_rows_block_of_an_unplanned_import_comes_from_its_report() -> None:
    report = {"types": [{"recordTypeId": -2, "name": "Customer", "staged": 0, "uncovered": 0}]}
    assert rows_by_name([], report) == {"Customer": RowCounts(0, 0, 0)}
    assert rows_by_name([], None) == {}
