"""retrieval.py and the retrieval model: the datastore's nearest photos, a photo never retrieving itself in training,
and the caption memory read by the decoder."""

import dataclasses

import pytest
import torch
from conftest import ROOT

import train
from config import PRESETS, TrainConfig
from model import CaptionModel, with_retrieval
from retrieval import Datastore, memory_ids

CAPTIONS = {
    "astronaut.jpg": "an astronaut",
    "cat.jpg": "a cat with green eyes",
    "coffee.jpg": "a cup of coffee",
    "rocket.jpg": "a rocket at night",
    "dog_in_woods.jpg": "a dog in the woods",
}


def test_nearest_ranks_by_cosine_and_never_returns_the_excluded_entry():
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.6]])
    store = Datastore.build(embeddings, [["a"], ["b"], ["c"], ["d"]], ["a", "b", "c", "d"])
    indices, similarity = store.nearest(embeddings, 2, exclude=[0, 1, 2, 3])
    assert indices.tolist() == [[1, 3], [0, 3], [3, 1], [1, 0]]
    assert similarity[0, 0] == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5)
    assert store.nearest(embeddings[:1], 1)[0].tolist() == [[0]]  # without exclusion a photo finds itself


def test_a_users_photos_outrank_shipped_ones_only_when_about_as_close():
    shipped = Datastore.build(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [["shipped x"], ["shipped y"]], ["x", "y"])
    user = Datastore.build(torch.tensor([[0.95, 0.31]]), [["photo of rex"]], ["rex"])  # cosine 0.95 to x
    both = user.with_priority(shipped)
    assert both.captions[both.nearest(torch.tensor([[1.0, 0.0]]), 1)[0].item()] == ("photo of rex",)
    assert both.captions[both.nearest(torch.tensor([[0.0, 1.0]]), 1)[0].item()] == ("shipped y",)  # rex: 0.31


def test_memory_ids_have_a_fixed_length_per_caption(tiny_tokenizer):
    ids = memory_ids([["a dog runs on the grass", "a cat"], ["a man", "a woman in a red shirt is smiling"]],
                     tiny_tokenizer, 6)  # fmt: skip
    assert ids.shape == (2, 12)
    eos = tiny_tokenizer.eos_token_id
    assert ids[0, 5] == eos and ids[0, :5].tolist() == tiny_tokenizer.encode("a dog runs on the grass")[:5]
    assert ids[0, 6:].tolist() == [*tiny_tokenizer.encode("a cat"), eos] + [eos] * (
        5 - len(tiny_tokenizer.encode("a cat"))
    )


def test_with_retrieval_keeps_every_weight_and_the_memory_changes_the_logits(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    extended = with_retrieval(tiny_model, 2).eval()
    assert extended.config.retrieval_k == 2
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(extended.state_dict()[name], tensor), name
    images = torch.randn(1, 3, 32, 32)
    inputs = torch.tensor([[tiny_tokenizer.bos_token_id, *tiny_tokenizer.encode("a dog")]])
    length = extended.config.retrieval_tokens
    with torch.no_grad():
        dog = extended(images, inputs, memory_ids=memory_ids([["a dog runs", "a dog"]], tiny_tokenizer, length))[0]
        cat = extended(images, inputs, memory_ids=memory_ids([["a cat sits", "a cat"]], tiny_tokenizer, length))[0]
    assert not torch.allclose(dog, cat)
    with pytest.raises(ValueError, match="needs the captions of the nearest photos"):
        extended(images, inputs)
    with pytest.raises(ValueError, match="reads no captions"):
        tiny_model(images, inputs, memory_ids=memory_ids([["a"]], tiny_tokenizer, 4))


@pytest.mark.parametrize("reading", ["memory", "prompt"])
def test_training_never_retrieves_the_photo_itself(tmp_path, reading):
    for split in ("train", "val"):
        _captioned_folder(tmp_path / "data" / split, CAPTIONS)
    config = TrainConfig(
        data=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), preset="tiny", vocab_size=300, retrieval_k=3,
        retrieval_reading=reading, unfreeze_blocks=0, epochs=1, batch_size=5, captions_per_image=1, warmup_steps=1,
        eval_every=0, precision="float32", cache_dir=str(tmp_path / "cache"), workers=1,
    )  # fmt: skip
    train.train(config)
    model, tokenizer, _ = train.load_training_checkpoint(tmp_path / "run" / "last.pt")[:3]
    assert model.config.retrieval_k == 3 and model.config.retrieval_reading == reading
    data = train.CaptionData(train.load_captions(config.data)["train"], model, tokenizer, config, flip=False)
    store = data.datastore(model, torch.device("cpu"))
    data.retrieve(model, store, torch.device("cpu"), exclude_self=True)
    own = torch.arange(len(data)).unsqueeze(1)
    assert (data.neighbours != own).all() and data.neighbours.shape == (5, 3)
    val = train.CaptionData(train.load_captions(config.data)["val"], model, tokenizer, config, flip=False)
    val.retrieve(model, store, torch.device("cpu"), exclude_self=False)
    assert (val.neighbours[:, 0] == own[:, 0]).all()  # the same photos in val find themselves first
    memory = data.memory([0], torch.Generator().manual_seed(0))
    own_tokens = memory_ids([[data.items[0].captions[0]]], tokenizer, model.config.retrieval_tokens)[0]
    assert not any(
        torch.equal(chunk, own_tokens) for chunk in memory[0].split(model.config.retrieval_tokens)
    )  # never its own caption


def test_a_model_config_without_the_retrieval_fields_loads_as_no_retrieval():
    saved = {k: v for k, v in dataclasses.asdict(PRESETS["tiny"]).items() if not k.startswith("retrieval")}
    config = type(PRESETS["tiny"]).from_dict(saved)
    assert config.retrieval_k == 0 and CaptionModel(config).memory is None


def _captioned_folder(folder, captions: dict[str, str], size=(96, 72)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, caption in captions.items():
        Image.open(ROOT / "examples" / name).convert("RGB").resize(size).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    return folder


def test_a_user_datastore_is_embedded_once_and_a_changed_photo_again(tiny_model, tiny_tokenizer, tmp_path):
    from PIL import Image

    from captioner import Captioner

    captioner = Captioner(with_retrieval(tiny_model, 2), tiny_tokenizer, device="cpu")
    folder = _captioned_folder(tmp_path / "mine", {name: f"photo of {name[:-4]}" for name in CAPTIONS})
    calls = []
    embed = captioner._class_tokens_of
    captioner._class_tokens_of = lambda paths: calls.append(len(paths)) or embed(paths)
    first = captioner.add_datastore(folder, replace=True)
    second = captioner.add_datastore(folder, replace=True)
    assert calls == [5] and torch.equal(first.embeddings, second.embeddings)  # the second read the cache
    Image.open(ROOT / "examples" / "cat.jpg").convert("RGB").resize((50, 40)).save(folder / "coffee.jpg")
    third = captioner.add_datastore(folder, replace=True)
    assert calls == [5, 1]  # only the changed photo
    changed = third.names.index(str(folder / "coffee.jpg"))
    assert not torch.equal(third.embeddings[changed], first.embeddings[changed])
    same = [i for i in range(5) if i != changed]
    assert torch.equal(third.embeddings[same], first.embeddings[same])


def test_a_user_datastore_steers_a_retrieval_models_captions(tmp_path):
    """A tiny retrieval model reads the caption of the user's photo once their datastore is added beside the one it
    was trained with, its scores change, and the caption reports where what it read came from. (Whether a trained
    model takes up a user's house style is measured on the shipped model: docs/experiments.md.)"""
    from captioner import Captioner

    for split in ("train", "val"):
        for size in ((96, 72), (90, 70)):
            _captioned_folder(tmp_path / "data" / split / f"{size[0]}", CAPTIONS, size)
    config = TrainConfig(
        data=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), preset="tiny", vocab_size=300, retrieval_k=1,
        unfreeze_blocks=0, epochs=3, batch_size=10, captions_per_image=1, lr=3e-3, min_lr=3e-4, warmup_steps=5,
        label_smoothing=0.0, flip=False, eval_every=0, precision="float32", cache_dir="", workers=1, log_every=100,
    )  # fmt: skip
    train.train(config)
    model, tokenizer, _ = train.load_training_checkpoint(tmp_path / "run" / "last.pt")[:3]
    captioner = Captioner(model, tokenizer, device="cpu")
    captioner.add_datastore(tmp_path / "data" / "train", replace=True)  # what the model was trained with
    photo = tmp_path / "data" / "val" / "96" / "coffee.jpg"
    style = [tokenizer.bos_token_id, *tokenizer.encode("photo of rex"), tokenizer.eos_token_id]

    def style_logprob() -> tuple[float, tuple]:
        encoded, [neighbours] = captioner.with_memory(captioner.encode([photo]))
        with torch.no_grad():
            logits = model.decode(torch.tensor([style[:-1]]), encoded.tokens).log_softmax(-1)[0]
        return float(logits.gather(1, torch.tensor(style[1:]).unsqueeze(1)).sum()), neighbours

    before, shipped = style_logprob()
    assert shipped[0].caption == "a cup of coffee"
    user = _captioned_folder(tmp_path / "mine", {"coffee.jpg": "photo of rex"})
    captioner.add_datastore(user)  # beside the training photos, and ranked first when about as close
    after, steered = style_logprob()
    assert steered[0].name == str(user / "coffee.jpg") and steered[0].caption == "photo of rex"
    assert after != before
    [caption] = captioner.caption([photo], strategy="greedy", max_new_tokens=8)
    assert caption.neighbours == steered

    # Released with its training data, the model file carries the training photos as its own datastore.
    import hub

    hub.release(tmp_path / "run" / "last.pt", tmp_path / "released.pt", data=tmp_path / "data")
    released = Captioner.load(tmp_path / "released.pt", device="cpu", dtype="float32")
    assert len(released.datastore) == 10 and released.datastore.captions[0][0] in CAPTIONS.values()
    [caption] = released.caption([photo], strategy="greedy", max_new_tokens=8)
    assert caption.neighbours[0].name == "coffee.jpg" and caption.neighbours[0].caption == "a cup of coffee"
    mine = Captioner.load(tmp_path / "released.pt", device="cpu", dtype="float32", datastore=user, datastore_only=True)
    assert len(mine.datastore) == 1
