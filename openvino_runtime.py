"""The encoder, the ImageNet recogniser and (in float32) the decoding step run by OpenVINO, a runtime made for CPUs.

PyTorch runs a model operation by operation: the encoder's matrix products run below what the CPU's vector units
can do, and its attention, GELU, copies and norms each pay their own pass over memory. OpenVINO compiles each graph
once for this CPU (fused kernels, its own thread pool, bfloat16 where the CPU has it) and runs it in one call.

    compiled = OpenVinoModel.compile(model, "bfloat16", recogniser=...)   # model: a float32 CaptionModel
    tokens, class_tokens = compiled.encode_with_class_token(pixels)
    decoding.generate(compiled.steps, tokens, config, ...)  # its step (where compiled), through the same code

The graphs are traced from the model's own modules (`CaptionModel.encode_with_class_token`,
`TextDecoder.after_cache`) with shapes left open (batch, caption length, cache size), converted on first use and
saved under `cache_folder()`, keyed by the weights' content, the runtime's version and GRAPH_VERSION, so a model file
is converted once per machine; OpenVINO caches the compiled kernels beside them. The cross-attention keys and values
of each image and a "prompt" model's prompt are computed by PyTorch, once per batch (`CaptionModel.start_cache`).
Which precisions use which part, and why: docs/speed.md.
"""

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from labels import TRANSFORM as RECOGNISER_TRANSFORM
from model import CaptionModel, KVCache

GRAPH_VERSION = 3  # raise when the traced graphs change, so that cached conversions are made again
# The precisions it runs, and the one its encoder computes in, as OpenVINO names it. In "bfloat16-int8" PyTorch
# decodes, with int8 decoder weights (precision.py); "int8-encoder" decodes so too, and its encoder is the model
# file's int8 graph (`quantize_encoder`), whose matrix products run in int8 and the rest in bfloat16.
INT8_ENCODER = "int8-encoder"
PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16", "bfloat16-int8": "bf16", INT8_ENCODER: "bf16"}
# Where its decoding step beats PyTorch's (docs/speed.md): in float32 it decodes a photo in about half the time. In
# bfloat16 PyTorch's step is as fast (a step reads every decoder weight once; bfloat16 halves those bytes either
# way), and OpenVINO's thread pool alternating with PyTorch's between steps costs it more, so PyTorch decodes there.
STEP_PRECISIONS = ("float32",)
INSTALL = "pip install openvino==2026.4.1"
INSTALL_NNCF = "pip install nncf==3.4.0"


class RuntimeUnavailable(ValueError):
    """OpenVINO is not installed here, or it refused to convert or compile the model: a choice this machine cannot
    honour, which the commands print in one line (a ValueError, as other impossible options are)."""


def available() -> bool:
    """Whether OpenVINO can be imported here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino():
    try:
        import openvino
    except ImportError as error:
        raise RuntimeUnavailable(f"the OpenVINO runtime is not installed: {INSTALL}") from error
    return openvino


def cache_folder() -> Path:
    """Where converted models are kept: $XDG_CACHE_HOME (default ~/.cache)/image-captioner/openvino."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "image-captioner" / "openvino"


def model_key(model: CaptionModel, recogniser: nn.Module | None = None) -> str:
    """A name for what the graphs compute: the models' shapes and weights, this runtime's version, GRAPH_VERSION."""
    state = _numpy_state(model)
    if recogniser is not None:
        state |= {f"recogniser.{key}": values for key, values in _numpy_state(recogniser).items()}
    versions = repr((model.config, _openvino().__version__, GRAPH_VERSION))
    return hashlib.sha256((versions + _weights_digest(state, list(state))).encode()).hexdigest()[:24]


def _numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {key: tensor.detach().float().cpu().numpy() for key, tensor in model.state_dict().items()}


def _weights_digest(state: dict[str, np.ndarray], keys: Sequence[str]) -> str:
    """A hash of the named weights of `state`."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(state[key]).tobytes())
    return digest.hexdigest()


class _Encoder(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.encode_with_class_token(pixels)


class StepGraph(nn.Module):
    """The decoding step as one function of tensors, what a runtime compiles (`CompiledSteps`): input ids (B, T),
    their positions (T,), the whole cache's keys and values, its visible slots (C,), the stacked image keys and
    values -> logits (B, T, vocab) and the new positions' keys and values (`TextDecoder.after_cache`)."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, positions: Tensor, cache_keys: Tensor, cache_values: Tensor, visible: Tensor,
        image_keys: Tensor, image_values: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        hidden, new_keys, new_values = self.model.decoder.after_cache(
            input_ids, positions, cache_keys, cache_values, visible, image_keys, image_values
        )
        return self.model.logits(hidden), new_keys, new_values


def _graphs(model: CaptionModel, recogniser: nn.Module | None) -> dict[str, tuple[nn.Module, tuple, list]]:
    """Each graph by name: the module traced, an example input and the input shapes it keeps open (-1)."""
    ov = _openvino()
    config = model.config
    layers, heads, head_size = config.n_layer, config.n_head, config.n_embd // config.n_head
    size = config.image_size
    # Two new tokens after a cache of three slots, two rows per image: every shape the graph keeps open differs.
    rows, images, slots, length = 4, 2, 3, 2
    cache_shape = ov.PartialShape([layers, -1, heads, -1, head_size])
    step_inputs = (
        torch.zeros(rows, length, dtype=torch.long),
        torch.arange(slots, slots + length),
        torch.zeros(layers, rows, heads, slots, head_size),
        torch.zeros(layers, rows, heads, slots, head_size),
        torch.ones(slots, dtype=torch.bool),
        torch.zeros(layers, images, heads, 5, head_size),
        torch.zeros(layers, images, heads, 5, head_size),
    )
    open_shapes = [[-1, -1], [-1], cache_shape, cache_shape, [-1], cache_shape, cache_shape]
    graphs = {
        "encoder": (_Encoder(model), torch.zeros(1, 3, size, size), [[-1, 3, size, size]]),
        "step": (StepGraph(model), step_inputs, [ov.PartialShape(shape) for shape in open_shapes]),
    }
    if recogniser is not None:
        side = RECOGNISER_TRANSFORM.size
        graphs["recogniser"] = (recogniser, torch.zeros(1, 3, side, side), [[-1, 3, side, side]])
    return graphs


def _trace(module: nn.Module, example: Tensor | tuple, shapes: list):
    """`module` as an OpenVINO model, traced on `example` with `shapes` (-1: open)."""
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing warns of every Python branch it fixes; the graphs' open shapes are checked by the tests.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.trace", category=DeprecationWarning)
        return _openvino().convert_model(module.eval(), example_input=example, input=shapes)


# The traced graph's names of the encoder blocks' attention projections (timm's `blocks.N.attn.qkv` and `.proj`).
ATTENTION_PROJECTIONS = r".*\.blocks\.\d+\.attn\.(qkv|proj)/.*"


def quantize_encoder(
    model: CaptionModel, calibration: Sequence[Tensor], kept_in_bfloat16: Sequence[str] = (ATTENTION_PROJECTIONS,)
) -> dict:
    """The float32 `model`'s encoder (`CaptionModel.encode_with_class_token`) as an OpenVINO graph whose MLP matrix
    products take int8 weights and int8 activations, for the model file to carry (release.add_int8_encoder).

    NNCF's post-training quantization: the activations' ranges come from running `calibration` (pixel batches
    made by the model's ImageTransform: the training photos), and its transformer preset smooths the outlier
    channels into the weights first and keeps softmax and norms out of int8. On CPUs with VNNI or AMX, int8 matrix
    products do twice bfloat16's multiplies per instruction (docs/speed.md). The attention's projections stay in
    bfloat16: in int8 they moved the class token, which the unfamiliar-photo signal reads, enough to stop flagging
    a photo the float encoder flags (docs/speed.md). `kept_in_bfloat16`: patterns of the traced graph's operation
    names that stay out of int8. Needs NNCF (INSTALL_NNCF).

    The graph leaves out the weights the model holds (`_leave_out_model_weights`): about 1 MB, not 28."""
    ov = _openvino()
    try:
        import nncf
    except ImportError as error:
        raise RuntimeUnavailable(f"quantizing needs NNCF, which is not installed: {INSTALL_NNCF}") from error
    size = model.config.image_size
    graph = _trace(_Encoder(model), torch.zeros(1, 3, size, size), [[-1, 3, size, size]])
    samples = [pixels.float().numpy() for pixels in calibration]
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):  # its progress bars: stdout is for what commands print as results
        quantized = nncf.quantize(
            graph, nncf.Dataset(samples), subset_size=len(samples), model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(patterns=list(kept_in_bfloat16)),
        )  # fmt: skip
    state = _numpy_state(model)
    quantized, left_out = _leave_out_model_weights(quantized, state)
    with tempfile.TemporaryDirectory() as folder:
        ov.save_model(quantized, Path(folder) / "encoder.xml", compress_to_fp16=False)
        return {
            "graph": (Path(folder) / "encoder.xml").read_text(encoding="utf-8"),
            "weights": torch.from_numpy(np.fromfile(Path(folder) / "encoder.bin", dtype=np.uint8)),
            "model_weights_sha256": _weights_digest(state, left_out),
            "calibration_photos": sum(len(pixels) for pixels in calibration),
            "openvino": ov.__version__,
        }


# The int8 graph's inputs that stand for a model weight, and its operations that compute a weight from them, are
# named so: with the key of the model's state dict they come from.
MODEL_WEIGHT = "model weight: "
COMPUTED_WEIGHT = "computed weight: "


def _leave_out_model_weights(graph, state: dict[str, np.ndarray]):
    """`graph` (NNCF's quantized encoder) without the weights of its matrix products and convolutions, which the
    model file holds already: each is an input named after its state-dict key (MODEL_WEIGHT), and the operations
    that make NNCF's weight from it: the division by the smoothing factors NNCF moved out of the activations, and
    for an int8 weight the rounding to its per-channel scale (NNCF's rule; about 3 in 100,000 weights land one
    step from NNCF's, its smoothing factors being its own float32 numbers, not exactly these). What is not the
    model's (scales, corrected biases, norms) stays. Returns the graph and the keys left out."""
    ov = _openvino()
    from openvino import opset13 as ops

    inputs = {}
    for product in graph.get_ops():
        if product.get_type_name() not in ("MatMul", "Convolution"):
            continue
        key = product.get_friendly_name().removeprefix("__module.model.").split("/")[0] + ".weight"
        if key not in state or key in inputs:
            continue
        weight = product.input(1).get_source_output().get_node()
        smoothing = _smoothing_factors(product, state[key].ndim)
        expected = state[key] if smoothing is None else state[key] / smoothing
        if weight.get_type_name() == "Constant" and _close(weight.get_data(), expected):
            replaced, scale = weight, None
        elif (quantized := _int8_weight(weight)) is not None and _rounds_alike(*quantized, expected):
            replaced, scale = quantized
        else:
            continue  # not a rule this knows: kept as NNCF made it
        inputs[key] = ops.parameter(list(state[key].shape), ov.Type.f32, name=MODEL_WEIGHT + key)
        computed = inputs[key] if smoothing is None else ops.divide(inputs[key], ops.constant(smoothing))
        if scale is not None:
            rounded = ops.round(ops.divide(computed, ops.constant(scale)), "half_to_even")
            computed = ops.convert(ops.clamp(rounded, -128, 127), ov.Type.i8)
        if computed is not inputs[key]:  # an unsmoothed float weight is the input itself
            computed.set_friendly_name(COMPUTED_WEIGHT + key)
        for target in replaced.output(0).get_target_inputs():
            target.replace_source_output(computed.output(0))
    graph.add_parameters(list(inputs.values()))
    graph.validate_nodes_and_infer_types()
    return graph, list(inputs)


def _close(weight: np.ndarray, expected: np.ndarray) -> bool:
    return weight.shape == expected.shape and np.allclose(weight, expected, rtol=1e-6, atol=0)


def _rounds_alike(constant, scale: np.ndarray, expected: np.ndarray) -> bool:
    """Whether NNCF's int8 `constant` is `expected` rounded to steps of `scale`, but for a rare step either way."""
    rounded = np.clip(np.round(expected / scale), -128, 127)
    return np.abs(rounded - constant.get_data()).max() <= 1 and (rounded != constant.get_data()).mean() <= 1e-4


def _smoothing_factors(product, weight_rank: int) -> np.ndarray | None:
    """The factors NNCF's SmoothQuant multiplies `product`'s activations by (its input channels), shaped to divide
    its weight by; None where it smoothed nothing."""
    source = product.input(0).get_source_output().get_node()
    if source.get_type_name() == "FakeQuantize":
        source = source.input(0).get_source_output().get_node()
    if source.get_type_name() != "Multiply" or not source.get_friendly_name().endswith("nncf_smooth_quant"):
        return None
    factors = source.input(1).get_source_output().get_node().get_data()
    return factors.reshape((1, -1) + (1,) * (weight_rank - 2))


def _int8_weight(weight):
    """Where `weight` is NNCF's int8 weight times its per-channel scale, the int8 constant and the scale."""
    if weight.get_type_name() != "Multiply":
        return None
    converted, scale = (weight.input(index).get_source_output().get_node() for index in (0, 1))
    if converted.get_type_name() != "Convert" or scale.get_type_name() != "Constant":
        return None
    constant = converted.input(0).get_source_output().get_node()
    if constant.get_type_name() != "Constant" or constant.get_output_element_type(0) != _openvino().Type.i8:
        return None
    return constant, scale.get_data()


def _fill_in_model_weights(graph, model: CaptionModel, digest: str | None):
    """The int8 graph (`_leave_out_model_weights`) with the weights of `model` in it, computed as NNCF made them.
    RuntimeUnavailable if they are not the weights it was made for (`digest`)."""
    from openvino import opset13 as ops

    state = _numpy_state(model)
    weights = {
        node.get_friendly_name().removeprefix(MODEL_WEIGHT): node
        for node in graph.get_parameters()
        if node.get_friendly_name().startswith(MODEL_WEIGHT)
    }
    if any(key not in state for key in weights) or _weights_digest(state, list(weights)) != digest:
        raise RuntimeUnavailable(
            "this model file's int8 encoder was made for other weights (python hub.py quantize MODEL --data DATA "
            "makes it again)"
        )
    for key, parameter in weights.items():
        parameter.output(0).replace(ops.constant(state[key]).output(0))
        graph.remove_parameter(parameter)
    for computed in graph.get_ops():
        if computed.get_friendly_name().startswith(COMPUTED_WEIGHT):
            computed.output(0).replace(ops.constant(_evaluate(computed.output(0))).output(0))
    return graph


def _evaluate(output) -> np.ndarray:
    """The value of a graph `output` that depends on constants alone."""
    ov = _openvino()
    node = output.get_node()
    if node.get_type_name() == "Constant":
        return node.get_data()
    inputs = [ov.Tensor(_evaluate(source.get_source_output())) for source in node.inputs()]
    outputs = [ov.Tensor(result.get_element_type(), result.get_shape()) for result in node.outputs()]
    if not node.evaluate(outputs, inputs):
        raise RuntimeUnavailable(f"OpenVINO could not compute {node.get_friendly_name()} ({node.get_type_name()})")
    return outputs[output.get_index()].data


def _convert(model: CaptionModel, recogniser: nn.Module | None, folder: Path) -> None:
    """Trace every graph from the float32 models and save them in `folder` (written whole, then renamed)."""
    ov = _openvino()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        for name, (module, example, shapes) in _graphs(model, recogniser).items():
            ov.save_model(_trace(module, example, shapes), staging / f"{name}.xml", compress_to_fp16=False)
        staging.rename(folder)
    except OSError:
        if not (folder / "encoder.xml").exists():  # not another process converting the same model meanwhile
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class _StackedCache(KVCache):
    """A KV cache whose image keys and values are also held stacked, as a compiled step reads them."""

    stacked_image_keys: Tensor = field(default_factory=lambda: torch.zeros(0))
    stacked_image_values: Tensor = field(default_factory=lambda: torch.zeros(0))


class CompiledSteps:
    """Decoding (`model.StepDecoder`) through a compiled `StepGraph`: `step` takes and returns its tensors. The
    cache is kept in `dtype`, every slot zeroed first (a masked slot is still read, so none may hold NaN)."""

    def __init__(self, model: CaptionModel, step: Callable[..., tuple[Tensor, Tensor, Tensor]], dtype: torch.dtype):
        self.model = model  # computes each image's cross-attention keys and values, and a prompt model's prompt
        self.config = model.config
        self.step = step
        self.dtype = dtype

    def start_cache(self, image_tokens: Tensor, rows_per_image: int, max_length: int) -> KVCache:
        cache = self.model.start_cache(image_tokens, rows_per_image, max_length)
        keys, values = (torch.zeros_like(part, dtype=self.dtype) for part in (cache.keys, cache.values))
        keys[:, :, :, : cache.prompt_length] = cache.keys[:, :, :, : cache.prompt_length]
        values[:, :, :, : cache.prompt_length] = cache.values[:, :, :, : cache.prompt_length]
        stacked = (torch.stack(part).to(self.dtype) for part in (cache.image_keys, cache.image_values))
        return _StackedCache(keys, values, cache.image_keys, cache.image_values, cache.prompt_length, *stacked)

    def decode_step(self, input_ids: Tensor, cache: KVCache, position: int) -> Tensor:
        return self.decode_positions(input_ids, cache, position)[:, -1]

    def decode_positions(self, input_ids: Tensor, cache: KVCache, position: int) -> Tensor:
        """As `CaptionModel.decode_positions`: logits (B, T, vocab); the new keys and values go into `cache`."""
        if not isinstance(cache, _StackedCache):
            raise TypeError("the cache must come from this model's start_cache")
        start, length = cache.prompt_length + position, input_ids.shape[1]
        if position + length > self.config.n_positions or start + length > cache.capacity:
            raise ValueError(f"text positions up to {position + length} exceed the cache or the decoder's limit")
        logits, new_keys, new_values = self.step(
            input_ids, torch.arange(position, position + length), cache.keys, cache.values,
            torch.arange(cache.capacity) < start, cache.stacked_image_keys, cache.stacked_image_values,
        )  # fmt: skip
        cache.keys[:, :, :, start : start + length] = new_keys
        cache.values[:, :, :, start : start + length] = new_values
        return logits


class OpenVinoModel:
    """A model's encoder, recogniser and decoding step compiled by OpenVINO. Safe to call from several threads (one
    inference request per thread)."""

    def __init__(self, model: CaptionModel, compiled: dict, precision: str):
        self.precision = precision
        self._compiled = compiled  # OpenVINO's compiled models by graph name
        self._requests = threading.local()
        # Decoding through its compiled step, as decoding.py decodes `CaptionModel`; None where PyTorch decodes.
        self.steps = CompiledSteps(model, self._step, torch.float32) if "step" in compiled else None

    @classmethod
    def compile(
        cls, model: CaptionModel, precision: str, cache: Path | None = None, recogniser: nn.Module | None = None,
        step: bool | None = None, int8_encoder: dict | None = None,
    ) -> "OpenVinoModel":  # fmt: skip
        """The graphs of the float32 `model` (and of an ImageNet `recogniser`, labels.py) compiled for this CPU in
        `precision` (PRECISION_HINTS; the recogniser always in float32, so that the labels are PyTorch's),
        converted on first use and kept in `cache` (default `cache_folder()`). The decoding step is compiled where
        `step` says, by default where it beats PyTorch's (STEP_PRECISIONS). "int8-encoder" runs the model file's
        `int8_encoder` (`quantize_encoder`'s). RuntimeUnavailable if OpenVINO is missing or refuses the model."""
        if precision not in PRECISION_HINTS:
            raise ValueError(f"OpenVINO runs {', '.join(PRECISION_HINTS)}, not {precision}")
        if precision == INT8_ENCODER and int8_encoder is None:
            raise RuntimeUnavailable(
                "this model file has no int8 encoder (python hub.py quantize MODEL --data DATA adds one)"
            )
        ov = _openvino()
        folder = (cache or cache_folder()) / model_key(model, recogniser)
        hints = {"encoder": PRECISION_HINTS[precision], "step": PRECISION_HINTS[precision], "recogniser": "f32"}
        try:
            if not (folder / "encoder.xml").exists():
                _convert(model, recogniser, folder)
            core = ov.Core()
            compiled = {}
            step = precision in STEP_PRECISIONS if step is None else step
            used = ["encoder", *(["step"] if step else []), *(["recogniser"] if recogniser is not None else [])]
            for name in used:
                options = {
                    "INFERENCE_PRECISION_HINT": hints[name],
                    "PERFORMANCE_HINT": "LATENCY",
                    "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # as many as PyTorch was given (a Ray actor's)
                    "CACHE_DIR": str(folder / "compiled"),
                }
                graph = folder / f"{name}.xml"
                if name == "encoder" and precision == INT8_ENCODER:
                    graph = core.read_model(int8_encoder["graph"].encode(), int8_encoder["weights"].numpy().tobytes())
                    graph = _fill_in_model_weights(graph, model, int8_encoder.get("model_weights_sha256"))
                compiled[name] = core.compile_model(graph, "CPU", options)
        except (RuntimeError, OSError) as error:  # OpenVINO's conversion and compilation errors are RuntimeErrors
            raise RuntimeUnavailable(f"OpenVINO could not compile this model: {error}") from error
        return cls(model, compiled, precision)

    def _infer(self, name: str, inputs: list[np.ndarray]) -> list[Tensor]:
        requests = self._requests.__dict__
        if name not in requests:
            requests[name] = self._compiled[name].create_infer_request()
        results = requests[name].infer(inputs, share_inputs=True)  # read in place, not copied
        # The arrays are the request's own buffers, overwritten by its next call: copied out.
        return [torch.from_numpy(np.array(results[index])) for index in range(len(results))]

    def encode_with_class_token(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """`CaptionModel.encode_with_class_token` in one call: the image's tokens and its class token (float32)."""
        tokens, class_tokens = self._infer("encoder", [pixels.float().cpu().numpy()])
        return tokens, class_tokens

    def classify(self, pixels: Tensor) -> Tensor:
        """The recogniser's ImageNet logits (B, 1000) for its pixels (labels.py); compiled with one only."""
        [logits] = self._infer("recogniser", [pixels.float().contiguous().cpu().numpy()])
        return logits

    def _step(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, new_keys, new_values = self._infer("step", [tensor.cpu().numpy() for tensor in inputs])
        return logits, new_keys, new_values
