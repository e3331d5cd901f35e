"""The invariants ILA rests on: γ = 0 is the base model, γ = 1 the LoRA model, update norms are right, Stage 2
changes only the scores and Stage 1 only the LoRA factors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from ila.config import DataConfig, LoraShapeConfig, Stage1Config, Stage2Config
from ila.layers import discover_layers
from ila.lora_adapters import (
    LayerMask,
    attach_lora,
    change_sq_norms,
    lora_factors,
    snapshot,
    update_sq_norms,
)
from ila.sft_data import load_sft_data
from ila.stage1_lora import run_stage1
from ila.stage2_mask import run_stage2
from tiny_models import make_rows, tiny_gpt2, tiny_llama, write_jsonl

CPU = torch.device("cpu")
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def random_lora_model(build, r: int = 4, seed: int = 0):
    """A tiny model with LoRA on every layer and nonzero random B (PEFT starts B at zero)."""
    model = build()
    layers = discover_layers(model)
    peft_model = attach_lora(model, layers, LoraShapeConfig(r=r, alpha=8, dropout=0.1)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for factors in lora_factors(peft_model, layers):
            factors.b.copy_(torch.randn(factors.b.shape, generator=generator) * 0.5)
    return peft_model, layers


def input_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # padding must not matter either
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_mask_zero_is_base_model_and_one_is_lora_model(family: str) -> None:
    batch = input_batch()
    with torch.no_grad():
        base_logits = BUILDERS[family]().eval()(**batch).logits
        peft_model, layers = random_lora_model(BUILDERS[family])
        lora_logits = peft_model(**batch).logits
        assert not torch.allclose(lora_logits, base_logits, atol=1e-3)  # the update really changes the model
        with LayerMask(peft_model, layers) as mask:
            assert torch.equal(peft_model(**batch).logits, lora_logits)  # values None: hooks are identity
            mask.values = torch.zeros(len(layers))
            assert torch.equal(peft_model(**batch).logits, base_logits)
            mask.values = torch.ones(len(layers))
            assert torch.equal(peft_model(**batch).logits, lora_logits)
            mask.values = torch.full((len(layers),), 0.5)
            half = peft_model(**batch).logits
            assert not torch.allclose(half, base_logits, atol=1e-3)
            assert not torch.allclose(half, lora_logits, atol=1e-3)
        assert torch.equal(peft_model(**batch).logits, lora_logits)  # removing the mask restores the LoRA model


def test_mask_acts_per_layer() -> None:
    """Switching on only layer i equals a model whose other LoRA branches are zero."""
    batch = input_batch(1)
    peft_model, layers = random_lora_model(tiny_llama)
    keep = {3, 11, 26}
    with torch.no_grad():
        with LayerMask(peft_model, layers) as mask:
            mask.values = torch.tensor([1.0 if i in keep else 0.0 for i in range(len(layers))])
            masked = peft_model(**batch).logits
        for i, factors in enumerate(lora_factors(peft_model, layers)):
            if i not in keep:
                factors.b.zero_()
        zeroed = peft_model(**batch).logits
    assert torch.allclose(masked, zeroed, atol=1e-6)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_update_norms_match_materialised_updates(family: str) -> None:
    peft_model, layers = random_lora_model(BUILDERS[family], r=3)
    factors = lora_factors(peft_model, layers)
    dense = [f.scaling * f.b.detach() @ f.a.detach() for f in factors]
    assert all(f.scaling == pytest.approx(8 / 3) for f in factors)
    expected = [float(d.pow(2).sum()) for d in dense]
    assert update_sq_norms(factors) == pytest.approx(expected, rel=1e-4)
    before = snapshot(factors)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i, f in enumerate(factors):
            if i % 2:  # change half the layers in A, the other half in B
                f.a.add_(torch.randn(f.a.shape, generator=generator) * 0.1)
            else:
                f.b.add_(torch.randn(f.b.shape, generator=generator) * 0.1)
    after = [f.scaling * f.b.detach() @ f.a.detach() for f in factors]
    changes = [float((new - old).pow(2).sum()) for new, old in zip(after, dense, strict=True)]
    assert change_sq_norms(factors, before) == pytest.approx(changes, rel=1e-3, abs=1e-9)
    unchanged = change_sq_norms(factors, snapshot(factors))  # catastrophic cancellation must not go negative
    assert all(0.0 <= c <= 1e-9 * n for c, n in zip(unchanged, update_sq_norms(factors), strict=True))


def test_stage2_changes_only_the_scores(tiny_data: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    data = load_sft_data(DataConfig(path=str(tiny_data), max_length=64), tokenizer, seed=0)
    peft_model, layers = random_lora_model(tiny_llama)
    peft_model.train()
    trainable_before = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    state_before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    cfg = Stage2Config(steps=4, batch_size=4, lr=0.1, penalty=1.0)
    result = run_stage2(peft_model, layers, data.train, cfg, seed=0, pad_id=1, device=CPU)
    state_after = peft_model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_before[k], v) for k, v in state_after.items())  # bit-identical
    assert all(p.grad is None for p in peft_model.parameters())
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable_before
    assert len(result.scores) == len(layers)
    assert all(s != cfg.init_score for s in result.scores)  # only the scores moved ...
    assert result.gammas == pytest.approx([1 / (1 + math.exp(-s)) for s in result.scores])
    assert result.loop.steps_run == 4 and len(result.trace) == 4
    assert sum(len(m._forward_hooks) for m in peft_model.modules()) == 0  # ... and no mask hook is left behind


def test_stage2_penalty_lowers_mean_gamma_and_more_penalty_lowers_it_more(
    tiny_data: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    data = load_sft_data(DataConfig(path=str(tiny_data), max_length=64), tokenizer, seed=0)
    means = []
    for penalty in (0.0, 5.0):
        peft_model, layers = random_lora_model(tiny_llama)
        result = run_stage2(
            peft_model,
            layers,
            data.train,
            Stage2Config(steps=6, batch_size=4, sparsity="penalty", penalty_scale="absolute", penalty=penalty),
            seed=0,
            pad_id=1,
            device=CPU,
        )
        means.append(sum(result.gammas) / len(result.gammas))
    assert means[1] < means[0]


def test_stage2_budget_respects_the_budget(tiny_data: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    data = load_sft_data(DataConfig(path=str(tiny_data), max_length=64), tokenizer, seed=0)
    peft_model, layers = random_lora_model(tiny_llama)
    cfg = Stage2Config(steps=3, batch_size=4, sparsity="budget", budget=0.25)
    result = run_stage2(peft_model, layers, data.train, cfg, seed=0, pad_id=1, device=CPU)
    assert sum(result.gammas) <= round(0.25 * len(layers)) + 1e-4
    assert all(t["mean_gamma"] * len(layers) <= 7 + 1e-4 for t in result.trace)


def test_stage1_trains_only_lora_factors_and_lowers_the_loss(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    data = load_sft_data(
        DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", make_rows(48))), max_length=64), tokenizer, seed=0
    )
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = discover_layers(model)
    cfg = Stage1Config(
        max_epochs=None,
        max_steps=40,
        batch_size=8,
        lr=0.02,
        warmup_steps=2,
        window=5,
        stop_rule="steps",
        milestones=(50, 100),
    )
    peft_model, result = run_stage1(
        model,
        layers,
        data.train,
        LoraShapeConfig(r=4, alpha=8, dropout=0.0),
        cfg,
        seed=0,
        pad_id=1,
        device=CPU,
        out_dir=tmp_path / "stage1",
    )
    losses = result.loop.losses
    assert len(losses) == 40
    assert max(losses[-5:]) < min(losses[:5])  # the learnable pattern is being learned
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        assert torch.equal(tensor, base_state[name.replace(".base_layer", "")]), name  # θ0 untouched
    assert all(norm > 0 for norm in update_sq_norms(lora_factors(peft_model, layers)))  # every B moved off zero
    assert len(result.trace) == 8 and all(math.isfinite(row["r_t"]) for row in result.trace)
    assert sorted(result.milestones) == [50, 100]
    assert (tmp_path / "stage1" / "milestone-50" / "adapter_model.safetensors").is_file()


def test_stage1_saves_every_milestone_when_two_fall_on_one_step(
    tmp_path: Path, tiny_data: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    data = load_sft_data(DataConfig(path=str(tiny_data), max_length=64), tokenizer, seed=0)
    model = tiny_llama()
    cfg = Stage1Config(max_steps=3, batch_size=2, window=3, stop_rule="steps")  # 75% and 100% are both step 3
    _, result = run_stage1(
        model,
        discover_layers(model),
        data.train,
        LoraShapeConfig(r=2),
        cfg,
        seed=0,
        pad_id=1,
        device=CPU,
        out_dir=tmp_path,
    )
    assert sorted(result.milestones) == [25, 50, 75, 100]
    for percent in (25, 50, 75, 100):
        assert (tmp_path / f"milestone-{percent}" / "adapter_model.safetensors").is_file()
