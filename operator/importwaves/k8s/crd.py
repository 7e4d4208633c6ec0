"""The ImportJob CRD, generated from the pydantic spec model (one source of truth).

`importwaves crd` prints it; `crds/importjob.yaml` is its committed output and a test keeps the
two identical. Cross-field rules that OpenAPI cannot say are CEL rules (x-kubernetes-validations);
what CEL cannot say cheaply (dependency cycles) is checked by the engine and reported with the
`Invalid` condition.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from importwaves.k8s.status import ImportJobStatus
from importwaves.launch.kubejobs import GROUP, KIND, VERSION
from importwaves.spec import ImportSpec

# GROUP, VERSION and KIND are defined below the engine (the worker Jobs' owner references name
# them) and re-exported here with the rest of the API's names.
__all__ = [
    "CEL_RULES",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "DatabaseRef",
    "ImportJobSpec",
    "build_crd",
    "crd_yaml",
    "spec_schema",
    "status_schema",
    "structural",
]

PLURAL = "importjobs"


class DatabaseRef(BaseModel):
    """Where the tenant database credentials live (a Secret in the ImportJob's namespace)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secretName: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of the Secret (in the ImportJob's namespace; required) holding the "
        "tenant database DSN.",
    )
    key: str = Field(
        default="dsn",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key in the Secret whose value is the DSN (postgresql://...), default dsn.",
    )


class ImportJobSpec(ImportSpec):
    """The ImportJob `spec`: the import spec plus where its database credentials are."""

    database: DatabaseRef = Field(
        description="Tenant database credentials, by Secret reference only (never inline); "
        "required and immutable (rotate credentials by updating the Secret)."
    )
    importId: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$",
        description="Import id keying the staging rows and the job in the tenant database "
        "(1-128 characters, immutable), default <namespace>.<name>. Re-applying an ImportJob "
        "with the same id resumes or reports that import; a new id runs a new one.",
    )

    def engine_spec(self) -> ImportSpec:
        return ImportSpec.model_validate(self.model_dump(exclude={"database", "importId"}))

    def job_id(self, namespace: str, name: str) -> str:
        return self.importId or f"{namespace}.{name}"


#: The record types whose recordTypeId another one has too (for a messageExpression).
_DUPLICATE_IDS = (
    "self.recordTypes.filter(r, !self.recordTypes.exists_one(x, x.recordTypeId == r.recordTypeId))"
)

# `message` is the fallback when a `messageExpression` fails. The messageExpressions name the
# first offending entry through `format` and a `filter(...)[0]`: concatenating (`+`) or
# `join`ing strings picked by a comprehension, or a filter nested in one, exceed the API
# server's estimated cost budget (it refuses the CRD), so the unknown parent itself is not named.
CEL_RULES: list[dict[str, str]] = [
    {
        "rule": "self.recordTypes.all(r, self.recordTypes.exists_one(x, "
        "x.recordTypeId == r.recordTypeId))",
        "message": "recordTypes: recordTypeId values must be unique",
        "messageExpression": "'recordTypes: recordTypeId %d is used by both %s and %s; "
        "recordTypeId values must be unique'.format(["
        + _DUPLICATE_IDS
        + "[0].recordTypeId, "
        + _DUPLICATE_IDS
        + "[0].name, "
        + _DUPLICATE_IDS
        + "[1].name])",
        "fieldPath": ".recordTypes",
    },
    {
        "rule": "!has(self.derivedTypes) || self.derivedTypes.all(d, d.parentTypes.all(p, "
        "self.recordTypes.exists(r, r.name == p)))",
        "message": "derivedTypes: every parentTypes entry must name a main record type",
        "messageExpression": "'derivedTypes: %s lists a parent type that is not a main record "
        "type; every parentTypes entry must name a main record type'.format([self.derivedTypes"
        ".filter(d, d.parentTypes.exists(p, !self.recordTypes.exists(r, r.name == p)))[0].name])",
        "fieldPath": ".derivedTypes",
    },
    {
        "rule": "self.recordTypes.all(r, !has(r.parentTypes) || r.parentTypes.all(p, "
        "self.recordTypes.exists(x, x.name == p)))",
        "message": "recordTypes: every parentTypes entry must name a main record type",
        "messageExpression": "'recordTypes: %s lists a parent type that is not a main record "
        "type; every parentTypes entry must name a main record type'.format([self.recordTypes"
        ".filter(t, has(t.parentTypes) && t.parentTypes.exists(p, !self.recordTypes.exists(r, "
        "r.name == p)))[0].name])",
        "fieldPath": ".recordTypes",
    },
    {
        "rule": "has(self.importId) == has(oldSelf.importId) && "
        "(!has(self.importId) || self.importId == oldSelf.importId)",
        "message": "importId is immutable: create a new ImportJob for another import",
        "fieldPath": ".importId",
    },
    {
        "rule": "self.recordTypes == oldSelf.recordTypes",
        "message": "recordTypes is immutable: the import's waves and batches were planned from "
        "it; create a new ImportJob for another plan",
        "fieldPath": ".recordTypes",
    },
    {
        "rule": "has(self.derivedTypes) == has(oldSelf.derivedTypes) && "
        "(!has(self.derivedTypes) || self.derivedTypes == oldSelf.derivedTypes)",
        "message": "derivedTypes is immutable: the import's waves and batches were planned from "
        "it; create a new ImportJob for another plan",
        "fieldPath": ".derivedTypes",
    },
    {
        "rule": "self.tenant == oldSelf.tenant",
        "message": "tenant is immutable: create a new ImportJob for another tenant",
        "messageExpression": "'tenant is immutable (was ' + oldSelf.tenant + ', now ' + "
        "self.tenant + '): create a new ImportJob for another tenant'",
        "fieldPath": ".tenant",
    },
    {
        # `pattern` is RE2 (no lookahead), so the reserved names are a CEL rule (spec.py has
        # the same rule for the engine)
        "rule": "!(self.tenant in ['public', 'information_schema']) && "
        "!self.tenant.startsWith('pg_')",
        "message": "tenant: public, information_schema and pg_* are reserved schema names; "
        "choose another tenant name",
        "messageExpression": "'tenant: ' + self.tenant + ' is a reserved schema name (public, "
        "information_schema and pg_* belong to PostgreSQL); choose another tenant name'",
        "fieldPath": ".tenant",
    },
    {
        "rule": "!has(self.worker) || !has(self.worker.env) || "
        "self.worker.env.all(e, !has(e.name) || !e.name.startsWith('IMPORTWAVES_'))",
        "message": "worker.env: IMPORTWAVES_* variables are reserved: the operator sets them "
        "on worker pods",
        "messageExpression": "'worker.env: %s: IMPORTWAVES_* variables are reserved: the "
        "operator sets them on worker pods'.format([self.worker.env.filter(e, has(e.name) && "
        "e.name.startsWith('IMPORTWAVES_'))[0].name])",
        "fieldPath": ".worker.env",
    },
    {
        "rule": "!has(self.retryBackoff) || !has(self.retryBackoff.baseSeconds) || "
        "!has(self.retryBackoff.capSeconds) || "
        "self.retryBackoff.capSeconds >= self.retryBackoff.baseSeconds",
        "message": "retryBackoff: capSeconds must be at least baseSeconds",
        "messageExpression": "'retryBackoff: capSeconds (%s) must be at least baseSeconds "
        "(%s)'.format([string(self.retryBackoff.capSeconds), "
        "string(self.retryBackoff.baseSeconds)])",
        "fieldPath": ".retryBackoff",
    },
    {
        "rule": "self.database == oldSelf.database",
        "message": "database is immutable: the import's rows live in that database; create a "
        "new ImportJob for another database (rotate credentials by updating the Secret)",
        "fieldPath": ".database",
    },
]

_KEEP = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "enum",
    "default",
    "format",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "nullable",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Turn a pydantic JSON schema into a Kubernetes structural schema (no $ref, no anyOf)."""
    defs = schema.get("$defs", {})

    def conv(node: dict[str, Any]) -> dict[str, Any]:
        node = copy.deepcopy(node)
        if "$ref" in node:
            target = conv(defs[node.pop("$ref").split("/")[-1]])
            if node.get("description"):
                target["description"] = node["description"]
            if "default" in node:
                target["default"] = node["default"]
            return target
        if "anyOf" in node:  # Optional[X] -> X, nullable
            options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express anyOf {options} structurally")
            inner = conv(options[0])
            inner.update(
                {k: v for k, v in node.items() if k in ("description", "default", "format")}
            )
            inner["nullable"] = True
            if inner.get("default") is None:
                inner.pop("default", None)
            return inner
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key not in _KEEP:
                continue
            if key == "properties":
                out[key] = {k: conv(v) for k, v in value.items()}
            elif key == "items":
                out[key] = conv(value)
            elif key == "additionalProperties":
                if value is False:
                    continue  # structural schemas prune unknown fields already
                if value is True or value == {}:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                else:
                    out[key] = conv(value)
            else:
                out[key] = value
        if (
            out.get("type") == "object"
            and "properties" not in out
            and "additionalProperties" not in out
        ):
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out

    return conv(schema)


def spec_schema() -> dict[str, Any]:
    schema = structural(ImportJobSpec.model_json_schema(mode="validation"))
    schema["description"] = (
        "One import for one tenant: main record types imported parent-first in waves, then "
        "derived TransactionLine waves once parents reach the completion threshold."
    )
    schema["x-kubernetes-validations"] = CEL_RULES
    return schema


def status_schema() -> dict[str, Any]:
    """The status schema, generated from the status model (k8s/status.py ImportJobStatus)."""
    schema = structural(ImportJobStatus.model_json_schema(mode="serialization"))
    schema["description"] = "Observed state, computed from the tenant database and the spec."
    # kept: statuses written by earlier operator versions may hold fields no longer modelled
    schema["x-kubernetes-preserve-unknown-fields"] = True
    # Before the operator's first status write, the API server's defaulting (applied when the
    # object is read) shows STATUS Pending and a MESSAGE saying what it waits for, instead of
    # empty columns; the operator's first write replaces both.
    # (summary's and message's defaults are in the model)
    schema["default"] = {}
    return schema


#: `kubectl get importjobs` columns; priority 1 only with `-o wide`.
PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Completed")].status',
        "description": "The Completed condition: every staged row imported.",
    },
    {"name": "Status", "type": "string", "jsonPath": ".status.summary"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Active", "type": "integer", "jsonPath": ".status.activeBatches"},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.failedBatches"},
    {"name": "Waiting", "type": "integer", "jsonPath": ".status.heldBatches"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
    {"name": "Started", "type": "date", "jsonPath": ".status.startTime", "priority": 1},
    {"name": "Duration", "type": "string", "jsonPath": ".status.duration", "priority": 1},
]


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": PLURAL,
                "singular": "importjob",
                "kind": KIND,
                "shortNames": ["ij"],
                "categories": ["importwaves"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "ImportJob: a multi-wave, parent-first import into one "
                            "tenant's PostgreSQL database.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version."},
                                "kind": {"type": "string", "description": "ImportJob."},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    import yaml

    header = (
        "# Generated by `importwaves crd` from the pydantic model in "
        "operator/importwaves/k8s/crd.py.\n# Do not edit: change the model and "
        "regenerate (a test keeps this file in step).\n"
    )
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
