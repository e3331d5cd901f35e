"""`ila experiment`'s report.md: overlap tables per method (cross-data-set, cross-seed, milestone vs final), the
fine-tuning tables with paired differences across train seeds, the cost table and the ablation figure, all read
back from the unit folders (so a report can be rewritten from kept results without rerunning a unit).

Over 500 lines because it is one document: its sections share the row readers and formats.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

from ila.experiment_plan import (
    ILA,
    MILESTONE_METHODS,
    SEED_FREE,
    ExperimentConfig,
    ExperimentResult,
    finetune_data,
    finetune_folder,
    finetune_methods,
    finetune_seed,
    finetune_units,
    identify_dir,
    is_complete,
    ranking_dir,
    train_seeds,
)
from ila.manifest import Manifest
from ila.ranking import Ranking, load_ranking
from ila.ranking_methods import DATA_FREE
from ila.run_folder import write_json


def _load(folder: Path) -> Ranking | None:
    path = folder / "ranking.json"
    return load_ranking(path) if path.is_file() else None


def _overlap_rows(
    cfg: ExperimentConfig, rankings: Sequence[Ranking], labels: Sequence[str], context: str
) -> tuple[list[str], dict[str, Any]]:
    from ila.compare import compare_rankings

    comparison = compare_rankings(rankings, labels, cfg.k_percents)
    rows = []
    for index, pair in enumerate(comparison.levels[0].pairs):
        cells = [f"{lv.pairs[index].jaccard:.3f} (p={lv.pairs[index].p_value:.2g})" for lv in comparison.levels]
        corr = comparison.correlations[index]
        rows.append(f"| {context} | {pair.a} vs {pair.b} | " + " | ".join(cells) + f" | {corr.spearman:.3f} |")
    return rows, comparison.to_dict()


def _overlap_table(
    cfg: ExperimentConfig,
    title: str,
    groups: list[tuple[str, list[Ranking], list[str]]],
    note: str,
    saved: dict[str, Any],
    key: str,
) -> list[str]:
    lines = [f"### {title}", "", note, ""]
    usable = [(context, r, labels) for context, r, labels in groups if len(r) >= 2]
    if not usable:
        return [*lines, "(not enough rankings for this comparison)", ""]
    head = " | ".join(f"top {k:g}%" for k in cfg.k_percents)
    lines += [f"| group | pair | {head} | Spearman |", "|---" * (len(cfg.k_percents) + 3) + "|"]
    chance: list[str] = []
    for context, rankings, labels in usable:
        rows, data = _overlap_rows(cfg, rankings, labels, context)
        lines += rows
        saved[f"{key}/{context}"] = data
        chance = [f"{level['chance_jaccard']:.3f}" for level in data["k"]]
    lines += ["| chance level | | " + " | ".join(chance) + " | 0 |", ""]
    return lines


def write_report(cfg: ExperimentConfig, root: Path, result: ExperimentResult | None = None) -> str:
    """report.md: overlap tables per method (cross-data-set, cross-seed, milestone vs final) and fine-tuning."""
    names = [name for name, _ in cfg.datasets]
    lines = [
        "# Experiment report",
        "",
        f"Model: `{cfg.model}`; data sets: {', '.join(names)}; seeds: "
        f"{', '.join(map(str, cfg.seeds))}; milestones: {', '.join(f'{m}%' for m in cfg.milestones)}; "
        f"rankings: {', '.join(cfg.rankings)}.",
        "",
        "Cells: Jaccard of the top-K sets (p: one-sided hypergeometric test against two random K-sets); "
        "Spearman over the full rankings. The chance level is the expected Jaccard of two random K-sets.",
        "",
    ]
    saved: dict[str, Any] = {}
    lines += _overview(cfg, root, names)
    for method in cfg.rankings:
        lines += [f"## {method}", ""]
        if method in DATA_FREE:
            lines += [
                f"{method} does not read the data: its rankings are identical across data sets by construction.",
                "",
            ]
        else:
            groups = []
            for seed in cfg.seeds:
                pairs = [(name, _load(ranking_dir(root, method, name, seed))) for name in names]
                found = [(n, r) for n, r in pairs if r is not None]
                groups.append((f"seed {seed}", [r for _, r in found], [n for n, _ in found]))
            lines += _overlap_table(
                cfg, "Across data sets", groups, "Final rankings of each data set, per seed.", saved, f"{method}/data"
            )
        if method in SEED_FREE:
            lines += [f"{method} does not depend on the seed: identical across seeds by construction.", ""]
        else:
            groups = []
            for name in names[:1] if method in DATA_FREE else names:
                pairs2 = [(f"seed {s}", _load(ranking_dir(root, method, name, s))) for s in cfg.seeds]
                found2 = [(n, r) for n, r in pairs2 if r is not None]
                context = "any data set" if method in DATA_FREE else name
                groups.append((context, [r for _, r in found2], [n for n, _ in found2]))
            lines += _overlap_table(
                cfg, "Across seeds", groups, "Final rankings of each seed, per data set.", saved, f"{method}/seed"
            )
        early = sorted(set(cfg.milestones) - {100})
        if method in MILESTONE_METHODS and early:
            lines += [
                "### Milestone vs final",
                "",
                "Ranking from each Stage-1 milestone (percent of the planned steps) against the final ranking.",
                "",
            ]
            head = " | ".join(f"top {k:g}%" for k in cfg.k_percents)
            lines += [f"| group | pair | {head} | Spearman |", "|---" * (len(cfg.k_percents) + 3) + "|"]
            chance: list[str] = []
            for name in names:
                for seed in cfg.seeds:
                    final = _load(ranking_dir(root, method, name, seed))
                    for milestone in early:
                        at = _load(ranking_dir(root, method, name, seed, milestone))
                        if final is None or at is None:
                            continue
                        context = f"{name} seed {seed}"
                        rows, data = _overlap_rows(cfg, [at, final], [f"{milestone}%", "final"], context)
                        lines += rows
                        saved[f"{method}/milestone/{context}/{milestone}"] = data
                        chance = [f"{level['chance_jaccard']:.3f}" for level in data["k"]]
            lines += ["| chance level | | " + " | ".join(chance) + " | 0 |", ""]
        elif method not in MILESTONE_METHODS:
            lines += [f"{method} does not read the Stage-1 update: no milestone comparison.", ""]
    if ILA in cfg.rankings and len(cfg.rankings) > 1:
        lines += _against_methods(cfg, root, names, saved)
    if cfg.finetune is not None:
        lines += finetune_section(cfg, root)
    if result is not None and result.missing:
        lines += ["## Missing units", ""] + [f"- {item}" for item in result.missing] + [""]
    write_json(root / "comparisons.json", saved)
    return "\n".join(lines)


def _overview(cfg: ExperimentConfig, root: Path, names: list[str]) -> list[str]:
    """Two figures over the first seed: every final ranking's top-30% overlap, and ILA's score profiles by depth."""
    from ila.compare import compare_rankings, plot_overlap, plot_profiles

    seed = cfg.seeds[0]
    found: list[tuple[str, Ranking]] = []
    ila_found: list[tuple[str, Ranking]] = []  # (data set, ranking) for the profiles
    for method in cfg.rankings:
        for name in names[:1] if method in DATA_FREE else names:
            ranking = _load(ranking_dir(root, method, name, seed))
            if ranking is None:
                continue
            if method in SEED_FREE:
                label = method
            elif method in DATA_FREE:
                label = f"{method} seed {seed}"
            else:
                label = f"{method} {name}"
            found.append((label, ranking))
            if method == ILA:
                ila_found.append((name, ranking))
    if len(found) < 2:
        return []
    comparison = compare_rankings([r for _, r in found], [label for label, _ in found], [30.0], 30.0)
    plot_overlap(comparison, root / "overlap.png")
    lines = [
        "## Overview",
        "",
        f"Top-30% overlap of every final ranking of seed {seed} (Jaccard in the cells):",
        "",
        "![overlap](overlap.png)",
        "",
    ]
    if ila_found:
        plot_profiles([r for _, r in ila_found], [f"ila {name}" for name, _ in ila_found], root / "profiles.png")
        lines += [
            f"ILA's scores by depth for each module type, per data set (seed {seed}):",
            "",
            "![profiles](profiles.png)",
            "",
        ]
    return lines


def _against_methods(cfg: ExperimentConfig, root: Path, names: list[str], saved: dict[str, Any]) -> list[str]:
    """ILA's final ranking against each other method's on the same data set and seed."""
    lines = [
        "## ila against the other methods",
        "",
        "ILA's final ranking against each other method's on the same data set and seed: how much of ILA's "
        "selection a cheaper rule picks anyway (high overlap with last or first means ILA mostly finds depth).",
        "",
    ]
    head = " | ".join(f"top {k:g}%" for k in cfg.k_percents)
    lines += [f"| method | pair | {head} | Spearman |", "|---" * (len(cfg.k_percents) + 3) + "|"]
    chance: list[str] = []
    for other in [m for m in cfg.rankings if m != ILA]:
        for name in names:
            for seed in cfg.seeds:
                ila_ranking, theirs = (
                    _load(ranking_dir(root, ILA, name, seed)),
                    _load(ranking_dir(root, other, name, seed)),
                )
                if ila_ranking is None or theirs is None:
                    continue
                rows, data = _overlap_rows(cfg, [ila_ranking, theirs], [f"ila {name} seed {seed}", other], other)
                lines += rows
                saved[f"ila-vs/{other}/{name}/seed{seed}"] = data
                chance = [f"{level['chance_jaccard']:.3f}" for level in data["k"]]
    return [*lines, "| chance level | | " + " | ".join(chance) + " | 0 |", ""]


def finetune_rows(cfg: ExperimentConfig, root: Path) -> list[dict[str, Any]]:
    """One row per complete finetune run (unit x train seed): rule, ranking, fraction, layers, loss, cost."""
    import json

    rows = []
    for each, train_seed in product(finetune_units(cfg), train_seeds(cfg)):
        folder = finetune_folder(cfg, root, each.name, train_seed)
        if not is_complete(folder):
            continue
        manifest = _manifest(folder)
        selection = json.loads((folder / "selection.json").read_text(encoding="utf-8"))
        base_loss, loss = manifest.heldout_losses()
        share = (selection.get("trainable_share") or {}).get("full" if each.training == "full" else "lora")
        rows.append(
            {
                "unit": each.name,
                "train_seed": train_seed,
                "training": each.training,
                "method": each.label,
                "rule": each.rule,
                "fraction": each.fraction,
                "layers": f"{selection.get('n_selected')}/{selection.get('n_layers')}",
                "lowest_block": selection.get("lowest_block"),
                "params": manifest.trainable_params,
                "share": 1.0 if each.rule == "all" else share,
                "base_loss": base_loss,
                "loss": loss,
                "median_step_s": manifest.median_step_s,
                "peak_gb": manifest.peak_gb if manifest.peak_gb is not None else float("nan"),
                "train_examples": manifest.data.train_examples if manifest.data else None,
                "batch_size": manifest.get("config", "finetune", "batch_size"),
            }
        )
    return rows


def mean_over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per unit: losses averaged over its train seeds (listed in `losses`), step time their median."""
    from statistics import mean, median

    by_unit: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_unit.setdefault(row["unit"], []).append(row)
    out = []
    for runs in by_unit.values():
        losses = [r["loss"] for r in runs if r["loss"] is not None]
        bases = [r["base_loss"] for r in runs if r["base_loss"] is not None]
        steps = [r["median_step_s"] for r in runs if r["median_step_s"] is not None]
        shares = [r["share"] for r in runs if r.get("share") is not None]
        out.append(
            {
                **runs[0],
                "train_seed": None,
                "losses": losses,
                "loss": mean(losses) if losses else None,
                "base_loss": mean(bases) if bases else None,
                "median_step_s": median(steps) if steps else None,
                "peak_gb": max(r["peak_gb"] for r in runs),
                "share": mean(shares) if shares else None,  # random draws differ by seed
            }
        )
    return out


def paired_differences(rows: list[dict[str, Any]], method: str = ILA) -> list[str]:
    """Markdown: `method` minus each other ranking at the same training method, rule and fraction, paired by
    train seed."""
    from statistics import stdev

    def setting(row: dict[str, Any]) -> tuple[str, str, float]:
        return row.get("training", "lora"), row["rule"], row["fraction"]

    loss = {(r["method"], *setting(r), r["train_seed"]): r["loss"] for r in rows if r["loss"] is not None}
    several = len({r.get("training", "lora") for r in rows}) > 1
    lines = []
    for training, rule, fraction in sorted({setting(r) for r in rows if r["method"] == method}):
        for other in sorted({r["method"] for r in rows if r["method"] not in (method, "-")}):
            mine = {s for (m, t, ru, f, s) in loss if (m, t, ru, f) == (method, training, rule, fraction)}
            seeds = sorted(s for s in mine if (other, training, rule, fraction, s) in loss)
            if not seeds:
                continue
            diffs = [
                loss[(method, training, rule, fraction, s)] - loss[(other, training, rule, fraction, s)] for s in seeds
            ]
            wins = sum(d < 0 for d in diffs)
            values = ", ".join(f"{d:+.4f}" for d in diffs)
            spread = f"{stdev(diffs):.4f}" if len(diffs) > 1 else "-"
            where = f"{training} {rule} {fraction:.2f}" if several else f"{rule} {fraction:.2f}"
            lines.append(
                f"| {where} | {other} | {sum(diffs) / len(diffs):+.4f} | {spread} | {values} | {wins}/{len(diffs)} |"
            )
    if not lines:
        return []
    return [
        f"### {method} against the baselines",
        "",
        f"Held-out loss of {method}'s selection minus the baseline's at the same training method, rule and "
        f"fraction, paired by train seed (same data split and order); negative means {method} is better. The "
        "spread (standard deviation of the paired differences across seeds) is the noise floor a mean difference "
        "has to clear.",
        "",
        "| setting | baseline | mean difference | spread | per train seed | seeds where " + method + " is lower |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def ranks_against_budget(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: each ranking's LoRA ranks from scores (rule lora-ranks) minus its top layers at full rank within the
    same LoRA-parameter share (rule param-budget), paired by train seed."""
    from statistics import stdev

    loss = {
        (r["method"], r.get("training", "lora"), r["rule"], r["fraction"], r["train_seed"]): r["loss"]
        for r in rows
        if r["loss"] is not None
    }
    lines = []
    for method, training, fraction in sorted({(k[0], k[1], k[3]) for k in loss if k[2] == "lora-ranks"}):
        seeds = sorted(
            s
            for (m, t, ru, f, s) in loss
            if (m, t, ru, f) == (method, training, "lora-ranks", fraction)
            and (method, training, "param-budget", fraction, s) in loss
        )
        if not seeds:
            continue
        diffs = [
            loss[(method, training, "lora-ranks", fraction, s)] - loss[(method, training, "param-budget", fraction, s)]
            for s in seeds
        ]
        spread = f"{stdev(diffs):.4f}" if len(diffs) > 1 else "-"
        lines.append(
            f"| {training} {fraction:.2f} | {method} | {sum(diffs) / len(diffs):+.4f} | {spread} | "
            f"{', '.join(f'{d:+.4f}' for d in diffs)} | {sum(d < 0 for d in diffs)}/{len(diffs)} |"
        )
    if not lines:
        return []
    return [
        "### LoRA ranks from scores against top layers at the same budget",
        "",
        "Held-out loss with every layer at a rank from its score (rule lora-ranks) minus the same ranking's top layers "
        "at the uniform rank (rule param-budget), both within the same share of the all-layers LoRA parameters, paired "
        "by train seed; negative means the ranks are better.",
        "",
        "| training, share | ranking | mean difference | spread | per train seed | seeds where ranks are lower |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def finetune_section(cfg: ExperimentConfig, root: Path) -> list[str]:
    assert cfg.finetune is not None
    runs = finetune_rows(cfg, root)
    rows = mean_over_seeds(runs)
    ft = cfg.finetune
    seeds = train_seeds(cfg)
    seed_note = (
        f"train seed {seeds[0]}"
        if len(seeds) == 1
        else f"mean over train seeds {', '.join(map(str, seeds))}; the values per seed in brackets"
    )
    random_note = (
        " random draws a new permutation for every train seed."
        if ft.random_per_seed and "random" in finetune_methods(cfg)
        else ""
    )
    lines = [
        "## Fine-tuning",
        "",
        f"{', '.join(ft.method)}, {ft.steps} steps each, from the base model on {finetune_data(cfg)} (rankings of "
        f"seed {finetune_seed(cfg)}). Held-out loss: base -> after training ({seed_note}).{random_note}",
        "",
    ]
    if any(name != finetune_data(cfg) for name in ft.ranked_on):
        lines += [
            f"'METHOD from DATA': that method's ranking on another data set, fine-tuned on {finetune_data(cfg)} "
            "(does a ranking carry over?).",
            "",
        ]
    lines += [
        "'per type': the rule is applied within each module type (q, k, v, o, gate, up, down separately), as "
        "Spectrum does; rule param-budget: the best layers up to that share of the all-layers trainable parameters; "
        "rule lora-ranks: every layer, each with a LoRA rank from its score, within the same share of LoRA parameters. "
        "Backward has to reach the lowest selected block, so a step's cost follows that block more than the "
        "number of layers. Step time and peak memory come from each unit's own run, one unit at a time.",
        "",
        "| unit | rule | ranking | fraction | layers | trainable share | lowest block | trainable params | "
        "held-out loss | median step s | peak memory GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    for row in rows:
        each = f" ({', '.join(f'{v:.4f}' for v in row['losses'])})" if len(row["losses"]) > 1 else ""
        lines.append(
            f"| {row['unit']} | {row['rule']} | {row['method']} | {num(row['fraction'], '.2f')} | "
            f"{row['layers']} | {num(row['share'], '.1%')} | {num(row['lowest_block'], 'd')} | "
            f"{num(row['params'], ',')} | {num(row['base_loss'], '.4f')} -> "
            f"{num(row['loss'], '.4f')}{each} | {num(row['median_step_s'], '.3f')} | {num(row['peak_gb'], '.2f')} |"
        )
    lines.append("")
    lines += paired_differences(runs)
    lines += ranks_against_budget(runs)
    trainings = [t for t in ft.method if any(r["training"] == t for r in rows)]
    for training in trainings:
        # freeze-bottom f keeps the top 1 - f of the same ranking, so it is one more point on the fraction axis
        ablation = [r for r in rows if r["training"] == training and r["rule"] in ("top", "freeze-bottom", "all")]
        if not ablation:
            continue
        name = "ablation.png" if len(ft.method) == 1 else f"ablation-{training}.png"
        title = "### Ablation: selected fraction" + ("" if len(ft.method) == 1 else f" ({training})")
        lines += [
            title,
            "",
            "Held-out loss and median step time against the fraction of layers trained (rule top, and "
            f"freeze-bottom {ft.freeze_bottom:g} as the top {1 - ft.freeze_bottom:g}; fraction 1.0 is every layer).",
            "",
            *ablation_table(ablation),
            f"![ablation]({name})",
            "",
        ]
        plot_ablation(ablation, root / name)
    lines += cost_section(cfg, root, rows)
    if runs:
        write_json(root / "finetune.json", runs)
    return [*lines, ""]


def _manifest(folder: Path) -> Manifest:
    """A unit's manifest; a missing one reads as an empty one (the report shows "-" for what it lacks)."""
    return Manifest.read(folder) or Manifest("unknown", status="missing", versions={}, hardware={})


def ranking_cost(cfg: ExperimentConfig, root: Path, method: str, milestone: int, data: str) -> float | None:
    """Seconds one ranking cost to produce from nothing, from its run folders' timings (None when a folder is
    missing): ila is the whole identify run; ila@m Stage 1 up to the milestone's step plus the milestone's own run
    (model load, Stage 2); delta-norm Stage 1 (to the milestone) plus its ranking run; every other method its
    ranking run. Identify's held-out evaluations count: a user pays them too."""
    from ila.stage1_lora import milestone_steps

    seed = finetune_seed(cfg)
    identify = _manifest(identify_dir(root, data, seed))
    if method == ILA and milestone == 100:
        return identify.total_seconds
    if method not in MILESTONE_METHODS:
        return _manifest(ranking_dir(root, method, data, seed)).total_seconds
    timings = identify.timings
    steps, window = identify.get("stage1", "steps"), identify.get("config", "stage1", "window")
    if "stage 1" not in timings or not steps or not window:
        return None
    at = milestone_steps(steps, window, [milestone])[milestone]
    stage1_s = timings["stage 1"] * at / steps
    if method == ILA:
        own = _manifest(ranking_dir(root, ILA, data, seed, milestone)).total_seconds
        return stage1_s + own if own is not None else None
    loads = timings.get("load model", 0.0) + timings.get("load data", 0.0)
    own = _manifest(ranking_dir(root, method, data, seed, milestone)).total_seconds
    return stage1_s + loads + own if own is not None else None


def cost_section(cfg: ExperimentConfig, root: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: what each ranking cost, in seconds and in all-layers fine-tuning steps, and what ranking plus a
    selective fine-tune costs against an all-layers fine-tune of the same steps (40 steps, one epoch, and one
    ranking serving two data sets)."""
    assert cfg.finetune is not None
    ft = cfg.finetune
    step_all = {r["training"]: r["median_step_s"] for r in rows if r["rule"] == "all" and r["median_step_s"]}
    reference = step_all.get(ft.method[0])
    used = sorted(
        {(u.method, u.milestone, u.ranked_on, u.label) for u in finetune_units(cfg) if u.method},
        key=lambda item: [u.label for u in finetune_units(cfg)].index(item[3]),
    )
    costs: dict[str, float] = {}
    lines = [
        "### Cost",
        "",
        "What producing each ranking cost (seconds, from the timings in its run folders), and the same as a "
        f"number of all-layers {ft.method[0]} fine-tuning steps (median step of the all-layers unit). 'from DATA' "
        "rankings were produced on that data set.",
        "",
        "| ranking | seconds | all-layers steps |",
        "|---|---|---|",
    ]
    for method, milestone, ranked_on, label in used:
        seconds = ranking_cost(cfg, root, method, milestone, ranked_on)
        if seconds is None or label in costs:
            continue
        costs[label] = seconds
        steps = f"{seconds / reference:.0f}" if reference else "-"
        lines.append(f"| {label} | {seconds:.0f} | {steps} |")
    train_examples = next((r["train_examples"] for r in rows if r.get("train_examples")), None)
    batch = next((r["batch_size"] for r in rows if r.get("batch_size")), None)
    epoch = -(-train_examples // batch) if train_examples and batch else None
    horizons = [(f"{ft.steps} steps", ft.steps, 1)]
    if epoch:
        horizons += [(f"1 epoch ({epoch} steps)", epoch, 1), (f"2 data sets x {epoch} steps", epoch, 2)]
    lines += [
        "",
        "Ranking plus fine-tuning the selection, as a multiple of fine-tuning every layer for the same steps "
        "(below 1: the selection pays for its ranking). Step times are the units' medians; longer horizons assume "
        "the same step time, and '2 data sets' ranks once and fine-tunes twice.",
        "",
        "| training | ranking | rule, fraction | step vs all layers | " + " | ".join(h for h, _, _ in horizons) + " |",
        "|---|---|---|---|" + "---|" * len(horizons),
    ]
    for row in rows:
        full = step_all.get(row["training"])
        seconds = costs.get(row["method"])
        if row["rule"] == "all" or not full or seconds is None or not row["median_step_s"]:
            continue
        ratio = row["median_step_s"] / full
        cells = [f"{(seconds + n * runs * row['median_step_s']) / (n * runs * full):.2f}" for _, n, runs in horizons]
        lines.append(
            f"| {row['training']} | {row['method']} | {row['rule']} {row['fraction']:.2f} | {ratio:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return [*lines, ""]


def _ablation_points(rows: list[dict[str, Any]]) -> dict[str, dict[float, dict[str, Any]]]:
    """Per ranking method: fraction -> row, sorted by fraction; the all-layers run is every method's 1.0."""
    full = [r for r in rows if r["rule"] == "all"]
    methods = sorted({r["method"] for r in rows if r["rule"] != "all"}) or ["-"]
    out = {}
    for method in methods:
        points = [(r["fraction"], r) for r in rows if r["method"] == method and r["rule"] != "all"]
        out[method] = dict(sorted(points + [(1.0, r) for r in full], key=lambda item: item[0]))
    return out


def ablation_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: one row per fraction, held-out loss per ranking method (median step time in brackets)."""
    points = _ablation_points(rows)
    fractions = sorted({f for by_fraction in points.values() for f in by_fraction})
    lines = ["| fraction | " + " | ".join(points) + " |", "|---|" + "---|" * len(points)]
    for f in fractions:
        cells = []
        for by_fraction in points.values():
            row = by_fraction.get(f)
            loss, step = (row or {}).get("loss"), (row or {}).get("median_step_s")
            cells.append(f"{loss:.4f} ({step:.2f} s)" if loss is not None and step is not None else "-")
        lines.append(f"| {f:.2f} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_ablation(rows: list[dict[str, Any]], path: Path) -> None:
    """Held-out loss and median step time vs selected fraction, one line per ranking method."""
    import matplotlib.pyplot as plt

    from ila.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, points in _ablation_points(rows).items():
        xs = list(points)
        for ax, key in zip(axes, ("loss", "median_step_s"), strict=True):
            ys = [points[f][key] if points[f][key] is not None else float("nan") for f in xs]
            ax.plot(xs, ys, marker="o", label=method)
    axes[0].set_ylabel("held-out loss")
    axes[1].set_ylabel("median step (s)")
    for ax in axes:
        ax.set_xlabel("fraction of layers trained")
        ax.legend(fontsize=8)
    save_figure(fig, path)
