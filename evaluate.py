"""Score a model on a data split: caption every image, then BLEU-1..4, METEOR, ROUGE-L and CIDEr (metrics.py).

python evaluate.py --model captioner.pt --data DATA --split test [--num-beams 5 ...]    # score (the default)
python evaluate.py sweep --data DATA --split val num_beams=3,5 length_penalty=1,2       # choose the decoding
python evaluate.py precision --model FILE --data DATA --split test [--record]          # the faster precisions
python evaluate.py familiarity --data DATA --split test OOD_DIR                         # the unfamiliar-photo flag
"""

import argparse
import dataclasses
import itertools
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from captioner import DEFAULT_MODEL, Captioner
from checkpoint import CheckpointError
from cli import add_arguments, add_model_arguments, captioner_from_args, given_arguments, with_default_command
from config import DecodeConfig
from data import DataError, load_split
from familiarity import auroc
from images import IMAGE_SUFFIXES, ImageError, load_each
from metrics import JavaMissingError, distinct_ratio, format_metrics, require_java, score_captions
from precision import (
    DTYPES,
    INT8_ENCODER,
    OPENVINO_SETTINGS,
    QUANTIZED,
    native_half,
    qualifying_precisions,
    runs_natively,
    split_setting,
)
from release import record


def encode_split(captioner: Captioner, items: list, batch_size: int) -> tuple[list, dict[str, list[str]]]:
    """Each readable image's encoding, in batches of (names, EncodedImages), and its references by name."""
    encoded, references, skipped = [], {}, []
    for start in tqdm(range(0, len(items), batch_size), desc="encoding", unit="batch"):
        pictures, keys = [], []
        batch = items[start : start + batch_size]
        for item, picture in zip(batch, load_each([item.image for item in batch]), strict=True):
            if isinstance(picture, ImageError):
                skipped.append(str(picture))
                continue
            pictures.append(picture)
            keys.append(item.image.name)
            references[item.image.name] = list(item.captions)
        if pictures:
            encoded.append((keys, captioner.encode(pictures, labels=False)))
    if skipped:
        print(f"warning: {len(skipped)} unreadable image(s) skipped, e.g. {skipped[0]}", file=sys.stderr)
    return encoded, references


def caption_encoded(captioner: Captioner, encoded: list, config: DecodeConfig) -> dict[str, str]:
    """Every image's caption, decoding encodings made once by `encode_split`."""
    return {
        key: caption.text
        for keys, tokens in tqdm(encoded, desc="captioning", unit="batch", leave=False)
        for key, caption in zip(keys, captioner.caption(tokens, config), strict=True)
    }


def choose_precision(
    arguments: argparse.Namespace, items: list, float32: Captioner, config: DecodeConfig, captions: dict,
    references: dict, argv: Sequence[str],
) -> int:  # fmt: skip
    """Score the model in PyTorch's float32 and in each faster setting this machine computes natively (its half
    precision; on a CPU int8, bfloat16 with int8 decoder weights where bfloat16 is native, and where OpenVINO is
    installed its float32, bfloat16 and, if the file has an int8 encoder, int8-encoder); record in the model file
    those no more than PRECISION_TOLERANCE below float32 (`qualifying_precisions`), fastest first, so that `--dtype
    auto --runtime auto` runs the fastest of them that a user's machine supports; float32's scores are recorded as
    the model's."""
    scores = {"float32": score_captions(references, captions)}
    half = native_half(float32.device)
    candidates = [name for name, dtype in DTYPES.items() if dtype == half] + [
        name
        for name in (*QUANTIZED, *OPENVINO_SETTINGS)
        if runs_natively(name, float32.device) and (split_setting(name)[1] != INT8_ENCODER or float32.info.int8_encoder)
    ]
    for name in candidates:
        runtime, precision = split_setting(name)
        captioner = Captioner.load(
            arguments.model, device=float32.device, revision=arguments.revision, dtype=precision, runtime=runtime
        )
        encoded, _ = encode_split(captioner, items, arguments.batch_size)
        scores[name] = score_captions(references, caption_encoded(captioner, encoded, config))
    for name, values in scores.items():
        print(f"{name}: {format_metrics(values)}")
    accepted = qualifying_precisions(scores)
    verb = "recorded" if arguments.record else "qualifying (--record writes it into the model file)"
    print(f"{verb} precision: {accepted[0]} (at most 0.01 below float32, fastest first: {', '.join(accepted)})")
    if not arguments.record:
        return 0
    record(
        arguments.model or DEFAULT_MODEL,
        {
            "precision": accepted[0],
            "precisions": accepted,
            "precision_scores": {
                name: {metric: round(value, 4) for metric, value in values.items()} for name, values in scores.items()
            },
            "precision_split": arguments.split,
            # float32's scores are the model's scores (docs/model-card.md), as plain scoring records them
            "metrics": {name: round(value, 4) for name, value in scores["float32"].items()},
            "metrics_split": arguments.split,
            "metrics_images": len(captions),
            "distinct_captions": round(distinct_ratio(list(captions.values())), 4),
            "metrics_command": "python evaluate.py " + " ".join(argv),
        },
    )
    return 0


EXAMPLES = Path(__file__).resolve().parent / "examples"
OUT_OF_DOMAIN_EXAMPLES = ("cat.jpg", "coffee.jpg", "rocket.jpg")


def familiarity_report(
    captioner: Captioner, encoded: list, config: DecodeConfig, ood: Path, split: str, batch_size: int
) -> int:
    """How well the model's unfamiliar-photo flag separates the split's photos from an out-of-domain set
    (scripts/ood_images.py), against caption confidence alone."""
    if captioner.familiarity is None:
        print("error: this model file cannot tell familiarity (make it with hub.py release --data)", file=sys.stderr)
        return 2
    paths = sorted(path for path in ood.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    examples = [EXAMPLES / name for name in OUT_OF_DOMAIN_EXAMPLES]
    outside = list(captioner.caption_each(paths, config, batch_size=batch_size))
    inside = [caption for _, tokens in encoded for caption in captioner.caption(tokens, config)]
    flagged_examples = [caption.unfamiliar for caption in captioner.caption(examples, config)]
    outside = [caption for caption in outside if not isinstance(caption, ImageError)]

    def column(captions: list, name: str):
        return torch.tensor([getattr(caption, name) for caption in captions], dtype=torch.float64)

    def share(captions: list) -> str:
        flagged = sum(caption.unfamiliar for caption in captions)
        return f"{flagged} of {len(captions)} ({flagged / len(captions):.1%})"

    print(f"flagged: familiarity below {captioner.familiarity.flagged_share} (that share of the val photos)")
    print(f"flagged as unfamiliar: {split} {share(inside)}, out-of-domain {share(outside)}")
    for name in ("familiarity", "confidence"):
        print(f"AUROC {split} vs out-of-domain, {name}: {auroc(column(inside, name), column(outside, name)):.4f}")
    print(
        "examples flagged: "
        + ", ".join(
            f"{n} {'yes' if f else 'NO'}" for n, f in zip(OUT_OF_DOMAIN_EXAMPLES, flagged_examples, strict=True)
        )
    )
    return 0


def _sweep_values(text: str) -> tuple[str, list]:
    name, _, values = text.partition("=")
    kinds = {item.name: item.type for item in dataclasses.fields(DecodeConfig)}
    if name not in kinds or not values:
        raise argparse.ArgumentTypeError(f"expected FIELD=V1,V2 with a decoding field, got {text!r}")
    kind = int if kinds[name] in (int, int | None) else float if kinds[name] is float else str
    try:
        return name, [kind(value) for value in values.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from error


COMMANDS = ("score", "sweep", "precision", "familiarity")


def main(argv: Sequence[str] | None = None) -> int:
    argv = with_default_command(argv, COMMANDS, "score")
    arguments = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        require_java()
        options = given_arguments(DecodeConfig, arguments)
        DecodeConfig(**options)  # bad flags fail before the model loads
        items = load_split(arguments.data, arguments.split)
        if arguments.limit:
            items = items[: arguments.limit]
        if arguments.command == "precision":
            arguments.dtype, arguments.runtime = "float32", "torch"  # the baseline the faster settings are held to
        captioner = captioner_from_args(arguments)
        config = captioner.check(dataclasses.replace(captioner.default_config(), **options))
    except (JavaMissingError, ValueError, CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    encoded, references = encode_split(captioner, items, arguments.batch_size)
    if not references:
        print(
            f"error: {arguments.data}: none of the {len(items)} '{arguments.split}' images could be read",
            file=sys.stderr,
        )
        return 2
    if arguments.command == "precision":
        captions = caption_encoded(captioner, encoded, config)
        return choose_precision(arguments, items, captioner, config, captions, references, argv)
    if arguments.command == "familiarity":
        return familiarity_report(captioner, encoded, config, arguments.ood, arguments.split, arguments.batch_size)
    if arguments.command == "sweep":
        return sweep(captioner, encoded, config, references, arguments.values)
    return score(captioner, encoded, config, references, arguments, argv)


def sweep(
    captioner: Captioner, encoded: list, config: DecodeConfig, references: dict, fields: list[tuple[str, list]]
) -> int:
    """Score every combination of the swept decoding values, printing a line each."""
    for values in itertools.product(*(values for _, values in fields)):
        setting = dict(zip((name for name, _ in fields), values, strict=True))
        texts = caption_encoded(captioner, encoded, captioner.check(dataclasses.replace(config, **setting)))
        scores = score_captions(references, texts)
        label = " ".join(f"{name}={value}" for name, value in setting.items())
        print(f"{label}: {format_metrics(scores)}  distinct {distinct_ratio(list(texts.values())):.0%}", flush=True)
    return 0


def score(
    captioner: Captioner, encoded: list, config: DecodeConfig, references: dict, arguments: argparse.Namespace,
    argv: Sequence[str],
) -> int:  # fmt: skip
    """Caption and score the split; with --record write the scores into the model file, with --output the captions
    into a JSONL file."""
    candidates = caption_encoded(captioner, encoded, config)
    scores = score_captions(references, candidates)
    print(
        f"{arguments.split}: {len(candidates)} images, {captioner.precision} in {captioner.runtime}, in batches of "
        f"{arguments.batch_size}, decoding {config}"
    )
    print(format_metrics(scores))
    texts = list(candidates.values())
    print(f"distinct captions: {len(set(texts))} of {len(texts)} ({distinct_ratio(texts):.0%})")
    if arguments.record:
        record(
            arguments.model or DEFAULT_MODEL,
            {
                "metrics": {name: round(value, 4) for name, value in scores.items()},
                "metrics_split": arguments.split,
                "metrics_images": len(texts),
                "distinct_captions": round(distinct_ratio(texts), 4),
                "metrics_command": "python evaluate.py " + " ".join(argv),
            },
        )
    if arguments.output:
        with open(arguments.output, "w", encoding="utf-8") as file:
            for key, text in candidates.items():
                file.write(json.dumps({"image": key, "caption": text, "references": references[key]}) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False, formatter_class=argparse.RawTextHelpFormatter)
    add_model_arguments(shared)
    shared.add_argument("--data", required=True, help="data set (see data.py for the layouts)")
    shared.add_argument("--split", default="test")
    shared.add_argument("--batch-size", type=int, default=16)
    shared.add_argument("--limit", type=int, default=0, help="score only the first N images (0: all)")
    add_arguments(shared, DecodeConfig, only_given=True)  # the model's recommended decoding fills the rest
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[shared], formatter_class=argparse.RawTextHelpFormatter)

    scoring = command("score", "caption the split and score it (the default)")
    scoring.add_argument("--output", type=Path, help="write each image's caption to this JSONL file")
    scoring.add_argument("--record", action="store_true", help="write the scores into the model file's record")
    sweeping = command("sweep", "score every combination of decoding values, encoding the images once")
    sweeping.add_argument(
        "values", nargs="+", type=_sweep_values, metavar="FIELD=V1,V2",
        help="e.g. num_beams=3,5 length_penalty=1,2: to choose the default decoding on the val split",
    )  # fmt: skip
    precisions = command(
        "precision",
        "score float32, this machine's native half precision and int8; print those whose CIDEr and BLEU-4\n"
        "are at most 0.01 below float32's, fastest first",
    )
    precisions.add_argument(
        "--record", action="store_true", help="write them into the model file: what --dtype auto then uses"
    )
    familiar = command("familiarity", "the unfamiliar-photo flag on the split against out-of-domain images")
    familiar.add_argument(
        "ood", type=Path, metavar="DIR",
        help="out-of-domain images (scripts/ood_images.py): shares flagged and AUROCs, against confidence alone",
    )  # fmt: skip
    return parser


if __name__ == "__main__":
    sys.exit(main())
