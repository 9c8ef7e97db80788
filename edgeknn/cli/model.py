"""`edgeknn model info | fetch | list`: look inside a model file, download a named model, list them.

``main`` builds the parser and maps their errors to exit codes.
"""

from __future__ import annotations

import json

from edgeknn.cli.options import load_config, print_json
from edgeknn.model.registry import MODELS
from edgeknn.model.tflite import Model, sha256_of


def model_info(args) -> int:
    model = Model(args.path)
    info = model.describe()
    print(json.dumps(info, indent=2))
    return 0


def model_fetch(args) -> int:
    from edgeknn.model.download import fetch

    cfg = load_config(args)
    named = MODELS[args.name] if args.name else cfg.named_model()
    url, sha256 = args.url or named.url, args.sha256 or named.sha256
    dest = args.dest or cfg.resolved_state_dir() / "models" / named.file
    if dest.is_file() and sha256_of(dest) == sha256:
        print(f"{dest}: sha256 {sha256} verified (already there)")
        return 0
    fetch(url, sha256, dest)
    print(f"{dest}: sha256 {sha256} verified")
    return 0


def model_list(args) -> int:
    """Every named model: size, sha256, whether <state_dir>/models holds it (or the package: the default),
    which one is configured."""
    from edgeknn.model.download import have
    from edgeknn.model.registry import DEFAULT_NAME, packaged

    cfg = load_config(args)
    folder = cfg.resolved_state_dir() / "models"
    chosen = None if cfg.model.path else cfg.named_model().name
    for m in MODELS.values():
        marks = [w for w, on in (("default", m.name == DEFAULT_NAME), ("configured", m.name == chosen)) if on]
        got = have(m, folder)
        if got == "no" and packaged(m) is not None:  # the default ships inside the package
            got = "packaged"
        row = {"name": m.name, "bytes": m.size, "sha256": m.sha256, "downloaded": got}
        if args.json:
            print_json(
                {**row, "default": m.name == DEFAULT_NAME, "configured": m.name == chosen, "about": m.about}
            )
            continue
        size = f"{m.size / 1e6:.1f} MB"
        print(f"{m.name:<24}{size:>8}  {m.sha256[:12]}  downloaded: {got:<8} {', '.join(marks)}".rstrip())
    if cfg.model.path and not args.json:
        print(f"model.path = {cfg.model.path} (wins over model.name)")
    return 0
