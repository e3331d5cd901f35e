"""Selective fine-tuning: only the selected layers change, everything else stays bit-identical to the base model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ila.cli import main
from ila.commands.finetune import run_finetune
from ila.config import FinetuneConfig, load_config
from ila.errors import IlaError
from ila.finetune_report import FinetuneResult
from ila.layers import discover_layers
from ila.lora_adapters import adapted_module_names, unwrap
from ila.ranking import rank_layers
from ila.selection import ModelShapes, select, top
from ila.sft_data import Batch
from ila.trainable import CHANGED_WEIGHTS
from ila.training_loop import train
from tiny_models import make_tokenizer, tiny_gpt2, tiny_llama

FAST = [
    "finetune.max_steps=4",
    "finetune.eval_every=2",
    "finetune.batch_size=4",
    "finetune.lr=0.01",
    "finetune.warmup_steps=0",
    "data.max_length=64",
    "run.threads=1",
]


@pytest.fixture(scope="module")
def gpt2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_gpt2().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def base_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def write_selection(model_dir: Path, folder: Path, k: int = 8, seed: int = 0) -> tuple[Path, list[str]]:
    """A random top-k selection over the model's layers, saved as selection.json."""
    model = base_model(model_dir)
    layers = discover_layers(model)
    rng = random.Random(seed)
    ranking = rank_layers(layers, [rng.random() for _ in layers], "random", info={"model": str(model_dir)})
    selection = select(ranking, top(k), ModelShapes.of(model))
    path = folder / "selection.json"
    selection.save(path)
    return path, selection.names()


def finetune(
    model_dir: Path, data: Path, out: Path, method: str, selection: Path | None, extra: list[str] | None = None
) -> FinetuneResult:
    values: dict[str, dict[str, object]] = {
        "model": {"name": str(model_dir)},
        "data": {"path": str(data)},
        "run": {"output": str(out)},
        "finetune": {"method": method},
    }
    if selection is not None:
        values["finetune"]["selection"] = str(selection)
    cfg = load_config(FinetuneConfig, None, FAST + (extra or []), values)
    return run_finetune(cfg)


def layer_weight_names(model: torch.nn.Module, names: list[str]) -> set[str]:
    return {f"{name}.weight" for name in names}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_trains_only_the_selected_layers(
    tmp_path: Path, tiny_model_dir: Path, gpt2_model_dir: Path, tiny_data: Path, family: str
) -> None:
    model_dir = tiny_model_dir if family == "llama" else gpt2_model_dir
    selection, names = write_selection(model_dir, tmp_path)
    result = finetune(model_dir, tiny_data, tmp_path / "run", "lora", selection)
    base = base_model(model_dir)
    # adapters exist only on the selected modules, in the live model and in the saved adapter
    assert sorted(adapted_module_names(result.model)) == sorted(names)
    assert all("lora_" in n for n in result.trainable_names)
    reloaded = PeftModel.from_pretrained(base_model(model_dir), str(result.run_dir / "adapter"))
    assert sorted(adapted_module_names(reloaded)) == sorted(names)
    # every base weight is bit-identical; every selected LoRA-B moved away from its zero init
    trained_base = dict(unwrap(result.model).named_parameters())
    for name, param in base.named_parameters():
        key = (
            name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            if name.rsplit(".", 1)[0] in names
            else name
        )
        assert torch.equal(trained_base[key], param), name
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == len(names) and all(bool(p.detach().abs().sum() > 0) for p in lora_b)
    # merged: the selected weights changed, all other tensors are the base's
    merged = reloaded.merge_and_unload().state_dict()
    selected = layer_weight_names(base, names)
    for name, tensor in base.state_dict().items():
        assert torch.equal(merged[name], tensor) != (name in selected), name


def test_adalora_trains_only_the_selected_layers(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path) -> None:
    selection, names = write_selection(tiny_model_dir, tmp_path, k=6)
    calls: list[int] = []
    import ila.trainable as finetune_module

    original = finetune_module.adalora_update

    def spy(model: torch.nn.Module, step: int) -> None:  # AdaLoRA needs the gradients when it allocates ranks
        assert any(p.grad is not None for n, p in model.named_parameters() if "lora_E" in n)
        calls.append(step)
        original(model, step)

    finetune_module.adalora_update = spy  # type: ignore[assignment]
    try:
        result = finetune(
            tiny_model_dir,
            tiny_data,
            tmp_path / "run",
            "adalora",
            selection,
            ["adalora.init_r=4", "adalora.target_r=3", "adalora.tinit=1", "adalora.tfinal=1"],
        )
    finally:
        finetune_module.adalora_update = original  # type: ignore[assignment]
    assert calls == [1, 2, 3, 4]
    assert sorted(adapted_module_names(result.model)) == sorted(names)
    base = base_model(tiny_model_dir)
    trained = {
        k.replace(".base_layer", ""): v
        for k, v in unwrap(result.model).state_dict().items()
        if "lora_" not in k and "ranknum" not in k
    }
    for name, tensor in base.state_dict().items():
        assert torch.equal(trained[name], tensor), name
    merged = result.model.merge_and_unload().state_dict()  # type: ignore[operator]
    selected = layer_weight_names(base, names)
    for name, tensor in base.state_dict().items():
        assert torch.equal(merged[name], tensor) != (name in selected), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_finetuning_changes_only_the_selected_weights(
    tmp_path: Path, tiny_model_dir: Path, gpt2_model_dir: Path, tiny_data: Path, family: str
) -> None:
    model_dir = tiny_model_dir if family == "llama" else gpt2_model_dir
    selection, names = write_selection(model_dir, tmp_path, k=5)
    result = finetune(model_dir, tiny_data, tmp_path / "run", "full", selection)
    base = base_model(model_dir)
    selected = layer_weight_names(base, names)
    assert set(result.trainable_names) == selected
    trained = result.model.state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(trained[name], tensor) != (name in selected), name
    # the run folder holds exactly the changed tensors, and applying them reproduces the trained model
    saved = load_file(str(result.run_dir / CHANGED_WEIGHTS))
    assert set(saved) == selected
    fresh = base_model(model_dir)
    _missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert not unexpected
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert (result.run_dir / "APPLY.md").is_file()


def test_no_selection_is_the_all_layers_baseline(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path) -> None:
    result = finetune(tiny_model_dir, tiny_data, tmp_path / "run", "lora", None)
    all_names = [layer.name for layer in discover_layers(base_model(tiny_model_dir))]
    assert sorted(adapted_module_names(result.model)) == sorted(all_names)
    assert result.selection.description == f"all {len(all_names)} layers"
    assert result.trainable_params == result.selection.trainable_params["lora"]


def test_run_folder_curves_manifest_report(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path) -> None:
    selection, names = write_selection(tiny_model_dir, tmp_path)
    result = finetune(tiny_model_dir, tiny_data, tmp_path / "run", "lora", selection, ["finetune.max_steps=5"])
    run = result.run_dir
    for file in (
        "config.yaml",
        "selection.json",
        "manifest.json",
        "losses.csv",
        "heldout.csv",
        "loss_curves.png",
        "report.md",
        "adapter/adapter_config.json",
    ):
        assert (run / file).is_file(), file
    assert [row["step"] for row in result.heldout] == [0, 2, 4, 5]  # every N steps and at the end
    assert len((run / "losses.csv").read_text().strip().splitlines()) == 6
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["method"] == "lora"
    assert manifest["selection"]["layers"] == names
    assert manifest["trainable_params"]["count"] == manifest["trainable_params"]["expected_from_selection"]
    assert manifest["model"]["fingerprint"] and manifest["data"]["sha256"]
    assert manifest["training"]["median_step_s"] > 0 and manifest["training"]["tokens_per_s"] > 0
    assert manifest["memory"]["peak_rss_gb"] > 0 and "torch" in manifest["versions"]
    assert "Held-out loss" in (run / "report.md").read_text()


def test_selection_of_another_model_is_refused(
    tmp_path: Path, tiny_model_dir: Path, gpt2_model_dir: Path, tiny_data: Path
) -> None:
    selection, _ = write_selection(tiny_model_dir, tmp_path)
    with pytest.raises(IlaError, match="does not match"):
        finetune(gpt2_model_dir, tiny_data, tmp_path / "run", "lora", selection)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_qlora_without_cuda_exits_2_before_loading(
    tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "-q",
            "finetune",
            "--model",
            str(tmp_path / "no-such-model"),
            "--data",
            str(tiny_data),
            "--method",
            "qlora",
            "--output",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "CUDA" in err  # not "model not found": nothing was loaded
    assert not out.exists()


def test_cli_finetune_lora(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    selection, names = write_selection(tiny_model_dir, tmp_path)
    out = tmp_path / "run"
    code = main(
        [
            "-q",
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_data),
            "--selection",
            str(selection),
            "--method",
            "lora",
            "--output",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    assert "held-out loss" in capsys.readouterr().out
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(names)
    assert (
        main(["-q", "finetune", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out), *FAST])
        == 2
    )  # the run folder exists
    assert (
        main(["-q", "finetune", "--selection", str(tmp_path / "missing.json"), "--output", str(tmp_path / "other")])
        == 2
    )


def test_cli_finetune_help_and_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    assert exit_info.value.code == 0 and "examples:" in capsys.readouterr().out
    assert main(["finetune", "--method", "adalora", "--print-config", "adalora.target_r=4"]) == 0
    printed = capsys.readouterr().out
    assert "method: adalora" in printed and "target_r: 4" in printed


def test_before_zero_grad_sees_the_gradients() -> None:
    """The loop's hook runs after the optimizer step and before the gradients are cleared (AdaLoRA needs that)."""
    weight = torch.nn.Parameter(torch.ones(3))
    seen: list[bool] = []
    batch = Batch(
        torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    )
    train(
        stage="test",
        params=[weight],
        batches=iter([batch] * 3),
        loss_fn=lambda _b: (weight**2).sum(),
        optimizer=torch.optim.SGD([weight], lr=0.1),
        max_steps=3,
        device=torch.device("cpu"),
        before_zero_grad=lambda step: seen.append(weight.grad is not None),
    )
    assert seen == [True, True, True] and weight.grad is None


def test_tiny_llama_reference_is_the_saved_model(tiny_model_dir: Path) -> None:
    """The tests compare against the saved folder; it must hold the same weights as the in-code model."""
    saved, built = base_model(tiny_model_dir).state_dict(), tiny_llama().state_dict()
    assert all(torch.equal(saved[k], built[k]) for k in built)


@pytest.mark.parametrize("option", ["run.gradient_checkpointing=true", "run.compile=true"])
def test_memory_and_speed_options_train_the_same_weights(
    option: str, tmp_path: Path, tiny_model_dir: Path, tiny_data: Path
) -> None:
    """Gradient checkpointing recomputes activations and torch.compile fuses kernels: neither may change the step."""
    selection, _ = write_selection(tiny_model_dir, tmp_path)
    extra = ["lora.dropout=0", "finetune.max_steps=2", "finetune.eval_every=2"]
    plain = finetune(tiny_model_dir, tiny_data, tmp_path / "plain", "lora", selection, extra)
    other = finetune(tiny_model_dir, tiny_data, tmp_path / "other", "lora", selection, [*extra, option])
    lm = unwrap(other.model)
    if "checkpointing" in option:
        on = [getattr(unwrap(r.model), "is_activation_checkpointing", None) for r in (other, plain)]
        if on == [None, None]:  # transformers before the rename
            on = [unwrap(r.model).is_gradient_checkpointing for r in (other, plain)]
        assert on == [True, False]
    else:
        assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl for block in lm.model.layers)
    want = dict(plain.model.named_parameters())
    for name, param in other.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, want[name], rtol=1e-4, atol=1e-5)


def test_lora_ranks_from_scores_train_each_layer_at_its_rank(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path
) -> None:
    import math

    from ila.selection import SelectionRule, lora_param_count

    model = base_model(tiny_model_dir)
    layers = discover_layers(model)
    scores = [float(la.block) + (2.0 if la.module_type.endswith("v_proj") else 0.0) for la in layers]
    ranking = rank_layers(
        layers,
        scores,
        "ila",
        gammas=[1 / (1 + math.exp(-(s - 2))) for s in scores],
        info={"model": str(tiny_model_dir)},
    )
    budget = 0.4 * sum(lora_param_count(la, 8) for la in layers)
    selection = select(ranking, SelectionRule("lora_ranks", budget), ModelShapes.of(model))
    path = tmp_path / "ranks.json"
    selection.save(path)
    ranks = selection.lora_ranks()
    assert ranks is not None and len(set(ranks.values())) > 1
    result = finetune(tiny_model_dir, tiny_data, tmp_path / "run", "lora", path)
    reloaded = PeftModel.from_pretrained(base_model(tiny_model_dir), str(result.run_dir / "adapter"))
    for peft_model in (result.model, reloaded):
        got = {
            name: module.r["default"]
            for name, module in unwrap(peft_model).named_modules()
            if isinstance(getattr(module, "r", None), dict)
        }
        assert got == ranks
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    by_name = {la.name: la for la in layers}
    expected = sum(lora_param_count(by_name[n], r) for n, r in ranks.items())
    assert manifest["trainable_params"]["count"] == expected == selection.trainable_params["lora"]
    with pytest.raises(IlaError, match="its own LoRA rank"):
        finetune(tiny_model_dir, tiny_data, tmp_path / "full", "full", path)
