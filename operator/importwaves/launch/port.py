"""The launcher port: what the engine asks of whatever runs its workers (issue 12).

The engine owns the worker lifecycle (`Engine.sync_workers`): it reads the database, decides
with a pure function (engine/workers.py) which pooled workers should run and which batches lost
their worker, and applies that through this port. Adapters sit below the engine and decide
nothing: `launch/local.py` runs worker processes on this machine, `launch/kubernetes.py` runs
one work-queue Job per wave. Hosts (the kopf operator, the local runner) call only the engine.

Pooled workers: a worker stays up and runs many batches. It claims the next dispatched batch of
its job (of its wave, when its group names one) with FOR UPDATE SKIP LOCKED under that batch's
fencing token (`dispatch_seq`), records its completion in the fenced transaction that did the
work, waits on LISTEN for new dispatches, and exits 0 when its job has nothing left it may run
(or after an idle timeout). The engine still decides what is dispatched, counts attempts and
fences.

Where a job's workers run (`LaunchTarget`) is stored with the job when it is submitted
(`import_jobs.launch_target`), never kept in a launcher-side dict: two ImportJobs with the same
`importId` in two namespaces are two jobs with two targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

TargetKind = Literal["local", "kubernetes", "none"]


@dataclass(frozen=True)
class LaunchTarget:
    """Where one job's workers run; stored as JSON with the job at submit."""

    kind: TargetKind
    #: Kubernetes: the ImportJob's namespace, name and uid (the worker Jobs' owner)
    namespace: str = ""
    owner_name: str = ""
    owner_uid: str = ""
    #: Kubernetes: the Secret and key holding the tenant DSN (the DSN itself is never stored)
    secret_name: str = ""
    secret_key: str = ""
    #: the ImportJob's `spec.worker` (image, command, resources, ...) as JSON
    worker: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> LaunchTarget:
        if not data:
            return cls("none")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class WorkerGroup:
    """Pooled workers the engine wants running: `size` workers claiming dispatched batches of
    `job_id` (only of `wave_number` when it is set: Kubernetes runs a Job per wave)."""

    job_id: str
    wave_number: int | None
    record_type_name: str
    size: int


@dataclass(frozen=True)
class WorkerSeen:
    """One worker as its launcher sees it."""

    #: the id the worker claims batches under (wave_batches.worker_id): a pod name, or
    #: "local:<pid>" for a local process
    worker_id: str
    job_id: str
    wave_number: int | None
    alive: bool
    #: once it ended: its exit code and its last words (termination message, or the tail of its
    #: output), redacted; empty while it runs
    exit_code: int | None = None
    message: str = ""
    #: False while its process has not started (a pod still Pending: scheduling, image pull,
    #: sandbox), and for an ended one whose process never ran (its start failed)
    started: bool = True
    #: why it has not started: the kubelet's waiting reason and message (ContainerCreating,
    #: CreateContainerConfigError, ImagePullBackOff, ...), or the reason its start failed;
    #: empty once it runs (redacted)
    waiting: str = ""
    waiting_message: str = ""
    #: seconds since it was created (a pod's age), None when unknown
    age: float | None = None
    #: seconds since its process started, None when unknown (an adopted local worker) or not
    #: started
    running_for: float | None = None
    #: the launch it belongs to (Kubernetes: its Job's name; "" for a local process)
    launch: str = ""


@dataclass(frozen=True)
class LaunchSeen:
    """A launch still in progress: a group started by the launcher that has not ended (on
    Kubernetes, an active wave Job), and how long ago it was made."""

    wave_number: int | None
    age: float
    #: its name (Kubernetes: the Job's name), matched by WorkerSeen.launch
    name: str = ""


@dataclass(frozen=True)
class Observation:
    workers: tuple[WorkerSeen, ...]
    #: False when the launcher could not see everything (an API error): the engine then
    #: declares no worker gone, and treats an unclaimed dispatch as if it knew nothing of its
    #: workers (engine/workers.py plan_unclaimed)
    complete: bool = True
    #: launches in progress (Kubernetes: the active wave Jobs); a local launcher has none
    launches: tuple[LaunchSeen, ...] = ()


@dataclass(frozen=True)
class LaunchProblem:
    """A group the launcher could not start (a refused Job, a command that cannot run)."""

    group: WorkerGroup
    error: str
    #: True when trying again cannot help (the API refused the object: invalid worker settings)
    permanent: bool


class WorkerLauncher(Protocol):
    #: True: the engine asks for one group per wave (Kubernetes); False: one per job (local)
    per_wave: bool

    def ensure(
        self, target: LaunchTarget, tenant: str, groups: Sequence[WorkerGroup]
    ) -> list[LaunchProblem]:
        """Make each group have `size` live workers (start the missing ones; never stop one
        that runs). Idempotent."""
        ...

    def observe(self, target: LaunchTarget, tenant: str, job_id: str) -> Observation:
        """The job's workers: live ones and ended ones not yet discarded."""
        ...

    def discard(
        self,
        target: LaunchTarget,
        tenant: str,
        job_id: str,
        worker_ids: Sequence[str],
        keep: Sequence[str] = (),
    ) -> None:
        """Forget ended workers whose end the engine has recorded (delete their Job or reap
        their process). `keep`: those of them that ran a batch whose last attempt failed; a
        launcher may keep them a while so a person can read why (`kubectl logs`)."""
        ...
