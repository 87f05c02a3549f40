"""Token merging (ToMe, Bolya et al., ICLR 2023) in the encoder's later blocks: val scores against encoder time.

    python scripts/token_merging_trial.py --model captioner.pt --data ../shared/data/flickr8k --merge 0 8 16 24

For each r, every one of the encoder's last --blocks blocks merges the r most similar pairs of its tokens (bipartite
soft matching on the tokens after attention, size-weighted averages; the class token is never merged), and before
the bridge each merged token is spread back to the patches it came from, so the decoder reads the grid it was
trained on. Prints the val scores (the model's default decoding, in PyTorch) and the encoder's time for one photo and
a photo of a batch of 16, in PyTorch bfloat16 and traced into OpenVINO
(bfloat16). r = 0 is the unmerged encoder. `--time-only` skips the scores.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import timed
from captioner import Captioner, EncodedImages
from data import load_split
from evaluate import caption_encoded, score_captions
from images import load_image
from model import ImageEncoder


def merge_pairs(x: Tensor, size: Tensor, source: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the r most similar (even-place, odd-place) token pairs of x (B, N, C): tokens at even places each
    choose their most similar odd one, and the r best choices merge into it (size-weighted). `size` (B, N, 1) counts
    the patches each token holds, `source` (B, N_patches) says which token holds each patch; all three are
    returned for the merged tokens, the unmerged even ones first. Gathers and scatters only, so that a traced graph
    (OpenVINO) keeps it."""
    width = x.shape[-1]
    metric = x / x.norm(dim=-1, keepdim=True)
    even, odd = metric[:, ::2], metric[:, 1::2]
    similarity = even @ odd.transpose(1, 2)
    similarity[:, 0] = -torch.inf  # the class token (place 0) stays itself
    best, partner = similarity.max(dim=-1)  # (B, N_even)
    order = best.argsort(dim=-1, descending=True)
    kept, merged = order[:, r:], order[:, :r]
    targets = partner.gather(1, merged)  # (B, r): the odd token each merged even token joins
    weighted = x * size
    even_x, odd_x, even_size, odd_size = weighted[:, ::2], weighted[:, 1::2], size[:, ::2], size[:, 1::2]

    def rows(tensor: Tensor, index: Tensor) -> Tensor:
        return tensor.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))

    odd_x = odd_x.scatter_add(1, targets[..., None].expand(-1, -1, width), rows(even_x, merged))
    odd_size = odd_size.scatter_add(1, targets[..., None], rows(even_size, merged))
    new_x = torch.cat([rows(even_x, kept), odd_x], dim=1)
    new_size = torch.cat([rows(even_size, kept), odd_size], dim=1)
    # Where each old token went: kept even tokens to their place in `kept`, merged ones to their partner's place.
    count = kept.shape[1]
    even_places = torch.zeros_like(partner).scatter(1, kept, torch.arange(count).expand_as(kept))
    even_places = even_places.scatter(1, merged, count + targets)
    odd_places = count + torch.arange(odd.shape[1]).expand(x.shape[0], -1)
    places = torch.zeros(x.shape[:2], dtype=torch.long)
    places = places.scatter(1, torch.arange(0, x.shape[1], 2).expand_as(even_places), even_places)
    places = places.scatter(1, torch.arange(1, x.shape[1], 2).expand_as(odd_places), odd_places)
    return new_x / new_size, new_size, places.gather(1, source)


def encode_merged(encoder: ImageEncoder, pixels: Tensor, r: int, blocks: int) -> Tensor:
    """`encoder(pixels)` with r pairs merged in each of the last `blocks` blocks, spread back to every patch."""
    vit = encoder.vit
    x = encoder.stem(pixels)
    size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype)
    source = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    for index, block in enumerate(vit.blocks):
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        if r and index >= len(vit.blocks) - blocks:
            x, size, source = merge_pairs(x, size, source, r)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    x = x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))
    return encoder.head(x)


def encode_split(captioner: Captioner, paths: list[Path], r: int, blocks: int) -> list[tuple[list, EncodedImages]]:
    """(names, encodings) in batches of 16, as evaluate.caption_encoded reads them."""
    model, encoded = captioner.model, []
    with torch.inference_mode():
        for start in range(0, len(paths), 16):
            batch = paths[start : start + 16]
            pixels = captioner.transform([load_image(p) for p in batch]).to(captioner.dtype)
            tokens = encode_merged(model.encoder, pixels, r, blocks)
            encoded.append(([p.name for p in batch], EncodedImages(model.bridge(tokens), tokens[:, 0])))
    return encoded


class _MergingEncoder(nn.Module):
    def __init__(self, encoder: ImageEncoder, r: int, blocks: int):
        super().__init__()
        self.encoder, self.r, self.blocks = encoder, r, blocks

    def forward(self, pixels: Tensor) -> Tensor:
        return encode_merged(self.encoder, pixels, self.r, self.blocks)


def encoder_ms(captioner: Captioner, paths: list, r: int, blocks: int, batch: int, openvino: bool) -> float:
    """The merging encoder's median time a photo over 5 runs at this batch size: in PyTorch in the captioner's
    precision, or traced and compiled by OpenVINO in bfloat16."""
    pixels = captioner.transform([load_image(p) for p in paths[:batch]])
    module = _MergingEncoder(captioner.model.encoder, r, blocks).eval()
    if openvino:
        import openvino as ov

        with torch.no_grad():
            graph = ov.convert_model(module.float(), example_input=pixels[:1], input=[(-1, *pixels.shape[1:])])
        options = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
        request = ov.Core().compile_model(graph, "CPU", options).create_infer_request()
        module.to(captioner.dtype)

        def run() -> object:
            return request.infer([pixels.numpy()])
    else:
        pixels = pixels.to(captioner.dtype)

        def run() -> object:
            return module(pixels)

    with torch.inference_mode():
        seconds, _ = timed(run, 5)  # after a warm-up run
    return seconds / batch * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--merge", type=int, nargs="+", default=[0, 8, 16, 24], help="pairs merged per block")
    parser.add_argument("--blocks", type=int, default=8, help="the last blocks that merge")
    parser.add_argument("--limit", type=int, default=None, help="only the first photos of the split")
    parser.add_argument("--time-only", action="store_true", help="time the encoders without captioning the split")
    arguments = parser.parse_args()
    tokens = 257  # a DINOv2 ViT-S/14 at 224 px: its class token and 16 x 16 patches
    for r in arguments.merge:
        if any(r > (tokens - r * merged + 1) // 2 - 1 for merged in range(arguments.blocks)):
            parser.error(f"merging {r} pairs in each of {arguments.blocks} blocks runs out of tokens to merge")
    captioner = Captioner.load(arguments.model, device="cpu", dtype="bfloat16", runtime="torch")
    items = load_split(arguments.data, arguments.split)[: arguments.limit]
    paths = [item.image for item in items]
    references = {item.image.name: list(item.captions) for item in items}
    config = captioner.default_config()
    print(
        f"{len(items)} {arguments.split} photos, {captioner.precision}, merging in the last {arguments.blocks} blocks"
    )
    print(
        "| pairs merged per block | tokens after the encoder's blocks | BLEU-4 | CIDEr "
        "| PyTorch: encoder ms, one photo | ms a photo of 16 | OpenVINO bfloat16: ms, one photo | ms a photo of 16 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in arguments.merge:
        scores = {"BLEU-4": "–", "CIDEr": "–"}
        if not arguments.time_only:
            encoded = encode_split(captioner, paths, r, arguments.blocks)
            measured = score_captions(references, caption_encoded(captioner, encoded, config))
            scores = {name: f"{measured[name]:.3f}" for name in scores}
        tokens = captioner.model.encoder.vit.patch_embed.num_patches + 1 - r * arguments.blocks
        times = [
            f"{encoder_ms(captioner, paths, r, arguments.blocks, batch, openvino):.1f}"
            for openvino in (False, True)
            for batch in (1, 16)
        ]
        print(f"| {r} | {tokens} | {scores['BLEU-4']} | {scores['CIDEr']} | " + " | ".join(times) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
