"""The stop rules of both stages on tiny models: Stage 1's ε rule fires on its own at a constant learning rate
(and the limit is named when it cannot), Stage 2 stops when its top-K set has stopped changing; the pieces
behind them (profile statistic, shared-scale Adam, gradient accumulation, derived seeds) behave as documented.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ila.config import DataConfig, LoraShapeConfig, Stage1Config, Stage2Config
from ila.layers import discover_layers
from ila.sft_data import Batch, load_sft_data
from ila.stage1_lora import lr_factor, milestone_steps, profile_change, run_stage1
from ila.stage2_mask import SharedScaleAdam, run_stage2
from ila.training_loop import train
from tiny_models import make_rows, make_tokenizer, tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> list:  # type: ignore[type-arg]
    path = write_jsonl(tmp_path_factory.mktemp("rules") / "rows.jsonl", make_rows(48))
    return load_sft_data(DataConfig(path=str(path), max_length=64), make_tokenizer(), 0).train


def _stage1(examples: list, cfg: Stage1Config, out: Path):  # type: ignore[no-untyped-def, type-arg]
    torch.set_num_threads(1)
    model = tiny_llama()
    layers = discover_layers(model)
    peft_model, result = run_stage1(
        model, layers, examples, LoraShapeConfig(dropout=0.0), cfg, 0, 1, torch.device("cpu"), out
    )
    return peft_model, result, layers


def test_the_rule_fires_before_the_cap_at_a_constant_learning_rate(examples: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    cfg = Stage1Config(max_epochs=None, max_steps=200, lr=0.01, window=4, epsilon=0.05, patience=2)
    _, result, _ = _stage1(examples, cfg, tmp_path)
    assert result.stopped_by == "epsilon"
    assert result.fired_at == result.steps < 200
    last = result.trace[-cfg.patience :]
    assert all(row["profile_change"] < cfg.epsilon for row in last)
    assert all(row["lr"] == pytest.approx(cfg.lr) for row in result.trace[1:])  # no decay while watched
    assert (tmp_path / "milestone-50" / "adapter_config.json").is_file()
    assert not (tmp_path / "checks").exists()  # the per-check adapters are gone once the milestones are kept


def test_a_rule_that_cannot_fire_names_the_limit(examples: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    cap = Stage1Config(max_epochs=None, max_steps=12, lr=0.01, window=4, epsilon=1e-12, milestones=(100,))
    _, result, _ = _stage1(examples, cap, tmp_path / "cap")
    assert (result.stopped_by, result.fired_at, result.steps) == ("step cap", None, 12)
    budget = replace(cap, max_epochs=1.0, max_steps=400)  # 1 epoch of the training rows at batch 4
    _, result, _ = _stage1(examples, budget, tmp_path / "epochs")
    assert result.stopped_by == "epoch budget"
    assert result.steps == result.planned_steps == math.ceil(len(examples) / 4)


def test_profile_change_ignores_growth_and_sees_shifts() -> None:
    assert profile_change([1.0, 4.0, 9.0], [4.0, 16.0, 36.0]) == pytest.approx(0.0, abs=1e-12)
    assert profile_change([9.0, 4.0, 1.0], [1.0, 4.0, 9.0]) > 0.5
    assert profile_change([1.0, 1.0], [0.0, 0.0]) == math.inf  # no update yet: nothing to compare


def test_learning_rate_schedules() -> None:
    constant = Stage1Config(warmup_steps=4)
    assert [lr_factor(s, constant, 100) for s in (0, 3)] == [pytest.approx(0.2), pytest.approx(0.8)]
    assert {lr_factor(s, constant, 100) for s in range(4, 400)} == {1.0}
    linear = replace(constant, lr_schedule="linear")
    assert lr_factor(52, linear, 100) == pytest.approx(0.5)
    assert lr_factor(100, linear, 100) == 0.0


def test_milestones_are_shares_of_the_steps_run() -> None:
    assert milestone_steps(120, 10, (25, 50, 75, 100)) == {25: 30, 50: 60, 75: 90, 100: 120}
    assert milestone_steps(37, 10, (25, 100)) == {25: 10, 100: 37}  # nearest check, never before the first


def test_epoch_budget_in_steps() -> None:
    assert Stage1Config(max_epochs=2.0, batch_size=4, max_steps=400).planned_steps(309) == 156
    assert Stage1Config(max_epochs=10.0, batch_size=4, max_steps=100).planned_steps(309) == 100  # the cap wins
    assert Stage1Config(max_epochs=None, max_steps=70).planned_steps(309) == 70


def test_stage2_stops_when_the_top_set_is_stable(examples: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    peft_model, _, layers = _stage1(examples, Stage1Config(max_epochs=None, max_steps=8, lr=0.01, window=4), tmp_path)
    cfg = Stage2Config(steps=200, check_every=2, stop_jaccard=0.9, stop_patience=2, lr=0.2)
    result = run_stage2(peft_model, layers, examples, cfg, 5, 1, torch.device("cpu"))
    assert result.converged_at is not None and result.loop.steps_run == result.converged_at < 200
    checked = [row["topk_jaccard"] for row in result.trace if row["topk_jaccard"] is not None]
    assert all(value >= 0.9 for value in checked[-2:])
    never = replace(cfg, steps=6, stop_patience=0)
    assert run_stage2(peft_model, layers, examples, never, 5, 1, torch.device("cpu")).loop.steps_run == 6


def test_gain_scaled_penalty_uses_the_measured_stage1_gain(examples: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    peft_model, _, layers = _stage1(examples, Stage1Config(max_epochs=None, max_steps=12, lr=0.01, window=4), tmp_path)
    cfg = Stage2Config(steps=2, sparsity="penalty", penalty=0.5, penalty_scale="gain")
    result = run_stage2(peft_model, layers, examples, cfg, 0, 1, torch.device("cpu"))
    assert result.gain is not None and result.gain > 0  # Stage 1 learned the pattern
    assert result.penalty == pytest.approx(0.5 * result.gain)


def test_shared_scale_adam_keeps_relative_gradient_sizes() -> None:
    for optimizer_class, expected in ((SharedScaleAdam, 2.0), (torch.optim.Adam, 1.0)):
        scores = torch.nn.Parameter(torch.zeros(2))
        optimizer = optimizer_class([scores], lr=0.1)
        scores.grad = torch.tensor([1e-3, 2e-3])
        optimizer.step()
        assert float(scores[1].detach() / scores[0].detach()) == pytest.approx(expected, rel=1e-4)


def test_accumulation_equals_one_large_batch() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (4, 6))
    labels = ids.clone()
    labels[:2, :3] = -100  # the halves carry different numbers of target tokens
    whole = Batch(ids, torch.ones_like(ids), labels)
    halves = [
        Batch(ids[:2], torch.ones_like(ids[:2]), labels[:2]),
        Batch(ids[2:], torch.ones_like(ids[2:]), labels[2:]),
    ]
    weights = torch.linspace(-1, 1, 9)

    def loss_fn(batch: Batch) -> torch.Tensor:  # mean over target tokens, like the SFT loss
        keep = batch.labels[:, 1:] != -100
        return (param * weights[batch.input_ids[:, 1:]])[keep].pow(2).mean()

    results = []
    for batches, accumulation in (([whole], 1), (halves, 2)):
        param = torch.nn.Parameter(torch.tensor(0.7))
        optimizer = torch.optim.SGD([param], lr=0.1)
        train(
            stage="t",
            params=[param],
            batches=iter(batches),
            loss_fn=loss_fn,
            optimizer=optimizer,
            max_steps=1,
            device=torch.device("cpu"),
            accumulation=accumulation,
        )
        results.append(float(param))
    assert results[0] == pytest.approx(results[1], rel=1e-6)
