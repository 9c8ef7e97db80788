"""Building the device from a config: the core (model, store) wired to the edges (camera, panel, MQTT).

``build`` gives a daemon ready to start; ``lifecycle.py`` runs, reloads and stops it, and
``daemon.py`` holds the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgeknn import __version__, config
from edgeknn.camera.capture import Capture
from edgeknn.camera.sources import SourceError
from edgeknn.camera.uri import check_source, source_opener
from edgeknn.commands import (
    AddClass,
    AddExample,
    Command,
    DeleteExample,
    ForgetClass,
    ImportExamples,
    RemoveClass,
    RenameClass,
    Reset,
)
from edgeknn.device.daemon import Daemon
from edgeknn.device.systemd import Notifier
from edgeknn.model import reembed
from edgeknn.model.classifier import ModelClasses, ScoreReader, SideHead, led_labels, open_model
from edgeknn.model.embedder import Embedder
from edgeknn.model.tflite import ModelError
from edgeknn.outputs import Output
from edgeknn.panel import PanelError
from edgeknn.panel.keyboard import KeyboardPanel
from edgeknn.store import file as storefile
from edgeknn.store import lock as storelock
from edgeknn.store import pictures as storepictures
from edgeknn.store.file import ModelMismatch, StoreError
from edgeknn.store.knn import KnnStore, adopt_center

if TYPE_CHECKING:
    from gpiozero.pins import Factory

    from edgeknn.mqtt.link import MqttLink
    from edgeknn.panel.gpio import GpioPanel, Submit

log = logging.getLogger(__name__)


class Fatal(Exception):
    """Something a person must fix; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = os.EX_CONFIG):
        super().__init__(message)
        self.code = code


def open_store(
    cfg: config.Config, embedder: Embedder, path: Path, notifier: Notifier | None = None
) -> KnnStore:
    """Take the store's lock for this process (``Daemon.shutdown`` gives it back) and load the store,
    or start empty. A damaged store is moved aside (never deleted or overwritten); a file that is not
    a store (a mistake in store.path: the config, the model) is left in place and refused. A store
    made with another model is re-embedded when every example keeps its picture, else refused."""
    _claim_store(path)
    try:
        return _load_store(cfg, embedder, path, notifier)
    except BaseException:
        storelock.release(path)
        raise


def _claim_store(path: Path) -> None:
    """One writer per store: a second device on it is Fatal (78), a command writing it briefly is 1."""
    with contextlib.suppress(OSError):  # a first start: the lock file goes where the store will
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        locked = storelock.claim(path, storelock.DAEMON)
    except storelock.StoreBusy as e:
        if e.who == storelock.DAEMON:
            raise Fatal(
                f"{path}: in use by another edgeknn run (pid {e.pid}); "
                "stop it or give this one another store.path"
            ) from None
        raise Fatal(f"{e}; start again when it has finished", 1) from None
    if not locked:
        log.warning("%s: cannot lock the store here; commands that write it cannot tell it is in use", path)


def _load_store(
    cfg: config.Config, embedder: Embedder, path: Path, notifier: Notifier | None = None
) -> KnnStore:
    settings = cfg.store.settings(embedder.storage)
    if not path.exists():
        log.info("no store at %s yet: starting empty", path)
        return KnnStore(embedder.dim, embedder.identity, settings)
    if path.is_dir():  # a mistake in store.path, not a damaged store: nothing to move aside
        raise Fatal(f"{path}: is a folder, not a store file; check store.path")
    try:
        store = KnnStore.load(path, embedder.identity, settings, embedder.dim)
    except ModelMismatch as e:
        return _reembed_at_start(cfg, embedder, path, e, notifier)
    except StoreError as e:
        if not e.corrupt:
            raise Fatal(str(e)) from None
        try:
            kind = storefile.foreign_kind(path)
        except OSError as read_error:
            raise Fatal(f"{e}; and cannot read it ({read_error.strerror})", 1) from None
        if kind is not None:
            raise Fatal(f"{path}: is {kind}, not an edgeknn store; left in place: check store.path") from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = path.with_name(f"{path.name}.broken-{stamp}"), 1
        while aside.exists():  # broken twice within a second: keep both
            aside, n = path.with_name(f"{path.name}.broken-{stamp}-{n}"), n + 1
        try:
            os.replace(path, aside)
        except OSError as move_error:
            raise Fatal(f"{e}; and cannot move it aside ({move_error.strerror})", 1) from None
        with contextlib.suppress(OSError):  # its pictures go with it (a new store would remove them)
            os.replace(storepictures.pictures_dir(path), storepictures.pictures_dir(aside))
        log.error("%s; moved it to %s and started empty", e, aside)
        return KnnStore(embedder.dim, embedder.identity, settings)
    log.info("loaded %d examples from %s", sum(store.counts().values()), path)
    return store


def _reembed_at_start(
    cfg: config.Config, embedder: Embedder, path: Path, mismatch: ModelMismatch, notifier: Notifier | None
) -> KnnStore:
    """The store at ``path`` (made with another model) re-embedded for ``embedder`` from its pictures
    and saved in its place; Fatal with the mismatch's line when an example has no picture."""
    try:
        old = KnnStore.load(path, mismatch.model_id, cfg.store.settings())
    except StoreError:
        raise Fatal(str(mismatch)) from None
    missing = reembed.without_pictures(old)
    if missing:
        raise Fatal(f"{mismatch} ({reembed.refusal(old, missing)})") from None

    def each(done: int, total: int) -> None:
        if notifier is not None:  # under systemd: more start-up time, and say how far it is
            notifier.notify(f"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=re-embedding examples: {done} of {total}")

    try:
        store = reembed.reembed(old, embedder, cfg.store.settings(embedder.storage), each)
        store.save(path)
    except reembed.ReembedError as e:
        raise Fatal(f"{mismatch} ({e})") from None
    except OSError as e:
        raise Fatal(f"{path}: cannot save the re-embedded store ({e.strerror or e})", 1) from None
    return store


def seed_classes(store: KnnStore, classes: list[str]) -> None:
    """A store without classes (a first start) takes the config's ``classes``, in slot order. After
    that the store is the truth: renaming, adding and removing classes (MQTT, the web page) are kept in
    it, and the config's list is not read again, so a renamed class never comes back under its old name."""
    if store.classes:
        if list(classes) != store.classes:
            log.info("classes: %s (the store's; config classes seed only a store without classes)",
                     ", ".join(store.classes))  # fmt: skip
        return
    for name in classes:
        store.ensure_class(name)


def open_panel(
    kind: str,
    classes: list[str],
    submit: Submit,
    settings: config.PanelConfig,
    pin_factory: Factory | None = None,
    fixed: bool = False,
) -> GpioPanel | KeyboardPanel | None:
    """The panel for ``kind`` ("gpio", "keyboard" or "none"); None when there is none. ``fixed``: the LEDs
    keep ``classes`` (a classifier model's led_labels) instead of following the store's."""
    if kind == "gpio":
        from edgeknn.panel.gpio import GpioPanel  # gpiozero only when there are pins to drive

        return GpioPanel(classes, submit, settings, pin_factory, fixed=fixed)
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
    daemon = build_core(cfg, opener=opener, notifier=notifier)
    try:
        attach_panel(daemon, pin_factory)
    except Fatal:
        close_unstarted(daemon)
        raise
    return daemon


def build_core(cfg: config.Config, *, opener=None, notifier: Notifier | None = None) -> Daemon:
    """Everything but the panel: model, store, camera and MQTT, none of them started, so that a reload
    builds them while the old daemon still holds the camera, the pins and the broker session."""
    try:  # the default model is there: run() and a reload first wait for it (await_model)
        embedder = open_model(
            cfg.model_path(),
            cfg.model.threads,
            cfg.model.kind,
            Path(cfg.model.labels) if cfg.model.labels else None,
        )
        if isinstance(embedder, ScoreReader):
            led_labels(cfg.panel.led_labels, embedder.labels, len(cfg.panel.leds))  # a label not in the model
        side = None
        if cfg.model.head:  # the extractor + head pair: the head's top-k beside the k-NN label
            if isinstance(embedder, ScoreReader):
                raise ModelError(f"model.head: only beside an embedder; {cfg.model_path()} is a classifier")
            labels = Path(cfg.model.labels) if cfg.model.labels else None
            side = SideHead(embedder, Path(cfg.model.head), labels, cfg.mqtt.top_k, cfg.model.threads)
    except ModelError as e:
        raise Fatal(str(e)) from None
    if opener is None:  # before the store: a source a person must fix is said at once, and nothing is held
        try:
            opener = source_opener(cfg.camera.source, embedder.model.input_size, cfg.camera.fps)
            check_source(cfg.camera.source)
        except (ValueError, SourceError) as e:
            raise Fatal(f"camera.source: {e}") from None
    store_path = cfg.store_path()
    if isinstance(embedder, ScoreReader):  # a classifier model: its labels are the classes, no store file
        store: KnnStore = ModelClasses(
            embedder.labels, embedder.identity, cfg.mqtt.top_k, cfg.model.min_confidence
        )
    else:
        store = open_store(cfg, embedder, store_path, notifier)
        seed_classes(store, cfg.classes)
    try:
        daemon = Daemon(
            cfg, embedder, store, Capture(opener, prepare=embedder.model.prepare), store_path, notifier, side
        )
    except BaseException:  # the daemon's shutdown gives the store's lock back; without a daemon, here
        storelock.release(store_path)
        raise
    if cfg.mqtt.enabled:
        try:
            link = mqtt_link(cfg, list(store.classes), daemon.submit)
        except Fatal:
            close_unstarted(daemon)
            raise
        daemon.outputs.append(link)
        daemon.broker_status = lambda: link.status
        daemon.snapshots.publish = link.publish_image  # snapshots also go to <base>/snapshot
    if cfg.fleet.publish or cfg.fleet.follow:
        try:
            daemon.outputs.append(fleet_output(cfg, daemon))
        except Fatal:
            close_unstarted(daemon)
            raise
    if cfg.web.enabled:  # aiohttp is imported only when the page is on
        from edgeknn.web.server import WebError, web_output

        try:
            daemon.outputs.append(web_output(cfg.web, cfg.resolved_state_dir(), daemon))
        except WebError as e:
            close_unstarted(daemon)
            raise Fatal(str(e)) from None
    return daemon


def fleet_output(cfg: config.Config, daemon: Daemon) -> Output:
    """The fleet's output: a leader that publishes this device's pack, or a follower that loads another's
    (``[fleet]``); a follower's daemon refuses teaching, naming its leader."""
    from edgeknn.fleet.client import FleetClient
    from edgeknn.fleet.follower import Follower
    from edgeknn.fleet.leader import Leader
    from edgeknn.mqtt.client import MqttError

    if isinstance(daemon.store, ModelClasses):
        raise Fatal("fleet: a classifier model has its own labels: there is no pack to publish or follow")
    device, fleet = cfg.resolved_device_id(), cfg.fleet
    folder = cfg.resolved_state_dir()
    try:
        client = FleetClient(
            cfg.mqtt, client_id=cfg.mqtt.client_id or f"edgeknn-{device}", base=cfg.resolved_base_topic()
        )
    except MqttError as e:
        raise Fatal(str(e)) from None
    if fleet.publish:
        leader = Leader(
            client, daemon.submit, device=device, key=fleet.key, debounce_s=fleet.debounce_s, folder=folder
        )
        daemon.fleet_status = leader.status
        return leader
    model_path = daemon.embedder.model.path
    follower = Follower(
        client,
        daemon.submit,
        leader=fleet.follow,
        leader_base=cfg.mqtt.base_topic.replace("{device_id}", fleet.follow),
        key=fleet.key,
        max_bytes=fleet.max_pack_mb << 20,
        model_id=daemon.store.model_id,
        dim=daemon.store.dim,
        embedder=lambda: Embedder(model_path, threads=1),
        folder=folder,
        # the live store's storage ("auto" resolved): the pack's rows are gathered as it keeps them
        settings=dataclasses.replace(cfg.store.settings(), storage=daemon.store.storage),
        when_saved=daemon.saver.when_saved,
        adopt_center=functools.partial(adopt_center, daemon.store),
    )
    teaching = (
        AddExample,
        ForgetClass,
        RenameClass,
        AddClass,
        RemoveClass,
        DeleteExample,
        Reset,
        ImportExamples,
    )
    daemon.route(teaching, follower.teaching(daemon.teacher.import_examples))
    daemon.fleet_status = follower.status
    return follower


def attach_panel(daemon: Daemon, pin_factory=None) -> None:
    """Open the config's panel (it claims GPIO pins) and make it the daemon's first output."""
    cfg = daemon.cfg
    try:
        classes, fixed = list(daemon.store.classes), isinstance(daemon.store, ModelClasses)
        if fixed:  # a classifier model: LED i lights for led_labels[i]; buttons only refuse
            classes = led_labels(cfg.panel.led_labels, classes, len(cfg.panel.leds))
        panel = open_panel(cfg.panel.kind, classes, daemon.submit, cfg.panel, pin_factory, fixed)
    except (PanelError, ModelError) as e:
        raise Fatal(str(e)) from None
    if panel is not None:
        daemon.outputs.insert(0, panel)


def close_unstarted(daemon: Daemon) -> None:
    """Release what a daemon that was built but never run holds (its inference thread, its outputs)."""
    daemon.shutdown(stopping=False)  # nothing to save: it was never taught


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
    web = getattr(args, "web", None)
    if web:
        overrides["web.enabled"] = web != "none"
        if web != "none":
            host, _, port = web.rpartition(":")
            overrides["web.port"] = int(port) if port.isdigit() else port  # not a number: config says so
            if host:
                overrides["web.listen"] = host.strip("[]")
    return config.replace(cfg, **overrides) if overrides else cfg


def mqtt_link(cfg: config.Config, classes: list[str], submit: Callable[[Command], None]) -> MqttLink:
    """The MQTT output for this config (not yet started; ``online`` waits for its first state); a bad
    MQTT setting is Fatal."""
    from edgeknn.mqtt.client import MqttError
    from edgeknn.mqtt.homeassistant import Page
    from edgeknn.mqtt.link import MqttLink

    page = None  # the device page's "Visit" link in Home Assistant: the web page, when it is on
    if cfg.web.enabled:
        listen = cfg.web.listen if cfg.web.listen not in ("", "0.0.0.0", "::") else ""
        page = Page("https" if cfg.web.tls_cert else "http", cfg.web.port, listen)
    try:
        return MqttLink(
            cfg.mqtt,
            base_topic=cfg.resolved_base_topic(),
            device_id=cfg.resolved_device_id(),
            classes=classes,
            submit=submit,
            version=__version__,
            wait_for_state=True,  # online only after the first state (the loop's, or the wait's)
            page=page,
        )
    except MqttError as e:
        raise Fatal(str(e)) from None
