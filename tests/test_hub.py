"""Release files, and the Hugging Face Hub paths, tested offline: a prepared local cache, a recording HfApi."""

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import hub
from checkpoint import CheckpointError, checkpoint_dict, load_model_file, save_torch
from release import LIMITATIONS, ModelInfo


def test_release_drops_training_state_halves_weights_and_checks_the_recommended_decoding(
    tmp_path, tiny_model, tiny_tokenizer
):
    contents = checkpoint_dict(tiny_model, tiny_tokenizer, {"trained_on": "fixture"})
    contents["training"] = {"optimizer": {"state": {}, "param_groups": []}, "step": 7}
    save_torch(contents, tmp_path / "best.pt")
    hub.release(tmp_path / "best.pt", tmp_path / "captioner.pt", {"decoding": {"num_beams": 4}})
    released = torch.load(tmp_path / "captioner.pt", weights_only=True)
    assert "training" not in released
    assert released["state_dict"]["decoder.wte.weight"].dtype == torch.float16
    assert released["metadata"] == {"trained_on": "fixture", "decoding": {"num_beams": 4}, "limitations": LIMITATIONS}
    with pytest.raises(ValueError, match="num_beams"):
        hub.release(tmp_path / "best.pt", tmp_path / "other.pt", {"decoding": {"num_beams": 0}})
    assert not (tmp_path / "other.pt").exists()


def test_release_at_another_image_size_resamples_the_position_embedding_and_forgets_what_was_measured(
    tmp_path, tiny_model, tiny_tokenizer
):
    from model import with_image_layout

    measured = {"metrics": {"CIDEr": 0.6}, "metrics_split": "test", "precisions": ["bfloat16"], "precision": "bfloat16"}
    save_torch(checkpoint_dict(tiny_model, tiny_tokenizer, {"trained_on": "fixture", **measured}), tmp_path / "a.pt")
    assert hub.main(["release", str(tmp_path / "a.pt"), str(tmp_path / "big.pt"), "--image-size", "64"]) == 0
    model, _, metadata = load_model_file(tmp_path / "big.pt")
    assert model.config.image_size == 64 and metadata == {"trained_on": "fixture", "limitations": LIMITATIONS}
    expected = with_image_layout(tiny_model, 64, None).encoder.vit.pos_embed.detach().half().float()
    torch.testing.assert_close(model.encoder.vit.pos_embed.detach(), expected)
    assert hub.main(["release", str(tmp_path / "a.pt"), str(tmp_path / "same.pt"), "--image-size", "32"]) == 0
    assert load_model_file(tmp_path / "same.pt")[2]["metrics"] == {"CIDEr": 0.6}  # the same size: nothing changed


def test_release_at_an_image_size_the_patches_do_not_divide_says_which_would(
    tmp_path, tiny_model, tiny_tokenizer, capsys
):
    save_torch(checkpoint_dict(tiny_model, tiny_tokenizer), tmp_path / "a.pt")
    assert hub.main(["release", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--image-size", "40"]) == 2
    assert "error: image_size=40 is not a multiple" in capsys.readouterr().err and not (tmp_path / "b.pt").exists()
    assert hub.main(["release", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--image-size", "0"]) == 2
    assert "error: image_size must be a positive integer, got 0" in capsys.readouterr().err


def test_release_of_several_checkpoints_averages_their_weights_and_refuses_other_models(
    tmp_path, tiny_model, tiny_tokenizer
):
    from model import CaptionModel

    checkpoints, states = [], []
    for index in range(3):
        model = copy.deepcopy(tiny_model)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter, generator=torch.Generator().manual_seed(index)))
        states.append(model.state_dict())
        checkpoints.append(tmp_path / f"epoch-{index}.pt")
        save_torch(
            checkpoint_dict(
                model, tiny_tokenizer, {"step": index, "metrics": {"CIDEr": index}, "precisions": ["int8", "float32"]}
            ),
            checkpoints[-1],
        )
    assert hub.main(["release", *map(str, checkpoints), str(tmp_path / "averaged.pt")]) == 0
    averaged, _, metadata = load_model_file(tmp_path / "averaged.pt")
    for key, value in averaged.state_dict().items():
        if value.is_floating_point():
            expected = sum(state[key].double() for state in states) / 3
            torch.testing.assert_close(value.double(), expected.half().double())  # released weights are float16
    assert metadata["averaged"] == [{"file": f"epoch-{index}.pt", "step": index} for index in range(3)]
    assert "metrics" not in metadata  # one checkpoint's validation says nothing about the average
    assert "precisions" not in metadata  # nor does its precision check

    other = CaptionModel(dataclasses.replace(tiny_model.config, n_layer=tiny_model.config.n_layer + 1))
    save_torch(checkpoint_dict(other, tiny_tokenizer), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: a different model .* cannot average"):
        hub.release([checkpoints[0], tmp_path / "other.pt"], tmp_path / "mixed.pt")
    assert not (tmp_path / "mixed.pt").exists()


def _cache_with(tmp_path, model_file) -> tuple[str, str]:
    """A Hugging Face cache holding user/captioner at one commit, as hf_hub_download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub-cache" / "models--user--captioner"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / hub.HUB_FILENAME).write_bytes(model_file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return str(tmp_path / "hub-cache"), commit


def test_captioner_loads_a_hub_repo_id_from_the_cache_offline_with_a_pinned_revision(
    tmp_path, captioning_model, tiny_tokenizer
):
    from checkpoint import save_captioner

    save_captioner(tmp_path / "captioner.pt", captioning_model, tiny_tokenizer, {"trained_on": "hub fixture"})
    cache, commit = _cache_with(tmp_path, tmp_path / "captioner.pt")
    script = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
from captioner import Captioner
from checkpoint import CheckpointError
for revision in (None, {commit!r}):
    captioner = Captioner.load("user/captioner", device="cpu", revision=revision)
    print(captioner.info.trained_on)
try:
    Captioner.load("user/missing", device="cpu")
except CheckpointError as error:
    print("error:", error)
"""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == ["hub fixture", "hub fixture"]
    assert lines[2].startswith("error: user/missing: cannot get captioner.pt from the Hugging Face Hub")


def test_push_uploads_the_model_and_a_generated_card(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    from huggingface_hub import HfApi

    from checkpoint import save_captioner

    metadata = {"trained_on": "Flickr8k", "metrics": {"CIDEr": 0.61, "BLEU-4": 0.22}, "decoding": {"num_beams": 3}}
    save_captioner(tmp_path / "captioner.pt", tiny_model, tiny_tokenizer, metadata)
    calls = []
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **options: calls.append(("create", repo_id, options)) or f"https://hf.co/{repo_id}",
    )

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, revision=None):
        with open(path_or_fileobj, "rb") as file:
            calls.append(("upload", path_in_repo, repo_id, revision, file.read()))

    monkeypatch.setattr(HfApi, "upload_file", upload_file)
    assert hub.push(tmp_path / "captioner.pt", "user/captioner", private=True) == "https://hf.co/user/captioner"
    assert calls[0] == ("create", "user/captioner", {"private": True, "exist_ok": True})
    uploads = {call[1]: call[4] for call in calls[1:]}
    assert uploads["captioner.pt"] == (tmp_path / "captioner.pt").read_bytes()
    card = uploads["README.md"].decode()
    assert "| precision | BLEU-4 | CIDEr |" in card and "| float32 | 0.220 | 0.610 |" in card
    assert "**Trained on**: Flickr8k" in card and "pipeline_tag: image-to-text" in card


def test_the_model_card_is_a_hugging_face_card_with_the_shipped_test_scores():
    from huggingface_hub import ModelCard

    model, _, metadata = load_model_file(ROOT / "captioner.pt")
    card = ModelCard(hub.model_card(ModelInfo.from_dict(metadata), model.config, "user/captioner"))
    data = card.data
    assert data.license == "other" and data.license_name == "flickr8k-research-only" and data.license_link
    assert data.language == "en" and data.datasets == ["flickr8k"] and data.pipeline_tag == "image-to-text"
    recorded = {result.metric_name: result.metric_value for result in data.eval_results}
    assert recorded["CIDEr"] == metadata["metrics"]["CIDEr"] and recorded["BLEU-4"] == metadata["metrics"]["BLEU-4"]
    assert {result.dataset_split for result in data.eval_results} == {metadata["metrics_split"]} == {"test"}
    space = (ROOT / "README.md").read_text().split("---")[1]  # the Space's front matter: the same licence
    assert f"license_name: {data.license_name}" in space and f"license_link: {data.license_link}" in space


def test_push_refuses_a_file_that_does_not_load(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    with pytest.raises(CheckpointError):
        hub.push(tmp_path / "broken.pt", "user/captioner")


def test_release_of_a_real_training_checkpoint_loads(tmp_path, tiny_model, tiny_tokenizer):
    save_torch(checkpoint_dict(tiny_model, tiny_tokenizer), tmp_path / "last.pt")
    assert (
        hub.main(["release", str(tmp_path / "last.pt"), str(tmp_path / "out.pt"), "--decoding", '{"num_beams": 2}'])
        == 0
    )
    assert load_model_file(tmp_path / "out.pt")[2]["decoding"] == {"num_beams": 2}


class _SpaceHub:
    """A stand-in for the Hub's two calls that deploy-space makes; it keeps the files it is sent, as the Hub would."""

    def __init__(self):
        self.calls, self.files = [], {}

    def create_repo(self, api, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))
        return f"https://huggingface.co/spaces/{repo_id}"

    def upload_folder(self, api, *, folder_path, repo_id, repo_type, **options):
        self.calls.append(("upload_folder", repo_id, repo_type))
        root = Path(folder_path)
        self.files = {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_deploy_space_creates_a_gradio_space_and_sends_the_app_its_code_and_the_model(
    tmp_path, tiny_model, tiny_tokenizer, monkeypatch
):
    from huggingface_hub import HfApi

    from checkpoint import save_captioner

    save_captioner(tmp_path / "model.pt", tiny_model, tiny_tokenizer, {"trained_on": "fixture"})
    hub_stand_in = _SpaceHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **o: hub_stand_in.create_repo(api, repo_id, **o))
    monkeypatch.setattr(HfApi, "upload_folder", lambda api, **o: hub_stand_in.upload_folder(api, **o))
    assert hub.main(["deploy-space", "user/captioner-demo", "--model", str(tmp_path / "model.pt")]) == 0

    assert hub_stand_in.calls == [
        ("create_repo", "user/captioner-demo", {"repo_type": "space", "space_sdk": "gradio", "private": False,
                                                "exist_ok": True}),
        ("upload_folder", "user/captioner-demo", "space"),
    ]  # fmt: skip
    files = hub_stand_in.files
    assert files["captioner.pt"] == (tmp_path / "model.pt").read_bytes()  # the model chosen, under the app's name
    for name in ("app.py", "model.py", "captioner.py", "requirements.txt", "examples/cat.jpg", "examples/CREDITS.md"):
        assert files[name] == (ROOT / name).read_bytes(), name
    front_matter = files["README.md"].decode().split("---")[1]
    assert "sdk: gradio" in front_matter and "app_file: app.py" in front_matter
    assert not [name for name in files if name.startswith(("tests/", ".venv/", ".git/", "runs/"))]
    # Every module the app imports is there, so the Space starts.
    imported = {
        line.split()[1].split(".")[0]
        for line in files["app.py"].decode().splitlines()
        if line.startswith(("from ", "import "))
    }
    assert {name + ".py" for name in imported if (ROOT / f"{name}.py").exists()} <= set(files)


def test_deploy_space_refuses_a_model_that_does_not_load(tmp_path, capsys):
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    assert hub.main(["deploy-space", "user/demo", "--model", str(tmp_path / "broken.pt")]) == 2
    assert "broken.pt" in capsys.readouterr().err


def test_release_with_the_training_data_ships_a_draft_table_that_keeps_greedy_captions_the_same(
    tmp_path, captioning_model, tiny_tokenizer, capsys
):
    import shutil

    from captioner import Captioner
    from checkpoint import save_captioner
    from config import DecodeConfig

    for split in ("train", "val"):
        data = tmp_path / "data" / split
        data.mkdir(parents=True)
        for index, photo in enumerate(sorted((ROOT / "examples").glob("*.jpg"))):
            shutil.copy(photo, data / photo.name)
            (data / photo.name).with_suffix(".txt").write_text(f"a dog runs on the grass\na photo number {index}\n")
    save_captioner(tmp_path / "best.pt", captioning_model, tiny_tokenizer, {"trained_on": "fixture"})
    assert hub.main(["release", str(tmp_path / "best.pt"), str(tmp_path / "out.pt"), "--data", str(data.parent)]) == 0
    assert f"unfamiliar-photo signal is fitted to the photos of {data.parent} alone" in capsys.readouterr().out
    fast = Captioner.load(tmp_path / "out.pt", device="cpu")
    assert (
        fast.draft is not None
        and fast.draft.draft([tiny_tokenizer.bos_token_id], 1, 0) == tiny_tokenizer.encode("a")[:1]
    )
    plain = Captioner(*load_model_file(tmp_path / "out.pt")[:2], device="cpu")  # no metadata, so no draft table
    photos = sorted((ROOT / "examples").glob("*.jpg"))
    greedy = DecodeConfig(strategy="greedy", max_new_tokens=12)
    assert [c.token_ids for c in fast.caption(photos, greedy)] == [c.token_ids for c in plain.caption(photos, greedy)]
    assert hub.main(["release", str(tmp_path / "best.pt"), str(tmp_path / "x.pt"), "--data", str(tmp_path / "no")]) == 2


@pytest.mark.parametrize("reading", ["memory", "prompt"])
def test_a_retrieval_fine_tune_averages_with_its_start_and_keeps_its_own_caption_memory(
    tmp_path, tiny_model, tiny_tokenizer, reading
):
    from model import with_retrieval

    start = tiny_model
    tuned = with_retrieval(copy.deepcopy(tiny_model), 2, reading)
    with torch.no_grad():
        for parameter in tuned.parameters():
            parameter.add_(torch.randn_like(parameter, generator=torch.Generator().manual_seed(1)))
    save_torch(checkpoint_dict(start, tiny_tokenizer), tmp_path / "start.pt")
    save_torch(checkpoint_dict(tuned, tiny_tokenizer), tmp_path / "tuned.pt")
    hub.release([tmp_path / "start.pt", tmp_path / "tuned.pt"], tmp_path / "averaged.pt")
    averaged = load_model_file(tmp_path / "averaged.pt")[0]
    assert averaged.config.retrieval_k == 2 and averaged.config.retrieval_reading == reading
    start_state, tuned_state = start.state_dict(), tuned.state_dict()
    for key, value in averaged.state_dict().items():
        if not value.is_floating_point():
            continue
        expected = tuned_state[key] if key.startswith("memory.") else (start_state[key] + tuned_state[key]) / 2
        torch.testing.assert_close(value.float(), expected.half().float(), msg=key)
    other = with_retrieval(copy.deepcopy(tiny_model), 2 if reading == "prompt" else 3)  # k or reading differ
    save_torch(checkpoint_dict(other, tiny_tokenizer), tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError, match=r"(tuned|other).pt: a different model from .*(other|tuned).pt; cannot average"
    ):
        hub.release([tmp_path / "tuned.pt", tmp_path / "other.pt"], tmp_path / "mixed.pt")


def test_a_model_files_record_refuses_a_key_it_does_not_know_and_the_captioner_says_so_in_one_line(
    tmp_path, tiny_model, tiny_tokenizer
):
    from captioner import Captioner
    from checkpoint import save_captioner

    assert ModelInfo.from_dict({"trained_on": "x", "step": 0}).to_dict() == {"trained_on": "x", "step": 0}
    with pytest.raises(ValueError, match="does not know: colour, size"):
        ModelInfo.from_dict({"trained_on": "x", "size": 1, "colour": "red"})
    save_captioner(tmp_path / "odd.pt", tiny_model, tiny_tokenizer, {"trained_on": "x", "mood": "happy"})
    with pytest.raises(CheckpointError, match=r"odd.pt: the model file records what this code does not know: mood"):
        Captioner.load(tmp_path / "odd.pt", device="cpu")


def test_what_was_measured_on_the_weights_is_dropped_and_the_rest_kept():
    info = ModelInfo.from_dict(
        {"trained_on": "x", "recipe": ["python train.py"], "metrics": {"CIDEr": 0.6}, "precisions": ["bfloat16"],
         "familiarity": {"k": 1}, "decoding": {"num_beams": 3}}
    )  # fmt: skip
    assert info.without_measurements().to_dict() == {
        "trained_on": "x", "recipe": ["python train.py"], "decoding": {"num_beams": 3}
    }  # fmt: skip


def test_docs_model_card_is_the_card_the_shipped_files_record_renders(capsys):
    assert hub.main(["card", str(ROOT / "captioner.pt")]) == 0
    assert (ROOT / "docs" / "model-card.md").read_text() == capsys.readouterr().out
