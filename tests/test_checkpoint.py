"""Model files: round trips give identical logits; every broken file gives one clear line naming it."""

import os
import pickle
import zipfile

import pytest
import torch
from conftest import ROOT

import checkpoint
from checkpoint import CheckpointError, export_safetensors, load_model_file, save_captioner


def _logits(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=generator)
    with torch.no_grad():
        return model(pixels, input_ids)[0]


def test_pt_round_trip_gives_identical_logits_config_tokenizer_and_metadata(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "captioner.pt"
    save_captioner(path, tiny_model, tiny_tokenizer, {"trained_on": "fixture", "metrics": {"CIDEr": 0.5}})
    model, tokenizer, metadata = load_model_file(path)
    assert model.config == tiny_model.config
    assert tokenizer.encode("a dog on the grass") == tiny_tokenizer.encode("a dog on the grass")
    assert metadata == {"trained_on": "fixture", "metrics": {"CIDEr": 0.5}}
    assert torch.equal(_logits(model), _logits(tiny_model))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_half_precision_file_is_smaller_and_close(tmp_path, tiny_model, tiny_tokenizer):
    save_captioner(tmp_path / "full.pt", tiny_model, tiny_tokenizer)
    save_captioner(tmp_path / "half.pt", tiny_model, tiny_tokenizer, half=True)
    assert os.path.getsize(tmp_path / "half.pt") < 0.6 * os.path.getsize(tmp_path / "full.pt")
    model, _, _ = load_model_file(tmp_path / "half.pt")
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(_logits(model), _logits(tiny_model), atol=2e-2, rtol=0)


def test_safetensors_export_round_trip_gives_identical_logits(tmp_path, tiny_model, tiny_tokenizer):
    files = export_safetensors(tmp_path / "hub", tiny_model, tiny_tokenizer, {"licence": "test"})
    assert sorted(path.name for path in files) == ["config.json", "model.safetensors", "tokenizer.json"]
    model, _, metadata = load_model_file(tmp_path / "hub")
    assert metadata == {"licence": "test"}
    assert torch.equal(_logits(model), _logits(tiny_model))


@pytest.fixture
def saved(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "captioner.pt"
    save_captioner(path, tiny_model, tiny_tokenizer)
    return path


def _expect(path, message):
    with pytest.raises(CheckpointError) as caught:
        load_model_file(path)
    text = str(caught.value)
    assert str(path) in text and message in text and "\n" not in text, text
    assert len(text) <= 200, text


def test_truncated_file_is_a_clear_error(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    _expect(saved, "truncated or corrupt")


def test_a_truncated_model_file_is_one_short_line_on_the_command_line(saved, capsys):
    import caption

    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 3])
    assert caption.main(["--model", str(saved), str(ROOT / "examples" / "cat.jpg")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    # torch's own text for this is a 300-character paragraph of advice; ours names the file and the problem.
    assert line.startswith(f"error: {saved}: not a readable checkpoint, truncated or corrupt"), line
    assert len(line) <= len("error: ") + 200, line


def test_corrupt_bytes_are_a_clear_error(saved):
    data = bytearray(saved.read_bytes())
    data[100:4000] = os.urandom(3900)
    saved.write_bytes(bytes(data))
    _expect(saved, "not a readable checkpoint")


def test_empty_missing_and_folder_are_clear_errors(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    _expect(tmp_path / "empty.pt", "empty")
    _expect(tmp_path / "absent.pt", "no such file")
    (tmp_path / "folder").mkdir()
    _expect(tmp_path / "folder", "folder")


def test_text_file_and_foreign_checkpoint_are_clear_errors(tmp_path):
    (tmp_path / "notes.pt").write_text("hello, not a model\n")
    _expect(tmp_path / "notes.pt", "not a readable checkpoint")
    torch.save({"model": torch.zeros(3)}, tmp_path / "other.pt")
    _expect(tmp_path / "other.pt", "not a captioner model file")


def test_newer_format_version_is_refused(saved):
    contents = torch.load(saved, weights_only=True)
    contents["format_version"] = checkpoint.FORMAT_VERSION + 1
    torch.save(contents, saved)
    _expect(saved, "newer than this code reads")


def test_weights_that_do_not_match_the_config_are_refused(saved):
    contents = torch.load(saved, weights_only=True)
    contents["config"]["n_layer"] = 3
    torch.save(contents, saved)
    _expect(saved, "weights do not match the model config")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": _RunsCode()}, path)
    _expect(path, "refused")
    assert not (tmp_path / "PWNED").exists()
    # The same payload as a bare pickle (no torch zip container) is refused too.
    with open(tmp_path / "bare.pt", "wb") as file:
        pickle.dump(_RunsCode(), file)
    with pytest.raises(CheckpointError):
        load_model_file(tmp_path / "bare.pt")
    assert not (tmp_path / "PWNED").exists()


def test_failed_write_keeps_the_previous_file(saved, tiny_model, tiny_tokenizer, monkeypatch):
    before = saved.read_bytes()

    def disk_full(obj, path):
        with open(path, "wb") as file:
            file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_captioner(saved, tiny_model, tiny_tokenizer, {"new": True})
    assert saved.read_bytes() == before
    assert [path.name for path in saved.parent.iterdir()] == [saved.name]
    assert zipfile.is_zipfile(saved)
