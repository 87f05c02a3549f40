"""caption.py: files, folders and globs in, text/jsonl/csv out; sidecars; bad files reported; nothing overwritten."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import caption
from checkpoint import save_captioner

EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, captioning_model, tiny_tokenizer):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_captioner(path, captioning_model, tiny_tokenizer)
    return path


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
    assert rows[0] == ["image", "caption", "confidence"] and len(rows) == 3
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
