"""Self-critical sequence training (Rennie et al. 2017): fine-tune a captioner on the CIDEr-D of its own samples.

For each image, sample K captions; each caption's reward is its CIDEr-D against the image's references, and its
baseline the mean reward of the other K - 1 samples. The loss raises the log-probability of captions that beat their
baseline and lowers it for those below:

    loss = - sum over sampled tokens of (reward - baseline) * log p(token)  /  number of sampled tokens

Scored text ends in an "<eos>" word only where the caption ended (the references always do), so an unfinished
fragment cannot earn the n-grams of a finished caption. Document frequencies come from the training references,
computed once.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import decoding
from config import DecodeConfig
from metrics import CiderD, ptb_tokenize
from model import CaptionModel
from tokenizer import CaptionTokenizer

EOS_WORD = "<eos>"


class SelfCriticalReward:
    """CIDEr-D rewards of sampled captions, against each training image's references tokenised once."""

    def __init__(self, references: Sequence[Sequence[str]], tokenizer: CaptionTokenizer):
        texts = [[f"{ptb_tokenize(text)} {EOS_WORD}" for text in captions] for captions in references]
        self.cider = CiderD(texts)
        self.references = [[self.cider.vector(text) for text in captions] for captions in texts]
        self.tokenizer = tokenizer

    def __call__(self, images: Sequence[int], generation: decoding.Generation) -> Tensor:
        """Rewards (B, K) of the K sampled captions of each of the B images (indices into the references)."""
        rewards = torch.zeros(generation.lengths.shape)
        eos = self.tokenizer.eos_token_id
        for row, image in enumerate(images):
            for sample in range(generation.lengths.shape[1]):
                ids = generation.sequences[row, sample, : int(generation.lengths[row, sample])].tolist()
                text = ptb_tokenize(self.tokenizer.decode(ids)) + (f" {EOS_WORD}" if ids and ids[-1] == eos else "")
                rewards[row, sample] = self.cider.score(text, self.references[image])
        return rewards


def scst_loss(
    runner: nn.Module,
    model: CaptionModel,
    images: Tensor,
    start_block: int,
    image_indices: Sequence[int],
    reward: SelfCriticalReward,
    *,
    samples: int,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """The self-critical loss of one batch, and the mean reward of its samples.

    Args:
        runner: `model`, or its DistributedDataParallel wrapper, which computes the differentiable forward pass.
        images: encoder inputs (B, ...) as `CaptionModel.encode` takes them, with `start_block`.
        image_indices: each image's index into the reward's references.
        samples: captions sampled per image (K >= 2: each is baselined by the others).
        generator: the randomness of the samples (seeded per step, so a resumed run samples the same captions).
    """
    bos, eos = reward.tokenizer.bos_token_id, reward.tokenizer.eos_token_id
    config = DecodeConfig(strategy="sample", num_return_sequences=samples, max_new_tokens=max_new_tokens)
    training = model.training
    model.eval()  # sample without dropout
    with torch.no_grad():
        generation = decoding.generate(
            model, model.encode(images, start_block), config, bos_token_id=bos, eos_token_id=eos, generator=generator
        )
    model.train(training)
    rewards = reward(image_indices, generation)  # (B, K)
    baselines = (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)
    advantages = (rewards - baselines).to(images.device)

    sequences = generation.sequences.flatten(0, 1).clone()  # (B*K, T), rows grouped by image; clone: a normal tensor
    # (generate's are inference tensors, which autograd cannot save)
    input_ids = torch.cat([torch.full_like(sequences[:, :1], bos), sequences[:, :-1]], dim=1)
    positions = torch.arange(sequences.shape[1], device=sequences.device)
    sampled = positions[None, :] < generation.lengths.flatten().clone()[:, None]  # the tokens sampled, EOS included
    logits, _ = runner(images, input_ids, start_block=start_block)
    logprobs = logits.float().log_softmax(-1).gather(2, sequences[:, :, None])[:, :, 0]  # (B*K, T)
    weighted = advantages.flatten()[:, None] * logprobs * sampled
    return -weighted.sum() / sampled.sum().clamp_min(1), float(rewards.mean())
