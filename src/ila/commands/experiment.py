"""`ila experiment`: a declared grid (data sets x seeds x milestones x methods, optional fine-tuning) run resumably.

Reads an experiment YAML (ila.experiment_plan); writes one folder per unit (identify run, milestone ranking,
baseline ranking, finetune run) under the experiment folder, skipping units that are already complete, then
report.md (ila.experiment_report). The one command that runs the others: its units are `ila identify`,
`ila rank` and `ila finetune` runs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from itertools import product
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ila.commands import COMMANDS
from ila.commands._shared import Subparsers, add_run_flags
from ila.errors import IlaError
from ila.experiment_plan import (
    DATA_FREE,
    ILA,
    ExperimentConfig,
    ExperimentResult,
    FinetuneUnit,
    finetune_config,
    finetune_folder,
    finetune_units,
    identify_config,
    identify_dir,
    is_complete,
    load_experiment,
    plain_config,
    planned_units,
    random_seeds,
    ranking_dir,
    train_seeds,
    unit_ranking,
    unit_rule,
    walk_order,
)
from ila.experiment_report import write_report
from ila.html_report import write_html_report
from ila.run_folder import atomic_write_text, write_yaml

log = logging.getLogger(__name__)


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "experiment",
        help=COMMANDS["experiment"],
        description="Run the grid an experiment YAML declares (data sets x seeds x "
        "milestones x methods, optional fine-tuning), one folder per unit; complete units "
        "are skipped, so an interrupted experiment resumes where it stopped. Writes "
        "report.md with overlap tables (chance levels, p-values) and a fine-tuning table.",
        epilog="examples:\n  ila experiment experiments/paper_small.yaml --output "
        "runs/paper-small\n  ila experiment my_grid.yaml   # again: recomputes nothing "
        "that finished",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="experiment YAML (paths in it are relative to its folder)")
    add_run_flags(parser)
    parser.add_argument(
        "--output", help="experiment folder (default: the YAML's output, else runs/experiment-<config name>)"
    )
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    cfg = load_experiment(args.config, trust_remote_code=args.trust_remote_code)
    output = args.output or cfg.output or str(Path("runs") / f"experiment-{Path(args.config).stem}")
    result = run_experiment(cfg, output)
    print(f"experiment folder: {result.root}")
    print(
        f"units computed: {len(result.computed)}, already complete: {len(result.skipped)}, "
        f"missing: {len(result.missing)}"
    )
    for item in result.missing:
        print(f"  missing: {item}")
    print(f"report: {result.report}")
    return 0


def run_experiment(cfg: ExperimentConfig, output: str | Path | None = None) -> ExperimentResult:
    """Run every unit of the grid that is not complete yet, then write report.md."""
    root = Path(output or cfg.output or "runs/experiment")
    root.mkdir(parents=True, exist_ok=True)
    write_yaml(root / "experiment.yaml", plain_config(cfg))
    result = ExperimentResult(root)
    total = planned_units(cfg)
    seconds: list[float] = []  # per computed unit: the ETA assumes the remaining units cost the same on average
    bar = tqdm(total=total, desc="experiment", unit="unit", dynamic_ncols=True)

    def unit(folder: Path, work: Callable[[], Any]) -> None:
        if not folder.resolve().is_relative_to(root.resolve()):  # names are checked; this is the last guard
            raise IlaError(f"experiment unit {folder} would be written outside {root}")
        done = len(result.computed) + len(result.skipped) + len(result.missing)
        if is_complete(folder):
            result.skipped.append(str(folder))
            bar.update()
            return
        left = total - done
        eta = f", ETA {_duration(statistics.fmean(seconds) * left)}" if seconds else ""
        log.info("experiment unit %d of %d: %s%s", done + 1, total, folder.relative_to(root), eta)
        bar.set_postfix_str(str(folder.relative_to(root)))
        started = time.perf_counter()
        try:
            work()
        except IlaError as err:  # one failed unit (say a non-finite loss) must not stop a grid of hours
            log.error("experiment unit %s failed: %s", folder, err)
            result.missing.append(f"{folder} (failed: {err})")
            return
        finally:
            bar.update()
        seconds.append(time.perf_counter() - started)
        result.computed.append(str(folder))

    for data, data_path in cfg.datasets:
        for seed in cfg.seeds:
            _identify_units(cfg, root, data, data_path, seed, unit, result)
    for data, data_path in cfg.datasets:
        for seed in cfg.seeds:
            _baseline_units(cfg, root, data, data_path, seed, unit, result)
    if cfg.finetune is not None:
        _random_units(cfg, root, unit, result)
        _finetune_units(cfg, root, unit)
    bar.close()
    result.report = root / "report.md"
    atomic_write_text(result.report, write_report(cfg, root, result))
    write_html_report(result.report)
    return result


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _identify_units(
    cfg: ExperimentConfig,
    root: Path,
    data: str,
    data_path: str,
    seed: int,
    unit: Callable[[Path, Callable[[], Any]], None],
    result: ExperimentResult,
) -> None:
    from ila.commands.identify import resume_identify, run_identify, run_milestone

    if ILA not in cfg.rankings and "delta-norm" not in cfg.rankings:
        return
    run_dir = identify_dir(root, data, seed)

    def identify() -> None:
        if (run_dir / "config.yaml").is_file() and (run_dir / "stage1").is_dir():
            resume_identify(run_dir, command="ila experiment")  # continue from its checkpoints
        else:
            run_identify(identify_config(cfg, data_path, seed, str(run_dir)), overwrite=True, command="ila experiment")

    unit(run_dir, identify)
    if ILA not in cfg.rankings:
        return
    for milestone in sorted(set(cfg.milestones) - {100}):
        folder = ranking_dir(root, ILA, data, seed, milestone)
        stage1_adapter = run_dir / "stage1" / f"milestone-{milestone}" / "adapter_config.json"
        if not is_complete(folder) and not stage1_adapter.is_file():  # kept results carry no adapters
            result.missing.append(f"{folder} (Stage 1 stopped before milestone {milestone}%)")
            continue

        def rank_milestone(milestone: int = milestone) -> None:
            run_milestone(run_dir, milestone, overwrite=True, command="ila experiment")

        unit(folder, rank_milestone)


def _baseline_units(
    cfg: ExperimentConfig,
    root: Path,
    data: str,
    data_path: str,
    seed: int,
    unit: Callable[[Path, Callable[[], Any]], None],
    result: ExperimentResult,
    methods: Sequence[str] | None = None,
) -> None:
    """The baseline rankings of one data set and seed (`methods`, default every method of the grid)."""
    from ila.commands.rank import run_rank
    from ila.ranking_methods import RankConfig

    icfg = identify_config(cfg, data_path, seed, "unused")
    settings = RankConfig(seed=seed, lora=icfg.lora)
    for method in cfg.rankings if methods is None else methods:
        if method == ILA:
            continue
        milestones = sorted(set(cfg.milestones) | {100}) if method == "delta-norm" else [100]
        for milestone in milestones:
            folder = ranking_dir(root, method, data, seed, milestone)
            adapter = None
            if method == "delta-norm":
                stage1 = identify_dir(root, data, seed) / "stage1"
                adapter = stage1 / ("adapter" if milestone == 100 else f"milestone-{milestone}")
                if not is_complete(folder) and not (adapter / "adapter_config.json").is_file():
                    result.missing.append(f"{folder} (no Stage-1 adapter {adapter})")
                    continue

            def work(method: str = method, folder: Path = folder, adapter: Path | None = adapter) -> None:
                run_rank(
                    method,
                    cfg.model,
                    data=None if method in DATA_FREE else data_path,
                    adapter=str(adapter) if adapter else None,
                    output=str(folder),
                    settings=settings,
                    max_length=icfg.data.max_length,
                    include_lm_head=icfg.model.include_lm_head,
                    trust_remote_code=cfg.trust_remote_code,
                    threads=cfg.threads,
                    overwrite=True,
                    command="ila experiment",
                )

            unit(folder, work)


def _random_units(
    cfg: ExperimentConfig, root: Path, unit: Callable[[Path, Callable[[], Any]], None], result: ExperimentResult
) -> None:
    """The random rankings of train seeds that are not ranking seeds (finetune.random_per_seed)."""
    data, data_path = cfg.datasets[0]
    for seed in random_seeds(cfg)[len(cfg.seeds) :]:
        _baseline_units(cfg, root, data, data_path, seed, unit, result, methods=("random",))


def _finetune_units(cfg: ExperimentConfig, root: Path, unit: Callable[[Path, Callable[[], Any]], None]) -> None:
    from ila.commands.finetune import run_finetune
    from ila.selection import select_from_file

    assert cfg.finetune is not None
    selections = root / "finetune" / "selections"
    for each, train_seed in product(walk_order(cfg, finetune_units(cfg)), train_seeds(cfg)):
        folder = finetune_folder(cfg, root, each.name, train_seed)

        def work(each: FinetuneUnit = each, folder: Path = folder, train_seed: int = train_seed) -> None:
            selection_path = None
            if each.method is not None:
                ranking = unit_ranking(cfg, root, each, train_seed)
                selection = select_from_file(ranking, unit_rule(cfg, each, ranking), cfg.model)
                selections.mkdir(parents=True, exist_ok=True)
                selection_path = selections / f"{folder.name}.json"
                selection.save(selection_path)
            config = finetune_config(
                cfg, str(folder), str(selection_path) if selection_path else None, train_seed, each.training
            )
            run_finetune(config, overwrite=True, command="ila experiment")

        unit(folder, work)
