"""Typed configuration: defaults, validation messages that name the key path, and the CLI's exit 78."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from edgeknn import assets, config
from edgeknn.cli.main import EX_CONFIG, main
from edgeknn.config import Config, ConfigError


def errors_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def write(tmp_path: Path, text: str, name: str = "edgeknn.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults ----------------------------------------


def test_load_none_without_a_system_file_gives_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    cfg = config.load(None)
    assert cfg == Config()
    assert cfg.classes == ["one", "two", "three"]
    assert cfg.mqtt.port == 1883 and cfg.store.k == 3 and cfg.store.storage == "auto"
    assert cfg.store_path().name == "store.npz"
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert cfg.model_path() == assets.DEFAULT_MODEL, "nothing in the state folder: the packaged default"
    fetched = cfg.resolved_state_dir() / "models" / assets.DEFAULT_MODEL.name
    assert fetched.parent.parent == cfg.store_path().parent, "the models folder lives in the state folder"
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(assets.DEFAULT_MODEL.read_bytes())
    assert cfg.model_path() == fetched, "a model in the state folder wins"


def test_load_none_reads_the_system_file_when_present(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", write(tmp_path, "[mqtt]\nport = 1884\n"))
    assert config.load(None).mqtt.port == 1884


def test_empty_file_gives_the_defaults(tmp_path):
    assert config.load(write(tmp_path, "")) == Config()


def test_repository_default_config_parses_to_the_defaults():
    path = REPO / "config" / "edgeknn.toml"
    assert path.is_file(), f"{path} is missing: the repository ships its default config there"
    assert config.load(path) == Config()


def test_defaults_round_trip_through_to_dict():
    assert config.from_dict(config.to_dict(Config())) == Config()


def test_values_are_typed_and_ints_widen_to_float(tmp_path):
    cfg = config.load(
        write(
            tmp_path,
            'classes = ["cup", "pen"]\nstate_dir = "/tmp/x"\n'
            '[store]\nthreshold = 1\nautosave_s = 2\nstorage = "uint8"\n'
            '[mqtt]\nport = 8883\nhost = "broker.lan"\n'
            '[panel]\nbuttons = [17, "GPIO27"]\nleds = [5, 6]\nclear_button = ""\n',
        )
    )
    assert cfg.classes == ["cup", "pen"]
    assert isinstance(cfg.store.threshold, float) and cfg.store.threshold == 1.0
    assert isinstance(cfg.store.autosave_s, float)
    assert cfg.store.storage == "uint8"
    assert (cfg.mqtt.port, cfg.mqtt.host) == (8883, "broker.lan")
    assert cfg.panel.buttons == [17, "GPIO27"] and cfg.panel.clear_button == ""
    assert cfg.store_path() == Path("/tmp/x/store.npz")


# --- one error per problem, naming the key path ---------------------------------------------------------


def test_error_names_the_key_path_and_the_expectation():
    assert errors_of({"mqtt": {"port": "abc"}}) == ['mqtt.port: expected an integer 1..65535, got "abc"']


def test_all_errors_are_collected():
    errors = errors_of(
        {
            "log_level": "loud",
            "mqtt": {"port": 0, "qos": 3},
            "store": {"k": "three", "threshold": 2.0},
            "camera": {"fps": "fast"},
        }
    )
    assert len(errors) == 6
    joined = "\n".join(errors)
    for path in ("log_level", "mqtt.port", "mqtt.qos", "store.k", "store.threshold", "camera.fps"):
        assert any(e.startswith(f"{path}: ") for e in errors), (path, joined)
    assert 'log_level: expected one of "debug", "info", "warning", "error", got "loud"' in errors
    assert "mqtt.port: expected an integer 1..65535, got 0" in errors
    assert 'store.threshold: expected a number -1.0..1.0 or "auto", got 2.0' in errors


def test_unknown_keys_are_errors_at_top_level_and_in_sections():
    errors = errors_of({"colour": "red", "mqtt": {"prot": 1883}, "store": {"kk": 3}})
    assert len(errors) == 3
    assert errors[0].startswith("colour: unknown key (known: classes, state_dir")
    assert errors[1].startswith("mqtt.prot: unknown key (known: enabled, host, port")
    assert errors[2].startswith("store.kk: unknown key")


def test_a_section_that_is_not_a_table():
    assert errors_of({"mqtt": 5}) == ["mqtt: expected a table [mqtt], got 5"]
    assert errors_of({"store": "big"}) == ['store: expected a table [store], got "big"']


def test_a_table_where_a_value_belongs():
    errors = errors_of({"state_dir": {"path": "/x"}})
    assert errors == ["state_dir: expected a string, got a table"]


@pytest.mark.parametrize(
    ("section", "name", "value"),
    [("mqtt", "port", True), ("store", "k", False), ("store", "threshold", True), ("mqtt", "tls", 1)],
)
def test_bool_is_not_a_number_and_a_number_is_not_a_bool(section, name, value):
    errors = errors_of({section: {name: value}})
    assert len(errors) == 1 and errors[0].startswith(f"{section}.{name}: expected ")


def test_float_out_of_range_and_wrong_choice():
    assert errors_of({"store": {"storage": "float16"}}) == [
        'store.storage: expected one of "auto", "float32", "uint8", got "float16"'
    ]
    assert errors_of({"panel": {"hold_time": 0.0}}) == [
        "panel.hold_time: expected a number 0.1..10.0, got 0.0"
    ]


@pytest.mark.parametrize("name", ["threshold", "autosave_s"])
def test_nan_is_not_a_number_in_range(name):
    """TOML allows `nan`; every comparison with it is false, so a range check must reject it explicitly."""
    errors = errors_of({"store": {name: float("nan")}})
    assert len(errors) == 1 and errors[0].startswith(f"store.{name}: expected a number")


@pytest.mark.parametrize(
    "classes",
    [
        [],
        ["ok", "a/b"],
        ["ok", "ok"],
        [" space"],
        ["x" * 33],
        ["cup", 7],
        "cup",
        [f"c{i}" for i in range(33)],
    ],
)
def test_invalid_class_names(classes):
    errors = errors_of({"classes": classes, "panel": {"kind": "none"}})
    assert len(errors) == 1 and errors[0].startswith("classes: expected ")


def test_valid_class_names():
    cfg = config.from_dict({"classes": ["Cup 1", "pen_2", "a.b-c", "x" * 32], "panel": {"kind": "none"}})
    assert cfg.classes == ["Cup 1", "pen_2", "a.b-c", "x" * 32]


def test_invalid_pins():
    errors = errors_of({"panel": {"buttons": [17, 99, 22], "leds": [5, True, 13], "status_led": 60}})
    assert [e.split(":")[0] for e in errors] == ["panel.buttons", "panel.leds", "panel.status_led"]


def test_gpio_panel_needs_one_pin_per_class():
    errors = errors_of({"classes": ["a", "b", "c", "d"]})
    assert errors == [
        "panel.buttons: expected one pin per class (4), got 3",
        "panel.leds: expected one pin per class (4), got 3",
    ]


def test_pin_count_does_not_matter_without_a_gpio_panel():
    cfg = config.from_dict({"classes": ["a", "b", "c", "d"], "panel": {"kind": "keyboard"}})
    assert len(cfg.classes) == 4


def test_cross_checks_on_mqtt():
    assert errors_of({"mqtt": {"cert_file": "c.pem"}}) == [
        "mqtt.key_file: expected a key file when mqtt.cert_file is set"
    ]
    assert errors_of({"mqtt": {"base_topic": "edgeknn/#"}}) == [
        'mqtt.base_topic: expected no MQTT wildcards (+, #), got "edgeknn/#"'
    ]


def test_resolved_base_topic_uses_the_device_id():
    cfg = config.from_dict({"mqtt": {"device_id": "kitchen"}})
    assert cfg.resolved_base_topic() == "edgeknn/kitchen"


def test_errors_stay_one_line_each_even_for_values_with_newlines():
    errors = errors_of({"mqtt": {"port": "80\n80"}})
    assert len(errors) == 1 and "\n" not in errors[0], errors


# --- replace ----------------------------------------


def test_replace_applies_dotted_overrides_and_validates():
    base = Config()
    cfg = config.replace(base, **{"camera.source": "replay:/tmp/x", "mqtt.port": 1884, "log_level": "debug"})
    assert (cfg.camera.source, cfg.mqtt.port, cfg.log_level) == ("replay:/tmp/x", 1884, "debug")
    assert base == Config(), "the original is unchanged"
    with pytest.raises(ConfigError) as info:
        config.replace(base, **{"mqtt.port": "abc", "store.k": 0})
    assert sorted(info.value.errors) == [
        'mqtt.port: expected an integer 1..65535, got "abc"',
        "store.k: expected an integer 1..100, got 0",
    ]


def test_replace_with_an_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        config.replace(Config(), **{"mqtt.prot": 1})
    assert info.value.errors[0].startswith("mqtt.prot: unknown key")


def test_replace_with_an_unknown_section_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        config.replace(Config(), **{"mqt.port": 1})
    assert info.value.errors[0].startswith("mqt")


# --- files ----------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.errors == [f"{path}: config file not found"]


def test_not_toml(tmp_path):
    path = write(tmp_path, "this is not = = toml\n[")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(f"{path}: not valid TOML (")


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert info.value.errors[0].startswith(f"{tmp_path}: cannot read config file")


# --- the CLI ------------------------------------------------------------------------------------------------


def test_cli_exits_78_with_one_line_per_error(tmp_path, capsys):
    path = write(tmp_path, '[mqtt]\nport = "abc"\nqos = 7\n[store]\nk = 0\nbogus = 1\n')
    rc = main(["classify", str(tmp_path / "x.jpg"), "--config", str(path)])
    assert rc == EX_CONFIG == 78
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines == [
        'edgeknn: mqtt.port: expected an integer 1..65535, got "abc"',
        "edgeknn: mqtt.qos: expected an integer 0..2, got 7",
        "edgeknn: store.k: expected an integer 1..100, got 0",
        lines[3],
    ]
    assert lines[3].startswith("edgeknn: store.bogus: unknown key")
    assert "Traceback" not in err


def test_cli_missing_config_file_exits_78(tmp_path, capsys):
    path = tmp_path / "missing.toml"
    assert (
        main(
            [
                "teach",
                str(tmp_path),
                "--store",
                str(tmp_path / "s.npz"),
                "--class",
                "a",
                "--config",
                str(path),
            ]
        )
        == 78
    )
    assert capsys.readouterr().err == f"edgeknn: {path}: config file not found\n"


def test_store_rule_must_be_a_known_rule():
    from edgeknn.store.head import RULES

    for rule in ("default", *RULES):
        assert config.from_dict({"store": {"rule": rule}}).store.rule == rule
    errors = errors_of({"store": {"rule": "knn"}})
    assert len(errors) == 1 and errors[0].startswith("store.rule: expected one of ")


def test_store_threshold_is_auto_by_default_and_a_number_fixes_it():
    """ "auto": the store calibrates it (StoreSettings.threshold None); a number is used as it is."""
    assert Config().store.threshold == "auto" and Config().store.settings().threshold is None
    fixed = config.from_dict({"store": {"threshold": 0}}).store
    assert fixed.threshold == 0.0 and fixed.settings().threshold == 0.0
    assert config.from_dict({"store": {"threshold": "auto"}}).store.settings().threshold is None
    assert errors_of({"store": {"threshold": "automatic"}}) == [
        'store.threshold: expected a number -1.0..1.0 or "auto", got "automatic"'
    ]
