"""`kvmesh chat`: a terminal chat through the engine, streaming tokens as they come."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import click

from kvmesh.engine import EngineConfig
from kvmesh.engine.torch_engine import TorchEngine
from kvmesh.errors import EngineError, InvalidRequestError
from kvmesh.sampling import SamplingParams
from kvmesh.text.tokenizer import ChatMessage
from kvmesh.types import GenerateRequest

_HELP = "Type a message and press Enter. /reset forgets the conversation, /quit (or Ctrl-D) exits."


async def run_chat(
    config: EngineConfig,
    *,
    prompt: str | None,
    system: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
) -> None:
    click.echo(f"loading {config.model} ...", err=True)
    engine = await asyncio.to_thread(TorchEngine, config)
    if engine.tokenizer is None or not engine.tokenizer.has_chat_template:
        raise click.ClickException(f"{config.model} has no tokenizer with a chat template")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    base: list[ChatMessage] = [{"role": "system", "content": system}] if system else []
    async with engine:
        info = engine.info
        click.echo(
            f"{info.model_id} on {info.device} ({info.dtype}), {info.num_blocks} KV blocks",
            err=True,
        )
        if prompt is not None:
            await _answer(engine, [*base, {"role": "user", "content": prompt}], params)
            return
        click.echo(_HELP, err=True)
        history = list(base)
        while True:
            line = await asyncio.to_thread(_read_line)
            if line is None or line.strip() == "/quit":
                return
            if line.strip() == "/reset":
                history = list(base)
                click.echo("(conversation forgotten)", err=True)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            reply = await _answer(engine, history, params)
            if reply is None:
                history.pop()
            else:
                history.append({"role": "assistant", "content": reply})


def _read_line() -> str | None:
    try:
        return input("you> " if sys.stdin.isatty() else "")
    except EOFError:
        return None


async def _answer(
    engine: TorchEngine, messages: list[ChatMessage], params: SamplingParams
) -> str | None:
    """Stream one reply to stdout; the reply's text, or None if the request was refused."""
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.apply_chat_template(messages)
    request = GenerateRequest(uuid.uuid4().hex, tuple(prompt), params)
    started = time.perf_counter()
    first: float | None = None
    text, count = "", 0
    try:
        async for out in engine.generate(request):
            first = first or time.perf_counter()
            count += len(out.token_ids)
            text += out.text
            sys.stdout.write(out.text)
            sys.stdout.flush()
    except InvalidRequestError as e:
        click.echo(f"\n(refused: {e}; /reset starts a new conversation)", err=True)
        return None
    except EngineError as e:
        click.echo(f"\n(failed: {e})", err=True)
        return None
    elapsed = time.perf_counter() - started
    ttft = (first or started) - started
    click.echo("")
    click.echo(
        f"({count} tokens, first after {ttft * 1000:.0f} ms, {count / elapsed:.1f} tokens/s)",
        err=True,
    )
    return text
