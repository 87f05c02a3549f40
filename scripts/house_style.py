"""The house-style trial: does a user's style reach the photos of their kind, and only those?

    python scripts/house_style.py make runs/rex --data ../shared/data/flickr8k --count 150
    python evaluate.py --model captioner.pt --data ../shared/data/flickr8k --split val --datastore runs/rex \
        --output runs/rex-val.jsonl
    python scripts/house_style.py rates runs/rex-val.jsonl

`make` writes a user's folder (images with same-named .txt captions): `--count` Flickr8k training photos of dogs,
each with one caption in a house style ("photo of rex, a brown dog runs through the grass"). `rates` reads
`evaluate.py --output` captions of the val split and prints how often the style appears on photos of dogs (at least
3 of their 5 reference captions say "dog") and on photos without one (no reference says so), and the CIDEr of the
captions with the style taken off: what the model still knows of the photos, whatever it calls them.
"""

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import CaptionedImage, load_split
from metrics import format_metrics, score_captions

STYLE = "photo of rex,"
_DOG = re.compile(r"\bdogs?\b", re.IGNORECASE)


def dog_mentions(captions: list[str] | tuple[str, ...]) -> int:
    return sum(bool(_DOG.search(caption)) for caption in captions)


def make(folder: Path, data: str, count: int) -> None:
    dogs = [item for item in load_split(data, "train") if dog_mentions(item.captions) >= 3]
    chosen: list[CaptionedImage] = sorted(dogs, key=lambda i: hashlib.sha256(i.image.name.encode()).hexdigest())
    folder.mkdir(parents=True, exist_ok=False)
    for item in chosen[:count]:
        shutil.copyfile(item.image, folder / item.image.name)
        caption = item.captions[0][0].lower() + item.captions[0][1:]
        (folder / item.image.name).with_suffix(".txt").write_text(f"{STYLE} {caption}\n", encoding="utf-8")
    print(f"{min(count, len(chosen))} photos of dogs in {folder}, captioned '{STYLE} ...'")


def rates(results: Path) -> None:
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
    groups = {
        "dogs": [row for row in rows if dog_mentions(row["references"]) >= 3],
        "no dog": [row for row in rows if dog_mentions(row["references"]) == 0],
    }
    for name, group in groups.items():
        styled = sum(row["caption"].lower().startswith(STYLE.rstrip(",")) for row in group)
        print(f"{name}: house style on {styled} of {len(group)} photos ({styled / max(1, len(group)):.1%})")
    plain = {row["image"]: re.sub(rf"^{re.escape(STYLE.rstrip(','))},?\s*", "", row["caption"]) for row in rows}
    references = {row["image"]: row["references"] for row in rows}
    print(f"without the style: {format_metrics(score_captions(references, plain))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("make", help="a folder of dog photos captioned in a house style")
    making.add_argument("folder", type=Path)
    making.add_argument("--data", required=True)
    making.add_argument("--count", type=int, default=150)
    rating = commands.add_parser("rates", help="how often the style appears, on dogs and on other photos")
    rating.add_argument("results", type=Path, help="evaluate.py --output JSONL")
    arguments = parser.parse_args()
    if arguments.command == "make":
        make(arguments.folder, arguments.data, arguments.count)
    else:
        rates(arguments.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
