"""What every command reads from its parsed arguments, the config and the model, and how ``--json`` prints.

The command families (``classify``, ``evaluate``, ``model``, ``web``, ``bench``) share these, so they
live below ``main`` (which imports the families) rather than in it.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeknn import config


def load_config(args) -> config.Config:
    return config.load(getattr(args, "config", None))


def model_path(args, cfg: config.Config) -> Path:
    """--model, else the configured model (for --store S: the named model S was made with, if unset)."""
    return Path(args.model) if getattr(args, "model", None) else cfg.model_path(getattr(args, "store", None))


def print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))
