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
whatever this run writes, so an interrupted run over a folder continues where it stopped. Every place a caption
will be written is checked before captioning starts: what cannot be written (a read-only folder, two photos whose
sidecars would share a name, a different file in --output-dir) is reported and skipped, and the rest goes on. File
names that are not valid UTF-8 are printed with \\xNN escapes for their undecodable bytes.
"""

import argparse
import csv
import dataclasses
import glob
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from captioner import Caption, Captioner
from checkpoint import CheckpointError
from cli import add_arguments, add_model_arguments, captioner_from_args, given_arguments
from config import DecodeConfig
from embed import EMBEDDABLE_SUFFIXES, MetadataError, embed_description, read_description
from files import UnsafeTargetError, atomic_write, write_target
from images import IMAGE_SUFFIXES, ImageError, load_each
from labels import Label

FORMATS = ("text", "jsonl", "csv", "parquet")  # parquet: --engine ray's shards only


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
    unique = {}  # one path per file, however it was spelled ("a.jpg", "./a.jpg"), the first spelling kept
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    for path in unique.values():
        suffix = Path(path).suffix.lower()
        (not_images if suffix and suffix not in IMAGE_SUFFIXES else images).append(path)
    return images, missing, not_images


CAPTION_COLUMNS = ("image", "caption", "confidence", "familiarity", "unfamiliar", "neighbours", "labels")
LABEL_COLUMNS = ("image", "labels")
KEYWORD_PROBABILITY = 0.1  # --keywords: the labels at least this probable (an unsure recogniser adds none)


def caption_row(image: str, text: str, caption: Caption) -> dict:
    """One image's JSONL record: its caption with the confidence, the familiarity (None where the model has no bank),
    a retrieval model's neighbours (the datastore photos whose captions it read, with their similarity) and the
    photo's ImageNet labels (empty where the model file has no recogniser)."""
    familiarity = None if caption.familiarity is None else round(caption.familiarity, 4)
    neighbours = [{"path": display(n.name), "similarity": n.similarity} for n in caption.neighbours]
    row = {"image": image, "caption": text, "confidence": round(caption.confidence, 4)}
    row |= {"familiarity": familiarity, "unfamiliar": caption.unfamiliar, "neighbours": neighbours}
    return row | label_row(image, caption.labels)


def label_row(image: str, labels: Sequence[Label]) -> dict:
    """`--labels-only`'s record: the image and its ImageNet labels, most probable first."""
    return {"image": image, "labels": [{"label": label.name, "probability": label.probability} for label in labels]}


def keywords(labels: Sequence[dict]) -> list[str]:
    """The names of a row's `labels` (`label_row`) that are at least KEYWORD_PROBABILITY probable (--keywords)."""
    return [label["label"] for label in labels if label["probability"] >= KEYWORD_PROBABILITY]


def labels_problem(captioner: Captioner, arguments: argparse.Namespace) -> str | None:
    """Why the flags asking for labels cannot be honoured by this model, if they cannot."""
    if (arguments.labels_only or arguments.keywords) and captioner.recogniser is None:
        return f"{arguments.model or 'the model'} has no ImageNet recogniser for labels (hub.py release --labels)"
    return None


def _lines(rows: Iterator[dict], output_format: str, columns: Sequence[str]) -> Iterator[str]:
    """Output lines: jsonl is each row; csv has `columns`; text is the image and its caption (or its labels)."""
    if output_format == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerow(columns)
        yield buffer.getvalue()
    for row in rows:
        if output_format == "jsonl":
            yield json.dumps(row) + "\n"
        elif output_format == "csv":
            buffer = io.StringIO()
            csv.writer(buffer).writerow([_cell(name, row[name]) for name in columns])
            yield buffer.getvalue()
        else:
            yield f"{row['image']}\t{row['caption'] if 'caption' in row else _cell('labels', row['labels'])}\n"


def _cell(name: str, value: object) -> str:
    """A CSV cell (or the text format's labels): numbers at 4 places, lists as "name (probability); ..."."""
    if name == "neighbours":
        return "; ".join(f"{n['path']} ({n['similarity']:.3f})" for n in value)
    if name == "labels":
        return "; ".join(f"{label['label']} ({label['probability']:.2f})" for label in value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Plan:
    """The images to caption, and where each one's caption is written besides the output."""

    images: list[str]
    sidecars: dict[str, Path]  # image -> its .txt caption file
    destinations: dict[str, Path]  # image -> the file its embedded caption goes into (itself, or a copy)


def sidecar_path(image: str) -> Path:
    return Path(image).with_suffix(".txt")


def plan_outputs(paths: list[str], arguments: argparse.Namespace, failures: list[str]) -> Plan:
    """Where each image's caption goes, checked before any captioning: an image whose caption could not be written
    (a clash with another image's, a folder that cannot be written, a hard-linked file, a different file in the way)
    is added to `failures` and left out, as is one that already has a caption (unless --overwrite)."""
    sidecars = {path: sidecar_path(path) for path in paths} if arguments.sidecar else {}
    output_dir = arguments.output_dir
    destinations = {path: output_dir / Path(path).name if output_dir else Path(path) for path in paths}
    destinations = destinations if arguments.embed else {}
    targets = [*sidecars.items(), *destinations.items()]
    problems = _clashes(sidecars) | _clashes(destinations) | _unwritable_targets(targets)
    images, captioned = [], 0
    for path in paths:
        if path in problems:
            failures.append(problems[path])
            continue
        try:
            if not arguments.overwrite and _has_caption(path, arguments, destinations.get(path)):
                captioned += 1
                continue
        except MetadataError as error:
            failures.append(display(str(error)))
            continue
        destination = destinations.get(path)
        if destination and destination.exists() and not destination.samefile(path) and not arguments.overwrite:
            failures.append(f"{display(path)}: {display(destination)} is a different file; --overwrite replaces it")
            continue
        images.append(path)
    if captioned:
        sidecar_kind, embedded_kind = _caption_places(arguments)
        where = " or ".join(place for place, chosen in ((".txt", sidecar_kind), ("embedded", embedded_kind)) if chosen)
        advice = "" if arguments.skip_existing else " (--overwrite to redo)"
        print(f"skipping {captioned} image(s) that already have a {where} caption{advice}", file=sys.stderr)
    chosen = set(images)
    return Plan(
        images,
        {path: target for path, target in sidecars.items() if path in chosen},
        {path: target for path, target in destinations.items() if path in chosen},
    )


def _caption_places(arguments: argparse.Namespace) -> tuple[bool, bool]:
    """Whether existing sidecars and embedded captions count: where this run writes, or everywhere with
    --skip-existing."""
    return arguments.sidecar or arguments.skip_existing, arguments.embed or arguments.skip_existing


def _has_caption(path: str, arguments: argparse.Namespace, destination: Path | None) -> bool:
    """Whether `path` already has a caption where this run would write one (or anywhere, with --skip-existing), in
    any field that embed.py reads. An empty sidecar is no caption."""
    sidecars, embedded = _caption_places(arguments)
    sidecar = sidecar_path(path)
    if sidecars and sidecar.is_file() and sidecar.read_text(errors="replace").strip():
        return True
    if not embedded or Path(path).suffix.lower() not in EMBEDDABLE_SUFFIXES:
        return False
    return bool(read_description(path)) or bool(destination and destination.exists() and read_description(destination))


def _clashes(targets: dict[str, Path]) -> dict[str, str]:
    """For each image whose target file another image would also write, why it is left out (naming both)."""
    by_target: dict[str, list[str]] = {}
    for image, target in targets.items():
        by_target.setdefault(os.path.realpath(target), []).append(image)
    problems = {}
    for target, images in by_target.items():
        for image in images if len(images) > 1 else ():
            others = ", ".join(display(other) for other in images if other != image)
            problems[image] = f"{display(image)}: {others} would write the same {display(target)}; rename one of them"
    return problems


def _unwritable_targets(targets: list[tuple[str, Path]]) -> dict[str, str]:
    """For each image whose target cannot be written (its folder, or a hard-linked file), why."""
    problems: dict[str, str] = {}
    folders: dict[Path, str | None] = {}
    for image, target in targets:
        try:
            real = Path(write_target(target))  # follows a symbolic link; refuses a hard-linked file
        except UnsafeTargetError as error:
            problems.setdefault(image, f"{display(str(error))}; caption a copy instead")
            continue
        if real.parent not in folders:
            folders[real.parent] = unwritable(real.parent)
        if folders[real.parent]:
            problems.setdefault(image, f"{display(image)}: {folders[real.parent]}")
    return problems


def unwritable(folder: Path) -> str | None:
    """Why no file can be written in `folder` (or, where it does not exist yet, in the nearest folder above it that
    does), or None. Tried by creating a file: the one test that holds for permissions, read-only file systems and
    immutable folders alike, for every user."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{display(existing)} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".caption-probe-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        return f"cannot write in the folder {display(existing)} ({error.strerror or error})"
    return None


def display(text: str | os.PathLike) -> str:
    """A path or message as printable text: bytes of a file name that are not UTF-8 are written as \\xNN escapes."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.engine == "local":  # --engine ray chooses by the hardware it finds (scale.py)
        arguments.output_format = arguments.output_format or "text"
        arguments.batch_size = arguments.batch_size or 8
    arguments.output_format = arguments.output_format or "jsonl"
    if problem := _argument_problem(arguments):
        parser.error(problem)
    options = given_arguments(DecodeConfig, arguments)
    try:
        DecodeConfig(**options)  # bad flags fail before the model loads
    except ValueError as error:
        parser.error(str(error))
    if arguments.engine == "ray":
        from scale import caption_on_ray

        return caption_on_ray(arguments, options)
    paths, missing, not_images = expand_paths(arguments.paths)
    failures = [f"{display(argument)}: no such file, folder or matching glob" for argument in missing]
    if not_images:
        print(
            f"skipping {len(not_images)} file(s) that are not images: {', '.join(map(display, not_images))}",
            file=sys.stderr,
        )
    if not paths and not missing:
        print("error: no image files among the given paths", file=sys.stderr)
        return 1
    if fatal := _output_problems(arguments):  # every one at once, before any captioning
        for problem in fatal:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    plan = plan_outputs(paths, arguments, failures)
    try:
        captioner = captioner_from_args(arguments)
        config = captioner.check(dataclasses.replace(captioner.default_config(), **options))
        if problem := labels_problem(captioner, arguments):
            raise ValueError(problem)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    unfamiliar: list[str] = []
    if arguments.labels_only:
        rows, columns = _labelled(captioner, plan, arguments, failures), LABEL_COLUMNS
    else:
        rows, columns = _captioned(captioner, config, plan, arguments, failures, unfamiliar), CAPTION_COLUMNS
    if not _written(_lines(rows, arguments.output_format, columns), arguments.output):
        return 2
    report(unfamiliar, failures)
    return 1 if failures else 0


def _written(lines: Iterator[str], output: Path | None) -> bool:
    """Write the output lines to `output` (atomically, once every row is made) or to stdout as they come; whether
    that went through (a one-line error says why not)."""
    try:
        if output:
            text = "".join(lines)  # every row, whatever failed on the way
            atomic_write(output, lambda temporary: Path(temporary).write_text(text))
        else:
            for line in lines:
                sys.stdout.write(line)
                sys.stdout.flush()
    except ValueError as error:  # decoding options the model cannot honour (e.g. too many tokens)
        print(f"error: {error}", file=sys.stderr)
        return False
    except OSError as error:
        print(f"error: cannot write {display(output)} ({error.strerror or error})", file=sys.stderr)
        return False
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", help="image files, folders or glob patterns")
    add_model_arguments(parser)
    parser.add_argument(
        "--format", choices=FORMATS, default=None, dest="output_format", help="(default: text; jsonl with --engine ray)"
    )
    parser.add_argument("--output", type=Path, help="write to this file instead of standard output")
    parser.add_argument("--sidecar", action="store_true", help="write <image>.txt beside each image")
    parser.add_argument(
        "--embed", action="store_true", help="write the caption into each image's metadata (JPEG, PNG, WebP)"
    )
    parser.add_argument("--output-dir", type=Path, help="with --embed: write captioned copies here, not in place")
    parser.add_argument("--prepend", default="", help="text put before every caption (joined by a space)")
    parser.add_argument("--append", default="", help="text put after every caption (joined by a space)")
    parser.add_argument(
        "--labels-only", action="store_true", help="the photos' ImageNet labels alone, without captions (fast tagging)"
    )
    parser.add_argument(
        "--keywords", action="store_true",
        help=f"with --sidecar/--embed: also the labels at least {KEYWORD_PROBABILITY:.0%} probable, as keywords",
    )  # fmt: skip
    parser.add_argument(
        "--skip-existing", action="store_true", help="leave out images that already have a sidecar or embedded caption"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output, sidecar files or embedded captions"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="photos captioned at once (default: 8; with --engine ray 16, 64 on GPUs)",
    )
    scale = parser.add_argument_group("data sets at scale (Ray Data: pip install -r requirements-scale.txt)")
    scale.add_argument(
        "--engine", choices=("local", "ray"), default="local",
        help="ray: caption on Ray Data, into resumable shards under --output DIR (paths may be s3:// or gs:// URIs)",
    )  # fmt: skip
    scale.add_argument("--ray-address", default=None, help="a running Ray cluster (default: start a local one)")
    scale.add_argument("--actors", type=int, default=1, help="captioning actors, each holding one model")
    scale.add_argument("--cpus-per-actor", type=int, default=0, help="(default: the cluster's CPUs / --actors)")
    scale.add_argument("--gpus-per-actor", type=float, default=None, help="(default: 1 where the cluster has GPUs)")
    scale.add_argument("--shard-rows", type=int, default=1000, help="rows per output shard")
    add_arguments(parser, DecodeConfig, only_given=True)  # the model's recommended decoding fills the rest
    return parser


def _argument_problem(arguments: argparse.Namespace) -> str | None:
    """What is wrong with the flags themselves, if anything."""
    if arguments.output and arguments.output.exists() and not arguments.overwrite and not arguments.output.is_dir():
        return f"{display(arguments.output)} exists; pass --overwrite to replace it"
    for flag in ("batch_size", "actors", "shard_rows"):
        if getattr(arguments, flag) is not None and getattr(arguments, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1"
    if arguments.engine == "local" and arguments.output_format == "parquet":
        return "--format parquet is for --engine ray's shards; one process writes text, jsonl or csv"
    if arguments.output_dir and not arguments.embed:
        return "--output-dir is for --embed (captioned copies of the images)"
    if arguments.labels_only and (arguments.sidecar or arguments.embed or arguments.keywords):
        return "--labels-only writes labels to the output; to write them into files, caption with --keywords"
    if arguments.keywords and not (arguments.sidecar or arguments.embed):
        return "--keywords adds labels to --sidecar files or --embed metadata: give one of them"
    if arguments.overwrite and arguments.skip_existing:
        return "--overwrite and --skip-existing contradict each other: choose one"
    for flag in ("prepend", "append"):
        if not getattr(arguments, flag).isprintable():
            return f"--{flag} must be one line of printable text (a caption is one line)"
    return None


def _output_problems(arguments: argparse.Namespace) -> list[str]:
    """What would stop the whole run's output from being written: checked before any captioning starts."""
    problems = []
    if arguments.output:
        if arguments.output.is_dir():
            problems.append(f"--output {display(arguments.output)} is a folder; name a file")
        elif reason := unwritable(arguments.output.parent):
            problems.append(f"--output {display(arguments.output)}: {reason}")
    if arguments.output_dir:
        if arguments.output_dir.exists() and not arguments.output_dir.is_dir():
            problems.append(f"--output-dir {display(arguments.output_dir)} is a file; name a folder")
        elif reason := unwritable(arguments.output_dir):
            problems.append(f"--output-dir {display(arguments.output_dir)}: {reason}")
    return problems


def _captioned(
    captioner: Captioner,
    config: DecodeConfig,
    plan: Plan,
    arguments: argparse.Namespace,
    failures: list[str],
    unfamiliar: list[str],
) -> Iterator[dict]:
    """`caption_row` for each image that was captioned and written everywhere asked; what failed is added to
    `failures` and never stops the run."""
    paths = plan.images
    progress = tqdm(total=len(paths), unit="img", desc="captioning", file=sys.stderr, disable=not paths)
    for path, result in zip(paths, captioner.caption_each(paths, config, batch_size=arguments.batch_size), strict=True):
        progress.update(1)
        if isinstance(result, ImageError):
            failures.append(display(str(result)))
            continue
        text = with_affixes(result.text, arguments)
        row = caption_row(display(path), text, result)
        if failure := write_caption(path, text, plan, keywords(row["labels"]) if arguments.keywords else ()):
            failures.append(failure)
            continue
        if result.unfamiliar:
            unfamiliar.append(display(path))
        yield row
    progress.close()


def _labelled(captioner: Captioner, plan: Plan, arguments: argparse.Namespace, failures: list[str]) -> Iterator[dict]:
    """`label_row` for each readable image (`--labels-only`); what cannot be read is added to `failures`."""
    paths = plan.images
    for start in tqdm(range(0, len(paths), arguments.batch_size), unit="batch", desc="labelling", file=sys.stderr):
        batch = paths[start : start + arguments.batch_size]
        loaded = load_each(batch)
        readable = [
            (path, picture) for path, picture in zip(batch, loaded, strict=True) if not isinstance(picture, ImageError)
        ]
        failures += [display(str(picture)) for picture in loaded if isinstance(picture, ImageError)]
        if readable:
            found = captioner.labels([picture for _, picture in readable])
            yield from (label_row(display(path), labels) for (path, _), labels in zip(readable, found, strict=True))


def with_affixes(text: str, arguments: argparse.Namespace) -> str:
    """The caption with --prepend and --append around it."""
    return " ".join(part for part in (arguments.prepend.strip(), text, arguments.append.strip()) if part)


def write_caption(path: str, text: str, plan: Plan, keywords: Sequence[str] = ()) -> str | None:
    """Write `path`'s caption where the plan says (its sidecar, into the image), with `keywords` (after the caption
    in a sidecar, as dataset-tagging tools write them; as XMP dc:subject and IPTC Keywords in the image); why it
    could not, or None."""
    line = ", ".join([text, *keywords])
    try:
        if path in plan.sidecars:
            atomic_write(plan.sidecars[path], lambda temporary: Path(temporary).write_text(line + "\n"))
        if path in plan.destinations:
            embed_description(path, text, plan.destinations[path], keywords)
    except MetadataError as error:
        return display(str(error))
    except OSError as error:
        return f"{display(path)}: cannot write its caption ({error.strerror or error})"
    return None


def report(unfamiliar: list[str], failures: list[str]) -> None:
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


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="backslashreplace")  # a caption never stops at a terminal that cannot show it
    sys.exit(main())
