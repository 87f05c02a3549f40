"""Speculative greedy decoding gives exactly the plain greedy output, in fewer forward passes when drafts are good."""

import dataclasses

import pytest
import torch
from conftest import make_decisive

import decoding
from config import PRESETS, DecodeConfig
from model import CaptionModel
from speculative import DraftTable

BOS, EOS = 1, 0


def _model(seed: int) -> CaptionModel:
    torch.manual_seed(seed)
    model = CaptionModel(dataclasses.replace(PRESETS["tiny"], vocab_size=50, n_positions=48)).eval()
    return make_decisive(model, EOS, 4.0, seed)


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 5, 32, generator=torch.Generator().manual_seed(seed))


CONFIGS = [
    DecodeConfig(strategy="greedy", max_new_tokens=16),
    DecodeConfig(strategy="greedy", max_new_tokens=16, no_repeat_ngram_size=2, min_new_tokens=5),
    DecodeConfig(strategy="greedy", max_new_tokens=9, repetition_penalty=1.5),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("config", CONFIGS, ids=["plain", "no-repeat+min", "repetition"])
@pytest.mark.parametrize("draft_from", ["own-outputs", "other-captions"])
def test_speculative_greedy_equals_plain_greedy(seed, config, draft_from):
    model, images, prefix = _model(seed), _images(6, seed), [7, 3] if seed == 2 else []
    plain = decoding.generate(model, images, config, bos_token_id=BOS, eos_token_id=EOS, prefix_ids=prefix)
    if draft_from == "own-outputs":  # drafts that are often right: several tokens accepted per pass
        captions = [row[: int(n)] for row, n in zip(plain.sequences[:, 0].tolist(), plain.lengths[:, 0], strict=True)]
    else:  # drafts that are mostly wrong: one token per pass, still the same output
        captions = [torch.randint(2, 50, (8,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(30)]
    table = DraftTable.from_captions(captions, BOS, EOS)
    fast = decoding.generate(model, images, config, bos_token_id=BOS, eos_token_id=EOS, prefix_ids=prefix, draft=table)
    passes = fast.passes
    assert torch.equal(fast.lengths, plain.lengths)
    width = int(plain.lengths.max())
    assert torch.equal(fast.sequences[..., :width], plain.sequences[..., :width])
    torch.testing.assert_close(fast.token_logprobs[..., :width], plain.token_logprobs[..., :width], atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.scores, plain.scores, atol=1e-3, rtol=0)
    if draft_from == "own-outputs" and config.repetition_penalty == 1.0:
        assert passes < int(plain.lengths.max()), passes  # fewer passes than tokens


@pytest.mark.parametrize("prefix", [[], [7, 3]])
def test_speculative_greedy_drafts_only_as_far_as_the_decoders_positions_reach(prefix):
    """A caption as long as the model allows leaves no room for a draft after it: the last passes draft less."""
    model, images = _model(0), _images(3)
    room = model.config.n_positions - 1 - len(prefix)
    config = DecodeConfig(strategy="greedy", max_new_tokens=room, min_new_tokens=room)
    plain = decoding.generate(model, images, config, bos_token_id=BOS, eos_token_id=EOS, prefix_ids=prefix)
    captions = [row.tolist() for row in plain.sequences[:, 0]]
    table = DraftTable.from_captions(captions, BOS, EOS)
    fast = decoding.generate(model, images, config, bos_token_id=BOS, eos_token_id=EOS, prefix_ids=prefix, draft=table)
    assert int(plain.lengths.min()) == room
    assert torch.equal(fast.sequences, plain.sequences) and torch.equal(fast.lengths, plain.lengths)


def test_draft_table_backs_off_to_shorter_contexts_and_round_trips_through_plain_lists():
    table = DraftTable.from_captions([[5, 6, 7], [5, 6, 7], [9, 6, 8]], BOS, EOS, order=3)
    assert table.draft([BOS, 5, 6], 3, EOS) == [7, EOS, EOS]
    assert table.draft([BOS, 9, 6], 1, EOS) == [8]
    assert table.draft([BOS, 4, 6], 1, EOS) == [7]  # (4, 6) unseen: the bigram context (6,) says 7
    assert table.draft([BOS, 5, EOS], 2, EOS) == [EOS, EOS]
    assert DraftTable.from_dict(table.to_dict()) == table
