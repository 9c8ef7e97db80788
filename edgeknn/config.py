"""Typed configuration loaded from TOML.

Every section is a frozen dataclass; every field says what it accepts in its metadata. Loading
collects *all* problems, each naming the key path (``mqtt.port: expected an integer 1..65535,
got "abc"``), so a person fixes a config file in one pass. Unknown keys are errors: a typo must
not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeknn.model.registry import MODELS, NamedModel
from edgeknn.store.head import RULES
from edgeknn.store.knn import STORAGES, StoreSettings
from edgeknn.store.names import CLASS_NAME_HELP, class_name_error

DEFAULT_CONFIG_PATH = Path("/etc/edgeknn/edgeknn.toml")
MACHINE_ID = Path("/etc/machine-id")  # systemd's per-installation id: the default device id hashes it


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[Any], str | None]:
    """A check for an integer in lo..hi (true/false are not integers); MQTT commands use it too."""

    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return _expect_int(lo, hi)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            return _expect_int(lo, hi)
        return None

    return check


def _expect_int(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"expected an integer {lo}..{hi}"
    if lo is not None:
        return f"expected an integer >= {lo}"
    return "expected an integer"


def number(lo: float | None = None, hi: float | None = None) -> Callable[[Any], str | None]:
    """A check for a number in lo..hi, not NaN (true/false are not numbers); MQTT commands use it too."""

    def check(v: Any) -> str | None:
        text = "expected a number" + (
            f" {lo}..{hi}" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        )
        if isinstance(v, bool) or not isinstance(v, int | float):
            return text
        if v != v or (lo is not None and v < lo) or (hi is not None and v > hi):  # v != v: NaN
            return text
        return None

    return check


def _threshold(v: Any) -> str | None:
    """store.threshold: "auto" (calibrated from the store) or a number -1..1."""
    return None if v == "auto" or not number(-1.0, 1.0)(v) else 'expected a number -1.0..1.0 or "auto"'


def _str(choices: tuple[str, ...] | None = None, nonempty: bool = False):
    def check(v: Any) -> str | None:
        if choices is not None and v not in choices:
            return "expected one of " + ", ".join(f'"{c}"' for c in choices)
        if not isinstance(v, str):
            return "expected a string"
        if nonempty and not v:
            return "expected a non-empty string"
        return None

    return check


def _mqtt_id(pattern: str, help: str) -> Callable[[Any], str | None]:
    """A check for an MQTT name: empty (the default) or ``pattern`` (no wildcard, slash or NUL)."""

    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return "expected a string"
        return None if not v or re.fullmatch(pattern, v) else f"expected {help}"

    return check


def _max_len(limit: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str):
            return "expected a string"
        return None if len(v.encode("utf-8")) <= limit else f"expected at most {limit} bytes"

    return check


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def _pins(v: Any) -> str | None:
    """GPIO pins: BCM numbers (17) or gpiozero pin names ("GPIO17", "BOARD11")."""
    ok = isinstance(v, list) and all(
        (isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 53) or (isinstance(p, str) and p)
        for p in v
    )
    return None if ok else 'expected a list of GPIO pins (BCM numbers 0..53 or names like "GPIO17")'


def _pin_or_none(v: Any) -> str | None:
    if v == "" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 53) or isinstance(v, str):
        return None
    return 'expected a GPIO pin (BCM number 0..53, a name like "GPIO17", or "" for none)'


def _class_names(v: Any) -> str | None:
    if not isinstance(v, list) or not v or len(v) > 32:
        return "expected a list of 1..32 class names"
    for name in v:
        if class_name_error(name):
            return f"expected class names of {CLASS_NAME_HELP}, not {json.dumps(name)}"
    if len(set(v)) != len(v):
        return "expected distinct class names"
    return None


def _str_list(v: Any) -> str | None:
    return (
        None if isinstance(v, list) and all(isinstance(s, str) for s in v) else "expected a list of strings"
    )


def key(default: Any, check, doc: str = ""):
    """A config field: its default, its validator and a one-line description."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    name: str = key(
        "",
        _str(("", *MODELS)),
        "a named model (edgeknn model list); empty = the store's model, else the default",
    )
    path: str = key("", _str(), "a TFLite model file; wins over name")
    threads: int = key(0, integer(0, 64), "interpreter threads; 0 = one per CPU core")
    kind: str = key(
        "auto",
        _str(("auto", "embedder", "classifier")),
        "auto: a small-softmax model with labels is a classifier (its own labels), else an embedder (k-NN)",
    )
    labels: str = key("", _str(), "a classifier's labels file; empty = its metadata or labels.txt beside it")
    head: str = key(
        "", _str(), "a head model fed with the embedder's output: its top-k beside the k-NN label"
    )
    min_confidence: float = key(
        0.0, number(0.0, 1.0), "a classifier's top-1 below this is the unknown answer"
    )


@dataclass(frozen=True)
class StoreConfig:
    path: str = key("", _str(), "the example store (.npz); empty = <state_dir>/store.npz")
    k: int = key(3, integer(1, 100), "neighbours that vote")
    rule: str = key(
        "default",
        _str(("default", *RULES)),
        'classification rule: "default" or one of `edgeknn eval --help`',
    )
    threshold: float | str = key(
        "auto",
        _threshold,
        'below this similarity to the nearest example the answer is unrecognized; "auto" = calibrated',
    )
    capacity: int = key(1000, integer(1, 1_000_000), "examples kept per class; the oldest goes first")
    storage: str = key("float32", _str(STORAGES), "row storage; uint8 = 4x less memory")
    autosave_s: float = key(5.0, number(0.0, 86400.0), "save this long after the last change; 0 = at once")
    max_classes: int = key(10, integer(1, 1000), "the most classes a store keeps (add_class refuses more)")

    def settings(self) -> StoreSettings:
        """What a KnnStore takes of this section (the one place that copies it)."""
        return StoreSettings(
            k=self.k,
            rule=self.rule,
            threshold=None if self.threshold == "auto" else float(self.threshold),
            capacity=self.capacity,
            storage=self.storage,
            max_classes=self.max_classes,
        )


@dataclass(frozen=True)
class CameraConfig:
    source: str = key(
        "auto", _str(nonempty=True), "auto | picamera2[:N] | v4l2:/dev/videoN | v4l2:N | replay:PATH"
    )
    fps: float = key(30.0, number(0.1, 240.0), "frames per second asked of the camera")


@dataclass(frozen=True)
class StabilizerConfig:
    mode: str = key("consecutive", _str(("consecutive", "window")), "how a label becomes stable")
    frames: int = key(3, integer(1, 100), "consecutive frames, or the window length for a majority")


@dataclass(frozen=True)
class PanelConfig:
    kind: str = key("gpio", _str(("gpio", "keyboard", "none")), "buttons and LEDs: gpio, keyboard or none")
    buttons: list = key([17, 27, 22], _pins, "one button per class, in class order")
    leds: list = key([5, 6, 13], _pins, "one LED per class, in class order")
    clear_button: Any = key(26, _pin_or_none, 'the clear button; "" for none')
    status_led: Any = key(19, _pin_or_none, 'the status LED; "" for none')
    active_high: bool = key(False, _bool, "buttons: true if a press drives the pin high")
    pull_up: bool = key(True, _bool, "buttons: use the internal pull-up (button to GND)")
    hold_time: float = key(0.8, number(0.1, 10.0), "seconds held before hold-to-record starts")
    hold_rate: float = key(5.0, number(0.1, 30.0), "examples per second while a class button is held")
    led_labels: list = key(
        [], _str_list, "a classifier model: LED i lights for label i; empty = its labels if they fit"
    )

    def pin_count_errors(self, classes: int) -> list[str]:
        """A GPIO panel needs one button and one LED per class: one line per list that is short."""
        return [
            f"panel.{name}: expected one pin per class ({classes}), got {len(pins)}"
            for name, pins in (("buttons", self.buttons), ("leds", self.leds))
            if len(pins) < classes
        ]


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = key(True, _bool, "publish predictions and accept commands over MQTT")
    host: str = key("localhost", _str(nonempty=True), "broker host")
    port: int = key(1883, integer(1, 65535), "broker port")
    device_id: str = key(
        "",
        _mqtt_id(r"[A-Za-z0-9_-]{1,48}", "1..48 letters, digits, - or _"),
        "device id in topics; empty = <host name>-<6 hex digits of /etc/machine-id>",
    )
    base_topic: str = key("edgeknn/{device_id}", _str(nonempty=True), "topic prefix")
    client_id: str = key(
        "",
        _mqtt_id(r"[A-Za-z0-9_.:-]{1,64}", "1..64 letters, digits, -, _, . or :"),
        "MQTT client id; empty = edgeknn-<device_id>",
    )
    username: str = key("", _max_len(256), "broker user name")
    password: str = key("", _max_len(4096), "broker password (prefer password_file)")
    password_file: str = key("", _str(), "file whose first line is the password")
    tls: bool = key(False, _bool, "connect with TLS")
    ca_file: str = key("", _str(), "CA certificate for TLS; empty = system CAs")
    cert_file: str = key("", _str(), "client certificate for TLS")
    key_file: str = key("", _str(), "client key for TLS")
    keepalive: int = key(30, integer(5, 3600), "seconds between keepalive pings")
    qos: int = key(1, integer(0, 2), "QoS of predictions, state and events")
    publish: str = key(
        "change", _str(("change", "every_frame")), "publish predictions on change or every frame"
    )
    heartbeat_s: float = key(30.0, number(0.0, 86400.0), "re-publish the prediction this often; 0 = never")
    commands: bool = key(True, _bool, "accept commands on <base>/cmd/<name>")
    allowed_commands: list = key([], _str_list, "if non-empty, only these commands are accepted")
    max_payload: int = key(4096, integer(64, 1_000_000), "command payloads above this many bytes are refused")
    discovery: bool = key(True, _bool, "publish Home Assistant discovery")
    discovery_prefix: str = key("homeassistant", _str(nonempty=True), "Home Assistant discovery prefix")
    top_k: int = key(
        0, integer(0, 1001), "a classifier model's labels per prediction; 0 = all if < 100, else 3"
    )
    snapshot_interval_s: float = key(
        0.0, number(0.0, 86400.0), "publish a snapshot to <base>/snapshot this often; 0 = only on request"
    )


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = key(True, _bool, "serve the web page (live view, teaching, health)")
    listen: str = key("", _str(), 'address to listen on; "" = every address (IPv4 and IPv6)')
    port: int = key(8080, integer(1, 65535), "port of the web page")
    password: str = key("", _max_len(4096), "password of the page (prefer password_file)")
    password_file: str = key(
        "", _str(), "file whose first line is the password; neither set = generated, in <state_dir>"
    )
    tls_cert: str = key("", _str(), "certificate (PEM) to serve HTTPS; empty = plain HTTP")
    tls_key: str = key("", _str(), "private key (PEM) of tls_cert")


@dataclass(frozen=True)
class Config:
    classes: list = key(
        ["one", "two", "three"],
        _class_names,
        "the classes of a first start, in button order (then the store's)",
    )
    state_dir: str = key(
        "", _str(), "store and model folder; empty = $STATE_DIRECTORY or ~/.local/state/edgeknn"
    )
    log_level: str = key("info", _str(("debug", "info", "warning", "error")), "log level")
    model: ModelConfig = field(default_factory=ModelConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    stabilizer: StabilizerConfig = field(default_factory=StabilizerConfig)
    panel: PanelConfig = field(default_factory=PanelConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    web: WebConfig = field(default_factory=WebConfig)

    def resolved_state_dir(self) -> Path:
        """``state_dir``, else systemd's $STATE_DIRECTORY, else ~/.local/state/edgeknn."""
        if self.state_dir:
            return Path(self.state_dir)
        if os.environ.get("STATE_DIRECTORY"):
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        return Path.home() / ".local" / "state" / "edgeknn"

    def named_model(self, store: Path | None = None) -> NamedModel:
        """``model.name``; unset, the named model the store (``store``, else ``store_path()``) was
        made with, so that an install keeps its model when the default changes; else the default."""
        from edgeknn.model.registry import DEFAULT_NAME, by_sha256

        if self.model.name:
            return MODELS[self.model.name]
        from edgeknn.store.file import model_id_of

        return by_sha256(model_id_of(store or self.store_path())) or MODELS[DEFAULT_NAME]

    def default_model_path(self, store: Path | None = None) -> Path:
        """Where the named model lives: ``<state_dir>/models/<its file>``."""
        return self.resolved_state_dir() / "models" / self.named_model(store).file

    def model_path(self, store: Path | None = None) -> Path:
        """``model.path``, else the named model's file (``store``: the store it is for, when not
        the configured one)."""
        return Path(self.model.path) if self.model.path else self.default_model_path(store)

    def store_path(self) -> Path:
        return Path(self.store.path) if self.store.path else self.resolved_state_dir() / "store.npz"

    def resolved_device_id(self) -> str:
        return self.mqtt.device_id or default_device_id()

    def resolved_base_topic(self) -> str:
        return self.mqtt.base_topic.replace("{device_id}", self.resolved_device_id())


def default_device_id() -> str:
    """``<host name>-<6 hex digits>``, the digits hashed from /etc/machine-id (else the MAC address).

    Every Raspberry Pi OS image is called ``raspberrypi``: the host name alone would give two such
    devices one client id, and they would take each other's MQTT session for ever.
    """
    host = re.sub(r"[^A-Za-z0-9_-]", "-", os.uname().nodename.split(".")[0])[:40] or "edgeknn"
    try:
        with open(MACHINE_ID, "rb") as f:
            machine = f.read(256).strip()
    except OSError:
        machine = b""
    if not machine:
        machine = str(uuid.getnode()).encode()
    return f"{host}-{hashlib.sha256(machine).hexdigest()[:6]}"


def _describe(v: Any) -> str:
    if isinstance(v, str):
        text = json.dumps(v, ensure_ascii=False)  # quoted, and control characters escaped: one line
        return text if len(text) <= 80 else f'{text[:60]}..." ({len(v)} characters)'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "a list" if len(repr(v)) > 40 else repr(v)
    return repr(v)


def _build(cls: type, table: dict, prefix: str, errors: list[str]) -> Any:
    values: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in table.items():
        path = f"{prefix}{name}"
        f = fields.get(name)
        if f is None:
            errors.append(f"{path}: unknown key (known: {', '.join(fields)})")
            continue
        section = f.default_factory
        if isinstance(section, type) and dataclasses.is_dataclass(section):
            if not isinstance(value, dict):
                errors.append(f"{path}: expected a table [{path}], got {_describe(value)}")
                continue
            values[name] = _build(section, value, path + ".", errors)
            continue
        problem = f.metadata["check"](value)
        if problem:
            shown = "a value not shown here" if name == "password" else _describe(value)  # a secret
            errors.append(f"{path}: {problem}, got {shown}")
            continue
        values[name] = float(value) if f.type.startswith("float") and not isinstance(value, str) else value
    return cls(**values)


def from_dict(data: dict) -> Config:
    """Build a Config from parsed TOML; raise ConfigError listing every problem."""
    errors: list[str] = []
    config = _build(Config, data, "", errors)
    if not errors:
        errors.extend(_cross_check(config))
    if errors:
        raise ConfigError(errors)
    return config


def _cross_check(config: Config) -> list[str]:
    errors = []
    n = len(config.classes)
    if config.panel.kind == "gpio":
        errors.extend(config.panel.pin_count_errors(n))
        if len(config.panel.led_labels) > len(config.panel.leds):
            errors.append(
                f"panel.led_labels: expected at most one label per LED ({len(config.panel.leds)}), "
                f"got {len(config.panel.led_labels)}"
            )
    if n > config.store.max_classes:
        most = config.store.max_classes
        errors.append(f"classes: expected at most store.max_classes ({most}) names, got {n}")
    if config.mqtt.cert_file and not config.mqtt.key_file:
        errors.append("mqtt.key_file: expected a key file when mqtt.cert_file is set")
    if bool(config.web.tls_cert) != bool(config.web.tls_key):
        errors.append("web.tls_key: expected both web.tls_cert and web.tls_key, or neither")
    if "+" in config.mqtt.base_topic or "#" in config.mqtt.base_topic:
        errors.append(f'mqtt.base_topic: expected no MQTT wildcards (+, #), got "{config.mqtt.base_topic}"')
    return errors


def load(path: Path | None) -> Config:
    """Load a TOML file; ``None`` (or the default path missing) gives the defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file ({e.strerror})"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML ({e})"]) from None
    return from_dict(data)


def replace(config: Config, **overrides: Any) -> Config:
    """Return a copy with dotted overrides applied, e.g. ``{"camera.source": "replay:x"}``, validated."""
    data = to_dict(config)
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        table = data
        for p in parents:
            if not isinstance(table.get(p), dict):
                raise ConfigError([f"{dotted}: unknown key"])
            table = table[p]
        table[last] = value
    return from_dict(data)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
