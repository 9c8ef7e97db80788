"""Building the device from a config, running it, reloading it and stopping it.

``build`` wires the core (model, store) to the edges (camera, panel, MQTT); ``run`` is `edgeknn run`:
it waits for the model, builds, loops until SIGTERM/SIGINT and reloads on SIGHUP. The loop itself
lives in ``daemon.py``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gpiozero.pins import Factory

from edgeknn import __version__, config
from edgeknn.camera import source_opener
from edgeknn.capture import Capture
from edgeknn.commands import Command, Result
from edgeknn.daemon import Daemon
from edgeknn.keyboard import KeyboardPanel
from edgeknn.model import DEFAULT_MODEL_SHA256, DEFAULT_MODEL_URL, Embedder, ModelError
from edgeknn.panel import GpioPanel, PanelError, Submit
from edgeknn.service import Notifier, setup_logging
from edgeknn.store import KnnStore
from edgeknn.storefile import StoreError

if TYPE_CHECKING:
    from edgeknn.mqtt.link import MqttLink

log = logging.getLogger(__name__)


class Fatal(Exception):
    """Something a person must fix; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = os.EX_CONFIG):
        super().__init__(message)
        self.code = code


def open_store(cfg: config.Config, embedder: Embedder, path: Path) -> KnnStore:
    """Load the store, or start empty; a damaged file is moved aside (never deleted or overwritten)."""
    settings = cfg.store.settings()
    if not path.exists():
        log.info("no store at %s yet: starting empty", path)
        return KnnStore(embedder.dim, embedder.identity, settings)
    if path.is_dir():  # a mistake in store.path, not a damaged store: nothing to move aside
        raise Fatal(f"{path}: is a folder, not a store file; check store.path")
    try:
        store = KnnStore.load(path, embedder.identity, settings)
    except StoreError as e:
        if not e.corrupt:
            raise Fatal(str(e)) from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = path.with_name(f"{path.name}.broken-{stamp}"), 1
        while aside.exists():  # broken twice within a second: keep both
            aside, n = path.with_name(f"{path.name}.broken-{stamp}-{n}"), n + 1
        try:
            os.replace(path, aside)
        except OSError as move_error:
            raise Fatal(f"{e}; and cannot move it aside ({move_error.strerror})", 1) from None
        log.error("%s; moved it to %s and started empty", e, aside)
        return KnnStore(embedder.dim, embedder.identity, settings)
    log.info("loaded %d examples from %s", sum(store.counts().values()), path)
    return store


def open_panel(
    kind: str,
    classes: list[str],
    submit: Submit,
    settings: config.PanelConfig,
    pin_factory: Factory | None = None,
) -> GpioPanel | KeyboardPanel | None:
    """The panel for ``kind`` ("gpio", "keyboard" or "none"); None when there is none."""
    if kind == "gpio":
        return GpioPanel(classes, submit, settings, pin_factory)
    if kind == "keyboard":
        return KeyboardPanel(classes, submit)
    if kind == "none":
        return None
    raise PanelError(f'panel.kind: expected "gpio", "keyboard" or "none", got "{kind}"')


def build(
    cfg: config.Config,
    *,
    opener=None,
    pin_factory=None,
    notifier: Notifier | None = None,
) -> Daemon:
    """Wire the core and the edges from a config. ``opener``/``pin_factory`` let tests swap hardware."""
    try:  # the default model is there: run() and a reload first wait for it (await_model)
        embedder = Embedder(cfg.model_path(), cfg.model.threads)
    except ModelError as e:
        raise Fatal(str(e)) from None
    store_path = cfg.store_path()
    store = open_store(cfg, embedder, store_path)
    if opener is None:
        try:
            opener = source_opener(cfg.camera.source, embedder.model.input_size, cfg.camera.fps)
        except ValueError as e:
            raise Fatal(f"camera.source: {e}") from None
    capture = Capture(opener, prepare=embedder.model.prepare)
    daemon = Daemon(cfg, embedder, store, capture, store_path, notifier)
    try:
        panel = open_panel(cfg.panel.kind, list(cfg.classes), daemon.submit, cfg.panel, pin_factory)
    except PanelError as e:
        raise Fatal(str(e)) from None
    if panel is not None:
        daemon.outputs.append(panel)
    if cfg.mqtt.enabled:
        link = mqtt_link(cfg, list(store.classes), daemon.submit)
        daemon.outputs.append(link)
        daemon.broker_status = lambda: link.status
    return daemon


def config_from_args(args) -> config.Config:
    """The config file (or defaults) with the command line's overrides applied."""
    cfg = config.load(args.config)
    overrides: dict = {}
    if args.source:
        overrides["camera.source"] = args.source
    if args.panel:
        overrides["panel.kind"] = args.panel
    if args.model:
        overrides["model.path"] = str(Path(args.model).absolute())
    if args.store:
        overrides["store.path"] = str(Path(args.store).absolute())
    if args.mqtt:
        if args.mqtt == "none":
            overrides["mqtt.enabled"] = False
        else:
            host, _, port = args.mqtt.rpartition(":") if ":" in args.mqtt else (args.mqtt, "", "")
            overrides["mqtt.enabled"] = True
            overrides["mqtt.host"] = host
            if port:
                overrides["mqtt.port"] = int(port) if port.isdigit() else port
    if args.device_id:
        overrides["mqtt.device_id"] = args.device_id
    return config.replace(cfg, **overrides) if overrides else cfg


MODEL_RETRY_FIRST_S = 5.0  # no network at a first start: try the model's download again after 5 s,
MODEL_RETRY_MAX_S = 300.0  # doubling up to 5 minutes


def await_model(
    cfg: config.Config,
    notifier: Notifier,
    *,
    first_delay: float = MODEL_RETRY_FIRST_S,
    max_delay: float = MODEL_RETRY_MAX_S,
) -> bool:
    """Get the default model if it is missing; True once it is there, False on SIGTERM/SIGINT.

    No model yet (no network at a first start) is a transient fault, not a configuration one, so
    this never gives up: it downloads with backoff and takes the file a person copies into place.
    systemd hears READY at once with a "waiting for the model" status (a Type=notify start that never
    sends READY is killed after TimeoutStartSec), the watchdog is pinged meanwhile, MQTT (when
    configured) carries the same status, and SIGHUP (`systemctl reload`) tries again at once.
    """
    path = cfg.model_path()
    if cfg.model.path or path.exists():
        return True
    from edgeknn.download import wait_for_model  # urllib and ssl: only needed on a first start

    link = _waiting_link(cfg)
    started = time.monotonic()

    def report(message: str, level: int = logging.WARNING) -> None:
        log.log(level, "%s", message)
        notifier.status(message)
        if link is not None:
            link.state(
                {
                    "model": "",
                    "model_file": path.name,
                    "version": __version__,
                    "uptime_s": round(time.monotonic() - started, 1),
                    "fps": 0.0,
                    "inference_ms": 0.0,
                    "camera": "off",
                    "broker": link.status,
                    "error": message,
                }
            )

    stop, retry = threading.Event(), threading.Event()
    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: retry.set}
    previous = {sig: signal.signal(sig, lambda *_, act=act: act()) for sig, act in handlers.items()}
    try:
        notifier.ready(f"waiting for the model: downloading {DEFAULT_MODEL_URL} to {path}")
        report(f"no model at {path}: downloading {DEFAULT_MODEL_URL}", logging.INFO)
        return wait_for_model(
            path,
            DEFAULT_MODEL_URL,
            DEFAULT_MODEL_SHA256,
            stop=stop,
            retry=retry,
            report=report,
            tick=notifier.watchdog,
            first_delay=first_delay,
            max_delay=max_delay,
        )
    finally:
        if link is not None:
            link.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def mqtt_link(cfg: config.Config, classes: list[str], submit: Callable[[Command], None]) -> MqttLink:
    """The MQTT output for this config (not yet started); a bad MQTT setting is Fatal."""
    from edgeknn.mqtt.connection import MqttError
    from edgeknn.mqtt.link import MqttLink

    try:
        return MqttLink(
            cfg.mqtt,
            base_topic=cfg.resolved_base_topic(),
            device_id=cfg.resolved_device_id(),
            classes=classes,
            submit=submit,
            version=__version__,
        )
    except MqttError as e:
        raise Fatal(str(e)) from None


def _waiting_link(cfg: config.Config) -> MqttLink | None:
    """MQTT while the model is missing: the state says why; commands are refused until it is there."""
    if not cfg.mqtt.enabled:
        return None

    def refuse(command: Command) -> None:
        if command.reply is not None:
            command.reply(Result(False, "waiting for the model: try again once it is loaded"))

    link = mqtt_link(cfg, list(cfg.classes), refuse)
    link.start()
    return link


def run(args) -> int:
    """`edgeknn run`: build, start, loop until SIGTERM/SIGINT; SIGHUP reloads the configuration."""
    cfg = config_from_args(args)
    setup_logging(cfg.log_level)
    notifier = Notifier()
    try:
        if not await_model(cfg, notifier):
            notifier.stopping()
            notifier.close()
            log.info("stopped")
            return 0
        daemon = build(cfg, notifier=notifier)
    except Fatal as e:
        log.error("%s", e)
        return e.code
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())

    def request_reload(*_: object) -> None:
        reload.set()
        daemon.stop()

    signal.signal(signal.SIGHUP, request_reload)
    while True:
        start(daemon)
        notifier.ready(f"classifying with {daemon.embedder.model.path.name}")
        log.info(
            "running: %s, source %s, panel %s, mqtt %s, classes %s",
            daemon.embedder.model.path.name,
            daemon.cfg.camera.source,
            daemon.cfg.panel.kind,
            f"{cfg.mqtt.host}:{cfg.mqtt.port}" if cfg.mqtt.enabled else "off",
            ", ".join(f"{k}={v}" for k, v in daemon.store.counts().items()),
        )
        if not len(daemon.store):
            log.info("no examples yet: teach with the class buttons, `edgeknn teach` or MQTT cmd/add_example")
        daemon.loop()
        if not reload.is_set():
            break
        reload.clear()
        daemon = _reloaded(daemon, args, notifier)
    daemon.shutdown()
    notifier.close()
    log.info("stopped")
    return 0


def start(daemon: Daemon) -> None:
    daemon.capture.start()
    for output in daemon.outputs:
        output.start()


def _reloaded(daemon: Daemon, args, notifier: Notifier) -> Daemon:
    """SIGHUP: re-read the config; keep running the old one if the new one is invalid."""
    notifier.notify("RELOADING=1")
    try:
        cfg = config_from_args(args)
    except config.ConfigError as e:
        for line in e.errors:
            log.error("reload refused: %s", line)
        daemon._stop.clear()
        return daemon
    daemon.shutdown()
    setup_logging(cfg.log_level)
    try:
        if not await_model(cfg, notifier):
            raise SystemExit(0)
        new = build(cfg, notifier=notifier)
    except Fatal as e:
        log.error("reload failed: %s", e)
        raise SystemExit(e.code) from None
    log.info("configuration reloaded")
    return new
