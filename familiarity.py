"""How familiar a photo is to a model: the closeness of its image features to those of the training photos.

A captioner trained on one world (Flickr8k: people, dogs, outdoor scenes) is confidently wrong outside it. Each
model file made by `hub.py release --data` carries a bank of its training photos' embeddings and a threshold
calibrated on the validation photos; a caption's familiarity is the mean cosine similarity of the photo's embedding
to its `k` nearest bank entries, and a photo below the threshold is flagged as unfamiliar.

The embedding is the mean of the image tokens the decoder reads (the bridge's output), L2-normalised: what the
caption is actually made from, and free, since captioning computes it anyway.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def image_embedding(image_tokens: Tensor) -> Tensor:
    """(B, C) unit vectors from image tokens (B, N, C)."""
    return F.normalize(image_tokens.float().mean(dim=1), dim=-1)


@dataclass(frozen=True)
class FamiliarityBank:
    """Training-photo embeddings (N, C), the neighbours averaged, and the threshold below which a photo is flagged."""

    bank: Tensor
    k: int = 10
    threshold: float = 0.0

    def score(self, embeddings: Tensor) -> Tensor:
        """Familiarity (B,) of unit embeddings (B, C): mean cosine similarity to the k nearest bank entries."""
        similarities = embeddings.float() @ self.bank.float().T.to(embeddings.device)  # (B, N)
        return similarities.topk(min(self.k, self.bank.shape[0]), dim=1).values.mean(dim=1)

    def calibrated(self, in_domain: Tensor, flagged_share: float) -> "FamiliarityBank":
        """The same bank with the threshold that flags `flagged_share` of the in-domain familiarities given."""
        threshold = float(torch.quantile(in_domain.float(), flagged_share))
        return FamiliarityBank(self.bank, self.k, threshold)

    def to_dict(self) -> dict:
        return {"bank": self.bank.half().contiguous(), "k": self.k, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, values: dict) -> "FamiliarityBank":
        return cls(values["bank"], int(values["k"]), float(values["threshold"]))


def auroc(in_domain: Tensor, out_of_domain: Tensor) -> float:
    """The probability that a random in-domain photo scores higher than a random out-of-domain one (ties: half)."""
    higher = (in_domain[:, None] > out_of_domain[None, :]).float().mean()
    ties = (in_domain[:, None] == out_of_domain[None, :]).float().mean()
    return float(higher + ties / 2)
