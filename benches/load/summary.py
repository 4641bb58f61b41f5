"""Summarises benches/load/run.sh output (JSON lines) as the Markdown tables of docs/benchmarks.md.

Absolute numbers are medians over the rounds. Ratios are computed within each round (both sides measured minutes
apart on the same server build and database) and the median of those per-round ratios is reported, so slow drift
of the shared machine cancels out of them.
"""

import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by = defaultdict(list)  # (label, op) -> [row per round, in order]
for r in rows:
    by[(r["label"], r["op"])].append(r)

labels = []
for r in rows:
    if r["label"] not in labels:
        labels.append(r["label"])


def med(label, op, key):
    vals = [r[key] for r in by[(label, op)] if key in r]
    return statistics.median(vals) if vals else None


def ratio(a, b, op):
    """Median over rounds of rps(a) / rps(b)."""
    xs, ys = by[(a, op)], by[(b, op)]
    rs = [x["rps"] / y["rps"] for x, y in zip(xs, ys) if y["rps"]]
    return statistics.median(rs) if rs else None


def fmt(x, spec="{:.0f}"):
    return "n/a" if x is None else spec.format(x)


for op in ("read", "create"):
    print(f"\n#### {op} ({'GET /fhir/Observation/{id}' if op == 'read' else 'POST /fhir/Observation'})\n")
    print("| configuration | req/s | p50 ms | p99 ms | errors | vs all safeguards | vs all off | vs raw PostgreSQL |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label in labels:
        if (label, op) not in by:
            continue
        errors = sum(r.get("errors", 0) for r in by[(label, op)])
        print(
            f"| {label} | {fmt(med(label, op, 'rps'))} | {fmt(med(label, op, 'p50_ms'), '{:.1f}')} "
            f"| {fmt(med(label, op, 'p99_ms'), '{:.1f}')} | {errors if label != 'raw-postgres' else '-'} "
            f"| {fmt(ratio(label, 'full', op), '{:.2f}')} | {fmt(ratio(label, 'all-off', op), '{:.2f}')} "
            f"| {fmt(ratio(label, 'raw-postgres', op), '{:.3f}')} |"
        )

print("\n#### what each safeguard costs (median of per-round ratios)\n")
print("| safeguard | read: on / off | read cost | create: on / off | create cost |")
print("| --- | ---: | ---: | ---: | ---: |")
for name, on, off in [
    ("field encryption", "full", "encryption-off"),
    ("access control", "full", "access-off"),
    ("audit (group commit / chain lock)", "full", "audit-off"),
    ("request telemetry (span, metric, log line)", "full", "telemetry-off"),
    ("OTLP export to a collector", "export-on", "full"),
    ("OTLP export, one trace in ten", "export-sampled", "full"),
    ("all four together", "full", "all-off"),
]:
    cells = []
    for op in ("read", "create"):
        r = ratio(on, off, op)
        cells += [fmt(r, "{:.3f}"), "n/a" if r is None else f"{(1 - r) * 100:.1f} %"]
    print(f"| {name} | " + " | ".join(cells) + " |")

print("\nper-round req/s (read, create):\n")
for label in labels:
    reads = [f"{r['rps']:.0f}" for r in by[(label, "read")]]
    creates = [f"{r['rps']:.0f}" for r in by[(label, "create")]]
    print(f"- {label}: read {', '.join(reads)}; create {', '.join(creates)}")
