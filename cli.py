"""What the command lines share: one flag per dataclass field, the flags that choose and place the model, and a
default subcommand."""

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from captioner import Captioner
from config import PRECISIONS, RUNTIMES


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: tuple[str, ...] = (),
    only_given: bool = False,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add `--field-name` for every field of the dataclass `cls`, with the field's help.

    Args:
        only_given: leave flags the user did not give out of the parsed namespace (instead of filling in the
            dataclass defaults), so that they can override another set of defaults, e.g. a model's own.
        defaults: values that replace the dataclass defaults (a recipe file's), required fields included.
    """
    defaults = defaults or {}
    for item in dataclasses.fields(cls):
        if item.name in exclude:
            continue
        flag = "--" + item.name.replace("_", "-")
        annotation = item.type
        choices = None
        if typing.get_origin(annotation) is Literal:
            choices, annotation = typing.get_args(annotation), str
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        default = defaults.get(item.name, item.default)
        options: dict[str, Any] = {"help": item.metadata.get("help")}
        if default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = argparse.SUPPRESS if only_given else default
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        else:
            parser.add_argument(flag, type=annotation, choices=choices, metavar=item.name.upper(), **options)


def given_arguments(cls: type, arguments: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` present in the parsed flags."""
    values = vars(arguments)
    return {item.name: values[item.name] for item in dataclasses.fields(cls) if item.name in values}


def from_arguments(cls: type, arguments: argparse.Namespace):
    """An instance of `cls` from the flags `add_arguments` made (fields without a flag keep their defaults)."""
    return cls(**given_arguments(cls, arguments))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the model and where it runs, shared by caption.py, evaluate.py and app.py."""
    parser.add_argument("--model", default=None, help="model file, folder or Hub repo id (default: captioner.pt)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to pin")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="auto",
        help="precision of the weights; auto (the default): the one recorded with the model, where this machine "
        "computes it natively, else float32 (docs/speed.md)",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="what runs the encoder and decoding step on a CPU: torch, openvino, or auto (the default): OpenVINO "
        "where the model's recorded scores accept it and it is installed (docs/speed.md)",
    )
    parser.add_argument(
        "--datastore", default=None, metavar="FOLDER",
        help="your captioned photos (images with same-named .txt captions) that steer a retrieval model's captions "
        "without training: read beside the model's own, and ranked first when about as close",
    )  # fmt: skip
    parser.add_argument("--datastore-only", action="store_true", help="read --datastore instead of the model's own")


def captioner_from_args(arguments: argparse.Namespace) -> Captioner:
    """The model that the flags of `add_model_arguments` name."""
    if arguments.datastore_only and not arguments.datastore:
        raise ValueError("--datastore-only needs --datastore FOLDER")
    return Captioner.load(
        arguments.model, device=arguments.device, revision=arguments.revision, dtype=arguments.dtype,
        runtime=arguments.runtime,
        datastore=arguments.datastore, datastore_only=arguments.datastore_only,
    )  # fmt: skip


def with_default_command(argv: Sequence[str] | None, commands: Sequence[str], default: str) -> list[str]:
    """The arguments (default: the process's), led by `default` unless they start with one of `commands` or ask
    for help: a command line whose plain form kept working when it gained subcommands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return argv if argv and argv[0] in (*commands, "-h", "--help") else [default, *argv]
