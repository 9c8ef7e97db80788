"""What a device shows while it waits for something before it can run (its model, at a first start
without network): MQTT's state and the web page say what it waits for, and every command is refused.

The page is served as soon as the wait begins, so the address the log gives (and the README's "open
:8080") shows the reason instead of nothing; it is closed before the real page takes the port over.
"""

from __future__ import annotations

import logging
import time

from edgeknn import __version__, config
from edgeknn.commands import Command, Result
from edgeknn.device.build import Fatal, mqtt_link
from edgeknn.outputs import Output

log = logging.getLogger(__name__)


class Waiting:
    """The outputs that stand in for the device during a wait: ``say`` publishes why, ``close`` ends them."""

    def __init__(self, cfg: config.Config, what: str, model_file: str):
        self.what = what  # "the model": the refusals name it
        self.model_file = model_file
        self.started = time.monotonic()
        self.outputs: list[Output] = []
        self.broker = (lambda: "disabled") if not cfg.mqtt.enabled else (lambda: "connecting")
        try:
            if cfg.mqtt.enabled:
                link = mqtt_link(cfg, list(cfg.classes), self.refuse)
                self.outputs.append(link)
                self.broker = lambda: link.status
            if cfg.web.enabled:
                self.outputs.append(self._page(cfg))
        except Fatal:
            self.close()
            raise
        for output in self.outputs:
            output.start()

    def _page(self, cfg: config.Config) -> Output:
        from edgeknn.web.server import WebError, WebOutput

        try:
            return WebOutput(
                cfg.web,
                cfg.resolved_state_dir(),
                self.refuse,
                lambda: None,  # no camera yet: the live view stays empty
                lambda _id: None,
                cfg.store_path(),
                teachable=False,
            )
        except WebError as e:
            raise Fatal(str(e)) from None

    def refuse(self, command: Command) -> None:
        if command.reply is not None:
            command.reply(Result(False, f"waiting for {self.what}: try again once it is loaded"))

    def say(self, message: str) -> None:
        """The state every output shows: nothing runs yet, and ``message`` says why."""
        state = {
            "model": "",
            "model_file": self.model_file,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "fps": 0.0,
            "inference_ms": 0.0,
            "camera": "off",
            "broker": self.broker(),
            "error": message,
            "classes": {},
            "examples": 0,
        }
        for output in self.outputs:
            output.state(state)

    def close(self) -> None:
        for output in self.outputs:
            try:
                output.close()
            except Exception:  # closing one must not keep the others (or the start) waiting
                log.exception("closing %s after the wait failed", type(output).__name__)
        self.outputs = []
