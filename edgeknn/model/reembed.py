"""Re-embedding: a store rebuilt for another model from the pictures its examples keep.

A store's rows only mean something to the model that made them; its pictures (``pictures.py``) do
not. Each example's picture is embedded as the daemon embeds an added example (its augmented views,
for the rules that store them), into a new store with the same classes in the same slots and the
same example ids and times, so buttons, LEDs and the examples a person sees stay as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from edgeknn.jpeg import PictureError, decode
from edgeknn.model.embedder import Embedder
from edgeknn.store.head import VIEW_RULES
from edgeknn.store.knn import KnnStore, StoreSettings

log = logging.getLogger(__name__)


class ReembedError(Exception):
    """The store cannot be re-embedded: some examples have no picture."""


def without_pictures(store: KnnStore) -> list[int]:
    """The ids of the examples that keep no picture (they cannot be re-embedded)."""
    return [e.id for e in store.examples() if not e.has_picture]


def refusal(store: KnnStore, missing: list[int]) -> str:
    """One line: why ``store`` cannot be re-embedded."""
    return (
        f"{len(missing)} of {len(store.examples())} examples have no picture to re-embed "
        "(added before pictures were kept, or their picture is lost)"
    )


def reembed(
    store: KnnStore,
    embedder: Embedder,
    settings: StoreSettings | None = None,
    each: Callable[[int, int], None] | None = None,
) -> KnnStore:
    """A new store for ``embedder``'s model from ``store``'s pictures (``settings``: the new store's;
    by default ``store``'s rule, k, capacity and storage). ``each(done, total)`` after every example.

    ``ReembedError`` (nothing built) when an example has no picture or its picture cannot be read.
    """
    if settings is None:
        settings = StoreSettings(
            k=store.k, rule=store.rule, threshold=store.threshold, capacity=store.capacity
        )
    if settings.storage is None:
        settings = dataclasses.replace(settings, storage=store.storage)
    examples = store.examples()
    missing = without_pictures(store)
    if missing:
        raise ReembedError(refusal(store, missing))
    new = KnnStore(embedder.dim, embedder.identity, settings)
    for name in store.classes:  # the same slots (also past max_classes, if that was lowered)
        new.ensure_class(name)
    views_per_example = new.rule in VIEW_RULES
    start = time.perf_counter()
    for done, example in enumerate(examples, 1):
        picture = store.picture(example.id)
        try:
            if picture is None:
                raise PictureError("its picture is lost or damaged")
            image = decode(picture)
        except PictureError as e:
            raise ReembedError(f"example {example.id} ({example.class_name}): {e}") from None
        views = embedder.embed_views(image) if views_per_example else embedder.embed(image)[None]
        new.add(example.class_name, views, picture, example_id=example.id, added=example.added)
        if each is not None:
            each(done, len(examples))
    log.info(
        "re-embedded %d examples of %d classes from model %s for model %s in %.1f s",
        len(examples),
        len(new.classes),
        store.model_id[:12],
        embedder.identity[:12],
        time.perf_counter() - start,
    )
    return new
