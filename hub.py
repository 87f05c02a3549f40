"""Sharing a model: the command line of release.py's release files, and the Hugging Face Hub.

    python hub.py release runs/small/best.pt captioner.pt --decoding '{"num_beams": 3}'
    python hub.py release runs/wide/epoch-11.pt runs/wide/epoch-12.pt averaged.pt    # the mean of the weights
    python hub.py release captioner.pt faster.pt --image-size 168   # smaller photos: check its val scores first
    python hub.py quantize captioner.pt --data DATA               # its encoder in int8 for OpenVINO (needs NNCF)
    python hub.py card captioner.pt > docs/model-card.md          # the model card its record renders
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

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from checkpoint import HUB_FILENAME, CheckpointError, load_model_file
from config import ModelConfig
from data import DataError
from distill import TeacherMissingError
from release import CALIBRATION_PHOTOS, FLICKR8K_TERMS, ModelInfo, add_int8_encoder, release

ROOT = Path(__file__).resolve().parent
# What a Space runs: the code (every top-level module), what to install, the README whose front matter configures
# the Space, and the example photos; the model is added as captioner.pt. Tests, training runs and the .git folder
# stay behind.
SPACE_FILES = ("*.py", "requirements.txt", "README.md", "examples/*")


METRIC_TYPES = {"BLEU-1": "bleu", "BLEU-4": "bleu", "METEOR": "meteor", "ROUGE-L": "rouge", "CIDEr": "cider"}
WEIGHTS_LICENSE = {"license": "other", "license_name": "flickr8k-research-only", "license_link": FLICKR8K_TERMS}


def model_card(info: ModelInfo, config: ModelConfig, repo_id: str) -> str:
    """README.md for the Hub repository: a Hugging Face model card whose front matter (`huggingface_hub.ModelCardData`)
    carries the licence, data set, task and the recorded scores as `eval_results`, and whose body is `info.render`."""
    metrics = {name: value for name, value in (info.metrics or {}).items() if isinstance(value, float)}
    results = [
        EvalResult(
            task_type="image-to-text",
            dataset_type="flickr8k",
            dataset_name="Flickr8k",
            dataset_split=info.metrics_split or "test",
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
        model_name=repo_id.split("/")[-1], eval_results=results or None, **WEIGHTS_LICENSE,
    )  # fmt: skip
    body = info.render(repo_id.split("/")[-1], config, f'Captioner.load("{repo_id}")')
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def push(model_path: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Upload the model file and a generated model card; returns the repository URL."""
    from huggingface_hub import HfApi

    model, _, metadata = load_model_file(model_path)  # refuse to publish a file that does not load
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        card = Path(directory, "README.md")
        card.write_text(model_card(ModelInfo.from_dict(metadata), model.config, repo_id), encoding="utf-8")
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


def _parser() -> argparse.ArgumentParser:
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
    make.add_argument("--recipe", nargs="*", default=None, help="the commands that made it, recorded for its card")
    make.add_argument("--base-weights", default=None, help="the pretrained parts it started from, for its card")
    quantize = commands.add_parser(
        "quantize", help="add the encoder quantized to int8 for OpenVINO (needs NNCF), calibrated on training photos"
    )
    quantize.add_argument("model")
    quantize.add_argument("--data", required=True, help="the training data set: its photos calibrate the int8 ranges")
    quantize.add_argument("--photos", type=int, default=CALIBRATION_PHOTOS, help="calibration photos (%(default)s)")
    card = commands.add_parser("card", help="print the model card a model file's record renders")
    card.add_argument("model")
    card.add_argument("--repo-id", default=HUB_FILENAME, help="the name it is loaded by (default: %(default)s)")
    upload = commands.add_parser("push", help="upload a model file and a model card to the Hugging Face Hub")
    upload.add_argument("model")
    upload.add_argument("repo_id")
    upload.add_argument("--private", action="store_true")
    upload.add_argument("--revision", default=None, help="branch to push to (default: main)")
    space = commands.add_parser("deploy-space", help="deploy the app and a model as a Gradio Space on the Hub")
    space.add_argument("repo_id", help="USER/SPACE")
    space.add_argument("--model", default=None, help=f"the model file to serve (default: this folder's {HUB_FILENAME})")
    space.add_argument("--private", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        if arguments.command == "release":
            extra = dict(arguments.metadata or {})
            given = {"decoding": arguments.decoding, "recipe": arguments.recipe, "base_weights": arguments.base_weights}
            extra |= {name: value for name, value in given.items() if value is not None}
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
        elif arguments.command == "quantize":
            encoder = add_int8_encoder(arguments.model, arguments.data, arguments.photos)
            print(
                f"{arguments.model}: int8 encoder added ({encoder['weights'].numel() / 2**20:.1f} MiB, calibrated on "
                f"{encoder['calibration_photos']} photos); score it with python evaluate.py precision --model "
                f"{arguments.model} --data {arguments.data} --record"
            )
        elif arguments.command == "card":
            model, _, metadata = load_model_file(arguments.model)
            print(model_card(ModelInfo.from_dict(metadata), model.config, arguments.repo_id), end="")
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
