"""How familiar a photo is to a model: how typical its image features are of the training photos.

A captioner trained on one world (Flickr8k: people, dogs, outdoor scenes) is confidently wrong outside it. A model
file made by `hub.py release --data` carries a Gaussian model of its training photos' features (their mean and
inverse covariance: a few hundred kilobytes) and the Mahalanobis distances of its validation photos. A photo's
familiarity is the share of validation photos at least as far from the training photos as it is: 0.5 is a typical
Flickr8k photo, 0.01 one that only 1% of them match in strangeness. Photos below `flagged_share` are flagged.

The feature is the encoder's class token: chosen by measurement (docs/familiarity.md) over the
nearest-neighbour cosine of the class token, of the mean patch token, and of the decoder's image tokens.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FamiliarityModel:
    """The training photos' feature mean (C,) and inverse covariance (C, C), and the sorted distances (M,) of the
    validation photos, which turn a distance into a familiarity."""

    mean: Tensor
    precision: Tensor
    reference_distances: Tensor
    flagged_share: float = 0.03

    @classmethod
    def fit(
        cls, train: Tensor, val: Tensor, flagged_share: float = 0.03, shrinkage: float = 1e-4
    ) -> "FamiliarityModel":
        """From the features (N, C) of the training photos and (M, C) of the validation photos."""
        train = train.double()
        mean = train.mean(0)
        centred = train - mean
        covariance = centred.T @ centred / len(train) + shrinkage * torch.eye(train.shape[1], dtype=torch.float64)
        model = cls(mean.float(), torch.linalg.inv(covariance).float(), torch.zeros(0), flagged_share)
        return cls(model.mean, model.precision, model.distances(val).sort().values, flagged_share)

    def distances(self, features: Tensor) -> Tensor:
        """Squared Mahalanobis distances (B,) of features (B, C) from the training photos."""
        centred = features.float() - self.mean.to(features.device)
        return ((centred @ self.precision.to(features.device)) * centred).sum(-1)

    def familiarity(self, features: Tensor) -> Tensor:
        """Per photo (B,), the share of validation photos at least as far from the training photos."""
        reference = self.reference_distances.to(features.device)
        below = torch.searchsorted(reference, self.distances(features).contiguous())
        return 1.0 - below.float() / len(reference)

    def to_dict(self) -> dict:
        return {
            "mean": self.mean, "precision": self.precision, "reference_distances": self.reference_distances,
            "flagged_share": self.flagged_share,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict) -> "FamiliarityModel":
        return cls(
            values["mean"].float(), values["precision"].float(), values["reference_distances"].float(),
            float(values["flagged_share"]),
        )  # fmt: skip


def auroc(in_domain: Tensor, out_of_domain: Tensor) -> float:
    """The probability that a random in-domain photo scores higher than a random out-of-domain one (ties: half)."""
    higher = (in_domain[:, None] > out_of_domain[None, :]).float().mean()
    ties = (in_domain[:, None] == out_of_domain[None, :]).float().mean()
    return float(higher + ties / 2)
