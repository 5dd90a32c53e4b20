import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from shin_common import ConfigError, add_config_options, config_from_args, config_keys, config_to_dict, load_config


@dataclass(kw_only=True)
class Optim:
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(kw_only=True)
class Train:
    epochs: int = 10
    method: Literal["sgd", "sam"] = "sgd"
    widths: list[int] = field(default_factory=lambda: [8, 16])
    out: Path | None = None
    verbose: bool = False
    pattern: str = "unstructured"
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nmethod: sam\npattern: 4:8\noptim:\n  lr: 0.5\n")
    cfg = load_config(Train, path, ["optim.lr=1e-3", "widths=[4, 32]", "verbose=true", "out=runs/a", "pattern=2:4"])
    assert cfg == Train(
        epochs=3,
        method="sam",
        widths=[4, 32],
        out=Path("runs/a"),
        verbose=True,
        pattern="2:4",
        optim=Optim(lr=1e-3),
    )


def test_json_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 2, "optim": {"betas": [0.5, 0.6]}}))
    assert load_config(Train, path).optim.betas == (0.5, 0.6)


def test_round_trip_through_dict():
    cfg = Train(epochs=4, out=Path("x"), optim=Optim(lr=0.2))
    assert load_config(Train, defaults=config_to_dict(cfg)) == cfg
    again = load_config(Train, defaults=config_to_dict(cfg), overrides=["epochs=5"])
    assert again == Train(epochs=5, out=Path("x"), optim=Optim(lr=0.2))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epochs=ten"], r"epochs='ten': expected an integer"),
        (["epochs=1.5"], r"epochs=1.5: expected an integer"),
        (["method=adam"], r"method='adam': expected one of 'sgd', 'sam'"),
        (["optim.lr=fast"], r"optim.lr='fast': expected a number"),
        (["widths=[1, x]"], r"widths\[1\]='x': expected an integer"),
        (["optim.betas=[0.9]"], r"optim.betas=\[0.9\]: expected 2 items"),
        (["verbose=maybe"], r"verbose='maybe': expected a boolean"),
        (["epoch=3"], r"unknown config key epoch; expected one of epochs, method"),
        (["optim.momentum=0.9"], r"unknown config key optim.momentum"),
        (["epochs=0"], r"epochs must be positive, got 0"),
        (["epochs"], r"override 'epochs' is not of the form key=value"),
    ],
)
def test_bad_overrides_name_key_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Train, overrides=overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Train, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping, got list"):
        load_config(Train, tmp_path / "list.yaml")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="is not valid json"):
        load_config(Train, tmp_path / "bad.json")


def test_overrides_reach_nested_configs_by_dotted_keys():
    cfg = load_config(Train, overrides=["optim.lr=0.5", "--epochs=3", "widths=[1,2]"])
    assert (cfg.optim.lr, cfg.epochs, cfg.widths) == (0.5, 3, [1, 2])


def test_n_m_patterns_stay_strings_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pattern: 4:8\n")
    assert load_config(Train, path).pattern == "4:8"
    assert load_config(Train, overrides=["pattern=2:4"]).pattern == "2:4"


@pytest.mark.parametrize(
    "text",
    ["0x10", "010", "1_000", "1.10", "1e3", "yes", "on", "true", "null", "~", "0b11", "run #3", "#3", "[a", "-0"],
)
def test_str_field_keeps_the_override_text_exactly(text):
    assert load_config(Train, overrides=[f"pattern={text}"]).pattern == text
    assert load_config(Train, overrides=[f"pattern='{text}'"]).pattern == text  # quoting still works


def test_str_items_of_a_list_keep_their_text():
    @dataclass
    class Names:
        names: list[str] = field(default_factory=list)
        by_key: dict[str, str] = field(default_factory=dict)

    cfg = load_config(Names, overrides=["names=[0x10, yes, '007', 1.50]", "by_key={a: 010, b: off}"])
    assert cfg.names == ["0x10", "yes", "007", "1.50"]
    assert cfg.by_key == {"a": "010", "b": "off"}


@dataclass
class Unions:
    label: str | int = 0
    lr: float | str = 0.1
    tag: str | None = None
    out: Path | None = None
    mode: Literal["007", "fast"] = "fast"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("label=10", 10),
        ("label=-3", -3),
        ("label=010", "010"),  # an int would lose the leading zero
        ("label=0x10", "0x10"),
        ("label=1_000", "1_000"),
        ("label='10'", "10"),  # quoted: text
        ("label=null", "null"),
        ("label=ten", "ten"),
        ("lr=1e-3", 0.001),
        ("lr=0.5", 0.5),
        ("lr=auto", "auto"),
        ("lr='0.5'", "0.5"),
        ("lr=010", "010"),
        ("tag=null", None),
        ("tag=NULL", None),
        ("tag=~", None),
        ("tag='null'", "null"),
        ("tag=#3", "#3"),  # all comment to YAML, but not spelled as null: the text, as for a str field
        ("tag=run #3", "run #3"),
        ("tag=", ""),  # an empty value is the empty string, as for a str field
        ("tag=!!str 10", "10"),
        ("label=!!str 10", "10"),  # an explicit tag decides the type
        ("label=!!int 010", 8),
        ("tag=0x10", "0x10"),
        ("out=2024", Path("2024")),
        ("out=1_000", Path("1_000")),
        ("out=null", None),
        ("mode=007", "007"),
    ],
)
def test_unions_with_str_prefer_the_other_type_only_when_spelled_plainly(override, expected):
    key = override.split("=", 1)[0]
    value = getattr(load_config(Unions, overrides=[override]), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("text", "expected"), [("!!str 10", "10"), ("!!str 0x10", "0x10"), ("!!int 10", "10")])
def test_an_explicit_tag_on_a_str_override_is_not_kept_as_text(text, expected):
    assert load_config(Train, overrides=[f"pattern={text}"]).pattern == expected


def test_a_comment_is_not_null_for_an_optional_number():
    @dataclass
    class Optional:
        count: int | None = 1

    assert load_config(Optional, overrides=["count=null"]).count is None
    with pytest.raises(ConfigError, match=r"count='#3': expected int \| None"):
        load_config(Optional, overrides=["count=#3"])


def test_non_str_values_from_files_and_round_trips_keep_their_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("label: 7\nlr: 0.25\n")
    cfg = load_config(Unions, path)
    assert (cfg.label, cfg.lr) == (7, 0.25) and type(cfg.label) is int
    assert load_config(Unions, overrides=["label=5", "tag=x"]) == Unions(label=5, tag="x")


def test_non_str_fields_still_read_yaml_numbers():
    cfg = load_config(Train, overrides=["epochs=0x10", "optim.lr=1_0", "verbose=yes"])
    assert (cfg.epochs, cfg.optim.lr, cfg.verbose) == (16, 10.0, True)


@dataclass
class Derived:
    width: int = 4
    inner: Optim = field(default_factory=Optim)
    area: int = field(init=False)

    def __post_init__(self):
        self.area = self.width * self.width


def test_init_false_fields_are_computed_not_set():
    cfg = load_config(Derived, overrides=["width=5", "inner.lr=0.2"])
    assert (cfg.width, cfg.area, cfg.inner.lr) == (5, 25, 0.2)
    with pytest.raises(ConfigError, match=r"config key area cannot be set: Derived computes it \(init=False\)"):
        load_config(Derived, overrides=["area=1"])


def _command_line():
    import argparse

    parser = argparse.ArgumentParser(prog="tool")
    add_config_options(parser, Train)
    parser.add_argument("--lr", type=float, help="optim.lr")
    parser.add_argument("--epochs", type=int)
    return parser


def test_config_grammar_file_then_named_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\noptim:\n  lr: 0.3\n")
    args = _command_line().parse_args(["--config", str(path), "--lr", "0.01", "--set", "method=sam"])
    cfg = config_from_args(Train, args, named={"optim.lr": args.lr, "epochs": args.epochs})
    # the file's epochs stays (its flag was not given); the named flag beats the file; --set adds
    assert (cfg.epochs, cfg.optim.lr, cfg.method) == (7, 0.01, "sam")


def test_a_key_given_by_its_flag_and_by_set_is_refused():
    args = _command_line().parse_args(["--lr", "0.01", "--set", "optim.lr=0.2"])
    with pytest.raises(ConfigError, match=r"optim.lr is set twice"):
        config_from_args(Train, args, named={"optim.lr": args.lr})


def test_help_lists_every_config_key_with_its_default():
    text = _command_line().format_help()
    for key, _kind, default in config_keys(Train):
        assert f"  {key} (" in text and json.dumps(config_to_dict({"v": default})["v"]) in text
    assert "optim.lr (float) = 0.1" in text and "--set KEY=VALUE" in text
