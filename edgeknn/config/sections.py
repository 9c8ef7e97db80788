"""The configuration's sections, one frozen dataclass per TOML table (``[model]``, ``[mqtt]``, ...).

Each field is a ``key()``: its default, its checker and a one-line description, so a section is
the one list of what its table accepts. The sections know nothing of files or of the install's
paths; the whole, ``Config``, and the loading live in the package (``edgeknn.config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeknn.config.checks import (
    _bool,
    _max_len,
    _mqtt_id,
    _pin_or_none,
    _pins,
    _str,
    _str_list,
    _threshold,
    integer,
    key,
    number,
)
from edgeknn.model.registry import MODELS
from edgeknn.store.head import RULES
from edgeknn.store.knn import STORAGES, StoreSettings


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
    storage: str = key(
        "auto",
        _str(("auto", *STORAGES)),
        'row storage; uint8 = 4x less memory; "auto" = uint8 for a quantized extractor, else float32',
    )
    autosave_s: float = key(5.0, number(0.0, 86400.0), "save this long after the last change; 0 = at once")
    max_classes: int = key(10, integer(1, 1000), "the most classes a store keeps (add_class refuses more)")
    background: list = key(
        ["background", "nothing"],
        _str_list,
        "classes answered as no class (unrecognized), as Teachable Machine's Background; any case",
    )

    def settings(self, embedding: str = "float32") -> StoreSettings:
        """What a KnnStore takes of this section (the one place that copies it); ``embedding``: the
        model's (``Embedder.storage``), which ``storage = "auto"`` follows."""
        return StoreSettings(
            k=self.k,
            rule=self.rule,
            threshold=None if self.threshold == "auto" else float(self.threshold),
            capacity=self.capacity,
            storage=self.storage,
            max_classes=self.max_classes,
            embedding=embedding,
        )


@dataclass(frozen=True)
class CameraConfig:
    source: str = key(
        "auto", _str(nonempty=True), "auto | picamera2[:N] | v4l2:/dev/videoN | v4l2:N | replay:PATH | demo"
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
        10.0,
        number(0.0, 86400.0),
        "publish the newest frame to <base>/snapshot this often (kept in memory, never written); "
        "0 = only on request",
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
class FleetConfig:
    publish: bool = key(
        False, _bool, "keep a retained pack of this device's examples on the broker for followers"
    )
    follow: str = key(
        "",
        _mqtt_id(r"[A-Za-z0-9_-]{1,48}", "a device id: 1..48 letters, digits, - or _"),
        "device id whose pack this device loads and follows; empty = none (teach it yourself)",
    )
    debounce_s: float = key(2.0, number(0.0, 3600.0), "publish a changed pack once changes pause this long")
    max_pack_mb: int = key(256, integer(1, 4096), "a followed pack larger than this is refused")
    # last: below this line the field's name would hide the key() helper
    key: str = key("", _max_len(4096), "shared secret: packs are signed (HMAC-SHA256) and checked with it")
