"""The bench's results as an aligned text table, targets beside the measures that have one."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# name: (target, lower is better?)
TARGETS = {
    "pipeline_ratio": (0.95, False),
    "knn_us_1000": (100.0, True),
    "knn_us_10000": (1500.0, True),
    "uint8_agreement": (0.99, False),
    "startup_s": (1.0, True),
    "rss_mb": (120.0, True),
}


def table(results: dict[str, float], model: Path, frames: Path | None) -> str:
    """One header line, then one line per measure; a missed target is marked MISSED."""
    head = (
        f"edgeknn bench: {model.name}, {int(results['threads'])} interpreter threads, "
        f"{platform.machine()} with {os.cpu_count()} CPUs, frames from {frames or 'synthetic images'}"
    )
    lines = [head, f"{'measure':<26}{'value':>11}  target"]
    for key, value in results.items():
        mark = ""
        if key in TARGETS:
            limit, lower = TARGETS[key]
            ok = value <= limit if lower else value >= limit
            mark = f"{'<=' if lower else '>='} {limit:g}{'' if ok else '  MISSED'}"
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        lines.append(f"{key:<26}{text:>11}  {mark}".rstrip())
    return "\n".join(lines)
