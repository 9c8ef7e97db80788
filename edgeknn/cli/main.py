"""The `edgeknn` command: the only entry point and the only place that reads argv.

Every failure a person can fix prints one line naming the culprit. One exit-code rule for every
command (README "Exit codes"): 0 done; 1 a file or the machine failed (a missing, unreadable or
invalid image, model, store or export file, a download, a full disk; `teach` when it skipped some
files); 2 the command line is wrong (an unknown option, a value out of range, a class name that is
invalid or not in the store); 78 (EX_CONFIG) the configuration is wrong; 130 interrupted.

This module holds ``main``, the parser and the two commands that only hand over (`run`, `bench`); the
command families are modules of their own: ``classify`` (classify, teach, predict), ``evaluate``
(eval), ``model`` (model info/fetch/list), ``web`` (web password), ``store`` (the `store …` actions).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgeknn import __version__, config
from edgeknn.cli import classify as classifycli
from edgeknn.cli import data as datacli
from edgeknn.cli import demo as democli
from edgeknn.cli import devices as devicescli
from edgeknn.cli import model as modelcli
from edgeknn.cli import store as storecli
from edgeknn.cli import web as webcli
from edgeknn.cli.errors import InputError, UsageError
from edgeknn.cli.evaluate import PROTOCOLS, SEEN, SEEN_FROM, eval_command
from edgeknn.cli.options import load_config
from edgeknn.imagefiles import ImageError
from edgeknn.model.registry import MODELS
from edgeknn.model.tflite import ModelError
from edgeknn.store.archive import DTYPES
from edgeknn.store.exchange import MODES
from edgeknn.store.file import StoreError
from edgeknn.store.head import RULES

EX_CONFIG = os.EX_CONFIG
IMPORT_MODES = (
    "add (default): the examples the store does not have yet (same time and picture: already there); "
    "replace: the store's classes and examples become the archive's"
)
CONFIG_HELP = f"TOML config (default {config.DEFAULT_CONFIG_PATH} if present)"
MODEL_HELP = "TFLite model (default: the configured one: model.path, else model.name, else the default)"
STORE_MODEL_HELP = "TFLite model (default: the one the store was made with, else the configured one)"
STORE_ARGS = {
    "output": "the JSON file to write",
    "input": "an exported JSON file",
    "class_name": "a class of the store",
    "new_name": "its new name",
    "example": "an example id (`edgeknn store examples` lists them)",
}


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

    p = command(
        "demo",
        democli.demo,
        "try it: the device on the package's demo photos, the page on http://localhost:8080, no network",
    )
    democli.add_arguments(p)

    p = command(
        "classify", classifycli.classify, "top-k ImageNet-style labels of images (a pretrained classifier)"
    )
    p.add_argument(
        "images", nargs="*", type=Path, metavar="IMAGE", help="image files or folders (searched recursively)"
    )
    p.add_argument("--source", help="classify a camera or replay live instead (a camera.source URI)")
    p.add_argument("--model", type=Path, help="classifier model, or the extractor with --head")
    p.add_argument(
        "--labels", type=Path, help="labels file (else the model's metadata or a labels.txt beside it)"
    )
    p.add_argument("--head", type=Path, help="head model that takes the extractor's output")
    p.add_argument("--top", type=int, default=5, help="how many labels (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")

    p = command("teach", classifycli.teach, "add images (files or folders) as examples of a class")
    p.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="image files or folders (searched recursively)"
    )
    p.add_argument("--store", type=Path, required=True, help="the store file (.npz); made if missing")
    p.add_argument("--class", dest="class_name", required=True, help="class name")
    p.add_argument("--model", type=Path, help=STORE_MODEL_HELP)

    p = command("predict", classifycli.predict, "classify images with a trained store")
    p.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE", help="image files or folders (searched recursively)"
    )
    p.add_argument("--store", type=Path, required=True, help="a taught store file (.npz)")
    p.add_argument("--model", type=Path, help=STORE_MODEL_HELP)
    p.add_argument(
        "--threshold",
        type=classifycli.threshold_option,
        metavar="SIMILARITY|auto",
        help="below this similarity to the nearest example the answer is unrecognized: -1..1, or auto "
        "(calibrated from the store's examples); default: store.threshold",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image, one per line")

    # `store --config F info S` and `store info S --config F` both count: an action's own --config has
    # no default (argparse would let it overwrite the one given before the action with None).
    p = command("store", None, "inspect and edit a store: its examples, classes, export, import, model")
    store_sub = p.add_subparsers(metavar="ACTION")
    for name, func, help, extra in (
        ("info", storecli.store_info, "classes, counts, model and size", []),
        ("export", storecli.store_export, "write the examples, rows and pictures as an archive", ["output"]),
        ("import", storecli.store_import, "add (or --mode replace) the examples of an archive", ["input"]),
        ("forget", storecli.store_forget, "forget every example of a class", ["class_name"]),
        ("rename", storecli.store_rename, "rename a class", ["class_name", "new_name"]),
        ("examples", storecli.store_examples, "list the examples: id, class, time, picture", []),
        ("delete-example", storecli.store_delete_example, "delete one example by id", ["example"]),
        ("reembed", storecli.store_reembed, "rebuild the store for --model from its pictures", []),
    ):
        sp = store_sub.add_parser(name, help=help, description=help)
        sp.add_argument("store", type=Path, help="the store file (.npz)")
        for arg in extra:
            sp.add_argument(arg, metavar=arg.upper(), help=STORE_ARGS[arg])
        if name == "examples":
            sp.add_argument("--class", dest="class_name", help="only the examples of this class")
        if name == "export":
            sp.add_argument("--rows", choices=DTYPES, help="row type (default: the store's own, exact)")
        if name == "import":
            sp.add_argument("--mode", choices=MODES, default="add", help=IMPORT_MODES)
        sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML config")
        sp.add_argument("--model", type=Path, help="the store's model (default: model.path)")
        sp.set_defaults(func=func)

    p = command("eval", eval_command, "few-shot accuracy on a folder of <class>/<image> photos")
    p.add_argument("dataset", type=Path, help="a folder of <class>/<image> photos")
    p.add_argument("--shots", default="1,5,10", help="examples per class, comma-separated (default 1,5,10)")
    p.add_argument("--seeds", type=int, default=5, help="random draws per shot count (default 5)")
    p.add_argument(
        "--rule", choices=RULES, help=f"one rule (default: the default rule and tfjs); {', '.join(RULES)}"
    )
    p.add_argument("--k", type=int, default=3, help="neighbours that vote (default 3)")
    p.add_argument(
        "--storage",
        choices=("float32", "uint8", "auto"),
        default="float32",
        help="the store's rows (default float32; auto: uint8 for a quantized extractor, as store.storage)",
    )
    p.add_argument("--model", type=Path, help=MODEL_HELP)
    p.add_argument(
        "--open-set",
        action="store_true",
        help="also teach 1, 2 and half of the classes, the others never: AUROC of the unknown score, "
        "untaught photos answered unrecognized, taught ones answered right",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="device",
        help="device (default): the centre is what a device holds, from photos that are neither "
        "examples nor queries; queries: the old evaluation, centred on the queries themselves",
    )
    p.add_argument(
        "--seen",
        type=int,
        help=f"photos per class the device sees before the queries (default {SEEN}, fewer in a small set)",
    )
    p.add_argument(
        "--seen-from",
        choices=SEEN_FROM,
        default="all",
        help="all (default): of every class, as a device that has seen its room; taught: the taught only",
    )
    p.add_argument(
        "--classes", help="only these class folders, comma-separated (tune on some, report on others)"
    )
    p.add_argument(
        "--cache", type=Path, help="where embedded photos are kept (default ~/.cache/edgeknn/eval)"
    )
    p.add_argument("--no-cache", action="store_true", help="embed every photo again, keep nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("bench", _bench, "measure the pipeline, the k-NN and the footprint")
    p.add_argument("--model", type=Path, help=MODEL_HELP)
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

    p = command("devices", devicescli.devices, "the devices on a broker: id, host, model, classes, fleet")
    p.add_argument(
        "--broker", metavar="HOST[:PORT]", help="the broker (default: the config's mqtt.host/port)"
    )
    p.add_argument("--wait", type=float, default=2.0, help="seconds to listen for retained messages (2)")
    p.add_argument("--json", action="store_true", help="one JSON object per device, one per line")

    p = command("data", None, "the models and photo sets the tests and the bench use")
    data_sub = p.add_subparsers(metavar="ACTION")
    sp = data_sub.add_parser(
        "fetch",
        help="download them, each pinned by commit and sha256, into the cache the tests look in",
        description="download the pinned models (google-coral/test_data) and photos (test photos, "
        "sign-language digits), checking every sha256, into --dest (default ~/.cache/edgeknn)",
    )
    sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML config (not used)")
    sp.add_argument("--dest", type=Path, help=f"where to put them (default {datacli.default_cache()})")
    sp.set_defaults(func=datacli.data_fetch)

    p = command("web", None, "the web page: show or reset its password")
    web_sub = p.add_subparsers(metavar="ACTION")
    sp = web_sub.add_parser(
        "password", help="show the page's password; --reset makes a new one (ends every login)"
    )
    sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    sp.add_argument("--reset", action="store_true", help="generate a new password")
    sp.add_argument("--state-dir", type=Path, help="the device's state directory (default: the config's)")
    sp.set_defaults(func=webcli.web_password)

    p = command("model", None, "inspect or fetch models")
    model_sub = p.add_subparsers(metavar="ACTION")
    sp = model_sub.add_parser("info", help="tensors, shapes, quantization and backend of a model")
    sp.add_argument("path", type=Path, help="a .tflite file")
    sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    sp.set_defaults(func=modelcli.model_info)
    sp = model_sub.add_parser(
        "fetch", help="download a named model (default: the configured one) into the state directory"
    )
    sp.add_argument("name", nargs="?", choices=list(MODELS), metavar="NAME", help="see `edgeknn model list`")
    sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    sp.add_argument("--url", help="where to download from (default: its pinned URL)")
    sp.add_argument("--sha256", help="expected checksum (default: its pinned sha256)")
    sp.add_argument("--dest", type=Path, help="target file (default <state_dir>/models/<file>)")
    sp.set_defaults(func=modelcli.model_fetch)
    sp = model_sub.add_parser("list", help="the named models: size, sha256, downloaded, the configured one")
    sp.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    sp.add_argument("--json", action="store_true", help="one JSON object per model, one per line")
    sp.set_defaults(func=modelcli.model_list)
    return parser


def _run(args) -> int:
    from edgeknn.device.lifecycle import run

    return run(args)


def _bench(args) -> int:
    from edgeknn.bench import run_bench

    return run_bench(args, load_config(args))


if __name__ == "__main__":
    sys.exit(main())
