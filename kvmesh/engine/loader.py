"""The torch engine's weights: read by name, in Hugging Face's naming, through a `WeightSource`,
from the safetensors of a resolved model (`kvmesh.models`) or seeded at random (`dummy:`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kvmesh.errors import ModelLoadError
from kvmesh.models import ModelConfig, load_source_tokenizer, resolve
from kvmesh.text.tokenizer import Tokenizer


class WeightSource(Protocol):
    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor called `name`, checked against the expected `shape`."""
        ...

    def has(self, name: str) -> bool: ...


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    weights: WeightSource
    tokenizer: Tokenizer | None
    model_id: str


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
    tokenizer = load_source_tokenizer(source)
    return LoadedModel(config, weights, tokenizer, source.model_id)


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
