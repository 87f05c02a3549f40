"""What the app reads and keeps: only files Gradio placed in its upload cache, decoded no larger than it needs, and
its temporary files deleted. Attacked through the raw HTTP API, as a script would, not only through gradio_client."""

import json
import os
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image
from server import start_app, stop_app

import app
from checkpoint import save_captioner

pytestmark = pytest.mark.slow

# The request of the report: a path the caller never uploaded, without Gradio's `meta` field.
DEFAULT_OPTIONS = ["beam", 3, 1.0, 30, 0, 0, 1.0, 0, 1.0, -1, ""]


def call(url: str, endpoint: str, data: list, timeout: float = 60) -> tuple[str, str]:
    """POST /gradio_api/call/ENDPOINT, then read its event stream: (last event name, its data)."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/gradio_api/call/{endpoint}",
        data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url.rstrip('/')}/gradio_api/call/{endpoint}/{event_id}", timeout=timeout) as stream:
        lines = stream.read().decode().splitlines()
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    return events[-1], payloads[-1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, captioning_model, tiny_tokenizer):
    """The app with its own temporary folder and a 2-second life for temporary files: (url, process, folder)."""
    folder = tmp_path_factory.mktemp("served")
    save_captioner(folder / "model.pt", captioning_model, tiny_tokenizer)
    temp = folder / "tmp"
    temp.mkdir()
    environment = {"GRADIO_TEMP_DIR": str(temp / "gradio"), "TMPDIR": str(temp)}
    url, process = start_app(folder / "model.pt", "--temp-file-seconds", "2", env=environment)
    yield url, process, temp
    stop_app(process)


def test_caption_refuses_server_paths_and_reveals_nothing_about_them(served, tmp_path):
    url, _, _ = served
    outside_photo = tmp_path / "photo.jpg"
    Image.open(ROOT / "examples" / "cat.jpg").save(outside_photo)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    probes = [
        str(outside_photo),  # a real photo outside the upload cache
        "/etc/passwd", "/etc/shadow", "/no/such/file.jpg", "/etc", str(ROOT / "captioner.pt"),
        "/dev/zero", str(fifo), f"{ROOT}/examples/../app.py",
    ]  # fmt: skip
    answers = {}
    for probe in probes:
        started = time.monotonic()
        answers[probe] = call(url, "caption", [{"path": probe}, *DEFAULT_OPTIONS])
        assert time.monotonic() - started < 20, probe  # /dev/zero and the FIFO are refused at once, not read
    assert {event for event, _ in answers.values()} == {"error"}
    # One answer for all: whether a path exists, is a folder or is an image stays unknown.
    assert len({data for _, data in answers.values()}) == 1, answers
    assert app.NOT_UPLOADED in next(iter(answers.values()))[1]
    # The same through /caption_batch, whose file list Gradio checks before the handler's own check (next test).
    batch_options = DEFAULT_OPTIONS[:4] + DEFAULT_OPTIONS[5:]
    for probe in ({"path": "/etc/passwd"}, {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}):
        event, data = call(url, "caption_batch", [[probe], *batch_options])
        assert event == "error" and "root:" not in data, data
    from gradio_client import Client, handle_file

    assert Client(url, verbose=False).predict(handle_file(str(outside_photo)), api_name="/caption")[0].strip()


@pytest.mark.parametrize("handler", ["caption", "batch"])
def test_every_handler_checks_each_path_itself(handler, tmp_path, monkeypatch):
    import gradio as gr

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    photo = uploads / "photo.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(photo)
    os.mkfifo(uploads / "pipe.png")
    (uploads / "link.png").symlink_to("/etc/passwd")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (40, 30)).save(outside)
    (uploads / "outside-link.png").symlink_to(outside)
    read = {"caption": app._image_from_payload, "batch": lambda payload: app._batch_sources([payload])}[handler]
    assert read({"path": str(photo), "orig_name": "photo.png"})  # an upload is read
    for path in (uploads / "pipe.png", uploads / "link.png", uploads / "outside-link.png", outside, uploads,
                 f"{uploads}/photo.png\x00.jpg", "relative/photo.png"):  # fmt: skip
        with pytest.raises(gr.Error, match=app.NOT_UPLOADED):
            read({"path": str(path), "orig_name": "photo.png"})


def _memory_mb(process, field: str) -> float:
    status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith(field)).split()[1]) / 1024


def _peak_rise_mb(process, request) -> float:
    """How far the server's peak resident memory rises above its current use while `request()` runs."""
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current use
    before = _memory_mb(process, "VmRSS")
    request()
    return _memory_mb(process, "VmHWM") - before


def test_huge_uploads_are_decoded_small_and_memory_stays_bounded(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, process, _ = served
    client = Client(url, verbose=False)
    # 86 KB on disk, 88 megapixels decoded: above the app's cap, refused from its header alone.
    bomb = tmp_path / "huge.png"
    Image.new("RGB", (9400, 9400), (200, 120, 40)).save(bomb)

    def refused():
        with pytest.raises(AppError, match="over the limit of 50 megapixels"):
            client.predict(handle_file(str(bomb)), api_name="/caption")

    rise = _peak_rise_mb(process, refused)
    print(f"peak memory rise, a refused 9400x9400 PNG: {rise:.0f} MB")
    assert rise < 50, f"a refused 9400x9400 PNG raised the server's peak memory by {rise:.0f} MB"
    # The same PNG 24 times in one small .zip to /caption_batch: each member refused from its header.
    archive = tmp_path / "bombs.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for index in range(24):
            bundle.write(bomb, f"huge-{index}.png")
    rows = []

    def zip_of_bombs():
        rows.extend(client.predict([handle_file(str(archive))], api_name="/caption_batch")[0]["data"])

    rise = _peak_rise_mb(process, zip_of_bombs)
    print(f"peak memory rise, a {archive.stat().st_size // 1024} KB zip of 24 such PNGs: {rise:.0f} MB")
    assert len(rows) == 24 and all("over the limit of 50 megapixels" in row[3] for row in rows)
    assert rise < 50, f"a zip of 24 refused PNGs raised the server's peak memory by {rise:.0f} MB"
    # Just under the cap: 49 megapixels each, four at once. Decoded whole, they would take 4 x 147 MB plus copies.
    large = tmp_path / "large.png"
    Image.new("RGB", (7000, 7000), (40, 120, 200)).save(large)
    jpeg = tmp_path / "large.jpg"
    Image.new("RGB", (7000, 7000), (40, 120, 200)).save(jpeg, quality=80)
    results = []

    def four_at_once():
        def one(path):
            results.append(Client(url, verbose=False).predict(handle_file(str(path)), api_name="/caption")[0])

        threads = [threading.Thread(target=one, args=(path,)) for path in (large, large, jpeg, jpeg)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    before = _memory_mb(process, "VmRSS")
    rise = _peak_rise_mb(process, four_at_once)
    held = _memory_mb(process, "VmRSS") - before
    print(f"four 7000x7000 uploads at once (2 PNG, 2 JPEG): peak memory +{rise:.0f} MB, held afterwards {held:+.0f} MB")
    assert len(results) == 4 and all(text.strip() for text in results)
    # One decode at a time (DECODE_SLOTS): a 7000x7000 PNG takes about 220 MB while it is decoded, then is reduced
    # to 1024 px; JPEGs are decoded at 1/8 scale. Decoded whole and at once, four took 4 x 147 MB and their copies.
    assert rise < 400, f"four 49-megapixel uploads raised the server's peak memory by {rise:.0f} MB"
    # Freed decodes are handed back to the system: without that, 333 MB stayed held (measured).
    assert held < 200, f"the server still holds {held:.0f} MB more after four 49-megapixel uploads"


def test_temporary_files_are_deleted(served, tmp_path):
    from gradio_client import Client, handle_file

    url, _, temp = served
    client = Client(url, verbose=False)
    examples = {path for path in temp.rglob("*") if path.is_file()}  # the app's example photos, copied at start
    photos = []
    for index in range(3):
        photos.append(tmp_path / f"photo-{index}.png")
        Image.open(ROOT / "examples" / "cat.jpg").resize((120 + index, 90)).save(photos[-1])
        client.predict(handle_file(str(photos[-1])), api_name="/caption")
    client.predict([handle_file(str(photo)) for photo in photos], api_name="/caption_batch")

    def files() -> list[Path]:  # Gradio's copies of uploads and results, and the app's overlays and CSVs
        return [path for path in temp.rglob("*") if path.is_file()]

    made = set(files()) - examples
    assert len(made) >= 8, made  # uploads, their overlays, the batch's copies and its CSV
    time.sleep(5)  # past the 2-second life, and past one of Gradio's 2-second sweeps
    Image.new("RGB", (50, 40), (90, 30, 30)).save(tmp_path / "new.png")
    client.predict(handle_file(str(tmp_path / "new.png")), api_name="/caption")  # our files are swept on a write
    left = made & set(files())
    assert not left, sorted(map(str, left))
