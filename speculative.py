"""Greedy decoding, several tokens per forward pass, with exactly the plain greedy output.

Reading the decoder's weights once per generated token is what bounds one caption's time (see benchmark.py). Here a
cheap draft, an n-gram table of the training captions shipped in the model file, proposes the next k tokens; one
forward pass over them gives the model's own choice after each, and every drafted token up to the first that the
model would not have chosen is kept, plus the model's choice there. So each pass yields at least one token, and the
kept tokens are the ones plain greedy decoding would have produced: the draft only decides how many come per pass.

Rows of a batch keep the same number of tokens per pass (the fewest any row accepted), so they stay at one position;
a row that accepted more simply re-checks those tokens in the next pass. Drafted tokens not kept leave keys in the
cache beyond that position: the next pass writes over them, and nothing attends past its own position.
"""

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model import StepDecoder


@dataclass(frozen=True)
class DraftTable:
    """For each context of the last `order - 1` tokens (or fewer, backing off), the most frequent next token."""

    order: int
    next_token: dict[tuple[int, ...], int]
    tokens_per_pass: int = 4  # drafted tokens checked in one forward pass

    @classmethod
    def from_captions(
        cls, token_lists: Iterable[Sequence[int]], bos_token_id: int, eos_token_id: int, order: int = 3
    ) -> "DraftTable":
        counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for tokens in token_lists:
            sequence = [bos_token_id, *tokens, eos_token_id]
            for end in range(1, len(sequence)):
                for size in range(1, order):
                    if end - size >= 0:
                        counts[tuple(sequence[end - size : end])][sequence[end]] += 1
        return cls(order, {context: counter.most_common(1)[0][0] for context, counter in counts.items()})

    def to_dict(self) -> dict:
        """Flat lists of ints, for a model file's metadata (plain values, quick to load): each context padded on the
        left with -1 to `order - 1` tokens."""
        width = self.order - 1
        contexts = [token for context in self.next_token for token in (-1,) * (width - len(context)) + context]
        return {"order": self.order, "contexts": contexts, "next": list(self.next_token.values())}

    @classmethod
    def from_dict(cls, values: dict) -> "DraftTable":
        width, flat = int(values["order"]) - 1, values["contexts"]
        contexts = (tuple(t for t in flat[i : i + width] if t >= 0) for i in range(0, len(flat), width))
        return cls(int(values["order"]), dict(zip(contexts, values["next"], strict=True)))

    def draft(self, tokens: Sequence[int], count: int, eos_token_id: int) -> list[int]:
        """`count` tokens that likely follow `tokens` (EOS once they run out, or after an EOS)."""
        tokens, drafted = list(tokens), []
        for _ in range(count):
            proposal = eos_token_id
            if tokens[-1] != eos_token_id or len(tokens) == 1:
                for size in range(self.order - 1, 0, -1):
                    found = self.next_token.get(tuple(tokens[-size:]))
                    if found is not None:
                        proposal = found
                        break
            tokens.append(proposal)
            drafted.append(proposal)
        return drafted


def verify_drafts(
    model: StepDecoder,
    image_tokens: Tensor,
    prompt: Sequence[int],
    eos_token_id: int,
    table: DraftTable,
    choose: Callable[[Tensor, Tensor, int], Tensor],
    max_new_tokens: int,
) -> tuple[Tensor, Tensor, int]:
    """Greedy decoding of image tokens (B, N, C) with `table`'s drafts checked, several tokens per forward pass.

    `choose(logits (B, V), tokens so far (B, L), tokens generated)` is plain greedy's choice of the next token.
    Returns the tokens (B, P + T) after the prompt's P, each generated token's log-probability (B, T; 0 after the
    end) and the decoder forward passes taken (plain greedy takes one per token).
    """
    rows, device = image_tokens.shape[0], image_tokens.device
    tokens = torch.tensor(prompt, device=device).expand(rows, -1)  # (B, P)
    prompt_length = tokens.shape[1]
    # Room for the longest caption and a draft after it, within the positions the decoder has.
    room = min(model.config.n_positions, prompt_length + max_new_tokens + table.tokens_per_pass)
    cache = model.start_cache(image_tokens, 1, room)
    logits = model.decode_step(tokens, cache, 0)[:, None]  # (B, 1, V): after the prompt
    drafts = tokens.new_zeros(rows, 0)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    logprobs: list[Tensor] = []
    passes = 1
    while True:
        tokens, finished = _accept(logits, drafts, tokens, finished, logprobs, choose, prompt_length, eos_token_id)
        generated = tokens.shape[1] - prompt_length
        if finished.all() or generated == max_new_tokens:
            return tokens, torch.stack(logprobs, dim=1), passes
        count = min(table.tokens_per_pass, max_new_tokens - generated - 1, room - tokens.shape[1])
        drafts = [table.draft(row, count, eos_token_id) for row in tokens.tolist()]
        drafts = torch.tensor(drafts, dtype=torch.long, device=device).view(rows, count)
        # The last chosen token and the drafts after it, at their positions: one pass, the logits after each.
        checked = torch.cat([tokens[:, -1:], drafts], dim=1)
        logits = model.decode_positions(checked, cache, tokens.shape[1] - 1)  # (B, count + 1, V)
        passes += 1


def _accept(
    logits: Tensor, drafts: Tensor, tokens: Tensor, finished: Tensor, logprobs: list[Tensor],
    choose: Callable[[Tensor, Tensor, int], Tensor], prompt_length: int, eos_token_id: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The model's choice after each checked position (logits (B, D + 1, V)) appended to `tokens`, while every row's
    choice equals its draft (B, D); the first choice that differs is kept too. Returns (tokens, finished)."""
    position = 0
    while True:
        step_logits = logits[:, position].float()
        choice = torch.where(finished, eos_token_id, choose(step_logits, tokens, tokens.shape[1] - prompt_length))
        logprobs.append(torch.where(finished, 0.0, step_logits.log_softmax(-1).gather(1, choice[:, None])[:, 0]))
        tokens = torch.cat([tokens, choice[:, None]], dim=1)
        finished = finished | (choice == eos_token_id)
        if finished.all() or position == drafts.shape[1] or not torch.equal(choice, drafts[:, position]):
            return tokens, finished
        position += 1
