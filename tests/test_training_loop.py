"""The one training loop, directly: accumulation equals one large batch, a non-finite loss never reaches the
weights, a resumed loop takes the same steps, early stops, the held-out loss and the learning-rate schedule."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator

import pytest
import torch

from ila.errors import NonFiniteLossError
from ila.lora_adapters import unwrap
from ila.sft_data import IGNORE_INDEX, Batch, Example, collate
from ila.training_loop import LoopResult, heldout_loss, loop_summary, sft_loss, train, warmup_then
from tiny_models import tiny_llama

CPU = torch.device("cpu")


def examples(n: int, length: int = 10, seed: int = 0) -> list[Example]:
    """Rows of random tokens whose answers differ in length (so batches differ in their count of target tokens)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 100, (length,), generator=gen).tolist()
        answer = 2 + (i * 3) % (length - 3)  # 2 .. length-2 answer tokens
        rows.append(Example(ids, [IGNORE_INDEX] * (length - answer) + ids[length - answer :]))
    return rows


def run(model: torch.nn.Module, batches: Iterator[Batch], steps: int, **kwargs: object) -> LoopResult:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    return train(
        stage="test",
        params=params,
        batches=batches,
        loss_fn=lambda b: sft_loss(model, b),
        optimizer=optimizer,
        max_steps=steps,
        device=CPU,
        **kwargs,  # type: ignore[arg-type]
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> bool:
    return all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_accumulated_micro_batches_take_the_step_of_one_large_batch() -> None:
    rows = examples(8)
    whole, micro = tiny_llama(), tiny_llama()
    run(whole, iter([collate(rows, 0)]), 1)
    run(micro, iter([collate(rows[:3], 0), collate(rows[3:], 0)]), 1, accumulation=2)
    assert not same_weights(whole, tiny_llama())  # the step moved the weights
    # weighted by each micro-batch's share of the target tokens, not averaged per micro-batch
    assert same_weights(whole, micro, atol=1e-6)
    unweighted = tiny_llama()
    params = list(unweighted.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    for part in (collate(rows[:3], 0), collate(rows[3:], 0)):
        (sft_loss(unweighted, part) / 2).backward()
    optimizer.step()
    assert not same_weights(unweighted, micro, atol=1e-6)  # the weighting is what makes them equal


def test_a_non_finite_loss_stops_before_the_weights_change() -> None:
    model = tiny_llama()
    batches = itertools.cycle([collate(examples(4), 0)])
    calls = 0

    def loss_fn(batch: Batch) -> torch.Tensor:
        nonlocal calls
        calls += 1
        loss = sft_loss(model, batch)
        return loss * math.nan if calls == 3 else loss

    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    kept: list[torch.nn.Module] = []
    with pytest.raises(NonFiniteLossError) as info:
        train(
            stage="test",
            params=params,
            batches=batches,
            loss_fn=loss_fn,
            optimizer=optimizer,
            max_steps=5,
            device=CPU,
            after_step=lambda step, _loss: kept.append(copy.deepcopy(model)) and False,  # type: ignore[func-returns-value]
        )
    assert info.value.step == 3 and "step 3" in str(info.value)
    assert len(kept) == 2 and same_weights(model, kept[-1])  # step 3 never reached the optimizer


def test_a_resumed_loop_takes_the_steps_of_an_uninterrupted_one() -> None:
    stream = [collate(examples(4, seed=s), 0) for s in range(4)]
    straight = tiny_llama()
    first = run(straight, iter(stream), 4)
    resumed = tiny_llama()
    params = list(resumed.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    common = {"stage": "test", "params": params, "loss_fn": lambda b: sft_loss(resumed, b), "device": CPU}
    train(batches=iter(stream[:2]), optimizer=optimizer, max_steps=2, **common)  # type: ignore[arg-type]
    rest = train(batches=iter(stream[2:]), optimizer=optimizer, max_steps=4, start_step=2, **common)  # type: ignore[arg-type]
    assert rest.steps_run == 4 and len(rest.losses) == 2
    assert rest.losses == pytest.approx(first.losses[2:], abs=1e-6)
    assert same_weights(straight, resumed, atol=1e-6)


def test_after_step_stops_early_and_the_summary_counts_what_ran() -> None:
    batches = itertools.cycle([collate(examples(4), 0)])
    result = run(tiny_llama(), batches, 10, after_step=lambda step, _loss: step == 3)
    assert result.steps_run == 3 and result.stopped_early and len(result.losses) == 3
    batch = collate(examples(4), 0)
    assert result.tokens == 3 * batch.real_tokens and result.padded_tokens == 3 * batch.input_ids.numel()
    summary = loop_summary(result)
    assert summary["steps"] == 3 and summary["first_loss"] == result.losses[0]
    assert summary["last_loss"] == result.losses[-1] and summary["median_step_s"] > 0
    assert not run(tiny_llama(), batches, 2).stopped_early  # running to max_steps is not an early stop


def test_heldout_loss_is_the_token_weighted_mean_in_eval_mode() -> None:
    model = tiny_llama()
    model.train()
    rows = examples(6)
    batches = [collate(rows[:2], 0), collate(rows[2:], 0)]
    counts = [int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    with torch.no_grad():
        model.eval()
        means = [float(sft_loss(model, b)) for b in batches]
        model.train()
    expected = sum(m * n for m, n in zip(means, counts, strict=True)) / sum(counts)
    assert heldout_loss(model, batches, CPU) == pytest.approx(expected, rel=1e-6)
    assert counts[0] != counts[1] and expected != pytest.approx(sum(means) / 2, rel=1e-6)  # weighting matters here
    assert model.training  # the caller's mode is restored


def test_warmup_then_decay_or_constant() -> None:
    assert [warmup_then(s, 3, 10) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert warmup_then(3, 3, 10) == 1.0 and warmup_then(10, 3, 10) == 0.0
    assert warmup_then(6, 3, 10) == pytest.approx(4 / 7)
    assert {warmup_then(s, 3, 10, decay=False) for s in range(3, 50)} == {1.0}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_checkpointing_recomputes_only_from_the_lowest_adapted_block(method: str) -> None:
    """Checkpointing (run.gradient_checkpointing, QLoRA's default) recomputes in backward only the blocks from the
    lowest adapted one up: below it nothing needs a gradient (the depth saving `ila select` estimates).
    transformers' own setup makes the embeddings' output require grad, which would recompute all four here."""
    from ila.config import FinetuneConfig, build_config
    from ila.layers import discover_layers
    from ila.trainable import make_trainable
    from ila.training_loop import enable_gradient_checkpointing

    for lowest in (0, 2, 3):
        model = tiny_llama()
        cfg = build_config(FinetuneConfig, {"finetune": {"method": method}})
        if method == "qlora":
            model.is_loaded_in_4bit = True  # PEFT's k-bit flag; the weights stay fp32 here
        else:
            enable_gradient_checkpointing(model)
        wanted = {f"model.layers.{lowest}.self_attn.q_proj", "model.layers.3.mlp.down_proj"}
        chosen = [layer for layer in discover_layers(model) if layer.name in wanted]
        trainee = make_trainable(model, chosen, cfg).model
        trainee.train()
        assert unwrap(trainee).is_gradient_checkpointing
        calls: list[int] = []
        for block in model.model.layers:  # a module inside the block: transformers checkpoints `forward`
            block.input_layernorm.register_forward_hook(lambda *_, seen=calls: seen.append(1))
        loss = sft_loss(trainee, collate(examples(2), 0))
        assert len(calls) == 4
        loss.backward()
        assert len(calls) - 4 == 4 - lowest
