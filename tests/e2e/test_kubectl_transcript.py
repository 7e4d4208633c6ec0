"""Issue 13's kubectl transcript: an import driven with the real `kubectl` (apply -f of a manifest
file, a refused patch, delete mid-run, apply again) against the real test API server, recorded as
a user sees it: `kubectl get importjobs -o wide` polled every 0.4 s and streamed with `-w`, and
`kubectl describe importjob` at each change (tests/e2e/harness/transcript.py). The assertions are
over that recording (and over every status the API server stored, seen by a watch).

One batch (SalesOrder-000001) has a custom worker command that prints `boom: cannot reach
upstream API` to stderr and exits 1 on its first dispatch, then imports it on its retry.

Proven elsewhere, not repeated here: the refused spec change the engine holds until completion
without flapping (test_operator_status.py::test_a_refused_spec_change_holds_until_completion_
without_flapping), the API server refusing every plan-shaping change (test_status_api.py::
test_record_and_derived_types_are_immutable_once_set), and delete-then-reapply cancelling the
database job and resuming (test_operator_status.py::test_delete_cancels_the_database_job_and_a_
reapply_resumes_at_once). Here those steps are driven with kubectl to see what the rows show.

With IMPORTWAVES_TRANSCRIPT_OUT set, the recorded transcript (the distinct rows with elapsed
seconds, the test's kubectl commands, the last describe) is written to that file (`make
transcript`).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

from importwaves.k8s.status import PENDING_MESSAGE, contradictions

from .harness.cluster import Cluster
from .harness.operatorkit import (
    Harness,
    OperatorProcess,
    Tenant,
    conditions,
    create_secret,
    importjob,
    is_true,
    small_spec,
    status_history,
    watch_importjobs,
)
from .harness.transcript import Row, Transcript

BOOM = "boom: cannot reach upstream API"
FAILING = "SalesOrder-000001"
#: the STATUS column's documented order (k8s/status.py ImportJobStatus.summary); Pending is also
#: the CRD's default before the operator's first status write
ORDER = ["Pending", "Running", "DerivedPending", "Completed"]


def _worker() -> dict[str, object]:
    """The reference worker (`importwaves worker`, holding each batch 1 s), except that
    SalesOrder-000001's first dispatch prints BOOM to stderr and exits 1."""
    script = (
        f'if [ "$IMPORTWAVES_BATCH_ID" = {FAILING} ] && [ "$IMPORTWAVES_DISPATCH_SEQ" = 1 ]; '
        f"then echo '{BOOM}' >&2; exit 1; fi; exec importwaves worker"
    )
    return {
        "image": "importwaves:test",
        "command": ["sh", "-c", script],
        "env": [{"name": "IWTEST_WORKER_HOLD_SECONDS", "value": "1"}],
    }


def _pct(row: Row) -> int | None:
    m = re.fullmatch(r"(\d+)%", row["PROGRESS"])
    return int(m.group(1)) if m else None


def test_kubectl_transcript_of_an_import_with_a_failed_attempt_a_refused_patch_and_a_reapply(
    k8s_cluster: Cluster,
    namespace: str,
    tenant_db: Callable[[str], Tenant],
    operator: Callable[..., OperatorProcess],
    harness: Callable[..., Harness],
    tmp_path: Path,
) -> None:
    ns, name = namespace, "transcript"
    job_id = f"{ns}.{name}"
    t = tenant_db(f"tr_{uuid.uuid4().hex[:8]}")
    data = t.generate(job_id, orders=200)
    create_secret(k8s_cluster, ns, "tenant-db", t.dsn)
    op = operator(ns)
    h = harness(ns, [op], [t])
    spec = small_spec(
        50,
        50,
        250,
        parallelism=2,
        worker=_worker(),
        retryBackoff={"baseSeconds": 3, "capSeconds": 3},
    )
    manifest = tmp_path / "importjob.yaml"
    manifest.write_text(yaml.safe_dump(importjob(name, ns, t.name, **spec), sort_keys=False))

    def batch(batch_id: str) -> dict[str, object] | None:
        return next((b for b in t.batches(job_id) if b["batch_id"] == batch_id), None)

    def out() -> list[dict[str, object]]:
        return [b for b in t.batches(job_id) if b["status"] in ("dispatched", "processing")]

    rec = Transcript(k8s_cluster, ns, name).start()
    refused = ""
    kept: object = None
    try:
        with k8s_cluster.api_client() as api:
            objects = watch_importjobs(api, ns)
            try:
                rec.kubectl("apply", "-f", str(manifest))
                # the first dispatch of SalesOrder-000001 fails: recorded with the stderr line
                failed = h.wait_for(
                    lambda: (b := batch(FAILING)) and BOOM in str(b["last_error"] or "") and b,
                    f"{FAILING}'s failed attempt recorded with its stderr",
                    120,
                    0.2,
                )
                rec.mark(f"(db) {FAILING}: {failed['status']}, last_error: {failed['last_error']}")
                # a plan-shaping change: refused by the API server, nothing changes
                r = rec.kubectl(
                    "patch",
                    "importjob",
                    name,
                    "--type=json",
                    "-p",
                    json.dumps(
                        [{"op": "replace", "path": "/spec/recordTypes/1/batchSize", "value": 7}]
                    ),
                    check=False,
                )
                refused = r.stderr
                kept = (h.get(name) or {}).get("spec", {}).get("recordTypes")
                # the retry imports it; delete mid-run (batches out), then apply the file again
                h.wait_for(
                    lambda: (b := batch(FAILING)) and b["status"] == "completed" and out(),
                    f"{FAILING} completed on its retry, with batches still out",
                    120,
                    0.2,
                )
                r = rec.kubectl("delete", "importjob", name, "--timeout=30s", check=False)
                if r.returncode != 0:
                    h.fail(f"kubectl delete importjob failed: {r.stderr}")
                reapply_at = rec.now()
                rec.kubectl("apply", "-f", str(manifest))
                reapplied_at = rec.now()
                st = h.wait(name, lambda s: is_true(s, "Completed"), "Completed after reapply", 180)
                rec.kubectl(
                    "wait", "--for=condition=Completed", f"importjob/{name}", "--timeout=5s"
                )
                # a few more polls and timer ticks: the final row must hold
                n = len(rec.rows)
                h.wait_for(lambda: len(rec.rows) >= n + 5, "5 more polls", 30)
                final_describe = rec.describe_now()
            finally:
                objects.stop()
    finally:
        rec.stop()
        text = rec.render()
        print(f"\n{text}")
        if os.environ.get("IMPORTWAVES_TRANSCRIPT_OUT"):
            Path(os.environ["IMPORTWAVES_TRANSCRIPT_OUT"]).write_text(text)

    with h.explained():
        assert not rec.errors, rec.errors
        rows = rec.present()
        changes = [r for r in rec.changes() if r.cells is not None]
        statuses = [r["STATUS"] for r in changes]
        assert len(rows) > 30, len(rows)  # a recording, not a few samples

        # -- STATUS: forward only along the documented order, per ImportJob object ----------
        first = [r for r in rows if r.until < reapply_at]
        second = [r for r in rows if r.at > reapplied_at]
        for life, allowed_end in ((first, {"Cancelled"}), (second, set())):
            seen = [r["STATUS"] for r in life]
            ranks = [ORDER.index(s) if s in ORDER else None for s in seen]
            ended = [s for s, k in zip(seen, ranks, strict=True) if k is None]
            assert set(ended) <= allowed_end, statuses  # no Invalid, Failed, Blocked, ...
            if ended:  # Cancelled only at the end of the deleted object's life
                assert seen[seen.index(ended[0]) :] == ended, seen
            known = [k for k in ranks if k is not None]
            assert known == sorted(known), f"STATUS went back: {statuses}"
        assert "Running" in [r["STATUS"] for r in first], statuses
        # the re-applied ImportJob has batches out again within seconds (the bound of
        # test_operator_status.py's delete-then-reapply test)
        resumed = next((r.at for r in second if r["ACTIVE"] not in ("", "0")), None)
        assert resumed is not None and resumed - reapplied_at < 10, (resumed, reapplied_at)
        assert [r["STATUS"] for r in second][-1] == "Completed", statuses
        # the -w stream says the same. Its lines are timed by arrival (a loaded machine delays
        # them), so its two objects are told apart by the stream itself: each begins with the
        # CRD's default row (Pending, before the operator's first write)
        words = set(ORDER) | {"Cancelled", "Invalid", "Failed", "Blocked", "Suspended"}
        watched = [w for _, w in rec.watched_statuses(words)]
        lives: list[list[str]] = []
        for i, w in enumerate(watched):
            if w == "Pending" and (i == 0 or watched[i - 1] != "Pending"):
                lives.append([])
            assert lives, watched
            lives[-1].append(w)
        lines = "\n".join(f"{at:6.1f}s {line}" for at, line in rec.watch_lines)
        assert len(lives) == 2, f"kubectl get -w: not two objects, each forward only:\n{lines}"
        for life, allowed_end in ((lives[0], {"Cancelled"}), (lives[1], set())):
            known = [ORDER.index(w) for w in life if w in ORDER]
            assert known == sorted(known), f"kubectl get -w went back:\n{lines}"
            assert set(life) - set(ORDER) <= allowed_end, lines
        assert lives[1][-1] == "Completed", lines

        # -- PROGRESS never decreases (the data is kept across the delete) -------------------
        pcts = [p for p in (_pct(r) for r in rows) if p is not None]
        assert pcts == sorted(pcts), [r["PROGRESS"] for r in changes]
        assert pcts[-1] == 100
        # ... and its total (rows to import, in describe) is fixed once planned
        totals = {
            m.group(1)
            for _, d in rec.describes
            if (m := re.search(r"Rows To Import:\s+(\d+)", d)) is not None
        }
        assert totals == {str(data.customers + data.orders + data.lines)}, totals

        # -- READY only at the end, and then with Completed ----------------------------------
        for r in rows:
            assert (r["READY"] == "True") == (r["STATUS"] == "Completed"), r.line
        ready = [r["READY"] == "True" for r in second]
        assert ready == sorted(ready), "READY went back to False"

        # -- STATUS and MESSAGE never empty (the CRD's defaults until the operator's first
        # status write); ACTIVE / FAILED consistent with STATUS --------------------------------
        for r in rows:
            assert r["STATUS"] and r["MESSAGE"], r.line
            if r["STATUS"] == "Pending" and not r["PROGRESS"]:
                assert r["MESSAGE"] == PENDING_MESSAGE, r.line
            else:
                assert r["FAILED"] == "0", r.line  # no batch ran out of attempts
            if r["STATUS"] == "Completed":
                assert r["ACTIVE"] == "0", r.line
            if r["ACTIVE"] not in ("", "0"):
                assert r["STATUS"] in ("Running", "DerivedPending", "Cancelled"), r.line
        # the failed attempt's stderr reached the MESSAGE column while it waited for its retry
        boom_rows = [r for r in rows if BOOM in r["MESSAGE"]]
        assert boom_rows, [r["MESSAGE"] for r in changes]
        assert all(r["STATUS"] == "Running" for r in boom_rows), [r.line for r in boom_rows]

        # -- every status the API server stored: consistent conditions -----------------------
        history = [s for s in status_history(objects, name) if s.get("conditions")]
        for s in history:
            conds = s["conditions"]
            assert not contradictions(conds), (contradictions(conds), s)
            assert all(c["message"] for c in conds), conds
            c = conditions(s)
            assert c["Failed"]["status"] == "False", c["Failed"]
            assert (s.get("activeBatches", 0) > 0) <= (
                c["Progressing"]["status"] == "True" or s.get("summary") == "Cancelled"
            ), s
            assert (c["Completed"]["status"] == "True") == (s["summary"] == "Completed"), s
        progressing = [conditions(s)["Progressing"]["message"] for s in history]
        assert any(f"{FAILING}: worker command exited 1: {BOOM}" in m for m in progressing)

        # -- the refused patch: one clear line, and nothing changed --------------------------
        assert "recordTypes is immutable" in refused, refused
        assert kept == spec["recordTypes"], kept
        assert not any("Invalid" in r["STATUS"] for r in rows)

        # -- events: the failed attempt named with its stderr; one ImportCompleted -----------
        events = h.events(name)
        failed_ev = [e for e in events if e["reason"] == "BatchFailed"]
        assert any(
            e["type"] == "Warning"
            and f"batch {FAILING} (SalesOrder, wave 2) attempt 1 of 4 failed" in e["message"]
            and BOOM in e["message"]
            for e in failed_ev
        ), failed_ev
        completed_ev = [e for e in events if e["reason"] == "ImportCompleted"]
        assert len(completed_ev) == 1 and completed_ev[0].get("count", 1) == 1, completed_ev
        assert completed_ev[0]["type"] == "Normal"
        # kubectl describe showed both while they were the object's events
        assert any("BatchFailed" in d and BOOM in d for _, d in rec.describes)
        assert "ImportCompleted" in final_describe

        # -- the end: STARTED and DURATION filled, every row imported ------------------------
        last = rows[-1]
        assert (last["READY"], last["STATUS"], last["PROGRESS"]) == ("True", "Completed", "100%")
        assert last["STARTED"] and re.fullmatch(r"\d+[smhd]\w*", last["DURATION"]), last.line
        assert st["startTime"] and st["completionTime"] and st["duration"] == last["DURATION"]
        assert t.target_counts(job_id) == {
            "customers": data.customers,
            "transactions": data.orders,
            "transaction_lines": data.lines,
        }
