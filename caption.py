"""Caption images from the command line: files, folders (recursively) and globs, with the model loaded once.

    python caption.py examples/*
    python caption.py --format jsonl --num-beams 5 photos/ > captions.jsonl
    python caption.py --sidecar dataset/          # writes dataset/.../<image>.txt beside each image
    python caption.py --embed photos/             # writes each caption into its photo's EXIF and XMP description
    python caption.py --sidecar --prepend "photo of sks," dataset/   # a trigger word for fine-tuning data

Files that are not images by their suffix (notes, credits, sidecar .txt files caught by a glob) are skipped with a
note. Images that cannot be read are reported on stderr and skipped; the exit code is then 1. Nothing a user
already has is overwritten without --overwrite (an --output file, existing sidecar .txt files or descriptions in
the images, which are skipped). --skip-existing leaves out every image that already has a caption in either place,
whatever this run writes, so an interrupted run over a folder continues where it stopped.
"""

import argparse
import csv
import dataclasses
import glob
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm import tqdm

from captioner import Caption
from checkpoint import CheckpointError, atomic_write
from cli import add_arguments, add_model_arguments, given_arguments, load_captioner
from config import DecodeConfig
from images import IMAGE_SUFFIXES, ImageError
from metadata import EMBEDDABLE_SUFFIXES, MetadataError, embed_description, read_description

FORMATS = ("text", "jsonl", "csv")


def expand_paths(arguments: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Image paths from files, folders (recursive) and globs; the arguments that matched nothing; and the files
    left out because their suffix is not an image's. A file without a suffix is kept: only reading it can tell."""
    found, missing = [], []
    for argument in arguments:
        if os.path.isdir(argument):
            found += sorted(
                str(path)
                for path in Path(argument).rglob("*")
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
            )
        elif os.path.exists(argument):
            found.append(argument)
        elif glob.has_magic(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            found += [match for match in matches if os.path.isfile(match)]
            if not matches:
                missing.append(argument)
        else:
            missing.append(argument)
    images, not_images = [], []
    for path in dict.fromkeys(found):
        suffix = Path(path).suffix.lower()
        (not_images if suffix and suffix not in IMAGE_SUFFIXES else images).append(path)
    return images, missing, not_images


def _lines(results: Iterator[tuple[str, str, Caption]], output_format: str) -> Iterator[str]:
    """Output lines; jsonl and csv also carry the confidence and familiarity (empty where the model has no bank)."""
    if output_format == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerow(["image", "caption", "confidence", "familiarity", "unfamiliar"])
        yield buffer.getvalue()
    for image, text, caption in results:
        familiarity = None if caption.familiarity is None else round(caption.familiarity, 4)
        if output_format == "jsonl":
            row = {"image": image, "caption": text, "confidence": round(caption.confidence, 4)}
            yield json.dumps(row | {"familiarity": familiarity, "unfamiliar": caption.unfamiliar}) + "\n"
        elif output_format == "csv":
            unfamiliar = "" if caption.unfamiliar is None else str(caption.unfamiliar).lower()
            buffer = io.StringIO()
            known = "" if familiarity is None else f"{familiarity:.4f}"
            csv.writer(buffer).writerow([image, text, f"{caption.confidence:.4f}", known, unfamiliar])
            yield buffer.getvalue()
        else:
            yield f"{image}\t{text}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    add_model_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, default="text", dest="output_format")
    parser.add_argument("--output", type=Path, help="write to this file instead of standard output")
    parser.add_argument("--sidecar", action="store_true", help="write <image>.txt beside each image")
    parser.add_argument(
        "--embed", action="store_true", help="write the caption into each image's metadata (JPEG, PNG, WebP)"
    )
    parser.add_argument("--output-dir", type=Path, help="with --embed: write captioned copies here, not in place")
    parser.add_argument("--prepend", default="", help="text put before every caption (joined by a space)")
    parser.add_argument("--append", default="", help="text put after every caption (joined by a space)")
    parser.add_argument(
        "--skip-existing", action="store_true", help="leave out images that already have a sidecar or embedded caption"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output, sidecar files or embedded captions"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    add_arguments(parser, DecodeConfig, only_given=True)  # the model's recommended decoding fills the rest
    arguments = parser.parse_args(argv)

    if arguments.output and arguments.output.exists() and not arguments.overwrite:
        parser.error(f"{arguments.output} exists; pass --overwrite to replace it")
    if arguments.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    options = given_arguments(DecodeConfig, arguments)
    try:
        DecodeConfig(**options)  # bad flags fail before the model loads
    except ValueError as error:
        parser.error(str(error))
    paths, missing, not_images = expand_paths(arguments.paths)
    failures = [f"{argument}: no such file, folder or matching glob" for argument in missing]
    if not_images:
        print(f"skipping {len(not_images)} file(s) that are not images: {', '.join(not_images)}", file=sys.stderr)
    if not paths and not missing:
        print("error: no image files among the given paths", file=sys.stderr)
        return 1
    if arguments.output_dir and not arguments.embed:
        parser.error("--output-dir is for --embed (captioned copies of the images)")
    if arguments.overwrite and arguments.skip_existing:
        parser.error("--overwrite and --skip-existing contradict each other: choose one")
    destinations = {path: _embed_destination(path, arguments.output_dir) for path in paths} if arguments.embed else {}
    if len(set(destinations.values())) < len(destinations):
        parser.error(
            f"two images share a file name, and --output-dir {arguments.output_dir} is flat: caption them apart"
        )
    if not arguments.overwrite:
        paths = _without_captioned(paths, arguments, destinations, failures)

    def decorated(text: str) -> str:
        return " ".join(part for part in (arguments.prepend.strip(), text, arguments.append.strip()) if part)

    try:
        captioner = load_captioner(arguments)
        config = captioner.check(dataclasses.replace(captioner.default_config(), **options))
    except (CheckpointError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    unfamiliar: list[str] = []

    def results() -> Iterator[tuple[str, str, Caption]]:
        progress = tqdm(total=len(paths), unit="img", desc="captioning", file=sys.stderr, disable=not paths)
        for path, result in zip(
            paths, captioner.caption_each(paths, config, batch_size=arguments.batch_size), strict=True
        ):
            progress.update(1)
            if isinstance(result, ImageError):
                failures.append(str(result))
                continue
            text = decorated(result.text)
            if arguments.sidecar:
                sidecar = Path(path).with_suffix(".txt")
                atomic_write(sidecar, lambda temporary, text=text: Path(temporary).write_text(text + "\n"))
            if arguments.embed:
                try:
                    embed_description(path, text, destinations[path])
                except MetadataError as error:
                    failures.append(str(error))
                    continue
            if result.unfamiliar:
                unfamiliar.append(path)
            yield path, text, result
        progress.close()

    try:
        if arguments.output:
            atomic_write(
                arguments.output,
                lambda temporary: Path(temporary).write_text("".join(_lines(results(), arguments.output_format))),
            )
        else:
            for line in _lines(results(), arguments.output_format):
                sys.stdout.write(line)
                sys.stdout.flush()
    except ValueError as error:  # decoding options the model cannot honour (e.g. too many tokens)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if unfamiliar:
        print(
            f"note: {len(unfamiliar)} photo(s) look unlike the photos the model learned from; their captions are "
            f"probably wrong: {', '.join(unfamiliar[:5])}{' ...' if len(unfamiliar) > 5 else ''}",
            file=sys.stderr,
        )
    for failure in failures:
        print(f"skipped {failure}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} input(s) could not be captioned", file=sys.stderr)
    return 1 if failures else 0


def _embed_destination(path: str, output_dir: Path | None) -> Path:
    return output_dir / Path(path).name if output_dir else Path(path)


def _without_captioned(
    paths: list[str], arguments: argparse.Namespace, destinations: dict[str, Path], failures: list[str]
) -> list[str]:
    """`paths` less the images that already have a caption where this run would write it (or, with
    --skip-existing, anywhere); says on stderr how many were left out. Unreadable metadata is a failure."""
    sidecars = arguments.sidecar or arguments.skip_existing
    embedded = arguments.embed or arguments.skip_existing
    remaining, captioned = [], 0
    for path in paths:
        has_caption = sidecars and Path(path).with_suffix(".txt").exists()
        if not has_caption and embedded and Path(path).suffix.lower() in EMBEDDABLE_SUFFIXES:
            destination = destinations.get(path, Path(path))
            try:
                has_caption = bool(read_description(path)) or (
                    destination.exists() and bool(read_description(destination))
                )
            except MetadataError as error:
                failures.append(str(error))
                continue
        if has_caption:
            captioned += 1
        else:
            remaining.append(path)
    if captioned:
        where = " or ".join(place for place, chosen in ((".txt", sidecars), ("embedded", embedded)) if chosen)
        advice = "" if arguments.skip_existing else " (--overwrite to redo)"
        print(f"skipping {captioned} image(s) that already have a {where} caption{advice}", file=sys.stderr)
    return remaining


if __name__ == "__main__":
    sys.exit(main())
