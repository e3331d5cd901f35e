"""The `ila` command line: argparse subcommands over the library's stages.

Every user error ends as one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import warnings
from collections.abc import Sequence

from ila.config import BUNDLED_DATA, DEFAULT_MODEL, IdentifyConfig, load_config
from ila.errors import IlaError

EXIT_USER_ERROR = 2

IDENTIFY_EXAMPLES = f"""examples:
  ila identify                                   # default model ({DEFAULT_MODEL}) on the bundled data
  ila identify --model ./my-llama --data train.jsonl --output runs/llama-lima
  ila identify --config run.yaml stage1.max_steps=200 stage2.sparsity=budget stage2.budget=0.3
  ila identify --from-run runs/llama-lima --milestone 25   # Stage 2 on the 25% checkpoint, no retraining

config sections: model, data, lora, stage1, stage2, run (see `ila identify --print-config`)
"""

LAYERS_EXAMPLES = f"""examples:
  ila layers                       # the default model ({DEFAULT_MODEL})
  ila layers --model gpt2 --names  # every layer name, as ila would score it
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit status 2 like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"ila: error: {message} (see ila {self.prog.split()[-1]} --help)\n")
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ila", description="Find the layers of an LLM that matter for alignment (ILA), "
                     "then fine-tune only those.")
    parser.add_argument("--version", action="version", version=f"ila {_version()}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    identify = sub.add_parser("identify", help="rank layers by importance (Stage 1 LoRA + Stage 2 mask)",
                              description="Run ILA: Stage 1 trains LoRA on every linear layer until the update "
                              "is ε-stable; Stage 2 learns one mask score per layer; writes a ranking, a heatmap, "
                              "a report and a manifest to a run folder.",
                              epilog=IDENTIFY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    identify.add_argument("--model", help=f"local model folder, .gguf file, hub id or alias (default {DEFAULT_MODEL})")
    identify.add_argument("--data", help=f"JSON/JSONL file or hub data set id (default: {BUNDLED_DATA}, ila's own "
                          "alignment set)")
    identify.add_argument("--config", help="YAML file with sections model, data, lora, stage1, stage2, run")
    identify.add_argument("--output", help="run folder (default runs/identify-<timestamp>)")
    identify.add_argument("--seed", type=int, help="random seed (run.seed)")
    identify.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty run folder")
    identify.add_argument("--from-run", help="an earlier identify run folder (with --milestone)")
    identify.add_argument("--milestone", type=int, help="rank from the Stage-1 checkpoint at this percent of the "
                          "planned steps, without retraining (needs --from-run)")
    identify.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    identify.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")

    layers = sub.add_parser("layers", help="list the layers ila would score, without training",
                            epilog=LAYERS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    layers.add_argument("--model", default=DEFAULT_MODEL, help="local model folder, .gguf file, hub id or alias")
    layers.add_argument("--include-lm-head", action="store_true", help="also list the output head")
    layers.add_argument("--names", action="store_true", help="print every layer's full name")
    layers.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ila")
    except metadata.PackageNotFoundError:
        return "unknown"


def _identify(args: argparse.Namespace) -> int:
    from ila import identify

    if args.milestone is not None or args.from_run:
        if args.milestone is None or not args.from_run:
            raise IlaError("--milestone and --from-run go together: ila identify --from-run RUN --milestone 25")
        from pathlib import Path

        result = identify.run_milestone(Path(args.from_run), args.milestone, args.overwrite, args.overrides)
        _print_summary(result)
        return 0
    extra: dict[str, dict[str, object]] = {}
    if args.model:
        extra.setdefault("model", {})["name"] = args.model
    if args.data:
        extra.setdefault("data", {})["path"] = args.data
    if args.output:
        extra.setdefault("run", {})["output"] = args.output
    if args.seed is not None:
        extra.setdefault("run", {})["seed"] = args.seed
    cfg = load_config(IdentifyConfig, args.config, args.overrides, extra)
    if args.print_config:
        import yaml

        from ila.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    result = identify.run_identify(cfg, overwrite=args.overwrite)
    _print_summary(result)
    return 0


def _print_summary(result: object) -> None:
    from ila.identify import IdentifyResult

    assert isinstance(result, IdentifyResult)
    print(f"run folder: {result.run_dir}")
    print("held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in result.heldout.items()))
    if result.stage1 is not None and result.stage1.loop.step_seconds:
        s1 = statistics.median(result.stage1.loop.step_seconds)
        s2 = statistics.median(result.stage2.loop.step_seconds)
        print(f"stage 1: {result.stage1.steps} steps ({result.stage1.stopped_by}), median step {s1:.2f} s, "
              f"{result.stage1.loop.tokens_per_second:.0f} tokens/s; stage 2 median step {s2:.2f} s "
              f"(ratio {s2 / s1:.2f})")
    print("where the time went: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    print("peak memory: " + ", ".join(f"{k} {v:.2f}" for k, v in result.memory.items()))
    print("top 10 layers:")
    for entry in result.ranking.layers[:10]:
        gamma = f"  γ={entry.gamma:.3f}" if entry.gamma is not None else ""
        print(f"  {entry.rank:>3}. {entry.name}  score={entry.score:.3f}{gamma}")


def _layers(args: argparse.Namespace) -> int:
    from ila.config import ModelConfig
    from ila.layers import discover_layers, summarize_layers
    from ila.model_loading import load_model

    loaded = load_model(ModelConfig(name=args.model, trust_remote_code=args.trust_remote_code))
    found = discover_layers(loaded.model, args.include_lm_head)
    print(f"{args.model} ({type(loaded.model).__name__})")
    print(summarize_layers(found))
    if args.names:
        for layer in found:
            print(f"{layer.name}\tblock={layer.block}\t{layer.in_features}x{layer.out_features}")
    return 0


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    _configure_logging(args.quiet)
    handlers = {"identify": _identify, "layers": _layers}
    try:
        return handlers[args.command](args)
    except IlaError as err:
        sys.stderr.write(f"ila: error: {err}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("ila: interrupted\n")
        return 130
    except MemoryError:
        sys.stderr.write("ila: error: out of memory; lower the batch size (stage1.batch_size, stage2.batch_size) "
                         "or data.max_length\n")
        return EXIT_USER_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
