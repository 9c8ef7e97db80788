"""Running the device: `edgeknn run` waits for the model, builds, loops, reloads and stops.

The signal handlers only record a request; the loop returns between frames and ``run`` carries
it out: SIGTERM/SIGINT stop (saving first), SIGHUP reloads the configuration (refused, changing
nothing, when the new one is invalid, cannot be built or the store cannot be saved first).
Building lives in ``app.py``, the loop in ``daemon.py``.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import threading
from collections.abc import Callable
from typing import Any

from edgeknn import config
from edgeknn.device.build import (
    Fatal,
    attach_panel,
    build,
    build_core,
    close_unstarted,
    config_from_args,
)
from edgeknn.device.daemon import Daemon
from edgeknn.device.malloc import limit_arenas
from edgeknn.device.systemd import Notifier, setup_logging
from edgeknn.device.waiting import Waiting

log = logging.getLogger(__name__)


MODEL_RETRY_FIRST_S = 5.0  # no network at a first start: try the model's download again after 5 s,
MODEL_RETRY_MAX_S = 300.0  # doubling up to 5 minutes
OPEN_FILES = 65536  # the soft limit on descriptors raised toward the hard one, at most this (see below)


def raise_open_files(wanted: int = OPEN_FILES) -> int:
    """Raise the soft limit on open files toward the hard one (at most ``wanted``); return the soft limit.

    systemd gives a service a soft limit of 1 024 (and a hard one far above): a flood of connections
    to the page, pictures and the store then share 1 024 descriptors with the camera. The page bounds
    its own connections (``web.limits``); this is the margin for everything else. A seccomp filter or
    a container refusing it costs nothing (the unit sets ``LimitNOFILE=`` too).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            log.debug("cannot raise the open files limit from %d to %d: %s", soft, target, e)
    return soft


def await_model(
    cfg: config.Config,
    notifier: Notifier,
    *,
    first_delay: float = MODEL_RETRY_FIRST_S,
    max_delay: float = MODEL_RETRY_MAX_S,
) -> bool:
    """Get the named model (``Config.named_model``) if it is missing; True once it is there, False on SIGTERM.

    No model yet (no network at a first start) is a transient fault, not a configuration one, so
    this never gives up: it downloads with backoff and takes the file a person copies into place.
    systemd hears READY at once with a "waiting for the model" status (a Type=notify start that never
    sends READY is killed after TimeoutStartSec), the watchdog is pinged meanwhile, MQTT (when
    configured) carries the same status, the web page (when on) is served and says it too, and
    SIGHUP (`systemctl reload`) tries again at once.
    """
    path = cfg.model_path()
    if cfg.model.path or path.exists():
        return True
    from edgeknn.model.download import wait_for_model

    named = cfg.named_model()
    waiting = Waiting(cfg, "the model", path.name)

    def report(message: str, level: int = logging.WARNING) -> None:
        log.log(level, "%s", message)
        notifier.status(message)
        waiting.say(message)

    stop, retry = threading.Event(), threading.Event()
    handlers = {signal.SIGTERM: stop.set, signal.SIGINT: stop.set, signal.SIGHUP: retry.set}
    previous = {sig: signal.signal(sig, lambda *_, act=act: act()) for sig, act in handlers.items()}
    try:
        notifier.ready(f"waiting for the model: downloading {named.url} to {path}")
        report(f"no model at {path}: downloading {named.url}", logging.INFO)
        return wait_for_model(
            path,
            named.url,
            named.sha256,
            stop=stop,
            retry=retry,
            report=report,
            tick=notifier.watchdog,
            first_delay=first_delay,
            max_delay=max_delay,
        )
    finally:
        waiting.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class Requests:
    """What the signal handlers asked for. A handler only records the request and makes the current
    daemon's loop return; the loop thread then stops or reloads, between frames."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.daemon: Daemon | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def follow(self, daemon: Daemon) -> None:
        """Make ``daemon`` the one the signals reach, and let its loop run unless a request is pending."""
        self.daemon = daemon
        daemon.resume()
        if self.stop.is_set() or self.reload.is_set():
            daemon.stop()

    def _on_stop(self, *_: object) -> None:
        self.stop.set()
        if self.daemon is not None:
            self.daemon.stop()

    def _on_reload(self, *_: object) -> None:
        self.reload.set()
        if self.daemon is not None:
            self.daemon.stop()


def run(args, configure: Callable[[Any], config.Config] = config_from_args) -> int:
    """`edgeknn run`: build, start, loop until SIGTERM/SIGINT; SIGHUP reloads the configuration.

    ``configure`` makes the configuration from the arguments, at start and on every reload (`edgeknn
    demo` passes its own). Exits 1 when stopping with changes that could not be saved, so that systemd
    records a failure.
    """
    cfg = configure(args)
    setup_logging(cfg.log_level)
    raise_open_files()
    limit_arenas()
    notifier = Notifier()
    try:
        if not await_model(cfg, notifier):
            notifier.stopping()
            notifier.close()
            log.info("stopped")
            return 0
        daemon: Daemon | None = build(cfg, notifier=notifier)
    except Fatal as e:
        log.error("%s", e)
        return e.code
    assert daemon is not None
    requests = Requests()
    requests.install()
    requests.follow(daemon)
    start(daemon)
    _announce(daemon, notifier)
    while daemon is not None:
        daemon.loop()
        if requests.stop.is_set() or not requests.reload.is_set():
            break
        requests.reload.clear()
        try:
            daemon = _reloaded(daemon, args, notifier, requests, configure)
        except Fatal as e:
            log.error("%s", e)
            notifier.close()
            return e.code
        if daemon is not None:
            requests.follow(daemon)
        gc.collect()  # a replaced daemon's interpreter and store sit in reference cycles: free them now
    saved = daemon.shutdown() if daemon is not None else True
    notifier.close()
    if not saved:
        assert daemon is not None
        log.error("stopped with unsaved examples, now lost: %s", daemon.saver.reason)
        return 1
    if daemon is not None and daemon.capture.fatal:  # the loop said why; systemd will not restart it
        return os.EX_CONFIG
    log.info("stopped")
    return 0


def start(daemon: Daemon) -> None:
    daemon.capture.start()
    for output in daemon.outputs:
        output.start()


def _announce(daemon: Daemon, notifier: Notifier) -> None:
    """READY for systemd (again after a reload) and one line saying what runs."""
    cfg = daemon.cfg
    notifier.ready(f"classifying with {daemon.embedder.model.path.name}")
    log.info(
        "running: %s, source %s, panel %s, mqtt %s, classes %s",
        daemon.embedder.model.path.name,
        cfg.camera.source,
        cfg.panel.kind,
        f"{cfg.mqtt.host}:{cfg.mqtt.port}" if cfg.mqtt.enabled else "off",
        ", ".join(f"{k}={v}" for k, v in daemon.store.counts().items()),
    )
    if daemon.classifier:
        log.info(
            "a classifier model: its %d labels are the answers; teaching is refused",
            len(daemon.store.classes),
        )
    elif not len(daemon.store):
        log.info("no examples yet: teach with the class buttons, `edgeknn teach` or MQTT cmd/add_example")


def _reloaded(
    daemon: Daemon,
    args,
    notifier: Notifier,
    requests: Requests,
    configure: Callable[[Any], config.Config] = config_from_args,
) -> Daemon | None:
    """SIGHUP: the daemon for the re-read config, or the running one if the reload is refused.

    In order: read and check the file; save the running store (refused if that fails: nothing is
    lost); build the new model, store, camera and MQTT (refused if that fails); only then shut the
    running daemon down (it holds the camera, the pins and the broker session) and open the new panel.
    If that last step fails, the old config is built again from the store just saved. None: a
    SIGTERM came while waiting for the default model (the old daemon is shut down and saved).
    The watchdog is pinged from a thread meanwhile: building can outlast WatchdogSec on a loaded board.
    """
    notifier.notify("RELOADING=1")
    with notifier.pinging():
        return _reload(daemon, args, notifier, requests, configure)


def _reload(
    daemon: Daemon,
    args,
    notifier: Notifier,
    requests: Requests,
    configure: Callable[[Any], config.Config],
) -> Daemon | None:

    def refuse(reason: str) -> Daemon:
        log.error("reload refused, the running configuration is kept: %s", reason)
        _announce(daemon, notifier)
        return daemon

    try:
        cfg = configure(args)
    except config.ConfigError as e:
        return refuse("; ".join(e.errors))
    if not daemon.saver.flush():
        return refuse(daemon.saver.error)
    old_cfg = daemon.cfg
    if not (cfg.model.path or cfg.model_path().exists()):  # the default model is missing: wait for it
        daemon.shutdown(stopping=False)
        if not await_model(cfg, notifier):
            requests.stop.set()
            return None
        try:
            new = build(cfg, notifier=notifier)
        except Fatal as e:
            new, cfg = _restore(old_cfg, notifier, e), old_cfg
    else:
        try:
            new = build_core(cfg, notifier=notifier)
        except Fatal as e:
            return refuse(str(e))
        daemon.shutdown(stopping=False)
        try:
            attach_panel(new)
        except Fatal as e:
            close_unstarted(new)
            new, cfg = _restore(old_cfg, notifier, e), old_cfg
    if cfg is not old_cfg:
        log.info("configuration reloaded")
    setup_logging(cfg.log_level)
    start(new)
    _announce(new, notifier)
    return new


def _restore(cfg: config.Config, notifier: Notifier, error: Fatal) -> Daemon:
    """The previous configuration's daemon, built again (from the store file saved before the reload)
    after the new one failed once the old one was shut down; Fatal (exit 1) if that fails too."""
    log.error("reload failed: %s; starting the previous configuration again", error)
    try:
        return build(cfg, notifier=notifier)
    except Fatal as e:
        raise Fatal(f"the previous configuration cannot start again either: {e}", 1) from None
