"""The Captioner facade: any image input, reused encodings, honest confidences, attention maps, files."""

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Caption, Captioner, EncodedImages
from checkpoint import save_captioner
from config import DecodeConfig
from images import ImageError
from release import ModelInfo


@pytest.fixture(scope="module")
def captioner(captioning_model, tiny_tokenizer):
    return Captioner(captioning_model, tiny_tokenizer, ModelInfo(trained_on="fixture"), device="cpu")


def _photo(seed=0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


GREEDY = DecodeConfig(strategy="greedy", max_new_tokens=8)


def test_paths_bytes_pil_and_arrays_give_the_same_caption(captioner, tmp_path):
    photo = _photo()
    photo.save(tmp_path / "photo.png")
    sources = [
        photo,
        np.asarray(photo),
        tmp_path / "photo.png",
        str(tmp_path / "photo.png"),
        (tmp_path / "photo.png").read_bytes(),
    ]
    texts = [caption.text for caption in captioner.caption(sources, GREEDY)]
    assert len(set(texts)) == 1 and texts[0]


def test_image_modes_are_converted_like_their_rgb_equivalents(captioner):
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40), dtype=np.uint8))
    rgba = _photo(2).convert("RGBA")  # fully opaque: same pixels as RGB
    palette = _photo(3).convert("P")
    expected = [gray.convert("RGB"), rgba.convert("RGB"), palette.convert("RGB")]
    actual = captioner.caption([gray, rgba, palette], GREEDY)
    reference = captioner.caption(expected, GREEDY)
    assert [c.text for c in actual] == [c.text for c in reference]
    assert [c.score for c in actual] == pytest.approx([c.score for c in reference])


def test_exif_rotation_is_applied(captioner, tmp_path):
    photo = _photo(4, size=(48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    photo.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    stored = np.asarray(Image.open(tmp_path / "rotated.jpg").convert("RGB"))
    upright = Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1)))  # 90° clockwise
    [from_file] = captioner.caption([tmp_path / "rotated.jpg"], GREEDY)
    [from_upright] = captioner.caption([upright], GREEDY)
    [from_sideways] = captioner.caption([Image.fromarray(stored)], GREEDY)
    assert from_file.score == pytest.approx(from_upright.score)
    assert from_file.score != pytest.approx(from_sideways.score)


def test_one_encoding_serves_several_decodings(captioner):
    photos = [_photo(5), _photo(6)]
    encoded = captioner.encode(photos)
    assert isinstance(encoded, EncodedImages) and encoded.tokens.shape[0] == 2
    for config in (GREEDY, DecodeConfig(num_beams=2, max_new_tokens=8)):
        assert [c.text for c in captioner.caption(encoded, config)] == [
            c.text for c in captioner.caption(photos, config)
        ]


def test_confidence_is_the_geometric_mean_of_the_models_token_probabilities(captioner):
    [caption] = captioner.caption([_photo(7)], GREEDY)
    model, tokenizer = captioner.model, captioner.tokenizer
    ids = list(caption.token_ids)
    assert tokenizer.decode(ids) == caption.text
    inputs = torch.tensor([[tokenizer.bos_token_id, *ids[:-1]]])
    with torch.no_grad():
        image_tokens = captioner.encode([_photo(7)]).tokens
        logprobs = model.decode(inputs, image_tokens).log_softmax(-1)[0].gather(1, torch.tensor(ids)[:, None])[:, 0]
    np.testing.assert_allclose(caption.token_logprobs, logprobs.numpy(), atol=1e-4)
    assert caption.confidence == pytest.approx(np.exp(logprobs.mean().item()), rel=1e-4)
    assert 0.0 < caption.confidence <= 1.0


def test_alternatives_and_attention_maps(captioner):
    config = DecodeConfig(num_beams=3, num_return_sequences=3, max_new_tokens=6)
    [caption] = captioner.caption([_photo(8)], config, attention=True)
    assert len(caption.alternatives) == 2
    assert caption.score >= caption.alternatives[0].score >= caption.alternatives[1].score
    assert caption.attention.shape == (len(caption.words), *captioner.model.bridge.output_grid)
    np.testing.assert_allclose(caption.attention.sum(axis=(1, 2)), 1.0, rtol=1e-4)
    assert " ".join(caption.words) == caption.text


def test_a_prefix_is_continued(captioner):
    [caption] = captioner.caption([_photo(9)], GREEDY, prefix="a dog")
    assert caption.text.startswith("a dog")


def test_seed_makes_sampling_reproducible(captioner):
    config = DecodeConfig(strategy="sample", num_return_sequences=3, temperature=2.0, seed=11, max_new_tokens=8)
    first = captioner.caption([_photo(10)], config)
    second = captioner.caption([_photo(10)], config)
    texts = lambda captions: [c.text for c in captions[0].alternatives] + [captions[0].text]  # noqa: E731
    assert texts(first) == texts(second)


def test_bad_images_raise_image_error_and_caption_each_reports_them(captioner, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        captioner.caption([tmp_path / "notes.txt"], GREEDY)
    results = list(captioner.caption_each([_photo(11), tmp_path / "notes.txt", tmp_path / "absent.jpg"], GREEDY))
    assert results[0].text is not None
    assert isinstance(results[1], ImageError) and isinstance(results[2], ImageError)
    assert "no such file" in str(results[2])


def test_caption_each_reads_later_batches_on_a_reader_thread_and_keeps_order_across_batches(
    captioner, tmp_path, monkeypatch
):
    import threading

    import captioner as captioner_module

    (tmp_path / "notes.txt").write_text("not an image")
    sources = [_photo(20), tmp_path / "notes.txt", tmp_path / "absent.jpg", _photo(21), _photo(22)]
    readers = []
    real_load_each = captioner_module.load_each

    def recording_load_each(batch, load):
        readers.append(threading.current_thread().name)
        return real_load_each(batch, load)

    monkeypatch.setattr(captioner_module, "load_each", recording_load_each)
    results = list(captioner.caption_each(sources, GREEDY, batch_size=2))  # batches: good+bad, bad+good, good
    # The first batch is read before any captioning, the next ones on the reader thread during the previous one.
    assert readers[0] == threading.current_thread().name and len(readers) == 3
    assert all(name.startswith("image-reader") for name in readers[1:])
    assert [type(result) for result in results] == [Caption, ImageError, ImageError, Caption, Caption]
    for source, result in zip(sources, results, strict=True):
        if isinstance(result, Caption):
            assert result.token_ids == captioner.caption([source], GREEDY)[0].token_ids


def test_load_from_a_file(tmp_path, captioning_model, tiny_tokenizer, captioner):
    save_captioner(tmp_path / "captioner.pt", captioning_model, tiny_tokenizer, {"trained_on": "fixture"})
    loaded = Captioner.load(tmp_path / "captioner.pt", device="cpu")
    assert loaded.info == ModelInfo(trained_on="fixture")
    photo = _photo(12)
    assert loaded.caption([photo], GREEDY)[0].text == captioner.caption([photo], GREEDY)[0].text


def test_too_long_a_request_is_a_clear_error(captioner):
    with pytest.raises(ValueError, match="max_new_tokens must be at most"):
        captioner.caption([_photo(13)], DecodeConfig(strategy="greedy", max_new_tokens=200))


def _assert_float32_gives_their_tokens_the_same_logprobs(fast: Captioner, float32: Captioner, photos, atol: float):
    """The float32 model, teacher-forced on each caption of a faster precision, gives its tokens the same
    log-probabilities up to rounding (a tie may still make the two precisions choose differently), for greedy and
    beam search; and the attention maps of the faster precision still sum to one."""
    for config in (GREEDY, DecodeConfig(num_beams=3, max_new_tokens=6)):
        for photo, caption in zip(photos, fast.caption(photos, config), strict=True):
            ids = list(caption.token_ids)
            inputs = torch.tensor([[float32.tokenizer.bos_token_id, *ids[:-1]]])
            with torch.inference_mode():
                logits = float32.model.decode(inputs, float32.encode([photo]).tokens)[0]
            expected = logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
            np.testing.assert_allclose(caption.token_logprobs, expected.numpy(), atol=atol)
    [caption] = fast.caption([photos[0]], attention=True, strategy="beam", num_beams=3, max_new_tokens=6)
    assert caption.attention.dtype == np.float32
    np.testing.assert_allclose(caption.attention.sum(axis=(1, 2)), 1.0, rtol=1e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_captions_carry_the_float32_models_token_probabilities(
    tmp_path, captioning_model, tiny_tokenizer, captioner, dtype
):
    save_captioner(tmp_path / "captioner.pt", captioning_model, tiny_tokenizer, {})
    half = Captioner.load(tmp_path / "captioner.pt", device="cpu", dtype=dtype)
    assert {parameter.dtype for parameter in half.model.parameters()} == {getattr(torch, dtype)}
    _assert_float32_gives_their_tokens_the_same_logprobs(half, captioner, [_photo(14), _photo(15)], atol=0.1)
    choices = "auto, float32, bfloat16, float16, int8, bfloat16-int8, int8-encoder"
    with pytest.raises(ValueError, match=f"dtype must be one of {choices}, not 'int4'"):
        Captioner.load(tmp_path / "captioner.pt", device="cpu", dtype="int4")


def test_int8_quantizes_the_decoders_linear_layers_and_keeps_the_float32_models_token_probabilities(
    tmp_path, captioning_model, tiny_tokenizer, captioner
):
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    save_captioner(tmp_path / "captioner.pt", captioning_model, tiny_tokenizer, {})
    int8 = Captioner.load(tmp_path / "captioner.pt", device="cpu", dtype="int8")
    assert int8.precision == "int8" and int8.dtype == torch.float32
    decoder_linears = [module for module in int8.model.decoder.modules() if isinstance(module, torch.nn.Linear)]
    assert decoder_linears == []  # every one replaced
    assert any(isinstance(module, Int8Linear) for module in int8.model.decoder.modules())
    assert any(isinstance(module, torch.nn.Linear) for module in int8.model.encoder.modules())  # stays float32
    # int8 rounds activations as well as weights: up to about 0.3 nats on this tiny random model, whose logits are
    # sharper than a trained one's; a broken quantization is off by several.
    _assert_float32_gives_their_tokens_the_same_logprobs(int8, captioner, [_photo(16), _photo(17)], atol=0.35)
    with pytest.raises(ValueError, match="int8 runs on CPUs only"):
        Captioner(captioning_model, tiny_tokenizer, device="cuda", dtype="int8")


def test_bfloat16_int8_holds_int8_decoder_weights_and_keeps_the_float32_models_token_probabilities(
    tmp_path, captioning_model, tiny_tokenizer, captioner
):
    from precision import Int8WeightLinear

    save_captioner(tmp_path / "captioner.pt", captioning_model, tiny_tokenizer, {})
    fast = Captioner.load(tmp_path / "captioner.pt", device="cpu", dtype="bfloat16-int8")
    assert fast.precision == "bfloat16-int8" and fast.dtype == torch.bfloat16
    assert not any(isinstance(module, torch.nn.Linear) for module in fast.model.decoder.modules())  # all replaced
    quantized = [module for module in fast.model.decoder.modules() if isinstance(module, Int8WeightLinear)]
    assert quantized and all(module.weight.dtype == torch.int8 for module in quantized)
    encoder_weights = {p.dtype for p in fast.model.encoder.parameters()}
    assert encoder_weights == {torch.bfloat16}  # the encoder and the LM head (the embedding) stay bfloat16
    assert fast.model.decoder.wte.weight.dtype == torch.bfloat16
    # Each int8 weight is its float32 value to within half a step of its row's scale.
    original = dict(captioning_model.decoder.named_modules())
    for name, module in fast.model.decoder.named_modules():
        if isinstance(module, Int8WeightLinear):
            dequantized = module.weight.float() * module.scales.float()[:, None]
            step = module.scales.float()[:, None]
            assert ((dequantized - original[name].weight.float()).abs() <= 0.51 * step + 1e-3).all(), name
    _assert_float32_gives_their_tokens_the_same_logprobs(fast, captioner, [_photo(18), _photo(19)], atol=0.2)
    # One layer with a bias, on rows of any leading shape: float32's output up to int8 and bfloat16 rounding.
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(64, 48), torch.randn(2, 3, 64)
    torch.nn.init.normal_(layer.bias, std=1.0)
    quantized = Int8WeightLinear(layer)
    quantized_output = quantized(x.bfloat16())  # 6 rows: the same weights in bfloat16's matrix product
    assert quantized_output.shape == (2, 3, 48) and quantized_output.dtype == torch.bfloat16
    torch.testing.assert_close(quantized_output.float(), layer(x).detach(), atol=0.05, rtol=0.02)
    few = torch.cat([quantized(x[:, row : row + 1].bfloat16()) for row in range(3)], dim=1)  # 2 rows: the int8 kernel
    assert x.shape[0] <= Int8WeightLinear.FEW_ROWS < x.shape[0] * x.shape[1]
    torch.testing.assert_close(few.float(), quantized_output.float(), atol=0.02, rtol=0.01)
    with pytest.raises(ValueError, match="bfloat16-int8 runs on CPUs only"):
        Captioner(captioning_model, tiny_tokenizer, device="cuda", dtype="bfloat16-int8")


def test_auto_precision_is_the_recorded_one_only_where_the_cpu_computes_it_natively(
    tmp_path, captioning_model, tiny_tokenizer, monkeypatch
):
    import precision

    save_captioner(tmp_path / "recorded.pt", captioning_model, tiny_tokenizer, {"precision": "bfloat16"})
    save_captioner(tmp_path / "plain.pt", captioning_model, tiny_tokenizer, {})
    without_bf16 = frozenset({"sse4_2", "avx2", "avx512f"})  # an AVX-512 CPU without the BF16 extension
    monkeypatch.setattr(precision, "cpu_flags", lambda: without_bf16)
    assert Captioner.load(tmp_path / "recorded.pt", device="cpu").dtype == torch.float32
    monkeypatch.setattr(precision, "cpu_flags", lambda: without_bf16 | {"avx512_bf16"})
    assert Captioner.load(tmp_path / "recorded.pt", device="cpu").dtype == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda: without_bf16 | {"amx_bf16"})
    assert Captioner.load(tmp_path / "recorded.pt", device="cpu").dtype == torch.bfloat16
    assert Captioner.load(tmp_path / "plain.pt", device="cpu").dtype == torch.float32  # nothing recorded: float32
    assert Captioner.load(tmp_path / "recorded.pt", device="cpu", dtype="float32").dtype == torch.float32

    # A model recording bfloat16 and int8 as captioning like float32 runs the fastest of them the CPU has.
    fastest_first = {"precision": "bfloat16", "precisions": ["bfloat16", "int8", "float32"]}
    save_captioner(tmp_path / "both.pt", captioning_model, tiny_tokenizer, fastest_first)
    assert Captioner.load(tmp_path / "both.pt", device="cpu").precision == "bfloat16"  # AMX, from above
    monkeypatch.setattr(precision, "cpu_flags", lambda: without_bf16)
    assert Captioner.load(tmp_path / "both.pt", device="cpu").precision == "int8"
    monkeypatch.setattr(precision, "quantized_engine", lambda: "none")  # and without int8 kernels
    assert Captioner.load(tmp_path / "both.pt", device="cpu").precision == "float32"

    # bfloat16 with int8 decoder weights, where recorded, goes first, but only where bfloat16 is native.
    every = {"precision": "bfloat16-int8", "precisions": ["bfloat16-int8", "bfloat16", "int8", "float32"]}
    save_captioner(tmp_path / "every.pt", captioning_model, tiny_tokenizer, every)
    assert Captioner.load(tmp_path / "every.pt", device="cpu").precision == "float32"  # no bf16, no int8 kernels
    monkeypatch.undo()
    monkeypatch.setattr(precision, "cpu_flags", lambda: without_bf16)
    assert Captioner.load(tmp_path / "every.pt", device="cpu").precision == "int8"
    monkeypatch.setattr(precision, "cpu_flags", lambda: without_bf16 | {"avx512_bf16"})
    assert Captioner.load(tmp_path / "every.pt", device="cpu").precision == "bfloat16-int8"
