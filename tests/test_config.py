"""Config machinery: typed dotted overrides, validation errors that name the key, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from fastllm import config as cfg


@dataclass(frozen=True)
class Inner:
    theta: float = 10000.0
    names: tuple[str, ...] = ("a", "b")

    def __post_init__(self):
        cfg.require(self.theta > 0, "theta", f"must be > 0, got {self.theta}")


@dataclass(frozen=True)
class Outer:
    steps: int = 10
    lr: float = 1e-3
    flag: bool = False
    name: str = "x"
    mode: Literal["fast", "slow"] = "fast"
    stage: Literal[0, 1, 2] = 0
    window: Optional[int] = None
    betas: tuple[float, float] = (0.9, 0.95)
    inner: Inner = field(default_factory=Inner)
    extra: Optional[Inner] = None


def test_overrides_parse_by_field_type():
    out = cfg.apply_overrides(Outer(), [
        "steps=1e3", "lr=3e-4", "flag=true", "name=hello=world", "mode=slow", "stage=2",
        "window=128", "betas=0.8,0.99", "inner.theta=5e5", "inner.names=[p, q, r]",
    ])
    assert out.steps == 1000 and isinstance(out.steps, int)
    assert out.lr == 3e-4 and out.flag is True and out.name == "hello=world"
    assert out.mode == "slow" and out.stage == 2 and out.window == 128
    assert out.betas == (0.8, 0.99) and out.inner == Inner(5e5, ("p", "q", "r"))
    assert cfg.apply_overrides(out, ["window=none"]).window is None


def test_optional_section_comes_alive_when_a_field_is_set():
    out = cfg.apply_overrides(Outer(), ["extra.theta=2"])
    assert out.extra == Inner(theta=2.0)
    assert cfg.apply_overrides(out, ["extra=null"]).extra is None


@pytest.mark.parametrize("override, message", [
    ("stepz=1", "unknown config key 'stepz'"),
    ("inner.thta=1", "unknown config key 'inner.thta'"),
    ("steps.sub=1", "'steps' is a value, not a section"),
    ("steps=ten", "bad value for steps='ten'"),
    ("steps=1.5", "expected an integer"),
    ("flag=maybe", "expected a boolean"),
    ("mode=medium", "must be one of \\['fast', 'slow'\\]"),
    ("stage=3", "bad value for stage"),
    ("betas=0.9", "expected 2 comma-separated values"),
    ("inner=3", "is a section"),
    ("inner.theta=-1", "invalid inner.theta='-1': theta: must be > 0"),
    ("steps", "must look like key.sub=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.apply_overrides(Outer(), [override])


def test_json_round_trip_and_unknown_keys():
    original = cfg.apply_overrides(Outer(), ["extra.theta=3", "window=7"])
    data = json.loads(json.dumps(cfg.to_dict(original)))
    assert cfg.from_dict(Outer, data) == original
    with pytest.raises(cfg.ConfigError, match="unknown config key 'inner.bogus'"):
        cfg.from_dict(Outer, {"inner": {"bogus": 1}})


def test_partial_merge_keeps_unset_fields():
    partial_cls = dataclasses.make_dataclass("P", cfg.partial_fields(Outer), frozen=True)
    partial = cfg.apply_overrides(partial_cls(), ["steps=5", "inner.theta=7"])
    merged = cfg.merge_partial(Outer(name="base", inner=Inner(names=("z",))), partial)
    assert merged.steps == 5 and merged.name == "base"
    assert merged.inner == Inner(theta=7.0, names=("z",))


def test_schema_lists_leaf_keys_with_defaults():
    rows = {key: (tp, default) for key, tp, default in cfg.schema(Outer)}
    assert rows["inner.theta"] == ("float", 10000.0)
    assert rows["extra.theta"][1] == 10000.0
    assert "inner" not in rows


def test_load_recipe_from_file(tmp_path):
    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(
        "from dataclasses import dataclass\n"
        "@dataclass(frozen=True)\n"
        "class C:\n    steps: int = 1\n    name: str = 'r'\n"
        "def config():\n    return C(steps=4)\n"
    )
    module, config = cfg.load_recipe(recipe, ["name=s"])
    assert config.steps == 4 and config.name == "s" and hasattr(module, "config")
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load_recipe(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(cfg.ConfigError, match="must define a function config"):
        cfg.load_recipe(tmp_path / "empty.py")


@dataclass(frozen=True)
class Item:
    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class Holder:
    items: tuple[Item, ...] = ()

    def __post_init__(self):  # owners coerce bare strings into items, as DataConfig does
        object.__setattr__(self, "items", tuple(Item(i) if isinstance(i, str) else i for i in self.items))


def test_tuple_of_dataclasses_from_strings_or_json():
    assert cfg.apply_overrides(Holder(), ["items=a,b"]).items == (Item("a"), Item("b"))
    parsed = cfg.apply_overrides(Holder(), ['items=[{"path": "a", "weight": 0.5}]'])
    assert parsed.items == (Item("a", 0.5),)
    assert cfg.from_dict(Holder, cfg.to_dict(parsed)) == parsed


@dataclass(frozen=True)
class Pair:
    low: int = 0
    high: int = 10

    def __post_init__(self):
        cfg.require(self.low <= self.high, "low", f"{self.low} exceeds high={self.high}")


def test_overrides_are_validated_together_not_one_by_one():
    assert cfg.apply_overrides(Pair(), ["high=30", "low=20"]) == Pair(20, 30)
    assert cfg.apply_overrides(Pair(), ["low=20", "high=30"]) == Pair(20, 30)
    with pytest.raises(cfg.ConfigError, match=r"after overrides \[low=20 high=15\]: low: 20 exceeds high=15"):
        cfg.apply_overrides(Pair(), ["low=20", "high=15"])


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN", "1e999"])
def test_floats_must_be_finite(text):
    """A comparison such as ``theta > 0`` lets inf through; nan fails none: the parser refuses both."""
    with pytest.raises(cfg.ConfigError, match=f"expected a finite number, got '{text}'"):
        cfg.apply_overrides(Outer(), [f"inner.theta={text}"])
    with pytest.raises(cfg.ConfigError, match="expected a finite number"):
        cfg.apply_overrides(Outer(), [f"betas=0.9,{text}"])
    with pytest.raises(cfg.ConfigError, match="lr: expected a finite number"):
        cfg.from_dict(Outer, {"lr": float(text)})


@pytest.mark.parametrize("source, message", [
    ("def config(:\n", r"recipe '.*r.py', line 1: "),
    ("import no_such_module_xyz\n", r"line 1: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("def config():\n    return dict(lr=undefined)\n", r"line 2: NameError: name 'undefined'"),
    ("def config():\n    return 3\n", "config\\(\\) returned a int, expected a config dataclass"),
    ("x = 1\n", r"must define a function config\(\)"),
])
def test_bad_recipes_are_config_errors_naming_the_line(tmp_path, source, message):
    (tmp_path / "r.py").write_text(source)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.load_recipe(tmp_path / "r.py")


def test_a_bug_below_the_recipe_keeps_its_traceback(tmp_path):
    """An exception of another type raised inside fastllm (not the recipe's own code) is a bug."""
    (tmp_path / "r.py").write_text("from fastllm import config as c\n\n"
                                   "def config():\n    return c.merge_partial(3, 4, ['x'])\n")
    with pytest.raises(AttributeError):
        cfg.load_recipe(tmp_path / "r.py")
