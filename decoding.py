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
from model import CaptionModel

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


def _process(scores: Tensor, tokens: Tensor, generated: int, config: DecodeConfig, eos_token_id: int) -> Tensor:
    """Apply the penalties and constraints of `config` to next-token scores (rows, vocab)."""
    scores = penalise_repetitions(scores, tokens[:, 1:], config.repetition_penalty)  # BOS excluded: see module doc
    scores = block_repeated_ngrams(scores, tokens, config.no_repeat_ngram_size)
    if generated < config.min_new_tokens:
        scores = forbid_token(scores, eos_token_id)
    return scores


# ---- greedy and sampling: one token per row per step ----


def _prompt(bos_token_id: int, prefix_ids: Sequence[int], rows: int, device: torch.device) -> Tensor:
    return torch.tensor([bos_token_id, *prefix_ids], device=device).expand(rows, -1)  # (rows, P)


def _one_token_per_step(
    model: CaptionModel,
    image_tokens: Tensor,
    config: DecodeConfig,
    choose: Callable[[Tensor], Tensor],
    *,
    bos_token_id: int,
    eos_token_id: int,
    prefix_ids: Sequence[int],
    rows_per_image: int,
) -> Generation:
    images = image_tokens.shape[0]
    rows = images * rows_per_image
    tokens = _prompt(bos_token_id, prefix_ids, rows, image_tokens.device)
    prompt_length = tokens.shape[1]
    cache = model.start_cache(image_tokens, rows_per_image, prompt_length + config.max_new_tokens)
    logits = model.decode_step(tokens, cache)
    finished = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
    chosen_logprobs = []
    for step in range(config.max_new_tokens):
        scores = _process(logits.float(), tokens, step, config, eos_token_id)
        next_tokens = choose(scores)
        next_tokens = torch.where(finished, eos_token_id, next_tokens)
        logprobs = logits.float().log_softmax(-1).gather(1, next_tokens[:, None])[:, 0]
        chosen_logprobs.append(torch.where(finished, 0.0, logprobs))
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        finished |= next_tokens == eos_token_id
        if finished.all() or step + 1 == config.max_new_tokens:
            break
        logits = model.decode_step(next_tokens[:, None], cache)
    generated = tokens[:, prompt_length:]
    token_logprobs = torch.stack(chosen_logprobs, dim=1)
    lengths = _lengths(generated, eos_token_id)
    shape = (images, rows_per_image)
    return Generation(
        generated.view(*shape, -1),
        token_logprobs.view(*shape, -1),
        lengths.view(shape),
        token_logprobs.sum(1).view(shape),
    )


def _lengths(generated: Tensor, eos_token_id: int) -> Tensor:
    """Tokens up to and including the first EOS (all of them where there is none)."""
    is_eos = generated == eos_token_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, generated.shape[1])
    return first_eos


def greedy(
    model: CaptionModel,
    image_tokens: Tensor,
    *,
    bos_token_id: int,
    eos_token_id: int,
    max_new_tokens: int,
    config: DecodeConfig | None = None,
    prefix_ids: Sequence[int] = (),
) -> Tensor:
    """The most likely token at every step: generated ids (B, T), without BOS, padded with EOS after the end."""
    config = _with(config or DecodeConfig(), strategy="greedy", max_new_tokens=max_new_tokens, num_return_sequences=1)
    return generate(
        model, image_tokens, config, bos_token_id=bos_token_id, eos_token_id=eos_token_id, prefix_ids=prefix_ids
    ).sequences[:, 0]


def sample(
    model: CaptionModel,
    image_tokens: Tensor,
    config: DecodeConfig,
    *,
    bos_token_id: int,
    eos_token_id: int,
    generator: torch.Generator | None = None,
    prefix_ids: Sequence[int] = (),
) -> Generation:
    """`config.num_return_sequences` sampled captions per image, with temperature, top-k and top-p."""
    return generate(
        model,
        image_tokens,
        _with(config, strategy="sample"),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        generator=generator,
        prefix_ids=prefix_ids,
    )


def _sampler(config: DecodeConfig, generator: torch.Generator | None) -> Callable[[Tensor], Tensor]:
    def choose(scores: Tensor) -> Tensor:
        logits = keep_top_p(keep_top_k(scores / config.temperature, config.top_k), config.top_p)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    return choose


# ---- beam search ----


def beam_search(
    model: CaptionModel,
    image_tokens: Tensor,
    *,
    bos_token_id: int,
    eos_token_id: int,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    config: DecodeConfig | None = None,
    prefix_ids: Sequence[int] = (),
) -> Tensor:
    """The best beam per image: generated ids (B, T), without BOS, padded with EOS after the end."""
    config = _with(
        config or DecodeConfig(),
        strategy="beam",
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        length_penalty=length_penalty,
        num_return_sequences=1,
    )
    return generate(
        model, image_tokens, config, bos_token_id=bos_token_id, eos_token_id=eos_token_id, prefix_ids=prefix_ids
    ).sequences[:, 0]


def _beam_search(
    model: CaptionModel,
    image_tokens: Tensor,
    config: DecodeConfig,
    *,
    bos_token_id: int,
    eos_token_id: int,
    prefix_ids: Sequence[int],
) -> Generation:
    images, beams = image_tokens.shape[0], config.num_beams
    candidates = 2 * beams  # enough that `beams` of them can go on even if up to `beams` just ended
    device = image_tokens.device
    prompt = _prompt(bos_token_id, prefix_ids, images * beams, device)
    prompt_length = prompt.shape[1]
    max_length = prompt_length + config.max_new_tokens
    cache = model.start_cache(image_tokens, beams, max_length)
    logits = model.decode_step(prompt, cache)

    # Running beams and finished hypotheses, per image: (B, K, max_length) tokens and (B, K) scores.
    running = torch.full((images, beams, max_length), eos_token_id, dtype=torch.long, device=device)
    running[:, :, :prompt_length] = prompt.view(images, beams, -1)
    running_logprobs = torch.zeros(images, beams, max_length, device=device)
    running_scores = torch.zeros(images, beams, device=device)
    running_scores[:, 1:] = _EXCLUDED  # all beams start identical: expand only the first
    finished = running.clone()
    finished_logprobs = running_logprobs.clone()
    finished_scores = torch.full((images, beams), _EXCLUDED, device=device)
    finished_lengths = torch.zeros(images, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(images, beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(images, 1, dtype=torch.bool, device=device)
    top_beams = torch.arange(candidates, device=device) < beams
    image_offsets = torch.arange(images, device=device)[:, None] * beams

    for length in range(prompt_length, max_length):
        generated = length - prompt_length
        raw_logprobs = logits.float().log_softmax(-1)  # (B*K, V)
        flat_tokens = running[:, :, :length].reshape(images * beams, length)
        logprobs = _process(raw_logprobs, flat_tokens, generated, config, eos_token_id)
        vocab = logprobs.shape[-1]
        totals = (logprobs.view(images, beams, vocab) + running_scores[:, :, None]).view(images, beams * vocab)
        top_scores, top_indices = totals.topk(candidates, dim=1)  # (B, 2K)
        source_beams, top_tokens = top_indices // vocab, top_indices % vocab
        candidate_tokens = _gather_beams(running, source_beams)
        candidate_tokens[:, :, length] = top_tokens
        candidate_logprobs = _gather_beams(running_logprobs, source_beams)
        token_logprob = raw_logprobs.view(images, beams, vocab).gather(
            1, source_beams[:, :, None].expand(-1, -1, vocab)
        )
        candidate_logprobs[:, :, length] = token_logprob.gather(2, top_tokens[:, :, None])[:, :, 0]
        ends = (top_tokens == eos_token_id) | (length + 1 == max_length)  # (B, 2K)

        # The best K candidates that go on.
        keep = (top_scores + ends.float() * _EXCLUDED).topk(beams, dim=1).indices
        running = _gather_beams(candidate_tokens, keep)
        running_logprobs = _gather_beams(candidate_logprobs, keep)
        running_scores = _gather_beams(top_scores + ends.float() * _EXCLUDED, keep)
        cache.reorder((image_offsets + _gather_beams(source_beams, keep)).view(-1))

        # Candidates among the top K that ended join the finished hypotheses if they beat the worst of them.
        just_finished = ends & top_beams[None, :]
        penalised = top_scores / float(generated + 1) ** config.length_penalty
        full = is_finished.all(1, keepdim=True) & config.early_stopping
        penalised = penalised + (full | ~can_improve).float() * _EXCLUDED + (~just_finished).float() * _EXCLUDED
        merged_scores = torch.cat([finished_scores, penalised], dim=1)
        best = merged_scores.topk(beams, dim=1).indices
        finished = _gather_beams(torch.cat([finished, candidate_tokens], dim=1), best)
        finished_logprobs = _gather_beams(torch.cat([finished_logprobs, candidate_logprobs], dim=1), best)
        candidate_lengths = torch.full_like(top_tokens, generated + 1)
        finished_lengths = _gather_beams(torch.cat([finished_lengths, candidate_lengths], dim=1), best)
        is_finished = _gather_beams(torch.cat([is_finished, just_finished], dim=1), best)
        finished_scores = merged_scores.gather(1, best)

        can_improve &= _may_still_improve(
            running_scores, finished_scores, is_finished, generated + 1, config.length_penalty
        )
        if ends.all() or not can_improve.any() or (config.early_stopping and is_finished.all()):
            break
        logits = model.decode_step(running[:, :, length].reshape(-1, 1), cache)

    returned = config.num_return_sequences
    lengths = finished_lengths[:, :returned]
    width = int(lengths.max())
    sequences = finished[:, :returned, prompt_length : prompt_length + width]
    token_logprobs = finished_logprobs[:, :returned, prompt_length : prompt_length + width]
    positions = torch.arange(width, device=device)
    after_end = positions[None, None, :] >= lengths[:, :, None]
    sequences = sequences.masked_fill(after_end, eos_token_id)
    token_logprobs = token_logprobs.masked_fill(after_end, 0.0)
    return Generation(sequences, token_logprobs, lengths, finished_scores[:, :returned])


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


# ---- entry point ----


def _with(config: DecodeConfig, **changes) -> DecodeConfig:
    return dataclasses.replace(config, **changes)


def generate(
    model: CaptionModel,
    image_tokens: Tensor,
    config: DecodeConfig,
    *,
    bos_token_id: int,
    eos_token_id: int,
    generator: torch.Generator | None = None,
    prefix_ids: Sequence[int] = (),
) -> Generation:
    """Captions for image tokens (B, N, C) from `model.encode`, by the strategy and options in `config`.

    Args:
        generator: the only source of randomness for sampling; None uses torch's global generator.
        prefix_ids: tokens the captions must continue (after BOS); they are not part of the output.
    """
    with torch.inference_mode():
        if config.strategy == "beam":
            return _beam_search(
                model, image_tokens, config, bos_token_id=bos_token_id, eos_token_id=eos_token_id, prefix_ids=prefix_ids
            )
        if config.strategy == "greedy":
            choose = lambda scores: scores.argmax(-1)  # noqa: E731
            rows = 1
        else:
            choose = _sampler(config, generator)
            rows = config.num_return_sequences
        generation = _one_token_per_step(
            model,
            image_tokens,
            config,
            choose,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            prefix_ids=prefix_ids,
            rows_per_image=rows,
        )
        if rows > 1:  # best first, like beam search
            order = generation.scores.argsort(dim=1, descending=True)
            generation = Generation(
                _gather_beams(generation.sequences, order),
                _gather_beams(generation.token_logprobs, order),
                generation.lengths.gather(1, order),
                generation.scores.gather(1, order),
            )
        return generation
