"""Data layouts, caption cleaning, clear errors, and the feature cache."""

import json
import shutil

import pytest
import torch
from conftest import ROOT

from data import CaptionedImage, DataError, clean_caption, load_captions, load_split
from features import FeatureCache
from images import load_image

PHOTOS = sorted((ROOT / "examples").glob("*.jpg"))


def test_clean_caption_drops_the_final_period_and_extra_spaces():
    assert clean_caption("  A girl going into a wooden building .  ") == "A girl going into a wooden building"
    assert clean_caption("A dog\trunning...") == "A dog running"
    assert clean_caption("Mr. Smith waves") == "Mr. Smith waves"


def test_csv_layout(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.csv").write_text(
        'image,caption,split\na.jpg,"A dog, running .",train\na.jpg,A brown dog .,train\nb.jpg,A cat .,test\n'
    )
    splits = load_captions(tmp_path)
    assert [(item.image.name, item.captions) for item in splits["train"]] == [
        ("a.jpg", ("A dog, running", "A brown dog"))
    ]
    assert splits["test"][0].image == tmp_path / "images" / "b.jpg"


def test_coco_layout_with_and_without_split_fields(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "x.jpg", "split": "val"}, {"id": 2, "file_name": "y.jpg", "split": "train"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A man ."},
            {"id": 11, "image_id": 2, "caption": "A tree"},
            {"id": 12, "image_id": 2, "caption": "Green tree"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(data))
    splits = load_captions(tmp_path / "captions.json")
    assert splits["val"][0].captions == ("A man",) and splits["train"][0].captions == ("A tree", "Green tree")
    for entry in data["images"]:
        del entry["split"]
    (tmp_path / "captions_val2017.json").write_text(json.dumps(data))
    assert set(load_captions(tmp_path / "captions_val2017.json")) == {"val"}  # split from the file name


def test_flickr8k_release_layout(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text(
        "a.jpg#0\tA dog runs .\na.jpg#1\tA dog .\nb.jpg#0\tA cat .\nc.jpg#0\tNot listed\n"
    )
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("b.jpg\n")
    splits = load_captions(tmp_path)
    assert splits["train"][0].captions == ("A dog runs", "A dog")
    assert splits["val"][0].image.name == "b.jpg" and "test" not in splits


def test_folder_of_images_with_sidecar_captions(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        shutil.copy(PHOTOS[0], tmp_path / split / "photo.jpg")
        (tmp_path / split / "photo.txt").write_text(f"first {split} caption\nsecond one\n\n")
    shutil.copy(PHOTOS[1], tmp_path / "train" / "uncaptioned.jpg")
    splits = load_captions(tmp_path)
    assert splits["train"][0].captions == ("first train caption", "second one")
    assert [item.image.name for item in splits["val"]] == ["photo.jpg"]


def test_missing_split_and_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.csv").write_text("image,caption,split\na.jpg,A dog,train\n")
    with pytest.raises(DataError, match=r"no 'val' split with captions \(found: train \(1 images\)\)"):
        load_split(tmp_path, "val")
    (tmp_path / "captions.csv").write_bytes("image,caption,split\na.jpg,Caf\xe9,train\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_captions(tmp_path)
    (tmp_path / "captions.csv").write_text("picture,text\na.jpg,A dog\n")
    with pytest.raises(DataError, match="missing column"):
        load_captions(tmp_path)
    (tmp_path / "captions.csv").write_text("image,caption,split\na.jpg,A dog,holdout\n")
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        load_captions(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_captions(tmp_path / "absent")


def test_feature_cache_is_reused_recomputed_when_damaged_and_skips_bad_images(tmp_path, tiny_model):

    (tmp_path / "broken.jpg").write_bytes(PHOTOS[0].read_bytes()[:500])
    items = [CaptionedImage(path, ("a caption",)) for path in PHOTOS[:2]] + [
        CaptionedImage(tmp_path / "broken.jpg", ("x",)),
        CaptionedImage(tmp_path / "absent.jpg", ("y",)),
    ]
    cache = FeatureCache(tmp_path / "cache", tiny_model, frozen_blocks=6)
    assert cache.fill(items, flips=True) == [0, 1]
    tokens = cache.load(items[:2])
    encoder = tiny_model.encoder
    pixels = cache.transform([load_image(PHOTOS[0])])
    with torch.no_grad():
        expected = encoder.blocks(encoder.stem(pixels), 0, 6)[0]
    torch.testing.assert_close(tokens[0].float(), expected, atol=2e-3, rtol=2e-3)  # stored as float16
    entries = sorted(cache.directory.rglob("*.safetensors"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # damaged, e.g. by a crash of another tool
    again = FeatureCache(tmp_path / "cache", tiny_model, frozen_blocks=6)
    assert again.fill(items, flips=True) == [0, 1]
    torch.testing.assert_close(again.load(items[:2]), tokens)
    # Another number of frozen blocks is another cache.
    assert FeatureCache(tmp_path / "cache", tiny_model, frozen_blocks=5).directory != cache.directory
