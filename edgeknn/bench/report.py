"""The bench's results as an aligned text table, targets beside the measures that have one."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# name: (target, lower is better?)
TARGETS = {
    "invoke_ratio": (0.5, True),
    "pipeline_ratio": (0.95, False),
    "knn_us_1000": (100.0, True),
    "knn_us_10000": (300.0, True),
    "knn_us_100000": (1000.0, True),
    "knn_us_uint8_10000": (300.0, True),
    "knn_us_uint8_100000": (1000.0, True),
    "scan_agreement": (0.99, False),
    "scan_agreement_uint8": (0.99, False),
    "scan_unknown_agreement": (0.99, False),
    "scan_unknown_agreement_uint8": (0.99, False),
    "uint8_agreement": (0.99, False),
    "startup_s": (1.0, True),
    "rss_mb": (120.0, True),
}


def table(results: dict[str, Any], model: Path, frames: Path | None) -> str:
    """One header line, then one line per measure (a missed target is marked MISSED), then the two
    models side by side."""
    head = (
        f"edgeknn bench: {model.name}, {int(results['threads'])} interpreter threads, "
        f"{platform.machine()} with {os.cpu_count()} CPUs, frames from {frames or 'synthetic images'}"
    )
    lines = [head, f"{'measure':<26}{'value':>11}  target"]
    for key, value in results.items():
        if not isinstance(value, int | float):  # the names and the side-by-side table
            continue
        mark = ""
        if key in TARGETS:
            limit, lower = TARGETS[key]
            ok = value <= limit if lower else value >= limit
            mark = f"{'<=' if lower else '>='} {limit:g}{'' if ok else '  MISSED'}"
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        lines.append(f"{key:<26}{text:>11}  {mark}".rstrip())
    side = results.get("side_by_side") or {}
    if side:
        keys = list(next(iter(side.values())))
        lines += ["", f"{'side by side':<24}" + "".join(f"{k:>16}" for k in keys)]
        for name, values in side.items():
            lines.append(f"{name:<24}" + "".join(f"{values.get(k, float('nan')):>16.4g}" for k in keys))
    return "\n".join(lines)
