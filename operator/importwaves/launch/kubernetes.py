"""Kubernetes launcher: one batch/v1 Job per dispatched batch (see k8s/jobs.py for why)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from importwaves.k8s.jobs import Owner, build_job
from importwaves.launch.base import BatchDispatch, LaunchFailure
from importwaves.log import event
from importwaves.spec import ImportSpec

log = logging.getLogger("importwaves.launch.kubernetes")


class KubernetesLauncher:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        conn_env: dict[str, str] | None = None,
        active_deadline: int = 0,
    ) -> None:
        self.batch = client.BatchV1Api(api)
        self.owners: dict[str, Owner] = {}
        #: IMPORTWAVES_* connection settings given to every worker pod
        self.conn_env = dict(conn_env or {})
        #: default activeDeadlineSeconds of worker Jobs (0: none)
        self.active_deadline = active_deadline

    def register(self, job_id: str, owner: Owner) -> None:
        self.owners[job_id] = owner

    def launch(
        self, tenant: str, job_id: str, spec: ImportSpec, batches: Sequence[BatchDispatch]
    ) -> list[LaunchFailure]:
        owner = self.owners.get(job_id)
        if owner is None:  # not reconciled by this process yet: the next sync creates them
            event(
                log,
                "launch_deferred_no_owner",
                logging.WARNING,
                job_id=job_id,
                batches=len(batches),
            )
            return []
        failures = []
        for b in batches:
            try:
                self.create(owner, b)
            except ApiException as exc:
                if exc.status is not None and 400 <= exc.status < 500:
                    # The API refused this Job (invalid worker settings, forbidden): an attempt.
                    failures.append(
                        LaunchFailure(b, f"{exc.status} {exc.reason}: {_api_message(exc)}")
                    )
                else:  # transient: the batch stays dispatched; the next sync creates the Job
                    event(
                        log,
                        "launch_retry_later",
                        logging.WARNING,
                        job_id=job_id,
                        batch_id=b.batch_id,
                        status=exc.status,
                        error=str(exc.reason),
                    )
        return failures

    def create(self, owner: Owner, batch: BatchDispatch) -> bool:
        """Create the Job; False when it already existed (AlreadyExists means success)."""
        try:
            self.batch.create_namespaced_job(
                owner.namespace,
                build_job(  # type: ignore[arg-type]
                    owner, batch, conn_env=self.conn_env, active_deadline=self.active_deadline
                ),
            )
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        event(
            log,
            "worker_job_created",
            logging.DEBUG,
            job_id=batch.job_id,
            batch_id=batch.batch_id,
            dispatch_seq=batch.dispatch_seq,
        )
        return True


def _api_message(exc: ApiException) -> str:
    import json

    try:
        body: Any = json.loads(exc.body or "{}")
        return str(body.get("message", exc.body))
    except ValueError:
        return str(exc.body)
