"""The import spec: one pydantic model shared by the engine, the CLI and the ImportJob CRD.

Field names are camelCase because this model *is* the CRD's `spec` (the CRD schema is generated
from it). Every rule that can be checked without a database lives here, so a bad spec fails with
an error that names the field before anything touches a tenant.
"""

from __future__ import annotations

from importlib.metadata import version as package_version
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULT_WORKER_IMAGE",
    "DERIVED_RECORD_TYPE_ID",
    "DerivedType",
    "ImportSpec",
    "RecordType",
    "RetryBackoff",
    "SpecError",
    "WorkerPod",
    "format_validation_error",
    "parse_spec",
]

#: The worker image a spec names unless it says otherwise: this package's own version, the same
#: tag the chart deploys (charts/importwaves/Chart.yaml appVersion; a unit test keeps them equal).
DEFAULT_WORKER_IMAGE = f"importwaves:{package_version('importwaves')}"

#: The record type id of derived TransactionLine records (the seed's `-13`).
DERIVED_RECORD_TYPE_ID = -13

#: Schema names a tenant may not take: PostgreSQL's own (`pg_*`, `information_schema`) and the
#: database's shared `public` schema. The CRD refuses them with the same rule (k8s/crd.py).
RESERVED_TENANTS = frozenset({"public", "information_schema"})
RESERVED_TENANT_PREFIX = "pg_"

#: Environment variables the operator sets on worker pods; `worker.env` may not set them (a
#: literal DSN in the Job spec, another tenant, a forged job id or fencing token).
RESERVED_ENV_PREFIX = "IMPORTWAVES_"


def reserved_tenant_problem(tenant: str) -> str | None:
    if tenant in RESERVED_TENANTS or tenant.startswith(RESERVED_TENANT_PREFIX):
        return (
            f"tenant {tenant!r} is a reserved schema name (public, information_schema and "
            "pg_* belong to PostgreSQL); choose another tenant name"
        )
    return None


Name = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z][A-Za-z0-9_]{0,62}$",
        max_length=63,
        description="A record type name: a letter, then letters, digits or underscores "
        "(1-63 characters).",
    ),
]


#: Kubernetes list semantics for the CRD: entries keyed (and kept unique) by name.
_LIST_MAP_BY_NAME: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["name"],
}


class _Model(BaseModel):
    # strict: no type coercion ("4" -> 4, true -> 1, "yes" -> True), exactly like the API
    # server validating the CRD generated from this model
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, strict=True)


class RecordType(_Model):
    """A main (parent-first) record type: one wave of batches, imported in list order."""

    name: Name = Field(
        description="Main record type name (required): a letter, then letters, digits or "
        "underscores (1-63 characters); unique across recordTypes and derivedTypes; "
        "parentTypes entries refer to it."
    )
    recordTypeId: int = Field(
        description="Numeric record type id as stored in staging (e.g. -30 for SalesOrder); "
        "-1000000..1000000, required, unique across recordTypes and derivedTypes.",
        ge=-1_000_000,
        le=1_000_000,
    )
    batchSize: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Staging records per batch: 1..100000, default 1000; one worker Job "
        "imports one batch.",
    )
    parentTypes: list[Name] = Field(
        default_factory=list,
        max_length=32,
        description="Names of main record types (0..32, default none) whose wave must be "
        "completed before this one is dispatched; each must be listed earlier in recordTypes.",
    )


class DerivedType(_Model):
    """A derived record type (TransactionLine), created once its parents reach the threshold."""

    name: Name = Field(
        default="TransactionLine",
        description="Derived record type name: a letter, then letters, digits or underscores "
        "(1-63 characters), default TransactionLine; unique across recordTypes and derivedTypes.",
    )
    recordTypeId: int = Field(
        default=DERIVED_RECORD_TYPE_ID,
        ge=-1_000_000,
        le=1_000_000,
        description="Numeric record type id of the derived records: -1000000..1000000, "
        "default -13 (TransactionLine); unique across recordTypes and derivedTypes.",
    )
    batchSize: int = Field(
        default=2000,
        ge=1,
        le=100_000,
        description="Derived records per batch: 1..100000, default 2000; one worker Job "
        "imports one batch.",
    )
    parentTypes: list[Name] = Field(
        min_length=1,
        max_length=32,
        description="Names of main record types (1..32, required) whose batches gate this "
        "derived type: its batches are created and dispatched once completionThreshold percent "
        "of these parents' batches are completed.",
    )


class RetryBackoff(_Model):
    """How long a batch waits after a failed attempt before it is dispatched again."""

    baseSeconds: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="Seconds (0..3600, default 1) a batch waits after its first failed "
        "attempt before its next dispatch; doubled after each further failed attempt, up to "
        "capSeconds. 0 retries at once.",
    )
    capSeconds: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="Longest wait in seconds (0..86400, default 60) between a failed attempt "
        "and the batch's next dispatch, whatever the number of attempts.",
    )

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> RetryBackoff:
        if self.capSeconds < self.baseSeconds:
            raise ValueError(
                f"capSeconds ({self.capSeconds:g}) must be at least baseSeconds "
                f"({self.baseSeconds:g})"
            )
        return self

    def delay(self, failed_attempts: int) -> float:
        """Seconds before the next dispatch after `failed_attempts` failed attempts (>= 1);
        the formula batch_fail (db/queries.sql) applies."""
        return float(min(self.capSeconds, self.baseSeconds * 2 ** max(0, failed_attempts - 1)))


class WorkerPod(_Model):
    """How worker pods are run on Kubernetes (ignored by the local runner)."""

    image: str = Field(
        default=DEFAULT_WORKER_IMAGE,
        min_length=1,
        max_length=512,
        description=f"Worker container image (1-512 characters), default {DEFAULT_WORKER_IMAGE} "
        "(this operator's own version, the chart's appVersion); it must hold `importwaves "
        "worker` or another command keeping the worker contract.",
    )
    command: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=lambda: ["importwaves", "worker"],
        min_length=1,
        max_length=64,
        description="Container command (1..64 entries), default [importwaves, worker]; the "
        "worker contract is in the README.",
    )
    args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list,
        max_length=64,
        description="Container args (0..64 entries), default none.",
    )
    env: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=128,
        description="Extra env vars for worker containers (core/v1 EnvVar, 0..128), default "
        "none; IMPORTWAVES_* names are reserved for the operator (it sets the DSN, tenant, "
        "job id and fencing token).",
        # `name` declared so the CRD's CEL rule can read it (the rest of an EnvVar is kept as is)
        json_schema_extra={
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "description": "Variable name."}},
                "additionalProperties": True,
            }
        },
    )
    resources: dict[str, Any] = Field(
        default_factory=dict,
        description="Worker container resources (core/v1 ResourceRequirements), default none "
        "(the namespace's LimitRange applies).",
    )
    serviceAccountName: str | None = Field(
        default=None,
        max_length=253,
        description="ServiceAccount the worker pods run as, default the namespace's "
        "`default` ServiceAccount.",
    )
    nodeSelector: dict[str, str] = Field(
        default_factory=dict, description="Node selector for worker pods, default none."
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        max_length=64,
        description="Tolerations for worker pods (core/v1 Toleration, 0..64), default none.",
    )
    activeDeadlineSeconds: int | None = Field(
        default=None,
        ge=1,
        le=604_800,
        description="activeDeadlineSeconds of each worker Job: 1..604800, default the "
        "operator's IMPORTWAVES_WORKER_ACTIVE_DEADLINE_SECONDS (3600); a Job running longer is "
        "stopped and its batch counts as a failed attempt.",
    )


class ImportSpec(_Model):
    """One import for one tenant."""

    tenant: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,47}$",
        description="Tenant name, required and immutable; also the tenant's PostgreSQL schema: "
        "a lowercase letter, then lowercase letters, digits or underscores (1-48 characters); "
        "public, information_schema and pg_* are reserved.",
    )
    recordTypes: list[RecordType] = Field(
        min_length=1,
        max_length=64,
        description="Main record types (1..64, required), listed parent-first: each is one wave "
        "of batches, dispatched once the waves of its parentTypes are completed.",
        json_schema_extra=_LIST_MAP_BY_NAME,
    )
    derivedTypes: list[DerivedType] = Field(
        default_factory=list,
        max_length=16,
        description="Derived record types (0..16, default none), e.g. TransactionLine: their "
        "batches are created and dispatched once their parents reach completionThreshold.",
        json_schema_extra=_LIST_MAP_BY_NAME,
    )
    completionThreshold: int = Field(
        default=100,
        ge=1,
        le=100,
        description="Percent of parent batches (1..100, default 100) that must be completed "
        "before a derived type's batches are created and dispatched; below 100, derived "
        "batches may start while some parent batches still run.",
    )
    parallelism: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="Maximum batches (worker Jobs) running at once for this import: "
        "1..1000, default 4.",
    )
    retries: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries per batch after its first attempt: 0..100, default 3; a batch "
        "out of attempts is failed and the import reports Failed.",
    )
    retryBackoff: RetryBackoff = Field(
        default_factory=RetryBackoff,
        description="Back-off between a batch's failed attempt and its next dispatch: "
        "baseSeconds (default 1) doubled per failed attempt, at most capSeconds (default 60).",
    )
    staleAfterSeconds: int = Field(
        default=300,
        ge=5,
        le=86_400,
        description="Seconds (5..86400, default 300) a processing batch may go without a "
        "worker heartbeat before it is requeued (or failed, if that was its last attempt).",
    )
    claimTimeoutSeconds: int | None = Field(
        default=None,
        ge=5,
        le=86_400,
        description="Seconds (5..86400, default staleAfterSeconds) a dispatched batch may stay "
        "unclaimed by a worker before it is requeued (a lost launch, a pod that never started "
        "or cannot connect).",
    )
    priority: int = Field(
        default=1,
        ge=1,
        le=100,
        description="Weight of this import in the operator-wide budget's fair share (1..100, "
        "default 1): when the budget is full, free batch slots go to the tenant holding the "
        "fewest for its weight (a tenant's weight is its highest priority), then to its "
        "import holding the fewest for its priority. Without a budget it changes nothing.",
    )
    suspend: bool = Field(
        default=False,
        description="While true (default false), dispatch no new batches; running batches "
        "finish. Set back to false to resume.",
    )
    uncoveredRows: Literal["Fail", "Skip"] = Field(
        default="Fail",
        description="Staging rows no batch can cover (a derived row whose parentId is null or "
        "names no staged parent, a row of a record type not in this spec): Fail (default) "
        "never plans the import and reports them (Invalid, UncoveredStagingRows, with their "
        "count and first ids); Skip imports the rest and records them as skipped.",
    )
    worker: WorkerPod = Field(
        default_factory=WorkerPod,
        description="Worker pod settings (image, command, env, resources, scheduling); "
        "every field has a default.",
    )

    @model_validator(mode="after")
    def _check_graph(self) -> ImportSpec:
        problem = reserved_tenant_problem(self.tenant)
        if problem:
            raise ValueError(f"tenant: {problem}")
        for i, var in enumerate(self.worker.env):
            name = var.get("name")
            if isinstance(name, str) and name.startswith(RESERVED_ENV_PREFIX):
                raise ValueError(
                    f"worker.env: entry {i} ({name!r}) is reserved: the operator sets the "
                    f"{RESERVED_ENV_PREFIX}* variables of worker pods"
                )
        check_graph(self)
        return self

    # -- derived views -------------------------------------------------------------------------
    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    @property
    def backoff_params(self) -> dict[str, float]:
        """batch_fail's back-off parameters (db/queries.sql)."""
        return {
            "backoff_base": self.retryBackoff.baseSeconds,
            "backoff_cap": self.retryBackoff.capSeconds,
        }

    @property
    def claim_timeout(self) -> int:
        """Seconds a dispatched batch may stay unclaimed (claimTimeoutSeconds, else
        staleAfterSeconds)."""
        return self.claimTimeoutSeconds or self.staleAfterSeconds

    def main_type(self, name: str) -> RecordType:
        for rt in self.recordTypes:
            if rt.name == name:
                return rt
        raise KeyError(name)

    def parent_ids_of(self, derived: DerivedType) -> list[int]:
        return [self.main_type(p).recordTypeId for p in derived.parentTypes]

    def derived_parent_type_ids(self) -> set[int]:
        """Record type ids of main types that gate at least one derived type."""
        return {rid for d in self.derivedTypes for rid in self.parent_ids_of(d)}


def check_graph(spec: ImportSpec) -> None:
    """Names and ids unique, parents known, no cycle, main types listed parent-first."""
    names: dict[str, str] = {}
    ids: dict[int, str] = {}
    for i, rt in enumerate(spec.recordTypes):
        _unique(names, ids, rt.name, rt.recordTypeId, f"recordTypes.{i}")
    for i, dt in enumerate(spec.derivedTypes):
        _unique(names, ids, dt.name, dt.recordTypeId, f"derivedTypes.{i}")
    main = {rt.name for rt in spec.recordTypes}
    for i, dt in enumerate(spec.derivedTypes):
        for p in dt.parentTypes:
            if p not in main:
                raise ValueError(
                    f"derivedTypes.{i}.parentTypes: unknown parent type {p!r} "
                    f"(known main types: {', '.join(sorted(main))})"
                )
    graph = {rt.name: list(rt.parentTypes) for rt in spec.recordTypes}
    for i, rt in enumerate(spec.recordTypes):
        for p in rt.parentTypes:
            if p not in main:
                raise ValueError(f"recordTypes.{i}.parentTypes: unknown parent type {p!r}")
    cycle = _find_cycle(graph)
    if cycle:
        raise ValueError("recordTypes.parentTypes: dependency cycle " + " -> ".join(cycle))
    seen: set[str] = set()
    for i, rt in enumerate(spec.recordTypes):
        for p in rt.parentTypes:
            if p not in seen:
                raise ValueError(
                    f"recordTypes.{i}.parentTypes: {rt.name!r} depends on {p!r}, which is "
                    "listed after it; list record types parent-first"
                )
        seen.add(rt.name)


def _unique(names: dict[str, str], ids: dict[int, str], name: str, rid: int, loc: str) -> None:
    if name in names:
        raise ValueError(f"{loc}.name: duplicate record type name {name!r} (also {names[name]})")
    if rid in ids:
        raise ValueError(f"{loc}.recordTypeId: duplicate record type id {rid} (also {ids[rid]})")
    names[name] = loc
    ids[rid] = loc


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = grey
        stack.append(node)
        for nxt in graph.get(node, []):
            if color.get(nxt) == grey:
                return [*stack[stack.index(nxt) :], nxt]
            if color.get(nxt) == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = black
        return None

    for n in graph:
        if color[n] == white:
            found = visit(n)
            if found:
                return found
    return None


class SpecError(ValueError):
    """An import spec that cannot run, with one line per problem naming the field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid import spec: " + "; ".join(problems))


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each starting with the dotted path of the field."""
    return "; ".join(_problems(exc))


def _problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg)
    return problems


def parse_spec(data: dict[str, Any]) -> ImportSpec:
    """Validate a spec mapping; raise SpecError whose lines each name the offending field."""
    try:
        return ImportSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems(exc)) from None
