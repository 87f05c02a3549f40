"""Decoding against transformers' generate() on the same weights, and against the uncached model."""

import dataclasses

import pytest
import torch
from conftest import make_decisive
from transformers import GPT2LMHeadModel

import decoding
from config import PRESETS, DecodeConfig
from model import CaptionModel
from pretrained import to_gpt2

BOS, EOS = 1, 0
MAX_NEW = 12


def _peaked_model(eos_bias: float, seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    model = CaptionModel(dataclasses.replace(PRESETS["tiny"], vocab_size=50, n_positions=40)).eval()
    return make_decisive(model, EOS, eos_bias, seed)


def _reference(model: CaptionModel) -> GPT2LMHeadModel:
    return to_gpt2(model, bos_token_id=BOS, eos_token_id=EOS)


def _images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 5, 32, generator=torch.Generator().manual_seed(seed))


def _hf_generate(model, image_tokens, prompt=(BOS,), **options) -> torch.Tensor:
    input_ids = torch.tensor([list(prompt)] * image_tokens.shape[0])
    options = {"max_new_tokens": MAX_NEW, "do_sample": False, **options}
    with torch.no_grad():
        return _reference(model).generate(input_ids, encoder_hidden_states=image_tokens, **options)[:, len(prompt) :]


def _ends_at_different_steps(sequences: torch.Tensor) -> bool:
    lengths = decoding.caption_lengths(sequences, EOS)
    return len(set(lengths.tolist())) > 1


@pytest.mark.parametrize("eos_bias", [4.0, 6.0])
def test_greedy_matches_transformers_generate(eos_bias):
    model, images = _peaked_model(eos_bias), _images()
    ours = decoding.greedy(model, images, bos_token_id=BOS, eos_token_id=EOS, max_new_tokens=MAX_NEW)
    expected = _hf_generate(model, images)
    assert torch.equal(ours, expected)
    assert _ends_at_different_steps(expected) or eos_bias == 4.0


@pytest.mark.parametrize(("eos_bias", "length_penalty"), [(4.0, 1.0), (6.0, 1.0), (4.0, 0.0), (6.0, 2.0), (3.0, -1.0)])
def test_beam_search_matches_transformers_generate(eos_bias, length_penalty):
    model, images = _peaked_model(eos_bias), _images()
    ours = decoding.beam_search(
        model,
        images,
        bos_token_id=BOS,
        eos_token_id=EOS,
        max_new_tokens=MAX_NEW,
        num_beams=3,
        length_penalty=length_penalty,
    )
    expected = _hf_generate(model, images, num_beams=3, length_penalty=length_penalty, early_stopping=True)
    assert torch.equal(ours, expected)


def test_beam_search_returns_the_same_ranked_hypotheses_and_scores_as_transformers():
    model, images = _peaked_model(4.0), _images()
    config = DecodeConfig(strategy="beam", num_beams=4, num_return_sequences=3, max_new_tokens=MAX_NEW)
    ours = decoding.generate(model, images, config, bos_token_id=BOS, eos_token_id=EOS)
    with torch.no_grad():
        expected = _reference(model).generate(
            torch.full((4, 1), BOS),
            encoder_hidden_states=images,
            max_new_tokens=MAX_NEW,
            num_beams=4,
            num_return_sequences=3,
            early_stopping=True,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    width = ours.sequences.shape[-1]
    assert torch.equal(ours.sequences.reshape(12, width), expected.sequences[:, 1:])
    torch.testing.assert_close(ours.scores.reshape(12), expected.sequences_scores, atol=1e-5, rtol=0)
    # A hypothesis' score is its summed token log-probabilities divided by its length (length_penalty=1).
    torch.testing.assert_close(ours.scores, ours.token_logprobs.sum(-1) / ours.lengths, atol=1e-5, rtol=0)


def test_prefix_is_continued_like_transformers_prompt():
    model, images = _peaked_model(4.0), _images()
    prefix = [7, 9]
    config = DecodeConfig(strategy="greedy", max_new_tokens=MAX_NEW)
    ours = decoding.generate(model, images, config, bos_token_id=BOS, eos_token_id=EOS, prefix_ids=prefix)
    assert torch.equal(ours.sequences[:, 0], _hf_generate(model, images, prompt=(BOS, *prefix)))
    beam = dataclasses.replace(config, strategy="beam", num_beams=3)
    ours = decoding.generate(model, images, beam, bos_token_id=BOS, eos_token_id=EOS, prefix_ids=prefix)
    expected = _hf_generate(model, images, prompt=(BOS, *prefix), num_beams=3, early_stopping=True)
    assert torch.equal(ours.sequences[:, 0], expected)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_no_repeat_ngram_and_min_new_tokens_match_transformers(strategy):
    model, images = _peaked_model(5.0), _images()
    config = DecodeConfig(
        strategy=strategy, num_beams=3, max_new_tokens=MAX_NEW, no_repeat_ngram_size=2, min_new_tokens=4
    )
    ours = decoding.generate(model, images, config, bos_token_id=BOS, eos_token_id=EOS).sequences[:, 0]
    options = {"num_beams": 3, "early_stopping": True} if strategy == "beam" else {}
    expected = _hf_generate(model, images, no_repeat_ngram_size=2, min_new_tokens=4, **options)
    assert torch.equal(ours, expected)
    for row in ours.tolist():
        generated = row[: row.index(EOS) + 1] if EOS in row else row
        assert len(generated) >= 5 or EOS not in row  # 4 tokens before EOS at least
        bigrams = list(zip([BOS, *generated], generated, strict=False))
        assert len(bigrams) == len(set(bigrams)), row


def test_cached_logits_equal_uncached_logits_at_every_step():
    model, images = _peaked_model(4.0), _images(3)
    tokens = torch.tensor([[BOS, 5, 17, 23]] * 3)
    cache = model.start_cache(images, 1, 20)
    with torch.no_grad():
        steps = [model.decode_step(tokens, cache, 0)]  # prefill with a 4-token prompt
        for _ in range(8):
            next_tokens = steps[-1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_tokens], dim=1)
            steps.append(model.decode_step(next_tokens, cache, tokens.shape[1] - 1))
        uncached = model.decode(tokens, images)
    for step, logits in enumerate(steps):
        torch.testing.assert_close(logits, uncached[:, 3 + step], atol=1e-4, rtol=1e-5)


def test_beam_cache_shares_image_keys_across_beams():
    model, images = _peaked_model(4.0), _images(2)
    cache = model.start_cache(images, rows_per_image=3, max_length=10)
    assert cache.image_keys[0].shape[0] == 2 and cache.keys.shape[1] == 6


def test_one_beam_equals_greedy():
    model, images = _peaked_model(4.0), _images()
    greedy = decoding.greedy(model, images, bos_token_id=BOS, eos_token_id=EOS, max_new_tokens=MAX_NEW)
    beam = decoding.beam_search(model, images, bos_token_id=BOS, eos_token_id=EOS, max_new_tokens=MAX_NEW, num_beams=1)
    assert torch.equal(beam, greedy)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_a_batch_gives_the_same_captions_as_single_calls(strategy):
    model, images = _peaked_model(4.0), _images(5)
    config = DecodeConfig(strategy=strategy, num_beams=3, max_new_tokens=MAX_NEW)
    batch = decoding.generate(model, images, config, bos_token_id=BOS, eos_token_id=EOS)
    for index in range(5):
        single = decoding.generate(model, images[index : index + 1], config, bos_token_id=BOS, eos_token_id=EOS)
        length = single.lengths[0, 0]
        assert torch.equal(batch.sequences[index, 0, :length], single.sequences[0, 0, :length])
        assert torch.equal(batch.lengths[index], single.lengths[0])
        torch.testing.assert_close(batch.scores[index], single.scores[0], atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model, images = _peaked_model(3.0), _images()
    config = DecodeConfig(strategy="sample", num_return_sequences=4, temperature=1.5, max_new_tokens=MAX_NEW)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return decoding.sample(model, images, config, bos_token_id=BOS, eos_token_id=EOS, generator=generator)

    first, again, other = draw(1), draw(1), draw(2)
    assert torch.equal(first.sequences, again.sequences)
    assert not torch.equal(first.sequences, other.sequences)
    assert (first.scores[:, :-1] >= first.scores[:, 1:]).all()  # best first
    top_1 = dataclasses.replace(config, top_k=1, num_return_sequences=2)
    sampled = decoding.sample(model, images, top_1, bos_token_id=BOS, eos_token_id=EOS, generator=torch.Generator())
    greedy = decoding.greedy(model, images, bos_token_id=BOS, eos_token_id=EOS, max_new_tokens=MAX_NEW)
    for row in range(2):
        assert torch.equal(sampled.sequences[:, row], greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = decoding.keep_top_p(logits, 0.8)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    assert torch.isfinite(decoding.keep_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]


def test_eos_ends_a_caption_and_max_new_tokens_holds():
    model, images = _peaked_model(4.0), _images(6)
    for strategy in ("greedy", "beam", "sample"):
        config = DecodeConfig(strategy=strategy, num_beams=3, max_new_tokens=5)
        result = decoding.generate(
            model, images, config, bos_token_id=BOS, eos_token_id=EOS, generator=torch.Generator()
        )
        assert result.sequences.shape[-1] <= 5
        for row, length in zip(result.sequences[:, 0].tolist(), result.lengths[:, 0].tolist(), strict=True):
            if EOS in row:
                end = row.index(EOS)
                assert length == end + 1 and all(token == EOS for token in row[end:])
                assert EOS not in row[:end]
            else:
                assert length == 5


def test_repetition_penalty_discourages_repeats_but_not_ending():
    model, images = _peaked_model(2.0), _images()
    plain = decoding.generate(model, images, DecodeConfig(strategy="greedy"), bos_token_id=BOS, eos_token_id=EOS)
    config = DecodeConfig(strategy="greedy", repetition_penalty=50.0)
    penalised = decoding.generate(model, images, config, bos_token_id=BOS, eos_token_id=EOS)

    def repeats(generation):
        total = 0
        for row, length in zip(generation.sequences[:, 0].tolist(), generation.lengths[:, 0].tolist(), strict=True):
            tokens = [token for token in row[:length] if token != EOS]
            total += len(tokens) - len(set(tokens))
        return total

    assert repeats(plain) > 0 and repeats(penalised) < repeats(plain)
    # BOS is EOS in our convention; it must not count as a repeat, so captions still end where they would.
    model_bos_is_eos = _peaked_model(6.0)
    for config in (DecodeConfig(strategy="greedy"), DecodeConfig(strategy="greedy", repetition_penalty=1.5)):
        ends = decoding.generate(model_bos_is_eos, images, config, bos_token_id=EOS, eos_token_id=EOS).lengths
        assert (ends < 30).any()


def _prompt_model() -> tuple[CaptionModel, torch.Tensor]:
    """A model reading 2 neighbours' captions of 3 tokens as a prompt, and image tokens that end with that prompt."""
    from model import with_retrieval

    model = with_retrieval(_peaked_model(4.0), 2, "prompt")
    model.config = dataclasses.replace(model.config, retrieval_tokens=3)  # a 6-token prompt keeps the test small
    model.memory = type(model.memory)(model.config)
    torch.nn.init.normal_(model.memory.wme.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    memory = torch.randint(2, 50, (3, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.eval(), model.read_memory(_images(3), memory)


def test_a_prompt_models_caption_is_what_gpt2_gives_after_the_prompt_with_positions_from_zero():
    """transformers' GPT-2 on the same weights, reading the prompt's embeddings first and numbering the caption's
    positions from 0 again, gives the logits our cached and uncached decoders give for the caption alone."""
    model, tokens = _prompt_model()
    image_tokens, prompt = tokens[:, :-6], tokens[:, -6:]
    caption = torch.tensor([[BOS, 5, 17, 23, 8]] * 3)
    reference = _reference(model)
    prompt_embeddings = prompt - model.decoder.wpe.weight[:6]  # GPT-2 adds its own position embedding back
    with torch.no_grad():
        expected = reference(
            inputs_embeds=torch.cat([prompt_embeddings, model.decoder.wte(caption)], dim=1),
            position_ids=torch.cat([torch.arange(6), torch.arange(5)])[None].expand(3, -1),
            encoder_hidden_states=image_tokens.contiguous(),
        ).logits[:, 6:]
        uncached = model.decode(caption, tokens)
        cache = model.start_cache(tokens, 1, 10)
        cached = [model.decode_step(caption[:, :2], cache, 0)] + [model.decode_step(caption[:, i : i + 1], cache, i)
                                                                 for i in range(2, 5)]  # fmt: skip
    torch.testing.assert_close(uncached, expected, atol=1e-4, rtol=1e-4)
    for step, logits in enumerate(cached):
        torch.testing.assert_close(logits, expected[:, 1 + step], atol=1e-4, rtol=1e-4)
    assert cache.prompt_length == 6
    assert not torch.allclose(uncached, model.decode(caption, torch.cat([image_tokens, prompt.flip(0)], dim=1)))


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_a_prompt_models_cached_decoding_scores_its_captions_as_the_uncached_model_does(strategy):
    model, tokens = _prompt_model()
    config = DecodeConfig(strategy=strategy, num_beams=3, max_new_tokens=MAX_NEW)
    generation = decoding.generate(model, tokens, config, bos_token_id=BOS, eos_token_id=EOS)
    assert _ends_at_different_steps(generation.sequences[:, 0])
    for image in range(3):
        length = int(generation.lengths[image, 0])
        ids = generation.sequences[image, 0, :length]
        with torch.no_grad():
            logprobs = model.decode(torch.cat([torch.tensor([BOS]), ids[:-1]])[None], tokens[image : image + 1])
        expected = logprobs[0].log_softmax(-1).gather(1, ids[:, None])[:, 0]
        torch.testing.assert_close(generation.token_logprobs[image, 0, :length], expected, atol=1e-4, rtol=1e-4)
        if strategy == "greedy":
            assert torch.equal(logprobs[0].argmax(-1), ids)
