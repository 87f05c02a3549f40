"""How often a model file's ImageNet labels (labels.py) agree with the teacher network run independently: timm's
`tf_efficientnet_lite0` in float32 with the package's weights, on its own preprocessing.

    python scripts/ood_images.py runs/ood
    python scripts/label_agreement.py runs/ood --model captioner.pt

Prints the share of images whose top label is the teacher's, and whose top label is in the teacher's top 5.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner import Captioner
from distill import TEACHER_TRANSFORM, load_teacher
from images import IMAGE_SUFFIXES, load_image
from labels import class_names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, help="a folder of images (searched recursively)")
    parser.add_argument("--model", default=None, help="model file (default: captioner.pt)")
    arguments = parser.parse_args()
    paths = sorted(p for p in arguments.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    captioner, teacher, names = Captioner.load(arguments.model, device="cpu"), load_teacher(), class_names()
    top1 = top5 = 0
    for start in range(0, len(paths), 32):
        pictures = [load_image(path) for path in paths[start : start + 32]]
        with torch.inference_mode():
            expected = teacher(TEACHER_TRANSFORM(pictures)).topk(5).indices
        for labels, indices in zip(captioner.labels(pictures), expected, strict=True):
            top1 += labels[0].name == names[int(indices[0])]
            top5 += labels[0].name in {names[int(index)] for index in indices}
    print(f"{len(paths)} images: top label the teacher's for {top1} ({top1 / len(paths):.1%}), in its top 5 for "
          f"{top5} ({top5 / len(paths):.1%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
