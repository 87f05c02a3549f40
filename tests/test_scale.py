"""caption.py --engine ray (scale.py) on a local Ray instance: the same captions as one process, unreadable photos as
error rows, a killed job resumed with every photo written exactly once, and one line where Ray is not installed."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

import caption
from scale import finished_rows, read_shard


@pytest.fixture
def photos(tmp_path):
    """The example photos and a file with an image's name that is not one."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((ROOT / "examples").glob("*.jpg")):
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def _ray_command(photos, output, model_file, *flags) -> list[str]:
    return [sys.executable, str(ROOT / "caption.py"), "--engine", "ray", str(photos), "--output", str(output),
            "--model", str(model_file), *flags]  # fmt: skip


@pytest.mark.slow
def test_ray_captions_equal_one_process_and_unreadable_photos_become_error_rows(tmp_path, photos, model_file):
    pytest.importorskip("ray")
    single = tmp_path / "single.jsonl"
    # The same batches in both: a batch's size can move float rounding in the last decimal of a confidence.
    caption.main(
        [str(photos), "--model", str(model_file), "--format", "jsonl", "--output", str(single), "--batch-size", "4"]
    )
    expected = {row["image"]: row for row in map(json.loads, single.read_text().splitlines())}
    output = tmp_path / "shards"
    run = subprocess.run(
        _ray_command(photos, output, model_file, "--actors", "2", "--shard-rows", "4", "--format", "parquet"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr  # one photo could not be read, as the one-process path reports it
    count = len(list(photos.iterdir()))
    summary = rf"\n{count} photo\(s\) in .* 1 error\(s\); {-(-count // 4)} shard\(s\) in "
    assert re.search(summary, run.stderr), run.stderr[-2000:]
    rows = finished_rows(output)
    assert rows.pop(str(photos / "broken.jpg"))["error"].endswith("not an image format this tool reads "
                                                                  "(JPEG, PNG, GIF, WebP, BMP, TIFF)")  # fmt: skip
    assert len(expected) == count - 1 and rows == expected


@pytest.mark.slow
def test_a_killed_ray_job_run_again_writes_every_photo_exactly_once(tmp_path, photos, model_file):
    pytest.importorskip("ray")
    output = tmp_path / "shards"
    command = _ray_command(photos, output, model_file, "--shard-rows", "1", "--batch-size", "1")
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(output.glob("part-*"))) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-job
    job.wait()
    written = len(list(output.glob("part-*")))
    assert 3 <= written < len(list(photos.iterdir())), "the job should have been stopped part-way"
    (output / ".part-00099.jsonl.half.tmp").write_text('{"image": "half')  # what a kill mid-write leaves
    (output / ".part-notes").write_text("the user's")  # not ours: kept
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert f"resuming: {written} photo(s) already in" in rerun.stderr
    images = [row["image"] for shard in sorted(output.glob("part-*")) for row in read_shard(shard)]
    assert sorted(images) == sorted(str(path) for path in photos.iterdir())  # each photo once, none twice
    assert [path.name for path in output.glob(".part-*")] == [".part-notes"]


def test_without_ray_the_engine_says_in_one_line_how_to_install_it(tmp_path, photos, model_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as it does where Ray is not installed
    output = tmp_path / "out"
    status = caption.main([str(photos), "--engine", "ray", "--output", str(output), "--model", str(model_file)])
    assert status == 2
    assert capsys.readouterr().err == (
        "error: --engine ray needs Ray Data, which is not installed: pip install -r requirements-scale.txt\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_photos_read_by_ray_from_a_uri_are_captioned_and_resumed(tmp_path, photos, model_file):
    """A `file://` URI takes the object-store path (Ray reads the bytes, the actor decodes them)."""
    pytest.importorskip("ray")
    output = tmp_path / "shards"
    command = _ray_command(f"file://{photos}", output, model_file)
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stderr[-2000:]  # the broken photo
    rows = finished_rows(output)
    assert sorted(rows) == sorted(str(path) for path in photos.iterdir())
    assert rows[str(photos / "broken.jpg")]["error"].endswith("not an image format this tool reads "
                                                              "(JPEG, PNG, GIF, WebP, BMP, TIFF)")  # fmt: skip
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert f"resuming: {len(rows)} photo(s) already in" in again.stderr
    assert sum(len(read_shard(shard)) for shard in output.glob("part-*")) == len(rows)  # nothing written twice


@pytest.mark.slow
def test_ray_writes_keywords_into_sidecars_as_one_process_does(tmp_path, captioning_model, tiny_tokenizer):
    pytest.importorskip("ray")
    from checkpoint import save_captioner
    from distill import load_teacher

    recogniser = {name: tensor.half() for name, tensor in load_teacher().state_dict().items()}
    model = tmp_path / "labelled.pt"
    save_captioner(model, captioning_model, tiny_tokenizer, {"recogniser": recogniser})
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(ROOT / "examples" / "cat.jpg", folder / "cat.jpg")
    run = subprocess.run(
        [*_ray_command(folder, tmp_path / "shards", model), "--sidecar", "--keywords"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (folder / "cat.txt").read_text().rstrip("\n").endswith(", Egyptian cat")


def test_ray_refuses_what_it_cannot_do_in_one_line_before_starting(tmp_path, photos, model_file, capsys):
    pytest.importorskip("ray")
    output = tmp_path / "shards"
    argv = [str(photos), "--engine", "ray", "--output", str(output), "--model", str(model_file)]
    assert caption.main([*argv, "--labels-only"]) == 2
    assert capsys.readouterr().err == (
        "error: --labels-only is for one process; with --engine ray every shard row carries its photo's labels\n"
    )
    assert caption.main([*argv, "--sidecar", "--keywords"]) == 2  # the tiny model has no recogniser
    assert capsys.readouterr().err.rstrip().endswith("has no ImageNet recogniser for labels (hub.py release --labels)")
    output.mkdir()
    (output / "part-00000.jsonl").write_text("my notes, not a shard\n")
    assert caption.main(argv) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith(f"error: {output} holds a file that is not a shard of this command (")
        and error.count("\n") == 1
    )
    assert (output / "part-00000.jsonl").read_text() == "my notes, not a shard\n"  # left as it was
