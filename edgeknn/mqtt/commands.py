"""The MQTT command table: what ``<base>/cmd/<name>`` accepts, and the core Command each request becomes.

Like Frigate's comms/dispatcher.py beside comms/mqtt.py, this knows nothing of the transport:
``parse_command`` turns a topic name and its payload bytes into a Command, or raises CommandError with
one line that starts with the field at fault. It never touches the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from edgeknn.commands import (
    MAX_EXAMPLES_PER_COMMAND,
    AddClass,
    AddExample,
    Command,
    DeleteExample,
    ForgetClass,
    ListExamples,
    RemoveClass,
    RenameClass,
    Reset,
    Result,
    Save,
    SelectClass,
    SetThreshold,
    Snapshot,
)
from edgeknn.config import MqttConfig, integer, number
from edgeknn.store.names import class_name_error

REQUIRED = object()  # a field's default: the request must give it

Check = Callable[[Any], str | None]


class CommandError(ValueError):
    """A refused request; the message is one line that starts with the field at fault."""


def _confirm(v: Any) -> str | None:
    return None if v is True else "expected true (reset forgets every example of every class)"


def _threshold(v: Any) -> str | None:
    """A threshold: a number -1..1, or "auto"/null for the one calibrated from the store."""
    if v is None or v == "auto" or number(-1, 1)(v) is None:
        return None
    return 'expected a number -1..1, or "auto" (or null) for the automatic one'


def _optional_class(v: Any) -> str | None:
    return None if v is None else class_name_error(v)


NEW_CLASS_COMMANDS = ("add_class",)  # their "class" must not exist yet; every other command's must


# name -> ({field: (check, default or REQUIRED)}, build(args, **common) -> Command)
COMMANDS: dict[str, tuple[dict[str, tuple[Check, Any]], Callable[..., Command]]] = {
    "add_example": (
        {"class": (class_name_error, REQUIRED), "count": (integer(1, MAX_EXAMPLES_PER_COMMAND), 1)},
        lambda a, **kw: AddExample(class_name=a["class"], count=a["count"], **kw),
    ),
    "forget_class": (
        {"class": (class_name_error, REQUIRED)},
        lambda a, **kw: ForgetClass(class_name=a["class"], **kw),
    ),
    "rename_class": (
        {"class": (class_name_error, REQUIRED), "new_name": (class_name_error, REQUIRED)},
        lambda a, **kw: RenameClass(class_name=a["class"], new_name=a["new_name"], **kw),
    ),
    "reset": ({"confirm": (_confirm, REQUIRED)}, lambda a, **kw: Reset(**kw)),
    "save": ({}, lambda a, **kw: Save(**kw)),
    "snapshot": ({}, lambda a, **kw: Snapshot(**kw)),
    "set_threshold": (
        {"value": (_threshold, REQUIRED)},
        lambda a, **kw: SetThreshold(value=None if a["value"] in (None, "auto") else float(a["value"]), **kw),
    ),
    "add_class": (
        {"class": (class_name_error, REQUIRED)},
        lambda a, **kw: AddClass(class_name=a["class"], **kw),
    ),
    "remove_class": (
        {"class": (class_name_error, REQUIRED)},
        lambda a, **kw: RemoveClass(class_name=a["class"], **kw),
    ),
    "delete_example": (
        {"example": (integer(0, None), REQUIRED)},
        lambda a, **kw: DeleteExample(example=a["example"], **kw),
    ),
    "list_examples": (
        {"class": (_optional_class, None)},
        lambda a, **kw: ListExamples(class_name=a["class"], **kw),
    ),
    "select_class": (
        {"class": (class_name_error, REQUIRED)},
        lambda a, **kw: SelectClass(class_name=a["class"], **kw),
    ),
}


def show(v: Any) -> str:
    """``v`` as JSON, cut to 40 characters: safe to quote in a one-line error or log message."""
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_kind(v: Any) -> str:
    return {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(v), "a number"
    )


def parse_command(
    name: str,
    payload: bytes | bytearray,
    *,
    classes: Sequence[str],
    config: MqttConfig,
    reply: Callable[[Result], None] | None = None,
) -> Command:
    """The Command for a request on ``cmd/<name>``, given the device's classes; CommandError if refused.

    ``config`` supplies the payload limit and ``allowed_commands``; ``reply`` is carried on the Command.
    """
    if len(payload) > config.max_payload:
        raise CommandError(f"payload: expected at most {config.max_payload} bytes, got {len(payload)}")
    if name not in COMMANDS:
        raise CommandError(f"command: unknown command {show(name)} (known: {', '.join(COMMANDS)})")
    if config.allowed_commands and name not in config.allowed_commands:
        raise CommandError(f"command: {show(name)} is not allowed (mqtt.allowed_commands)")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("payload: expected UTF-8 text") from None
    try:
        args = json.loads(text) if text.strip() else {}
    except ValueError as e:
        raise CommandError(
            f"payload: expected a JSON object, got invalid JSON ({getattr(e, 'msg', e)})"
        ) from None
    except RecursionError:
        raise CommandError("payload: expected a JSON object, got JSON nested too deeply") from None
    if not isinstance(args, dict):
        raise CommandError(f"payload: expected a JSON object, got {_json_kind(args)}")
    fields, build = COMMANDS[name]
    for key in args:
        if key not in fields:
            field = json.dumps(key)[1:-1][:32]
            raise CommandError(f"{field}: unknown field (known: {', '.join(fields) or 'none'})")
    values = {}
    for key, (check, default) in fields.items():
        if key not in args:
            if default is REQUIRED:
                raise CommandError(f"{key}: missing")
            values[key] = default
            continue
        problem = check(args[key])
        if problem:
            raise CommandError(f"{key}: {problem}, got {show(args[key])}")
        values[key] = args[key]
    known = list(classes)
    if values.get("class") is not None:
        if name in NEW_CLASS_COMMANDS:
            if values["class"] in known:
                raise CommandError(f"class: class {show(values['class'])} already exists")
        elif values["class"] not in known:
            raise CommandError(f"class: unknown class {show(values['class'])} (known: {', '.join(known)})")
    if "new_name" in values and values["new_name"] in known:
        raise CommandError(f"new_name: class {show(values['new_name'])} already exists")
    return build(values, source="mqtt", reply=reply)


def reply_topic(properties: Any, base_topic: str) -> str | None:
    """The request's MQTT 5 response topic, unless it is one of ours or a wildcard (never reply there)."""
    response = getattr(properties, "ResponseTopic", None)
    if response and (response.startswith(base_topic + "/") or "+" in response or "#" in response):
        return None
    return response or None


def result_body(name: str, result: Result) -> dict[str, Any]:
    """The JSON body of a reply: ``command``, ``ok``, ``error`` when refused, then the result's detail."""
    body: dict[str, Any] = {"command": name, "ok": result.ok}
    if not result.ok:
        body["error"] = result.error
    body.update({k: v for k, v in result.detail.items() if k not in (*body, "error", "seq", "ts")})
    return body
