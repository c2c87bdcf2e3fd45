import pytest
import yaml

from recsys_ray.config import build_config, load_yaml
from recsys_ray.data.config import DataConfig
from recsys_ray.errors import ConfigError


def test_defaults_build():
    cfg = build_config(DataConfig, {})
    assert cfg.dataset == "movielens-100k" and cfg.max_history == 20


def test_overrides_reach_nested_fields():
    cfg = build_config(DataConfig, {"negatives": 2}, ["synthetic.num_users=7", "columns.value=rating", "seed=3"])
    assert (cfg.synthetic.num_users, cfg.columns.value, cfg.seed, cfg.negatives) == (7, "rating", 3, 2)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        build_config(DataConfig, {"negativs": 3, "max_history": "ten", "negative_sampling": "hard", "synthetic": {"num_user": 1}})
    problems = info.value.problems
    assert any("negativs: unknown key" in p for p in problems)
    assert any("max_history: expected int" in p for p in problems)
    assert any("negative_sampling: expected one of" in p for p in problems)
    assert any("synthetic.num_user: unknown key" in p for p in problems)
    assert len(problems) == 4


def test_value_problems_are_listed_together():
    with pytest.raises(ConfigError) as info:
        build_config(DataConfig, {"max_history": 0, "negatives": -1, "min_user_events": 2})
    text = str(info.value)
    assert "max_history must be >= 1" in text and "negatives must be >= 0" in text and "min_user_events" in text


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        build_config(DataConfig, {}, ["seed"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(bad)


def test_yaml_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"dataset": "synthetic", "synthetic": {"num_users": 10, "num_events": 50}}))
    cfg = build_config(DataConfig, load_yaml(p))
    assert cfg.synthetic.num_users == 10


def test_range_rules_name_the_field_by_its_path():
    from recsys_ray.config import rule_holds
    from recsys_ray.train.config import load_train_config

    assert rule_holds(0.0, "[0, 1)") and not rule_holds(1.0, "[0, 1)") and rule_holds(1.0, "[0, 1]")
    assert rule_holds(2, ">= 2") and not rule_holds(0, "> 0") and rule_holds(-1, "< 0")
    with pytest.raises(ValueError, match="not a range rule"):
        rule_holds(1, "about 3")
    with pytest.raises(ConfigError) as err:
        load_train_config({"batch_size": 0, "optim": {"lr": 0, "warmup_ratio": 1.0}, "model": {"dropout": 1.5}})
    assert err.value.problems == [
        "batch_size must be >= 1, got 0",
        "model.dropout must be in [0, 1), got 1.5",
        "optim.lr must be > 0, got 0.0",
        "optim.warmup_ratio must be in [0, 1), got 1.0",
    ]


def test_yaml_scalars_of_another_type_are_read_as_the_field_means():
    """YAML 1.1 reads 1e-12 as a str and an ISO time as a datetime; a float field takes the number,
    a str field the text; a str that is no number stays an error."""
    from recsys_ray.train.config import TrainConfig

    assert build_config(TrainConfig, {}, ["optim.lr=1e-12"]).optim.lr == 1e-12
    assert build_config(DataConfig, {}, ["cutoff=1998-03-01T00:00:00Z"]).cutoff == "1998-03-01T00:00:00+00:00"
    assert build_config(DataConfig, {}, ["cutoff=891382271"]).cutoff == "891382271"
    with pytest.raises(ConfigError, match="optim.lr: expected float, got 'abc'"):
        build_config(TrainConfig, {}, ["optim.lr=abc"])
    with pytest.raises(ConfigError, match="seed: expected int"):
        build_config(DataConfig, {}, ["seed=1.5"])
