"""The out-of-domain photo set, against which a model's unfamiliar-photo threshold is checked.

    python scripts/ood_images.py OUT_DIR

Flickr8k is people, dogs and outdoor scenes; this set is everything else a user might send: photos of other subjects
(scikit-image's sample images, openly licensed, from its PyPI wheel; its people photos left out), and, drawn here from
fixed seeds, charts, documents, drawings, textures and screenshots. About 220 images, reproducible byte for byte
except the downloaded photos.
"""

import io
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SKIMAGE = "scikit-image==0.26.0"
# scikit-image's sample images that are not Flickr8k's world (its people photos, astronaut and camera, are left out;
# so are the tiny test patterns).
SKIMAGE_PHOTOS = (
    "brick.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png",
    "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip
PER_KIND = 40
WORDS = [
    "the",
    "of",
    "and",
    "data",
    "model",
    "result",
    "table",
    "figure",
    "value",
    "total",
    "report",
    "page",
    "section",
    "method",
    "sample",
    "year",
    "rate",
]


def sample_photos(out: Path) -> int:
    """scikit-image's sample photos, from its wheel (PyPI); 0 where pip cannot fetch it."""
    with tempfile.TemporaryDirectory() as directory:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", directory, SKIMAGE], capture_output=True
        )
        wheels = list(Path(directory).glob("*.whl"))
        if fetched.returncode or not wheels:
            print(f"warning: could not download {SKIMAGE}; no sample photos", file=sys.stderr)
            return 0
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in wheel.namelist():
                if name.startswith("skimage/data/") and name.split("/")[-1] in SKIMAGE_PHOTOS:
                    image = Image.open(io.BytesIO(wheel.read(name))).convert("RGB")
                    image.save(out / f"photo-{Path(name).stem}.png")
    return len(SKIMAGE_PHOTOS)


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


def chart(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (rng.choice([480, 640]), 360), "white")
    draw = ImageDraw.Draw(image)
    width, height = image.size
    draw.line([(50, 20), (50, height - 40), (width - 20, height - 40)], fill="black", width=2)
    values = [rng.uniform(0.1, 1.0) for _ in range(rng.randrange(4, 12))]
    step = (width - 90) / len(values)
    kind = rng.choice(["bar", "line", "pie"])
    if kind == "pie":
        image.paste("white", (0, 0, width, height))
        start = 0.0
        for value in values:
            end = start + 360 * value / sum(values)
            draw.pieslice([width / 2 - 140, 40, width / 2 + 140, 320], start, end, fill=_colour(rng), outline="white")
            start = end
    else:
        points = [(60 + i * step, height - 40 - v * (height - 80)) for i, v in enumerate(values)]
        for i, (x, y) in enumerate(points):
            if kind == "bar":
                draw.rectangle([x, y, x + step * 0.7, height - 41], fill=_colour(rng))
            draw.text((x, height - 35), str(2000 + i), fill="black")
        if kind == "line":
            draw.line(points, fill=_colour(rng), width=3)
    draw.text((width / 2 - 40, 4), rng.choice(WORDS).title() + " by " + rng.choice(WORDS), fill="black")
    return image


def document(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (420, 560), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    y = 30
    draw.text((40, y), " ".join(rng.choice(WORDS) for _ in range(4)).upper(), fill="black")
    y += 30
    while y < 520:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 11)))
        draw.text((40, y), line, fill=(20, 20, 20))
        y += rng.choice([14, 16, 18])
    return image.rotate(rng.uniform(-3, 3), fillcolor=(200, 200, 200), expand=False)


def drawing(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (400, 400), _colour(rng) if rng.random() < 0.5 else "white")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(3, 10)):
        box = sorted([rng.randrange(400), rng.randrange(400)])
        other = sorted([rng.randrange(400), rng.randrange(400)])
        shape = rng.choice(["ellipse", "rectangle", "polygon"])
        if shape == "polygon":
            draw.polygon(
                [(rng.randrange(400), rng.randrange(400)) for _ in range(rng.randrange(3, 7))],
                fill=_colour(rng),
                outline="black",
            )
        else:
            getattr(draw, shape)(
                [box[0], other[0], box[1] + 1, other[1] + 1], fill=_colour(rng), outline="black", width=3
            )
    return image


def texture(rng: random.Random) -> Image.Image:
    generator = np.random.default_rng(rng.randrange(2**32))
    size = rng.choice([8, 16, 32, 64])
    noise = generator.random((size, size, 3))
    kind = rng.choice(["noise", "stripes", "checks"])
    if kind == "stripes":
        noise = np.tile(np.linspace(0, 1, size)[None, :, None] * generator.random(3), (size, 1, 1))
    elif kind == "checks":
        noise = (np.indices((size, size)).sum(0) % 2)[:, :, None] * generator.random(3) + 0.1
    image = Image.fromarray((np.clip(noise, 0, 1) * 255).astype(np.uint8)).resize((320, 320), Image.Resampling.BICUBIC)
    return image.filter(ImageFilter.GaussianBlur(rng.choice([0, 1, 3])))


def screenshot(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (640, 400), (236, 236, 236))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, 640, 28], fill=(60, 60, 70))
    draw.text((10, 8), " ".join(rng.choice(WORDS) for _ in range(3)).title(), fill="white")
    y = 44
    for _ in range(rng.randrange(4, 9)):
        kind = rng.choice(["button", "field", "text"])
        if kind == "button":
            draw.rounded_rectangle([20, y, 160, y + 28], 6, fill=_colour(rng))
            draw.text((30, y + 8), rng.choice(WORDS).title(), fill="white")
        elif kind == "field":
            draw.rectangle([20, y, 400, y + 26], fill="white", outline=(150, 150, 150))
            draw.text((26, y + 7), rng.choice(WORDS), fill=(120, 120, 120))
        else:
            draw.text((20, y + 6), " ".join(rng.choice(WORDS) for _ in range(8)), fill="black")
        y += 40
    draw.rectangle([440, 44, 620, 380], fill="white", outline=(180, 180, 180))
    return image


def build(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    count = sample_photos(out)
    for kind in (chart, document, drawing, texture, screenshot):
        rng = random.Random(kind.__name__)
        for index in range(PER_KIND):
            kind(rng).save(out / f"{kind.__name__}-{index:02d}.png")
            count += 1
    return count


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/ood_images.py OUT_DIR")
    print(f"{build(Path(sys.argv[1]))} images in {sys.argv[1]}")
