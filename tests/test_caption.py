"""caption.py: files, folders and globs in, text/jsonl/csv out; sidecars; bad files reported; nothing overwritten."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import caption

EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "photos" / "nested").mkdir(parents=True)
    shutil.copy(EXAMPLES[0], tmp_path / "photos" / "a.jpg")
    shutil.copy(EXAMPLES[1], tmp_path / "photos" / "nested" / "b.JPG")
    (tmp_path / "photos" / "notes.md").write_text("not an image, and not picked from a folder")
    return tmp_path / "photos"


def _run(model_file, *args):
    return caption.main(["--model", str(model_file), "--strategy", "greedy", "--max-new-tokens", "5", *args])


def test_jsonl_has_one_object_per_image_found_in_folders_recursively(model_file, folder, capsys):
    assert _run(model_file, "--format", "jsonl", str(folder)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["image"] for row in rows] == [str(folder / "a.jpg"), str(folder / "nested" / "b.JPG")]
    assert all(isinstance(row["caption"], str) and 0 < row["confidence"] <= 1 for row in rows)


def test_globs_csv_and_output_file_that_is_never_overwritten_silently(model_file, folder, tmp_path, capsys):
    output = tmp_path / "captions.csv"
    assert _run(model_file, "--format", "csv", "--output", str(output), str(folder / "**" / "*.*")) == 0
    with open(output, newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["image", "caption", "confidence", "familiarity", "unfamiliar", "neighbours", "labels"]
    assert len(rows) == 3
    assert f"skipping 1 file(s) that are not images: {folder / 'notes.md'}" in capsys.readouterr().err
    before = output.read_bytes()
    with pytest.raises(SystemExit):
        _run(model_file, "--output", str(output), str(folder / "a.jpg"))
    assert output.read_bytes() == before
    assert _run(model_file, "--output", str(output), "--overwrite", str(folder / "a.jpg")) == 0
    assert output.read_text().startswith(str(folder / "a.jpg") + "\t")


def test_sidecars_are_written_and_existing_ones_kept(model_file, folder, capsys):
    (folder / "a.txt").write_text("my own caption\n")
    assert _run(model_file, "--sidecar", str(folder)) == 0
    assert (folder / "a.txt").read_text() == "my own caption\n"
    assert (folder / "nested" / "b.txt").read_text().strip()
    assert "skipping 1 image(s) that already have a .txt caption" in capsys.readouterr().err
    assert _run(model_file, "--sidecar", "--overwrite", str(folder / "a.jpg")) == 0
    assert (folder / "a.txt").read_text() != "my own caption\n"


def test_unreadable_and_missing_inputs_are_reported_and_the_rest_captioned(model_file, folder, tmp_path, capsys):
    (tmp_path / "empty.jpg").write_bytes(b"")
    code = _run(
        model_file, str(folder / "a.jpg"), str(tmp_path / "empty.jpg"), str(tmp_path / "absent.png"), str(tmp_path)
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert out.startswith(str(folder / "a.jpg") + "\t")
    assert "empty.jpg: the file is empty" in err and "absent.png: no such file" in err
    (tmp_path / "notes.txt").write_text("a caption, not a photo")
    assert _run(model_file, str(tmp_path / "notes.txt")) == 1
    assert "error: no image files among the given paths" in capsys.readouterr().err


def test_half_precision_flag(model_file, folder, capsys):
    assert _run(model_file, "--dtype", "bfloat16", "--format", "jsonl", str(folder)) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    with pytest.raises(SystemExit):
        _run(model_file, "--dtype", "int4", str(folder))
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_bad_options_and_models_are_one_line_errors(model_file, folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(model_file, "--num-beams", "0", str(folder))
    assert "num_beams must be a whole number in [1, 16], got 0" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_text("nope")
    assert caption.main(["--model", str(tmp_path / "bad.pt"), str(folder)]) == 2
    assert "bad.pt: not a readable checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_entry_point_prints_jsonl(model_file):
    command = [sys.executable, str(ROOT / "caption.py"), "--model", str(model_file), "--format", "jsonl"]
    result = subprocess.run([*command, *map(str, EXAMPLES)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["image"] for line in result.stdout.splitlines()] == [str(path) for path in EXAMPLES]


# ---- captions written into image files ----


def _run_text(model_file, *args):
    """`_run` with captions that start with printable words (the fixture model's own tokens are mostly bytes)."""
    return _run(model_file, "--prefix", "a photo of", *args)


def _photos_with_metadata(folder):
    """A JPEG with an EXIF artist, a PNG with a text chunk and a WebP: the formats --embed writes."""
    from PIL import Image, PngImagePlugin

    source = Image.open(EXAMPLES[0]).convert("RGB").resize((64, 48))
    exif = Image.Exif()
    exif[0x013B] = "Ada"  # Artist
    source.save(folder / "one.jpg", quality=90, exif=exif)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "a camera app")
    source.save(folder / "two.png", pnginfo=info)
    source.save(folder / "three.webp", quality=80)
    (folder / "one.jpg").chmod(0o644)
    return [folder / "one.jpg", folder / "two.png", folder / "three.webp"]


def _pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _description(path) -> str:
    """The description Pillow reads back: the XMP dc:description, with the EXIF ImageDescription equal to it where
    the caption is ASCII (EXIF's type for it) and absent otherwise."""
    import xml.etree.ElementTree as ElementTree

    from PIL import Image

    image = Image.open(path)
    exif = image.getexif().get(0x010E, "")
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp") or b""
    root = ElementTree.fromstring(xmp.encode() if isinstance(xmp, str) else xmp)
    [item] = root.iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}li")
    assert item.text and exif == (item.text if item.text.isascii() else ""), (exif, item.text)
    return item.text


def test_embed_writes_exif_and_xmp_descriptions_and_keeps_pixels_and_other_metadata(model_file, tmp_path, capsys):
    from PIL import Image

    photos = _photos_with_metadata(tmp_path)
    before = {path: _pixels(path) for path in photos}
    assert _run_text(model_file, "--embed", "--format", "jsonl", *map(str, photos)) == 0
    rows = {json.loads(line)["image"]: json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()}
    for path in photos:
        assert _description(path) == rows[str(path)]
        assert (_pixels(path) == before[path]).all()  # decoded pixels bit-identical: nothing was re-encoded
    assert Image.open(photos[0]).getexif()[0x013B] == "Ada"
    assert Image.open(photos[1]).text["Software"] == "a camera app"
    assert Image.open(photos[1]).text["Description"] == rows[str(photos[1])]
    assert (photos[0].stat().st_mode & 0o777) == 0o644
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_embedded_descriptions_are_kept_unless_overwrite_and_output_dir_leaves_originals(model_file, tmp_path, capsys):
    photos = _photos_with_metadata(tmp_path)
    assert _run_text(model_file, "--embed", "--prepend", "mine:", str(photos[0])) == 0
    mine = _description(photos[0])
    assert _run_text(model_file, "--embed", *map(str, photos)) == 0
    assert "skipping 1 image(s) that already have a embedded caption (--overwrite to redo)" in capsys.readouterr().err
    assert _description(photos[0]) == mine  # the existing description was not replaced
    originals = {path: path.read_bytes() for path in photos}
    out = tmp_path / "captioned"
    assert _run_text(model_file, "--embed", "--overwrite", "--output-dir", str(out), *map(str, photos)) == 0
    assert {path: path.read_bytes() for path in photos} == originals
    assert _description(out / "one.jpg") != mine and (_pixels(out / "one.jpg") == _pixels(photos[0])).all()
    with pytest.raises(SystemExit):
        _run_text(model_file, "--output-dir", str(out), str(photos[0]))  # --output-dir without --embed


def test_embed_refuses_formats_without_description_metadata_per_file(model_file, tmp_path, capsys):
    from PIL import Image

    Image.open(EXAMPLES[0]).convert("RGB").save(tmp_path / "old.bmp")
    assert _run_text(model_file, "--embed", str(tmp_path / "old.bmp")) == 1
    assert "JPEG, PNG and WebP files only (use --sidecar)" in capsys.readouterr().err


def test_prepend_and_append_reach_every_output(model_file, folder, capsys):
    shutil.copy(EXAMPLES[0], folder / "c.jpg")
    assert (
        _run_text(model_file, "--sidecar", "--embed", "--prepend", "sks,", "--append", "- photo", str(folder / "c.jpg"))
        == 0
    )
    line = capsys.readouterr().out.strip()
    printed = line.split("\t")[1]
    assert (
        printed.startswith("sks, ")
        and printed.endswith(" - photo")
        and printed[len("sks, ") :].startswith("a photo of")
    )
    assert (folder / "c.txt").read_text() == printed + "\n"
    assert _description(folder / "c.jpg") == printed


def test_skip_existing_resumes_a_half_done_folder_whichever_way_captions_went(model_file, folder, capsys):
    shutil.copy(EXAMPLES[0], folder / "c.jpg")
    (folder / "a.txt").write_text("done before\n")  # captioned earlier into a sidecar
    assert _run_text(model_file, "--embed", str(folder / "c.jpg")) == 0  # and one embedded
    capsys.readouterr()
    assert _run_text(model_file, "--format", "jsonl", "--skip-existing", str(folder)) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(folder / "nested" / "b.JPG")]
    assert "skipping 2 image(s) that already have a .txt or embedded caption" in err and "--overwrite" not in err
    with pytest.raises(SystemExit):
        _run_text(model_file, "--skip-existing", "--overwrite", str(folder))
