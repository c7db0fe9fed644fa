"""Text handling shared by the engine and the router: tokenizer, chat template, detokenizer."""

from kvmesh.text.detokenizer import IncrementalDetokenizer
from kvmesh.text.tokenizer import ChatMessage, Tokenizer, load_tokenizer

__all__ = ["ChatMessage", "IncrementalDetokenizer", "Tokenizer", "load_tokenizer"]
