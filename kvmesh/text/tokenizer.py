"""A small facade over a transformers tokenizer: encode, decode, and the chat template."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict


class ChatMessage(TypedDict):
    role: str
    content: str


class Tokenizer:
    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf = hf_tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._hf)

    @property
    def eos_token_id(self) -> int | None:
        eos = self._hf.eos_token_id
        return None if eos is None else int(eos)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return list(self._hf.convert_ids_to_tokens(list(token_ids)))

    def apply_chat_template(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a chat, ending with the assistant's turn opened."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        ids = self._hf.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A fast tokenizer straight from tokenizer.json where there is one: unlike AutoTokenizer,
    that loads no torch, so the router and edge stay light."""
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return Tokenizer(PreTrainedTokenizerFast.from_pretrained(str(path)))
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(str(path)))
