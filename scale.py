"""Captioning a data set on Ray Data (`caption.py --engine ray`): one laptop, a multi-GPU machine or a cluster.

    python caption.py --engine ray photos/ --output captions/                       # a local Ray, every core
    python caption.py --engine ray s3://bucket/photos/ --output captions/ --actors 8 --gpus-per-actor 1 \\
        --ray-address ray://head:10001                                              # a cluster

Ray Data streams the photos (local files, or `s3://` / `gs://` URIs read through pyarrow) to a pool of captioning
actors, each holding one model. The driver writes their rows as numbered shards under `--output`, each shard written
whole to a temporary name and then renamed, so that a shard is either complete or absent. A job that is stopped and
run again with the same arguments reads the finished shards and captions only the photos they lack; every photo
ends up in exactly one row. A photo that cannot be read becomes a row with its `error`, and the job goes on.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from caption import (
    Plan,
    caption_row,
    display,
    expand_paths,
    keywords,
    labels_problem,
    plan_outputs,
    report,
    with_affixes,
    write_caption,
)
from checkpoint import CheckpointError
from files import atomic_write
from images import IMAGE_SUFFIXES, ImageError, load_image

ROOT = Path(__file__).resolve().parent
INSTALL = "pip install -r requirements-scale.txt"
SHARD_FORMATS = ("jsonl", "parquet")
CPU_BATCH, GPU_BATCH = 16, 64  # photos an actor captions at once, where --batch-size is not given
URI_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "hdfs://", "http://", "https://", "file://")


def is_uri(path: str) -> bool:
    return path.startswith(URI_SCHEMES)


class CaptioningActor:
    """One model in one Ray actor: batches of photos (paths, or bytes read by Ray) in, one JSON row each out."""

    def __init__(self, model: dict, options: dict, batch_size: int, affixes: argparse.Namespace, threads: int):
        import torch

        from captioner import Captioner

        torch.set_num_threads(threads)  # the CPUs Ray gave this actor, not every core of the machine
        self.captioner = Captioner.load(**model)
        self.config = self.captioner.check(dataclasses.replace(self.captioner.default_config(), **options))
        self.batch_size, self.affixes = batch_size, affixes
        # Photos are decoded by several threads at once (Pillow releases the GIL), so that a GPU is not kept waiting
        # for one thread's JPEG decoding.
        self.readers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="image-reader")

    def __call__(self, batch: dict) -> dict:
        paths = [str(path) for path in batch["path"]]
        sources = list(zip(paths, batch["bytes"], strict=True)) if "bytes" in batch else [(p, None) for p in paths]
        loaded = list(self.readers.map(_load, sources))
        results = self.captioner.caption_each(loaded, self.config, batch_size=self.batch_size, load=_decoded)
        rows = []
        for path, result in zip(paths, results, strict=True):
            if isinstance(result, ImageError):
                rows.append({"image": display(path), "error": str(result)})
            else:
                rows.append(caption_row(display(path), with_affixes(result.text, self.affixes), result))
        return {"path": paths, "row": [json.dumps(row) for row in rows]}


def _load(source: tuple[str, bytes | None]) -> Image.Image | ImageError:
    path, data = source
    try:
        return load_image(path) if data is None else load_image(bytes(data), name=path)
    except ImageError as error:
        return error


def _decoded(picture: Image.Image | ImageError) -> Image.Image:
    if isinstance(picture, ImageError):
        raise picture
    return picture


def finished_rows(output: Path) -> dict[str, dict]:
    """The rows of the complete shards under `output`, by image path; half-written temporary files are removed."""
    for leftover in output.glob(".part-?????.*.tmp"):  # atomic_write's temporary names for the shards
        leftover.unlink()
    rows: dict[str, dict] = {}
    for shard in sorted(output.glob("part-*")):
        for row in read_shard(shard):
            rows[row["image"]] = row
    return rows


def read_shard(shard: Path) -> list[dict]:
    if shard.suffix == ".parquet":
        import pyarrow.parquet as parquet

        return [_from_parquet(row) for row in parquet.read_table(shard).to_pylist()]
    return [json.loads(line) for line in shard.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_shard(output: Path, index: int, rows: list[dict], shard_format: str) -> Path:
    """Shard `index` of `rows`, complete or not at all (written to a hidden name, then renamed)."""
    path = output / f"part-{index:05d}.{shard_format}"
    if shard_format == "jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
    else:
        import pyarrow as arrow
        import pyarrow.parquet as parquet

        table = arrow.Table.from_pylist([_to_parquet(row) for row in rows], schema=parquet_schema())
        atomic_write(path, lambda temporary: parquet.write_table(table, temporary))
    return path


def parquet_schema():
    """The shards' Parquet columns: the JSONL fields, and `error` for a photo that could not be captioned."""
    import pyarrow as arrow

    neighbour = arrow.struct([("path", arrow.string()), ("similarity", arrow.float64())])
    label = arrow.struct([("label", arrow.string()), ("probability", arrow.float64())])
    return arrow.schema(
        [
            ("image", arrow.string()), ("caption", arrow.string()), ("confidence", arrow.float64()),
            ("familiarity", arrow.float64()), ("unfamiliar", arrow.bool_()), ("neighbours", arrow.list_(neighbour)),
            ("labels", arrow.list_(label)), ("error", arrow.string()),
        ]
    )  # fmt: skip


def _to_parquet(row: dict) -> dict:
    return {name: row.get(name) for name in parquet_schema().names}


def _from_parquet(row: dict) -> dict:
    if row.get("error") is not None:
        return {"image": row["image"], "error": row["error"]}
    return {name: value for name, value in row.items() if name != "error"}


def caption_on_ray(arguments: argparse.Namespace, options: dict) -> int:
    """`caption.py --engine ray`: the exit status, as the one-process path gives it."""
    try:
        import ray
    except ImportError:
        print(f"error: --engine ray needs Ray Data, which is not installed: {INSTALL}", file=sys.stderr)
        return 2
    output: Path = arguments.output
    if problem := _problem(arguments):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    output.mkdir(parents=True, exist_ok=True)
    try:
        done = finished_rows(output)
    except (ValueError, KeyError, TypeError, OSError) as error:  # pyarrow's errors are ValueErrors
        print(f"error: {display(output)} holds a file that is not a shard of this command ({error})", file=sys.stderr)
        return 2
    uris = [path for path in arguments.paths if is_uri(path)]
    local, missing, not_images = expand_paths([path for path in arguments.paths if not is_uri(path)])
    failures = [f"{display(argument)}: no such file, folder or matching glob" for argument in missing]
    if not_images:
        print(f"skipping {len(not_images)} file(s) that are not images", file=sys.stderr)
    plan = plan_outputs([path for path in local if display(path) not in done], arguments, failures)
    if done:
        print(f"resuming: {len(done)} photo(s) already in {display(output)}", file=sys.stderr)
    if not plan.images and not uris:
        report([], failures)
        return 1 if failures else 0
    _start_ray(ray, arguments)
    started, counts = time.perf_counter(), {"rows": 0, "errors": 0}
    unfamiliar: list[str] = []
    index = 1 + max((int(shard.name[5:10]) for shard in output.glob("part-*")), default=-1)
    for captioned in _captioned_rows(ray, arguments, options, plan, uris, set(done)):
        rows = [_settled(path, row, plan, arguments.keywords, failures, unfamiliar) for path, row in captioned]
        write_shard(output, index, rows, arguments.output_format)
        index += 1
        counts["rows"] += len(rows)
        counts["errors"] += sum("error" in row for row in rows)
    seconds = time.perf_counter() - started
    print(
        f"{counts['rows']} photo(s) in {seconds:.1f} s ({counts['rows'] / max(seconds, 1e-9):.1f} photos/s), "
        f"{counts['errors']} error(s); {index} shard(s) in {display(output)}",
        file=sys.stderr,
    )
    report(unfamiliar, failures)
    return 1 if failures else 0


def _settled(path: str, row: dict, plan: Plan, with_keywords: bool, failures: list[str], unfamiliar: list[str]) -> dict:
    """`row` once its caption (and, `with_keywords`, its labels) is written where the plan says: an error row (as
    one that could not be read) if it could not be."""
    failure = row.get("error") or write_caption(
        path, row["caption"], plan, keywords(row["labels"]) if with_keywords else ()
    )
    if failure:
        failures.append(failure)
        return {"image": row["image"], "error": failure}
    if row["unfamiliar"]:
        unfamiliar.append(row["image"])
    return row


def _problem(arguments: argparse.Namespace) -> str | None:
    if not arguments.output:
        return "--engine ray writes shards under --output DIR; name the folder"
    if arguments.output.exists() and not arguments.output.is_dir():
        return f"--output {display(arguments.output)} is a file; with --engine ray it is a folder of shards"
    if arguments.output_format not in SHARD_FORMATS:
        return f"--engine ray writes {' or '.join(SHARD_FORMATS)} shards (--format), not {arguments.output_format}"
    if (arguments.sidecar or arguments.embed) and any(is_uri(path) for path in arguments.paths):
        return "--sidecar and --embed write beside local images only; caption object-store photos into --output"
    if arguments.overwrite:
        return "--engine ray resumes from its shards: remove the --output folder to start again, not --overwrite"
    if arguments.labels_only:
        return "--labels-only is for one process; with --engine ray every shard row carries its photo's labels"
    if arguments.keywords:
        from captioner import Captioner

        try:
            return labels_problem(Captioner.load(arguments.model, device="cpu", revision=arguments.revision), arguments)
        except (CheckpointError, OSError, ValueError) as error:
            return str(error)
    return None


def _start_ray(ray, arguments: argparse.Namespace) -> None:
    # Every worker imports this project's modules from where the driver has them: the same path on every node
    # (a shared folder or a container image) on a cluster.
    runtime = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}
    ray.init(address=arguments.ray_address, runtime_env=runtime, logging_level="WARNING", log_to_driver=False)


def _captioned_rows(
    ray, arguments: argparse.Namespace, options: dict, plan: Plan, uris: list[str], done: set[str]
) -> Iterator[list[dict]]:
    """Shards of (path, row), as the actors finish them."""
    cpus = ray.cluster_resources().get("CPU", 1)
    gpus = arguments.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= arguments.actors else 0
    # Ray's read tasks for URIs each need a CPU the actors do not hold, or the job waits for ever.
    cpus_per_actor = arguments.cpus_per_actor or max(1, int((cpus - bool(uris)) // arguments.actors))
    batch_size = arguments.batch_size or (GPU_BATCH if gpus else CPU_BATCH)
    datasets = []
    if plan.images:
        datasets.append(ray.data.from_items([{"path": path} for path in plan.images]))
    if uris:
        read = ray.data.read_binary_files(uris, include_paths=True, file_extensions=[s[1:] for s in IMAGE_SUFFIXES])
        datasets.append(read.filter(lambda row: display(row["path"]) not in done))
    photos = datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
    model = {
        "source": _absolute(arguments.model), "device": arguments.device, "revision": arguments.revision,
        "dtype": arguments.dtype, "runtime": arguments.runtime, "datastore": _absolute(arguments.datastore),
        "datastore_only": arguments.datastore_only,
    }  # fmt: skip
    captions = photos.map_batches(
        CaptioningActor,
        fn_constructor_args=(model, options, batch_size, _affixes(arguments), cpus_per_actor),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=arguments.actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus,
    )
    for batch in captions.iter_batches(batch_size=arguments.shard_rows, batch_format="numpy"):
        yield [(str(path), json.loads(row)) for path, row in zip(batch["path"], batch["row"], strict=True)]


def _absolute(path: str | None) -> str | None:
    """A local file or folder as an absolute path (actors may run elsewhere); a Hub id or None as it is."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def _affixes(arguments: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(prepend=arguments.prepend, append=arguments.append)
