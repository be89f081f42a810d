"""Render docs/benchmarks.md's tables from the records in docs/records/, or check that they match.

    python bench/report.py            # rewrite every table between its markers
    python bench/report.py --check    # exit 1 naming each table that differs from its record

In the page, a table is the text between ``<!-- record: NAME -->`` and ``<!-- /record -->``; it is
rendered from ``docs/records/NAME.json`` with its machine, date and command above it. Record kinds:

- ``table``: columns, alignment and rows, with machine, date, command and where the figures came from.
- ``exports``: folders under docs/records/ each holding an export's manifest.json and bench.json as
  ``toolkit verify`` and ``toolkit bench`` wrote them; rendered as the model card's table of every
  target side by side (``toolkit.core.side_by_side``), one per export.
- ``openvino-int8``: the ``--json`` outputs of ``bench/openvino_int8.py``.
- ``serve-load``: the ``--json`` outputs of ``bench/serve_load.py`` (one per protocol and payload, for
  each version of the code), one row per client count.
- ``serve-profile``: the ``--json`` outputs of ``bench/serve_profile.py``, the stages side by side.
- ``train-profile``: the ``--json`` outputs of ``bench/train_profile.py``, the phases side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE = ROOT / "docs" / "benchmarks.md"
RECORDS = ROOT / "docs" / "records"
BLOCK = re.compile(r"<!-- record: ([a-z0-9][a-z0-9.-]*) -->\n(.*?)<!-- /record -->", re.S)


def _line(record: dict) -> str:
    return f"*Machine: {record['machine']}; date: {record['date']}; command: `{record['command']}`.*"


def _markdown_table(columns: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"a row has other than {len(columns)} cells")
    return ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if a == "right" else "---" for a in align) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _table(record: dict) -> list[str]:
    return [_line(record) + f" {record['source']}.", "", *_markdown_table(record["columns"], record["align"], record["rows"])]


def _exports(record: dict) -> list[str]:
    from toolkit.core import side_by_side
    from toolkit.core.manifest import Manifest

    lines = [f"*Command: `{record['command']}`.*"]
    for folder in record["exports"]:
        path = RECORDS / folder
        bench = json.loads((path / "bench.json").read_text())
        manifest = Manifest.load(path, verify_files=False)  # the record keeps the manifest, not the models
        v = manifest.parity
        lines += ["", f"**{manifest.name}** ({manifest.model}, {manifest.dataset}): reference {v.reference_acc:.2f}% on {v.images:,} test images. "
                  f"Verified on {v.machine}; benched on {bench['machine']}, {bench['date']}"
                  + (f" (busy: {bench['busy']})" if bench.get("busy") else ", quiet") + ".", "",
                  *side_by_side.markdown(manifest, bench)]
    return lines


def _openvino_int8(record: dict) -> list[str]:
    lines = [f"*Command: `{record['command']}`.*"]
    for name in record["reports"]:
        r = json.loads((RECORDS / name).read_text())
        rows = [[row["model"], f"{row['accuracy']:.2f}%", f"{row['delta_pp']:+.2f}", f"{row['agreement']:.2f}%",
                 f"{row['images_per_s_b1']:,.0f}", f"{row['images_per_s_b32']:,.0f}"] for row in r["rows"]]
        lines += ["", f"**{Path(r['export']).name}** on {r['machine']}; OpenVINO {r['openvino'].split('-')[0]}, NNCF {r['nncf']}; "
                  f"{r['images']:,} test images; images/s the median of {r['rounds']} interleaved rounds.", "",
                  *_markdown_table(["IR", "accuracy", "Δ pp vs fp32 IR", "agreement", "img/s b1", "img/s b32"],
                                   ["left"] + ["right"] * 5, rows)]
    return lines


def _serve_load(record: dict) -> list[str]:
    rows, machines = [], set()
    for run in record["runs"]:
        r = json.loads((RECORDS / run["file"]).read_text())
        machines.add(r["machine"])
        what = f"{'gRPC' if r['via'] == 'grpc' else 'HTTP'}, {'PNG files' if r['payload'] == 'png' else 'float tensors'}" + (
            ", demo running" if r["demo"] else "")
        for row in r["rows"]:
            rows.append([run["code"], what, str(row["clients"]), f"{row['requests_per_s']:,.0f}", f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.1f}",
                         f"{row['errors']}", f"{row['equal_to_in_process']:,} / {row['requests']:,}", f"{row['server_cpu_per_s']:.2f}"])
    return [f"*Machine: {'; '.join(sorted(machines))}; date: {record['date']}; command: `{record['command']}`.*", "",
            *_markdown_table(["code", "protocol, payload", "clients", "req/s", "p50 ms", "p99 ms", "errors", "equal to in-process",
                              "server CPU s/s"], ["left", "left"] + ["right"] * 7, rows)]


def _side_by_side(record: dict, key: str, name: str, value) -> list[str]:
    """Reports (``record["runs"]``: code and file) as columns, their ``key`` entries (by ``name``) as rows."""
    reports = [(run["code"], json.loads((RECORDS / run["file"]).read_text())) for run in record["runs"]]
    names = list(dict.fromkeys(e[name] for _, r in reports for e in r[key]))
    rows = [[n, *(value(r, n) for _, r in reports)] for n in names]
    machines = sorted({r["machine"] for _, r in reports})
    return [f"*Machine: {'; '.join(machines)}; date: {record['date']}; command: `{record['command']}`.*", "",
            *_markdown_table([record["first_column"], *(code for code, _ in reports)], ["left"] + ["right"] * len(reports), rows)]


def _serve_profile(record: dict) -> list[str]:
    def value(r, stage):
        found = next((s for s in r["stages"] if s["stage"] == stage), None)
        return f"{found['us_per_request']:.0f} µs ({found['share']:.0%})" if found else "—"

    lines = _side_by_side(record, "stages", "stage", value)
    reports = [json.loads((RECORDS / run["file"]).read_text()) for run in record["runs"]]
    return lines + ["| **server CPU per request** | " + " | ".join(f"**{r['us_per_request']:.0f} µs** at {r['load']['requests_per_s']:,.0f} req/s"
                                                                    for r in reports) + " |"]


def _train_profile(record: dict) -> list[str]:
    def value(r, phase):
        e = r["epoch"]
        return f"{e['phases'][phase]:.2f} s ({e['phases'][phase] / e['seconds']:.0%})" if phase in e["phases"] else "—"

    reports = [(run["code"], json.loads((RECORDS / run["file"]).read_text())) for run in record["runs"]]
    phases = list(dict.fromkeys(p for _, r in reports for p in r["epoch"]["phases"]))
    rows = [[p, *(value(r, p) for _, r in reports)] for p in phases]
    rows.append(["**epoch, train + evaluation**", *(f"**{r['epoch']['seconds']:.1f} s**" for _, r in reports)])
    rows.append(["threads, channels-last", *(f"{r['threads']}, {'yes' if r['channels_last'] else 'no'}" for _, r in reports)])
    rows.append(["training images/s", *(f"{r['epoch']['images'] / r['epoch']['train_seconds']:,.0f}" for _, r in reports)])
    if any("memory_kept" in r for _, r in reports):  # the CPU choices of #45, each undone by a flag
        rows.append(["dropout masks; freed memory; evaluation", *(
            f"{'torch' if r.get('torch_dropout') else 'PCG64'}; {'kept' if r.get('memory_kept') else 'returned'}; "
            f"{'whole batches' if r.get('eval_whole_batches') else 'chunks'}" for _, r in reports)])
        rows.append(["page faults per step; kernel CPU s", *(
            f"{r['epoch']['page_faults_per_step']:,.0f}; {r['epoch']['system_cpu_seconds']:.2f}" for _, r in reports)])
    if any(r.get("bf16") for _, r in reports):
        rows.append(["bf16 autocast", *("yes" if r.get("bf16") else "no" for _, r in reports)])
    if any(r.get("compile") or r.get("warmup_steps") for _, r in reports):
        rows.append(["torch.compile; warm-up steps (s) before", *(f"{r.get('compile') or 'no'}; {r.get('warmup_steps', 0)} "
                                                                    f"({r.get('warmup_seconds', 0):.1f} s)" for _, r in reports)])
    machines = sorted({r["machine"] for _, r in reports})
    lines = [f"*Machine: {'; '.join(machines)}; date: {record['date']}; command: `{record['command']}`.*", "",
             *_markdown_table(["phase", *(code for code, _ in reports)], ["left"] + ["right"] * len(reports), rows)]
    code, first = reports[0]
    ops = [[o["operator"], f"{o['calls']:,}", f"{o['self_ms_per_step']:.3f}", f"{o['share']:.1%}"] for o in first["operators"]]
    return lines + ["", f"Operators by self CPU time ({code}, torch.profiler):", "",
                    *_markdown_table(["operator", "calls", "ms per step", "share"], ["left", "right", "right", "right"], ops)]


KINDS = {"table": _table, "exports": _exports, "openvino-int8": _openvino_int8, "serve-load": _serve_load,
         "serve-profile": _serve_profile, "train-profile": _train_profile}


def render(name: str) -> str:
    """The text between the markers for record ``name``."""
    record = json.loads((RECORDS / f"{name}.json").read_text())
    return "\n".join(KINDS[record["kind"]](record)) + "\n"


def rendered(page: str) -> str:
    return BLOCK.sub(lambda m: f"<!-- record: {m.group(1)} -->\n{render(m.group(1))}<!-- /record -->", page)


def differing(page: str) -> list[str]:
    """The records whose table in ``page`` is not what they render to."""
    return [m.group(1) for m in BLOCK.finditer(page) if m.group(2) != render(m.group(1))]


def unrecorded_tables(page: str) -> list[str]:
    """Table lines of ``page`` outside every record block (figures typed by hand)."""
    outside = BLOCK.sub("", page)
    return [line for line in outside.splitlines() if line.startswith("|")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its record")
    args = parser.parse_args()
    page = PAGE.read_text()
    if args.check:
        bad = differing(page)
        typed = unrecorded_tables(page)
        for name in bad:
            print(f"docs/benchmarks.md: the table of record {name} differs from docs/records/{name}.json: run python bench/report.py")
        if typed:
            print(f"docs/benchmarks.md: {len(typed)} table lines outside any record block, e.g. {typed[0][:80]}")
        sys.exit(1 if bad or typed else 0)
    PAGE.write_text(rendered(page))
    print(f"rendered {len(BLOCK.findall(page))} tables into {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
