"""A planted signal is recovered: when only the updates of a chosen set S of layers explain the data, Stage 2 ranks
exactly S on top.

Construction: a tiny Llama θ0 gets a random low-rank "teacher" update on the layers of S; training sequences are
sampled from that teacher (θ0 + Δθ_S). Every other layer then gets a random update of the same size, which can only
hurt the loss on teacher data. Stage 2 starts from θ0 + 0.95 Δθ (all layers) and must learn to keep S and drop
the rest. The base model is initialised with a larger weight scale than `tiny_models.tiny_llama` (std 0.2, untied
head): at std 0.02 the logits are nearly uniform whatever the layers do, so the teacher's samples carry no signal.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ila.config import LoraShapeConfig, Stage2Config
from ila.layers import discover_layers
from ila.lora_adapters import LayerMask, attach_lora, lora_factors
from ila.ranking import rank_layers
from ila.sft_data import IGNORE_INDEX, Example
from ila.stage2_mask import run_stage2

VOCAB = 64
PLANTED = {
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.2.self_attn.o_proj",
    "model.layers.3.mlp.up_proj",
}


def planted_case(seed: int = 0, n_sequences: int = 128, length: int = 24):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    layers = discover_layers(model)
    peft_model = attach_lora(model, layers, LoraShapeConfig(r=4, alpha=4, dropout=0.0)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    factors = lora_factors(peft_model, layers)

    def random_update(index: int) -> None:  # |ΔW|_F about the same for every layer of one shape
        a, b = factors[index].a, factors[index].b
        a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
        b.copy_(torch.randn(b.shape, generator=generator) / b.shape[1] ** 0.5)

    planted = torch.tensor([1.0 if layer.name in PLANTED else 0.0 for layer in layers])
    with torch.no_grad(), LayerMask(peft_model, layers) as mask:
        for i in planted.nonzero().flatten().tolist():
            random_update(i)
        mask.values = planted  # the teacher: θ0 + Δθ on S only
        tokens = torch.randint(0, VOCAB, (n_sequences, 1), generator=generator)
        for _ in range(length - 1):
            probs = torch.softmax(peft_model(input_ids=tokens).logits[:, -1].float(), dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
        for i in (planted == 0).nonzero().flatten().tolist():
            random_update(i)  # noise: switched on only now, it never shaped the data

        def loss(values: torch.Tensor) -> float:
            mask.values = values
            return float(peft_model(input_ids=tokens, labels=tokens).loss)

        n = len(layers)
        losses = {"base": loss(torch.zeros(n)), "teacher": loss(planted), "all": loss(torch.ones(n))}
    examples = [Example(seq.tolist(), [IGNORE_INDEX] * 2 + seq.tolist()[2:]) for seq in tokens]
    return peft_model, layers, examples, losses


VARIANTS = {  # the defaults (budget, shared-scale Adam, top-K stop) and the alternatives ila offers
    "defaults": {},
    "penalty-adam": {"sparsity": "penalty", "penalty_scale": "absolute", "optimizer": "adam", "stop_patience": 0},
    "budget-adam": {"optimizer": "adam", "stop_patience": 0},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_layers_fill_the_top_ranks(variant: str) -> None:
    peft_model, layers, examples, losses = planted_case()
    # the construction works: the teacher's updates explain the data, the noise updates hurt
    assert losses["teacher"] < losses["base"] < losses["all"]
    settings = {"steps": 150, "batch_size": 16, "penalty": 0.5, "budget": len(PLANTED) / len(layers)}
    cfg = Stage2Config(**{**settings, **VARIANTS[variant]})  # type: ignore[arg-type]
    result = run_stage2(peft_model, layers, examples, cfg, seed=0, pad_id=0, device=torch.device("cpu"))
    ranking = rank_layers(layers, result.scores, "ila", result.gammas)
    assert set(ranking.top(len(PLANTED))) == PLANTED, [(e.rank, e.name) for e in ranking.layers[:8]]
    by_name = {entry.name: entry for entry in ranking.layers}
    lowest_planted = min(by_name[name].score for name in PLANTED)
    highest_other = max(e.score for e in ranking.layers if e.name not in PLANTED)
    assert lowest_planted - highest_other > 1.0  # separated by a clear margin, not by noise
    assert all(by_name[name].gamma > 0.5 for name in PLANTED)
    assert sum(e.gamma > 0.5 for e in ranking.layers) == len(PLANTED)
