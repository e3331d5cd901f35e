"""`ila layers`: list the layers ila would score, without training."""

from __future__ import annotations

import argparse

from ila.commands import COMMANDS
from ila.commands._shared import Subparsers
from ila.config import DEFAULT_MODEL

LAYERS_EXAMPLES = f"""examples:
  ila layers                       # the default model ({DEFAULT_MODEL})
  ila layers --model gpt2 --names  # every layer name, as ila would score it
"""


def add_parser(sub: Subparsers) -> None:
    parser = sub.add_parser(
        "layers",
        help=COMMANDS["layers"],
        epilog=LAYERS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local model folder, .gguf file, hub id or alias")
    parser.add_argument("--include-lm-head", action="store_true", help="also list the output head")
    parser.add_argument("--names", action="store_true", help="print every layer's full name")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
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
