"""Config: YAML + dotted overrides into frozen dataclasses; every bad key or value names the dotted key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ila.config import IdentifyConfig, build_config, config_to_dict, load_config, parse_overrides, read_yaml
from ila.errors import IlaError


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_overrides() -> None:
    assert load_config(IdentifyConfig) == IdentifyConfig()


def test_yaml_then_extra_then_overrides(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "stage1:\n  max_steps: 7\n  lr: 1e-4\nstage2:\n  steps: 5\nrun:\n  seed: 3\n")
    cfg = load_config(
        IdentifyConfig,
        path,
        overrides=["stage2.steps=9", "lora.r=4"],
        extra={"run": {"seed": 11}, "data": {"path": "x.jsonl"}},
    )
    assert cfg.stage1.max_steps == 7  # from YAML
    assert cfg.stage2.steps == 9  # override beats YAML
    assert cfg.run.seed == 11  # CLI flag beats YAML
    assert cfg.data.path == "x.jsonl"
    assert cfg.lora.r == 4
    assert cfg.stage1.batch_size == IdentifyConfig().stage1.batch_size  # untouched keys keep defaults


def test_yaml_1e_4_string_becomes_float(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "stage1:\n  lr: 1e-4\n")
    assert read_yaml(path)["stage1"]["lr"] == "1e-4"  # PyYAML's quirk that the config must absorb
    cfg = load_config(IdentifyConfig, path)
    assert isinstance(cfg.stage1.lr, float)
    assert cfg.stage1.lr == pytest.approx(1e-4)
    assert load_config(IdentifyConfig, overrides=["stage2.lr=5e-2"]).stage2.lr == pytest.approx(0.05)


def test_int_given_for_float_field_becomes_float() -> None:
    cfg = load_config(IdentifyConfig, overrides=["stage2.penalty=2"])
    assert cfg.stage2.penalty == 2.0 and isinstance(cfg.stage2.penalty, float)


@pytest.mark.parametrize(
    "override, key",
    [
        ("stage1.lrr=0.1", "stage1.lrr"),
        ("stage3.steps=1", "stage3"),
        ("data.formt=alpaca", "data.formt"),
    ],
)
def test_unknown_key_names_the_dotted_key(override: str, key: str) -> None:
    with pytest.raises(IlaError, match=rf"unknown config key '{key}'"):
        load_config(IdentifyConfig, overrides=[override])


def test_unknown_key_in_yaml_names_the_dotted_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "stage2:\n  sparsty: budget\n")
    with pytest.raises(IlaError, match=r"'stage2\.sparsty'.*allowed: .*stage2\.sparsity"):
        load_config(IdentifyConfig, path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("stage1.max_steps=abc", "stage1.max_steps"),
        ("stage1.max_steps=1.5", "stage1.max_steps"),
        ("stage1.lr=fast", "stage1.lr"),
        ("stage1.lr=true", "stage1.lr"),
        ("model.include_lm_head=maybe", "model.include_lm_head"),
        ("stage1.milestones=[25,abc]", "stage1.milestones"),
        ("data.max_examples=many", "data.max_examples"),
    ],
)
def test_wrong_value_type_names_the_dotted_key(override: str, key: str) -> None:
    with pytest.raises(IlaError, match=rf"^{key}="):
        load_config(IdentifyConfig, overrides=[override])


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(IlaError, match="stage1"):
        load_config(IdentifyConfig, write_yaml(tmp_path, "stage1: 5\n"))


def test_literal_choices_enforced() -> None:
    assert load_config(IdentifyConfig, overrides=["stage2.sparsity=budget"]).stage2.sparsity == "budget"
    with pytest.raises(IlaError, match=r"stage2\.sparsity='lasso'.*penalty, budget, topk"):
        load_config(IdentifyConfig, overrides=["stage2.sparsity=lasso"])
    with pytest.raises(IlaError, match=r"data\.format"):
        load_config(IdentifyConfig, overrides=["data.format=csv"])


@pytest.mark.parametrize("raw", ["[10, 50, 100]", "10,50,100", "(10, 50, 100)"])
def test_tuple_milestones_parsing(raw: str) -> None:
    cfg = load_config(IdentifyConfig, overrides=[f"stage1.milestones={raw}"])
    assert cfg.stage1.milestones == (10, 50, 100)


def test_tuple_milestones_from_yaml_list(tmp_path: Path) -> None:
    cfg = load_config(IdentifyConfig, write_yaml(tmp_path, "stage1:\n  milestones: [20, 40]\n"))
    assert cfg.stage1.milestones == (20, 40)


def test_milestones_outside_percent_range_rejected() -> None:
    with pytest.raises(IlaError, match=r"stage1\.milestones"):
        load_config(IdentifyConfig, overrides=["stage1.milestones=[0,50]"])
    with pytest.raises(IlaError, match=r"stage1\.milestones"):
        load_config(IdentifyConfig, overrides=["stage1.milestones=[50,150]"])


def test_bool_and_none_values() -> None:
    cfg = load_config(
        IdentifyConfig, overrides=["model.include_lm_head=true", "data.max_examples=null", "run.output=none"]
    )
    assert cfg.model.include_lm_head is True
    assert cfg.data.max_examples is None and cfg.run.output is None
    assert load_config(IdentifyConfig, overrides=["data.max_examples=12"]).data.max_examples == 12


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.max_length=4", "data.max_length"),
        ("data.eval_fraction=1.5", "data.eval_fraction"),
        ("lora.r=0", "lora.r"),
        ("stage2.budget=0", "stage2.budget"),
        ("stage2.penalty=-1", "stage2.penalty"),
    ],
)
def test_out_of_range_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(IlaError, match=key.replace(".", r"\.")):
        load_config(IdentifyConfig, overrides=[override])


def test_override_without_equals_sign() -> None:
    with pytest.raises(IlaError, match=r"section\.key=value"):
        parse_overrides(["stage1.lr"])


def test_config_is_frozen() -> None:
    cfg = IdentifyConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.stage1.lr = 0.5  # type: ignore[misc]


def test_round_trip_through_plain_dict() -> None:
    cfg = load_config(IdentifyConfig, overrides=["stage1.milestones=[10,90]", "stage1.lr=3e-3", "run.seed=5"])
    plain = config_to_dict(cfg)
    assert plain["stage1"]["milestones"] == [10, 90]  # YAML-safe: no tuples
    assert build_config(IdentifyConfig, plain) == cfg


def test_config_file_errors_are_ila_errors(tmp_path: Path) -> None:
    with pytest.raises(IlaError, match="config file not found"):
        load_config(IdentifyConfig, tmp_path / "missing.yaml")
    bad = write_yaml(tmp_path, "stage1:\n  lr: 0.1\n  steps: [1, 2\n")
    with pytest.raises(IlaError, match=rf"{bad.name}:\d+: invalid YAML"):
        load_config(IdentifyConfig, bad)
    with pytest.raises(IlaError, match="mapping"):
        load_config(IdentifyConfig, write_yaml(tmp_path, "- a\n- b\n"))


def test_config_classes_share_one_suffix_and_old_names_still_import() -> None:
    import ila.config as config

    classes = [v for v in vars(config).values() if isinstance(v, type) and dataclasses.is_dataclass(v)]
    assert len(classes) >= 12 and all(c.__name__.endswith("Config") for c in classes)
    with pytest.warns(DeprecationWarning, match="LoraSettings is now ila.config.LoraShapeConfig"):
        assert config.LoraSettings is config.LoraShapeConfig
    with pytest.warns(DeprecationWarning, match="FinetuneSettings"):
        assert config.FinetuneSettings is config.TrainingConfig
    with pytest.raises(AttributeError):
        _ = config.NoSuchSettings
