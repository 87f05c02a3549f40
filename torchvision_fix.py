"""Make `import torchvision` -- and with it `import timm` and transformers' GPT-2 -- work beside a CPU-only torch.

PyPI's torchvision wheels are CUDA builds. Beside the CPU torch we pin (torch==2.13.0), their C++ extension fails to
load, and torchvision's own import then dies while registering fake kernels for two operators that the extension
would have defined: ``RuntimeError: operator torchvision::nms does not exist``. Defining those two operator schemas
lets the pure-Python parts of torchvision import (all that timm and transformers use); the detection operators
themselves stay unavailable, and this project never calls them.

Where torchvision imports normally (a CUDA torch, a Mac, a Hugging Face Space) this does nothing. Import this module
before timm or transformers; ``model.py`` does.
"""

import sys

import torch

# The operators torchvision registers fake kernels for without first checking that its extension loaded.
_UNGUARDED_OPERATOR_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def ensure_torchvision_importable() -> bool:
    """Import torchvision, defining the operators its failed extension left out if that import fails.

    Returns:
        True when the workaround was needed, False when torchvision imported as it is (or is not installed).
    """
    try:
        import torchvision
    except ImportError:
        return False
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    else:
        return False
    # The failed import left half-initialised modules behind; import them afresh once the operators exist.
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]
    for qualified_name, schema in _UNGUARDED_OPERATOR_SCHEMAS.items():
        torch.library.define(qualified_name, schema)
    import torchvision  # noqa: F401

    return True


WORKAROUND_APPLIED = ensure_torchvision_importable()
