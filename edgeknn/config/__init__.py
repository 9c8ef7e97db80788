"""Typed configuration loaded from TOML: ``load``, ``from_dict``, ``replace``, ``to_dict``, ``Config``.

Every section is a frozen dataclass (``sections``); every field says what it accepts in its
metadata (``checks``). Loading collects *all* problems, each naming the key path (``mqtt.port:
expected an integer 1..65535, got "abc"``), so a person fixes a config file in one pass. Unknown
keys are errors: a typo must not silently fall back to a default.

This module owns the whole: ``Config`` (the sections together, and the install's paths and device
id they resolve to), loading and validating it, and the names the rest of edgeknn imports
(``from edgeknn.config import MqttConfig``), re-exported here. ``Config`` and
``default_device_id`` stay here beside ``DEFAULT_CONFIG_PATH`` and ``MACHINE_ID``, the paths they
read, so that ``config.MACHINE_ID`` and ``config.DEFAULT_CONFIG_PATH`` remain the ones in use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeknn import smallfiles
from edgeknn.config.checks import _class_names, _str, integer, key, number
from edgeknn.config.sections import (
    CameraConfig,
    FleetConfig,
    ModelConfig,
    MqttConfig,
    PanelConfig,
    StabilizerConfig,
    StoreConfig,
    WebConfig,
)
from edgeknn.model.registry import MODELS, NamedModel
from edgeknn.smallfiles import read_small

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MACHINE_ID",
    "CameraConfig",
    "Config",
    "ConfigError",
    "ModelConfig",
    "MqttConfig",
    "PanelConfig",
    "StabilizerConfig",
    "StoreConfig",
    "FleetConfig",
    "WebConfig",
    "default_device_id",
    "from_dict",
    "integer",
    "key",
    "load",
    "number",
    "replace",
    "to_dict",
]

DEFAULT_CONFIG_PATH = Path("/etc/edgeknn/edgeknn.toml")
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB: a larger file is not one (nor is a FIFO)
MACHINE_ID = Path("/etc/machine-id")  # systemd's per-installation id: the default device id hashes it


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


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
    fleet: FleetConfig = field(default_factory=FleetConfig)

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
        """Where the named model lives: ``<state_dir>/models/<its file>``, else the package's own copy
        (the default model ships inside the package: nothing to download); else that state-dir path,
        where the download puts it."""
        from edgeknn.model.registry import packaged

        named = self.named_model(store)
        path = self.resolved_state_dir() / "models" / named.file
        return path if path.exists() else packaged(named) or path

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
    fleet = config.fleet
    if (fleet.publish or fleet.follow) and not config.mqtt.enabled:
        errors.append("fleet: expected mqtt.enabled = true (a fleet shares its packs through the broker)")
    if fleet.follow and fleet.follow == config.resolved_device_id():
        errors.append(
            f"fleet.follow: expected another device's id, got this device's own (\"{fleet.follow}\")"
        )
    if fleet.follow and fleet.publish:
        errors.append("fleet.publish: a follower does not publish a pack of its own (its leader does)")
    return errors


def load(path: Path | None) -> Config:
    """Load a TOML file; ``None`` (or the default path missing) gives the defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        data = tomllib.loads(read_small(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config file ({smallfiles.reason(e)})"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte {e.start})"]) from None
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
