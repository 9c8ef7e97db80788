"""`edgeknn demo`: the real device (``edgeknn run``'s build and lifecycle) on the package's own demo photos.

Nothing to download and nothing to install as root: the default model and the photos ship inside the
package (``edgeknn.assets``), the store lives in a user folder, the page is on localhost:8080 (the next
free port if that one is taken), the keyboard teaches when there is a terminal, and MQTT is on only
if a broker answers on localhost:1883, so a machine without one (or without any network) runs it too.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

from edgeknn import assets, config
from edgeknn.camera.uri import DEMO_FPS

log = logging.getLogger("edgeknn.demo")

DEMO_NAMES = {"1": "one", "2": "two", "5": "five"}  # the class each demo folder's hand sign shows
BROKER = ("localhost", 1883)
WEB_PORT = 8080
DEMO_SECONDS = 20 / DEMO_FPS  # each class folder holds 20 photos


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where the demo keeps its store and the page's password "
        "(default $XDG_STATE_HOME/edgeknn-demo, i.e. ~/.local/state/edgeknn-demo)",
    )
    p.add_argument(
        "--web",
        metavar="[HOST:]PORT|none",
        help=f'the web page\'s port (default {WEB_PORT}, else a free one), or "none" for no page',
    )
    p.add_argument(
        "--mqtt",
        metavar="HOST[:PORT]",
        help='MQTT broker (default: localhost:1883 if one answers there, else none), or "none"',
    )
    p.add_argument(
        "--panel",
        choices=("keyboard", "none"),
        help="teach by typing 1..3 + Enter (default: keyboard when run in a terminal)",
    )


def demo_config(args) -> config.Config:
    """The configuration of the demo: ``--config`` (if given) with the demo's source, classes, store,
    page and MQTT on top. Called again on SIGHUP, like ``run``'s."""
    base = config.load(args.config) if args.config else config.Config()
    state = args.state_dir or _state_dir()
    overrides: dict = {
        "state_dir": str(Path(state).absolute()),
        "classes": list(DEMO_NAMES.values()),
        "camera.source": "demo",
        "panel.kind": args.panel or ("keyboard" if sys.stdin.isatty() else "none"),
        "store.path": "",
        "model.path": "",
        "model.name": "",
    }
    overrides.update(_mqtt(args.mqtt, base))
    overrides.update(_web(args.web))
    return config.replace(base, **overrides)


def _state_dir() -> Path:
    """A user folder (kept between runs: what was taught stays), else a temporary one."""
    home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    folder = Path(home) / "edgeknn-demo"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        return Path(tempfile.gettempdir()) / f"edgeknn-demo-{os.getuid()}"


def _mqtt(option: str | None, base: config.Config) -> dict:
    if option == "none":
        return {"mqtt.enabled": False}
    if option:
        host, _, port = option.rpartition(":") if ":" in option else (option, "", "")
        found = {"mqtt.enabled": True, "mqtt.host": host}
        return found | ({"mqtt.port": int(port) if port.isdigit() else port} if port else {})
    device = f"{base.resolved_device_id()}-demo"[:48]  # beside a real device on this host, not over it
    if _answers(*BROKER):
        return {
            "mqtt.enabled": True,
            "mqtt.host": BROKER[0],
            "mqtt.port": BROKER[1],
            "mqtt.device_id": device,
        }
    return {"mqtt.enabled": False}


def _web(option: str | None) -> dict:
    if option == "none":
        return {"web.enabled": False}
    if option:
        host, _, port = option.rpartition(":")
        listen = {"web.listen": host.strip("[]")} if host else {}
        return {"web.enabled": True, "web.port": int(port) if port.isdigit() else port} | listen
    return {"web.enabled": True, "web.port": WEB_PORT if _free(WEB_PORT) else _free_port()}


def _answers(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection there (half a second at most: no broker is normal)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def demo(args) -> int:
    """Say what the demo shows and how to teach it, then run the device as ``edgeknn run`` does."""
    from edgeknn.device.lifecycle import run
    from edgeknn.device.systemd import setup_logging

    cfg = demo_config(args)
    if cfg.web.enabled and not args.web:  # a reload keeps the port (8080 is then ours, not free)
        args.web = f"{cfg.web.port}"
    setup_logging(cfg.log_level)
    log.info(
        "demo: the camera is the package's photos of hands showing %s fingers, %g s each in turn: "
        "the classes %s",
        ", ".join(assets.DEMO_CLASSES),
        DEMO_SECONDS,
        ", ".join(DEMO_NAMES.values()),
    )
    log.info("demo: store and password in %s", cfg.resolved_state_dir())
    if cfg.panel.kind == "keyboard":
        log.info("demo: teach by typing 1, 2 or 3 then Enter while that sign is shown (? lists the keys)")
    if not cfg.mqtt.enabled and not args.mqtt:
        log.info("demo: no MQTT broker answers on %s:%d: MQTT is off (start mosquitto to see it)", *BROKER)
    return run(args, demo_config)
