"""Decoding speed, side by side in one process: our decoder vs transformers' GPT-2 `generate()`.

    python benchmark.py                     # decoders: the full table
    python benchmark.py --quick             # fewer tokens and repeats, well under a minute on a 2-core CPU
    python benchmark.py --dtype bfloat16    # both decoders in bfloat16
    python benchmark.py end-to-end --data DATA --limit 100   # the shipped model, JPEG to text
    python benchmark.py speculative --data DATA --limit 100  # plain against speculative greedy decoding
    python benchmark.py retrieval --entries 100000           # a retrieval model's nearest-photo search at that size
    python benchmark.py labels --model captioner.pt          # what the ImageNet labels add to each photo's encoding
    python benchmark.py int8-rows                            # int8 decoder weights against bfloat16, by rows
    python benchmark.py step --torch-compile                 # a decoding step: PyTorch, OpenVINO, torch.compile

Both decoders get the same weights (ours copied into `GPT2LMHeadModel(add_cross_attention=True)`, which is what
`VisionEncoderDecoderModel` runs) and the same encoder tokens as `encoder_hidden_states`, and generate exactly
`--new-tokens` tokens (min = max new tokens, so EOS cannot end either early). Random weights are fine for timing.
Captions/s is images captioned per second; the ratio is ours / transformers; "same" says whether the two generated
the same tokens.

The "bound" column is what no one-token-per-step decoder can beat at this precision: the time of only the matrix
products of every step (each decoder weight read once per step, for all rows at once), with nothing else. Its
ratio to transformers' time is the largest speed-up any implementation of the same algorithm could show. A second
table splits the end-to-end latency of one caption into encoder and decoder time.
"""

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import decoding
from captioner import Captioner
from cli import with_default_command
from config import PRESETS, DecodeConfig
from data import load_split
from images import load_image
from model import CaptionModel
from openvino_runtime import CompiledSteps, OpenVinoModel, StepGraph
from precision import (
    DTYPES,
    SPEED_ORDER,
    Int8WeightLinear,
    accepted_precisions,
    inference_setting,
    runs_natively,
    setting_name,
    split_setting,
)
from pretrained import to_gpt2
from retrieval import Datastore
from speculative import DraftTable

EXAMPLES = Path(__file__).resolve().parent / "examples"


def timed(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The median time of `repeats` runs after a warm-up run, and what the last run returned."""
    result = run()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def step_weights(model: CaptionModel) -> list[tuple[Tensor, Tensor | None]]:
    """The (weight, bias) of every matrix product a decoding step makes: all decoder projections except the image
    keys/values (computed once per image), and the LM head."""
    weights = [
        (module.weight, module.bias)
        for name, module in model.decoder.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("cross_attn.c_attn")
    ]
    return [*weights, (model.decoder.wte.weight, None)]


def matmul_bound_seconds(model: CaptionModel, rows: int, steps: int, repeats: int) -> float:
    """Time of only the matrix products of `steps` decoding steps for `rows` captions, each weight applied once to
    all rows."""
    weights = step_weights(model)
    inputs = {width: weights[0][0].new_ones(rows, width) for width in {weight.shape[1] for weight, _ in weights}}

    def products():
        with torch.inference_mode():
            for _ in range(steps):
                for weight, bias in weights:
                    F.linear(inputs[weight.shape[1]], weight, bias)

    return timed(products, repeats)[0]


def benchmark_preset(
    name: str, new_tokens: int, repeats: int, batches: Sequence[int], dtype: torch.dtype = torch.float32
) -> list[dict]:
    config = PRESETS[name]
    torch.manual_seed(0)
    model = CaptionModel(config).eval()
    eos = config.vocab_size - 1
    reference = to_gpt2(model, bos_token_id=eos, eos_token_id=eos).to(dtype)
    model = model.to(dtype)
    rows = []
    for batch in batches:
        with torch.inference_mode():
            image_tokens = model.encode(torch.randn(batch, 3, config.image_size, config.image_size, dtype=dtype))
        for strategy, beams in (("greedy", 1), ("beam", 3)):
            decode = DecodeConfig(
                strategy=strategy, num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens
            )

            def ours(decode=decode, image_tokens=image_tokens):
                return decoding.generate(model, image_tokens, decode, bos_token_id=eos, eos_token_id=eos)

            def theirs(beams=beams, image_tokens=image_tokens, batch=batch):
                with torch.inference_mode():
                    return reference.generate(
                        torch.full((batch, 1), eos), encoder_hidden_states=image_tokens, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, num_beams=beams, do_sample=False, early_stopping=True,
                    )  # fmt: skip

            ours_seconds, our_generation = timed(ours, repeats)
            theirs_seconds, their_ids = timed(theirs, repeats)
            # transformers decodes the prompt in its first step, as we do: new_tokens steps in all.
            bound_seconds = matmul_bound_seconds(model, batch * beams, new_tokens, repeats)
            same = torch.equal(our_generation.sequences[:, 0], their_ids[:, 1:])
            rows.append(
                {
                    "preset": name, "decoding": f"{strategy} {beams}" if strategy == "beam" else strategy,
                    "batch": batch, "ours": batch / ours_seconds, "transformers": batch / theirs_seconds,
                    "ratio": theirs_seconds / ours_seconds, "bound": batch / bound_seconds,
                    "bound_ratio": theirs_seconds / bound_seconds, "same": same,
                }
            )  # fmt: skip
            print(_row(rows[-1]), flush=True)
    return rows


def latency_split(name: str, repeats: int, dtype: torch.dtype = torch.float32) -> dict:
    """One image end to end with the default decoding: preprocessing-free encoder time and decoder time."""
    config = PRESETS[name]
    torch.manual_seed(0)
    model = CaptionModel(config).eval().to(dtype)
    pixels = torch.randn(1, 3, config.image_size, config.image_size, dtype=dtype)
    eos = config.vocab_size - 1
    decode = dataclasses.replace(DecodeConfig(), max_new_tokens=15, min_new_tokens=15)
    with torch.inference_mode():
        image_tokens = model.encode(pixels)

        def encode():
            with torch.inference_mode():
                model.encode(pixels)

        encoder = timed(encode, repeats)[0]
        decoder = timed(
            lambda: decoding.generate(model, image_tokens, decode, bos_token_id=eos, eos_token_id=eos), repeats
        )[0]
    tensors = [tensor for pair in step_weights(model) for tensor in pair if tensor is not None]
    read = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return {"preset": name, "encoder_ms": encoder * 1000, "decoder_ms": decoder * 1000, "step_mb": read / 1e6}


def speculative_report(
    model_path: str | None, data: str | None, limit: int, dtype: torch.dtype, draft_order: int = 0,
    draft_tokens: int = 4,
) -> dict:  # fmt: skip
    """Plain greedy against speculative greedy on a trained model, one image at a time (the app's case), on the
    data's test split (or examples/): the same ids?, tokens per forward pass, and milliseconds per caption.

    The draft is the model file's n-gram table, or one of `draft_order` built from the data's training captions."""
    captioner = Captioner.load(model_path, device="cpu", dtype=dtype, runtime="torch")
    tokenizer = captioner.tokenizer
    table = None if draft_order else captioner.draft
    if data is not None:
        images = [item.image for item in load_split(data, "test")[:limit]]
        if table is None:
            captions = [tokenizer.encode(c) for item in load_split(data, "train") for c in item.captions]
            table = DraftTable.from_captions(
                captions, tokenizer.bos_token_id, tokenizer.eos_token_id, order=draft_order or 3
            )
    else:
        images = sorted(EXAMPLES.glob("*.jpg"))[:limit]
    if table is None:
        raise ValueError("the model file has no draft table: pass --data with the training data set")
    table = dataclasses.replace(table, tokens_per_pass=draft_tokens)
    config = dataclasses.replace(captioner.default_config(), strategy="greedy", num_return_sequences=1)
    prompt, eos = (tokenizer.bos_token_id,), tokenizer.eos_token_id
    encoded = [captioner.encode([image]).tokens for image in images]
    plain_seconds = speculative_seconds = 0.0
    same, tokens, passes = 0, 0, 0
    for image_tokens in encoded:
        started = time.perf_counter()
        plain = decoding.generate(captioner.model, image_tokens, config, bos_token_id=prompt[0], eos_token_id=eos)
        plain_seconds += time.perf_counter() - started
        started = time.perf_counter()
        fast = decoding.generate(
            captioner.model, image_tokens, config, bos_token_id=prompt[0], eos_token_id=eos, draft=table
        )
        speculative_seconds += time.perf_counter() - started
        length = int(plain.lengths[0, 0])
        same += int(
            int(fast.lengths[0, 0]) == length
            and torch.equal(fast.sequences[0, 0, :length], plain.sequences[0, 0, :length])
        )
        tokens, passes = tokens + length, passes + fast.passes
    count = len(encoded)
    return {
        "images": count, "same": same, "tokens_per_pass": tokens / passes,
        "plain_ms": plain_seconds / count * 1000, "speculative_ms": speculative_seconds / count * 1000,
    }  # fmt: skip


def _their_generate_options(config: DecodeConfig) -> dict:
    """transformers `generate()` options for our deterministic decoding settings."""
    return {
        "num_beams": config.num_beams if config.strategy == "beam" else 1, "do_sample": False,
        "max_new_tokens": config.max_new_tokens, "min_new_tokens": config.min_new_tokens,
        "length_penalty": config.length_penalty, "early_stopping": config.early_stopping,
        "no_repeat_ngram_size": config.no_repeat_ngram_size, "repetition_penalty": config.repetition_penalty,
    }  # fmt: skip


def _parts(captioner: Captioner, config: DecodeConfig, photos: Sequence, batch_size: int) -> dict:
    """Where a photo's time goes (medians): reading and resizing, the encoder and decoding, one photo at a time
    over `photos`, and the encoder and decoding per photo of one folder batch of the first `batch_size` photos."""
    times = {"read_ms": [], "encode_ms": [], "decode_ms": [], "batch_encode_ms": [], "batch_decode_ms": []}
    for photo in photos:
        started = time.perf_counter()
        pixels = captioner.transform([load_image(photo)])
        read = time.perf_counter()
        encoded = captioner.encode_pixels(pixels)
        encoded_at = time.perf_counter()
        captioner.caption(encoded, config)
        times["read_ms"].append(read - started)
        times["encode_ms"].append(encoded_at - read)
        times["decode_ms"].append(time.perf_counter() - encoded_at)
    batch = photos[:batch_size]
    pixels = captioner.transform([load_image(photo) for photo in batch])
    for _ in range(3):
        started = time.perf_counter()
        encoded = captioner.encode_pixels(pixels)
        encoded_at = time.perf_counter()
        captioner.caption(encoded, config)
        times["batch_encode_ms"].append((encoded_at - started) / len(batch))
        times["batch_decode_ms"].append((time.perf_counter() - encoded_at) / len(batch))
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def end_to_end_report(
    model_path: str | None, data: str | None, limit: int, batch_size: int, also: Sequence[str] = ()
) -> list[dict]:
    """From JPEG files to caption text with the model's default decoding, side by side in one run: one-image
    latency (median over the photos, each captioned alone) and folder throughput (all photos, batched), for ours
    in float32 and in each faster precision the model records, or `also` names, that this machine runs (the one
    "auto" picks is marked default), and a plain pipeline on the same float32 weights: the same
    preprocessing, timm's encoder, and transformers' `generate()` on the decoder's weights."""
    photos = ([item.image for item in load_split(data, "test")] if data else sorted(EXAMPLES.glob("*.jpg")))[:limit]
    float32 = Captioner.load(model_path, device="cpu", dtype="float32", runtime="torch")
    config = float32.default_config()
    if config.strategy == "sample" or config.prefix:
        raise ValueError("the end-to-end comparison needs a deterministic default decoding without a prefix")
    tokenizer, model = float32.tokenizer, float32.model
    gpt2 = to_gpt2(model, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    options = {**_their_generate_options(config), "pad_token_id": tokenizer.eos_token_id}

    def theirs(batch: Sequence) -> list[str]:
        pixels = float32.transform([load_image(photo) for photo in batch])
        with torch.inference_mode():
            tokens = model.encode(pixels)
            prompt = torch.full((len(batch), 1), tokenizer.bos_token_id)
            # BOS is also the pad token here: the mask says it is a real token, not padding.
            ids = gpt2.generate(prompt, attention_mask=torch.ones_like(prompt), encoder_hidden_states=tokens, **options)
        return [tokenizer.decode([i for i in row[1:].tolist() if i != tokenizer.eos_token_id]) for row in ids]

    def ours(captioner: Captioner) -> Callable[[Sequence], list[str]]:
        def run(batch: Sequence) -> list[str]:
            return [caption.text for caption in captioner.caption_each(batch, config, batch_size=batch_size)]

        return run

    recorded = accepted_precisions(float32.info)
    default = setting_name(*inference_setting("auto", "auto", float32.device, recorded))
    pipelines = [("timm + transformers", "float32", None), ("ours", "float32", float32)]
    for setting in dict.fromkeys([*recorded, *also]):  # in order, each once
        if setting != "float32" and runs_natively(setting, float32.device):
            runtime, precision = split_setting(setting)
            captioner = Captioner.load(model_path, device="cpu", dtype=precision, runtime=runtime)
            pipelines.append(("ours, default" if setting == default else "ours", setting, captioner))
    rows, reference = [], None
    for name, setting, captioner in pipelines:
        row, texts = _timed_pipeline(theirs if captioner is None else ours(captioner), photos, batch_size)
        reference = texts if reference is None else reference
        parts = _parts(captioner, config, photos, batch_size) if captioner is not None else {}
        same = sum(a == b for a, b in zip(texts, reference, strict=True))
        runtime, precision = split_setting(setting)
        if captioner is None:
            runtime = "timm + transformers"
        row = {"pipeline": name, "runtime": runtime, "precision": precision, **row, "same": same, **parts}
        rows.append({**row, "images": len(photos)})
    return rows


def _timed_pipeline(run: Callable[[Sequence], list[str]], photos: Sequence, batch_size: int) -> tuple[dict, list]:
    """One-image latency (the median over the photos, each alone) and folder throughput of `run`, and its captions."""
    run(photos[:1])  # warm-up
    single, texts = [], []
    for photo in photos:
        started = time.perf_counter()
        texts += run([photo])
        single.append(time.perf_counter() - started)
    run(photos[:batch_size])  # warm-up at the folder batch size
    started = time.perf_counter()
    run(photos)
    folder = time.perf_counter() - started
    return {"latency_ms": statistics.median(single) * 1000, "images_per_s": len(photos) / folder}, texts


HEADER = (
    "| preset | decoding | batch | ours captions/s | transformers captions/s | ours / transformers | same tokens "
    "| bound captions/s | bound / transformers |"
)


def retrieval_report(entries: int, repeats: int, width: int = 384, k: int = 4) -> dict:
    """Milliseconds for the `k` nearest photos in a datastore of `entries` random photos (exact search, as a
    retrieval model runs it), for one photo and per photo of a folder batch of 16. Random embeddings time the same."""
    generator = torch.Generator().manual_seed(0)
    store = Datastore.build(
        torch.randn(entries, width, generator=generator), [("a caption",)] * entries, [str(i) for i in range(entries)]
    )
    one, batch = torch.randn(1, width, generator=generator), torch.randn(16, width, generator=generator)
    return {
        "entries": entries,
        "one_ms": timed(lambda: store.nearest(one, k), repeats)[0] * 1000,
        "batch_ms": timed(lambda: store.nearest(batch, k), repeats)[0] * 1000 / 16,
    }


def labels_report(model: str | None, repeats: int) -> dict:
    """Milliseconds a photo for the encoder with and without the ImageNet labels (labels.py), for one photo and in a
    folder batch of 16, on the model file's own weights."""
    captioner = Captioner.load(model, device="cpu")
    if captioner.recogniser is None:
        raise SystemExit(f"error: {model or 'captioner.pt'} has no ImageNet recogniser (hub.py release --labels)")
    photo = load_image(Path(__file__).resolve().parent / "examples" / "cat.jpg")
    report = {"precision": captioner.precision}
    for batch in (1, 16):
        pixels, resized = captioner.transform([photo] * batch), captioner.transform.resize([photo] * batch)
        for labels in (False, True):
            label_images = resized if labels else None
            seconds = timed(lambda p=pixels, r=label_images: captioner.encode_pixels(p, r), repeats)[0]
            report[(batch, labels)] = seconds * 1000 / batch
    return report


def _row(row: dict) -> str:
    return (
        f"| {row['preset']} | {row['decoding']} | {row['batch']} | {row['ours']:.2f} | {row['transformers']:.2f} | "
        f"{row['ratio']:.2f}x | {'yes' if row['same'] else 'NO'} | {row['bound']:.2f} | {row['bound_ratio']:.2f}x |"
    )


COMMANDS = ("decoders", "end-to-end", "speculative", "retrieval", "labels", "int8-rows", "step")


def main(argv: Sequence[str] | None = None) -> int:
    argv = with_default_command(argv, COMMANDS, "decoders")
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "speculative" and arguments.draft_order and arguments.data is None:
        parser.error("--draft-order builds a table from --data's training captions: pass --data")
    report = {
        "decoders": _print_decoders, "end-to-end": _print_end_to_end, "speculative": _print_speculative,
        "retrieval": _print_retrieval, "labels": _print_labels, "int8-rows": _print_int8_rows,
        "step": _print_step,
    }  # fmt: skip
    return report[arguments.command](arguments)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    trained = argparse.ArgumentParser(add_help=False)
    trained.add_argument("--model", default=None, help="the model file (default: captioner.pt)")
    trained.add_argument("--repeats", type=int, default=None, help="timed runs, median reported")
    decoders = commands.add_parser("decoders", help="our decoder against transformers' generate() (the default)")
    decoders.add_argument("--quick", action="store_true", help="fewer tokens and repeats (under a minute on 2 cores)")
    decoders.add_argument("--presets", nargs="+", default=["small", "vit-gpt2"], choices=sorted(PRESETS))
    decoders.add_argument("--new-tokens", type=int, default=None, help="tokens generated per caption (default 20)")
    decoders.add_argument("--repeats", type=int, default=None, help="timed runs per cell, median reported (default 5)")
    decoders.add_argument("--dtype", choices=list(DTYPES), default="float32", help="precision of both decoders")
    end_to_end = commands.add_parser(
        "end-to-end", parents=[trained], help="JPEG to caption on a trained model (--data's test split or examples/), "
        "ours in float32 and in each faster precision the model records, against timm + transformers",
    )  # fmt: skip
    end_to_end.add_argument("--data", default=None, help="the data set whose test photos are captioned")
    end_to_end.add_argument("--limit", type=int, default=100, help="images captioned")
    end_to_end.add_argument("--batch-size", type=int, default=16, help="images per folder batch")
    end_to_end.add_argument(
        "--also", nargs="+", default=(), choices=[name for name in SPEED_ORDER if name != "float32"],
        help="time these precisions (openvino-...: run by OpenVINO) too, whether or not the model file records them",
    )  # fmt: skip
    speculative = commands.add_parser(
        "speculative", parents=[trained], help="plain against speculative greedy on a trained model's captions"
    )
    speculative.add_argument("--data", default=None, help="the data set (test images, train captions)")
    speculative.add_argument("--limit", type=int, default=100, help="images captioned")
    speculative.add_argument("--dtype", choices=list(DTYPES), default="float32", help="precision of the model")
    speculative.add_argument(
        "--draft-order", type=int, default=0, help="n-gram order of a table built from --data (0: the model file's)"
    )
    speculative.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per pass")
    retrieval = commands.add_parser("retrieval", help="the nearest-photo search of a datastore this large")
    retrieval.add_argument("--entries", type=int, default=100_000, help="photos in the datastore")
    retrieval.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default 20)")
    commands.add_parser("labels", parents=[trained], help="the encoder's time with and without the ImageNet labels")
    step = commands.add_parser("step", parents=[trained], help="a decoding step: PyTorch against OpenVINO, by rows")
    step.add_argument("--torch-compile", action="store_true", help="also torch.compile's step (minutes to compile)")
    commands.add_parser(
        "int8-rows", help="a decoder layer's int8-weight kernel against bfloat16's matrix product, by rows"
    ).add_argument("--repeats", type=int, default=300, help="timed calls per cell (the mean is reported)")
    return parser


def int8_rows_report(repeats: int, rows: Sequence[int] = (1, 3, 6, 12, 24, 48)) -> list[dict]:
    """Microseconds a call of one 512 x 2048 decoder layer takes with int8 weights (torch's `_weight_int8pack_mm`)
    and with the same weights dequantized to bfloat16 (bfloat16's matrix product), for bfloat16 rows: where
    `Int8WeightLinear.FEW_ROWS` comes from."""
    layer = Int8WeightLinear(nn.Linear(512, 2048))
    results = []
    for count in rows:
        x = torch.randn(count, 512, dtype=torch.bfloat16)
        times = {}
        for name, run in {
            "int8": lambda x=x: torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.scales),
            "bfloat16": lambda x=x: F.linear(x, layer.dequantized),
        }.items():
            run()
            started = time.perf_counter()
            for _ in range(repeats):
                run()
            times[name] = (time.perf_counter() - started) / repeats * 1e6
        results.append({"rows": count, **times})
    return results


def step_report(model_path: str | None, repeats: int, compile_torch: bool) -> list[dict]:
    """Milliseconds a decoding step takes for 3 rows (one photo's beams) and 48 (a folder batch's), averaged over
    12 steps from an empty cache: PyTorch's eager step, OpenVINO's compiled one, and (`compile_torch`) the same
    function compiled by torch.compile, in float32 and bfloat16, on the model's weights and random image tokens."""
    float32 = Captioner.load(model_path, device="cpu", dtype="float32", runtime="torch").model
    results = []
    for precision in ("float32", "bfloat16"):
        eager = copy.deepcopy(float32).to(DTYPES[precision])
        openvino = OpenVinoModel.compile(float32, precision, step=True).steps
        openvino.model = eager  # its cross-attention keys in the same precision
        steps = {"torch": eager, "openvino": openvino}
        if compile_torch:
            compiled = torch.compile(StepGraph(eager), dynamic=False)
            steps["torch.compile"] = CompiledSteps(eager, compiled, DTYPES[precision])
        for rows in (3, 48):
            tokens = torch.randn(rows // 3, 65, float32.config.n_embd, dtype=DTYPES[precision])
            for name, step in steps.items():

                def decode(step=step, tokens=tokens, rows=rows) -> None:
                    with torch.inference_mode():
                        cache = step.start_cache(tokens, 3, 13)
                        for position in range(12):
                            step.decode_step(torch.zeros(rows, 1, dtype=torch.long), cache, position)

                seconds, _ = timed(decode, repeats)  # after a warm-up run (which compiles)
                results.append({"precision": precision, "rows": rows, "step": name, "ms": seconds / 12 * 1000})
    return results


def _print_step(arguments: argparse.Namespace) -> int:
    print(f"{torch.get_num_threads()} threads; ms a decoding step, the median of {arguments.repeats or 5} runs")
    print("| precision | rows | decoding step | ms a step |")
    print("|---|---|---|---|")
    for row in step_report(arguments.model, arguments.repeats or 5, arguments.torch_compile):
        print(f"| {row['precision']} | {row['rows']} | {row['step']} | {row['ms']:.2f} |")
    return 0


def _print_int8_rows(arguments: argparse.Namespace) -> int:
    print(f"{torch.get_num_threads()} threads; microseconds a call, the mean of {arguments.repeats}")
    print("| rows | int8 kernel, us | bfloat16 matrix product, us |")
    print("|---|---|---|")
    for row in int8_rows_report(arguments.repeats):
        print(f"| {row['rows']} | {row['int8']:.1f} | {row['bfloat16']:.1f} |")
    return 0


def _print_labels(arguments: argparse.Namespace) -> int:
    """The encoder's time with and without the ImageNet labels."""
    report = labels_report(arguments.model, arguments.repeats or 10)
    print(f"{torch.get_num_threads()} threads, the encoder in {report['precision']}, the recogniser in float32")
    print("| photos at once | encoder, ms a photo | encoder and labels, ms a photo | labels add, ms a photo |")
    print("|---|---|---|---|")
    for batch in (1, 16):
        plain, labelled = report[(batch, False)], report[(batch, True)]
        print(f"| {batch} | {plain:.1f} | {labelled:.1f} | {labelled - plain:.1f} |")
    return 0


def _print_retrieval(arguments: argparse.Namespace) -> int:
    """The nearest-photo search at --entries photos."""
    report = retrieval_report(arguments.entries, arguments.repeats or 20)
    print(
        f"datastore of {report['entries']:,} photos, 4 nearest by exact search, {torch.get_num_threads()} threads: "
        f"{report['one_ms']:.1f} ms for one photo, {report['batch_ms']:.2f} ms a photo in batches of 16"
    )
    return 0


def _print_end_to_end(arguments: argparse.Namespace) -> int:
    """JPEG to caption, ours in each precision against timm + transformers."""
    rows = end_to_end_report(arguments.model, arguments.data, arguments.limit, arguments.batch_size, arguments.also)
    base = rows[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rows[0]['images']} photos, the model's "
        f"default decoding; folders in batches of {arguments.batch_size}"
    )
    print(
        "| pipeline | runtime | precision | one image, median ms | speed-up | folder images/s | speed-up "
        "| captions same as timm + transformers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['pipeline']} | {row['runtime']} | {row['precision']} | {row['latency_ms']:.0f} | "
            f"{base['latency_ms'] / row['latency_ms']:.2f}x | {row['images_per_s']:.1f} | "
            f"{row['images_per_s'] / base['images_per_s']:.2f}x | {row['same']}/{row['images']} |"
        )
    print()
    print(
        "| ours, runtime | precision | reading and resizing, ms | encoder, ms | decoding, ms "
        "| folder batch: encoder, ms a photo | folder batch: decoding, ms a photo |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows[1:]:
        print(
            f"| {row['runtime']} | {row['precision']} | {row['read_ms']:.1f} | {row['encode_ms']:.0f} | "
            f"{row['decode_ms']:.0f} | "
            f"{row['batch_encode_ms']:.1f} | {row['batch_decode_ms']:.1f} |"
        )
    return 0


def _print_speculative(arguments: argparse.Namespace) -> int:
    """Plain against speculative greedy decoding on a trained model."""
    report = speculative_report(
        arguments.model, arguments.data, arguments.limit, DTYPES[arguments.dtype], arguments.draft_order,
        arguments.draft_tokens,
    )  # fmt: skip
    print(
        f"{report['images']} images, {arguments.dtype}, greedy one image at a time, draft of "
        f"{arguments.draft_tokens} tokens: identical ids for "
        f"{report['same']} of {report['images']}; {report['tokens_per_pass']:.2f} tokens per decoder pass; "
        f"plain {report['plain_ms']:.1f} ms, speculative {report['speculative_ms']:.1f} ms a caption "
        f"({report['plain_ms'] / report['speculative_ms']:.2f}x)"
    )
    return 0


def _print_decoders(arguments: argparse.Namespace) -> int:
    """Our decoder against transformers' generate(), preset by preset."""
    new_tokens = arguments.new_tokens or (10 if arguments.quick else 20)
    repeats = arguments.repeats or (1 if arguments.quick else 5)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {arguments.dtype}, {new_tokens} new tokens, "
        f"median of {repeats}"
    )
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|---|")
    for name in arguments.presets:
        benchmark_preset(name, new_tokens, repeats, batches=(1, 8), dtype=DTYPES[arguments.dtype])
    print()
    print("| preset | encoder ms | decoder ms (beam 3, 15 tokens) | decoder weights read per step |")
    print("|---|---|---|---|")
    for name in arguments.presets:
        split = latency_split(name, repeats, DTYPES[arguments.dtype])
        print(
            f"| {split['preset']} | {split['encoder_ms']:.0f} | {split['decoder_ms']:.0f} | {split['step_mb']:.2f} MB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
