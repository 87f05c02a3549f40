"""Where the model runs and in which precision: the one default device and the one precision vocabulary.

Precision names are config.PRECISIONS: "float32", "bfloat16", "float16", and "auto" (resolved here).
"""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def inference_dtype(precision: str | torch.dtype, device: torch.device, recorded: str | None = None) -> torch.dtype:
    """The dtype to run a model in. "auto": the precision recorded with the model (the fastest whose test scores
    matched float32's when it was released) where this device computes it natively, else float32."""
    if precision != "auto":
        return to_dtype(precision)
    if recorded is None or to_dtype(recorded) == torch.float32:
        return torch.float32
    return to_dtype(recorded) if native_half(device) == to_dtype(recorded) else torch.float32
