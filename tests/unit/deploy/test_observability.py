"""The dashboards and alert rules in deploy/: every PromQL expression names only metrics that
kvmesh's services export (or Prometheus's own `up`), the dashboards are what
`kvmesh.telemetry.dashboards` writes, and, where promtool is installed, the rules are valid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from kvmesh.telemetry import dashboards, metrics

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_OWN = {"up"}
_FUNCTIONS_AND_KEYWORDS = {
    "sum", "rate", "increase", "histogram_quantile", "by", "min", "max", "clamp_min", "le",
}  # fmt: skip


def exported() -> set[str]:
    """Every series name the services expose (histograms: their _bucket, _sum, _count)."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            base = value._name
            if value._type == "counter":
                names.add(base + "_total")
            elif value._type == "histogram":
                names |= {base + suffix for suffix in ("_bucket", "_sum", "_count")}
            else:
                names.add(base)
    return names | set(metrics.ENGINE_COUNTERS) | set(metrics.ENGINE_GAUGES)


def metric_names(expr: str) -> set[str]:
    """Identifiers in `expr` that are metric names (not functions, labels or keywords)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_grouping = re.sub(r"\bby \([^)]*\)", "", without_labels)
    words = set(re.findall(r"\b[a-zA-Z_][a-zA-Z0-9_]*\b", without_grouping))
    return {w for w in words if w not in _FUNCTIONS_AND_KEYWORDS and not re.fullmatch(r"\d+m", w)}


def dashboard_exprs() -> list[str]:
    found = []
    for path in sorted((DEPLOY / "grafana").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            found += [target["expr"] for target in panel["targets"]]
    return found


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_every_expression_names_only_exported_metrics() -> None:
    known = exported() | PROMETHEUS_OWN
    exprs = dashboard_exprs() + alert_exprs()
    assert len(exprs) > 40
    unknown = {e: metric_names(e) - known for e in exprs if metric_names(e) - known}
    assert unknown == {}


def test_the_checker_catches_an_unknown_metric() -> None:
    assert metric_names('sum(rate(kvmesh_nonexistent_total{tier="x"}[5m]))') == {
        "kvmesh_nonexistent_total"
    }


def test_the_dashboards_are_what_the_generator_writes() -> None:
    for name, text in dashboards.rendered().items():
        assert (DEPLOY / "grafana" / name).read_text() == text, name
    assert {p.name for p in (DEPLOY / "grafana").glob("*.json")} == set(dashboards.rendered())


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed here")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
