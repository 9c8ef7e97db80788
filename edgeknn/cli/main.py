"""The `edgeknn` command: the only entry point and the only place that reads argv.

Every failure a person can fix prints one line naming the culprit. One exit-code rule for every
command (README "Exit codes"): 0 done; 1 a file or the machine failed (a missing, unreadable or
invalid image, model, store or export file, a download, a full disk; `teach` when it skipped some
files); 2 the command line is wrong (an unknown option, a value out of range, a class name that is
invalid or not in the store); 78 (EX_CONFIG) the configuration is wrong; 130 interrupted.
The `store …` actions are in ``storecli``; every other command is here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from edgeknn import __version__, config
from edgeknn import jpeg as pictures
from edgeknn.cli import store as storecli
from edgeknn.cli.errors import InputError, UsageError
from edgeknn.cli.progress import Progress
from edgeknn.imagefiles import ImageError, find_images, load_rgb
from edgeknn.model.classifier import Classifier
from edgeknn.model.embedder import Embedder
from edgeknn.model.registry import MODELS
from edgeknn.model.tflite import Model, ModelError, sha256_of
from edgeknn.store import lock as storelock
from edgeknn.store.file import StoreError
from edgeknn.store.head import RULES, VIEW_RULES
from edgeknn.store.knn import KnnStore
from edgeknn.store.names import UNKNOWN, class_name_error

EX_CONFIG = os.EX_CONFIG


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except config.ConfigError as e:
        for line in e.errors:
            print(f"edgeknn: {line}", file=sys.stderr)
        return EX_CONFIG
    except UsageError as e:
        print(f"edgeknn: {e}", file=sys.stderr)
        return 2
    except (ModelError, StoreError, ImageError, InputError, OSError) as e:
        print(f"edgeknn: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeknn", description="A teachable image classifier for small boards."
    )
    parser.add_argument("--version", action="version", version=f"edgeknn {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--config", type=Path, help=f"TOML config (default {config.DEFAULT_CONFIG_PATH} if present)"
        )
        p.set_defaults(func=func)
        return p

    p = command("run", _run, "run the device: camera, k-NN, buttons, LEDs and MQTT")
    p.add_argument(
        "--source", help="camera source URI (auto, picamera2[:N], v4l2:N, replay:PATH?fps=10&loop=1)"
    )
    p.add_argument("--panel", choices=("gpio", "keyboard", "none"), help="buttons and LEDs")
    p.add_argument("--model", help="TFLite model (default: model.path)")
    p.add_argument("--store", help="the example store (default: store.path)")
    p.add_argument("--mqtt", metavar="HOST[:PORT]", help='MQTT broker, or "none" to run without MQTT')
    p.add_argument("--device-id", help="device id in MQTT topics")
    p.add_argument("--web", metavar="[HOST:]PORT|none", help='the web page\'s port, or "none" for no page')

    p = command("classify", _classify, "top-k ImageNet-style labels of images (a pretrained classifier)")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    p.add_argument("--source", help="classify a camera or replay live instead (a camera.source URI)")
    p.add_argument("--model", type=Path, help="classifier model, or the extractor with --head")
    p.add_argument(
        "--labels", type=Path, help="labels file (else the model's metadata or a labels.txt beside it)"
    )
    p.add_argument("--head", type=Path, help="head model that takes the extractor's output")
    p.add_argument("--top", type=int, default=5, help="how many labels (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")

    p = command("teach", _teach, "add images (files or folders) as examples of a class")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--class", dest="class_name", required=True, help="class name")
    p.add_argument("--model", type=Path)

    p = command("predict", _predict, "classify images with a trained store")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--model", type=Path)
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")

    # `store --config F info S` and `store info S --config F` both count: an action's own --config has
    # no default (argparse would let it overwrite the one given before the action with None).
    p = command("store", None, "inspect and edit a store: its examples, classes, export, import, model")
    store_sub = p.add_subparsers(metavar="ACTION")
    for name, func, help, extra in (
        ("info", storecli.store_info, "classes, counts, model and size", []),
        ("export", storecli.store_export, "write the examples as portable JSON", ["output"]),
        ("import", storecli.store_import, "add the examples of an exported JSON file", ["input"]),
        ("forget", storecli.store_forget, "forget every example of a class", ["class_name"]),
        ("rename", storecli.store_rename, "rename a class", ["class_name", "new_name"]),
        ("examples", storecli.store_examples, "list the examples: id, class, time, picture", []),
        ("delete-example", storecli.store_delete_example, "delete one example by id", ["example"]),
        ("reembed", storecli.store_reembed, "rebuild the store for --model from its pictures", []),
    ):
        sp = store_sub.add_parser(name, help=help, description=help)
        sp.add_argument("store", type=Path)
        for arg in extra:
            sp.add_argument(arg)
        if name == "examples":
            sp.add_argument("--class", dest="class_name", help="only the examples of this class")
        sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML config")
        sp.add_argument("--model", type=Path, help="the store's model (default: model.path)")
        sp.set_defaults(func=func)

    p = command("eval", _eval, "few-shot accuracy on a folder of <class>/<image> photos")
    p.add_argument("dataset", type=Path)
    p.add_argument("--shots", default="1,5,10", help="examples per class, comma-separated (default 1,5,10)")
    p.add_argument("--seeds", type=int, default=5, help="random draws per shot count (default 5)")
    p.add_argument(
        "--rule", choices=RULES, help=f"one rule (default: the default rule and tfjs); {', '.join(RULES)}"
    )
    p.add_argument("--k", type=int, default=3, help="neighbours that vote (default 3)")
    p.add_argument("--model", type=Path)
    p.add_argument(
        "--open-set",
        action="store_true",
        help="leave half the classes untaught: AUROC of the unknown score, and how often untaught "
        "photos are answered unknown and taught ones right",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("bench", _bench, "measure the pipeline, the k-NN and the footprint")
    p.add_argument("--model", type=Path)
    p.add_argument("--threads", type=int, default=0, help="interpreter threads (default: model.threads)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (for tests)")
    p.add_argument(
        "--compare",
        choices=[*MODELS, "none"],
        metavar="NAME",
        help="the named model set beside it (default: mobilenet_v1_1.0_224, or the default for that one)",
    )
    p.add_argument(
        "--data", type=Path, help="photo folder to replay (default ../shared/data/sign_language_digits)"
    )

    p = command("web", None, "the web page: show or reset its password")
    web_sub = p.add_subparsers(metavar="ACTION")
    sp = web_sub.add_parser(
        "password", help="show the page's password; --reset makes a new one (ends every login)"
    )
    sp.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    sp.add_argument("--reset", action="store_true", help="generate a new password")
    sp.add_argument("--state-dir", type=Path, help="the device's state directory (default: the config's)")
    sp.set_defaults(func=_web_password)

    p = command("model", None, "inspect or fetch models")
    model_sub = p.add_subparsers(metavar="ACTION")
    sp = model_sub.add_parser("info", help="tensors, shapes, quantization and backend of a model")
    sp.add_argument("path", type=Path)
    sp.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    sp.set_defaults(func=_model_info)
    sp = model_sub.add_parser(
        "fetch", help="download a named model (default: the configured one) into the state directory"
    )
    sp.add_argument("name", nargs="?", choices=list(MODELS), metavar="NAME", help="see `edgeknn model list`")
    sp.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    sp.add_argument("--url", help="where to download from (default: its pinned URL)")
    sp.add_argument("--sha256", help="expected checksum (default: its pinned sha256)")
    sp.add_argument("--dest", type=Path, help="target file (default <state_dir>/models/<file>)")
    sp.set_defaults(func=_model_fetch)
    sp = model_sub.add_parser("list", help="the named models: size, sha256, downloaded, the configured one")
    sp.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    sp.add_argument("--json", action="store_true", help="one JSON object per model, one per line")
    sp.set_defaults(func=_model_list)
    return parser


def _config(args) -> config.Config:
    return config.load(getattr(args, "config", None))


def _model_path(args, cfg: config.Config) -> Path:
    """--model, else the configured model (for --store S: the named model S was made with, if unset)."""
    return Path(args.model) if getattr(args, "model", None) else cfg.model_path(getattr(args, "store", None))


def _open_store(path: Path, embedder: Embedder, cfg: config.Config, create: bool) -> KnnStore:
    if create and not Path(path).exists():
        return KnnStore(embedder.dim, embedder.identity, cfg.store.settings())
    return KnnStore.load(path, embedder.identity, cfg.store.settings(), embedder.dim)


def _images(paths: list[Path]) -> list[Path]:
    return find_images(paths)


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def _run(args) -> int:
    from edgeknn.device.lifecycle import run

    return run(args)


def _classify(args) -> int:
    cfg = _config(args)
    if args.top < 1:
        raise UsageError("--top: expected an integer >= 1")
    if bool(args.images) == bool(args.source):
        raise UsageError("classify: expected image files or --source URI (one of them)")
    classifier = Classifier(
        _model_path(args, cfg), labels=args.labels, head=args.head, threads=cfg.model.threads
    )
    if args.source:
        from edgeknn.cli.classifylive import classify_live

        return classify_live(classifier, args.source, args.top, args.json)
    for path in _images(args.images):
        labels = classifier.classify(load_rgb(path, max_side=1024), top=args.top)
        if args.json:
            _print_json({"file": str(path), "results": [vars(x) for x in labels]})
        else:
            print(f"{path}: " + ", ".join(f"{x.label} ({x.confidence:.2f})" for x in labels))
    return 0


def _teach(args) -> int:
    """Holds the store's lock from reading it to saving it: a running device's store is refused
    (its next autosave would write over what this adds)."""
    with storelock.claimed(args.store, "edgeknn teach"):
        return _teach_locked(args)


def _teach_locked(args) -> int:
    cfg = _config(args)
    problem = class_name_error(args.class_name)
    if problem:
        raise UsageError(f"--class: {problem}, got {args.class_name!r}")
    with Progress(f"teach {args.class_name!r}", 0) as progress:
        files, skipped = [], 0
        for path in args.paths:  # what cannot be read is skipped, one line each; the rest is kept
            try:
                files += find_images([path])
            except ImageError as e:
                progress.say(f"edgeknn: skipped {e}")
                skipped += 1
        if not files:
            print(f"edgeknn: {args.store}: nothing added (no image could be read)", file=sys.stderr)
            return 1
        embedder = Embedder(_model_path(args, cfg), cfg.model.threads)
        store = _open_store(args.store, embedder, cfg, create=True)
        added = count = 0
        for i, path in enumerate(files, 1):
            try:
                image = load_rgb(path, max_side=1024)
            except ImageError as e:
                progress.say(f"edgeknn: skipped {e}")
                skipped += 1
                continue
            vectors = embedder.embed_views(image) if store.rule in VIEW_RULES else embedder.embed(image)
            picture = pictures.encode(embedder.model.prepare(image))  # what the camera would have kept
            count = store.add(args.class_name, vectors, picture)
            added += 1
            progress(i, len(files))
    if not added:
        print(f"edgeknn: {args.store}: nothing added (no image could be read)", file=sys.stderr)
        return 1
    store.save(args.store)
    also = f", {skipped} skipped" if skipped else ""
    print(f"{args.store}: class {args.class_name!r} now has {count} examples ({added} added{also})")
    return 1 if skipped else 0


def _predict(args) -> int:
    cfg = _config(args)
    embedder = Embedder(_model_path(args, cfg), cfg.model.threads)
    store = _open_store(args.store, embedder, cfg, create=False)
    for path in _images(args.images):
        p = store.classify(embedder.embed(load_rgb(path, max_side=1024)))
        if args.json:
            _print_json(
                {
                    "file": str(path),
                    "label": p.label,
                    "confidence": round(p.confidence, 4),
                    "scores": {k: round(v, 4) for k, v in p.scores.items()},
                    "similarity": round(p.similarity, 4),
                    "neighbours": [{"class": c, "similarity": round(s, 4)} for c, s in p.neighbours],
                }
            )
        else:
            print(f"{path}: {p.label} ({p.confidence:.2f}, similarity {p.similarity:.2f})")
    return 0


def _eval(args) -> int:
    from edgeknn.cli.evaluate import evaluate, load_dataset

    cfg = _config(args)
    try:
        shots = [int(s) for s in args.shots.split(",")]
    except ValueError:
        raise UsageError(f"--shots: expected comma-separated integers, got {args.shots!r}") from None
    if min(shots) < 1 or args.seeds < 1:
        raise UsageError("--shots and --seeds: expected integers >= 1")
    rules = [args.rule] if args.rule else ["softmax", "tfjs"]
    start = time.perf_counter()
    embedder = Embedder(_model_path(args, cfg), cfg.model.threads)
    with Progress("eval: embedding photos", 0) as progress:
        data = load_dataset(args.dataset, embedder, progress)
    smallest = min(int((data.labels == c).sum()) for c in range(len(data.classes)))
    if max(shots) >= smallest:
        raise UsageError(f"--shots: the smallest class has {smallest} photos; use fewer than that")
    with Progress("eval: shots x rules x seeds", 0) as progress:
        result = evaluate(
            data, embedder, rules, shots, args.seeds, k=args.k, open_set=args.open_set, progress=progress
        )
    seconds = time.perf_counter() - start
    result = {
        "model": str(_model_path(args, cfg)),
        "default_rule": "softmax",
        **result,
        "seconds": round(seconds, 1),
    }
    if args.json:
        _print_json(result)
        return 0
    print(
        f"{args.dataset}: {len(data.files)} photos, {len(data.classes)} classes, "
        f"{args.seeds} seeds, k={args.k}"
    )
    header = "".join(f"{n:>4} shot{'s' if n > 1 else ' '}" + " " * 5 for n in shots)
    print("rule        " + header)
    for rule, per_shot in result["rules"].items():
        cells = "".join(f"{v['mean']:.3f} ± {v['std']:.3f}  " for v in per_shot.values())
        print(f"{rule:<12}{cells}")
    for rule, per_shot in result.get("open_set", {}).items():
        print(f"open set ({rule}): half the classes untaught; unknown = {UNKNOWN!r}")
        print("  shots  AUROC  threshold  untaught->unknown (auto / 0)  taught right (auto / 0 / none)  kept")
        for n, r in per_shot.items():
            print(
                f"  {n:>5}  {r['auroc']:.3f}  {r['threshold']:9.3f}  "
                f"{r['unseen_unknown_auto']:.3f} / {r['unseen_unknown_zero']:.3f}{'':15}"
                f"{r['taught_right_auto']:.3f} / {r['taught_right_zero']:.3f} / "
                f"{r['taught_right_closed']:.3f}{'':9}{r['kept']:.3f}"
            )
    print(f"took {seconds:.1f} s")
    return 0


def _bench(args) -> int:
    from edgeknn.bench import run_bench

    return run_bench(args, _config(args))


def _web_password(args) -> int:
    """`edgeknn web password [--reset]`: the configured password says where it is set; the generated
    one is shown (made now if the device has not made it yet) or replaced."""
    from edgeknn.web.auth import AuthError, Passwords, reset_password

    cfg = _config(args)
    if args.state_dir and not Path(args.state_dir).is_dir():  # a typo must not make a password nobody uses
        raise InputError(
            f"--state-dir {args.state_dir}: no such folder (the device's, e.g. /var/lib/edgeknn)"
        )
    state_dir = args.state_dir or cfg.resolved_state_dir()
    passwords = Passwords(cfg.web, state_dir)
    configured = bool(cfg.web.password or cfg.web.password_file)
    if args.reset:
        if configured:
            raise UsageError(f"the password is set by {passwords.source}: change it there")
        print(reset_password(state_dir))
        print(f"(kept in {passwords.source}; every login of the page has ended)", file=sys.stderr)
        return 0
    try:
        passwords.ensure()
        print(passwords.current())
    except AuthError as e:
        raise InputError(str(e)) from None
    print(f"(from {passwords.source})", file=sys.stderr)
    return 0


def _model_info(args) -> int:
    model = Model(args.path)
    info = model.describe()
    print(json.dumps(info, indent=2))
    return 0


def _model_fetch(args) -> int:
    from edgeknn.model.download import fetch

    cfg = _config(args)
    named = MODELS[args.name] if args.name else cfg.named_model()
    url, sha256 = args.url or named.url, args.sha256 or named.sha256
    dest = args.dest or cfg.resolved_state_dir() / "models" / named.file
    if dest.is_file() and sha256_of(dest) == sha256:
        print(f"{dest}: sha256 {sha256} verified (already there)")
        return 0
    fetch(url, sha256, dest)
    print(f"{dest}: sha256 {sha256} verified")
    return 0


def _model_list(args) -> int:
    """Every named model: size, sha256, whether <state_dir>/models holds it, which one is configured."""
    from edgeknn.model.download import have
    from edgeknn.model.registry import DEFAULT_NAME

    cfg = _config(args)
    folder = cfg.resolved_state_dir() / "models"
    chosen = None if cfg.model.path else cfg.named_model().name
    for m in MODELS.values():
        marks = [w for w, on in (("default", m.name == DEFAULT_NAME), ("configured", m.name == chosen)) if on]
        row = {"name": m.name, "bytes": m.size, "sha256": m.sha256, "downloaded": have(m, folder)}
        if args.json:
            _print_json(
                {**row, "default": m.name == DEFAULT_NAME, "configured": m.name == chosen, "about": m.about}
            )
            continue
        size, got = f"{m.size / 1e6:.1f} MB", row["downloaded"]
        print(f"{m.name:<24}{size:>8}  {m.sha256[:12]}  downloaded: {got:<5} {', '.join(marks)}".rstrip())
    if cfg.model.path and not args.json:
        print(f"model.path = {cfg.model.path} (wins over model.name)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
