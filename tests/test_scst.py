"""Self-critical training: its reward is CIDEr-D (metrics.CiderD, tested against pycocoevalcap) and it works."""

import copy

import torch
import torch.nn.functional as F
from conftest import TINY_CAPTIONS

import decoding
import train
from config import DecodeConfig
from scst import SelfCriticalReward, scst_loss

REFERENCES = [["a dog runs on the grass"] * 5, ["people are walking on the beach"] * 5]


def _mean_reward(model, images, reward, tokenizer, seed=123) -> float:
    config = DecodeConfig(strategy="sample", num_return_sequences=16, max_new_tokens=12)
    model.eval()
    with torch.no_grad():
        generation = decoding.generate(
            model, model.encode(images), config, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
    return float(reward([0, 1], generation).mean())


def test_scst_steps_raise_the_mean_reward(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    model = copy.deepcopy(tiny_model).train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    # First a caption language model that ignores the image: all eight captions for both photos.
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=3e-3)
    tokens = [tiny_tokenizer.encode(text) for text in TINY_CAPTIONS]
    input_ids, labels = train.caption_targets(tokens * 2, tiny_tokenizer, max_tokens=20)
    with torch.no_grad():
        image_tokens = model.encode(images)
    for _ in range(100):
        loss = F.cross_entropy(model.decode(input_ids, image_tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reward = SelfCriticalReward(REFERENCES, tiny_tokenizer)
    before = _mean_reward(model, images, reward, tiny_tokenizer)

    # Then self-critical steps towards each photo's own caption.
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=3e-4)
    for step in range(30):
        model.train()
        loss, _ = scst_loss(
            model, model, images, 0, [0, 1], reward, samples=8, max_new_tokens=12,
            generator=torch.Generator().manual_seed(step),
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _mean_reward(model, images, reward, tiny_tokenizer)
    assert after > before + 0.5, (before, after)


def test_reward_is_cider_d_with_an_eos_word_only_for_finished_captions(tiny_tokenizer):
    reward = SelfCriticalReward(REFERENCES, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    caption = tiny_tokenizer.encode("a dog runs on the grass")
    finished = torch.tensor([[caption + [eos]], [caption + [eos]]])
    unfinished = torch.tensor([[caption + [caption[-1]]], [caption + [caption[-1]]]])[:, :, :-1]
    lengths = torch.tensor([[len(caption) + 1], [len(caption) + 1]])
    scores = reward([0, 1], decoding.Generation(finished, torch.zeros(finished.shape), lengths, torch.zeros(2, 1)))
    cut = reward([0, 1], decoding.Generation(unfinished, torch.zeros(unfinished.shape), lengths - 1, torch.zeros(2, 1)))
    expected = reward.cider.score("a dog runs on the grass <eos>", ["a dog runs on the grass <eos>"] * 5)
    assert scores[0, 0] == torch.tensor(expected, dtype=torch.float32) and scores[1, 0] < 0.1
    assert cut[0, 0] < scores[0, 0]  # the same words without an ending earn less
