"""What a store keeps of each added example besides its rows and its picture: its id and its time of adding.

Ids only grow: the store file keeps the next one, so an id never names two examples, even across a
delete, a save and a re-embedding (which keeps each example's id and time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

MAX_TIME = 253_402_300_799.0  # 9999-12-31 23:59:59 UTC: the last second a date can name (datetime's)


def time_error(value: object) -> str | None:
    """Why ``value`` is not a time of adding (epoch seconds, finite, 1970..9999), or None: a time out of
    that range cannot be shown as a date, and would break every listing of the examples."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a time in seconds, got {str(value)[:40]!r}"
    if not (0 <= value <= MAX_TIME):  # NaN compares False (and a huge int is no float to convert)
        return f"expected a time in seconds from 1970 to 9999, got {value!r}"
    return None


@dataclass(frozen=True)
class ExampleInfo:
    """One added example as ``KnnStore.examples`` lists it: ``added`` is its time (epoch seconds)."""

    id: int
    class_name: str
    added: float
    has_picture: bool


class ExampleBook:
    """The id and time of adding of every stored example, and the next id."""

    def __init__(self, next_id: int = 0, added: dict[int, float] | None = None):
        self.next_id = next_id
        self._added: dict[int, float] = added or {}

    @classmethod
    def load(cls, arrays: dict[str, np.ndarray]) -> ExampleBook:
        """The book of a store file's arrays (``storefile.read`` checked them)."""
        added = dict(zip(arrays["examples"].tolist(), arrays["added"].tolist(), strict=True))
        return cls(int(arrays["next_example"]), added)

    def check(self, example_id: int | None, added: float | None) -> None:
        """ValueError when a new example cannot have this id or time (before the store changes anything)."""
        if example_id is not None and example_id < self.next_id:
            raise ValueError(f"example id {example_id} is taken (the next is {self.next_id})")
        problem = None if added is None else time_error(added)
        if problem:
            raise ValueError(f"added: {problem}")

    def add(self, example_id: int, added: float | None = None) -> None:
        """Record a new example (``next_id`` or a later id, added now unless given: ``check`` them first)."""
        self.next_id = example_id + 1
        self._added[example_id] = time.time() if added is None else added

    def added(self, example_id: int) -> float:
        return self._added[example_id]

    def drop(self, ids: list[int]) -> None:
        """Forget examples whose rows are gone (their ids stay used)."""
        for example_id in ids:
            self._added.pop(example_id, None)

    def ids(self) -> list[int]:
        return sorted(self._added)

    def arrays(self) -> dict[str, np.ndarray]:
        """The store file's ``next_example``, ``examples`` and ``added`` (new arrays)."""
        ids = self.ids()
        return {
            "next_example": np.array(self.next_id, np.int64),
            "examples": np.array(ids, np.int64),
            "added": np.array([self._added[i] for i in ids], np.float64),
        }
