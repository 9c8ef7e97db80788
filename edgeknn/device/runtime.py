"""Settings a command changed, kept across restarts in ``<state_dir>/runtime.json``.

The threshold (``set_threshold``) and the Home Assistant training class (``select_class``) are
what a person sets on a running device and expects to find again after a restart. Each entry
records the config's own value for that setting when the command set it: a value set by a command
wins over the config's until the config's value is edited, and then the config's wins again (the
person edited the file to change exactly that).

The file is small JSON written atomically (temporary file, fsync, rename). A damaged or unreadable
file costs one log line and the config's values, never the start.

``SettingCommands`` runs the commands that set these (on the loop's thread, like every command).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeknn import smallfiles
from edgeknn.commands import RemoveClass, RenameClass, Result, SelectClass, SetThreshold
from edgeknn.smallfiles import read_small

if TYPE_CHECKING:
    from edgeknn.config import Config
    from edgeknn.store.knn import KnnStore

log = logging.getLogger(__name__)

FILE_NAME = "runtime.json"
KEYS = ("threshold", "training_class")
MAX_BYTES = 64 * 1024  # two settings take ~100 bytes: a larger file is not ours (a FIFO is refused too)
_MISSING = object()


class RuntimeSettings:
    """The persisted runtime settings of one state folder.

    ``config`` maps each key to the config's current value for it (None where the config has none):
    an entry set while the config said something else is dropped at load.
    """

    def __init__(self, path: Path, config: dict[str, Any] | None = None):
        self.path = Path(path)
        self._config = dict(config or {})
        self._entries: dict[str, dict[str, Any]] = {}

    @classmethod
    def load(cls, state_dir: Path, config: dict[str, Any] | None = None) -> RuntimeSettings:
        """The settings kept in ``state_dir`` (none if there is no file, or it is damaged)."""
        settings = cls(Path(state_dir) / FILE_NAME, config)
        try:
            data = json.loads(read_small(settings.path, MAX_BYTES).decode("utf-8"))
        except FileNotFoundError:
            return settings
        except (OSError, ValueError) as e:
            log.warning("%s: cannot read it (%s); using the config's values", settings.path, _reason(e))
            return settings
        if not isinstance(data, dict):
            log.warning("%s: expected a JSON object; using the config's values", settings.path)
            return settings
        ignored, edited = [], []
        for key, entry in data.items():
            if not isinstance(entry, dict) or not _valid(key, entry.get("value", _MISSING)):
                ignored.append(json.dumps(key)[:40])
            elif entry.get("config") != settings._config.get(key):
                edited.append(key)
            else:
                settings._entries[key] = {"value": entry["value"], "config": entry.get("config")}
        if ignored:
            log.warning("%s: ignored %s (not a valid runtime setting)", settings.path, ", ".join(ignored))
        if edited:
            log.info("%s: the config's %s edited since a command set it: the config's value applies",
                     settings.path, ", ".join(edited))  # fmt: skip
        if ignored or edited:
            try:
                settings._write()
            except OSError as e:
                log.warning("%s: cannot rewrite it (%s)", settings.path, _reason(e))
        return settings

    def get(self, key: str, default: Any = None) -> Any:
        """The value a command set for ``key``, else ``default`` (the config's)."""
        entry = self._entries.get(key)
        return default if entry is None else entry["value"]

    def set(self, key: str, value: Any) -> None:
        """Keep ``value`` for ``key`` (with the config's value of now) and write the file; OSError if
        it cannot be written (the value is kept in memory all the same)."""
        if key not in KEYS:
            raise KeyError(key)
        self._entries[key] = {"value": value, "config": self._config.get(key)}
        self._write()

    def keep(self, key: str, value: Any) -> str:
        """``set``, but what went wrong is logged and returned, or "" (the value applies either way)."""
        try:
            self.set(key, value)
        except OSError as e:
            log.warning("%s: cannot write it (%s); %s applies until a restart", self.path,
                        e.strerror or e, key)  # fmt: skip
            return f"but cannot keep it across a restart ({self.path}: {e.strerror or e})"
        return ""

    def _write(self) -> None:
        text = json.dumps(self._entries, indent=1, sort_keys=True) + "\n"
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SettingCommands:
    """Runs the commands that set a runtime setting of one store (threshold, training class) and keeps
    what they set; ``publish`` sends the new state, ``rename`` and ``remove`` change a class (the
    teacher's)."""

    def __init__(
        self,
        cfg: Config,
        store: KnnStore,
        publish: Callable[[], None],
        rename: Callable[[RenameClass], Result],
        remove: Callable[[RemoveClass], Result],
    ):
        self.cfg, self.store, self._publish = cfg, store, publish
        self._rename, self._remove = rename, remove
        # What commands set and a restart keeps: it wins over the config's value until that is edited.
        self.kept = RuntimeSettings.load(
            cfg.resolved_state_dir(), {"threshold": cfg.store.threshold, "training_class": None}
        )

    def set_threshold(self, command: SetThreshold) -> Result:
        self.store.threshold = command.value
        problem = self.kept.keep("threshold", command.value)
        self._publish()
        if problem:
            return Result(False, f"threshold: set to {command.value}, {problem}")
        return Result(True, detail={"threshold": self.store.threshold})

    def set_min_confidence(self, command: SetThreshold) -> Result:
        """A classifier model's threshold is a probability (None: model.min_confidence); not kept."""
        self.store.threshold = self.cfg.model.min_confidence if command.value is None else command.value
        self._publish()
        return Result(True, detail={"threshold": self.store.threshold})

    @property
    def training_class(self) -> str:
        """The class Home Assistant's Add example acts on: the one selected, else the first."""
        selected = self.kept.get("training_class")
        if selected in self.store.classes:
            return selected
        return self.store.classes[0] if self.store.classes else ""

    def select_class(self, command: SelectClass) -> Result:
        if command.class_name not in self.store.classes:
            return Result(False, f"class: unknown class {command.class_name!r}")
        problem = self.kept.keep("training_class", command.class_name)
        self._publish()
        if problem:
            return Result(False, f"class: selected {command.class_name!r}, {problem}")
        return Result(True, detail={"class": command.class_name})

    def rename_class(self, command: RenameClass) -> Result:
        """Rename; the training class follows its class (chosen before, so no state says otherwise)."""
        follows = (
            self.kept.get("training_class") == command.class_name
            and command.new_name not in self.store.classes
        )
        if follows:
            self.kept.keep("training_class", command.new_name)
        result = self._rename(command)
        if follows and not result.ok:
            self.kept.keep("training_class", command.class_name)
        return result

    def remove_class(self, command: RemoveClass) -> Result:
        """Remove; a removed training class gives way to the one Home Assistant shows next (the first
        class left), kept at once: runtime.json never names a class that is gone, so a new class of
        the same name is not selected behind anyone's back."""
        selected = self.kept.get("training_class")
        result = self._remove(command)
        if result.ok and selected == command.class_name:
            self.kept.keep("training_class", self.training_class)  # the first class left, or ""
            self._publish()
        return result


def _valid(key: str, value: Any) -> bool:
    if key == "threshold":
        return value is None or (
            isinstance(value, int | float) and not isinstance(value, bool) and -1.0 <= value <= 1.0
        )
    return key == "training_class" and isinstance(value, str)


def _reason(e: Exception) -> str:
    if isinstance(e, OSError):
        return smallfiles.reason(e)
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8 text"
    return f"not valid JSON: {getattr(e, 'msg', e)}"
