"""The `ila` command line, one module per word: each holds its parser (`add_parser`), its `main(args)` and the
work behind it; `ila.cli` only dispatches. The library (`ila.*` outside this package) never imports a command,
and no command imports another (`experiment` aside: it runs the others as units); tests/test_layout.py checks both.
Modules whose names start with `_` are helpers shared by commands.
"""

from __future__ import annotations

# each word and its line in `ila --help`, in that order (kept here so that `ila --help` imports no command)
COMMANDS = {
    "identify": "rank layers by importance (Stage 1 LoRA + Stage 2 mask)",
    "layers": "list the layers ila would score, without training",
    "select": "turn a ranking into the layers to fine-tune (top-K, budgets)",
    "finetune": "train only the selected layers (LoRA, AdaLoRA, QLoRA or full)",
    "export": "write a selection as a PEFT/TRL/axolotl/LLaMA-Factory/... config",
    "rank": "rank layers with a baseline (random, first, last, delta-norm, grad-norm, snr, spectrum)",
    "compare": "compare rankings: top-K Jaccard vs chance, p-values, correlations",
    "evaluate": "held-out loss/perplexity, lm-eval benchmarks, optional judge",
    "report": "put run folders side by side (markdown table + plot)",
    "env": "print versions, threads and accelerator (for bug reports)",
    "experiment": "run a declared grid of identify/rank/finetune units (resumable)",
}
