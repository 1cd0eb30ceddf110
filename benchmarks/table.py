"""The one row format every benchmark script returns, and the table that shows the rows.

A row compares one variant with a reference measured in the same run::

    {"bench": "Leffa step", "setting": "tiny, batch 4, 128x96", "variant": "+ Leffa",
     "value": 159.5, "unit": "ms", "mem_mib": 12.0,
     "vs": "baseline", "ratio": 1.09, "mem_ratio": 1.02}

``ratio`` is value / the reference's value (time: higher is slower; samples/s: higher is faster);
``mem_ratio`` the same for peak memory. A reference row has ``vs`` empty.
"""

from __future__ import annotations

import argparse
import json

COLUMNS = ("benchmark", "setting", "variant", "measured", "peak memory", "vs", "ratio", "memory ratio")


def row(bench: str, setting: str, variant: str, value: float, unit: str, mem_mib: float | None = None,
        vs: str = "", ratio: float | None = None, mem_ratio: float | None = None) -> dict:
    return dict(bench=bench, setting=setting, variant=variant, value=value, unit=unit, mem_mib=mem_mib,
                vs=vs, ratio=ratio, mem_ratio=mem_ratio)


def compared(rows: list[dict], reference: str) -> list[dict]:
    """Fill ``vs``/``ratio``/``mem_ratio`` of every row against the row whose variant is ``reference``."""
    ref = next(r for r in rows if r["variant"] == reference)
    for r in rows:
        if r is ref:
            continue
        r["vs"], r["ratio"] = reference, r["value"] / ref["value"]
        if r["mem_mib"] is not None and ref["mem_mib"]:
            r["mem_ratio"] = r["mem_mib"] / ref["mem_mib"]
    return rows


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        memory = "" if r["mem_mib"] is None else f"{r['mem_mib']:.1f} MiB"
        cells = (r["bench"], r["setting"], r["variant"], f"{r['value']:.1f} {r['unit']}", memory, r["vs"],
                 _ratio(r["ratio"]), _ratio(r["mem_ratio"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line (for run_all.py)")


def emit(rows: list[dict], as_json: bool) -> None:
    print(json.dumps(rows) if as_json else markdown(rows), flush=True)
