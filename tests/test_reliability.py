"""Nothing saved is lost, a model file cannot run code, and the server neither leaks files nor hangs when full."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, small_dataset, start_app, stop_app
from PIL import Image

import app
import caption
import evaluate
import train
from captioner import Captioner
from checkpoint import CheckpointError, load_model_file, save_captioner
from config import TrainConfig

SAVE_THEN_DIE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
import checkpoint
torch.save({{"version": 1, "weights": torch.arange(10.0)}}, {path!r})  # the previous, good file

def dying_save(obj, temporary):
    with open(temporary, "wb") as file:
        file.write(b"PK half a checkpoint")
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write

checkpoint.torch.save = dying_save
checkpoint.save_torch({{"version": 2}}, {path!r})
"""


def test_kill_9_in_the_middle_of_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    result = subprocess.run([sys.executable, "-c", SAVE_THEN_DIE.format(root=str(ROOT), path=str(path))], timeout=120)
    assert result.returncode == -signal.SIGKILL
    saved = torch.load(path, weights_only=True)
    assert saved["version"] == 1 and torch.equal(saved["weights"], torch.arange(10.0))


SAVE_FOREVER = """
import sys
sys.path.insert(0, {root!r})
import torch
from checkpoint import save_torch
version = 0
while True:
    version += 1
    save_torch({{"version": version, "weights": torch.full((400_000,), float(version))}}, {path!r})
"""


@pytest.mark.slow
def test_kill_9_at_random_moments_of_repeated_saves_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "last.pt"
    rng = random.Random(0)
    for _ in range(15):
        process = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER.format(root=str(ROOT), path=str(path))])
        while not path.exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved = torch.load(path, weights_only=True)
        assert torch.equal(saved["weights"], torch.full((400_000,), float(saved["version"])))


def test_a_full_disk_during_training_is_reported_and_the_last_checkpoint_survives(tmp_path, monkeypatch):
    data = small_dataset(tmp_path / "data")
    config = TrainConfig(
        data=str(data), out_dir=str(tmp_path / "run"), preset="tiny", vocab_size=300, epochs=1, batch_size=1,
        captions_per_image=1, eval_every=0, precision="float32", cache_dir=str(tmp_path / "cache"), unfreeze_blocks=2,
        checkpoint_every=1, workers=1,
    )  # fmt: skip
    import checkpoint

    real_save = checkpoint.torch.save
    calls = []

    def fails_on_the_second_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as file:
                file.write(b"partial")
            raise OSError(28, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", fails_on_the_second_save)
    with pytest.raises(
        CheckpointError, match=r"could not write \(No space left on device\); the previous file is intact"
    ):
        train.train(config)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["training"]["step"] == 1
    assert not list((tmp_path / "run").glob("*.tmp"))


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_model_file_that_would_run_code_is_refused_by_every_entry_point(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "image-captioner", "format_version": 1, "state_dict": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        Captioner.load(evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_model_file(evil)
    assert evaluate.main(["--model", str(evil), "--data", str(small_dataset(tmp_path / "eval")), "--split", "val"]) == 2
    assert caption.main(["--model", str(evil), str(ROOT / "examples" / "cat.jpg")]) == 2
    assert app.main(["--model", str(evil)]) == 2
    data = small_dataset(tmp_path / "data")
    config = TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), init_from=str(evil), cache_dir="")
    with pytest.raises(CheckpointError, match="refused"):
        train.train(config)
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()


def test_no_code_path_trusts_remote_code():
    sources = [path for path in ROOT.glob("*.py")] + [path for path in (ROOT / "tests").glob("*.py")]
    offenders = [
        path.name for path in sources if "trust_remote_code" in path.read_text() and path.name != Path(__file__).name
    ]
    assert offenders == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [
        "/file=/etc/passwd",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=../../../../etc/passwd",
        "/gradio_api/file=%2Fetc%2Fpasswd",
        "/file=" + str(ROOT / "captioner.pt"),
        "/gradio_api/file=" + str(ROOT / "app.py"),
    ],
)
def test_the_app_serves_no_file_outside_its_own_folders(app_server, path):
    try:
        with urllib.request.urlopen(app_server.rstrip("/") + path, timeout=30) as response:
            body, status = response.read(), response.status
    except urllib.error.HTTPError as error:
        body, status = error.read(), error.code
    assert status in (400, 403, 404) and b"root:" not in body and b"import gradio" not in body


@pytest.mark.slow
def test_a_full_queue_answers_busy_instead_of_hanging(tmp_path, captioning_model, tiny_tokenizer):
    from gradio_client import Client, handle_file

    save_captioner(tmp_path / "model.pt", captioning_model, tiny_tokenizer)
    url, process = start_app(tmp_path / "model.pt", "--queue-size", "1")
    try:
        outcomes = []
        # A different photo per request, so that this test is about the queue alone (identical requests at once:
        # test_an_overlay_file_is_never_seen_half_written_by_simultaneous_identical_requests).
        photos = []
        for index in range(24):
            photos.append(tmp_path / f"cat-{index}.png")
            Image.open(ROOT / "examples" / "cat.jpg").resize((200 + index, 150)).save(photos[-1])

        def request(photo):
            client = Client(url, verbose=False)
            started = time.monotonic()
            try:
                client.predict(handle_file(str(photo)), num_beams=8, api_name="/caption")
                outcomes.append(("ok", time.monotonic() - started))
            except Exception as error:  # the client raises its own error types for a refused job
                outcomes.append((str(error), time.monotonic() - started))

        threads = [threading.Thread(target=request, args=(photo,)) for photo in photos]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert len(outcomes) == 24
        refused = [message for message, _ in outcomes if message != "ok"]
        unexplained = [
            message for message in refused if "full" not in message.lower() and "busy" not in message.lower()
        ]
        assert refused and not unexplained, unexplained
        assert any(message == "ok" for message, _ in outcomes)
    finally:
        stop_app(process)


def test_an_overlay_file_is_never_seen_half_written_by_simultaneous_identical_requests(tmp_path):
    # Two people captioning the same example at once get the same overlay: each must be handed a whole file.
    temp_files = app.TempFiles(tmp_path, 900)
    overlay = Image.effect_noise((400, 300), 64).convert("RGB")
    whole = Image.open(temp_files.image(overlay)).tobytes()
    next(tmp_path.iterdir()).unlink()  # the first call only measured the whole file
    seen = []

    def request():
        for _ in range(10):
            with Image.open(temp_files.image(overlay)) as image:
                seen.append(image.tobytes() == whole)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 80 and all(seen)
    assert [path.suffix for path in tmp_path.iterdir()] == [".png"]  # one file, no staging leftovers


@pytest.mark.slow
def test_the_load_script_reports_zero_failures_on_a_small_run(tmp_path, captioning_model, tiny_tokenizer, capsys):
    import load_app

    save_captioner(tmp_path / "model.pt", captioning_model, tiny_tokenizer)
    code = load_app.main(["--model", str(tmp_path / "model.pt"), "--clients", "3", "--requests", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 clients x 2 requests: 6 ok, 0 failed" in out and "p95" in out
