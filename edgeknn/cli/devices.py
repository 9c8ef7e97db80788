"""`edgeknn devices`: the devices on a broker, read from their retained messages (state, availability, the
fleet's manifest and following), for a person looking after a fleet.

It listens for ``--wait`` seconds (retained messages arrive at once; the newest prediction is Home
Assistant's retained copy where discovery is on, else one published meanwhile) and prints one line per
device, or ``--json``. The topic tree comes from ``mqtt.base_topic`` with ``{device_id}`` as the
wildcard, so it lists the devices that share this config's pattern.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from edgeknn.cli.errors import UsageError
from edgeknn.cli.options import load_config, print_json

if TYPE_CHECKING:  # paho is imported when the command runs: `edgeknn run` with MQTT off never needs it
    import paho.mqtt.client as mqtt

SUFFIXES = ("state", "availability", "prediction", "fleet/manifest", "fleet/following", "fleet/online")
HA_PREDICTION = (
    "ha/+/prediction"  # Home Assistant's retained copy of the newest prediction (with discovery on)
)
MAX_BODY = 1 << 20  # a manifest of many chunks; anything bigger is not read


def devices(args) -> int:
    from edgeknn.mqtt.client import MqttError, make_client

    cfg = load_config(args)
    host, port = cfg.mqtt.host, cfg.mqtt.port
    if args.broker:
        host, _, given = args.broker.rpartition(":") if ":" in args.broker else (args.broker, "", "")
        if given and not given.isdigit():
            raise UsageError(f"--broker: expected HOST[:PORT], got {args.broker!r}")
        port = int(given) if given else port
    pattern = cfg.mqtt.base_topic
    if "{device_id}" not in pattern:
        raise UsageError(f"mqtt.base_topic {pattern!r} has no {{device_id}}: devices cannot be told apart")
    head, _, tail = pattern.partition("{device_id}")
    seen: dict[str, dict[str, Any]] = {}

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        rest = msg.topic[len(head) :]
        device, _, suffix = rest.partition(tail + "/" if tail else "/")
        if suffix.startswith("ha/") and suffix.endswith("/prediction"):
            suffix = "ha/prediction"
        if (suffix in SUFFIXES or suffix == "ha/prediction") and len(msg.payload) <= MAX_BODY:
            seen.setdefault(device, {})[suffix] = bytes(msg.payload)

    try:
        client = make_client(cfg.mqtt, client_id=f"edgeknn-devices-{int(time.time() * 1000) % 10**9}",
                             will_topic="edgeknn-devices/none")  # fmt: skip
    except MqttError as e:
        raise UsageError(str(e)) from None
    client.will_clear()
    client.on_message = on_message

    def on_connect(c: mqtt.Client, *args: Any) -> None:
        for suffix in (*SUFFIXES, HA_PREDICTION):
            c.subscribe(f"{head}+{tail}/{suffix}", qos=0)

    client.on_connect = on_connect
    try:
        client.connect(host, port, 10)
    except OSError as e:
        raise UsageError(f"--broker: cannot connect to {host}:{port} ({e.strerror or e})") from None
    client.loop_start()
    time.sleep(args.wait)
    client.loop_stop()
    client.disconnect()
    rows = [describe(device, topics) for device, topics in sorted(seen.items()) if "state" in topics]
    if args.json:
        for row in rows:
            print_json(row)
    else:
        print(table(rows) if rows else f"no devices on {host}:{port} under {head}+{tail}")
    return 0


def _json(data: bytes | None) -> dict:
    try:
        body = json.loads(data) if data else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def describe(device: str, topics: dict[str, bytes]) -> dict[str, Any]:
    """One device as the broker knows it."""
    state = _json(topics.get("state"))
    fleet: dict = state["fleet"] if isinstance(state.get("fleet"), dict) else {}
    prediction = _json(topics.get("prediction") or topics.get("ha/prediction"))
    manifest = _json(topics.get("fleet/manifest"))
    return {
        "device": device,
        "host": state.get("host", ""),
        "online": topics.get("availability") == b"online",
        "model": state.get("model_file", ""),
        "classes": list(state.get("classes") or {}),
        "examples": state.get("examples", 0),
        "following": fleet.get("following") or "",
        "followers": fleet.get("followers") or [],
        "pack": (manifest.get("sha256") or "")[:16] or fleet.get("pack") or "",
        "prediction": prediction.get("label", ""),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("device", "host", "online", "model", "classes", "examples", "following", "followers", "pack",
            "prediction")  # fmt: skip
    cells = [
        [
            str(r["device"]),
            str(r["host"]),
            "online" if r["online"] else "offline",
            str(r["model"]),
            ",".join(r["classes"]),
            str(r["examples"]),
            r["following"] or "-",
            ",".join(r["followers"]) or "-",
            r["pack"] or "-",
            r["prediction"] or "-",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in column) for column in zip(head, *cells, strict=True)]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [head, *cells]
    )
