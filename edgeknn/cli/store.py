"""`edgeknn store info | examples | export | import | forget | rename | delete-example | reembed`: inspect
and edit a store file from the shell.

``main`` builds the parser and calls these with its parsed arguments; errors are raised as
``errors.UsageError`` / ``InputError`` (or the store's own), and ``main.main`` maps them to exit codes.
The actions that write a store hold its lock from reading to saving (``storelock.claimed``), so they
refuse the store of a running device; info and export only read it and work while it runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from edgeknn import config
from edgeknn.cli.errors import InputError, UsageError
from edgeknn.model import reembed
from edgeknn.model.embedder import Embedder
from edgeknn.model.tflite import Model
from edgeknn.store import exchange
from edgeknn.store import file as storefile
from edgeknn.store import lock as storelock
from edgeknn.store.knn import KnnStore
from edgeknn.store.names import class_name_error


def _open(args) -> KnnStore:
    """The store named on the command line, with the configured settings."""
    return KnnStore.load(args.store, _model_id(args), config.load(args.config).store.settings())


def _model_id(args) -> str:
    """The identity a store must carry: that of --model, else the one in the file (inspection only)."""
    if getattr(args, "model", None):
        return Model(args.model).sha256
    return storefile.model_id_of(args.store)  # "": KnnStore.load reports what is wrong with the file


def _require_class(store: KnnStore, args) -> None:
    if args.class_name not in store.classes:
        raise UsageError(f"{args.store}: no class {args.class_name!r} (classes: {', '.join(store.classes)})")


def store_info(args) -> int:
    store = _open(args)
    print(f"store: {args.store}")
    print(f"model: {store.model_id}")
    print(f"rows: {len(store)} of {store.dim} values ({store.storage})")
    kept = [e.has_picture for e in store.examples()]
    reembed_ok = "yes" if all(kept) else "no"
    print(f"pictures: {sum(kept)} of {len(kept)} examples (can be re-embedded: {reembed_ok})")
    for name, count in store.counts().items():
        print(f"  {name}: {count} examples")
    return 0


def store_examples(args) -> int:
    """One line per example: its id, class, time of adding and whether it keeps its picture."""
    store = _open(args)
    if args.class_name is not None:
        _require_class(store, args)
    for e in store.examples(args.class_name):
        added = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.added))
        print(f"{e.id}\t{e.class_name}\t{added}\t{'picture' if e.has_picture else 'no picture'}")
    return 0


def store_export(args) -> int:
    """The store's examples as an archive (``store/archive.py``): rows in the store's own dtype (or
    ``--rows float16``), pictures as they are; written beside the output and renamed into place."""
    store = _open(args)
    output = Path(args.output)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            manifest = exchange.export_store(store, f, getattr(args, "rows", None))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except exchange.ArchiveError as e:
        raise InputError(f"{args.store}: cannot export: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    pictures = sum(e.picture is not None for e in manifest.examples)
    print(
        f"{args.output}: {len(manifest.examples)} examples of {len(manifest.classes)} classes "
        f"({manifest.dtype} rows), {pictures} with their picture, {output.stat().st_size} bytes"
    )
    return 0


def store_import(args) -> int:
    with storelock.claimed(args.store, "edgeknn store import"):
        return _import(args)


def _import(args) -> int:
    """An archive's (or an old JSON export's) examples into the store, or a new store made of them:
    ``--mode add`` (the default) adds those the store does not have, ``replace`` makes the store's
    classes and examples the archive's. All or nothing, and never an example of the store evicted."""
    settings = config.load(args.config).store.settings()
    exists = Path(args.store).exists()
    store = KnnStore.load(args.store, storefile.model_id_of(args.store), settings) if exists else None
    try:
        bundle = exchange.read_import(Path(args.input), dim=store.dim if store else None)
    except (exchange.ArchiveError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise InputError(f"{args.input}: not an edgeknn export: {reason}") from None
    if store is None:
        store = KnnStore(bundle.manifest.dim, bundle.manifest.model_id, settings)
    with_pictures = sum(e.picture is not None for e in bundle.examples)
    try:
        detail = exchange.apply(store, bundle, args.mode)  # (uses the bundle up)
    except ValueError as e:
        raise InputError(f"{args.store}: cannot import {args.input}: {e}") from None
    store.save(args.store)
    skipped = f", {detail['skipped']} already there" if detail["skipped"] else ""
    removed = f", {detail['removed']} removed (replace)" if detail["removed"] else ""
    print(
        f"{args.store}: imported {detail['added']} examples, {with_pictures} with their picture"
        f"{skipped}{removed}"
    )
    return 0


def store_forget(args) -> int:
    with storelock.claimed(args.store, "edgeknn store forget"):
        return _forget(args)


def _forget(args) -> int:
    store = _open(args)
    _require_class(store, args)
    removed = store.forget(args.class_name)
    store.save(args.store)
    print(f"{args.store}: forgot {removed} examples of {args.class_name!r}")
    return 0


def store_rename(args) -> int:
    with storelock.claimed(args.store, "edgeknn store rename"):
        return _rename(args)


def _rename(args) -> int:
    store = _open(args)
    problem = class_name_error(args.new_name)
    if problem:
        raise UsageError(f"new name: {problem}, got {args.new_name!r}")
    _require_class(store, args)
    try:
        store.rename(args.class_name, args.new_name)
    except ValueError as e:
        raise UsageError(f"{args.store}: {e}") from None
    store.save(args.store)
    print(f"{args.store}: renamed {args.class_name!r} to {args.new_name!r}")
    return 0


def store_delete_example(args) -> int:
    with storelock.claimed(args.store, "edgeknn store delete-example"):
        return _delete_example(args)


def _delete_example(args) -> int:
    try:
        example = int(args.example)
    except ValueError:
        raise UsageError(f"example: expected an example id (a number), got {args.example!r}") from None
    store = _open(args)
    try:
        name = store.delete_example(example)
    except KeyError:
        raise UsageError(f"{args.store}: no example {example} (see `edgeknn store examples`)") from None
    store.save(args.store)
    print(f"{args.store}: deleted example {example} of {name!r}")
    return 0


def store_reembed(args) -> int:
    with storelock.claimed(args.store, "edgeknn store reembed"):
        return _reembed(args)


def _reembed(args) -> int:
    """Rebuild the store for --model (default: the configured model) from its examples' pictures."""
    cfg = config.load(args.config)
    old = KnnStore.load(args.store, storefile.model_id_of(args.store), cfg.store.settings())
    embedder = Embedder(Path(args.model) if args.model else cfg.model_path(), cfg.model.threads)
    if old.model_id == embedder.identity:
        print(f"{args.store}: already made with model {embedder.identity[:12]}; nothing to do")
        return 0
    missing = reembed.without_pictures(old)
    if missing:
        raise InputError(f"{args.store}: cannot re-embed: {reembed.refusal(old, missing)}")
    try:
        store = reembed.reembed(old, embedder, cfg.store.settings(embedder.storage))
    except reembed.ReembedError as e:
        raise InputError(f"{args.store}: cannot re-embed: {e}") from None
    store.save(args.store)
    print(
        f"{args.store}: re-embedded {len(store.examples())} examples of {len(store.classes)} classes "
        f"for model {embedder.identity[:12]}"
    )
    return 0
