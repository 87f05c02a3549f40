"""caption.py never overwrites or loses a user's file: every output location is checked before captioning, what
cannot be written is reported and skipped while the run goes on, and the user's files stay byte-identical."""

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from PIL import Image, PngImagePlugin

import caption
from checkpoint import save_captioner
from embed import embed_description, read_description

EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


def _run(model_file, *args):
    return caption.main(["--model", str(model_file), "--strategy", "greedy", "--max-new-tokens", "5", *args])


def _photo(path, seed=0):
    Image.open(EXAMPLES[seed % len(EXAMPLES)]).convert("RGB").resize((64, 48)).save(path)
    return path


def _snapshot(folder):
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()}


@contextlib.contextmanager
def unwritable(folder):
    """`folder` made unwritable for this process: immutable for root (whom permissions do not stop), else 0o555."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("root, and chattr +i is not available here to make a folder unwritable")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_a_folder_that_cannot_be_written_is_reported_and_the_other_folders_are_done(model_file, tmp_path, capsys):
    for name in ("a", "locked", "z"):
        (tmp_path / name).mkdir()
        _photo(tmp_path / name / "photo.jpg")
    output = tmp_path / "all.jsonl"
    before = _snapshot(tmp_path / "locked")
    with unwritable(tmp_path / "locked"):
        code = _run(model_file, "--sidecar", "--format", "jsonl", "--output", str(output), str(tmp_path))
    err = capsys.readouterr().err
    assert code == 1
    assert (tmp_path / "a" / "photo.txt").read_text().strip() and (tmp_path / "z" / "photo.txt").read_text().strip()
    assert _snapshot(tmp_path / "locked") == before
    assert f"{tmp_path / 'locked' / 'photo.jpg'}: cannot write in the folder {tmp_path / 'locked'}" in err
    assert len(output.read_text().splitlines()) == 2  # --output is written although an image failed
    assert "Traceback" not in err


def test_outputs_that_cannot_be_written_stop_the_run_before_captioning_all_reported_at_once(
    model_file, tmp_path, capsys
):
    photo = _photo(tmp_path / "photo.jpg")
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "locked").mkdir()
    before = _snapshot(tmp_path)
    with unwritable(tmp_path / "locked"):
        code = _run(model_file, "--embed", "--output-dir", str(tmp_path / "a-file"), "--overwrite",
                    "--output", str(tmp_path), str(photo))  # fmt: skip
        first = capsys.readouterr().err
        locked = _run(model_file, "--output", str(tmp_path / "locked" / "out.txt"), str(photo))
        second = capsys.readouterr().err
    assert code == 2 and locked == 2
    assert f"--output {tmp_path} is a folder" in first and f"--output-dir {tmp_path / 'a-file'} is a file" in first
    assert "cannot write in the folder" in second and "captioning" not in second  # nothing was captioned
    assert _snapshot(tmp_path) == before


def test_embed_output_dir_never_replaces_a_different_photo_of_the_same_name(model_file, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    photo, other = _photo(tmp_path / "in" / "photo.jpg"), _photo(tmp_path / "in" / "other.jpg", seed=1)
    theirs = _photo(tmp_path / "out" / "photo.jpg", seed=2)
    before = theirs.read_bytes()
    code = _run(model_file, "--embed", "--output-dir", str(tmp_path / "out"), str(photo), str(other))
    assert code == 1 and theirs.read_bytes() == before
    assert "is a different file; --overwrite replaces it" in capsys.readouterr().err
    assert read_description(tmp_path / "out" / "other.jpg")
    assert _run(model_file, "--embed", "--output-dir", str(tmp_path / "out"), "--overwrite", str(photo)) == 0
    assert read_description(theirs)


def test_sidecar_names_that_clash_are_refused_naming_both_files(model_file, tmp_path, capsys):
    jpeg, png, alone = _photo(tmp_path / "photo.jpg"), _photo(tmp_path / "photo.png"), _photo(tmp_path / "b.jpg")
    assert _run(model_file, "--sidecar", str(jpeg), str(png), str(alone)) == 1
    err = capsys.readouterr().err
    assert f"{jpeg}: {png} would write the same {tmp_path / 'photo.txt'}" in err
    assert f"{png}: {jpeg} would write the same" in err
    assert not (tmp_path / "photo.txt").exists() and (tmp_path / "b.txt").read_text().strip()


def test_embed_follows_a_symlink_and_refuses_a_hard_link(model_file, tmp_path, capsys):
    target = _photo(tmp_path / "real.jpg")
    (tmp_path / "link.jpg").symlink_to(target)
    assert _run(model_file, "--embed", str(tmp_path / "link.jpg")) == 0
    assert (tmp_path / "link.jpg").is_symlink() and read_description(target)
    hard = _photo(tmp_path / "hard.jpg", seed=1)
    os.link(hard, tmp_path / "second-name.jpg")
    before = hard.read_bytes()
    assert _run(model_file, "--embed", str(hard)) == 1
    assert "has 2 hard links; replacing it would split them" in capsys.readouterr().err
    assert hard.read_bytes() == before and (tmp_path / "second-name.jpg").read_bytes() == before
    assert _run(model_file, "--embed", str(target), f"{tmp_path}/./real.jpg", "--overwrite") == 0


def _png_with_description(path, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", text)
    Image.open(EXAMPLES[0]).convert("RGB").resize((64, 48)).save(path, pnginfo=info)
    return path


def test_captions_in_every_field_count_as_existing(model_file, tmp_path, capsys):
    import pyexiv2

    png = _png_with_description(tmp_path / "described.png", "a png's own caption")
    iptc = _photo(tmp_path / "iptc.jpg", seed=1)
    with pyexiv2.Image(str(iptc)) as image:
        image.modify_iptc({"Iptc.Application2.Caption": "an IPTC caption"})
    before = _snapshot(tmp_path)
    assert _run(model_file, "--embed", str(png), str(iptc)) == 0
    assert "skipping 2 image(s) that already have a embedded caption" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    assert _run(model_file, "--skip-existing", "--format", "jsonl", str(tmp_path)) == 0
    assert capsys.readouterr().out == ""
    embed_description(iptc, "one caption")  # replacing it keeps one caption, not two different ones
    with pyexiv2.Image(str(iptc)) as image:
        assert image.read_iptc()["Iptc.Application2.Caption"] == "one caption"


def test_an_empty_sidecar_is_no_caption_and_captions_stay_one_line(model_file, tmp_path, capsys):
    photo = _photo(tmp_path / "photo.jpg")
    (tmp_path / "photo.txt").write_text("  \n")
    assert _run(model_file, "--skip-existing", "--sidecar", str(photo)) == 0
    assert (tmp_path / "photo.txt").read_text().strip()
    for flag in ("--prepend", "--append"):
        with pytest.raises(SystemExit):
            _run(model_file, "--sidecar", "--overwrite", flag, "two\nlines", str(photo))
        assert "must be one line" in capsys.readouterr().err


def test_non_utf8_names_are_written_with_backslash_escapes(model_file, tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    _photo(tmp_path / name)
    _photo(tmp_path / "plain.jpg", seed=1)
    command = [sys.executable, str(ROOT / "caption.py"), "--model", str(model_file), "--max-new-tokens", "3"]
    output = tmp_path / "out.csv"
    done = subprocess.run([*command, "--format", "csv", "--output", str(output), str(tmp_path)], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert "caf\\xe9.jpg" in output.read_text(encoding="utf-8") and "plain.jpg" in output.read_text()
    plain = subprocess.run(
        [*command, str(tmp_path)], capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii"}
    )
    assert plain.returncode == 0 and b"caf\\xe9.jpg" in plain.stdout and b"plain.jpg" in plain.stdout


def test_files_get_the_users_umask(model_file, tmp_path, captioning_model, tiny_tokenizer):
    previous = os.umask(0o027)
    try:
        photo = _photo(tmp_path / "photo.jpg")
        output = tmp_path / "captions.txt"
        command = [sys.executable, str(ROOT / "caption.py"), "--model", str(model_file), "--max-new-tokens", "3"]
        subprocess.run([*command, "--sidecar", "--output", str(output), str(photo)], check=True, capture_output=True)
        save_captioner(tmp_path / "released.pt", captioning_model, tiny_tokenizer)
    finally:
        os.umask(previous)
    for path in (tmp_path / "photo.txt", output, tmp_path / "released.pt"):
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_a_model_config_beyond_the_bounds_is_refused_in_one_line_before_allocating(model_file, tmp_path):
    import torch

    contents = torch.load(model_file, weights_only=True)
    contents["config"] = {**contents["config"], "n_embd": 16384, "n_layer": 48}
    torch.save(contents, tmp_path / "huge.pt")
    _photo(tmp_path / "photo.jpg")
    command = [sys.executable, str(ROOT / "caption.py"), "--model", str(tmp_path / "huge.pt"), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "n_embd must be at most 2048, got 16384" in done.stderr


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_embd", 4096), ("n_layer", 49), ("n_positions", 5000), ("vocab_size", 10**6), ("image_size", 2048)],
)
def test_model_config_upper_bounds(field, value):
    from config import MODEL_LIMITS, ModelConfig

    with pytest.raises(ValueError, match=f"{field} must be at most {MODEL_LIMITS[field]}"):
        ModelConfig(**{field: value})


def test_evaluate_with_no_readable_image_is_one_line(model_file, tmp_path, capsys):
    import evaluate

    shutil.copytree(ROOT / "examples", tmp_path / "data", ignore=shutil.ignore_patterns("*"))
    (tmp_path / "data" / "val").mkdir()
    (tmp_path / "data" / "val" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "data" / "val" / "broken.txt").write_text("a caption\n")
    if shutil.which("java") is None:
        pytest.skip("evaluate.py needs Java for METEOR")
    assert evaluate.main(["--model", str(model_file), "--data", str(tmp_path / "data"), "--split", "val"]) == 2
    assert "none of the 1 'val' images could be read" in capsys.readouterr().err
