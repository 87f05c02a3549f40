"""The model against its oracles: transformers' GPT-2 for the decoder, timm's forward_features for the encoder."""

import dataclasses

import pytest
import timm
import torch
from conftest import DINOV2_WEIGHTS, needs_shared
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from config import PRESETS, DecodeConfig, ModelConfig
from model import CaptionModel, ImageEncoder
from pretrained import from_parts, gpt2_state_dict, load_encoder_state, load_gpt2_weights, load_timm_weights


def _image_tokens(batch: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, width, generator=generator)


def _tiny_encoder_model(decoder_dir) -> CaptionModel:
    return from_parts("vit_tiny_patch16_224", decoder_dir, encoder_pretrained=False, image_size=32).eval()


def test_decoder_logits_match_transformers_gpt2_with_cross_attention(gpt2_with_cross_attention):
    ours = _tiny_encoder_model(gpt2_with_cross_attention)
    reference = GPT2LMHeadModel.from_pretrained(gpt2_with_cross_attention).eval()
    input_ids = torch.randint(0, 120, (3, 9), generator=torch.Generator().manual_seed(1))
    image_tokens = _image_tokens(3, 32)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, encoder_hidden_states=image_tokens).logits
        actual = ours.decode(input_ids, image_tokens)
    assert actual.shape == (3, 9, 120)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_text_only_gpt2_loads_with_fresh_cross_attention_and_matches_when_it_is_silenced(gpt2_text_only):
    ours = _tiny_encoder_model(gpt2_text_only)
    report = load_gpt2_weights(ours, GPT2LMHeadModel.from_pretrained(gpt2_text_only).state_dict())
    assert len(report.initialised) == 2 * 8  # per layer: ln_cross (2) + q_attn, c_attn, c_proj (2 each)
    assert all(".ln_cross." in name or ".cross_attn." in name for name in report.initialised)
    with torch.no_grad():
        for block in ours.decoder.h:  # cross-attention output exactly zero
            block.cross_attn.c_proj.weight.zero_()
            block.cross_attn.c_proj.bias.zero_()
    reference = GPT2LMHeadModel.from_pretrained(gpt2_text_only).eval()
    input_ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        actual = ours.decode(input_ids, _image_tokens(2, 32))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_gpt2_state_dict_round_trips_into_transformers(tiny_model):
    from transformers import GPT2Config

    c = tiny_model.config
    reference = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.n_positions,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            add_cross_attention=True,
        )
    ).eval()
    reference.load_state_dict(gpt2_state_dict(tiny_model), strict=True)
    input_ids = torch.randint(0, c.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    image_tokens = _image_tokens(2, c.n_embd)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_model.decode(input_ids, image_tokens),
            reference(input_ids=input_ids, encoder_hidden_states=image_tokens).logits,
            atol=1e-4,
            rtol=0,
        )


def test_gpt2_loader_refuses_unknown_and_misshapen_tensors(gpt2_with_cross_attention):
    ours = _tiny_encoder_model(gpt2_with_cross_attention)
    state = GPT2LMHeadModel.from_pretrained(gpt2_with_cross_attention).state_dict()
    with pytest.raises(ValueError, match=r"unexpected tensors.*transformer\.h\.0\.ln_3\.weight"):
        load_gpt2_weights(ours, {**state, "transformer.h.0.ln_3.weight": torch.ones(32)})
    with pytest.raises(ValueError, match="shape"):
        load_gpt2_weights(ours, {**state, "transformer.wpe.weight": torch.zeros(5, 32)})
    incomplete = {key: value for key, value in state.items() if key != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"lacks tensors.*h\.1\.mlp\.c_fc\.bias"):
        load_gpt2_weights(ours, incomplete)


def test_encoder_tokens_equal_timm_forward_features():
    encoder = ImageEncoder("vit_tiny_patch16_224", 48).eval()
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=48).eval()
    reference.load_state_dict(encoder.vit.state_dict())
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = reference.forward_features(pixels)
        torch.testing.assert_close(encoder(pixels), expected, atol=1e-6, rtol=0)
        assert expected.shape == (2, 1 + 9, 192)
        # Resuming from a cached middle block gives the same tokens.
        hidden = encoder.blocks(encoder.stem(pixels), 0, 5)
        torch.testing.assert_close(encoder.head(encoder.blocks(hidden, 5)), expected, atol=1e-6, rtol=0)


def test_encode_from_a_middle_block_equals_encode(tiny_model):
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = tiny_model.encoder.blocks(tiny_model.encoder.stem(pixels), 0, 7)
        torch.testing.assert_close(tiny_model.encode(hidden, start_block=7), tiny_model.encode(pixels))


def test_bridge_average_pools_the_patch_grid_and_keeps_the_class_token():
    model = CaptionModel(dataclasses.replace(PRESETS["tiny"], image_size=64, image_pool=2)).eval()
    tokens = torch.randn(2, 1 + 16, 192)  # class token + a 4x4 grid
    grid = tokens[:, 1:].reshape(2, 4, 4, 192)
    expected = [tokens[:, 0]] + [
        grid[:, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].mean(dim=(1, 2)) for row in range(2) for col in range(2)
    ]
    bridge = model.bridge
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), bridge.proj(bridge.ln(torch.stack(expected, dim=1))))
    assert bridge.output_grid == (2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        CaptionModel(dataclasses.replace(PRESETS["tiny"], image_size=48, image_pool=2))


def test_an_image_size_that_is_not_a_whole_number_of_patches_is_refused_with_the_sizes_that_are():
    with pytest.raises(ValueError, match=r"image_size=40 is not a multiple of .* 16-pixel patches .nearest: 32 or 48"):
        CaptionModel(dataclasses.replace(PRESETS["tiny"], image_size=40))
    with pytest.raises(ValueError, match=r"nearest: 16\)"):
        CaptionModel(dataclasses.replace(PRESETS["tiny"], image_size=10))


def test_non_vit_encoder_is_refused():
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        ImageEncoder("resnet18", 32)


@needs_shared(DINOV2_WEIGHTS)
def test_shared_dinov2_weights_load_strictly_at_224_pixels():
    model = CaptionModel(dataclasses.replace(PRESETS["small"], vocab_size=8))
    report = load_timm_weights(model, DINOV2_WEIGHTS)
    encoder = model.encoder.eval()
    source = load_file(DINOV2_WEIGHTS)
    loaded = encoder.vit.state_dict()
    assert len(report.loaded) == len(source) and not report.initialised
    assert set(loaded) == set(source)  # strict: nothing missing, nothing left over
    for name, tensor in source.items():
        if name == "pos_embed":  # resampled from 37x37 patches to 16x16
            assert tensor.shape == (1, 1 + 37 * 37, 384) and loaded[name].shape == (1, 1 + 16 * 16, 384)
        else:
            torch.testing.assert_close(loaded[name], tensor.float())
    with torch.no_grad():
        tokens = encoder(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 257, 384) and torch.isfinite(tokens).all()
    # Preprocessing comes from the encoder's timm config, not from constants in our code.
    data = encoder.data_config()
    assert data["mean"] == pytest.approx((0.485, 0.456, 0.406)) and data["interpolation"] == "bicubic"


def test_model_fills_in_the_encoders_preprocessing():
    config = CaptionModel(PRESETS["tiny"]).config
    reference = timm.data.resolve_model_data_config(timm.create_model("vit_tiny_patch16_224", num_classes=0))
    assert config.image_mean == tuple(reference["mean"]) and config.image_std == tuple(reference["std"])
    assert config.image_interpolation == reference["interpolation"]


def test_tiny_preset_builds_and_runs():
    model = CaptionModel(PRESETS["tiny"]).eval()
    with torch.no_grad():
        logits, loss = model(torch.randn(2, 3, 32, 32), torch.zeros(2, 4, dtype=torch.long))
    assert loss is None and logits.shape == (2, 4, PRESETS["tiny"].vocab_size)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["small", "vit-gpt2"])
def test_large_presets_build_and_run(preset):
    config = PRESETS[preset]
    model = CaptionModel(config).eval()
    with torch.no_grad():
        image_tokens = model.encode(torch.randn(1, 3, config.image_size, config.image_size))
        logits = model.decode(torch.zeros(1, 3, dtype=torch.long), image_tokens)
    assert logits.shape == (1, 3, config.vocab_size)


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_layer", 0), ("n_embd", 33), ("dropout", float("nan")), ("image_size", -1), ("image_interpolation", "cubic")],
)
def test_model_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(PRESETS["tiny"], **{field: value})


def test_model_config_from_dict_refuses_unknown_and_missing_fields():
    values = dataclasses.asdict(PRESETS["tiny"])
    assert ModelConfig.from_dict(values) == PRESETS["tiny"]
    with pytest.raises(ValueError, match="unknown model config fields: colour"):
        ModelConfig.from_dict({**values, "colour": 1})
    del values["n_head"]
    with pytest.raises(ValueError, match="missing fields: n_head"):
        ModelConfig.from_dict(values)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"num_beams": 0}, "num_beams"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"strategy": "magic"}, "strategy"),
        ({"prefix": "a\x00b"}, "prefix"),
        ({"num_return_sequences": 4, "num_beams": 3}, "num_return_sequences"),
        ({"min_new_tokens": 40, "max_new_tokens": 30}, "min_new_tokens"),
    ],
)
def test_decode_config_rejects_bad_values_naming_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**options)


def test_forward_returns_the_mean_token_cross_entropy_without_padding(tiny_model):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    input_ids = torch.randint(0, tiny_model.config.vocab_size, (4, 5), generator=torch.Generator().manual_seed(5))
    targets = input_ids.roll(-1, dims=1)
    targets[1, 3:] = -100  # padding carries no loss
    with torch.no_grad():
        logits, loss = tiny_model(pixels, input_ids, targets)  # two captions per image
    logprobs = logits.log_softmax(-1)
    picked = [-logprobs[row, position, targets[row, position]] for row in range(4) for position in range(5)]
    kept = [value for value, target in zip(picked, targets.flatten().tolist(), strict=True) if target != -100]
    torch.testing.assert_close(loss, torch.stack(kept).mean())


def test_the_encoders_trainable_part_is_its_last_blocks_and_final_norm(tiny_model):
    encoder = tiny_model.encoder
    names = {id(p): name for name, p in encoder.named_parameters()}
    trainable = {names[id(p)] for p in encoder.trainable_parameters(2)}
    depth = encoder.depth
    expected = {
        name for name, _ in encoder.named_parameters()
        if name.startswith((f"vit.blocks.{depth - 2}.", f"vit.blocks.{depth - 1}.", "vit.norm."))
    }  # fmt: skip
    assert trainable == expected and encoder.trainable_parameters(0) == []
    encoder.set_trainable(2)
    try:
        assert {name for name, p in encoder.named_parameters() if p.requires_grad} == expected
    finally:
        encoder.set_trainable(0)
    assert not any(p.requires_grad for p in encoder.parameters())
    # What the feature cache hashes: everything before the trainable blocks, nothing after.
    frozen = set(encoder.frozen_state(depth - 2))
    assert (
        frozen.isdisjoint(expected)
        and f"vit.blocks.{depth - 3}.attn.qkv.weight" in frozen
        and "vit.cls_token" in frozen
    )
    with pytest.raises(ValueError, match="cannot train the last 99"):
        encoder.trainable_parameters(99)


def test_encoder_state_loads_exactly_and_refuses_unknown_or_missing_tensors():
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    model = CaptionModel(PRESETS["tiny"]).eval()
    report = load_encoder_state(model, source.state_dict(), "timm")
    assert len(report.loaded) == len(source.state_dict()) and report.summary().startswith("timm:")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(pixels), source.forward_features(pixels))
    state = source.state_dict()
    with pytest.raises(ValueError, match=r"does not have: head\.weight"):
        load_encoder_state(model, {**state, "head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"lacks encoder tensors: encoder\.vit\.cls_token"):
        load_encoder_state(model, {k: v for k, v in state.items() if k != "cls_token"})
    with pytest.raises(ValueError, match="shape"):
        load_encoder_state(model, {**state, "cls_token": torch.zeros(1, 1, 5)})


def test_the_step_a_runtime_traces_gives_the_cached_decoders_logits_keys_and_values(tiny_model):
    """`TextDecoder.after_cache` (the whole cache in, a mask of its filled slots, the new keys and values out) is
    the cached decoder without in-place writes: the same logits after a prompt of several tokens and one more step."""
    torch.manual_seed(0)
    model = tiny_model.eval()
    with torch.inference_mode():
        tokens = model.encode(torch.randn(2, 3, model.config.image_size, model.config.image_size))
        ids = torch.randint(0, model.config.vocab_size, (6, 5))  # 3 rows per image
        cache = model.start_cache(tokens, 3, 8)
        expected = [model.decode_positions(ids[:, :4], cache, 0), model.decode_step(ids[:, 4:], cache, 4)]
        keys, values = torch.zeros_like(cache.keys), torch.zeros_like(cache.values)  # slots not yet filled: zeros
        image = torch.stack(cache.image_keys), torch.stack(cache.image_values)
        got = []
        for start, chunk in ((0, ids[:, :4]), (4, ids[:, 4:])):
            visible = torch.arange(keys.shape[3]) < start
            positions = torch.arange(start, start + chunk.shape[1])
            hidden, new_keys, new_values = model.decoder.after_cache(chunk, positions, keys, values, visible, *image)
            keys[:, :, :, start : start + chunk.shape[1]] = new_keys
            values[:, :, :, start : start + chunk.shape[1]] = new_values
            got.append(model.logits(hidden))
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1][:, -1], expected[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys[:, :, :, :5], cache.keys[:, :, :, :5], atol=1e-5, rtol=1e-5)
