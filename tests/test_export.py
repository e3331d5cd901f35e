"""Exports: every trainer config, applied to the model by that trainer's own rule, selects exactly the selection."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import ila.export as export_module
from conftest import make_tokenizer, tiny_gpt2
from ila.cli import main
from ila.errors import IlaError
from ila.layers import discover_layers
from ila.ranking import rank_layers
from ila.selection import ModelShapes, Selection, load_selection, select, top

LORA_TARGETS = ["peft", "trl", "axolotl", "llama-factory", "ms-swift", "unsloth"]
FULL_TARGETS = ["axolotl", "ms-swift", "spectrum"]


@pytest.fixture(scope="module")
def gpt2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gpt2-export")
    tiny_gpt2().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def fresh(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def save_selection(
    model_dir: Path, folder: Path, scores: str = "random", k: int | float = 0.3, include_lm_head: bool = False
) -> tuple[Path, Selection]:
    model = fresh(model_dir)
    layers = discover_layers(model, include_lm_head)
    if scores == "random":
        rng = random.Random(7)
        values = [rng.random() for _ in layers]
    else:  # "last" or "first": whole blocks from one end
        values = [float(la.block if scores == "last" else -la.block) for la in layers]
    ranking = rank_layers(layers, values, scores, info={"model": str(model_dir)})
    selection = select(ranking, top(k), ModelShapes.of(model, include_lm_head))
    path = folder / f"selection-{scores}.json"
    selection.save(path)
    return path, selection


# The trainers' rules, written out independently of ila.export.


def peft_adapted(model_dir: Path, target_modules: list[str] | str) -> list[str]:
    fan_in_fan_out = "gpt2" in str(model_dir)
    model = get_peft_model(
        fresh(model_dir), LoraConfig(r=2, target_modules=target_modules, fan_in_fan_out=fan_in_fan_out)
    )
    return sorted(model.base_model.targeted_module_names)


def axolotl_rule(model_dir: Path, patterns: list[str]) -> list[str]:
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\\\.", p)) for p in patterns]
    return sorted(n for n, _ in fresh(model_dir).named_parameters() if any(c.match(n) for c in compiled))


def applied(model_dir: Path, target: str, method: str, text: str) -> tuple[list[str], str]:
    """What the trainer would train when given this file: module names (LoRA) or parameter names (full)."""
    data = json.loads(text) if target == "peft" else yaml.safe_load(text)
    if target in ("peft", "unsloth"):
        return peft_adapted(model_dir, data["target_modules"]), "modules"
    if target == "trl":
        value = data["lora_target_modules"]
        assert isinstance(value, list) and len(value) == 1  # TRL turns a one-element list into a regex string
        regex_hits = sorted(n for n, _ in fresh(model_dir).named_modules() if re.fullmatch(value[0], n))
        assert regex_hits == peft_adapted(model_dir, value[0])
        return regex_hits, "modules"
    if target == "axolotl" and method == "lora":
        return peft_adapted(model_dir, data["lora_target_modules"]), "modules"
    if target == "llama-factory" and method == "lora":
        return peft_adapted(model_dir, data["lora_target"].split(",")), "modules"
    if target == "ms-swift" and method == "lora":
        return peft_adapted(model_dir, data["target_regex"]), "modules"
    if target in ("axolotl", "spectrum"):
        return axolotl_rule(model_dir, data["unfrozen_parameters"]), "weights"
    if target == "ms-swift":
        assert data["freeze_parameters_ratio"] == 1.0
        pattern = re.compile(data["trainable_parameters_regex"])
        return sorted(n for n, _ in fresh(model_dir).named_parameters() if pattern.search(n)), "weights"
    raise AssertionError(target)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("target,method", [(t, "lora") for t in LORA_TARGETS] + [(t, "full") for t in FULL_TARGETS])
def test_every_export_round_trips(
    tmp_path: Path, tiny_model_dir: Path, gpt2_model_dir: Path, family: str, target: str, method: str
) -> None:
    model_dir = tiny_model_dir if family == "llama" else gpt2_model_dir
    path, selection = save_selection(model_dir, tmp_path)
    out = tmp_path / f"export-{target}"
    result = export_module.run_export(path, target, out, method=method)  # type: ignore[arg-type]
    assert result.checks and out.is_file()
    got, kind = applied(model_dir, target, method, out.read_text())
    names = selection.names()
    assert got == sorted(names if kind == "modules" else [f"{n}.weight" for n in names])


def test_loaded_model_and_meta_skeleton_agree(tmp_path: Path, tiny_model_dir: Path) -> None:
    path, _ = save_selection(tiny_model_dir, tmp_path)
    loaded = export_module.run_export(path, "trl", tmp_path / "a.yaml", model=str(tiny_model_dir))
    meta = export_module.run_export(path, "trl", tmp_path / "b.yaml", model=str(tiny_model_dir), meta=True)
    assert "(loaded)" in loaded.checks[0] and "meta device" in meta.checks[0]
    assert (tmp_path / "a.yaml").read_text() == (tmp_path / "b.yaml").read_text()


def test_lm_head_in_the_selection(tmp_path: Path, tiny_model_dir: Path) -> None:
    path, selection = save_selection(tiny_model_dir, tmp_path, k=29, include_lm_head=True)
    assert "lm_head" in selection.names()
    for target in ("peft", "trl", "ms-swift"):
        out = tmp_path / f"{target}.out"
        export_module.run_export(path, target, out)
        assert applied(tiny_model_dir, target, "lora", out.read_text())[0] == sorted(selection.names())


def test_llama_factory_freeze_last_and_first_blocks(tmp_path: Path, tiny_model_dir: Path) -> None:
    for scores, expected in (("last", 2), ("first", -2)):
        path, selection = save_selection(tiny_model_dir, tmp_path, scores=scores, k=14)
        out = tmp_path / f"lf-{scores}.yaml"
        result = export_module.run_export(path, "llama-factory", out, method="full")
        data = yaml.safe_load(out.read_text())
        assert data == {
            "finetuning_type": "freeze",
            "freeze_trainable_layers": expected,
            "freeze_trainable_modules": "all",
        }
        blocks = range(2, 4) if expected > 0 else range(2)
        assert {s.block for s in selection.layers} == set(blocks)
        assert any("norm" in note for note in result.notes)  # said honestly: LLaMA-Factory trains the norms too


def test_llama_factory_freeze_refuses_what_it_cannot_express(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = save_selection(tiny_model_dir, tmp_path)  # a random 30%: not a run of whole blocks
    out = tmp_path / "lf.yaml"
    with pytest.raises(IlaError, match="cannot be expressed"):
        export_module.run_export(path, "llama-factory", out, method="full")
    assert not out.exists()
    capsys.readouterr()
    assert (
        main(
            [
                "-q",
                "export",
                "--selection",
                str(path),
                "--to",
                "llama-factory",
                "--method",
                "full",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("broken", ["module_regex", "axolotl_patterns", "parameter_regex"])
def test_a_wrong_export_is_never_written(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    path, _ = save_selection(tiny_model_dir, tmp_path)
    if broken == "axolotl_patterns":
        monkeypatch.setattr(export_module, broken, lambda layers: [f"^{la.name}.weight$" for la in layers[1:]])
        target, method = "axolotl", "full"
    elif broken == "module_regex":
        monkeypatch.setattr(export_module, broken, lambda layers: r"model\.layers\.\d+\.mlp\.up_proj")
        target, method = "ms-swift", "lora"
    else:
        monkeypatch.setattr(export_module, broken, lambda layers: r"mlp")
        target, method = "ms-swift", "full"
    out = tmp_path / "out.yaml"
    with pytest.raises(IlaError, match="export check failed") as err:
        export_module.run_export(path, target, out, method=method)  # type: ignore[arg-type]
    assert "\n" not in str(err.value) and not out.exists()


def test_unsupported_method_and_missing_model_are_errors(
    tmp_path: Path, tiny_model_dir: Path, gpt2_model_dir: Path
) -> None:
    path, selection = save_selection(tiny_model_dir, tmp_path)
    with pytest.raises(IlaError, match="cannot express full"):
        export_module.run_export(path, "peft", tmp_path / "p.json", method="full")
    with pytest.raises(IlaError, match="cannot express lora"):
        export_module.run_export(path, "spectrum", tmp_path / "s.yaml", method="lora")
    with pytest.raises(IlaError, match="does not match"):
        export_module.run_export(path, "peft", tmp_path / "p.json", model=str(gpt2_model_dir))
    selection.model = None
    selection.save(tmp_path / "anonymous.json")
    with pytest.raises(IlaError, match="--model"):
        export_module.run_export(tmp_path / "anonymous.json", "peft", tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
    assert load_selection(tmp_path / "anonymous.json").model is None


def test_cli_export(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, selection = save_selection(tiny_model_dir, tmp_path)
    out = tmp_path / "lora.json"
    assert main(["-q", "export", "--selection", str(path), "--to", "peft", "--lora-r", "4", "--output", str(out)]) == 0
    assert "verified:" in capsys.readouterr().out
    config = LoraConfig(**json.loads(out.read_text()))
    assert config.r == 4 and config.lora_alpha == 8 and sorted(config.target_modules) == sorted(selection.names())
    assert main(["-q", "export", "--selection", str(path), "--to", "peft", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--selection", str(path), "--to", "nonsense", "--output", str(out)])
    assert exit_info.value.code == 2


def test_cli_export_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "llama-factory" in out and "examples:" in out
