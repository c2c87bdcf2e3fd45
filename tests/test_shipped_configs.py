"""Every shipped YAML, with each of its fields removed and then mistyped: it loads (a removed field
with a default) or fails with a ConfigError naming that field, never with a traceback."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from recsys_ray.errors import ConfigError
from recsys_ray.serve.api import AppArgs
from recsys_ray.train.config import load_train_config
from recsys_ray.tune.config import load_sweep_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("tune-"))
SWEEPS = sorted(p.name for p in (REPO / "configs").glob("tune-*.yaml"))
SERVE = sorted(p.name for p in (REPO / "serve_configs").glob("*.yaml"))
# values that are wrong for whatever type the field has: a string where a number, bool or list
# belongs, a list where a string belongs, a mapping where a scalar belongs
WRONG = {"str": [1, 2], "int": "many", "float": "lots", "bool": "perhaps", "list": 12345, "dict": "x"}
# free-form fields: any mapping of names (a search-space entry, a resource request)
FREE_FORM = ("tune.space.", "resources_per_worker.", "train.resources_per_worker.")


def leaves(doc: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += leaves(value, f"{path}.")
        out.append((path, value))
    return out


def with_change(doc: dict, path: str, value=None, remove=False) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[key]
    if remove:
        del node[last]
    else:
        node[last] = value
    return doc


def wrong_value(value):
    return WRONG[type(value).__name__] if type(value).__name__ in WRONG else "wrong"


def check_every_field(doc: dict, load, skip=()) -> list[str]:
    """Problems found: a change that crashed, or a mistyped field that loaded or was not named."""
    problems = []
    for path, value in leaves(doc):
        if path.startswith(skip) or path == "train.base":
            continue
        for label, changed in (("removed", with_change(doc, path, remove=True)),
                               ("mistyped", with_change(doc, path, wrong_value(value)))):
            try:
                load(changed)
            except ConfigError as exc:
                if "\n" in str(exc):
                    problems.append(f"{path} {label}: message of several lines")
                if label == "mistyped" and path not in str(exc) and path.split(".")[-1] not in str(exc):
                    problems.append(f"{path} {label}: the error does not name it: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - the point: anything else is a bug
                problems.append(f"{path} {label}: {type(exc).__name__}: {exc}")
                continue
            if label == "mistyped":
                problems.append(f"{path} mistyped as {wrong_value(value)!r}: accepted")
    return problems


@pytest.mark.parametrize("name", TRAIN_PRESETS)
def test_every_field_of_a_training_preset_removed_or_mistyped(name):
    doc = yaml.safe_load((REPO / "configs" / name).read_text())
    assert load_train_config(doc)  # as shipped: valid
    assert not check_every_field(doc, load_train_config, FREE_FORM)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_field_of_a_sweep_removed_or_mistyped(name, monkeypatch):
    monkeypatch.chdir(REPO)
    doc = yaml.safe_load((REPO / "configs" / name).read_text())

    def load(d):
        return load_sweep_config(d, config_dir=REPO / "configs")

    assert load(doc)
    assert not check_every_field(doc, load, FREE_FORM)


def load_app_args(args: dict) -> AppArgs:
    try:
        return AppArgs.model_validate(args)
    except ValidationError as exc:  # what build_app turns it into
        raise ConfigError([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None


@pytest.mark.parametrize("name", SERVE)
def test_every_app_argument_of_a_serve_config_removed_or_mistyped(name):
    doc = yaml.safe_load((REPO / "serve_configs" / name).read_text())
    args = doc["applications"][0]["args"]
    assert load_app_args(args)
    assert not check_every_field(args, load_app_args)
    with pytest.raises(ConfigError, match="checkpoint: Field required"):
        load_app_args(with_change(args, "checkpoint", remove=True))


def test_the_check_itself_catches_a_loader_that_accepts_anything_or_crashes():
    doc = {"a": 1, "b": {"c": "x"}}
    assert len(check_every_field(doc, lambda d: d)) == 3  # a, b.c and b mistyped: all accepted

    def crashes(d):
        return d["a"] + 1

    assert any("KeyError" in p for p in check_every_field(doc, crashes))
