"""The Grafana dashboard (`tetriinfer dashboard`, tetriinfer/server/grafana/tetriinfer.json) cannot
drift from /metrics: every series its queries select is in a live tiny cluster's scrape, with every
label the queries and legends use; and it is a dashboard Grafana imports (unique panel ids, grid
positions that do not overlap, every query on the `DS_PROMETHEUS` data source variable)."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_utils import start_server
from tetriinfer.cli import main
from tetriinfer.entrypoints.dashboard import DASHBOARD

SERVER_ARGS = ["--prefill-instances", "1", "--decode-instances", "2", "--num-blocks", "256", "--chunk-size", "64",
               "--max-model-len", "512"]
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset"}
GRAFANA_VARIABLES = {"__rate_interval", "__range", "__interval"}  # built in, not the dashboard's to define
# Prometheus (honor_labels: false, its default) renames a scraped `instance` label to `exported_instance`
# and adds the scrape target's `instance` and `job`.
TARGET_LABELS = {"instance", "job"}

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$")


def selectors(expr: str) -> tuple[list[str], set[str]]:
    """The metric names a PromQL expression selects, and the label names it matches or groups by."""
    expr = STRING.sub('""', expr)
    labels = {name.strip() for group in GROUPING.findall(expr) for name in group.split(",") if name.strip()}
    expr = re.sub(r"\[[^\]]*\]", "", GROUPING.sub("", expr))  # range selectors: [$__rate_interval]
    names = []
    for name, matchers, call in SELECTOR.findall(expr):
        if call or name in PROMQL_WORDS:  # a function, or an operator keyword
            continue
        names.append(name)
        labels |= set(MATCHER.findall(matchers))
    return names, labels


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) for every panel target and every query variable."""
    found = [(f"panel {p['title']!r}", t["expr"], t.get("legendFormat", ""))
             for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            selector, label = LABEL_VALUES.match(var["definition"]).groups()
            found.append((f"variable {var['name']!r}", selector, f"{{{{{label}}}}}"))
    return found


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> dict[str, set[str]]:
    """Sample name -> label names, from /metrics of a served tiny cluster that finished requests (the
    online predictor's accuracy appears after its first label)."""
    with start_server(SERVER_ARGS, tmp_path_factory.mktemp("dashboard")) as server:
        server.wait_for_instances(3)
        for i in range(4):
            r = httpx.post(f"{server.url}/v1/completions", timeout=60, json=dict(
                model="tiny", prompt=f"Request {i}: the quick brown fox", max_tokens=6, ignore_eos=True))
            assert r.status_code == 200, r.text
        server.wait_until(lambda: server.metric_sum("tetriinfer_predictor_labels_total") > 0, 20,
                          "the online predictor's first label")
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_the_selector_parser_finds_metrics_and_labels_and_skips_functions_and_keywords():
    names, labels = selectors('histogram_quantile(0.9, sum by (le) (rate(a_bucket{instance=~"$x",role="p{"}'
                              '[$__rate_interval]))) / on (job) b unless count without (c) (vllm:d)')
    assert names == ["a_bucket", "b", "vllm:d"]
    assert labels == {"le", "instance", "role", "job", "c"}


def test_every_query_selects_series_the_live_server_exports_with_the_labels_it_uses(scraped):
    as_stored = {name: {"exported_instance" if label == "instance" else label for label in labels} | TARGET_LABELS
                 for name, labels in scraped.items()}
    used = set()
    for where, expr, legend in queries(dashboard()):
        names, labels = selectors(expr)
        assert names, f"{where}: no metric in {expr!r}"
        missing = [n for n in names if n not in scraped]
        assert not missing, f"{where}: /metrics exports no {missing} ({expr!r})"
        available = set().union(*(as_stored[n] for n in names))
        unknown = (labels | set(LEGEND_LABEL.findall(legend))) - available
        assert not unknown, f"{where}: no label {sorted(unknown)} on {names} ({expr!r}, legend {legend!r})"
        used.update(names)
    # the asks: latencies, throughput, queues, KV, transfers, flips, adaptive, prefix cache, predictor
    assert {"tetriinfer_ttft_seconds_bucket", "tetriinfer_tpot_seconds_bucket", "tetriinfer_jct_seconds_bucket",
            "tetriinfer_output_tokens_sum", "tetriinfer_num_waiting", "tetriinfer_queued_prompt_tokens",
            "tetriinfer_kv_blocks_used", "tetriinfer_kv_transfer_bytes_total",
            "tetriinfer_kv_transfer_skipped_tokens_total", "tetriinfer_flips_total",
            "tetriinfer_num_local_prefills_total", "tetriinfer_num_kept_decodes_total",
            "tetriinfer_prefix_hit_tokens_total", "tetriinfer_predictor_online_accuracy",
            "tetriinfer_predicted_bucket_total"} <= used


def test_the_dashboard_is_a_grafana_dashboard():
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            assert cell not in cells, f"{p['title']!r} overlaps {cells[cell]!r}"
            cells[cell] = p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat"}, p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for source in [p["datasource"], *(t["datasource"] for t in p["targets"])]:
            assert source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
    used = {v for _, expr, _ in queries(board) for v in re.findall(r"\$\{?(\w+)", expr)}
    assert used - GRAFANA_VARIABLES <= set(variables), used


def test_the_command_writes_the_shipped_dashboard(tmp_path, capsys):
    out = tmp_path / "tetriinfer.json"
    assert main(["dashboard", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == dashboard()
    assert main(["dashboard"]) == 0
    assert json.loads(capsys.readouterr().out) == dashboard()
