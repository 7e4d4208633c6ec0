"""The Helm chart's files: CRDs, values documentation and schema, RBAC comments, dashboard and
alert PromQL. (Rendering, lint and the cluster are in tests/e2e/test_chart.py.)"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import importwaves.metrics  # noqa: F401 - registers the operator's metrics
from importwaves.k8s.crd import crd_yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "importwaves"
SEED_METRICS = (
    "importwaves_wave_stuck_detection_total",
    "importwaves_queue_active_jobs",
    "importwaves_wave_dispatch_lag_seconds",
    "importwaves_derived_backlog_batches",
)


def _values_table() -> Any:
    spec = importlib.util.spec_from_file_location(
        "values_table", ROOT / "charts" / "values_table.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["values_table"] = module
    spec.loader.exec_module(module)
    return module


VT = _values_table()
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


# -- CRDs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["importjob.yaml", "kopf-peering.yaml"])
def test_chart_crds_identical_to_repo_crds(name: str) -> None:
    assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
        f"charts/importwaves/crds/{name} differs from crds/{name}: cp crds/{name} "
        "charts/importwaves/crds/"
    )


def test_chart_importjob_crd_is_the_generated_one() -> None:
    assert (CHART / "crds" / "importjob.yaml").read_text() == crd_yaml()


def test_chart_crds_dir_holds_only_the_crds() -> None:
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [
        "importjob.yaml",
        "kopf-peering.yaml",
    ]


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert chart["apiVersion"] == "v2"


def test_worker_image_default_is_the_chart_app_version() -> None:
    """An ImportJob without worker.image runs the workers of the operator the chart deploys:
    importwaves:<appVersion>, in the model, the generated CRD and the chart's copy of it."""
    from importlib.metadata import version

    from importwaves.spec import DEFAULT_WORKER_IMAGE, WorkerPod

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    expected = f"importwaves:{chart['appVersion']}"
    assert version("importwaves") == chart["appVersion"], "reinstall: make venv"
    assert expected == DEFAULT_WORKER_IMAGE
    assert WorkerPod().image == expected
    for crd_file in (ROOT / "crds" / "importjob.yaml", CHART / "crds" / "importjob.yaml"):
        crd = yaml.safe_load(crd_file.read_text())
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        image = spec["properties"]["worker"]["properties"]["image"]
        assert image["default"] == expected, crd_file
        assert expected in image["description"], crd_file


# -- values: schema and documentation ------------------------------------------------------------
def test_values_match_their_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(VALUES, SCHEMA)


def _sections(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if schema.get("additionalProperties") is False else []
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object":
            out += _sections(sub, (*prefix, key))
    return out


@pytest.mark.parametrize("path", _sections(SCHEMA), ids=lambda p: ".".join(p) or "<root>")
def test_schema_rejects_unknown_keys(path: tuple[str, ...]) -> None:
    values = copy.deepcopy(VALUES)
    node = values
    for key in path:
        node = node.setdefault(key, {})
    node["typoKey"] = 1
    with pytest.raises(jsonschema.ValidationError, match="typoKey"):
        jsonschema.validate(values, SCHEMA)


def _keys(data: Any, schema: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, sub in schema.get("properties", {}).items():
        out.add(prefix + key)
        if VT._is_section(sub):
            out |= _keys(data.get(key, {}), sub, f"{prefix}{key}.")
    return out


def test_schema_describes_every_value_and_nothing_else() -> None:
    documented = {v.path for v in VT.values()}
    in_schema = _keys(VALUES, SCHEMA)
    leaves = {k for k in in_schema if not any(o.startswith(k + ".") for o in in_schema)}
    assert leaves == documented


def test_every_value_has_a_comment_starting_with_its_name() -> None:
    bad = [
        v.path
        for v in VT.values()
        if not re.match(rf"{re.escape(v.path.split('.')[-1])}\b", v.comment)
    ]
    assert bad == []


def test_values_are_camel_case() -> None:
    bad = [
        v.path
        for v in VT.values()
        if not all(re.fullmatch(r"[a-z][a-zA-Z0-9]*", p) for p in v.path.split("."))
    ]
    assert bad == []


def test_readme_configuration_table_matches_values() -> None:
    readme = (ROOT / "README.md").read_text()
    assert VT.BEGIN in readme and VT.END in readme
    assert VT.render_readme(readme) == readme, "run: python charts/values_table.py --write"
    for v in VT.values():
        assert f"| `{v.path}` |" in readme, v.path


def test_values_table_detects_an_undocumented_value(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    chart.mkdir()
    (chart / "values.schema.json").write_text(json.dumps(SCHEMA))
    text = (CHART / "values.yaml").read_text()
    (chart / "values.yaml").write_text(
        text.replace("# priorityClassName of the operator pod.\n", "")
    )
    missing = [v.path for v in VT.values(chart) if not v.comment]
    assert missing == ["priorityClassName"]


def _with(path: str, value: Any) -> dict[str, Any]:
    """The default values with one value (a dotted path) set, as `--set path=value` would."""
    values = copy.deepcopy(VALUES)
    *parents, leaf = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return values


GOOD_QUANTITIES = ["100m", "1", 1, 0.5, "1.5", "256Mi", "1Gi", "2G", "1e3", "0", ".5", 0]
BAD_QUANTITIES = ["lots", "", "1 Gi", "256MB", "-1", -1, "1.2.3", "Mi", "1gi", True, None]


@pytest.mark.parametrize(
    "field", ["limits.memory", "limits.cpu", "requests.memory", "requests.cpu"]
)
@pytest.mark.parametrize("value", GOOD_QUANTITIES, ids=repr)
def test_schema_accepts_kubernetes_quantities(field: str, value: Any) -> None:
    jsonschema.validate(_with(f"resources.{field}", value), SCHEMA)


@pytest.mark.parametrize(
    "field", ["limits.memory", "limits.cpu", "requests.memory", "requests.cpu"]
)
@pytest.mark.parametrize("value", BAD_QUANTITIES, ids=repr)
def test_schema_refuses_what_is_not_a_quantity(field: str, value: Any) -> None:
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(_with(f"resources.{field}", value), SCHEMA)
    assert list(info.value.absolute_path) == ["resources", *field.split(".")]


def test_schema_quantity_applies_to_every_resource_name() -> None:
    """Any resource name (ephemeral-storage, hugepages-2Mi, a device) takes a quantity too."""
    jsonschema.validate(_with("resources.limits.ephemeral-storage", "1Gi"), SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_with("resources.limits.ephemeral-storage", "big"), SCHEMA)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("", True),
        ("redis://redis-master.redis.svc:6379/0", True),
        ("rediss://redis:6380/1", True),
        ("unix:///run/redis.sock", True),
        ("http://redis:6379", False),
        ("redis://redis :6379", False),
        ("redis-master:6379", False),
    ],
)
def test_schema_redis_url_shape(url: str, ok: bool) -> None:
    """The schema checks the URL's shape; credentials in it are refused by the template with a
    hint to redis.existingSecret (tests/e2e/test_chart.py test_chart_refuses_with_a_hint),
    because a schema error can carry no hint and Helm's echoes the value, password included."""
    if ok:
        jsonschema.validate(_with("redis.url", url), SCHEMA)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(_with("redis.url", url), SCHEMA)


@pytest.mark.parametrize(
    ("seconds", "ok"), [(30, True), (2.5, True), (3, True), (0, False), (-1, False), ("30", False)]
)
def test_schema_worker_idle_seconds(seconds: Any, ok: bool) -> None:
    if ok:
        jsonschema.validate(_with("operator.workerIdleSeconds", seconds), SCHEMA)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(_with("operator.workerIdleSeconds", seconds), SCHEMA)


def test_worker_idle_seconds_is_the_operators_setting() -> None:
    """operator.workerIdleSeconds reaches the operator as the variable its Settings read (and
    which it puts into every worker pod: tests/unit/test_k8s_jobs.py)."""
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert re.search(
        r"- name: IMPORTWAVES_WORKER_IDLE_SECONDS\n\s+value: "
        r"\{\{ \.Values\.operator\.workerIdleSeconds \| quote \}\}",
        deployment,
    )
    assert VALUES["operator"]["workerIdleSeconds"] == 30


def test_schema_and_template_point_a_credentialed_redis_url_to_existing_secret() -> None:
    assert (
        "redis.existingSecret" in SCHEMA["properties"]["redis"]["properties"]["url"]["description"]
    )
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    check = helpers[helpers.index('define "importwaves.validateValues"') :]
    assert 'regexMatch "(?i)(@|[?&]password=)" .Values.redis.url' in check
    assert "set redis.existingSecret" in check
    assert (
        '{{- include "importwaves.validateValues" . -}}'
        in (CHART / "templates" / "deployment.yaml").read_text()
    )


@pytest.mark.parametrize(
    ("template", "kind"),
    [("servicemonitor.yaml", "ServiceMonitor"), ("prometheusrule.yaml", "PrometheusRule")],
)
def test_monitoring_templates_check_the_prometheus_operator_kinds(template: str, kind: str) -> None:
    text = (CHART / "templates" / template).read_text()
    assert f'include "importwaves.requirePrometheusOperator" (list . "{kind}"' in text
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert '.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind)' in helpers


# -- templates ---------------------------------------------------------------------------------
def test_every_rbac_rule_says_framework_or_application() -> None:
    """Each rule in the RBAC templates is preceded by a comment naming who needs it."""
    files = ["_helpers.tpl", "clusterrole.yaml"]
    count = 0
    for name in files:
        lines = (CHART / "templates" / name).read_text().splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("- apiGroups:"):
                count += 1
                j = i - 1
                comment = []
                while j >= 0 and lines[j].lstrip().startswith("#"):
                    comment.append(lines[j])
                    j -= 1
                text = " ".join(comment)
                assert "framework" in text or "application" in text, f"{name}:{i + 1}"
    assert count >= 10


def _known_metrics() -> set[str]:
    """Every series name the operator's metrics can expose."""
    names = set()
    for metric in REGISTRY.collect():
        if metric.name.startswith("importwaves_"):
            names.add(metric.name)
            if metric.type == "counter":
                names.add(metric.name + "_total")
            if metric.type == "histogram":
                names |= {metric.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def _metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\bimportwaves_[a-z_]+\b", expr))


def test_dashboard_queries_parse_and_use_real_metrics() -> None:
    dashboard = json.loads((CHART / "dashboards" / "importwaves.json").read_text())
    assert dashboard["uid"] == "importwaves"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 4
    known = _known_metrics()
    for expr in exprs:
        promql_parser.parse(expr.replace("$__rate_interval", "5m").replace("$tenant", ".*"))
        assert _metrics_in(expr) <= known, expr
    used = set().union(*map(_metrics_in, exprs))
    for metric in SEED_METRICS:
        assert any(u.startswith(metric) for u in used), metric
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_use_real_metrics() -> None:
    text = (CHART / "templates" / "prometheusrule.yaml").read_text()
    used = _metrics_in(text)
    assert used, text
    assert used <= _known_metrics(), used - _known_metrics()
    for alert in (
        "ImportwavesStuckWaves",
        "ImportwavesDerivedBacklogNotDraining",
        "ImportwavesHighDispatchLag",
    ):
        assert f"alert: {alert}" in text
