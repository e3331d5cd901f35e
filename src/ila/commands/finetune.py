"""`ila finetune`: restart from the base model and train only the selected layers (LoRA, AdaLoRA, QLoRA or full).

Reads a model, SFT data and a selection.json (none: every linear layer of every block, the baseline); writes a run
folder with the adapter (PEFT) or the changed weights (safetensors), train and held-out loss curves (CSV + PNG),
manifest.json and report.md. Training goes through the shared loop in `training_loop.train`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import torch

from ila import distributed, fsdp, tracking
from ila.commands import COMMANDS
from ila.commands._shared import COMMON_FLAGS, Subparsers, add_config_flags, add_run_flags, config_values, print_config
from ila.config import BUNDLED_DATA, DEFAULT_MODEL, FinetuneConfig, config_to_dict, load_config
from ila.errors import IlaError, NonFiniteLossError
from ila.finetune_report import FinetuneResult, plot_loss_curves, write_finetune_report
from ila.html_report import write_html_report
from ila.layers import discover_layers
from ila.manifest import Manifest
from ila.model_loading import load_model, pick_device
from ila.run_folder import (
    Timings,
    peak_memory,
    prepare_run_dir,
    reset_peak_memory,
    write_csv,
    write_yaml,
)
from ila.selection import Selection, all_layers, load_selection
from ila.sft_data import batch_stream, eval_batches, load_sft_data
from ila.trainable import (
    check_method_available,
    expected_params,
    make_trainable,
    quantization_config,
    resolve_selection,
    save_trained,
)
from ila.training_loop import (
    compile_blocks,
    enable_gradient_checkpointing,
    heldout_loss,
    loop_summary,
    sft_loss,
    train,
    warmup_then,
)

log = logging.getLogger(__name__)

FINETUNE_EXAMPLES = """examples:
  ila finetune --model ./my-llama --data train.jsonl --selection selection.json --method lora --output runs/ft
  ila finetune --model ./my-llama --data train.jsonl --method lora --output runs/ft-all   # baseline: all layers
  ila finetune --model M --data D --selection S --method full finetune.lr=2e-5 finetune.max_steps=300
  ila finetune --model M --data D --selection S --method adalora adalora.init_r=12 adalora.target_r=4
  ila finetune --model M --data D --selection S --method qlora                  # needs a CUDA GPU

config sections: model, data, lora, finetune, adalora, qlora, run (see `ila finetune --print-config`)
"""


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "finetune",
        help=COMMANDS["finetune"],
        description="Restart from the base model and train only the layers of a selection "
        "(none: every linear layer, the baseline) with the shared training loop; writes the "
        "adapter or the changed weights, loss curves, a manifest and a report to a run folder.",
        epilog=FINETUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL})")
    parser.add_argument("--data", help=f"JSON/JSONL file or hub data set id (default: {BUNDLED_DATA})")
    parser.add_argument("--selection", help="selection.json from `ila select` (default: all layers)")
    parser.add_argument("--method", choices=["lora", "adalora", "qlora", "full"], help="default lora")
    add_run_flags(parser, report_to=True)
    parser.add_argument("--output", help="run folder (default runs/finetune-<timestamp>)")
    parser.add_argument("--seed", type=int, help="random seed (run.seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run folder")
    add_config_flags(parser, "model, data, lora, finetune, adalora, qlora, run")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    flags = (*COMMON_FLAGS, ("selection", "finetune", "selection"), ("method", "finetune", "method"))
    cfg = load_config(FinetuneConfig, args.config, args.overrides, config_values(args, flags))
    if args.print_config:
        return print_config(cfg)
    result = run_finetune(cfg, overwrite=args.overwrite)
    times = result.loop.step_seconds
    print(f"run folder: {result.run_dir}")
    print(
        f"{cfg.finetune.method} on {result.selection.description}: {result.trainable_params:,} trainable "
        f"parameters; lowest selected block {result.selection.lowest_block}"
    )
    print(
        f"held-out loss: base {result.heldout[0]['loss']:.4f} -> {result.heldout[-1]['loss']:.4f} after "
        f"{result.loop.steps_run} steps"
    )
    if times:
        print(
            f"median step {statistics.median(times):.3f} s, {result.loop.tokens_per_second:.0f} tokens/s; peak "
            "memory " + ", ".join(f"{k} {v:.2f}" for k, v in result.memory.items())
        )
    return 0


def run_finetune(cfg: FinetuneConfig, overwrite: bool = False, command: str = "") -> FinetuneResult:
    """Train the selected layers from the base model on a fresh run folder; returns the trained model and numbers."""
    check_method_available(cfg)
    tracking.check_available(cfg.run.report_to)
    selection = load_selection(cfg.finetune.selection) if cfg.finetune.selection else None
    reset_peak_memory()
    timings = Timings()
    started = time.perf_counter()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    device = distributed.local_device() or pick_device(cfg.run.device)  # under a launcher: this process's device
    quantization = quantization_config(cfg) if cfg.finetune.method == "qlora" else None
    with timings.measure("load model"):
        loaded = load_model(cfg.model, device, quantization, defer=distributed.ram_efficient_loading())
    include_head = cfg.model.include_lm_head or (selection is not None and any(s.block < 0 for s in selection.layers))
    layers = discover_layers(loaded.model, include_head)
    if cfg.run.gradient_checkpointing or distributed.activation_checkpointing():
        enable_gradient_checkpointing(loaded.model)
    if selection is None:
        selection = all_layers(layers, cfg.model.name, cfg.lora.r)
    chosen = resolve_selection(selection, layers, cfg.model.name)
    with timings.measure("load data"):
        data = load_sft_data(cfg.data, loaded.tokenizer, cfg.run.seed)

    run_dir = prepare_run_dir(cfg.run.output, "finetune", overwrite)
    write_yaml(run_dir / "config.yaml", config_to_dict(cfg))
    selection.save(run_dir / "selection.json")
    manifest = Manifest.for_training("finetune", cfg, loaded, data, len(layers), command)
    manifest.sections.update(method=cfg.finetune.method, selection=_selection_record(cfg, selection))
    manifest.write(run_dir)

    pad_id = int(loaded.tokenizer.pad_token_id)
    heldout_batches = eval_batches(data.eval, cfg.finetune.batch_size, pad_id)
    torch.manual_seed(cfg.run.seed)  # adapter initialisation does not depend on what ran before
    trainable = make_trainable(loaded.model, chosen, cfg, selection.lora_ranks())
    model = trainable.model
    if distributed.fsdp_enabled():  # FSDP swaps in sharded parameters: collect them again, before the optimizer
        fsdp.shard_if_enabled(model)
        trainable.params = [p for p in model.parameters() if p.requires_grad]
    with timings.measure("held-out evaluation"):  # new adapters start at zero: this is the base model's loss
        heldout = [{"step": 0, "loss": heldout_loss(model, heldout_batches, device)}]
    model.train()
    if cfg.run.compile:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(
        trainable.params, lr=cfg.finetune.learning_rate, weight_decay=cfg.finetune.weight_decay
    )  # built after freezing: see docs/peers.md
    warmup, max_steps = cfg.finetune.warmup_steps, cfg.finetune.max_steps
    # linear warm-up, then linear decay to 0 at the last step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_then(step, warmup, max_steps))
    n_trainable = sum(p.numel() for p in trainable.params)
    log.info(
        "%s on %d of %d layers: %d trainable parameters", cfg.finetune.method, len(chosen), len(layers), n_trainable
    )

    def loss_fn(batch: Any) -> torch.Tensor:
        loss = sft_loss(model, batch)
        return loss + trainable.extra_loss() if trainable.extra_loss is not None else loss

    stage = f"finetune ({cfg.finetune.method})"

    def after_step(step: int, _loss: float) -> bool:
        if step % cfg.finetune.eval_every == 0:
            with timings.measure("held-out evaluation"):
                heldout.append({"step": step, "loss": heldout_loss(model, heldout_batches, device)})
            tracking.log_step(stage, step, {"heldout_loss": heldout[-1]["loss"]})
        return False

    eval_before = timings.seconds.get("held-out evaluation", 0.0)
    train_started = time.perf_counter()
    try:
        with tracking.session(cfg.run.report_to, run_dir, config_to_dict(cfg)):
            loop = train(
                stage=stage,
                params=trainable.params,
                batches=batch_stream(data.train, cfg.finetune.batch_size, pad_id, cfg.run.seed),
                loss_fn=loss_fn,
                optimizer=optimizer,
                scheduler=scheduler,
                max_steps=cfg.finetune.max_steps,
                device=device,
                grad_clip=cfg.finetune.grad_clip,
                after_step=after_step,
                before_zero_grad=trainable.before_zero_grad,
            )
    except NonFiniteLossError as err:
        manifest.fail(run_dir, str(err), timings.seconds, peak_memory())
        raise IlaError(f"{err} (run folder {run_dir})") from None
    # the evaluations inside the loop count as held-out evaluation, not as training
    evaluations = timings.seconds.get("held-out evaluation", 0.0) - eval_before
    timings.seconds["training"] = time.perf_counter() - train_started - evaluations
    if heldout[-1]["step"] != loop.steps_run:
        with timings.measure("held-out evaluation"):
            heldout.append({"step": loop.steps_run, "loss": heldout_loss(model, heldout_batches, device)})

    with timings.measure("write artifacts"):
        artifacts = save_trained(model, chosen, cfg, loaded, run_dir)
        write_csv(
            run_dir / "losses.csv",
            [
                {"step": i + 1, "loss": v, "seconds": s}
                for i, (v, s) in enumerate(zip(loop.losses, loop.step_seconds, strict=True))
            ],
        )
        write_csv(run_dir / "heldout.csv", heldout)
        plot_loss_curves(
            loop.losses, heldout, run_dir / "loss_curves.png", f"{cfg.finetune.method}: {selection.description}"
        )
    timings.seconds["total"] = time.perf_counter() - started
    memory = peak_memory()
    result = FinetuneResult(
        run_dir, model, selection, loop, heldout, n_trainable, trainable.names, timings.seconds, memory
    )
    write_finetune_report(run_dir / "report.md", cfg, result, data, artifacts)
    write_html_report(run_dir / "report.md", extra_images=("loss_curves.png",))
    manifest.finish(
        run_dir,
        timings.seconds,
        memory,
        artifacts=artifacts,
        trainable_params={
            "count": n_trainable,
            "tensors": len(trainable.names),
            "expected_from_selection": expected_params(chosen, cfg, selection.lora_ranks()),
        },
        training=loop_summary(loop),
        heldout_loss=heldout,
    )  # last: "complete" means every artifact is in place
    return result


def _selection_record(cfg: FinetuneConfig, selection: Selection) -> dict[str, Any]:
    return {
        "path": cfg.finetune.selection,
        "description": selection.description,
        "ranking_method": selection.ranking_method,
        "ranking_path": selection.ranking_path,
        "n_selected": len(selection.layers),
        "n_layers": selection.n_layers,
        "lowest_block": selection.lowest_block,
        "backward_blocks": selection.backward_blocks,
        "layers": selection.names(),
    }
