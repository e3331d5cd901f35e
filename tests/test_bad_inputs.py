"""Every bad input and fault a user can cause, through the real CLI: exit status 2, exactly one `ila: error:` line
on stderr, no traceback, the offending file or key named, and the files around it exactly as they were.

Each case builds what it needs in its own folder (tiny models built in code, at most one short training run shared
by the cases that need a finished run folder) and returns the argv.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ila.cli import main
from tiny_models import make_rows

GOOD_ROW = json.dumps(make_rows(1)[0])


@dataclass(frozen=True)
class Env:
    """What a case may use: its own empty folder, a tiny model, good data and a finished identify run."""

    tmp: Path
    model: Path
    data: Path
    run: Path

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path

    def copy_run(self) -> Path:
        """A private copy of the finished run, to damage."""
        return Path(shutil.copytree(self.run, self.tmp / "run"))

    def model_copy(self) -> Path:
        return Path(shutil.copytree(self.model, self.tmp / "model"))

    def evaluate(self, adapter: Path) -> list[str]:
        out = str(self.tmp / "eval")
        return [
            "evaluate",
            "--model",
            str(self.model),
            "--data",
            str(self.data),
            "--adapter",
            str(adapter),
            "--output",
            out,
        ]

    def identify(self, *extra: str, data: Path | None = None, model: Path | None = None) -> list[str]:
        out = str(self.tmp / "out")
        return [
            "identify",
            "--model",
            str(model or self.model),
            "--data",
            str(data or self.data),
            "--output",
            out,
            *extra,
        ]


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    needles: tuple[str, ...]
    may_change: tuple[str, ...] = field(default=())  # files a failed resume may rewrite (its manifest's status)


def _print_config(*overrides: str) -> Callable[[Env], list[str]]:
    return lambda env: ["identify", "--print-config", *overrides]


def _config_file(text: str) -> Callable[[Env], list[str]]:
    return lambda env: ["identify", "--print-config", "--config", str(env.file("run.yaml", text))]


def _data(text: str, *extra: str) -> Callable[[Env], list[str]]:
    return lambda env: env.identify(*extra, data=env.file("data.jsonl", text))


def _model_with(name: str, content: bytes | str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        model = env.model_copy()
        (model / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return env.identify(model=model)

    return build


def _truncated_weights(env: Env) -> list[str]:
    model = env.model_copy()
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return env.identify(model=model)


def _encoder_decoder(env: Env) -> list[str]:
    model = env.tmp / "t5"
    model.mkdir()
    config = {"model_type": "t5", "d_model": 16, "d_ff": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 64}
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return env.identify(model=model)


def _gguf(content: bytes) -> Callable[[Env], list[str]]:
    return lambda env: env.identify(model=env.file("model.gguf", content))


def _resume_with(damage: Callable[[Path], None]) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        run = env.copy_run()
        damage(run)
        return ["identify", "--resume", str(run)]

    return build


def _running(run: Path) -> None:
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}), encoding="utf-8")


def _bad_checkpoint(content: bytes | None, stage: str = "stage1") -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        _running(run)
        path = run / stage / "checkpoint.pt"
        if content is None:  # a real checkpoint, but of another model: one tensor too few
            state = torch.load(path, weights_only=True)
            state["params"] = state["params"][:-1]
            torch.save(state, path)
        else:
            path.write_bytes(content)

    return damage


def _select(ranking_text: str | None, *extra: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        ranking = env.file("ranking.json", ranking_text) if ranking_text is not None else env.run / "ranking.json"
        rule = list(extra) or ["--top", "0.3"]
        return ["select", "--ranking", str(ranking), *rule, "--output", str(env.tmp / "selection.json")]

    return build


def _export(selection_text: str) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        selection = env.file("selection.json", selection_text)
        return ["export", "--selection", str(selection), "--to", "peft", "--output", str(env.tmp / "out.json")]

    return build


def _evaluate_adapter(damage: Callable[[Path], None]) -> Callable[[Env], list[str]]:
    def build(env: Env) -> list[str]:
        adapter = Path(shutil.copytree(env.run / "stage1" / "adapter", env.tmp / "adapter"))
        damage(adapter)
        return env.evaluate(adapter)

    return build


def _rank_adapter(damage: Callable[[Path], None]) -> Callable[[Env], list[str]]:
    """`ila rank --method delta-norm` without --model: the base model is read from the adapter's config."""

    def build(env: Env) -> list[str]:
        adapter = Path(shutil.copytree(env.run / "stage1" / "adapter", env.tmp / "adapter"))
        damage(adapter)
        return ["rank", "--method", "delta-norm", "--adapter", str(adapter), "--output", str(env.tmp / "rank")]

    return build


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).write_bytes((folder / name).read_bytes()[:100])

    return damage


def _output_is_a_file(env: Env) -> list[str]:
    env.file("out", "a file the user wants to keep")
    return env.identify()


def _output_not_ila(env: Env) -> list[str]:
    env.file("out/notes.txt", "earlier work")
    return env.identify("--overwrite")


def _changed_weights(env: Env) -> list[str]:
    weights = env.tmp / "selected_weights.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}, str(weights))
    return env.evaluate(weights)


def _experiment(text: str) -> Callable[[Env], list[str]]:
    return lambda env: ["experiment", str(env.file("exp.yaml", text)), "--output", str(env.tmp / "exp")]


CASES = [
    # config values: ranges, signs, finiteness, relations (checked before anything is loaded)
    Case("stage1.lr zero", _print_config("stage1.lr=0"), ("stage1.lr=0.0", "> 0")),
    Case("stage1.lr negative", _print_config("stage1.lr=-1e-3"), ("stage1.lr",)),
    Case("stage1.lr nan", _print_config("stage1.lr=nan"), ("stage1.lr", "finite")),
    Case("stage1.lr infinite", _print_config("stage1.lr=inf"), ("stage1.lr", "finite")),
    Case("lora.alpha zero", _print_config("lora.alpha=0"), ("lora.alpha=0", "> 0")),
    Case("lora.alpha negative", _print_config("lora.alpha=-16"), ("lora.alpha",)),
    Case("lora.r zero", _print_config("lora.r=0"), ("lora.r=0",)),
    Case("lora.dropout one", _print_config("lora.dropout=1.0"), ("lora.dropout",)),
    Case("negative warm-up", _print_config("stage1.warmup_steps=-1"), ("stage1.warmup_steps",)),
    Case("no held-out examples", _print_config("data.eval_max_examples=0"), ("data.eval_max_examples=0",)),
    Case("eval_fraction zero", _print_config("data.eval_fraction=0"), ("data.eval_fraction",)),
    Case("max_length tiny", _print_config("data.max_length=4"), ("data.max_length=4",)),
    Case("min_response_tokens zero", _print_config("data.min_response_tokens=0"), ("data.min_response_tokens",)),
    Case("max_examples one", _print_config("data.max_examples=1"), ("data.max_examples=1",)),
    Case("budget zero", _print_config("stage2.budget=0"), ("stage2.budget",)),
    Case("budget above one", _print_config("stage2.budget=1.5"), ("stage2.budget=1.5",)),
    Case("stage2 steps zero", _print_config("stage2.steps=0"), ("stage2.steps",)),
    Case("stage2 repeats zero", _print_config("stage2.repeats=0"), ("stage2.repeats",)),
    Case("stage1 repeats zero", _print_config("stage1.repeats=0"), ("stage1.repeats",)),
    Case("milestone zero", _print_config("stage1.milestones=[0, 50]"), ("stage1.milestones",)),
    Case("max_epochs zero", _print_config("stage1.max_epochs=0"), ("stage1.max_epochs",)),
    Case("epsilon zero", _print_config("stage1.epsilon=0"), ("stage1.epsilon",)),
    Case("momentum one", _print_config("stage2.momentum=1"), ("stage2.momentum",)),
    Case("threads zero", _print_config("run.threads=0"), ("run.threads=0",)),
    Case("report fraction zero", _print_config("run.report_top_fraction=0"), ("run.report_top_fraction",)),
    Case("negative checkpoint interval", _print_config("run.checkpoint_every=-1"), ("run.checkpoint_every",)),
    Case("negative seed", _print_config("run.seed=-1"), ("run.seed=-1",)),
    Case("unknown choice", _print_config("stage2.sparsity=l0"), ("stage2.sparsity", "budget")),
    Case("unknown stop rule", _print_config("stage1.stop_rule=never"), ("stage1.stop_rule", "profile")),
    Case("unknown key", _print_config("stage1.learning_rate=1e-3"), ("stage1.learning_rate", "stage1.lr")),
    Case("unknown section", _print_config("stage3.steps=1"), ("stage3",)),
    Case("wrong type", _print_config("stage1.max_steps=many"), ("stage1.max_steps", "integer")),
    Case("override without value", _print_config("stage1.lr"), ("stage1.lr", "section.key=value")),
    Case("--repeat-stage1 alone", lambda env: ["identify", "--repeat-stage1"], ("--repeats N",)),
    Case(
        "finetune lr negative",
        lambda env: ["finetune", "--print-config", "finetune.lr=-1"],
        ("finetune.lr",),
    ),
    Case(
        "finetune weight decay negative",
        lambda env: ["finetune", "--print-config", "finetune.weight_decay=-0.1"],
        ("finetune.weight_decay",),
    ),
    Case("adalora beta one", lambda env: ["finetune", "--print-config", "adalora.beta1=1"], ("adalora.beta1",)),
    Case(
        "judge over plain http",
        lambda env: ["evaluate", "--print-config", "--judge-url", "http://judge.example.com/v1", "--judge-model", "m"],
        ("judge_url", "--judge-allow-http"),
    ),
    Case(
        "judge URL with credentials",
        lambda env: [
            "evaluate",
            "--print-config",
            "--judge-url",
            "https://me:secret@judge.example.com",
            "--judge-model",
            "m",
        ],
        ("credentials", "ILA_JUDGE_API_KEY"),
    ),
    Case(
        "judge URL not http",
        lambda env: ["evaluate", "--print-config", "--judge-url", "ftp://judge", "--judge-model", "m"],
        ("judge_url", "http(s)"),
    ),
    # config files
    Case(
        "missing config file",
        lambda env: ["identify", "--print-config", "--config", str(env.tmp / "no.yaml")],
        ("no.yaml",),
    ),
    Case("invalid YAML", _config_file("stage1:\n  lr: [1\n"), ("run.yaml:", "invalid YAML")),
    Case("YAML python tag", _config_file("stage1: !!python/object/apply:os.system ['true']\n"), ("run.yaml",)),
    Case("config file is a list", _config_file("- stage1\n"), ("run.yaml", "mapping")),
    Case("section is not a mapping", _config_file("stage1: 3\n"), ("stage1", "mapping")),
    # data files
    Case("data file missing", lambda env: env.identify(data=env.tmp / "none.jsonl"), ("none.jsonl",)),
    Case("data is a folder", lambda env: env.identify(data=env.tmp), ("is a folder",)),
    Case("malformed JSON line", _data(f"{GOOD_ROW}\n{GOOD_ROW}\n{{oops\n"), ("data.jsonl:3", "malformed JSON")),
    Case("row is not an object", _data(f"{GOOD_ROW}\n[1, 2]\n"), ("data.jsonl:2", "JSON object")),
    Case("empty data file", _data(""), ("empty",)),
    Case("not UTF-8", lambda env: env.identify(data=env.file("data.jsonl", b"\xff\xfe{}\n")), ("data.jsonl", "UTF-8")),
    Case(
        "every example too long",
        _data(
            GOOD_ROW.replace("}", ', "output": "' + "word " * 300 + '"}', 1) + "\n",
            "data.max_length=16",
            "data.min_response_tokens=15",
        ),
        ("data.max_length=16", "data.min_response_tokens"),
    ),
    # model files
    Case("model folder missing", lambda env: env.identify(model=env.tmp / "nope"), ("nope",)),
    Case("model config.json garbage", _model_with("config.json", "{not json"), ("config",)),
    Case("model weights truncated", _truncated_weights, ("model.safetensors", "weights")),
    Case("model weights random bytes", _model_with("model.safetensors", bytes(range(256)) * 8), ("model", "weights")),
    Case("encoder-decoder model", _encoder_decoder, ("encoder-decoder",)),
    Case("GGUF random bytes", _gguf(bytes(range(256)) * 4), ("model.gguf", "GGUF")),
    Case(
        "GGUF magic then garbage", _gguf(b"GGUF" + b"\x03\x00\x00\x00" + bytes(range(256)) * 4), ("model.gguf", "GGUF")
    ),
    # output paths
    Case("output is a file", _output_is_a_file, ("is a file", "never deletes")),
    Case(
        "output exists", lambda env: (env.file("out/x.txt", "x"), env.identify())[1], ("already exists", "--overwrite")
    ),
    Case("--overwrite on a folder ila did not write", _output_not_ila, ("holds no ila run",)),
    # run folders: resume, milestones, checkpoints, manifests
    Case("resume a folder without a run", lambda env: ["identify", "--resume", str(env.tmp)], ("config.yaml",)),
    Case("resume a complete run", lambda env: ["identify", "--resume", str(env.copy_run())], ("already complete",)),
    Case(
        "resume with a corrupt manifest",
        _resume_with(lambda run: (run / "manifest.json").write_text("{broken", encoding="utf-8")),
        ("manifest.json",),
    ),
    Case(
        "resume with a damaged Stage-1 checkpoint",
        _resume_with(_bad_checkpoint(b"PK\x03\x04 not a checkpoint")),
        ("checkpoint.pt",),
        may_change=("run/manifest.json",),
    ),
    Case(
        "resume with a Stage-1 checkpoint of another model",
        _resume_with(_bad_checkpoint(None)),
        ("stage1/checkpoint.pt", "Stage-1 checkpoint"),
        may_change=("run/manifest.json",),
    ),
    Case(
        "milestone not saved",
        lambda env: ["identify", "--from-run", str(env.copy_run()), "--milestone", "33"],
        ("milestone 33",),
    ),
    # rankings, selections, exports
    Case(
        "ranking file missing",
        lambda env: ["select", "--ranking", str(env.tmp / "r.json"), "--top", "3", "--output", str(env.tmp / "s.json")],
        ("r.json",),
    ),
    Case("ranking not JSON", _select("{oops"), ("ranking.json", "ranking")),
    Case("ranking is a list", _select("[1, 2]"), ("ranking.json", "ranking")),
    Case("ranking with missing fields", _select('{"method": "ila", "layers": [{"name": "x"}]}'), ("ranking.json",)),
    Case("top zero", _select(None, "--top", "0"), ("top=0",)),
    Case("selection not JSON", _export("{oops"), ("selection.json", "selection")),
    Case("selection wrong shape", _export('{"layers": 3}'), ("selection.json", "selection")),
    # adapters given to evaluate
    Case(
        "adapter folder missing",
        lambda env: env.evaluate(env.tmp / "none"),
        ("none",),
    ),
    Case("adapter weights truncated", _evaluate_adapter(_truncate("adapter_model.safetensors")), ("adapter",)),
    Case(
        "adapter config garbage",
        _evaluate_adapter(lambda a: (a / "adapter_config.json").write_text("{x", encoding="utf-8")),
        ("adapter",),
    ),
    Case(
        "delta-norm adapter config garbage",  # once a silent fall-back to the default model
        _rank_adapter(lambda a: (a / "adapter_config.json").write_text("{x", encoding="utf-8")),
        ("adapter_config.json", "PEFT adapter config"),
    ),
    Case("changed weights of another model", _changed_weights, ("selected_weights.safetensors", "shape")),
    # other commands
    Case("compare a missing ranking", lambda env: ["compare", str(env.tmp / "a.json"), str(env.run)], ("a.json",)),
    Case(
        "report on nothing",
        lambda env: ["report", str(env.tmp / "nothing"), "--output", str(env.tmp / "rep")],
        ("nothing",),
    ),
    Case("experiment without data sets", _experiment("model: x\n"), ("datasets",)),
    Case("experiment data set name escapes", _experiment("datasets:\n  ../up: data.jsonl\n"), ("../up",)),
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and time, every folder's existence (a folder's own time changes with any rename in it)."""
    return {
        str(p.relative_to(root)): (0, 0) if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_data: Path) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    overrides = ["stage1.max_steps=4", "stage1.window=2", "stage2.steps=2", "data.max_length=64", "run.threads=1"]
    argv = ["-q", "identify", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out)]
    assert main([*argv, "run.checkpoint_every=1", *overrides]) == 0
    return out


def test_the_table_is_large_and_its_names_distinct() -> None:
    assert len(CASES) >= 50 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gets_one_line(
    case: Case,
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_data: Path,
    finished_run: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) would land here, and be seen
    env = Env(tmp_path, tiny_model_dir, tiny_data, finished_run)
    argv = case.argv(env)
    before = _tree(tmp_path)
    code = main(["-q", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("ila: error: ") and "Traceback" not in err
    for needle in case.needles:
        assert needle in lines[0], lines[0]
    after = _tree(tmp_path)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed <= set(case.may_change), f"left behind or changed: {sorted(changed)}"


def test_an_unwritable_output_folder_is_one_line(
    tiny_model_dir: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = Path("/sys/ila-cannot-write-here")  # sysfs refuses new folders, even to root
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("this machine lets /sys take new folders")
    argv = ["-q", "identify", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(target)]
    code = main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1 and "cannot write the run folder /sys/ila-cannot-write-here" in lines[0]


def test_remote_code_comes_only_from_this_command_line(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from ila.commands.evaluate import evaluate_config
    from ila.commands.identify import run_folder_config
    from ila.config import IdentifyConfig, load_config

    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    config = (
        (run / "config.yaml").read_text(encoding="utf-8").replace("trust_remote_code: false", "trust_remote_code: true")
    )
    (run / "config.yaml").write_text(config, encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert not run_folder_config(run, [], trust_remote_code=False).model.trust_remote_code
        assert not evaluate_config(from_run=str(run)).model.trust_remote_code
        assert not load_config(IdentifyConfig, run / "config.yaml").model.trust_remote_code
    asked = [r.getMessage() for r in caplog.records if "trust_remote_code" in r.getMessage()]
    assert len(asked) == 3 and all("--trust-remote-code" in message for message in asked)
    assert run_folder_config(run, [], trust_remote_code=True).model.trust_remote_code  # the user's own flag
    assert load_config(IdentifyConfig, overrides=["model.trust_remote_code=true"]).model.trust_remote_code
    code = main(["evaluate", "--print-config", "--from-run", str(run), "--trust-remote-code"])
    assert code == 0 and "trust_remote_code: true" in capsys.readouterr().out


def test_a_run_without_information_says_so_and_exits_3(
    tiny_model_dir: Path,
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ila.stages
    from ila.stage2_mask import run_stage2

    def flat(*args: object, **kwargs: object) -> object:  # Stage 2 as if every layer were worth the same
        result = run_stage2(*args, **kwargs)  # type: ignore[arg-type]
        result.scores = [1.0] * len(result.scores)
        return result

    monkeypatch.setattr(ila.stages, "run_stage2", flat)
    out = tmp_path / "run"
    argv = ["-q", "identify", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out)]
    overrides = ["stage1.max_steps=4", "stage1.window=2", "stage2.steps=2", "data.max_length=64", "run.threads=1"]
    assert main([*argv, *overrides]) == 3
    err = capsys.readouterr().err
    assert err.count("ila: warning: every layer has the same score") == 1 and "Traceback" not in err
    assert "Warning: every layer has the same score" in (out / "report.md").read_text(encoding="utf-8")
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["status"] == "complete"


def test_information_warnings_name_a_stage1_that_did_not_learn() -> None:
    from ila.layers import Layer
    from ila.ranking import rank_layers
    from ila.stage1_lora import Stage1Result
    from ila.stages import NO_SPREAD, information_warnings
    from ila.training_loop import LoopResult

    layers = [Layer(f"model.layers.{i}.mlp.up_proj", i, "up_proj", 4, 4) for i in range(4)]
    spread = rank_layers(layers, [0.1, 0.4, 0.2, 0.3], "ila")
    flat = rank_layers(layers, [0.5] * 4, "ila")
    loop = LoopResult(4, False, losses=[2.0, 2.1, 2.2, 2.3])
    rising = Stage1Result(Path("a"), {}, "epsilon", loop)
    assert information_warnings([], spread) == []
    assert information_warnings([], flat) == [NO_SPREAD]
    (warning,) = information_warnings([rising], spread)
    assert "did not lower the training loss" in warning and "stage1.lr" in warning


def test_a_full_disk_mid_run_is_one_line(
    tiny_model_dir: Path,
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    import ila.commands.identify

    def full_disk(path: Path, *_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ila.commands.identify, "write_yaml", full_disk)
    out = tmp_path / "run"
    code = main(["-q", "identify", "--model", str(tiny_model_dir), "--data", str(tiny_data), "--output", str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0] == f"ila: error: {out / 'config.yaml'}: No space left on device"
