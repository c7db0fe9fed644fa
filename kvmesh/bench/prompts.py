"""Twenty varied chat prompts, shared by the accuracy tests, the GPU checks and the benchmarks."""

from __future__ import annotations

import random

from kvmesh.engine.torch_engine import TorchCore

CHAT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a ten-year-old in two sentences.",
    "List three uses for a paperclip.",
    "Translate 'good morning, how are you?' into Spanish.",
    "What is 17 times 23? Show your working.",
    "Write a Python function that reverses a string.",
    "Give me a short recipe for pancakes.",
    "Who wrote Pride and Prejudice, and when was it published?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "What are the three states of matter?",
    "Suggest a name for a coffee shop run by cats.",
    "Why is the sky blue?",
    "Write a limerick about a programmer who loves bugs.",
    "How do I make a cup of green tea?",
    "What is the difference between a virus and a bacterium?",
    "Describe the water cycle step by step.",
    "Give two tips for a job interview.",
    "What does HTTP stand for, and what is it used for?",
    "Tell me a fun fact about octopuses.",
)


def chat_prompt_ids(core: TorchCore, count: int) -> list[list[int]]:
    """`count` chat prompts through the model's template; seeded random token ids (40 each)
    for a model without a tokenizer (dummy weights)."""
    tokenizer = core.tokenizer
    if tokenizer is None or not tokenizer.has_chat_template:
        rng = random.Random(0)
        vocab = core.model_config.vocab_size
        return [[rng.randrange(10, vocab) for _ in range(40)] for _ in range(count)]
    texts = [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(count)]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
