"""`ila finetune`: restart from the base model and train only the selected layers (LoRA, AdaLoRA, QLoRA or full).

Reads a model, SFT data and a selection.json (none: every linear layer of every block, the baseline); writes a run
folder with the adapter (PEFT) or the changed weights (safetensors), train and held-out loss curves (CSV + PNG),
manifest.json and report.md. Training goes through the shared loop in `training_loop.train`.
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ila import distributed, sharding, tracking
from ila.config import FinetuneConfig, config_to_dict
from ila.errors import IlaError, NonFiniteLossError
from ila.html_report import write_html_report
from ila.layers import Layer, discover_layers
from ila.lora_adapters import (
    adalora_orthogonal_penalty,
    adalora_update,
    adapted_module_names,
    attach_adalora,
    attach_lora,
    prepare_quantized_for_training,
    unwrap,
)
from ila.model_loading import LoadedModel, load_model, pick_device
from ila.run_folder import (
    Timings,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    hardware,
    package_versions,
    peak_memory,
    prepare_run_dir,
    reset_peak_memory,
    write_csv,
    write_json,
    write_yaml,
)
from ila.selection import Selection, all_layers, load_selection
from ila.sft_data import SftData, batch_stream, eval_batches, load_sft_data
from ila.training_loop import (
    LoopResult,
    compile_blocks,
    enable_gradient_checkpointing,
    heldout_loss,
    sft_loss,
    train,
)

log = logging.getLogger(__name__)

CHANGED_WEIGHTS = "selected_weights.safetensors"


@dataclass
class FinetuneResult:
    run_dir: Path
    model: nn.Module  # the trained model (a PEFT model for lora, adalora and qlora)
    selection: Selection
    loop: LoopResult
    heldout: list[dict[str, float]]  # {"step", "loss"}; step 0 is the base model
    trainable_params: int
    trainable_names: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)


def check_method_available(cfg: FinetuneConfig) -> None:
    """Refuse a method this machine cannot run, before anything is loaded or written."""
    if distributed.fsdp_enabled() and cfg.finetune.method in ("adalora", "qlora"):
        raise IlaError(
            f"finetune.method={cfg.finetune.method} cannot run under FSDP (AdaLoRA's rank allocator and 4-bit "
            "weights need whole tensors); use lora or full with configs/fsdp.yaml, or configs/ddp.yaml"
        )
    if distributed.fsdp_enabled() and cfg.finetune.save_model:
        raise IlaError("finetune.save_model=true is not supported under FSDP; apply the changed weights instead")
    if cfg.finetune.method != "qlora":
        return
    if cfg.run.device == "cpu" or not torch.cuda.is_available():
        raise IlaError(
            "finetune.method=qlora needs a CUDA GPU (4-bit bitsandbytes weights) and none is available; "
            "use --method lora here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise IlaError("finetune.method=qlora needs bitsandbytes: pip install bitsandbytes")


def _quantization_config(cfg: FinetuneConfig) -> Any:
    from transformers import BitsAndBytesConfig

    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.qlora.quant_type,
        bnb_4bit_use_double_quant=cfg.qlora.double_quant,
        bnb_4bit_compute_dtype=compute[cfg.qlora.compute_dtype],
    )


def resolve_selection(selection: Selection, layers: Sequence[Layer], model_name: str) -> list[Layer]:
    """The model's Layer objects for the selected names; every name must exist in this model."""
    by_name = {layer.name: layer for layer in layers}
    missing = [name for name in selection.names() if name not in by_name]
    if missing:
        raise IlaError(
            f"the selection does not match {model_name}: layer {missing[0]} (and {len(missing) - 1} more) "
            f"is not a linear layer of this model; select with a ranking of the same model"
        )
    if not selection.layers:
        raise IlaError("the selection is empty; select at least one layer")
    return [by_name[name] for name in selection.names()]


@dataclass
class TrainableSetup:
    """What the method made trainable, and the extra hooks it needs in the shared loop."""

    model: nn.Module
    params: list[nn.Parameter]
    names: list[str]
    extra_loss: Callable[[], torch.Tensor] | None = None
    before_zero_grad: Callable[[int], None] | None = None


def make_trainable(
    model: nn.Module, chosen: Sequence[Layer], cfg: FinetuneConfig, ranks: dict[str, int] | None = None
) -> TrainableSetup:
    """Set up the method on exactly `chosen`, at each layer's own LoRA rank where `ranks` gives one; every other
    parameter is frozen before the optimizer exists."""
    method = cfg.finetune.method
    if ranks and method not in ("lora", "qlora"):
        raise IlaError(
            f"the selection gives each layer its own LoRA rank, which --method {method} cannot use; "
            "train it with --method lora or qlora"
        )
    if method == "full":
        model.requires_grad_(False)
        for layer in chosen:
            _weight(model, layer).requires_grad_(True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        expected = {f"{layer.name}.weight" for layer in chosen}
        if set(names) != expected:  # a tied weight (lm_head = embeddings) is reported under one name
            log.warning(
                "full fine-tuning trains %s (selected: %d weights); tied weights are shared",
                ", ".join(sorted(set(names) ^ expected)),
                len(expected),
            )
        return TrainableSetup(model, [p for p in model.parameters() if p.requires_grad], names)
    if method == "qlora":
        model = prepare_quantized_for_training(model, cfg.qlora.gradient_checkpointing)  # type: ignore[arg-type]
    if method == "adalora":
        peft_model = attach_adalora(model, chosen, cfg.lora, cfg.adalora, cfg.finetune.max_steps)  # type: ignore[arg-type]
    else:
        peft_model = attach_lora(model, chosen, cfg.lora, ranks)  # type: ignore[arg-type]
    adapted = set(adapted_module_names(peft_model))
    wanted = {layer.name for layer in chosen}
    if adapted != wanted:  # PEFT's suffix matching must not reach beyond the selection
        raise IlaError(
            f"PEFT adapted {len(adapted)} modules but {len(wanted)} were selected "
            f"(extra: {sorted(adapted - wanted)[:3]}, missing: {sorted(wanted - adapted)[:3]})"
        )
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    trainable = TrainableSetup(peft_model, [p for p in peft_model.parameters() if p.requires_grad], names)
    if method == "adalora":
        trainable.extra_loss = lambda: adalora_orthogonal_penalty(peft_model)
        trainable.before_zero_grad = lambda step: adalora_update(peft_model, step)
    return trainable


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
    quantization = _quantization_config(cfg) if cfg.finetune.method == "qlora" else None
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
    manifest = _manifest_base(cfg, loaded, data, layers, selection, command)
    manifest["status"] = "running"
    write_json(run_dir / "manifest.json", manifest)

    pad_id = int(loaded.tokenizer.pad_token_id)
    heldout_batches = eval_batches(data.eval, cfg.finetune.batch_size, pad_id)
    torch.manual_seed(cfg.run.seed)  # adapter initialisation does not depend on what ran before
    trainable = make_trainable(loaded.model, chosen, cfg, selection.lora_ranks())
    model = trainable.model
    if distributed.fsdp_enabled():  # FSDP swaps in sharded parameters: collect them again, before the optimizer
        sharding.shard_if_enabled(model)
        trainable.params = [p for p in model.parameters() if p.requires_grad]
    with timings.measure("held-out evaluation"):  # new adapters start at zero: this is the base model's loss
        heldout = [{"step": 0, "loss": heldout_loss(model, heldout_batches, device)}]
    model.train()
    if cfg.run.compile:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(
        trainable.params, lr=cfg.finetune.learning_rate, weight_decay=cfg.finetune.weight_decay
    )  # built after freezing: see docs/peers.md
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(cfg.finetune.warmup_steps, cfg.finetune.max_steps)
    )
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
        manifest.update(status="failed", error=str(err), timings=timings.seconds, memory=peak_memory())
        write_json(run_dir / "manifest.json", manifest)
        raise IlaError(f"{err} (run folder {run_dir})") from None
    # the evaluations inside the loop count as held-out evaluation, not as training
    evaluations = timings.seconds.get("held-out evaluation", 0.0) - eval_before
    timings.seconds["training"] = time.perf_counter() - train_started - evaluations
    if heldout[-1]["step"] != loop.steps_run:
        with timings.measure("held-out evaluation"):
            heldout.append({"step": loop.steps_run, "loss": heldout_loss(model, heldout_batches, device)})

    with timings.measure("write artifacts"):
        artifacts = _save_trained(model, chosen, cfg, loaded, run_dir)
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
    manifest.update(
        status="complete",
        timings=timings.seconds,
        memory=memory,
        artifacts=artifacts,
        trainable_params={
            "count": n_trainable,
            "tensors": len(trainable.names),
            "expected_from_selection": _expected_params(chosen, cfg, selection.lora_ranks()),
        },
        training=_loop_summary(loop),
        heldout_loss=heldout,
    )
    write_json(run_dir / "manifest.json", manifest)
    write_finetune_report(run_dir / "report.md", cfg, result, data, artifacts)
    write_html_report(run_dir / "report.md", extra_images=("loss_curves.png",))
    return result


def _lr_factor(warmup: int, max_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:  # linear warm-up, then linear decay to 0 at the last step (as in Stage 1)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup))

    return factor


def _expected_params(chosen: Sequence[Layer], cfg: FinetuneConfig, ranks: dict[str, int] | None = None) -> int:
    method = cfg.finetune.method
    if method == "full":
        return sum(layer.n_params for layer in chosen)
    if method == "adalora":  # A (r x in), B (out x r) and the r singular values E
        return sum(cfg.adalora.init_r * (layer.in_features + layer.out_features + 1) for layer in chosen)
    r = ranks or {}
    return sum(r.get(layer.name, cfg.lora.r) * (layer.in_features + layer.out_features) for layer in chosen)


def _save_trained(
    model: nn.Module, chosen: Sequence[Layer], cfg: FinetuneConfig, loaded: LoadedModel, run_dir: Path
) -> dict[str, str]:
    """The adapter (LoRA family) or the changed tensors (full), and optionally the whole model."""
    if cfg.finetune.method != "full":
        state = sharding.lora_state_dict(model)  # gathered on every process under FSDP
        with atomic_dir(run_dir / "adapter") as staging:
            model.save_pretrained(str(staging), state_dict=state)  # type: ignore[operator]
        return {"adapter": "adapter"}
    tensors = {
        f"{layer.name}.weight": distributed.full(_weight(model, layer)).detach().to("cpu").contiguous()
        for layer in chosen
    }
    metadata = {"format": "pt", "base_model": cfg.model.name, "base_fingerprint": loaded.fingerprint}
    atomic_write_bytes(run_dir / CHANGED_WEIGHTS, safetensors_bytes(tensors, metadata=metadata))
    atomic_write_text(run_dir / "APPLY.md", _apply_note(cfg.model.name, len(tensors)))
    out = {"changed_weights": CHANGED_WEIGHTS, "apply_note": "APPLY.md"}
    if cfg.finetune.save_model:
        with atomic_dir(run_dir / "model") as staging:
            model.save_pretrained(str(staging))  # type: ignore[operator]
            loaded.tokenizer.save_pretrained(str(staging))
        out["model"] = "model"
    return out


def _weight(model: nn.Module, layer: Layer) -> torch.Tensor:
    weight = getattr(model.get_submodule(layer.name), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise IlaError(f"layer {layer.name} has no weight tensor")
    return weight


def _apply_note(model_name: str, n_tensors: int) -> str:
    return f"""# Applying the fine-tuned weights

`{CHANGED_WEIGHTS}` holds only the {n_tensors} weight matrices that were trained; every other tensor of the
model is unchanged from the base model `{model_name}` (check `base_fingerprint` in the file's metadata).

```python
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{model_name}")
missing, unexpected = model.load_state_dict(load_file("{CHANGED_WEIGHTS}"), strict=False)
assert not unexpected  # every saved tensor found its place
model.save_pretrained("merged-model")  # optional: a complete checkpoint
```
"""


def _loop_summary(loop: LoopResult) -> dict[str, Any]:
    times = loop.step_seconds
    return {
        "steps": loop.steps_run,
        "median_step_s": statistics.median(times) if times else None,
        "tokens_per_s": loop.tokens_per_second,
        "padding_fraction": loop.padding_fraction,
        "first_loss": loop.losses[0] if loop.losses else None,
        "last_loss": loop.losses[-1] if loop.losses else None,
    }


def _manifest_base(
    cfg: FinetuneConfig, loaded: LoadedModel, data: SftData, layers: Sequence[Layer], selection: Selection, command: str
) -> dict[str, Any]:
    return {
        "ila_command": command or " ".join(sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": cfg.finetune.method,
        "config": config_to_dict(cfg),
        "model": {
            "source": loaded.source,
            "resolved": loaded.resolved_path,
            "fingerprint": loaded.fingerprint,
            "class": type(unwrap(loaded.model)).__name__,
            "n_layers": len(layers),
        },
        "data": {
            "source": data.stats.source,
            "sha256": data.stats.fingerprint,
            "rows": data.stats.rows,
            "train_examples": data.stats.train_examples,
            "eval_examples": data.stats.eval_examples,
        },
        "selection": {
            "path": cfg.finetune.selection,
            "description": selection.description,
            "ranking_method": selection.ranking_method,
            "ranking_path": selection.ranking_path,
            "n_selected": len(selection.layers),
            "n_layers": selection.n_layers,
            "lowest_block": selection.lowest_block,
            "backward_blocks": selection.backward_blocks,
            "layers": selection.names(),
        },
        "seed": cfg.run.seed,
        "versions": package_versions(),
        "hardware": hardware(),
    }


def plot_loss_curves(
    train_losses: Sequence[float], heldout: Sequence[dict[str, float]], path: Path, title: str
) -> None:
    """Train loss per step and held-out loss at each evaluation, in one PNG."""
    import matplotlib.pyplot as plt

    from ila.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(train_losses) + 1), train_losses, lw=1, alpha=0.8, label="train (batch)")
    ax.plot([row["step"] for row in heldout], [row["loss"] for row in heldout], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("SFT loss (assistant tokens)")
    ax.set_title(title[:90])
    ax.legend()
    save_figure(fig, path)


def write_finetune_report(
    path: Path, cfg: FinetuneConfig, result: FinetuneResult, data: SftData, artifacts: dict[str, str]
) -> None:
    loop, selection = result.loop, result.selection
    times = loop.step_seconds
    base, final = result.heldout[0]["loss"], result.heldout[-1]["loss"]
    lines = [
        f"# Selective fine-tuning: {cfg.finetune.method} on {cfg.model.name}",
        "",
        f"- Selection: {selection.description} (ranking method `{selection.ranking_method}`"
        + (f", `{selection.ranking_path}`" if selection.ranking_path else "")
        + ")",
        f"- Lowest selected block: {selection.lowest_block} of {selection.n_blocks}; the backward pass runs "
        f"through {selection.backward_blocks} blocks (the depth cost)",
        f"- Trainable parameters: {result.trainable_params:,} in {len(result.trainable_names)} tensors",
        f"- Data: `{data.stats.source}` ({data.stats.train_examples} train, {data.stats.eval_examples} held out; "
        f"sha256 `{data.stats.fingerprint[:16]}`); {data.stats.truncated} truncated, "
        f"{data.stats.dropped_too_long} dropped as too long",
        f"- Training: {loop.steps_run} steps of batch {cfg.finetune.batch_size}, lr {cfg.finetune.learning_rate:g}; "
        f"train loss {loop.losses[0]:.3f} -> {loop.losses[-1]:.3f}; median step "
        f"{statistics.median(times) if times else float('nan'):.3f} s, {loop.tokens_per_second:.0f} tokens/s",
        f"- Held-out loss: base {base:.4f} -> {final:.4f} (evaluated every {cfg.finetune.eval_every} steps and at "
        "the end; `heldout.csv`, `loss_curves.png`)",
        "- Peak memory: " + ", ".join(f"{k} {v:.2f}" for k, v in result.memory.items()),
        "",
        "## Where the time went",
        "",
        "| part | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in result.timings.items()]
    lines += ["", "## Files", ""]
    if "adapter" in artifacts:
        lines.append("- `adapter/`: the PEFT adapter; load it with `PeftModel.from_pretrained(base_model, 'adapter')`")
    else:
        lines.append(f"- `{CHANGED_WEIGHTS}`: only the trained weight matrices; `APPLY.md` says how to load them")
        if "model" in artifacts:
            lines.append("- `model/`: the whole fine-tuned model (save_pretrained)")
    lines += ["- `selection.json`, `config.yaml`, `manifest.json`, `losses.csv`, `heldout.csv`, `loss_curves.png`", ""]
    atomic_write_text(path, "\n".join(lines))
