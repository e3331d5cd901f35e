"""Selection: turn a ranking into the layers to fine-tune (top-K, freeze-bottom, parameter or memory budget), over
all layers at once or within each module type (`per_type`, Spectrum's rule); or keep every layer and give each a
LoRA rank from its score under a LoRA-parameter budget (`lora_ranks`).

Reads a ranking.json (ILA or any baseline) and, for layer shapes and model order, the model's module tree (built
on the meta device from its config, no weights); writes selection.json, which `ila finetune` and `ila export` read.

Over 500 lines because every rule shares the greedy walk over the ranking and the cost model that checks a
budget; split, each rule would need both.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ila.config import ModelConfig
from ila.errors import IlaError
from ila.layers import Layer, discover_layers
from ila.ranking import LayerScore, Ranking, load_ranking
from ila.run_folder import write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

RuleKind = Literal["top_count", "top_fraction", "freeze_bottom", "param_budget", "memory_budget", "lora_ranks", "all"]
BudgetMethod = Literal["lora", "qlora", "full"]

# Memory estimate (see `estimate_training_memory`).
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34  # per block at 16-bit (Korthikanti et al. 2022, no attention-score term)
QLORA_BYTES_PER_WEIGHT = 0.52  # NF4: 4 bits plus double-quantised block constants
ADAM_FP32_BYTES = 8  # Adam's two moments in fp32
FP32_BYTES = 4
LORA_BYTES_PER_PARAM = 16  # fp32 adapter weight, gradient and Adam's two moments


@dataclass(frozen=True)
class SelectionRule:
    """How layers are picked from a ranking; saved in selection.json so a selection can be reproduced.

    `value` is a count (top_count), a fraction (top_fraction, freeze_bottom), a number of trainable parameters
    (param_budget) or GB of estimated training memory (memory_budget). `method` says which parameters a budget
    counts: LoRA factors r·(in+out) per layer (lora, qlora) or the weight itself in·out (full).
    `per_type` applies the rule within each module type (q_proj, k_proj, ... separately; see `select`).
    `lora_ranks` keeps every layer and gives each a rank from `rank_choices` in proportion to its score, as many
    LoRA parameters as `value` allows (see `allocate_ranks`).
    """

    kind: RuleKind
    value: float | None = None
    method: BudgetMethod = "lora"
    lora_r: int = 8
    batch_size: int = 4  # memory estimate: sequences per step
    seq_len: int = 256  # memory estimate: tokens per sequence
    weight_bytes: float = 2.0  # memory estimate: bf16 weights, ila's default on CUDA
    per_type: bool = False
    rank_choices: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # lora_ranks: the ranks a layer can get
    fsdp_processes: int = 1  # memory estimate: per process under FSDP across this many processes
    lora_dropout: float = 0.05  # memory estimate: with dropout each LoRA layer copies its input (ila's default)
    gradient_checkpointing: bool = False  # memory estimate: blocks keep only their inputs, one block is recomputed

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_choices", tuple(sorted(set(self.rank_choices))))  # a JSON list when loaded
        if self.lora_r < 1:
            raise IlaError(f"lora r={self.lora_r} must be >= 1")
        if not self.rank_choices or any(not isinstance(r, int) or r < 1 for r in self.rank_choices):
            raise IlaError(f"rank choices {list(self.rank_choices)} must be whole numbers >= 1")
        if self.kind == "lora_ranks" and (self.per_type or self.method == "full"):
            raise IlaError(
                "LoRA ranks from scores keep every layer and count LoRA parameters: not with --per-type or "
                "--method full"
            )
        if self.batch_size < 1 or self.seq_len < 1:
            raise IlaError("the memory estimate needs batch size and sequence length >= 1")
        if self.fsdp_processes < 1:
            raise IlaError(f"fsdp processes={self.fsdp_processes} must be >= 1")
        if self.fsdp_processes > 1 and self.method == "qlora":
            raise IlaError("QLoRA does not run under FSDP in ila; estimate --method lora or full with --fsdp")
        if self.per_type and self.kind == "memory_budget":
            raise IlaError(
                "per-type selection does not apply to a memory budget (memory is not a sum over module types); "
                "allowed with top, freeze-bottom or a parameter budget"
            )


def top(value: int | float) -> SelectionRule:
    """`top(12)`: the 12 best layers; `top(0.3)`: the best 30%."""
    if isinstance(value, bool):
        raise IlaError(f"top={value!r} must be a count (whole number) or a fraction")
    return SelectionRule("top_count" if isinstance(value, int) else "top_fraction", float(value))


@dataclass(frozen=True)
class ModelShapes:
    """What selection needs from the model beyond the ranking: layer shapes, model order and sizes."""

    layers: list[Layer]  # in model order
    total_params: int
    hidden_size: int
    vocab_size: int
    n_blocks: int

    @classmethod
    def of(cls, model: nn.Module, include_lm_head: bool = False) -> ModelShapes:
        layers = discover_layers(model, include_lm_head)
        getter = getattr(model, "get_input_embeddings", None)
        embeddings = getter() if callable(getter) else None
        if not isinstance(embeddings, nn.Embedding):
            raise IlaError(f"{type(model).__name__} has no input embedding table; cannot estimate its memory")
        return cls(
            layers,
            sum(p.numel() for p in model.parameters()),
            int(embeddings.embedding_dim),
            int(embeddings.num_embeddings),
            len({layer.block for layer in layers if layer.block >= 0}),
        )

    def by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}


def model_shapes(model: str, include_lm_head: bool = False, trust_remote_code: bool = False) -> ModelShapes:
    """Shapes of a model from its config alone (meta device: no weights are read)."""
    from ila.model_loading import load_model_skeleton

    skeleton = load_model_skeleton(ModelConfig(name=model, trust_remote_code=trust_remote_code))
    return ModelShapes.of(skeleton, include_lm_head)


@dataclass(frozen=True)
class SelectedLayer:
    name: str
    block: int  # -1 for lm_head
    module_type: str
    rank: int  # in the source ranking (1 = most important)
    n_params: int  # in·out: trainable parameters under full fine-tuning
    lora_params: int | None  # r·(in+out) at the selection's LoRA rank; None when the shapes are unknown
    lora_r: int | None = None  # this layer's own LoRA rank (rule lora_ranks); None: the rule's lora_r


@dataclass
class Selection:
    """The chosen layers (in model order) and what training them is expected to cost."""

    layers: list[SelectedLayer]
    rule: SelectionRule
    description: str
    ranking_method: str
    ranking_path: str | None
    model: str | None
    n_layers: int  # layers in the ranking (all candidates)
    n_blocks: int
    trainable_params: dict[str, int | None]  # {"lora": r·Σ(in+out) or None, "full": Σ in·out}
    lowest_block: int | None  # the backward pass must reach this block: the depth cost
    backward_blocks: int  # blocks the backward pass runs through (n_blocks − lowest_block)
    memory_estimate: dict[str, float] | None = None  # GB, for rule.method; None without model shapes
    # trainable_params over the same count for every ranked layer: "full" = share of all linear-layer weights,
    # "lora" = share of an all-layer adapter (None without shapes); None in files written before it was recorded
    trainable_share: dict[str, float | None] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def _lora_label(self) -> str:
        ranks = self.lora_ranks()
        if ranks is None:
            return f"r={self.rule.lora_r}"
        return f"r={min(ranks.values())}-{max(ranks.values())} by layer"

    def lora_ranks(self) -> dict[str, int] | None:
        """Each layer's own LoRA rank (rule lora_ranks), by module name; None when all share rule.lora_r."""
        if all(layer.lora_r is None for layer in self.layers):
            return None
        return {layer.name: layer.lora_r or self.rule.lora_r for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "description": self.description,
            "rule": asdict(self.rule),
            "ranking_method": self.ranking_method,
            "ranking_path": self.ranking_path,
            "model": self.model,
            "n_selected": len(self.layers),
            "n_layers": self.n_layers,
            "n_blocks": self.n_blocks,
            "trainable_params": self.trainable_params,
            "trainable_share": self.trainable_share,
            "lowest_block": self.lowest_block,
            "backward_blocks": self.backward_blocks,
            "memory_estimate_gb": self.memory_estimate,
            "info": self.info,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    def summary(self) -> str:
        lora = self.trainable_params.get("lora")
        share = self.trainable_share or {}

        def of(key: str, whole: str) -> str:
            value = share.get(key)
            return f" ({value:.1%} of {whole})" if value is not None else ""

        parts = [
            f"{self.description}",
            f"trainable parameters: full {self.trainable_params['full']:,}{of('full', 'all linear-layer weights')}"
            + (
                f", LoRA {self._lora_label()} {lora:,}{of('lora', f'an all-layer adapter at r={self.rule.lora_r}')}"
                if lora is not None
                else ", LoRA unknown (no shapes)"
            ),
        ]
        if self.lowest_block is not None:
            parts.append(
                f"lowest selected block {self.lowest_block} of {self.n_blocks}: backward runs through "
                f"{self.backward_blocks} blocks"
            )
        if self.memory_estimate:
            where = f" per process, FSDP x{self.rule.fsdp_processes}" if self.rule.fsdp_processes > 1 else ""
            where += ", gradient checkpointing" if self.rule.gradient_checkpointing else ""
            parts.append(
                f"estimated training memory ({self.rule.method}{where}): {self.memory_estimate['total_gb']:.3g} GB"
            )
        return "; ".join(parts)


def load_selection(path: str | Path) -> Selection:
    """Read a selection.json written by `ila select`."""
    p = Path(path)
    if not p.is_file():
        raise IlaError(f"selection not found: {path} (write one with `ila select`)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        return Selection(
            layers=[SelectedLayer(**entry) for entry in data["layers"]],
            rule=SelectionRule(**data["rule"]),
            description=data["description"],
            ranking_method=data["ranking_method"],
            ranking_path=data.get("ranking_path"),
            model=data.get("model"),
            n_layers=int(data["n_layers"]),
            n_blocks=int(data["n_blocks"]),
            trainable_params=data["trainable_params"],
            lowest_block=data.get("lowest_block"),
            backward_blocks=int(data["backward_blocks"]),
            memory_estimate=data.get("memory_estimate_gb"),
            trainable_share=data.get("trainable_share"),
            info=data.get("info", {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # ValueError: bad JSON or bad UTF-8
        raise IlaError(f"{p}: not a valid ila selection file ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------------------------------- cost model


def lora_param_count(layer: Layer, r: int) -> int:
    """Parameters of one LoRA adapter: A (r x in) and B (out x r)."""
    return r * (layer.in_features + layer.out_features)


def estimate_training_memory(
    selected: Sequence[Layer], shapes: ModelShapes, rule: SelectionRule, ranks: dict[str, int] | None = None
) -> dict[str, float]:
    """A rough estimate (GB) of training memory for `selected` layers, to compare selections against a budget.

    - weights: every parameter at `rule.weight_bytes` (block linears at 0.52 bytes for qlora's NF4);
    - trainable state: LoRA adapters (at `ranks` where given) in fp32 with gradient and Adam's two moments (16
      bytes per parameter), or
      for full fine-tuning a gradient at the weight's precision plus Adam's fp32 moments (2 + 8 bytes);
    - activations kept for backward: 34·b·s·h bytes per block at 16 bits (Korthikanti et al. 2022, without the
      attention scores that SDPA/flash attention do not store), only for blocks from the lowest selected block up,
      because the backward pass stops there (the depth cost);
    - LoRA with dropout (`rule.lora_dropout` > 0, ila's default 0.05): each adapted layer keeps its own dropout
      copy of its input and the mask (b·s·in values and bytes; q, k and v each copy the same input); without
      dropout the adapter reads the input the block keeps anyway;
    - with `rule.gradient_checkpointing` (non-reentrant, as `run.gradient_checkpointing=true` runs it) each of
      those blocks keeps only its input (b·s·h), and one block at a time is recomputed in backward with all of its
      activations and dropout copies (the largest such block is counted once);
    - logits: b·s·vocab in fp32, and their gradient.

    Under FSDP across `rule.fsdp_processes` = N processes, per process, as ila runs it (configs/fsdp.yaml): fp32
    master weights, gradients and Adam state sharded N ways; two blocks gathered whole at `rule.weight_bytes` (the
    one computing and the one prefetched); activations and logits of the process's b/N rows. Loading adds
    nothing: each process fills only its shards (fsdp_cpu_ram_efficient_loading).
    Not counted: framework overhead, allocator fragmentation, CUDA context. Measure the real peak with
    `ila finetune` (manifest: peak_cuda_gb); benchmarks/memory_check.py compares the two on a CPU.
    """
    gb = 1024**3
    n = rule.fsdp_processes
    linear = sum(layer.n_params for layer in shapes.layers if layer.block >= 0)
    per_linear = QLORA_BYTES_PER_WEIGHT if rule.method == "qlora" else rule.weight_bytes
    master = FP32_BYTES if n > 1 else rule.weight_bytes  # FSDP keeps fp32 master weights and gradients
    weights = ((shapes.total_params - linear) * master + linear * (master if n > 1 else per_linear)) / n
    if rule.method == "full":
        state = sum(layer.n_params for layer in selected) * (master + ADAM_FP32_BYTES) / n
    else:
        r = ranks or {}
        lora = sum(lora_param_count(layer, r.get(layer.name, rule.lora_r)) for layer in selected)
        state = lora * LORA_BYTES_PER_PARAM / n
    blocks = [layer.block for layer in selected if layer.block >= 0]
    depth = shapes.n_blocks - min(blocks) if blocks else 0
    tokens = -(-rule.batch_size // n) * rule.seq_len  # this process's rows
    block_bytes = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * tokens * shapes.hidden_size * rule.weight_bytes / 2
    copies: dict[int, float] = {}  # LoRA dropout's input copy and mask, per adapted layer, summed by block
    if rule.method != "full" and rule.lora_dropout > 0:
        for layer in selected:
            copies[layer.block] = copies.get(layer.block, 0) + layer.in_features * tokens * (rule.weight_bytes + 1)
    if not rule.gradient_checkpointing:
        activations = depth * block_bytes + sum(copies.values())
    elif depth:  # every block from the lowest selected keeps its input; one is recomputed at a time
        kept = depth * tokens * shapes.hidden_size * rule.weight_bytes
        activations = kept + block_bytes + max(copies.values(), default=0)
    else:
        activations = 0.0
    logits = 2 * tokens * shapes.vocab_size * 4 if selected else 0
    out = {
        "weights_gb": weights / gb,
        "trainable_state_gb": state / gb,
        "activations_gb": activations / gb,
        "logits_gb": logits / gb,
    }
    if n > 1:
        per_block: dict[int, int] = {}
        for layer in shapes.layers:
            per_block[layer.block] = per_block.get(layer.block, 0) + layer.n_params
        biggest = max((size for block, size in per_block.items() if block >= 0), default=0)
        out["gathered_blocks_gb"] = 2 * biggest * rule.weight_bytes / gb
    out["total_gb"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------------------- selecting


def _check_rule(rule: SelectionRule, n: int) -> None:
    value = rule.value
    if rule.kind != "all" and value is None:
        raise IlaError(f"selection rule {rule.kind} needs a value")
    if rule.kind == "top_count":
        assert value is not None
        if value != int(value) or value < 1:
            raise IlaError(f"top={value:g}: give a whole number of layers >= 1, or a fraction in (0, 1]")
        if value > n and not rule.per_type:  # per type: checked against the smallest type in `_top_per_type`
            raise IlaError(f"top={int(value)} but the ranking has only {n} layers")
    elif rule.kind == "top_fraction":
        assert value is not None
        if not 0 < value <= 1:
            raise IlaError(f"top={value:g}: a fraction must lie in (0, 1] (give a whole number for a count)")
    elif rule.kind == "freeze_bottom":
        assert value is not None
        if not 0 <= value < 1:
            raise IlaError(f"freeze_bottom={value:g}: the frozen fraction must lie in [0, 1)")
        if n - round(value * n) < 1 and not rule.per_type:  # per type rounds down: every type keeps a layer
            raise IlaError(f"freeze_bottom={value:g} freezes all {n} layers; freeze a smaller fraction")
    elif rule.kind in ("param_budget", "memory_budget", "lora_ranks"):
        assert value is not None
        if value <= 0:
            unit = "GB" if rule.kind == "memory_budget" else "parameters"
            raise IlaError(f"{rule.kind}={value:g}: a budget must be > 0 {unit}")


def _greedy(entries: Sequence[LayerScore], fits: Callable[[list[LayerScore]], bool]) -> list[LayerScore]:
    """Walk the ranking best first; take a layer when the selection with it still fits, else skip it.

    Skipping (rather than stopping at the first misfit) spends the budget on the best layers that fit, so a big
    MLP matrix that does not fit does not block a smaller, lower-ranked attention matrix. The cost of a
    selection never falls when a layer is added, so the result never exceeds the budget.
    """
    chosen: list[LayerScore] = []
    for entry in entries:
        if fits([*chosen, entry]):
            chosen.append(entry)
    return chosen


def by_module_type(entries: Sequence[LayerScore]) -> dict[str, list[LayerScore]]:
    """Entries grouped by module type (first-seen order), each group in the ranking's order."""
    groups: dict[str, list[LayerScore]] = {}
    for entry in entries:
        groups.setdefault(entry.module_type, []).append(entry)
    return groups


# `fraction * n` may land just under a whole number (0.29 * 100 = 28.999999999999996); rounding down must not
# lose a layer to that
_ROUNDING_SLACK = 1e-9


def per_type_count(fraction: float, n: int) -> int:
    """Layers a per-type fraction takes from a type of `n`: rounded down, as Spectrum's int(n·P/100), at least 1.

    Rounding down keeps Spectrum's selection (`ila rank --method spectrum`, then `--top P/100 --per-type`); the
    floor of 1 keeps every type represented where Spectrum would drop a small type.
    """
    return max(1, math.floor(fraction * n + _ROUNDING_SLACK))


def _top_per_type(groups: dict[str, list[LayerScore]], rule: SelectionRule) -> list[LayerScore]:
    """top_count, top_fraction or freeze_bottom applied within each module type, in the ranking's order."""
    value = rule.value
    assert value is not None
    if rule.kind == "top_count":
        smallest = min(groups, key=lambda t: len(groups[t]))
        if value > len(groups[smallest]):
            raise IlaError(
                f"top={int(value)} per module type, but type {smallest} has only {len(groups[smallest])} "
                f"layers; allowed: 1 to {len(groups[smallest])}"
            )
        counts = {t: int(value) for t in groups}
    elif rule.kind == "top_fraction":
        counts = {t: per_type_count(value, len(members)) for t, members in groups.items()}
    else:  # freeze_bottom: the frozen count is rounded down, so every type keeps at least one layer
        counts = {t: max(1, len(m) - math.floor(value * len(m) + _ROUNDING_SLACK)) for t, m in groups.items()}
    return [entry for t, members in groups.items() for entry in members[: counts[t]]]


def _param_budget_per_type(
    groups: dict[str, list[LayerScore]], cost: Callable[[LayerScore], int], budget: float
) -> list[LayerScore]:
    """A parameter budget split across module types in proportion to each type's total cost, each share filled
    greedily by rank.

    Proportional shares are the budget form of "the same fraction of every type": a budget of 25% of all layers'
    parameters takes about 25% of each type. Shares are whole parameters rounded down, so together they never
    exceed the budget; what one type leaves unspent is not passed on, which would unbalance the types.
    """
    whole = math.floor(budget)
    sizes = {t: sum(cost(e) for e in members) for t, members in groups.items()}
    total = sum(sizes.values())
    # the smallest whole budget whose share of type t still fits t's smallest layer: ceil(smallest·total / size)
    needs = {t: -(-min(cost(e) for e in members) * total // sizes[t]) for t, members in groups.items()}
    tightest = max(needs, key=lambda t: needs[t])
    if whole < needs[tightest]:
        share = whole * sizes[tightest] // total
        smallest = min(cost(e) for e in groups[tightest])
        raise IlaError(
            f"parameter budget {budget:,.0f} split by module type gives {tightest} {share:,} parameters, below its "
            f"smallest layer ({smallest:,}); per type the budget must be at least {needs[tightest]:,} (or drop "
            "--per-type)"
        )

    def within(limit: int) -> Callable[[list[LayerScore]], bool]:
        return lambda trial: sum(cost(e) for e in trial) <= limit

    return [entry for t, members in groups.items() for entry in _greedy(members, within(whole * sizes[t] // total))]


def select(
    ranking: Ranking, rule: SelectionRule, shapes: ModelShapes | None = None, ranking_path: str | None = None
) -> Selection:
    """Apply `rule` to `ranking`; `shapes` (from the model) give LoRA parameter counts, model order and memory.

    With `rule.per_type` the rule is applied to each module type's layers in the ranking's order: a count takes
    that many of every type, a fraction `per_type_count` of each type, freeze-bottom freezes each type's bottom
    fraction rounded down, a parameter budget is split as `_param_budget_per_type` says. A memory budget is not
    split (SelectionRule refuses it).
    """
    entries = ranking.layers
    n = len(entries)
    if n == 0:
        raise IlaError(f"ranking {ranking_path or ''} has no layers".replace("  ", " "))
    _check_rule(rule, n)
    by_name = shapes.by_name() if shapes is not None else None
    if by_name is not None:
        missing = [e.name for e in entries if e.name not in by_name]
        if missing:
            raise IlaError(
                f"the ranking does not match the model: layer {missing[0]} (and {len(missing) - 1} more) "
                "not found in it; rank and select with the same model"
            )

    def layer_of(entry: LayerScore) -> Layer:
        assert by_name is not None
        return by_name[entry.name]

    def need_shapes(what: str) -> None:
        if by_name is None:
            raise IlaError(f"{what} needs the model's layer shapes: pass --model (the ranking names no loadable model)")

    value = rule.value
    ranks: dict[str, int] | None = None
    if rule.kind == "all":
        chosen = list(entries)
    elif rule.kind == "lora_ranks":
        assert value is not None
        need_shapes("LoRA ranks from scores")
        chosen = list(entries)
        ranks = allocate_ranks(entries, [layer_of(e) for e in entries], value, rule.rank_choices)
    elif rule.per_type and rule.kind in ("top_count", "top_fraction", "freeze_bottom"):
        chosen = _top_per_type(by_module_type(entries), rule)
    elif rule.kind == "top_count":
        assert value is not None
        chosen = list(entries[: int(value)])
    elif rule.kind == "top_fraction":
        assert value is not None
        chosen = list(entries[: max(1, round(value * n))])
    elif rule.kind == "freeze_bottom":
        assert value is not None
        chosen = list(entries[: n - round(value * n)])
    elif rule.kind == "param_budget":
        assert value is not None
        if rule.method == "full":

            def cost(entry: LayerScore) -> int:
                return entry.n_params
        else:
            need_shapes(f"a {rule.method} parameter budget")

            def cost(entry: LayerScore) -> int:
                return lora_param_count(layer_of(entry), rule.lora_r)

        budget = value
        if rule.per_type:
            chosen = _param_budget_per_type(by_module_type(entries), cost, budget)
        else:
            chosen = _greedy(entries, lambda trial: sum(cost(e) for e in trial) <= budget)
        if not chosen:
            smallest = min(entries, key=cost)
            raise IlaError(
                f"parameter budget {value:,.0f} is below the smallest layer ({smallest.name}: "
                f"{cost(smallest):,} {rule.method} parameters)"
            )
    else:  # memory_budget
        assert value is not None
        need_shapes("a memory budget")
        assert shapes is not None
        fixed = estimate_training_memory([], shapes, rule)["total_gb"]
        if fixed >= value:
            raise IlaError(
                f"memory budget {value:g} GB is below the frozen model alone ({fixed:.3g} GB of weights "
                + (f"at {rule.weight_bytes:g} bytes each)" if rule.fsdp_processes == 1 else "per FSDP process)")
            )

        def memory(trial: list[LayerScore]) -> float:
            return estimate_training_memory([layer_of(e) for e in trial], shapes, rule)["total_gb"]

        budget_gb = value
        chosen = _greedy(entries, lambda trial: memory(trial) <= budget_gb)
        if not chosen:
            cheapest = min(entries, key=lambda e: memory([e]))
            raise IlaError(
                f"memory budget {value:g} GB is below the cheapest single-layer selection "
                f"({cheapest.name}: {memory([cheapest]):.3g} GB estimated)"
            )
    return _build(ranking, rule, chosen, shapes.layers if shapes is not None else None, shapes, ranking_path, ranks)


def rank_weights(entries: Sequence[LayerScore]) -> list[float]:
    """What each layer's rank is proportional to: ILA's mask value γ where the ranking has it, else the score
    scaled to [0, 1] over the ranking (a baseline's scores have their own units)."""
    if all(e.gamma is not None for e in entries):
        return [float(e.gamma) for e in entries]  # type: ignore[arg-type]
    low, high = min(e.score for e in entries), max(e.score for e in entries)
    if high == low:
        return [1.0] * len(entries)
    return [(e.score - low) / (high - low) for e in entries]


def allocate_ranks(
    entries: Sequence[LayerScore], layers: Sequence[Layer], budget: float, choices: Sequence[int]
) -> dict[str, int]:
    """Every layer's LoRA rank: c·weight rounded to the nearest choice on a log scale (at least the smallest
    choice, so every layer keeps an adapter), with the largest c whose total r·(in+out) stays within `budget`.

    The total only grows with c, so c is found by bisection; ties in rounding go to the smaller rank."""
    weights = rank_weights(entries)
    sizes = [layer.in_features + layer.out_features for layer in layers]
    choices = sorted(choices)
    logs = [math.log2(r) for r in choices]

    def ranks_at(c: float) -> list[int]:
        out = []
        for w in weights:
            if c * w <= choices[0]:
                out.append(choices[0])
                continue
            target = math.log2(c * w)
            out.append(min(zip(logs, choices, strict=True), key=lambda item: (abs(item[0] - target), item[1]))[1])
        return out

    def cost(ranks: Sequence[int]) -> int:
        return sum(r * size for r, size in zip(ranks, sizes, strict=True))

    floor = cost(ranks_at(0.0))
    if floor > budget:
        raise IlaError(
            f"LoRA-rank budget {budget:,.0f} is below every layer at rank {choices[0]} ({floor:,} parameters); "
            "raise the budget or allow a smaller rank"
        )
    positive = [w for w in weights if w > 0]
    if not positive:
        return {e.name: choices[0] for e in entries}
    low, high = 0.0, 2 * choices[-1] / min(positive)  # at `high` every layer with weight > 0 has the largest rank
    if cost(ranks_at(high)) <= budget:
        low = high
    else:
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if cost(ranks_at(middle)) <= budget else (low, middle)
    return {e.name: r for e, r in zip(entries, ranks_at(low), strict=True)}


def _build(
    ranking: Ranking,
    rule: SelectionRule,
    chosen: list[LayerScore],
    known: Sequence[Layer] | None,
    shapes: ModelShapes | None,
    ranking_path: str | None,
    ranks: dict[str, int] | None = None,
) -> Selection:
    """Assemble the Selection; `known` layers give model order and LoRA counts, `shapes` the memory estimate,
    `ranks` each layer's own LoRA rank (rule lora_ranks)."""
    by_name = {layer.name: layer for layer in known} if known is not None else None
    if by_name is not None:
        position = {name: i for i, name in enumerate(by_name)}
        ordered = sorted(chosen, key=lambda e: position[e.name])
    else:  # without the model: by block (the output head last), then by name
        ordered = sorted(chosen, key=lambda e: (e.block if e.block >= 0 else 1 << 30, e.name))
    selected = [
        SelectedLayer(
            e.name,
            e.block,
            e.module_type,
            e.rank,
            e.n_params,
            lora_param_count(by_name[e.name], (ranks or {}).get(e.name, rule.lora_r)) if by_name is not None else None,
            (ranks or {}).get(e.name),
        )
        for e in ordered
    ]
    blocks = [layer.block for layer in selected if layer.block >= 0]
    lowest = min(blocks) if blocks else None
    lora_counts = [layer.lora_params for layer in selected]
    lora = None if None in lora_counts else sum(c for c in lora_counts if c is not None)
    full = sum(layer.n_params for layer in selected)
    trainable: dict[str, int | None] = {"lora": lora, "full": full}
    memory = None
    if shapes is not None and by_name is not None:
        memory = estimate_training_memory([by_name[layer.name] for layer in selected], shapes, rule, ranks)
    all_full = sum(e.n_params for e in ranking.layers)
    all_lora = sum(lora_param_count(by_name[e.name], rule.lora_r) for e in ranking.layers) if by_name else None
    share: dict[str, float | None] = {
        "full": full / all_full if all_full else None,
        "lora": lora / all_lora if lora is not None and all_lora else None,
    }
    kept = ("model_fingerprint", "data", "data_sha256", "seed", "milestone")
    info: dict[str, Any] = {k: ranking.info[k] for k in kept if k in ranking.info}
    return Selection(
        layers=selected,
        rule=rule,
        description=describe(rule, len(selected), len(ranking.layers), trainable),
        ranking_method=ranking.method,
        ranking_path=ranking_path,
        model=ranking.info.get("model"),
        n_layers=len(ranking.layers),
        n_blocks=ranking.n_blocks,
        trainable_params=trainable,
        trainable_share=share,
        lowest_block=lowest,
        backward_blocks=ranking.n_blocks - lowest if lowest is not None else 0,
        memory_estimate=memory,
        info=info,
    )


def describe(rule: SelectionRule, k: int, n: int, trainable: dict[str, int | None]) -> str:
    """One line saying what was selected and by which rule."""
    share = f"{k} of {n} layers ({k / n:.0%})"
    value = rule.value
    if rule.kind == "all" or value is None:
        return f"all {n} layers"
    each = " of each module type" if rule.per_type else ""
    if rule.kind == "top_count" and rule.per_type:
        return f"top {value:g}{each}: {share}"
    if rule.kind == "top_fraction" and rule.per_type:
        return f"top {100 * value:g}%{each} (rounded down, at least 1): {share}"
    if rule.kind in ("top_count", "top_fraction"):
        return f"top {share}"
    if rule.kind == "freeze_bottom":
        return f"freeze the bottom {100 * value:g}%{each}: top {share}"
    count = trainable["full"] if rule.method == "full" else trainable["lora"]
    counted = f"{rule.method}" + (f" r={rule.lora_r}" if rule.method != "full" else "")
    split = ", split by module type in proportion to size" if rule.per_type else ""
    if rule.kind == "param_budget":
        return f"parameter budget {value:,.0f} ({counted}{split}, greedy by rank): {share}, {count:,} parameters"
    if rule.kind == "lora_ranks":
        return (
            f"LoRA ranks from scores (ranks {', '.join(map(str, rule.rank_choices))}) within {value:,.0f} LoRA "
            f"parameters: all {n} layers, {count:,} parameters"
        )
    return (
        f"memory budget {value:g} GB ({counted}, batch {rule.batch_size} x {rule.seq_len} tokens, greedy by "
        f"rank): {share}"
    )


def all_layers(layers: Sequence[Layer], model: str | None, lora_r: int = 8) -> Selection:
    """The baseline selection: every linear layer of every block (what `ila finetune` trains without a selection)."""
    n_blocks = len({layer.block for layer in layers if layer.block >= 0})
    entries = [
        LayerScore(layer.name, layer.block, layer.module_type, 0.0, None, i + 1, layer.n_params)
        for i, layer in enumerate(layers)
    ]
    ranking = Ranking("none", entries, n_blocks, {"model": model} if model else {})
    return _build(ranking, SelectionRule("all", lora_r=lora_r), entries, layers, None, None)


# ------------------------------------------------------------------------- budgets as written, ranking files


def parse_share(text: str) -> float:
    """'30%' as 0.3; a share must lie in (0, 100]%."""
    try:
        share = float(text.strip().rstrip("%")) / 100
    except ValueError:
        raise IlaError(f"'{text}' is not a percentage (example: 30%)") from None
    if not 0 < share <= 1:
        raise IlaError(f"'{text}': a share must lie in (0, 100]%")
    return share


def parse_param_count(text: str) -> float:
    """'2000000', '2e6', '1.5M', '300k' or '1B' as a number of parameters."""
    raw = text.strip().replace(",", "").replace("_", "")
    factor = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(raw[-1:].lower(), 1.0)
    if factor != 1.0:
        raw = raw[:-1]
    try:
        return float(raw) * factor
    except ValueError:
        raise IlaError(f"parameter budget '{text}' is not a number (examples: 2000000, 2e6, 1.5M, 300k)") from None


def select_from_file(
    ranking_path: str | Path, rule: SelectionRule, model: str | None = None, trust_remote_code: bool = False
) -> Selection:
    """Load a ranking, find the model's shapes (`model`, else the model the ranking names) and select.

    Without any loadable model, counts that need layer shapes (LoRA parameters, memory) are left out; rules that
    need them raise an IlaError asking for --model.
    """
    ranking = load_ranking(ranking_path)
    include_head = any(entry.block < 0 for entry in ranking.layers)
    shapes = None
    name = model or ranking.info.get("model")
    if name:
        try:
            shapes = model_shapes(str(name), include_head, trust_remote_code)
        except IlaError as err:
            if model:  # the user asked for this model: its failure is the error
                raise
            log.warning(
                "layer shapes unavailable (the ranking names model %s: %s); pass --model for LoRA "
                "parameter counts and memory estimates",
                name,
                err,
            )
    selection = select(ranking, rule, shapes, str(ranking_path))
    if model:
        selection.model = model
    return selection
