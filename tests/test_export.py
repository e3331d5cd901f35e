"""Exports: every trainer config, applied to the model by that trainer's own rule, selects exactly the selection."""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import ila.export as export_module
from ila.cli import main
from ila.commands.export import run_export
from ila.errors import IlaError
from ila.layers import discover_layers
from ila.ranking import rank_layers
from ila.selection import ModelShapes, Selection, load_selection, select, top
from tiny_models import VOCAB_SIZE, make_tokenizer, tiny_gpt2, tiny_llama, tiny_qwen2

LORA_TARGETS = ["peft", "trl", "axolotl", "llama-factory", "ms-swift", "unsloth"]
FULL_TARGETS = ["axolotl", "ms-swift", "spectrum", "trl"]


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


def planted_selection(model: torch.nn.Module, names: list[str], label: str = "tiny") -> Selection:
    """A selection of exactly these module names (they are ranked first)."""
    layers = discover_layers(model)
    values = [1.0 if la.name in names else 0.0 for la in layers]
    ranking = rank_layers(layers, values, "planted", info={"model": label})
    selection = select(ranking, top(len(names)), ModelShapes.of(model))
    assert sorted(selection.names()) == sorted(names)
    return selection


# The trainers' rules, written out independently of ila.export.


def peft_adapted(model_dir: Path, target_modules: list[str] | str) -> list[str]:
    fan_in_fan_out = "gpt2" in str(model_dir)
    model = get_peft_model(
        fresh(model_dir), LoraConfig(r=2, target_modules=target_modules, fan_in_fan_out=fan_in_fan_out)
    )
    return sorted(model.base_model.targeted_module_names)


def axolotl_rule(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\\\.", p)) for p in patterns]
    return sorted(n for n, _ in model.named_parameters() if any(c.match(n) for c in compiled))


def substring_rule(model: torch.nn.Module, entries: list[str]) -> list[str]:
    """Spectrum's README recipe for trainers other than axolotl: `if any(unfrozen_param in name ...)`."""
    return sorted(n for n, _ in model.named_parameters() if any(e in n for e in entries))


def plain_match_rule(model: torch.nn.Module, entries: list[str]) -> list[str]:
    return sorted(n for n, _ in model.named_parameters() if any(re.match(e, n) for e in entries))


def axolotl_lora_rule(model_dir: Path, config: dict[str, Any]) -> list[str]:
    """axolotl's load_lora: lora_target_modules, plus every linear layer's last name part (not lm_head) when
    lora_target_linear is true."""
    targets = list(config.get("lora_target_modules") or [])
    if config.get("lora_target_linear"):
        model = fresh(model_dir)
        linear = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        targets = list(set(targets) | (linear - {"lm_head"}))
    return peft_adapted(model_dir, targets)


def recipe_trainable(text: str, model: torch.nn.Module) -> list[str]:
    """Run the exported requires_grad recipe as a user would and return what trains."""
    namespace: dict[str, Any] = {}
    exec(compile(text, "freeze_selection.py", "exec"), namespace)
    namespace["freeze_all_but_selection"](model)
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def applied(model_dir: Path, target: str, method: str, text: str) -> tuple[list[str], str]:
    """What the trainer would train when given this file: module names (LoRA) or parameter names (full)."""
    if target == "trl" and method == "full":
        return recipe_trainable(text, fresh(model_dir)), "weights"
    data = json.loads(text) if target == "peft" else yaml.safe_load(text)
    if target == "unsloth":
        assert data["lora_dropout"] == 0 and data["bias"] == "none"  # unsloth's fused kernels need both
    if target in ("peft", "unsloth"):
        return peft_adapted(model_dir, data["target_modules"]), "modules"
    if target == "trl":
        value = data["lora_target_modules"]
        assert isinstance(value, list) and len(value) == 1  # TRL turns a one-element list into a regex string
        regex_hits = sorted(n for n, _ in fresh(model_dir).named_modules() if re.fullmatch(value[0], n))
        assert regex_hits == peft_adapted(model_dir, value[0])
        return regex_hits, "modules"
    if target == "axolotl" and method == "lora":
        # Merged into a config that sets lora_target_linear: true, as many of axolotl's examples do.
        return axolotl_lora_rule(model_dir, {"lora_target_linear": True, **data}), "modules"
    if target == "llama-factory" and method == "lora":
        return peft_adapted(model_dir, data["lora_target"].split(",")), "modules"
    if target == "ms-swift" and method == "lora":
        return peft_adapted(model_dir, data["target_regex"]), "modules"
    if target == "spectrum":
        model, entries = fresh(model_dir), data["unfrozen_parameters"]
        got = axolotl_rule(model, entries)
        assert substring_rule(model, entries) == got and plain_match_rule(model, entries) == got
        return got, "weights"
    if target == "axolotl":
        return axolotl_rule(fresh(model_dir), data["unfrozen_parameters"]), "weights"
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
    result = run_export(path, target, out, method=method)  # type: ignore[arg-type]
    assert result.checks and out.is_file()
    got, kind = applied(model_dir, target, method, out.read_text())
    names = selection.names()
    assert got == sorted(names if kind == "modules" else [f"{n}.weight" for n in names])


def test_loaded_model_and_meta_skeleton_agree(tmp_path: Path, tiny_model_dir: Path) -> None:
    path, _ = save_selection(tiny_model_dir, tmp_path)
    loaded = run_export(path, "trl", tmp_path / "a.yaml", model=str(tiny_model_dir))
    meta = run_export(path, "trl", tmp_path / "b.yaml", model=str(tiny_model_dir), meta=True)
    assert "(loaded)" in loaded.checks[0] and "meta device" in meta.checks[0]
    assert (tmp_path / "a.yaml").read_text() == (tmp_path / "b.yaml").read_text()


def test_lm_head_in_the_selection(tmp_path: Path, tiny_model_dir: Path) -> None:
    path, selection = save_selection(tiny_model_dir, tmp_path, k=29, include_lm_head=True)
    assert "lm_head" in selection.names()
    for target in ("peft", "trl", "ms-swift"):
        out = tmp_path / f"{target}.out"
        run_export(path, target, out)
        assert applied(tiny_model_dir, target, "lora", out.read_text())[0] == sorted(selection.names())


def test_llama_factory_freeze_last_and_first_blocks(tmp_path: Path, tiny_model_dir: Path) -> None:
    for scores, expected in (("last", 2), ("first", -2)):
        path, selection = save_selection(tiny_model_dir, tmp_path, scores=scores, k=14)
        out = tmp_path / f"lf-{scores}.yaml"
        result = run_export(path, "llama-factory", out, method="full")
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
        run_export(path, "llama-factory", out, method="full")
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


@pytest.mark.parametrize("broken", ["module_regex", "axolotl_patterns", "parameter_regex", "spectrum_entries"])
def test_a_wrong_export_is_never_written(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    path, _ = save_selection(tiny_model_dir, tmp_path)
    if broken == "axolotl_patterns":
        monkeypatch.setattr(export_module, broken, lambda layers: [f"^{la.name}.weight$" for la in layers[1:]])
        target, method = "axolotl", "full"
    elif broken == "spectrum_entries":  # the old anchored form: fine for axolotl, nothing for the substring rule
        monkeypatch.setattr(export_module, broken, lambda layers: [f"^{la.name}.weight$" for la in layers])
        target, method = "spectrum", "full"
    elif broken == "module_regex":
        monkeypatch.setattr(export_module, broken, lambda layers: r"model\.layers\.\d+\.mlp\.up_proj")
        target, method = "ms-swift", "lora"
    else:
        monkeypatch.setattr(export_module, broken, lambda layers: r"mlp")
        target, method = "ms-swift", "full"
    out = tmp_path / "out.yaml"
    with pytest.raises(IlaError, match="export check failed") as err:
        run_export(path, target, out, method=method)  # type: ignore[arg-type]
    assert "\n" not in str(err.value) and not out.exists()


def test_unsupported_method_and_missing_model_are_errors(
    tmp_path: Path, tiny_model_dir: Path, gpt2_model_dir: Path
) -> None:
    path, selection = save_selection(tiny_model_dir, tmp_path)
    with pytest.raises(IlaError, match="cannot express full"):
        run_export(path, "peft", tmp_path / "p.json", method="full")
    with pytest.raises(IlaError, match="cannot express lora"):
        run_export(path, "spectrum", tmp_path / "s.yaml", method="lora")
    with pytest.raises(IlaError, match="does not match"):
        run_export(path, "peft", tmp_path / "p.json", model=str(gpt2_model_dir))
    selection.model = None
    selection.save(tmp_path / "anonymous.json")
    with pytest.raises(IlaError, match="--model"):
        run_export(tmp_path / "anonymous.json", "peft", tmp_path / "p.json")
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


# ------------------------------------------------------------------------------- issue #14: quiet wrong trainings


def test_axolotl_lora_survives_lora_target_linear(tmp_path: Path, tiny_model_dir: Path) -> None:
    path, selection = save_selection(tiny_model_dir, tmp_path)
    out = tmp_path / "axolotl.yaml"
    run_export(path, "axolotl", out)
    text = out.read_text()
    fragment = yaml.safe_load(text)
    assert fragment["lora_target_linear"] is False
    assert re.search(r"^lora_target_linear: false  # .*every linear layer", text, re.MULTILINE)
    example = {"base_model": "x", "adapter": "qlora", "lora_target_linear": True}  # like axolotl's examples
    assert axolotl_lora_rule(tiny_model_dir, {**example, **fragment}) == sorted(selection.names())
    # Without the key, merging would quietly put LoRA on every linear layer of every block.
    old = {k: v for k, v in fragment.items() if k != "lora_target_linear"}
    assert len(axolotl_lora_rule(tiny_model_dir, {**example, **old})) == 28 > len(selection.names())


def unsloth_rule(model: torch.nn.Module, target_modules: list[str], dropout: float) -> dict[int, set[str]]:
    """Per block, the module types unsloth's patch_peft_model fuses: only with dropout 0; q/k/v together, o alone,
    gate/up/down together, each with LoRA and no base bias."""
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=target_modules, lora_dropout=dropout))
    groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj", "down_proj")]
    fused: dict[int, set[str]] = {}
    for idx, block in enumerate(peft_model.base_model.model.model.layers):
        for group in groups:
            parent, prefix = (block.mlp, "mlp") if group[0] == "gate_proj" else (block.self_attn, "self_attn")
            modules = [getattr(parent, name) for name in group]
            if dropout == 0 and all(hasattr(m, "lora_A") and getattr(m, "base_layer", m).bias is None for m in modules):
                fused.setdefault(idx, set()).update(f"{prefix}.{name}" for name in group)
    return fused


UNSLOTH_PICK = [
    "model.layers.0.self_attn.q_proj",  # block 0: q/k/v and o complete -> all fused
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.1.self_attn.q_proj",  # block 1: q/k without v -> slow; the whole MLP -> fused
    "model.layers.1.self_attn.k_proj",
    "model.layers.1.mlp.gate_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.3.mlp.up_proj",  # block 3: a lone MLP projection -> slow
]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_unsloth_dropout_zero_and_fused_path_per_block(family: str) -> None:
    model = tiny_llama() if family == "llama" else tiny_qwen2()
    selection = planted_selection(model, UNSLOTH_PICK)
    result = export_module.export_selection(selection, "unsloth", model, "tiny")
    data = yaml.safe_load(result.text)
    assert data["lora_dropout"] == 0 and data["bias"] == "none"
    expected = unsloth_rule(copy.deepcopy(model), data["target_modules"], data["lora_dropout"])
    by_block = {p.block: p for p in result.unsloth_paths}
    assert sorted(by_block) == [0, 1, 3]
    for block, path in by_block.items():
        chosen = {la.module_type for la in selection.layers if la.block == block}
        assert set(path.fused) == expected.get(block, set()) and set(path.slow) == chosen - set(path.fused)
        assert any(f"block {block}: " in line for line in result.notes)
        assert f"#   block {block}: " in result.text
    assert "mlp.up_proj" in by_block[3].slow and "self_attn.q_proj" in by_block[1].slow
    if family == "llama":
        assert by_block[0].slow == [] and sorted(by_block[1].fused) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    else:  # Qwen2's q/k/v have biases: never fused, whatever is selected
        assert by_block[0].fused == ["self_attn.o_proj"]


def test_unsloth_with_dropout_fuses_nothing_and_says_so(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    selection = planted_selection(fresh(tiny_model_dir), UNSLOTH_PICK, str(tiny_model_dir))
    selection.save(tmp_path / "s.json")
    out = tmp_path / "unsloth.yaml"
    args = ["-q", "export", "--selection", str(tmp_path / "s.json"), "--to", "unsloth", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "note: unsloth fast path: 7 of 10 selected modules run fused" in printed
    assert "note: block 3: slow mlp.up_proj" in printed
    assert main([*args, "--overwrite", "--lora-dropout", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "0 of 10 selected modules run fused" in printed and "fused self_attn" not in printed
    assert yaml.safe_load(out.read_text())["lora_dropout"] == 0.05


def test_unsloth_refuses_the_output_head(tmp_path: Path, tiny_model_dir: Path) -> None:
    path, selection = save_selection(tiny_model_dir, tmp_path, k=29, include_lm_head=True)
    assert "lm_head" in selection.names()
    with pytest.raises(IlaError, match="modules_to_save"):
        run_export(path, "unsloth", tmp_path / "u.yaml")
    assert not (tmp_path / "u.yaml").exists()


def test_spectrum_entries_select_the_same_weights_under_both_rules() -> None:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=12,  # blocks 1 and 11: "layers.1." must not reach "layers.11."
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pick = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.11.mlp.down_proj"]
    selection = planted_selection(model, pick)
    result = export_module.export_selection(selection, "spectrum", model, "tiny-12")
    entries = yaml.safe_load(result.text)["unfrozen_parameters"]
    weights = sorted(f"{name}.weight" for name in pick)
    assert axolotl_rule(model, entries) == substring_rule(model, entries) == plain_match_rule(model, entries) == weights
    assert len(result.checks) == 3
    anchored = [f"^{name}.weight$" for name in pick]  # the old form: right for axolotl, nothing for the README rule
    assert axolotl_rule(model, anchored) == weights and substring_rule(model, anchored) == []
    assert "SpectrumPlugin" in result.text and any("overwrites unfrozen_parameters" in n for n in result.notes)


@pytest.mark.parametrize("extra", ["prefix", "inside"])
def test_spectrum_refuses_when_no_entries_can_select_exactly(extra: str) -> None:
    model = tiny_llama()
    selection = planted_selection(model, ["model.layers.2.mlp.up_proj"])
    if extra == "prefix":  # e.g. a quantization scale next to the weight: every rule catches it
        model.model.layers[2].mlp.up_proj.register_parameter("weight_scale", torch.nn.Parameter(torch.ones(1)))
        rule, culprit = "axolotl rule", "model.layers.2.mlp.up_proj.weight_scale"
    else:  # e.g. an EMA copy of the decoder: only the substring rule catches it
        model.add_module("ema", torch.nn.Module())
        model.ema.add_module("model", copy.deepcopy(model.model))
        rule, culprit = "entry in name", "ema.model.layers.2.mlp.up_proj.weight"
    with pytest.raises(IlaError, match="export check failed") as err:
        export_module.export_selection(selection, "spectrum", model, "tiny")
    message = str(err.value)
    assert rule in message and culprit in message and "no unfrozen_parameters list" in message


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trl_full_recipe_freezes_exactly_the_selection(tmp_path: Path, family: str) -> None:
    model = tiny_llama() if family == "llama" else tiny_gpt2()
    layers = discover_layers(model)
    names = [la.name for la in layers[1::3]]
    selection = planted_selection(model, names)
    result = export_module.export_selection(selection, "trl", model, "tiny", "full")
    assert all(p.requires_grad for p in model.parameters())  # the check ran on the model and put its flags back
    assert "huggingface/trl#2504" in result.text and "ds_numel" in result.text
    compile(result.text, "freeze_selection.py", "exec")
    weights = sorted(f"{name}.weight" for name in names)

    user_model = tiny_llama(seed=1) if family == "llama" else tiny_gpt2(seed=1)  # a fresh model, as a user has
    assert recipe_trainable(result.text, user_model) == weights
    trainable = [p for p in user_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == selection.trainable_params["full"]
    # One optimizer step: exactly the selected weights change, everything else stays bit-identical.
    before = {n: p.detach().clone() for n, p in user_model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, VOCAB_SIZE, (2, 8))
    user_model.train()
    user_model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = sorted(n for n, p in user_model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == weights


def test_trl_full_recipe_counts_like_zero3_and_refuses_other_models() -> None:
    model = tiny_llama()
    selection = planted_selection(model, ["model.layers.0.mlp.up_proj", "model.layers.3.self_attn.o_proj"])
    text = export_module.export_selection(selection, "trl", model, "tiny", "full").text
    namespace: dict[str, Any] = {}
    exec(compile(text, "freeze_selection.py", "exec"), namespace)
    freeze = namespace["freeze_all_but_selection"]
    zero3 = tiny_llama()
    for p in zero3.parameters():  # what ZeRO-3 partitioning leaves on a rank: an empty tensor and ds_numel
        p.ds_numel = p.numel()  # type: ignore[attr-defined]
        p.data = torch.empty(0)
    freeze(zero3)
    assert sum(p.requires_grad for p in zero3.parameters()) == 2
    with pytest.raises(ValueError, match="not in this model"):
        freeze(tiny_gpt2())
    wider = LlamaForCausalLM(LlamaConfig(**{**tiny_llama().config.to_dict(), "intermediate_size": 48}))
    with pytest.raises(RuntimeError, match="would train"):
        freeze(wider)


def test_trl_full_refuses_when_the_counts_disagree(tmp_path: Path, tiny_model_dir: Path) -> None:
    path, selection = save_selection(tiny_model_dir, tmp_path)
    selection.trainable_params["full"] = (selection.trainable_params["full"] or 0) + 1  # shapes of another model
    selection.save(path)
    out = tmp_path / "freeze_selection.py"
    with pytest.raises(IlaError, match=r"export check failed.*would train"):
        run_export(path, "trl", out, method="full")
    assert not out.exists()


# ------------------------------------------------------------------------ issue #14 item 9: ranks from scores


def ranks_selection(model_dir: Path, folder: Path) -> tuple[Path, dict[str, int]]:
    """Every layer, each with a LoRA rank from a planted γ (v_proj and down_proj important)."""
    import math

    from ila.selection import SelectionRule, lora_param_count

    model = fresh(model_dir)
    layers = discover_layers(model)
    scores = [3.0 if la.module_type.endswith(("v_proj", "down_proj")) else -3.0 for la in layers]
    scores = [s + 0.01 * la.block for s, la in zip(scores, layers, strict=True)]
    gammas = [1 / (1 + math.exp(-s)) for s in scores]
    ranking = rank_layers(layers, scores, "ila", gammas=gammas, info={"model": str(model_dir)})
    budget = 0.5 * sum(lora_param_count(la, 8) for la in layers)
    selection = select(ranking, SelectionRule("lora_ranks", budget), ModelShapes.of(model))
    path = folder / "ranks.json"
    selection.save(path)
    ranks = selection.lora_ranks()
    assert ranks is not None and len(set(ranks.values())) > 1
    return path, ranks


def ranks_under_peft(model_dir: Path, kwargs: dict[str, Any]) -> dict[str, tuple[int, float]]:
    model = get_peft_model(fresh(model_dir), LoraConfig(**kwargs))
    return {
        name: (module.r["default"], module.scaling["default"])
        for name, module in model.base_model.model.named_modules()
        if isinstance(getattr(module, "r", None), dict)
    }


@pytest.mark.parametrize("target", ["peft", "axolotl", "unsloth"])
def test_rank_pattern_exports_give_every_layer_its_rank(tmp_path: Path, tiny_model_dir: Path, target: str) -> None:
    path, ranks = ranks_selection(tiny_model_dir, tmp_path)
    out = tmp_path / f"{target}.out"
    run_export(path, target, out)
    if target == "peft":
        kwargs = json.loads(out.read_text())
    else:
        body = yaml.safe_load(out.read_text())
        if target == "axolotl":  # axolotl's loaders/adapter.py: lora_rank_pattern -> rank_pattern, ...
            kwargs = {
                "r": body["lora_r"],
                "lora_alpha": body["lora_alpha"],
                "target_modules": body["lora_target_modules"],
                "rank_pattern": body["lora_rank_pattern"],
                "alpha_pattern": body["lora_alpha_pattern"],
            }
        else:  # unsloth's get_peft_model passes its keywords to LoraConfig
            kwargs = {k: body[k] for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")}
    applied = ranks_under_peft(tiny_model_dir, kwargs)
    assert {name: r for name, (r, _) in applied.items()} == ranks
    assert {scale for _, scale in applied.values()} == {2.0}  # alpha/r of the uniform setting, at every rank


@pytest.mark.parametrize("target", ["trl", "llama-factory", "ms-swift"])
def test_rank_pattern_is_refused_where_a_trainer_cannot_express_it(
    tmp_path: Path, tiny_model_dir: Path, target: str
) -> None:
    path, _ = ranks_selection(tiny_model_dir, tmp_path)
    out = tmp_path / "out.yaml"
    with pytest.raises(IlaError, match=r"its own LoRA rank.*--to peft or axolotl or unsloth") as err:
        run_export(path, target, out)
    assert "\n" not in str(err.value) and not out.exists()
    with pytest.raises(IlaError, match="its own LoRA rank"):
        run_export(path, "axolotl", out, method="full")
