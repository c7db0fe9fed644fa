"""The sampler: greedy when temperature is 0; otherwise temperature, then top-k, then top-p,
then a draw from the request's own generator (seeded per request, so a seed reproduces its
tokens whatever else shares the batch). Logprobs are those of the model's distribution before
temperature and truncation, as OpenAI's API reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.engine.uploads import upload
from kvmesh.sampling import SamplingParams, TokenLogprob


@dataclass(slots=True)
class SamplerRow:
    """One sequence's sampling state: its params and, when seeded, its own generator."""

    params: SamplingParams
    generator: torch.Generator | None = None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.is_greedy or params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


class DeviceSample:
    """One step's samples, computed on the device and on their way to the host.

    Everything that reads the logits is queued when the sample is made (the next step may
    overwrite them: CUDA graphs reuse their output buffer); the copies to the host are
    asynchronous on CUDA, and `read` waits for them. On CPU everything is done at once.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        rows: Sequence[SamplerRow],
        tokens: torch.Tensor | None = None,
    ) -> None:
        """`tokens`: the tokens already chosen (verified drafts), to read with their logprobs;
        None samples them from `logits`."""
        device = logits.device
        # On the device: the next step's inputs.
        self.tokens = _choose(logits, rows) if tokens is None else tokens
        wanted = [i for i, r in enumerate(rows) if _wants_logprobs(r)]
        self._wanted = wanted
        self._top_n = [rows[i].params.top_logprobs for i in wanted]
        on_device = [self.tokens]
        if wanted:
            index = upload(wanted, torch.long, device)
            logp = torch.log_softmax(logits.index_select(0, index), dim=-1)
            chosen = logp.gather(1, self.tokens.index_select(0, index)[:, None])[:, 0]
            on_device.append(chosen)
            if max(self._top_n):
                values, ids = torch.topk(logp, max(self._top_n), dim=-1)
                on_device += [values, ids]
        self._host = [_to_host(t) for t in on_device]
        self._event: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()

    def read(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """The tokens and logprobs, once the device has computed and copied them."""
        if self._event is not None:
            self._event.synchronize()
        tokens: list[int] = self._host[0].tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(tokens)
        if self._wanted:
            chosen = self._host[1].tolist()
            top_values = self._host[2].tolist() if len(self._host) > 2 else None
            top_ids = self._host[3].tolist() if len(self._host) > 2 else None
            for k, (i, n) in enumerate(zip(self._wanted, self._top_n, strict=True)):
                top: tuple[tuple[int, float], ...] = ()
                if n and top_values is not None and top_ids is not None:
                    top = tuple(zip(top_ids[k][:n], top_values[k][:n], strict=True))
                logprobs[i] = TokenLogprob(tokens[i], chosen[k], top)
        return tokens, logprobs

    def wait(self) -> None:
        """Wait for the device to finish the step, without reading anything."""
        if self._event is not None:
            self._event.synchronize()


def sample(
    logits: torch.Tensor, rows: Sequence[SamplerRow]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Choose one token per row of `logits` ([B, vocab], float32), and wait for them."""
    return DeviceSample(logits, rows).read()


def _choose(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
    if all(r.params.is_greedy for r in rows):
        # The common case, kept to one kernel: it is on every step.
        return logits.argmax(dim=-1)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
    if greedy:
        index = upload(greedy, torch.long, logits.device)
        tokens[index] = logits[index].argmax(dim=-1)
    for i, row in enumerate(rows):
        if not row.params.is_greedy:
            tokens[i] = draw(logits[i], row)
    return tokens


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def draw(logits: torch.Tensor, row: SamplerRow) -> torch.Tensor:
    probs = processed_probs(logits, row.params)
    return torch.multinomial(probs, 1, generator=row.generator)[0]


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from: one row of logits (temperature > 0) after
    temperature, top-k and top-p."""
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_probs, order = scaled.softmax(dim=-1).sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the likeliest token always stays.
        keep_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs < params.top_p
        keep_sorted[0] = True
        keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    return scaled.softmax(dim=-1)


def _wants_logprobs(row: SamplerRow) -> bool:
    return row.params.logprobs or row.params.top_logprobs > 0
