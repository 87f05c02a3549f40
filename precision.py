"""Where the model runs and in which precision: the one default device and the one precision vocabulary.

Precision names are config.PRECISIONS: "float32", "bfloat16", "float16", "int8" (float32 compute with int8 decoder
weights, CPU only), "bfloat16-int8" (bfloat16 compute with int8 decoder weights, CPUs with native bfloat16),
"int8-encoder" (OpenVINO only: the encoder's MLP matrix products in int8, weights and activations, from the model
file's int8 graph; decoding as "bfloat16-int8") and "auto" (resolved here). A precision runs in one of config.RUNTIMES:
"torch", or "openvino" for the encoder (float32, bfloat16, int8) and the decoding step; recorded scores and the
speed order name the pair a setting, "openvino-bfloat16" (`setting_name`).
"""

import warnings
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import openvino_runtime
from config import RUNTIMES

if TYPE_CHECKING:  # release.py imports this module's setting names
    from release import ModelInfo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT8 = "int8"
BFLOAT16_INT8 = "bfloat16-int8"
INT8_ENCODER = openvino_runtime.INT8_ENCODER
# int8 decoder weights, and the compute dtype of the rest (of the decoder alone in "int8-encoder")
QUANTIZED = {INT8: torch.float32, BFLOAT16_INT8: torch.bfloat16, INT8_ENCODER: torch.bfloat16}
TORCH, OPENVINO = "torch", "openvino"
OPENVINO_PRECISIONS = tuple(openvino_runtime.PRECISION_HINTS)
# Settings fastest first, for one photo end to end (docs/speed.md): what "auto" tries, in this order. OpenVINO's
# encoder beats PyTorch's in the same precision, and its float32 beats PyTorch's int8 and float32; its int8 encoder
# beats its bfloat16 one. On our CPU bfloat16 beats int8 because it halves the encoder's time too, where int8 only
# shrinks the decoder; bfloat16 with int8 decoder weights beats both.
SPEED_ORDER = (
    "openvino-int8-encoder", "openvino-bfloat16-int8", "openvino-bfloat16", BFLOAT16_INT8, "bfloat16", "float16",
    "openvino-float32", INT8, "float32",
)  # fmt: skip
OPENVINO_SETTINGS = tuple(name for name in SPEED_ORDER if name.startswith(f"{OPENVINO}-"))  # fastest first


def default_device() -> torch.device:
    """A GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_dtype(precision: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a precision name (or the dtype itself); ValueError naming the choices otherwise."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {precision!r}")
    return DTYPES[precision]


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the activations (and unquantized weights) of an inference precision."""
    return QUANTIZED[precision] if precision in QUANTIZED else to_dtype(precision)


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags the CPU reports (Linux /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_half(device: torch.device, flags: frozenset[str] | None = None) -> torch.dtype | None:
    """The half precision `device` computes natively, or None.

    GPUs: bfloat16 where supported, else float16. CPUs: bfloat16 only with AVX-512 BF16 or AMX instructions; without
    them bfloat16 is emulated and slower than float32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    flags = cpu_flags() if flags is None else flags
    return torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype training autocasts to (None: plain float32). "auto": the device's native half precision."""
    if precision == "auto":
        return native_half(device)
    dtype = to_dtype(precision)
    return None if dtype == torch.float32 else dtype


def quantized_engine() -> str:
    """The int8 kernel library torch uses on this CPU (x86/fbgemm/onednn, qnnpack on ARM; "none" without one)."""
    return torch.backends.quantized.engine


def setting_name(runtime: str, precision: str) -> str:
    """How recorded scores and SPEED_ORDER name `precision` run by `runtime`: "bfloat16", "openvino-bfloat16"."""
    return precision if runtime == TORCH else f"{runtime}-{precision}"


def split_setting(name: str) -> tuple[str, str]:
    """(runtime, precision) of a setting name."""
    runtime, _, precision = name.partition("-")
    return (runtime, precision) if runtime == OPENVINO else (TORCH, name)


def runs_natively(setting: str, device: torch.device) -> bool:
    """Whether `device` computes the setting (a precision, or "openvino-" and one) in hardware (so that it is faster
    than float32, not emulated), with the runtime it names installed."""
    runtime, precision = split_setting(setting)
    if runtime == OPENVINO:
        return (
            device.type == "cpu"
            and precision in OPENVINO_PRECISIONS
            and _computes(precision, device)
            and openvino_runtime.available()
        )
    return precision != INT8_ENCODER and _computes(precision, device)


def _computes(precision: str, device: torch.device) -> bool:
    """Whether `device` has the instructions that make `precision` faster than float32."""
    if precision == INT8:
        return device.type == "cpu" and quantized_engine() != "none"
    if precision == INT8_ENCODER:  # int8 dot products (VNNI, AMX), and bfloat16 for the rest
        return _computes(BFLOAT16_INT8, device) and bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if precision == BFLOAT16_INT8:
        return device.type == "cpu" and native_half(device) == torch.bfloat16
    return precision == "float32" or native_half(device) == to_dtype(precision)


def inference_precision(precision: str | torch.dtype, device: torch.device, accepted: Collection[str] = ()) -> str:
    """The precision name to run a model in.

    "auto": the fastest of `accepted` (the precisions whose test scores matched float32's when the model was
    released, recorded with it) that this device computes natively, else float32.
    """
    if isinstance(precision, torch.dtype):
        return next(name for name, dtype in DTYPES.items() if dtype == precision)
    if precision not in ("auto", *DTYPES, *QUANTIZED):
        raise ValueError(f"dtype must be one of auto, {', '.join([*DTYPES, *QUANTIZED])}, not {precision!r}")
    if precision in QUANTIZED:
        if device.type != "cpu":
            raise ValueError(
                f"dtype {precision} runs on CPUs only, not on {device.type}: choose bfloat16 or float16 there"
            )
        return precision
    if precision != "auto":
        return precision
    return _fastest(accepted, device, (TORCH,)) or "float32"


def _fastest(accepted: Collection[str], device: torch.device, runtimes: Collection[str] = RUNTIMES) -> str | None:
    """The first setting of SPEED_ORDER that is `accepted`, run by one of `runtimes` and native on `device`."""
    return next(
        (
            name
            for name in SPEED_ORDER
            if name in accepted and split_setting(name)[0] in runtimes and runs_natively(name, device)
        ),
        None,
    )


def inference_setting(
    precision: str | torch.dtype, runtime: str, device: torch.device, accepted: Collection[str] = ()
) -> tuple[str, str]:
    """The runtime and precision name to run a model in.

    "auto" runtime: OpenVINO where the model's recorded scores accept it (`accepted`, setting names) and this CPU
    runs it natively, in the given precision or ("auto") the fastest accepted; else PyTorch. "openvino": that
    runtime (OPENVINO_PRECISIONS; "auto": the fastest of them accepted and native, else float32),
    RuntimeUnavailable without it.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == OPENVINO:
        if device.type != "cpu":
            raise ValueError(f"the openvino runtime runs on CPUs, not on {device.type}: choose torch there")
        if not openvino_runtime.available():
            raise openvino_runtime.RuntimeUnavailable(
                f"the OpenVINO runtime is not installed: {openvino_runtime.INSTALL}"
            )
        if precision == "auto":
            return OPENVINO, split_setting(_fastest(accepted, device, (OPENVINO,)) or "openvino-float32")[1]
        name = inference_precision(precision, device)
        if name not in OPENVINO_PRECISIONS:
            raise ValueError(f"the openvino runtime runs {', '.join(OPENVINO_PRECISIONS)}, not {name}")
        return OPENVINO, name
    if runtime == TORCH:
        name = inference_precision(precision, device, accepted)
        if name == INT8_ENCODER:
            raise ValueError(f"{INT8_ENCODER} runs in the openvino runtime only, not in torch")
        return TORCH, name
    if precision == "auto":
        return split_setting(_fastest(accepted, device) or "float32")
    name = inference_precision(precision, device)
    if name == INT8_ENCODER:
        return inference_setting(name, OPENVINO, device, accepted)
    faster = setting_name(OPENVINO, name) in accepted and runs_natively(setting_name(OPENVINO, name), device)
    return (OPENVINO if faster else TORCH), name


# A faster precision is used by default ("auto") only if its scores are at most this much below float32's. One-sided:
# scoring higher than float32 is no reason to refuse it.
PRECISION_TOLERANCE = {"CIDEr": 0.01, "BLEU-4": 0.01}


def qualifying_precisions(scores: dict[str, dict[str, float]]) -> list[str]:
    """The precisions among `scores` (by precision name, the same split's metrics, float32's included) whose scores
    are no more than PRECISION_TOLERANCE below float32's, fastest first."""
    float32 = scores["float32"]
    return [
        name
        for name in SPEED_ORDER
        if name in scores
        and all(float32[metric] - scores[name][metric] <= limit for metric, limit in PRECISION_TOLERANCE.items())
    ]


def accepted_precisions(info: "ModelInfo") -> list[str]:
    """The precisions a model file's recorded scores qualify (evaluate.py precision), fastest first; files
    without scores name their accepted precisions, or before int8 only their one chosen precision."""
    if "float32" in (info.precision_scores or {}):
        return qualifying_precisions(info.precision_scores)
    return list(info.precisions or ([info.precision] if info.precision else []))


def quantize_int8(model: nn.Module) -> nn.Module:
    """`model` with the decoder's linear layers holding int8 weights, one scale per output channel; activations
    are quantized on the fly (torch's dynamic quantization, CPU only).

    Decoding is bound by reading the decoder's weights once per token, so a quarter of float32's bytes is where the
    time goes down. The image encoder runs once per photo and stays float32: quantized, it changed which objects the
    captions named. The LM head (the token embedding, transposed) is not a linear layer and stays float32 too.
    """
    # torch.ao's dynamic quantization is deprecated in favour of torchao, but it is what has fast int8 CPU kernels
    # (fbgemm/oneDNN) for float32 activations: torch._weight_int8pack_mm, the weight-only op torchao uses, measured
    # 10x slower than float32 with them here (with bfloat16 activations it is fast: Int8WeightLinear). torch is
    # pinned exactly, so its deprecation warnings only tell users what we already know.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions", category=UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        layers = {
            f"decoder.{name}": per_channel_dynamic_qconfig
            for name, module in model.decoder.named_modules()
            if isinstance(module, nn.Linear)
        }
        return quantize_dynamic(model, layers, dtype=torch.qint8)


def quantize(model: nn.Module, precision: str) -> nn.Module:
    """`model` with int8 decoder weights where `precision` asks for them, quantized from its float32 weights, and the
    rest in `compute_dtype(precision)`."""
    if precision == INT8:
        return quantize_int8(model.float())
    if precision in (BFLOAT16_INT8, INT8_ENCODER):
        for module in list(model.decoder.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, Int8WeightLinear(child))
    return model.to(compute_dtype(precision))


class Int8WeightLinear(nn.Module):
    """A linear layer whose weight is int8 with one scale per output channel, for bfloat16 activations.

    Weight-only: the activations stay bfloat16 and torch's `_weight_int8pack_mm` (the kernel torchao's weight-only
    int8 uses) multiplies them by the int8 weight directly. That is quick for the few rows of one photo's decoding
    step, which reads each weight once (the shipped model decodes a photo in 43 ms against bfloat16's 64,
    docs/speed.md), and slower than bfloat16's matrix product from FEW_ROWS rows on; there the same weights,
    dequantized to bfloat16 once, are multiplied by bfloat16's matrix product.
    """

    # `python benchmark.py int8-rows`: for a 512 x 2048 layer the int8 kernel took 30 us against bfloat16's 50 at 3
    # rows, 65 against 55 at 6 rows.
    FEW_ROWS = 4

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1).clamp_min(1e-12) / 127).to(torch.bfloat16)  # rounded before use
        steps = weight / scales.float()[:, None]
        self.register_buffer("weight", steps.round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        dequantized = self.weight.to(torch.bfloat16) * scales[:, None]
        self.register_buffer("dequantized", dequantized, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        if rows.shape[0] > self.FEW_ROWS:
            out = F.linear(rows, self.dequantized, self.bias)
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
