"""Which Stage-2 setting gives a ranking that matters? Measured on a saved identify run.

For each Stage-2 variant (sparsity form, λ, lr, steps) this learns the scores on the run's Stage-1 adapter and
reports how far the scores separated (std of γ) and the held-out loss of θ0 + Δθ restricted to the top 30% of
layers (hard mask), beside random 30% sets (median of several draws) and the full Stage-1 model: the share of the
Stage-1 loss reduction that a 30% selection keeps is the ranking's quality, measured rather than assumed.

Usage: python benchmarks/stage2_variants.py RUN_DIR [--variants penalty:1:0.1:60 budget:0:0.1:60 ...]
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from ila.config import IdentifyConfig, Stage2Config, build_config, read_yaml
from ila.identify import Timings, prepare_inputs
from ila.lora_adapters import LayerMask, load_lora
from ila.ranking import rank_layers
from ila.sft_data import eval_batches
from ila.stage2_mask import run_stage2
from ila.training_loop import heldout_loss


def masked_loss(model, layers, keep, batches, device) -> float:  # type: ignore[no-untyped-def]
    with LayerMask(model, layers) as mask:
        mask.values = torch.tensor([1.0 if layer.name in keep else 0.0 for layer in layers])
        return heldout_loss(model, batches, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument(
        "--variants", nargs="+", default=["penalty:1:0.1:60", "penalty:5:0.1:60", "budget:0:0.1:60", "topk:0:0.1:60"]
    )
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.3)
    args = parser.parse_args()
    cfg = build_config(IdentifyConfig, read_yaml(args.run / "config.yaml"))
    loaded, layers, data = prepare_inputs(cfg, Timings())
    model = load_lora(loaded.model, args.run / "stage1" / "adapter")
    device = loaded.device
    batches = eval_batches(data.eval, 4, int(loaded.tokenizer.pad_token_id))
    k = round(args.fraction * len(layers))
    base = masked_loss(model, layers, set(), batches, device)
    full = heldout_loss(model, batches, device)
    rng = random.Random(0)
    names = [layer.name for layer in layers]
    random_losses = [
        masked_loss(model, layers, set(rng.sample(names, k)), batches, device) for _ in range(args.random_draws)
    ]
    rand = statistics.median(random_losses)

    def kept(loss: float) -> str:
        return f"{(base - loss) / (base - full):.0%}"

    print(
        f"held-out loss: base {base:.4f}, stage 1 {full:.4f}; random {args.fraction:.0%} (median of "
        f"{args.random_draws}) {rand:.4f} keeps {kept(rand)} of the reduction"
    )
    print("| variant | std γ | mean γ | top-30% loss | kept | module types in top 30% |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        sparsity, lam, lr, steps = variant.split(":")
        s2 = replace(Stage2Config(), sparsity=sparsity, penalty=float(lam), lr=float(lr), steps=int(steps))
        result = run_stage2(model, layers, data.train, s2, cfg.run.seed, int(loaded.tokenizer.pad_token_id), device)
        ranking = rank_layers(layers, result.scores, "ila", result.gammas)
        top = set(ranking.top(k))
        loss = masked_loss(model, layers, top, batches, device)
        gam = torch.tensor(result.gammas)
        types: dict[str, int] = {}
        for entry in ranking.layers[:k]:
            types[entry.module_type.split(".")[-1]] = types.get(entry.module_type.split(".")[-1], 0) + 1
        print(
            f"| {variant} | {float(gam.std()):.3f} | {float(gam.mean()):.3f} | {loss:.4f} | {kept(loss)} | {types} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
