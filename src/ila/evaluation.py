"""The model and the SFT numbers `ila evaluate` reports: the base model with an adapter, a finetune run folder or its
changed weights on top, and its token-weighted SFT loss, perplexity and next-token accuracy on the answer tokens,
each with its standard error (examples as the sampled units).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ila.config import (
    EvaluateConfig,
)
from ila.errors import IlaError, first_line
from ila.lora_adapters import load_lora
from ila.model_loading import LoadedModel, load_model
from ila.sft_data import IGNORE_INDEX, Example, collate, load_sft_data
from ila.trainable import CHANGED_WEIGHTS  # what `ila finetune --method full` writes

ADAPTER_FORMS = (
    f"give a PEFT adapter folder, an `ila finetune` run folder, a {CHANGED_WEIGHTS} file "
    "or an `ila identify` run folder"
)

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
SAMPLES_FILE = "eval_samples.jsonl"  # --log-samples: one JSON line per scored sample, beside eval.json


# ------------------------------------------------------------------------------------------ model + adapter


@dataclass(frozen=True)
class AdapterSource:
    """What `--adapter` points at: a PEFT adapter folder, or the changed weights of a full fine-tune."""

    kind: str  # "peft" | "changed_weights"
    path: Path


def resolve_adapter(path: str | Path) -> AdapterSource:
    """What a user may give as an adapter: a PEFT adapter folder, an `ila finetune` run folder (its adapter/ or
    selected_weights.safetensors), that file, or an `ila identify` run folder (its final Stage-1 adapter)."""
    given = Path(path).expanduser()
    if given.is_file() and given.suffix == ".safetensors":
        return AdapterSource("changed_weights", given)
    for folder in (given, given / "adapter", given / "stage1" / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return AdapterSource("peft", folder)
    if (given / CHANGED_WEIGHTS).is_file():
        return AdapterSource("changed_weights", given / CHANGED_WEIGHTS)
    if not given.exists():
        raise IlaError(f"adapter {path} not found; {ADAPTER_FORMS}")
    raise IlaError(
        f"adapter {path} holds no adapter_config.json, adapter/, stage1/adapter/ or {CHANGED_WEIGHTS}; {ADAPTER_FORMS}"
    )


def resolve_lora_adapter(path: str | Path) -> Path:
    """The PEFT adapter folder behind `path` (any form resolve_adapter takes), for what reads LoRA factors."""
    source = resolve_adapter(path)
    if source.kind != "peft":
        raise IlaError(
            f"{path} holds fine-tuned weights ({source.path.name}), not LoRA factors; give a PEFT adapter folder, "
            "an identify run folder or a LoRA finetune run folder"
        )
    return source.path


def apply_adapter(model: nn.Module, source: AdapterSource) -> nn.Module:
    """The model with the adapter on top (a PEFT model) or with the fine-tuned weights copied in."""
    if source.kind == "peft":
        try:
            return load_lora(model, source.path)  # type: ignore[arg-type]
        except (ValueError, RuntimeError, KeyError, OSError) as err:
            raise IlaError(
                f"could not load the adapter {source.path} onto this model (was it trained on another "
                f"model?): {first_line(err)}"
            ) from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(source.path))
    except (SafetensorError, OSError) as err:
        raise IlaError(f"could not read {source.path}: {first_line(err)}") from None
    state = model.state_dict()
    for name, tensor in tensors.items():
        if name not in state:
            raise IlaError(
                f"{source.path}: tensor {name} is not a parameter of this model; was it fine-tuned from another model?"
            )
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise IlaError(
                f"{source.path}: tensor {name} has shape {tuple(tensor.shape)}, the model's has "
                f"{tuple(state[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    return model


def load_for_evaluation(
    cfg: EvaluateConfig, adapter: str | None, device: torch.device
) -> tuple[LoadedModel, nn.Module]:
    """Load the base model and put `adapter` (if any) on top; the model is in eval mode."""
    source = resolve_adapter(adapter) if adapter else None
    loaded = load_model(cfg.model, device)
    model: nn.Module = loaded.model
    if source is not None:
        model = apply_adapter(model, source)
    model.eval()
    return loaded, model


# ------------------------------------------------------------------------------------------ SFT loss


@dataclass(frozen=True)
class ExampleLoss:
    """One scored example: the summed cross-entropy of its answer tokens, how many there are, and how many of them
    the model's most likely next token gets right."""

    index: int  # position among the evaluated examples (held-out ones first, in the data's seeded order)
    nll_sum: float
    tokens: int
    correct: int = 0

    @property
    def loss(self) -> float | None:
        return self.nll_sum / self.tokens if self.tokens else None


@dataclass(frozen=True)
class SftMetrics:
    """Token-weighted mean SFT loss (assistant tokens), its perplexity and the next-token accuracy on the answer
    tokens (greedy prediction = the data's token) on one split of the data, with standard errors."""

    split: str
    loss: float
    perplexity: float
    examples: int
    target_tokens: int
    source: str
    sha256: str
    loss_stderr: float | None = None
    perplexity_stderr: float | None = None
    token_accuracy: float | None = None
    token_accuracy_stderr: float | None = None
    per_example: tuple[ExampleLoss, ...] = field(default=(), repr=False)


def perplexity(loss: float) -> float:
    """exp(loss); infinite once exp overflows a float."""
    return math.exp(loss) if loss < 700 else math.inf


def token_mean_stderr(sums: Sequence[float], tokens: Sequence[int]) -> tuple[float, float | None]:
    """The token-weighted mean L = sum(s_i) / sum(n_i) over examples i (s_i: the example's summed loss, or its
    count of correctly predicted tokens), and its standard error.

    The tokens of one answer are not independent draws, so the examples are the sampled units: the ratio-estimator
    (delta-method) variance m/(m-1) * sum((s_i - L*n_i)^2) / (sum n_i)^2. With equal answer lengths it is the
    familiar sd(per-example loss) / sqrt(m). None with fewer than two examples (no spread to measure).
    """
    total = float(sum(tokens))
    loss = sum(sums) / max(total, 1.0)
    m = len(tokens)
    if m < 2 or total == 0:
        return loss, None
    spread = sum((s - loss * n) ** 2 for s, n in zip(sums, tokens, strict=True))
    return loss, math.sqrt(m / (m - 1) * spread) / total


def perplexity_stderr(loss: float, loss_stderr: float | None) -> float | None:
    """Delta method: d exp(L) / dL = exp(L), so stderr(perplexity) = perplexity * stderr(loss)."""
    ppl = perplexity(loss)
    return ppl * loss_stderr if loss_stderr is not None and math.isfinite(ppl) else None


@torch.no_grad()
def example_losses(
    model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, device: torch.device
) -> list[ExampleLoss]:
    """Each example's summed answer-token loss and its count of answer tokens predicted right (argmax), batched as
    eval_batches batches them (same padding, same numbers).

    training_loop.sft_loss returns only the batch mean, so this takes its plain path (full forward, cross-entropy
    on the assistant tokens) with the per-token losses kept; the result's token-weighted mean is heldout_loss.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # eval_batches' order
    found: dict[int, ExampleLoss] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows], pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        targets = batch.labels[:, 1:]
        keep = targets != IGNORE_INDEX
        nll = torch.zeros(keep.shape, dtype=torch.float64, device=keep.device)
        nll[keep] = F.cross_entropy(logits[keep].float(), targets[keep], reduction="none").double()
        right = ((logits.argmax(dim=-1) == targets) & keep).sum(dim=1).tolist()
        sums = zip(nll.sum(dim=1).tolist(), keep.sum(dim=1).tolist(), right, strict=True)
        for row, (total, count, hits) in enumerate(sums):
            found[rows[row]] = ExampleLoss(rows[row], float(total), int(count), int(hits))
    return [found[i] for i in range(len(examples))]


def sft_metrics(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvaluateConfig, device: torch.device
) -> tuple[SftMetrics, list[Example]]:
    """Loss and perplexity, with standard errors, on the held-out examples (split=heldout) or on all (split=all).

    The data is loaded with the same DataConfig and seed as identify/finetune, so `heldout` is their held-out set.
    Returns the metrics and the examples evaluated (the judge takes its prompts from them).
    """
    data = load_sft_data(cfg.data, tokenizer, cfg.run.seed)
    examples = data.eval if cfg.evaluate.split == "heldout" else data.eval + data.train
    pad_id = int(tokenizer.pad_token_id)  # type: ignore[arg-type]
    per_example = example_losses(model, examples, cfg.evaluate.batch_size, pad_id, device)
    tokens = [e.tokens for e in per_example]
    loss, loss_stderr = token_mean_stderr([e.nll_sum for e in per_example], tokens)
    accuracy, accuracy_stderr = token_mean_stderr([float(e.correct) for e in per_example], tokens)
    metrics = SftMetrics(
        split=cfg.evaluate.split,
        loss=loss,
        perplexity=perplexity(loss),
        examples=len(examples),
        target_tokens=sum(e.tokens for e in per_example),
        source=data.stats.source,
        sha256=data.stats.fingerprint,
        loss_stderr=loss_stderr,
        perplexity_stderr=perplexity_stderr(loss, loss_stderr),
        token_accuracy=accuracy if sum(tokens) else None,
        token_accuracy_stderr=accuracy_stderr,
        per_example=tuple(per_example),
    )
    return metrics, examples
