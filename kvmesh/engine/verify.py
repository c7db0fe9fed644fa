"""Verifying draft tokens (speculative decoding): which drafts the model accepts, and the token
that follows them.

A sequence with k drafts ran as one chunk of k + 1 tokens (its last token, then the drafts), so
the step has k + 1 rows of logits for it: row j is the model's distribution for the token after
draft j (row 0: after the last real token). From them it emits between 1 and k + 1 tokens:

- greedy (temperature 0): drafts are accepted while each equals the argmax of its row; then the
  argmax at the first mismatch, or after all k, the bonus row's. The tokens are exactly those
  decoding one at a time would give.
- sampling: the rejection rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023)
  with a deterministic draft (q is one-hot on draft d): accept d with probability p(d) under the
  row's processed distribution (temperature, top-k, top-p, as `kvmesh.engine.sampling` draws);
  on rejection draw from p with d removed and renormalised, max(0, p - q) normalised; after all
  k accepted, draw the bonus token from the last row. Each emitted token is then distributed
  exactly as p, as if sampled one at a time. Random numbers come from the request's own
  generator, so a seed reproduces its tokens (though not the same tokens as without drafts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmesh.engine.sampling import SamplerRow, processed_probs
from kvmesh.engine.uploads import upload


@dataclass(slots=True)
class VerifyRow:
    """One sampling sequence of a step: its logits rows [first, first + len(drafts) + 1)."""

    sampler: SamplerRow
    first: int
    drafts: tuple[int, ...]


def verify(logits: torch.Tensor, rows: list[VerifyRow]) -> list[list[int]]:
    """The tokens each sequence emits (its accepted drafts, then one more); waits for them."""
    greedy = [r for r in rows if r.sampler.params.is_greedy]
    argmax: list[int] = logits.argmax(dim=-1).tolist() if greedy else []
    out: list[list[int]] = []
    for r in rows:
        if r.sampler.params.is_greedy:
            targets = argmax[r.first : r.first + len(r.drafts) + 1]
            accepted = 0
            while accepted < len(r.drafts) and r.drafts[accepted] == targets[accepted]:
                accepted += 1
            out.append(targets[: accepted + 1])
        else:
            out.append(_verify_sampled(logits, r))
    return out


def _verify_sampled(logits: torch.Tensor, r: VerifyRow) -> list[int]:
    """The rejection rule for one sampling sequence, with one read of the device for its
    acceptances (k uniforms drawn at once: independent draws, whichever are used)."""
    generator = r.sampler.generator
    k = len(r.drafts)
    rows = logits[r.first : r.first + k + 1]
    probs = torch.stack([processed_probs(row, r.sampler.params) for row in rows])
    if k:
        drafts = upload(list(r.drafts), torch.long, logits.device)
        u = torch.rand(k, generator=generator, device=logits.device)
        accepted_mask: list[bool] = (
            u < probs[torch.arange(k, device=logits.device), drafts]
        ).tolist()
        accepted = accepted_mask.index(False) if False in accepted_mask else k
    else:
        accepted = 0
    emitted = list(r.drafts[:accepted])
    if accepted == k:  # every draft accepted (or none proposed): the bonus token, drawn from p
        emitted.append(int(torch.multinomial(probs[k], 1, generator=generator)[0]))
        return emitted
    draft = r.drafts[accepted]
    residual = probs[accepted].clone()
    residual[draft] = 0.0
    # p(draft) that rounds to 1 with nothing else left: the draft is all there is to draw.
    only_draft = torch.zeros_like(residual)
    only_draft[draft] = 1.0
    residual = torch.where(residual.sum() > 0, residual, only_draft)
    emitted.append(int(torch.multinomial(residual, 1, generator=generator)[0]))
    return emitted
