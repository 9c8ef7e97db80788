"""What `edgeknn run` holds in memory on a small board (issue 20): no module it does not use, two
malloc arenas. The resident size itself is measured, not tested: ``scripts/measure_memory.py``."""

from __future__ import annotations

import os
import subprocess
import sys

from edgeknn.device import malloc


def imported_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return set(out.split())


def test_the_device_imports_gpiozero_and_paho_only_when_it_uses_them():
    modules = imported_by("import edgeknn.cli.main, edgeknn.device.lifecycle, edgeknn.device.build")
    assert "edgeknn.device.build" in modules
    assert "gpiozero" not in modules and "edgeknn.panel.gpio" not in modules
    assert "paho" not in modules, (
        "paho (and its dnspython) only for MQTT: `edgeknn devices` imports it when run"
    )
    from edgeknn.panel import PanelError
    from edgeknn.panel.gpio import PanelError as same

    assert same is PanelError, "one error for every panel"


def test_malloc_arenas_are_limited_unless_the_environment_says():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    code = "from edgeknn.device.malloc import limit_arenas; print(limit_arenas())"
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(bool(glibc))
    env["MALLOC_ARENA_MAX"] = "4"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "the environment's setting wins"
    assert malloc.ARENAS == 2
