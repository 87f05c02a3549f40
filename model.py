"""The captioning model, in data-flow order.

    pixels (B, 3, H, W)
      -> ImageEncoder: a timm Vision Transformer's `forward_features`, every token kept    (B, N, C_img)
      -> Bridge: LayerNorm + Linear to the decoder width                                  (B, N, C)
      -> TextDecoder: GPT-2 blocks, each ln_1 -> causal self-attention,
         ln_cross -> cross-attention over the image tokens, ln_2 -> MLP; then ln_f         (B, T, C)
      -> LM head tied to the token embedding                                              (B, T, vocab)

The decoder blocks have the same structure as transformers' `GPT2Block(add_cross_attention=True)`, so GPT-2 weights
map onto them one to one (pretrained.py). This module maps tensors to tensors: no file access, tokenizer or PIL.
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchvision_fix  # noqa: F401  (must run before timm and transformers import torchvision)

# isort: split
import timm
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from config import ModelConfig

IGNORE_INDEX = -100  # label of positions that carry no loss (padding)


class ImageEncoder(nn.Module):
    """A timm Vision Transformer returning all its output tokens (class/register tokens, then patches).

    `forward` equals timm's `forward_features`. It is split into `stem`, `blocks` and `head` so that training with
    frozen early blocks can cache the tokens after them and run only the rest. Which parameters the last blocks own
    is decided here alone (`trainable_parameters`, `frozen_state`), for the optimizer and the feature cache alike.
    Pretrained weights are loaded by pretrained.py.
    """

    def __init__(self, name: str, image_size: int):
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}")
        try:
            self.vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
        except TypeError as error:  # architectures without `img_size`
            raise ValueError(f"encoder {name!r} is not a timm VisionTransformer ({error})") from error
        if not isinstance(self.vit, VisionTransformer):
            raise ValueError(f"encoder {name!r} is a {type(self.vit).__name__}, not a timm VisionTransformer")
        patch = self.vit.patch_embed.patch_size[0]
        if image_size % patch:
            nearest = sorted({max(patch, image_size // patch * patch), (image_size // patch + 1) * patch})
            raise ValueError(
                f"image_size={image_size} is not a multiple of {name}'s {patch}-pixel patches "
                f"(nearest: {' or '.join(map(str, nearest))})"
            )

    @property
    def width(self) -> int:
        return self.vit.embed_dim

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def data_config(self) -> dict:
        """The preprocessing the encoder's weights expect (mean, std, interpolation), from timm."""
        return timm.data.resolve_model_data_config(self.vit)

    def _last_blocks_and_head(self, count: int) -> list[nn.Module]:
        """The modules after the first `depth - count` blocks: the last `count` blocks and the final norms."""
        if not 0 <= count <= self.depth:
            raise ValueError(f"the encoder has {self.depth} blocks; cannot train the last {count}")
        return [*self.vit.blocks[self.depth - count :], self.vit.norm, self.vit.fc_norm, self.vit.head]

    def trainable_parameters(self, last_blocks: int) -> list[nn.Parameter]:
        """The parameters that training the last `last_blocks` blocks updates (with the final norm)."""
        if last_blocks == 0:
            return []
        return [p for module in self._last_blocks_and_head(last_blocks) for p in module.parameters()]

    def set_trainable(self, last_blocks: int) -> None:
        """Freeze the encoder except its last `last_blocks` blocks and final norm (0: all frozen)."""
        trainable = {id(p) for p in self.trainable_parameters(last_blocks)}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in trainable)

    def frozen_state(self, frozen_blocks: int) -> dict[str, Tensor]:
        """The tensors that determine the tokens after the first `frozen_blocks` blocks, by state-dict name."""
        later = {
            id(p) for module in self._last_blocks_and_head(self.depth - frozen_blocks) for p in module.parameters()
        }
        return {name: t for name, t in self.state_dict(keep_vars=True).items() if id(t) not in later}

    def stem(self, pixel_values: Tensor) -> Tensor:
        vit = self.vit
        tokens = vit.patch_embed(pixel_values)  # (B, N_patches, C_img)
        tokens = vit._pos_embed(tokens)  # (B, N, C_img) with the class/register tokens prepended
        return vit.norm_pre(vit.patch_drop(tokens))

    def blocks(self, tokens: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        for block in self.vit.blocks[start:stop]:
            tokens = block(tokens)
        return tokens

    def head(self, tokens: Tensor) -> Tensor:
        return self.vit.norm(tokens)

    def forward(self, pixel_values: Tensor, start_block: int = 0) -> Tensor:
        """All output tokens from pixels, or (`start_block` > 0) from the tokens after that many blocks."""
        tokens = self.stem(pixel_values) if start_block == 0 else pixel_values
        return self.head(self.blocks(tokens, start_block))


class Bridge(nn.Module):
    """Pools the patch grid (optional), normalises the image tokens and projects them to the decoder width."""

    def __init__(self, encoder: ImageEncoder, config: ModelConfig):
        super().__init__()
        self.prefix_tokens = encoder.vit.num_prefix_tokens  # class/register tokens, kept as they are
        self.grid = tuple(encoder.vit.patch_embed.grid_size)
        self.pool = config.image_pool
        if self.grid[0] % self.pool or self.grid[1] % self.pool:
            raise ValueError(f"image_pool={self.pool} does not divide the {self.grid[0]}x{self.grid[1]} patch grid")
        self.ln = nn.LayerNorm(encoder.width, eps=config.layer_norm_epsilon)
        self.proj = nn.Linear(encoder.width, config.n_embd)

    @property
    def output_grid(self) -> tuple[int, int]:
        return self.grid[0] // self.pool, self.grid[1] // self.pool

    def forward(self, image_tokens: Tensor) -> Tensor:
        if self.pool > 1:
            prefix, patches = image_tokens[:, : self.prefix_tokens], image_tokens[:, self.prefix_tokens :]
            batch, _, width = patches.shape
            grid = patches.transpose(1, 2).reshape(batch, width, *self.grid)  # (B, C, gh, gw)
            pooled = F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)  # (B, gh * gw / pool², C)
            image_tokens = torch.cat([prefix, pooled], dim=1)
        return self.proj(self.ln(image_tokens))


def _split_heads(x: Tensor, n_head: int) -> Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, n_head, width // n_head).transpose(1, 2)  # (B, nh, T, hs)


def _merge_heads(x: Tensor) -> Tensor:
    batch, n_head, length, head_size = x.shape
    return x.transpose(1, 2).reshape(batch, length, n_head * head_size)  # (B, T, C)


class Attention(nn.Module):
    """Multi-head attention with GPT-2's projections.

    Self-attention projects queries, keys and values from the text with one fused `c_attn`. Cross-attention projects
    queries from the text with `q_attn` and keys and values from the image tokens with a fused `c_attn`.
    """

    def __init__(self, config: ModelConfig, *, cross: bool):
        super().__init__()
        width = config.n_embd
        self.n_head = config.n_head
        self.cross = cross
        if cross:
            self.q_attn = nn.Linear(width, width)
            self.c_attn = nn.Linear(width, 2 * width)
        else:
            self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def image_keys_values(self, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values, (B, nh, N, hs) each: computed once per image, reused every step."""
        keys, values = self.c_attn(image_tokens).split(image_tokens.shape[-1], dim=2)
        return _split_heads(keys, self.n_head), _split_heads(values, self.n_head)

    def forward(
        self,
        x: Tensor,
        keys: Tensor | None = None,
        values: Tensor | None = None,
        *,
        start: int = 0,
        record: list[Tensor] | None = None,
    ) -> Tensor:
        """Attend from the text x (B, T, C).

        Self-attention: without `keys`, attend causally within x; with preallocated cache tensors `keys`/`values`
        (B, nh, T_max, hs), write this step's keys and values at positions start..start+T and attend to all before.
        Cross-attention: `keys`/`values` (B_img, nh, N, hs) come from `image_keys_values`. B may be a multiple of
        B_img: then each image's keys serve B // B_img consecutive rows (the beams of one image). With `record`, the
        attention weights (B, nh, T, N) are appended to it.
        """
        dropout = self.dropout if self.training else 0.0
        if self.cross:
            queries = _split_heads(self.q_attn(x), self.n_head)
            out = _attend_grouped(queries, keys, values, dropout, record)
        else:
            queries, new_keys, new_values = self._self_projections(x)
            if keys is None:
                out = F.scaled_dot_product_attention(queries, new_keys, new_values, dropout_p=dropout, is_causal=True)
            else:
                end = start + x.shape[1]
                keys[:, :, start:end] = new_keys
                values[:, :, start:end] = new_values
                out = _attend_after_cached(queries, keys[:, :, :end], values[:, :, :end], dropout)
        return self.resid_dropout(self.c_proj(_merge_heads(out)))

    def _self_projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's queries, keys and values of x (B, T, C), (B, nh, T, hs) each."""
        return tuple(_split_heads(part, self.n_head) for part in self.c_attn(x).split(x.shape[-1], dim=2))

    def after_cache(
        self, x: Tensor, cache_keys: Tensor, cache_values: Tensor, visible: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention of x's T new positions after the cached ones, at inference: the output and the new
        positions' keys and values, which the caller stores. `cache_keys`/`cache_values` (B, nh, C, hs) are a whole
        preallocated cache, `visible` (C,) marks its slots that hold earlier positions. The form a compiled decoding
        step takes: fixed shapes and no in-place writes, which tracing would not keep."""
        queries, new_keys, new_values = self._self_projections(x)
        length = x.shape[1]
        keys, values = torch.cat([cache_keys, new_keys], dim=2), torch.cat([cache_values, new_values], dim=2)
        causal = torch.arange(length, device=x.device)[None, :] <= torch.arange(length, device=x.device)[:, None]
        mask = torch.cat([visible[None, :].expand(length, -1), causal], dim=1)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        return self.c_proj(_merge_heads(out)), new_keys, new_values


def _attend_after_cached(queries: Tensor, keys: Tensor, values: Tensor, dropout: float = 0.0) -> Tensor:
    """Attention of T new positions, the last T of the keys: each sees every earlier key and the new ones up to
    itself."""
    length, total = queries.shape[2], keys.shape[2]
    mask = None
    if length > 1:
        mask = torch.ones(length, total, dtype=torch.bool, device=keys.device).tril(total - length)
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout)


def _attend_grouped(
    queries: Tensor, keys: Tensor, values: Tensor, dropout: float, record: list[Tensor] | None
) -> Tensor:
    """Attention where each key/value row serves a group of consecutive query rows, without copying the keys."""
    rows, n_head, length, head_size = queries.shape
    images = keys.shape[0]
    group = rows // images
    # (B, nh, T, hs) -> (B_img, nh, group * T, hs): a group's queries become one longer query sequence.
    queries = queries.view(images, group, n_head, length, head_size).transpose(1, 2)
    queries = queries.reshape(images, n_head, group * length, head_size)
    if record is None:
        out = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout)
    else:
        weights = torch.softmax(queries @ keys.transpose(-2, -1) / math.sqrt(head_size), dim=-1)
        out = weights @ values
        record.append(_ungroup(weights, group, length))
    return _ungroup(out, group, length)


def _ungroup(x: Tensor, group: int, length: int) -> Tensor:
    images, n_head, _, last = x.shape
    x = x.view(images, n_head, group, length, last).transpose(1, 2)  # (B_img, group, nh, T, last)
    return x.reshape(images * group, n_head, length, last)  # (B, nh, T, last)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2's gelu_new is the tanh approximation; the exact GELU would not reproduce its logits.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, cross=False)
        self.ln_cross = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.cross_attn = Attention(config, cross=True)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        image_keys: Tensor,
        image_values: Tensor,
        cache_keys: Tensor | None = None,
        cache_values: Tensor | None = None,
        *,
        start: int = 0,
        record: list[Tensor] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache_keys, cache_values, start=start)
        return self._after_self_attention(x, image_keys, image_values, record)

    def _after_self_attention(
        self, x: Tensor, image_keys: Tensor, image_values: Tensor, record: list[Tensor] | None = None
    ) -> Tensor:
        x = x + self.cross_attn(self.ln_cross(x), image_keys, image_values, record=record)
        return x + self.mlp(self.ln_2(x))

    def after_cache(
        self, x: Tensor, image_keys: Tensor, image_values: Tensor, cache_keys: Tensor, cache_values: Tensor,
        visible: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """`forward` at inference for x's new positions after a cache's visible slots (`Attention.after_cache`): the
        output and the new positions' keys and values."""
        attended, new_keys, new_values = self.attn.after_cache(self.ln_1(x), cache_keys, cache_values, visible)
        return self._after_self_attention(x + attended, image_keys, image_values), new_keys, new_values


@dataclass
class KVCache:
    """Attention keys and values for incremental decoding.

    The self-attention part is preallocated for the whole caption and filled one position per step; the
    cross-attention part is computed once per image and shared by all rows (beams) of that image.
    """

    keys: Tensor  # (L, B, nh, T_max, hs)
    values: Tensor  # (L, B, nh, T_max, hs)
    image_keys: tuple[Tensor, ...]  # per layer (B_img, nh, N, hs)
    image_values: tuple[Tensor, ...]  # per layer (B_img, nh, N, hs)
    prompt_length: int = 0  # slots before the text's position 0: a prompt read before it (retrieval_reading "prompt")

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reorder(self, rows: Tensor) -> None:
        """Keep the self-attention rows `rows` (B,), in that order, e.g. the surviving beams of each image."""
        self.keys = self.keys.index_select(1, rows)
        self.values = self.values.index_select(1, rows)


class StepDecoder(Protocol):
    """What decoding (decoding.py, speculative.py) needs of a model: `CaptionModel` itself, or its decoding step
    compiled by a runtime (openvino_runtime.py)."""

    config: ModelConfig

    def start_cache(self, image_tokens: Tensor, rows_per_image: int, max_length: int) -> KVCache: ...

    def decode_step(self, input_ids: Tensor, cache: KVCache, position: int) -> Tensor: ...

    def decode_positions(self, input_ids: Tensor, cache: KVCache, position: int) -> Tensor: ...


class TextDecoder(nn.Module):
    """GPT-2's transformer with a cross-attention block in every layer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def image_keys_values(self, image_tokens: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Every layer's cross-attention keys and values, (B, nh, N, hs) each; not stacked, which would copy them."""
        pairs = [block.cross_attn.image_keys_values(image_tokens) for block in self.h]
        return tuple(k for k, _ in pairs), tuple(v for _, v in pairs)

    def forward(
        self,
        input_ids: Tensor,
        image_keys: Sequence[Tensor],
        image_values: Sequence[Tensor],
        cache: KVCache | None = None,
        position: int = 0,
        record: list[Tensor] | None = None,
        prompt: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, T, C) for `input_ids` (B, T) at text positions `position`..`position` + T.

        With `cache`, their keys and values are written to it at those positions, and they attend to every earlier
        position held there (its prompt included); what the cache holds beyond them is ignored and overwritten later,
        so a caller goes back by passing an earlier position. Without `cache`, `position` must be 0, and `prompt`
        (B, P, C), input embeddings read before `input_ids`, plays the cache's prompt: its states are not returned.
        """
        length = input_ids.shape[1]
        if position + length > self.config.n_positions:
            raise ValueError(
                f"sequence of {position + length} tokens exceeds the decoder's limit of {self.config.n_positions}"
            )
        if cache is not None and cache.prompt_length + position + length > cache.capacity:
            raise ValueError(f"text positions up to {position + length} exceed the cache's {cache.capacity}")
        x = self._embed(input_ids, torch.arange(position, position + length, device=input_ids.device))
        if prompt is not None:
            x = torch.cat([prompt.to(x.dtype), x], dim=1)
        start = 0 if cache is None else cache.prompt_length + position
        x = self.run_blocks(self.drop(x), image_keys, image_values, cache, start, record)
        if prompt is not None:
            x = x[:, prompt.shape[1] :]
            if record is not None:
                record[-len(self.h) :] = [weights[:, :, prompt.shape[1] :] for weights in record[-len(self.h) :]]
        return self.ln_f(x)

    def _embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.wte(input_ids) + self.wpe(positions)

    def after_cache(
        self,
        input_ids: Tensor,
        positions: Tensor,
        cache_keys: Tensor,
        cache_values: Tensor,
        visible: Tensor,
        image_keys: Tensor,
        image_values: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`forward` at inference for `input_ids` (B, T) at text `positions` (T,), after the slots of every layer's
        preallocated cache (L, B, nh, C, hs) that `visible` (C,) marks, with the image keys and values stacked
        (L, B_img, nh, N, hs): the final hidden states (B, T, C) and the new positions' keys and values
        (L, B, nh, T, hs), which the caller stores. A compiled decoding step (openvino_runtime.py) is this function
        traced."""
        x = self._embed(input_ids, positions)
        new_keys, new_values = [], []
        for layer, block in enumerate(self.h):
            x, keys, values = block.after_cache(
                x, image_keys[layer], image_values[layer], cache_keys[layer], cache_values[layer], visible
            )
            new_keys.append(keys)
            new_values.append(values)
        return self.ln_f(x), torch.stack(new_keys), torch.stack(new_values)

    def run_blocks(
        self,
        x: Tensor,
        image_keys: Sequence[Tensor],
        image_values: Sequence[Tensor],
        cache: KVCache | None = None,
        start: int = 0,
        record: list[Tensor] | None = None,
    ) -> Tensor:
        """Every block over input embeddings x (B, T, C), written to `cache` (if any) at slots start..start + T."""
        for layer, block in enumerate(self.h):
            cached = (None, None) if cache is None else (cache.keys[layer], cache.values[layer])
            x = block(x, image_keys[layer], image_values[layer], *cached, start=start, record=record)
        return x


def caption_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The mean token cross-entropy of logits (B, T, vocab) against targets (B, T); IGNORE_INDEX: no loss."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )


class CaptionMemory(nn.Module):
    """The captions of the photos nearest to the input (retrieval.py): each token's embedding (the decoder's own, so
    that a word read can be written back through the tied LM head) plus a learned position within the memory.

    Read one of two ways (`retrieval_reading`): "memory", normalised like the image tokens and read beside them by
    cross-attention; or "prompt", input embeddings before the caption, read by self-attention and never predicted.
    The memory has a fixed length, `retrieval_k` captions of `retrieval_tokens` tokens each (padded), so that a
    photo's caption does not depend on which other photos share its batch.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.length = config.retrieval_k * config.retrieval_tokens
        self.is_prompt = config.retrieval_reading == "prompt"
        self.wme = nn.Embedding(self.length, config.n_embd)
        self.ln = nn.Identity() if self.is_prompt else nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, memory_ids: Tensor, wte: nn.Embedding) -> Tensor:
        if memory_ids.shape[1] != self.length:
            raise ValueError(f"memory of {memory_ids.shape[1]} tokens; this model reads {self.length}")
        return self.ln(wte(memory_ids) + self.wme(torch.arange(self.length, device=memory_ids.device)))


class CaptionModel(nn.Module):
    """Image encoder, bridge and text decoder; logits are tied to the token embedding. A retrieval model
    (`retrieval_k` > 0) also reads the captions of the nearest photos (`CaptionMemory`).

    "Image tokens" below are what `encode` returns: for a retrieval model they end with the memory's
    `memory.length` tokens, which a "prompt" model splits off (`_split_prompt`) and reads before the caption.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.encoder = ImageEncoder(config.encoder, config.image_size)
        data = self.encoder.data_config()
        self.config = dataclasses.replace(
            config,
            image_mean=config.image_mean or tuple(data["mean"]),
            image_std=config.image_std or tuple(data["std"]),
            image_interpolation=config.image_interpolation or data["interpolation"],
        )
        self.bridge = Bridge(self.encoder, self.config)
        self.decoder = TextDecoder(self.config)
        self.memory = CaptionMemory(self.config) if self.config.retrieval_k else None
        for part in (self.bridge, self.decoder, self.memory):
            if part is not None:
                part.apply(self._init_weights)
        for name, parameter in self.decoder.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, images: Tensor, start_block: int = 0, memory_ids: Tensor | None = None) -> Tensor:
        """The tokens the decoder reads, at its width, (B, N, C): the image's, then for a retrieval model the
        captions of the nearest photos.

        Args:
            images: pixels (B, 3, H, W) normalised for the encoder, or, with `start_block` > 0, the encoder's tokens
                after its first `start_block` blocks (a training feature cache).
            memory_ids: for a retrieval model, the nearest photos' caption tokens (B, retrieval_k * retrieval_tokens)
                from `retrieval.memory_ids`.
        """
        return self.read_memory(self.encode_with_class_token(images, start_block)[0], memory_ids)

    def encode_with_class_token(self, images: Tensor, start_block: int = 0) -> tuple[Tensor, Tensor]:
        """The image's tokens at the decoder width, and the encoder's class token (B, C_img): a summary of the whole
        photo, which also finds its nearest photos."""
        tokens = self.encoder(images, start_block)  # (B, N, C_img)
        return self.bridge(tokens), tokens[:, 0]

    def read_memory(self, image_tokens: Tensor, memory_ids: Tensor | None) -> Tensor:
        """`image_tokens` followed, for a retrieval model, by the memory of `memory_ids`."""
        if self.memory is None:
            if memory_ids is not None:
                raise ValueError("this model reads no captions of nearest photos (retrieval_k=0)")
            return image_tokens
        if memory_ids is None:
            raise ValueError("a retrieval model needs the captions of the nearest photos (memory_ids)")
        return torch.cat([image_tokens, self.memory(memory_ids, self.decoder.wte).to(image_tokens.dtype)], dim=1)

    def decode(self, input_ids: Tensor, image_tokens: Tensor, record: list[Tensor] | None = None) -> Tensor:
        """Next-token logits (B, T, vocab) for `input_ids` (B, T) given image tokens (B_img, N, C), without cache.

        B may be a multiple of B_img (several captions per image). With `record`, each layer's cross-attention
        weights (B, nh, T, N) are appended to it.
        """
        image_tokens, prompt = self._split_prompt(image_tokens)
        image_keys, image_values = self.decoder.image_keys_values(image_tokens)
        if prompt is not None and prompt.shape[0] != input_ids.shape[0]:
            prompt = prompt.repeat_interleave(input_ids.shape[0] // prompt.shape[0], dim=0)
        return self.logits(self.decoder(input_ids, image_keys, image_values, record=record, prompt=prompt))

    def _split_prompt(self, image_tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """(image tokens for cross-attention, the prompt's embeddings or None): a "prompt" model's memory is the
        last `memory.length` of the tokens `encode` returns."""
        if self.memory is None or not self.memory.is_prompt:
            return image_tokens, None
        return image_tokens[:, : -self.memory.length], image_tokens[:, -self.memory.length :]

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        start_block: int = 0,
        memory_ids: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) and, given `targets` (B, T), the mean token cross-entropy (IGNORE_INDEX: no loss).

        `images`, `start_block` and `memory_ids` as in `encode`; B may be a multiple of the number of images, as in
        `decode`.
        """
        logits = self.decode(input_ids, self.encode(images, start_block, memory_ids))
        return logits, None if targets is None else caption_loss(logits, targets, label_smoothing)

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.decoder.wte.weight)  # the LM head is the token embedding, transposed

    def patch_attention(self, input_ids: Tensor, image_tokens: Tensor) -> Tensor:
        """Where in the image each position looked: (B, T, grid_h, grid_w), summing to 1 over the patch grid.

        The cross-attention weights predicting position t's next token, averaged over layers and heads, over the
        patch tokens only (class/register tokens dropped) and renormalised.
        """
        record: list[Tensor] = []
        self.decode(input_ids, image_tokens, record=record)
        weights = torch.stack(record).mean(dim=(0, 2))  # (L, B, nh, T, N) -> (B, T, N)
        grid = self.bridge.output_grid
        patches = weights[:, :, self.bridge.prefix_tokens : self.bridge.prefix_tokens + grid[0] * grid[1]]
        patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
        return patches.unflatten(-1, self.bridge.output_grid)  # (B, T, gh, gw)

    def start_cache(self, image_tokens: Tensor, rows_per_image: int, max_length: int) -> KVCache:
        """A cache for `rows_per_image` captions of each image, up to `max_length` tokens each: empty, or holding a
        "prompt" model's prompt, which the caption continues."""
        if max_length > self.config.n_positions:
            raise ValueError(f"max_length {max_length} exceeds the decoder's n_positions={self.config.n_positions}")
        image_tokens, prompt = self._split_prompt(image_tokens)
        image_keys, image_values = self.decoder.image_keys_values(image_tokens)
        images, n_head, _, head_size = image_keys[0].shape
        if prompt is None:
            empty = image_keys[0].new_empty((len(image_keys), images * rows_per_image, n_head, max_length, head_size))
            return KVCache(empty, torch.empty_like(empty), image_keys, image_values)
        # The prompt is read once per image, then its keys and values are copied to each of the image's rows.
        length = prompt.shape[1] + max_length
        empty = image_keys[0].new_empty((len(image_keys), images, n_head, length, head_size))
        cache = KVCache(empty, torch.empty_like(empty), image_keys, image_values, prompt_length=prompt.shape[1])
        self.decoder.run_blocks(self.decoder.drop(prompt.to(empty.dtype)), image_keys, image_values, cache)
        if rows_per_image > 1:
            cache.keys = cache.keys.repeat_interleave(rows_per_image, dim=1)
            cache.values = cache.values.repeat_interleave(rows_per_image, dim=1)
        return cache

    def decode_step(self, input_ids: Tensor, cache: KVCache, position: int) -> Tensor:
        """Logits (B, vocab) for the token after `input_ids` (B, T), at text positions from `position` on: the
        cache holds the caption's positions before it."""
        return self.logits(self.decoder(input_ids, cache.image_keys, cache.image_values, cache, position)[:, -1])

    def decode_positions(self, input_ids: Tensor, cache: KVCache, position: int) -> Tensor:
        """Logits (B, T, vocab) after each of `input_ids` (B, T), as `decode_step`: one forward pass checks several
        drafted tokens at once (speculative decoding)."""
        return self.logits(self.decoder(input_ids, cache.image_keys, cache.image_values, cache, position))


def with_image_layout(model: CaptionModel, image_size: int | None, image_pool: int | None) -> CaptionModel:
    """`model` taking photos of `image_size` pixels and pooling their patch grid by `image_pool` (None: as it is).

    The weights are kept; only the encoder's position embedding is resampled to the new patch grid (bicubic, as
    timm does for pretrained weights at another size). Pooling has no weights and cross-attention takes any number
    of image tokens, so the decoder needs no change: fine-tuning adapts it to the new tokens.
    """
    config = dataclasses.replace(
        model.config,
        image_size=model.config.image_size if image_size is None else image_size,
        image_pool=model.config.image_pool if image_pool is None else image_pool,
    )
    if config == model.config:
        return model
    resized = CaptionModel(config)
    state = model.state_dict()
    vit = model.encoder.vit
    state["encoder.vit.pos_embed"] = resample_abs_pos_embed(
        state["encoder.vit.pos_embed"],
        new_size=list(resized.encoder.vit.patch_embed.grid_size),
        old_size=list(vit.patch_embed.grid_size),
        num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
    )
    resized.load_state_dict(state)
    return resized.train(model.training)


def with_retrieval(model: CaptionModel, retrieval_k: int, reading: str = "memory") -> CaptionModel:
    """`model` also reading the captions of the `retrieval_k` nearest photos, the `reading` way (`CaptionMemory`):
    every weight kept, a new caption memory added, to be fine-tuned. The same k, or 0 for a model without memory:
    unchanged."""
    if retrieval_k == model.config.retrieval_k:
        return model
    if model.config.retrieval_k:
        raise ValueError(
            f"the model reads {model.config.retrieval_k} nearest captions; it cannot change to {retrieval_k}"
        )
    extended = CaptionModel(dataclasses.replace(model.config, retrieval_k=retrieval_k, retrieval_reading=reading))
    missing, unexpected = extended.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("memory.") for name in missing), (missing, unexpected)
    return extended
