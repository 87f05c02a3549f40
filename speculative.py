"""Greedy decoding, several tokens per forward pass, with exactly the plain greedy output.

Reading the decoder's weights once per generated token is what bounds one caption's time (see benchmark.py). Here a
cheap draft, an n-gram table of the training captions shipped in the model file, proposes the next k tokens; one
forward pass over them gives the model's own choice after each, and every drafted token up to the first that the
model would not have chosen is kept, plus the model's choice there. So each pass yields at least one token, and the
kept tokens are the ones plain greedy decoding would have produced: the draft only decides how many come per pass.

Rows of a batch keep the same number of tokens per pass (the fewest any row accepted), so the cache stays one
length; a row that accepted more simply re-checks those tokens in the next pass.
"""

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from config import DecodeConfig
from decoding import Generation, caption_lengths, process_scores
from model import CaptionModel


@dataclass(frozen=True)
class DraftTable:
    """For each context of the last `order - 1` tokens (or fewer, backing off), the most frequent next token."""

    order: int
    next_token: dict[tuple[int, ...], int]

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


@torch.inference_mode()
def speculative_greedy(
    model: CaptionModel,
    image_tokens: Tensor,
    config: DecodeConfig,
    prompt: Sequence[int],
    eos_token_id: int,
    table: DraftTable,
    draft_tokens: int = 4,
) -> tuple[Generation, int]:
    """decoding's greedy Generation for `image_tokens`, several tokens per forward pass.

    Returns (generation, passes): the `decoding.Generation`, and the decoder forward passes it took (plain greedy
    takes one per token).
    """
    rows = image_tokens.shape[0]
    device = image_tokens.device
    tokens = torch.tensor(prompt, device=device).expand(rows, -1)  # (B, P)
    prompt_length = tokens.shape[1]
    # Room for the longest caption and a draft after it, within the positions the decoder has.
    cache = model.start_cache(
        image_tokens, 1, min(model.config.n_positions, prompt_length + config.max_new_tokens + draft_tokens)
    )
    logits = model.decode_step(tokens, cache)  # (B, V): the next token's
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    chosen_logprobs: list[Tensor] = []
    passes = 1
    while True:
        # The model's choice, exactly as plain greedy makes it.
        generated = tokens.shape[1] - prompt_length
        choice = torch.where(
            finished, eos_token_id, process_scores(logits.float(), tokens, generated, config, eos_token_id).argmax(-1)
        )
        chosen_logprobs.append(
            torch.where(finished, 0.0, logits.float().log_softmax(-1).gather(1, choice[:, None])[:, 0])
        )
        tokens = torch.cat([tokens, choice[:, None]], dim=1)
        finished |= choice == eos_token_id
        generated += 1
        if finished.all() or generated == config.max_new_tokens:
            break
        # Draft, check every drafted token in one pass, and keep those the model agrees with.
        count = min(draft_tokens, config.max_new_tokens - generated - 1, cache.capacity - cache.length - 1)
        if count == 0:
            logits = model.decode_step(choice[:, None], cache)
            passes += 1
            continue
        drafts = torch.tensor([table.draft(row, count, eos_token_id) for row in tokens.tolist()], device=device)
        start = cache.length
        all_logits = model.decode_positions(torch.cat([choice[:, None], drafts], dim=1), cache)  # (B, count + 1, V)
        passes += 1
        accepted = 0
        for position in range(count):
            step_logits = all_logits[:, position].float()
            generated_here = tokens.shape[1] - prompt_length
            model_choice = process_scores(step_logits, tokens, generated_here, config, eos_token_id).argmax(-1)
            model_choice = torch.where(finished, eos_token_id, model_choice)
            if not torch.equal(model_choice, drafts[:, position]):
                break
            logprob = step_logits.log_softmax(-1).gather(1, model_choice[:, None])[:, 0]
            chosen_logprobs.append(torch.where(finished, 0.0, logprob))
            tokens = torch.cat([tokens, model_choice[:, None]], dim=1)
            finished |= model_choice == eos_token_id
            accepted += 1
            if finished.all():
                break
        cache.length = start + 1 + accepted  # forget the keys of the drafted tokens not kept
        logits = all_logits[:, accepted]
        if finished.all():
            break
    generated_tokens = tokens[:, prompt_length:]
    token_logprobs = torch.stack(chosen_logprobs, dim=1)
    generation = Generation(
        generated_tokens[:, None],
        token_logprobs[:, None],
        caption_lengths(generated_tokens, eos_token_id)[:, None],
        token_logprobs.sum(1)[:, None],
    )
    return generation, passes
