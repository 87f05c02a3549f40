"""Caption decoding: greedy, beam search and sampling, as small functions over a `CaptionModel`.

Each image is encoded once; each layer's cross-attention keys and values are computed once per image and shared by
all the captions (beams, samples) of that image; the self-attention cache grows one position per step. Randomness
comes only from the `torch.Generator` passed in.

Beam search follows transformers' `generate(num_beams=K)` step for step (top 2K candidates, finished hypotheses
taken only from the top K, length penalty on the generated length including EOS), so its output equals
transformers' on the same weights. One deliberate difference: the repetition penalty does not count the BOS token,
which in GPT-2's convention is also EOS; transformers' penalty would make every caption less likely to end.
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from config import DecodeConfig
from model import StepDecoder
from speculative import DraftTable, verify_drafts

# Masks a score without the NaNs that -inf arithmetic would bring into beam scores (transformers uses the same).
_EXCLUDED = -1.0e9


@dataclass(frozen=True)
class Generation:
    """Generated captions: R per image, best first.

    `sequences` holds the generated token ids after the prompt (BOS and prefix), padded with EOS after each end.
    `token_logprobs` holds the model's log-probability of each generated token (from its raw logits, before any
    penalty or temperature), 0 after the end. `scores` ranks the captions: the length-penalised sum of log-probs for
    beam search, the sum of log-probs otherwise.
    """

    sequences: Tensor  # (B, R, T) long
    token_logprobs: Tensor  # (B, R, T) float
    lengths: Tensor  # (B, R) long: generated tokens including EOS when it was reached
    scores: Tensor  # (B, R) float
    passes: int | None = None  # decoder forward passes, where drafts were checked (speculative greedy)


# ---- score processors: pure functions of (scores, the tokens so far) ----


def penalise_repetitions(scores: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty: make every token already in `history` (rows, t) less likely."""
    if penalty == 1.0 or history.shape[1] == 0:
        return scores
    previous = scores.gather(1, history)
    return scores.scatter(1, history, torch.where(previous < 0, previous * penalty, previous / penalty))


def block_repeated_ngrams(scores: Tensor, tokens: Tensor, size: int) -> Tensor:
    """Forbid any token that would complete an n-gram of `size` already present in `tokens` (rows, t)."""
    length = tokens.shape[1]
    if size <= 0 or length + 1 < size:
        return scores
    scores = scores.clone()
    rows = tokens.tolist()
    for row, sequence in enumerate(rows):
        current = tuple(sequence[length - size + 1 :])
        banned = {
            sequence[i + size - 1] for i in range(length - size + 1) if tuple(sequence[i : i + size - 1]) == current
        }
        if banned:
            scores[row, list(banned)] = float("-inf")
    return scores


def forbid_token(scores: Tensor, token_id: int) -> Tensor:
    scores = scores.clone()
    scores[:, token_id] = float("-inf")
    return scores


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def keep_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the most likely tokens whose probabilities sum to at least `p`."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative - sorted_logits.softmax(dim=-1) >= p  # the mass before this token already reaches p
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_scores(scores: Tensor, tokens: Tensor, generated: int, config: DecodeConfig, eos_token_id: int) -> Tensor:
    """Apply the penalties and constraints of `config` to next-token scores (rows, vocab)."""
    scores = penalise_repetitions(scores, tokens[:, 1:], config.repetition_penalty)  # BOS excluded: see module doc
    scores = block_repeated_ngrams(scores, tokens, config.no_repeat_ngram_size)
    if generated < config.min_new_tokens:
        scores = forbid_token(scores, eos_token_id)
    return scores


# ---- the strategies: one signature, (model, image tokens, config, prompt, eos, generator) -> Generation ----


def _greedy(
    model: StepDecoder, image_tokens: Tensor, config: DecodeConfig, prompt: Sequence[int], eos_token_id: int,
    generator: torch.Generator | None,
) -> Generation:  # fmt: skip
    """The most likely token at every step."""
    return _one_token_per_step(model, image_tokens, config, prompt, eos_token_id, lambda scores: scores.argmax(-1), 1)


def _sample(
    model: StepDecoder, image_tokens: Tensor, config: DecodeConfig, prompt: Sequence[int], eos_token_id: int,
    generator: torch.Generator | None,
) -> Generation:  # fmt: skip
    """`num_return_sequences` captions per image drawn with temperature, top-k and top-p; best first."""

    def choose(scores: Tensor) -> Tensor:
        logits = keep_top_p(keep_top_k(scores / config.temperature, config.top_k), config.top_p)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    rows = config.num_return_sequences
    generation = _one_token_per_step(model, image_tokens, config, prompt, eos_token_id, choose, rows)
    order = generation.scores.argsort(dim=1, descending=True)
    return Generation(
        _gather_beams(generation.sequences, order),
        _gather_beams(generation.token_logprobs, order),
        generation.lengths.gather(1, order),
        generation.scores.gather(1, order),
    )


def _one_token_per_step(
    model: StepDecoder,
    image_tokens: Tensor,
    config: DecodeConfig,
    prompt: Sequence[int],
    eos_token_id: int,
    choose: Callable[[Tensor], Tensor],
    rows_per_image: int,
) -> Generation:
    images = image_tokens.shape[0]
    rows = images * rows_per_image
    tokens = torch.tensor(prompt, device=image_tokens.device).expand(rows, -1)  # (rows, P)
    prompt_length = tokens.shape[1]
    cache = model.start_cache(image_tokens, rows_per_image, prompt_length + config.max_new_tokens)
    logits = model.decode_step(tokens, cache, 0)
    finished = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
    chosen_logprobs = []
    for step in range(config.max_new_tokens):
        scores = process_scores(logits.float(), tokens, step, config, eos_token_id)
        next_tokens = torch.where(finished, eos_token_id, choose(scores))
        logprobs = logits.float().log_softmax(-1).gather(1, next_tokens[:, None])[:, 0]
        chosen_logprobs.append(torch.where(finished, 0.0, logprobs))
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        finished |= next_tokens == eos_token_id
        if finished.all() or step + 1 == config.max_new_tokens:
            break
        logits = model.decode_step(next_tokens[:, None], cache, prompt_length + step)
    generated = tokens[:, prompt_length:]
    token_logprobs = torch.stack(chosen_logprobs, dim=1)
    shape = (images, rows_per_image)
    return Generation(
        generated.view(*shape, -1),
        token_logprobs.view(*shape, -1),
        caption_lengths(generated, eos_token_id).view(shape),
        token_logprobs.sum(1).view(shape),
    )


def caption_lengths(generated: Tensor, eos_token_id: int) -> Tensor:
    """Tokens up to and including the first EOS (all of them where there is none)."""
    is_eos = generated == eos_token_id
    return torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, generated.shape[1])


# ---- beam search: a state, a step that advances it by one token, and a finish that reads the result ----


@dataclass
class _Beams:
    """Per image: K running beams and the K best finished hypotheses, as (B, K, max_length) token tensors."""

    running: Tensor  # (B, K, L) tokens, prompt included
    running_logprobs: Tensor  # (B, K, L) each token's raw log-probability
    running_scores: Tensor  # (B, K) summed (processed) log-probabilities
    finished: Tensor  # (B, K, L)
    finished_logprobs: Tensor  # (B, K, L)
    finished_scores: Tensor  # (B, K) length-penalised
    finished_lengths: Tensor  # (B, K) generated tokens, EOS included
    is_finished: Tensor  # (B, K) bool
    can_improve: Tensor  # (B, 1) bool: the best running beam could still beat the worst finished one

    @classmethod
    def start(cls, prompt: Tensor, beams: int, max_length: int, eos_token_id: int) -> "_Beams":
        images, device = prompt.shape[0], prompt.device
        running = torch.full((images, beams, max_length), eos_token_id, dtype=torch.long, device=device)
        running[:, :, : prompt.shape[1]] = prompt[:, None]
        logprobs = torch.zeros(images, beams, max_length, device=device)
        scores = torch.zeros(images, beams, device=device)
        scores[:, 1:] = _EXCLUDED  # all beams start identical: expand only the first
        return cls(
            running, logprobs, scores, running.clone(), logprobs.clone(),
            torch.full((images, beams), _EXCLUDED, device=device),
            torch.zeros(images, beams, dtype=torch.long, device=device),
            torch.zeros(images, beams, dtype=torch.bool, device=device),
            torch.ones(images, 1, dtype=torch.bool, device=device),
        )  # fmt: skip


def _beam(
    model: StepDecoder, image_tokens: Tensor, config: DecodeConfig, prompt: Sequence[int], eos_token_id: int,
    generator: torch.Generator | None,
) -> Generation:  # fmt: skip
    """Beam search as transformers' generate(num_beams=K) does it; the best `num_return_sequences` per image."""
    images, beams = image_tokens.shape[0], config.num_beams
    prompt_tokens = torch.tensor(prompt, device=image_tokens.device).expand(images, -1)  # (B, P)
    prompt_length = prompt_tokens.shape[1]
    max_length = prompt_length + config.max_new_tokens
    cache = model.start_cache(image_tokens, beams, max_length)
    logits = model.decode_step(prompt_tokens.repeat_interleave(beams, dim=0), cache, 0)
    state = _Beams.start(prompt_tokens, beams, max_length, eos_token_id)
    for length in range(prompt_length, max_length):
        rows, done = _beam_step(state, logits, length, length - prompt_length, max_length, config, eos_token_id)
        cache.reorder(rows)
        if done:
            break
        logits = model.decode_step(state.running[:, :, length].reshape(-1, 1), cache, length)
    return _beam_finish(state, prompt_length, config.num_return_sequences, eos_token_id)


def _beam_step(
    state: _Beams, logits: Tensor, length: int, generated: int, max_length: int, config: DecodeConfig,
    eos_token_id: int,
) -> tuple[Tensor, bool]:  # fmt: skip
    """Extend every beam by one token (position `length`) from `logits` (B*K, V), updating `state` in place.

    Returns the cache rows the new running beams continue, and whether the search is over.
    """
    images, beams = state.running_scores.shape
    candidates = 2 * beams  # enough that `beams` of them can go on even if up to `beams` just ended
    raw_logprobs = logits.float().log_softmax(-1)  # (B*K, V)
    flat_tokens = state.running[:, :, :length].reshape(images * beams, length)
    logprobs = process_scores(raw_logprobs, flat_tokens, generated, config, eos_token_id)
    vocab = logprobs.shape[-1]
    totals = (logprobs.view(images, beams, vocab) + state.running_scores[:, :, None]).view(images, beams * vocab)
    top_scores, top_indices = totals.topk(candidates, dim=1)  # (B, 2K)
    source_beams, top_tokens = top_indices // vocab, top_indices % vocab
    candidate_tokens = _gather_beams(state.running, source_beams)
    candidate_tokens[:, :, length] = top_tokens
    candidate_logprobs = _gather_beams(state.running_logprobs, source_beams)
    token_logprob = raw_logprobs.view(images, beams, vocab).gather(1, source_beams[:, :, None].expand(-1, -1, vocab))
    candidate_logprobs[:, :, length] = token_logprob.gather(2, top_tokens[:, :, None])[:, :, 0]
    ends = (top_tokens == eos_token_id) | (length + 1 == max_length)  # (B, 2K)

    # The best K candidates that go on.
    going_on = top_scores + ends.float() * _EXCLUDED
    keep = going_on.topk(beams, dim=1).indices
    state.running = _gather_beams(candidate_tokens, keep)
    state.running_logprobs = _gather_beams(candidate_logprobs, keep)
    state.running_scores = _gather_beams(going_on, keep)
    image_offsets = torch.arange(images, device=keep.device)[:, None] * beams
    rows = (image_offsets + _gather_beams(source_beams, keep)).view(-1)

    # Candidates among the top K that ended join the finished hypotheses if they beat the worst of them.
    top_beams = torch.arange(candidates, device=keep.device) < beams
    just_finished = ends & top_beams[None, :]
    penalised = top_scores / float(generated + 1) ** config.length_penalty
    full = state.is_finished.all(1, keepdim=True) & config.early_stopping
    penalised = penalised + (full | ~state.can_improve).float() * _EXCLUDED + (~just_finished).float() * _EXCLUDED
    merged_scores = torch.cat([state.finished_scores, penalised], dim=1)
    best = merged_scores.topk(beams, dim=1).indices
    state.finished = _gather_beams(torch.cat([state.finished, candidate_tokens], dim=1), best)
    state.finished_logprobs = _gather_beams(torch.cat([state.finished_logprobs, candidate_logprobs], dim=1), best)
    candidate_lengths = torch.full_like(top_tokens, generated + 1)
    state.finished_lengths = _gather_beams(torch.cat([state.finished_lengths, candidate_lengths], dim=1), best)
    state.is_finished = _gather_beams(torch.cat([state.is_finished, just_finished], dim=1), best)
    state.finished_scores = merged_scores.gather(1, best)

    state.can_improve &= _may_still_improve(
        state.running_scores, state.finished_scores, state.is_finished, generated + 1, config.length_penalty
    )
    done = bool(ends.all()) or not state.can_improve.any() or (config.early_stopping and bool(state.is_finished.all()))
    return rows, done


def _beam_finish(state: _Beams, prompt_length: int, returned: int, eos_token_id: int) -> Generation:
    """The best `returned` finished hypotheses per image, without the prompt, padded with EOS after each end."""
    lengths = state.finished_lengths[:, :returned]
    width = int(lengths.max())
    sequences = state.finished[:, :returned, prompt_length : prompt_length + width]
    token_logprobs = state.finished_logprobs[:, :returned, prompt_length : prompt_length + width]
    after_end = torch.arange(width, device=lengths.device)[None, None, :] >= lengths[:, :, None]
    sequences = sequences.masked_fill(after_end, eos_token_id)
    token_logprobs = token_logprobs.masked_fill(after_end, 0.0)
    return Generation(sequences, token_logprobs, lengths, state.finished_scores[:, :returned])


def _gather_beams(tensor: Tensor, indices: Tensor) -> Tensor:
    """tensor (B, K, ...) indexed along K by indices (B, K')."""
    expanded = indices.view(*indices.shape, *([1] * (tensor.dim() - 2))).expand(*indices.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)


def _may_still_improve(
    running_scores: Tensor, finished_scores: Tensor, is_finished: Tensor, generated: int, length_penalty: float
) -> Tensor:
    """Whether the best running beam could still beat the worst finished hypothesis (transformers' heuristic)."""
    best_running = running_scores[:, :1] / float(generated) ** length_penalty
    worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, _EXCLUDED)
    return (best_running > worst_finished).any(1, keepdim=True)


# ---- the entry point, and one convenience function per strategy ----

_STRATEGIES = {"greedy": _greedy, "sample": _sample, "beam": _beam}


def generate(
    model: StepDecoder,
    image_tokens: Tensor,
    config: DecodeConfig,
    *,
    bos_token_id: int,
    eos_token_id: int,
    generator: torch.Generator | None = None,
    prefix_ids: Sequence[int] = (),
    draft: DraftTable | None = None,
) -> Generation:
    """Captions for image tokens (B, N, C) from `model.encode`, by the strategy and options in `config`.

    Args:
        generator: the only source of randomness for sampling; None uses torch's global generator.
        prefix_ids: tokens the captions must continue (after BOS); they are not part of the output.
        draft: for greedy decoding, a draft table (speculative.py): the same captions in fewer forward passes.
    """
    prompt = (bos_token_id, *prefix_ids)
    with torch.inference_mode():
        if config.strategy == "greedy" and draft is not None:
            return _speculative_greedy(model, image_tokens, config, prompt, eos_token_id, draft)
        return _STRATEGIES[config.strategy](model, image_tokens, config, prompt, eos_token_id, generator)


def _speculative_greedy(
    model: StepDecoder, image_tokens: Tensor, config: DecodeConfig, prompt: Sequence[int], eos_token_id: int,
    draft: DraftTable,
) -> Generation:  # fmt: skip
    def choose(logits: Tensor, tokens: Tensor, generated: int) -> Tensor:
        return process_scores(logits, tokens, generated, config, eos_token_id).argmax(-1)

    tokens, logprobs, passes = verify_drafts(
        model, image_tokens, prompt, eos_token_id, draft, choose, config.max_new_tokens
    )
    generated = tokens[:, len(prompt) :]
    return Generation(
        generated[:, None], logprobs[:, None], caption_lengths(generated, eos_token_id)[:, None],
        logprobs.sum(1)[:, None], passes,
    )  # fmt: skip


# The three strategies by name, over one signature: `config` (default DecodeConfig()) with `options` overriding its
# fields, e.g. greedy(model, tokens, bos_token_id=0, eos_token_id=0, max_new_tokens=20).


def greedy(
    model: StepDecoder,
    image_tokens: Tensor,
    config: DecodeConfig | None = None,
    *,
    bos_token_id: int,
    eos_token_id: int,
    generator: torch.Generator | None = None,
    prefix_ids: Sequence[int] = (),
    **options,
) -> Tensor:
    """The most likely token at every step: generated ids (B, T), without BOS, padded with EOS after the end."""
    return _run("greedy", model, image_tokens, config, bos_token_id, eos_token_id, generator, prefix_ids, options)[0]


def beam_search(
    model: StepDecoder,
    image_tokens: Tensor,
    config: DecodeConfig | None = None,
    *,
    bos_token_id: int,
    eos_token_id: int,
    generator: torch.Generator | None = None,
    prefix_ids: Sequence[int] = (),
    **options,
) -> Tensor:
    """The best beam per image (e.g. num_beams=3, length_penalty=1.0): ids (B, T) as `greedy`'s."""
    return _run("beam", model, image_tokens, config, bos_token_id, eos_token_id, generator, prefix_ids, options)[0]


def sample(
    model: StepDecoder,
    image_tokens: Tensor,
    config: DecodeConfig | None = None,
    *,
    bos_token_id: int,
    eos_token_id: int,
    generator: torch.Generator | None = None,
    prefix_ids: Sequence[int] = (),
    **options,
) -> Generation:
    """`num_return_sequences` sampled captions per image (temperature, top-k, top-p), best first, with scores."""
    return _run("sample", model, image_tokens, config, bos_token_id, eos_token_id, generator, prefix_ids, options)[1]


def _run(
    strategy: str, model: StepDecoder, image_tokens: Tensor, config: DecodeConfig | None, bos_token_id: int,
    eos_token_id: int, generator: torch.Generator | None, prefix_ids: Sequence[int], options: dict,
) -> tuple[Tensor, Generation]:  # fmt: skip
    """The generation of `strategy` under `config` with `options`, and its best ids per image."""
    config = dataclasses.replace(config or DecodeConfig(), strategy=strategy, **options)
    generation = generate(
        model, image_tokens, config, bos_token_id=bos_token_id, eos_token_id=eos_token_id, generator=generator,
        prefix_ids=prefix_ids,
    )  # fmt: skip
    return generation.sequences[:, 0], generation
