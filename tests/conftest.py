"""Shared fixtures: tiny models and tokenizers built here, so the suite runs on a fresh clone without ../shared."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # the research and load scripts, and the app launcher they share

import torchvision_fix  # noqa: E402, F401  (before transformers and timm)

# isort: split
from server import start_app, stop_app  # noqa: E402

from checkpoint import save_captioner  # noqa: E402
from config import PRESETS  # noqa: E402
from images import ImageTransform, load_image  # noqa: E402
from model import CaptionModel  # noqa: E402
from pretrained import from_parts  # noqa: E402
from tokenizer import train_caption_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared"
FLICKR8K = SHARED / "data" / "flickr8k"
DINOV2_WEIGHTS = SHARED / "weights" / "dinov2-vit-small-patch14" / "model.safetensors"
GPT2_TOKENIZER = SHARED / "weights" / "gpt2-tokenizer"


def needs_shared(path: Path):
    """Skip a test that reads ../shared where the checkout has none (a user's fresh clone)."""
    return pytest.mark.skipif(not path.exists(), reason=f"needs {path}, which only exists beside our own checkouts")


TINY_CAPTIONS = [
    "a dog runs on the grass",
    "a black dog is running through the grass",
    "two children play in the water",
    "a man rides a bike down the street",
    "a woman in a red shirt is smiling",
    "a cat sits on a red chair",
    "a brown dog jumps over a log",
    "people are walking on the beach",
]


@pytest.fixture(scope="session", autouse=True)
def openvino_conversions_in_a_temporary_folder(tmp_path_factory):
    """Models converted for OpenVINO go to the session's temporary folder, not the user's cache."""
    import openvino_runtime

    folder = tmp_path_factory.mktemp("openvino")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openvino_runtime, "cache_folder", lambda: folder)
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_caption_tokenizer(TINY_CAPTIONS * 4, vocab_size=PRESETS["tiny"].vocab_size)


def make_decisive(model: CaptionModel, eos_token_id: int, eos_bias: float, seed: int = 0) -> CaptionModel:
    """Give a random model image-dependent captions that end at different steps.

    GPT-2's init gives near-uniform logits that echo the input token (with BOS = EOS: captions end at once); larger
    weights make choices decisive, and a bias along the EOS embedding in ln_f sets how soon captions end.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.decoder.named_parameters():
            if parameter.dim() == 2 and not name.startswith("wpe"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        eos = model.decoder.wte.weight[eos_token_id]
        model.decoder.ln_f.bias.copy_(eos_bias * eos / eos.dot(eos))
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    torch.manual_seed(0)
    return from_parts(
        "vit_tiny_patch16_224",
        None,
        encoder_pretrained=False,
        image_size=32,
        base=PRESETS["tiny"],
        vocab_size=tiny_tokenizer.vocab_size,
    ).eval()


@pytest.fixture(scope="session")
def captioning_model(tiny_tokenizer):
    """A tiny model whose (meaningless) captions are several tokens long and differ between images."""
    torch.manual_seed(0)
    model = from_parts(
        "vit_tiny_patch16_224", None, encoder_pretrained=False, image_size=32, base=PRESETS["tiny"],
        vocab_size=tiny_tokenizer.vocab_size,
    ).eval()  # fmt: skip
    return make_decisive(model, tiny_tokenizer.eos_token_id, eos_bias=2.0)


def small_dataset(directory: Path) -> Path:
    """A data set folder of two example photos in train and in val, each captioned "a photo"."""
    for split in ("train", "val"):
        (directory / split).mkdir(parents=True)
        for name in ("cat.jpg", "coffee.jpg"):
            (directory / split / name).write_bytes((ROOT / "examples" / name).read_bytes())
            (directory / split / name).with_suffix(".txt").write_text("a photo\n")
    return directory


def int8_encoder(model: CaptionModel, photos: list[Path]) -> dict:
    """`model`'s encoder in int8, as `hub.py quantize` adds it to a model file, calibrated on `photos` (needs NNCF)."""
    import openvino_runtime

    transform = ImageTransform.for_model(model.config)
    return openvino_runtime.quantize_encoder(model, [transform([load_image(path)]) for path in photos])


def make_tiny_gpt2(directory: Path, *, cross_attention: bool, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 saved with `save_pretrained`, the way a hub checkpoint is laid out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=120,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        add_cross_attention=cross_attention,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # random, non-trivial norms and biases, so a mapping mistake shows
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def gpt2_with_cross_attention(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2-cross"), cross_attention=True)


@pytest.fixture(scope="session")
def gpt2_text_only(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2-text"), cross_attention=False, seed=1)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory, captioning_model, tiny_tokenizer) -> Path:
    """`captioning_model` saved as a model file, for the command lines."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_captioner(path, captioning_model, tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def app_server(tmp_path_factory, captioning_model, tiny_tokenizer):
    """The real app (python app.py) on a free loopback port, serving a tiny model; yields its URL."""
    model_path = tmp_path_factory.mktemp("model") / "captioner.pt"
    save_captioner(model_path, captioning_model, tiny_tokenizer, {"trained_on": "test fixture"})
    url, process = start_app(model_path)
    yield url
    stop_app(process)
