"""`edgeknn store info | export | import | forget | rename`: inspect and edit a store file from the shell.

``cli`` builds the parser and calls these with its parsed arguments; errors are raised as
``clierrors.UsageError`` / ``InputError`` (or the store's own), and ``cli.main`` maps them to exit codes.
The actions that write a store hold its lock from reading to saving (``storelock.claimed``), so they
refuse the store of a running device; info and export only read it and work while it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeknn import config, storefile, storelock
from edgeknn.clierrors import InputError, UsageError
from edgeknn.commands import class_name_error
from edgeknn.model import Model
from edgeknn.store import KnnStore


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
    for name, count in store.counts().items():
        print(f"  {name}: {count} examples")
    return 0


def store_export(args) -> int:
    store = _open(args)
    rows = store.rows()
    data = {
        "format": "edgeknn-examples",
        "model_id": store.model_id,
        "classes": store.classes,
        "examples": [
            {
                "class": store.classes[int(label)],
                "example": int(ex),
                "vector": [round(float(v), 6) for v in row],
            }
            for row, label, ex in zip(rows, store.labels(), store.example_ids(), strict=True)
        ],
    }
    Path(args.output).write_text(json.dumps(data))
    print(f"{args.output}: {len(rows)} rows of {len(store.classes)} classes")
    return 0


def store_import(args) -> int:
    with storelock.claimed(args.store, "edgeknn store import"):
        return _import(args)


def _import(args) -> int:
    try:
        data = json.loads(Path(args.input).read_text())
        model_id, examples = data["model_id"], data["examples"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{args.input}: not an edgeknn export ({type(e).__name__}: {e})") from None
    cfg = config.load(args.config)
    if Path(args.store).exists():
        store = KnnStore.load(args.store, model_id, cfg.store.settings())
    try:
        groups: dict[tuple[str, int], list] = {}
        for ex in examples:
            if class_name_error(ex.get("class")):
                raise InputError(f"{args.input}: invalid class name {ex.get('class')!r}")
            groups.setdefault((ex["class"], ex.get("example", 0)), []).append(ex["vector"])
        if not Path(args.store).exists():
            store = KnnStore(len(examples[0]["vector"]) if examples else 1, model_id, cfg.store.settings())
        for (name, _), vectors in groups.items():
            store.add(name, np.array(vectors, np.float32))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise InputError(f"{args.input}: not an edgeknn export ({type(e).__name__}: {e})") from None
    store.save(args.store)
    print(f"{args.store}: imported {len(groups)} examples")
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
