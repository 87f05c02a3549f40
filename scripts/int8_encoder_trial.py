"""Which of the encoder's matrix products to run in int8: encoder time against what the quantization moves.

    python scripts/int8_encoder_trial.py --model captioner.pt --data ../shared/data/flickr8k

Quantizes the model's encoder twice with `openvino_runtime.quantize_encoder` on the same 300 training photos
(release.add_int8_encoder's choice): every block's matrix products in int8, and the MLP's alone (the attention's
projections in bfloat16, as shipped). For each, and for the bfloat16 encoder, prints the OpenVINO encoder's time
for one photo and a photo of a batch of 16 (medians of 5 rounds, measured in turn in one process), how far its
class tokens are from float32's on the example photos (the lowest cosine), and the familiarity of each example
photo with the flagged ones marked (familiarity.py: the unfamiliar-photo signal reads the class token).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import timed
from checkpoint import load_model_file
from familiarity import FamiliarityModel
from images import ImageTransform, load_image
from openvino_runtime import ATTENTION_PROJECTIONS, OpenVinoModel, quantize_encoder
from release import CALIBRATION_PHOTOS, ModelInfo, calibration_pixels

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))
VARIANTS = {"all matrix products": (), "MLP only (shipped)": (ATTENTION_PROJECTIONS,)}


def _ms_a_photo(encoder: OpenVinoModel, pixels: torch.Tensor) -> float:
    seconds, _ = timed(lambda: encoder.encode_with_class_token(pixels), 8 if len(pixels) == 1 else 2)
    return seconds / len(pixels) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="captioner.pt")
    parser.add_argument("--data", required=True, help="the training data set (its photos calibrate)")
    parser.add_argument("--cache", default=None, help="where OpenVINO conversions go (default: the user cache)")
    arguments = parser.parse_args()
    model, _, metadata = load_model_file(arguments.model)
    info = ModelInfo.from_dict(metadata)
    familiarity = FamiliarityModel.from_dict(info.familiarity)
    transform = ImageTransform.for_model(model.config)
    calibration = calibration_pixels(arguments.data, transform, CALIBRATION_PHOTOS)
    pixels = transform([load_image(path) for path in EXAMPLES])
    batch = torch.cat([pixels, pixels])[:16]
    with torch.inference_mode():
        reference = model.encode_with_class_token(pixels)[1]
    cache = Path(arguments.cache) if arguments.cache else None
    encoders = {"bfloat16": OpenVinoModel.compile(model, "bfloat16", cache)}
    for name, kept in VARIANTS.items():
        graph = quantize_encoder(model, calibration, kept)
        encoders[name] = OpenVinoModel.compile(model, "int8-encoder", cache, int8_encoder=graph)
    times = {name: {1: [], 16: []} for name in encoders}
    for _ in range(5):
        for name, encoder in encoders.items():
            times[name][1].append(_ms_a_photo(encoder, pixels[:1]))
            times[name][16].append(_ms_a_photo(encoder, batch))
    print(
        "| encoder in OpenVINO | one photo, ms | a photo of 16, ms | class token cosine to float32, lowest | "
        "example photos' familiarity (* flagged) |"
    )
    print("|---|---|---|---|---|")
    for name, encoder in encoders.items():
        class_tokens = encoder.encode_with_class_token(pixels)[1]
        cosine = torch.nn.functional.cosine_similarity(class_tokens, reference).min().item()
        scores = familiarity.familiarity(class_tokens).tolist()
        shown = ", ".join(
            f"{path.stem} {score:.3f}{'*' if score < familiarity.flagged_share else ''}"
            for path, score in zip(EXAMPLES, scores, strict=True)
        )
        print(
            f"| {name} | {statistics.median(times[name][1]):.1f} | {statistics.median(times[name][16]):.1f} | "
            f"{cosine:.4f} | {shown} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
