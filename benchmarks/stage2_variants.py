"""Which Stage-2 design ranks by signal rather than by optimizer noise? Measured on one saved Stage 1.

Each variant (a set of `stage2.*` overrides) learns the scores on the run's Stage-1 adapter under several
batch orders. For each it reports the steps run (and where the top-K set stopped changing), the top-30%
Jaccard between batch orders (Stage 2's own noise floor: Stage 1 is the same), and the share of the Stage-1
held-out loss reduction kept by θ0 + Δθ on the top 30% only (hard mask), beside the same share for the
delta-norm top 30% and random 30% sets. Medians and means are over the batch orders.

Usage: python benchmarks/stage2_variants.py RUN_DIR --seeds 2 \
         --variant "adam:optimizer=adam" --variant "shared:optimizer=adam-shared,penalty_scale=gain" ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ila.config import IdentifyConfig, Stage2Config, build_config, config_to_dict, merge, parse_overrides, read_yaml
from ila.lora_adapters import LayerMask, load_lora
from ila.ranking import rank_layers
from ila.ranking_methods import delta_norm_scores
from ila.run_folder import Timings
from ila.sft_data import eval_batches
from ila.stage2_mask import run_stage2
from ila.stages import prepare_inputs
from ila.training_loop import heldout_loss


def masked_loss(model: Any, layers: Any, keep: set[str], batches: Any, device: torch.device) -> float:
    with LayerMask(model, layers) as mask:
        mask.values = torch.tensor([1.0 if layer.name in keep else 0.0 for layer in layers], device=device)
        return heldout_loss(model, batches, device)


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value (stage2 keys)")
    parser.add_argument("--seeds", type=int, default=2, help="batch orders per variant")
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--adapter", default="stage1/adapter", help="Stage-1 adapter inside RUN")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    cfg = build_config(IdentifyConfig, read_yaml(args.run / "config.yaml"))
    loaded, layers, data = prepare_inputs(cfg, Timings())
    model = load_lora(loaded.model, args.run / args.adapter)
    device, pad = loaded.device, int(loaded.tokenizer.pad_token_id)
    batches = eval_batches(data.eval, 4, pad)
    k = round(args.fraction * len(layers))
    names = [layer.name for layer in layers]
    base = masked_loss(model, layers, set(), batches, device)
    full = heldout_loss(model, batches, device)

    def kept(loss: float) -> float:
        return (base - loss) / (base - full)

    rng = random.Random(0)
    random_kept = statistics.median(
        kept(masked_loss(model, layers, set(rng.sample(names, k)), batches, device)) for _ in range(args.random_draws)
    )
    dnorm = rank_layers(layers, delta_norm_scores(model, layers), "delta-norm")
    dnorm_top = set(dnorm.top(k))
    dnorm_kept = kept(masked_loss(model, layers, dnorm_top, batches, device))
    print(
        f"held-out loss: base {base:.4f}, stage 1 {full:.4f}; top {args.fraction:.0%} kept: random (median of "
        f"{args.random_draws}) {random_kept:.0%}, delta-norm {dnorm_kept:.0%}",
        flush=True,
    )
    rows = []
    print("| variant | steps (converged at) | s/step | top-30% Jaccard between batch orders | kept | vs delta-norm |")
    print("|---|---|---|---|---|---|")
    for spec in args.variant:
        label, _, overrides = spec.partition(":")
        values = merge(
            config_to_dict(cfg.stage2), parse_overrides([f"stage2.{o}" for o in overrides.split(",") if o])["stage2"]
        )
        s2 = build_config(Stage2Config, values)
        tops, kepts, steps, conv, secs, scores = [], [], [], [], [], []
        for seed in range(args.seeds):
            started = time.perf_counter()
            result = run_stage2(model, layers, data.train, s2, 1000 + seed, pad, device)
            secs.append((time.perf_counter() - started) / max(result.loop.steps_run, 1))
            ranking = rank_layers(layers, result.scores, "ila", result.gammas)
            top = set(ranking.top(k))
            tops.append(top)
            kepts.append(kept(masked_loss(model, layers, top, batches, device)))
            steps.append(result.loop.steps_run)
            conv.append(result.converged_at)
            scores.append(result.scores)
        pair_j = [jaccard(a, b) for a, b in itertools.combinations(tops, 2)]
        dn_j = [jaccard(t, dnorm_top) for t in tops]
        row = {
            "variant": label,
            "overrides": overrides,
            "steps": steps,
            "converged_at": conv,
            "seconds_per_step": statistics.median(secs),
            "jaccard_between_orders": statistics.fmean(pair_j) if pair_j else None,
            "kept": kepts,
            "jaccard_with_delta_norm": statistics.fmean(dn_j),
            "scores": scores,
        }
        rows.append(row)
        between = "-" if not pair_j else f"{statistics.fmean(pair_j):.3f}"
        print(
            f"| {label} | {steps} ({conv}) | {row['seconds_per_step']:.2f} | {between} | "
            f"{statistics.fmean(kepts):.1%} | J={row['jaccard_with_delta_norm']:.2f} |",
            flush=True,
        )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "base": base,
                        "stage1": full,
                        "random_kept": random_kept,
                        "delta_norm_kept": dnorm_kept,
                        "rows": rows,
                    },
                    indent=1,
                )
            )


if __name__ == "__main__":
    main()
