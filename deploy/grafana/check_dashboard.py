#!/usr/bin/env python3
"""Checks wagate's Grafana dashboard (and, optionally, Prometheus rule files) offline.

    python3 deploy/grafana/check_dashboard.py deploy/grafana/wagate.json \
        [--rules deploy/prometheus/rules/wagate.yml ...] [--promql-out rules.yml]

The dashboard: it parses as JSON; it has a uid, a title and a schemaVersion; its datasource is
the template variable DS_PROMETHEUS (type datasource, plugin prometheus), and every panel and
target refers to it as ${DS_PROMETHEUS}, never to a fixed uid, so it imports into any Grafana;
every panel has a unique id, a title and a gridPos that overlaps no other panel; every panel but
a row has at least one Prometheus target with a refId (unique in the panel) and an expression.

Metric names: every metric an expression reads (panel targets, template variable queries, and
the --rules files' expressions) must be one of the "### Metrics" table of docs/operations.md;
a histogram is read through its _bucket, _count or _sum series only. A few series wagate does
not export are allowed by name (ALLOWED_DASHBOARD: Prometheus's `up`; ALLOWED_RULES also
prometheus-nats-exporter's JetStream pending count). Any other identifier in an expression that is not a PromQL function,
keyword or label name is an unknown metric, so a misspelt name fails.

--promql-out writes every panel expression, Grafana's variables replaced by plain values, as
recording rules, for `promtool check rules` to parse.

Exits 1 and lists every violation; needs PyYAML for --rules and --promql-out.
"""

import argparse
import json
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"

# Series wagate does not export that may be read anyway: in the dashboard, Prometheus's own
# per-target `up`; in the alert rules also prometheus-nats-exporter's JetStream pending count.
ALLOWED_DASHBOARD = {"up"}
ALLOWED_RULES = ALLOWED_DASHBOARD | {"jetstream_consumer_num_pending"}

FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count_over_time", "day_of_month", "day_of_week", "day_of_year",
    "days_in_month", "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count",
    "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar",
    "histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time", "max_over_time",
    "min_over_time", "minute", "month", "predict_linear", "present_over_time",
    "quantile_over_time", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc",
    "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "time", "timestamp",
    "vector", "year",
}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"}
# Followed by a parenthesised list of label names.
LABEL_LIST = {"by", "without", "on", "ignoring", "group_left", "group_right"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

IDENT = re.compile(r"(?<![\w:$.])([A-Za-z_:][A-Za-z0-9_:]*)")
NAME_MATCHER = re.compile(r'__name__\s*(=~|=|!=|!~)\s*"((?:[^"\\]|\\.)*)"')
METRIC_NAME = re.compile(r"^[A-Za-z_:][A-Za-z0-9_:]*$")


def documented_metrics(docs_path):
    """{name: type} from the "### Metrics" table of docs/operations.md."""
    text = Path(docs_path).read_text(encoding="utf-8")
    section = re.search(r"^### Metrics\n(.*?)(?=^#)", text, re.M | re.S)
    if not section:
        raise SystemExit(f"{docs_path}: no '### Metrics' section")
    metrics = {}
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        types = [t.strip() for t in cells[1].split(",")]
        if len(types) == 1:
            types = types * len(names)
        if len(types) != len(names):
            raise SystemExit(f"{docs_path}: names and types differ in number: {line}")
        for name, kind in zip(names, types):
            if kind not in ("counter", "gauge", "histogram"):
                raise SystemExit(f"{docs_path}: unknown type {kind!r} of {name}")
            metrics[name] = kind
    if not metrics:
        raise SystemExit(f"{docs_path}: the Metrics table lists no metric")
    return metrics


def metric_names(expr):
    """(names read by a PromQL expression, problems found while reading it)."""
    problems = []
    names = set()
    for op, value in NAME_MATCHER.findall(expr):
        if op not in ("=", "=~"):
            problems.append(f"negative __name__ matcher cannot be checked: {op}\"{value}\"")
            continue
        for alt in value.split("|") if op == "=~" else [value]:
            if METRIC_NAME.match(alt):
                names.add(alt)
            else:
                problems.append(f"__name__ matcher too loose to check: {value!r}")
    # Strings, label matchers, range and subquery windows, Grafana variables: no metric there.
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " 1 ", s)
    for kw in LABEL_LIST:
        s = re.sub(rf"\b{kw}\s*\([^()]*\)", " ", s)
    for m in IDENT.finditer(s):
        word = m.group(1)
        rest = s[m.end():].lstrip()
        if rest.startswith("(") and (word in FUNCTIONS or word in AGGREGATIONS):
            continue
        if word.lower() in KEYWORDS or word in AGGREGATIONS or word in LABEL_LIST:
            continue
        if word in ("e",) or re.fullmatch(r"\d", word):
            continue
        names.add(word)
    return names, problems


def check_names(where, expr, documented, errors, allowed=ALLOWED_DASHBOARD):
    names, problems = metric_names(expr)
    for p in problems:
        errors.append(f"{where}: {p}")
    for name in sorted(names):
        if name in allowed:
            continue
        if name in documented:
            if documented[name] == "histogram":
                errors.append(f"{where}: histogram {name} read without _bucket, _count or _sum")
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base in documented and documented[base] == "histogram":
            continue
        errors.append(f"{where}: metric {name} is not in docs/operations.md's Metrics table")
    return names


def grafana_to_promql(expr):
    """Replaces Grafana's variables with values Prometheus parses."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
    expr = expr.replace("$__interval", "1m").replace("${__range}", "1h")
    return re.sub(r"\$\{?\w+\}?", ".+", expr)


def check_dashboard(path, documented, errors):
    try:
        dash = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        errors.append(f"{path}: {e}")
        return []
    for key in ("uid", "title"):
        if not dash.get(key):
            errors.append(f"{path}: no dashboard {key}")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 39:
        errors.append(f"{path}: schemaVersion {dash.get('schemaVersion')!r} (Grafana 11+ is 39 or more)")

    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append(f"{path}: no template variable DS_PROMETHEUS of type datasource, query prometheus")

    def datasource_ok(where, d):
        if d != {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}:
            errors.append(f"{where}: datasource {d!r} is not {{type: prometheus, uid: ${{DS_PROMETHEUS}}}}")

    for name, v in variables.items():
        if v.get("type") != "query":
            continue
        datasource_ok(f"variable {name}", v.get("datasource"))
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q, re.S)
        if m:
            check_names(f"variable {name}", m.group(1), documented, errors)
        elif q:
            errors.append(f"variable {name}: query {q!r} is not label_values(selector, label)")

    panels = []
    for p in dash.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))  # collapsed rows hold theirs
    exprs = []
    ids, cells = {}, {}
    for p in panels:
        where = f"panel {p.get('id')!r} {p.get('title')!r}"
        if not isinstance(p.get("id"), int):
            errors.append(f"{where}: no integer id")
        elif p["id"] in ids:
            errors.append(f"{where}: id also used by {ids[p['id']]!r}")
        else:
            ids[p["id"]] = p.get("title")
        if not p.get("title"):
            errors.append(f"{where}: no title")
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")) or g["x"] + g["w"] > 24:
            errors.append(f"{where}: gridPos {g!r} is not within the 24 columns")
        else:
            for cx in range(g["x"], g["x"] + g["w"]):
                for cy in range(g["y"], g["y"] + g["h"]):
                    if (cx, cy) in cells:
                        errors.append(f"{where}: overlaps panel {cells[(cx, cy)]!r} at x={cx} y={cy}")
                        break
                    cells[(cx, cy)] = p.get("id")
                else:
                    continue
                break
        if p.get("type") == "row":
            if p.get("targets"):
                errors.append(f"{where}: a row with targets")
            continue
        datasource_ok(where, p.get("datasource"))
        targets = p.get("targets") or []
        if not targets:
            errors.append(f"{where}: no target")
        refs = set()
        for t in targets:
            tw = f"{where} target {t.get('refId')!r}"
            if not t.get("refId") or t["refId"] in refs:
                errors.append(f"{tw}: missing or repeated refId")
            refs.add(t.get("refId"))
            datasource_ok(tw, t.get("datasource"))
            expr = t.get("expr") or ""
            if not expr.strip():
                errors.append(f"{tw}: no expression")
                continue
            check_names(tw, expr, documented, errors)
            exprs.append((p.get("id"), t.get("refId"), expr))
    return exprs


def check_rules(path, documented, errors):
    import yaml

    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            check_names(f"{path}: rule {name}", str(rule.get("expr", "")), documented, errors, ALLOWED_RULES)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dashboard")
    ap.add_argument("--docs", default=str(DOCS))
    ap.add_argument("--rules", nargs="*", default=[])
    ap.add_argument("--promql-out")
    args = ap.parse_args()

    documented = documented_metrics(args.docs)
    errors = []
    exprs = check_dashboard(args.dashboard, documented, errors)
    for r in args.rules:
        check_rules(r, documented, errors)
    if args.promql_out:
        import yaml

        rules = [{"record": f"dashboard:panel_{pid}_{ref}", "expr": grafana_to_promql(e)} for pid, ref, e in exprs]
        Path(args.promql_out).write_text(
            yaml.safe_dump({"groups": [{"name": "dashboard-expressions", "rules": rules}]}, sort_keys=False)
        )
    if errors:
        for e in errors:
            print(f"check_dashboard: {e}", file=sys.stderr)
        return 1
    print(f"check_dashboard: {len(exprs)} expressions, {len(documented)} documented metrics: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
