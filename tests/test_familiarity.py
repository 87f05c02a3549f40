"""The unfamiliar-photo signal: k-nearest-neighbour familiarity, its calibration, and where users see it."""

import json
import shutil

import pytest
import torch
from conftest import ROOT

import caption
from captioner import Captioner
from checkpoint import export_safetensors, load_model_file, save_captioner
from config import DecodeConfig
from familiarity import FamiliarityModel, auroc

EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
GREEDY = DecodeConfig(strategy="greedy", max_new_tokens=5)


def test_familiarity_is_the_share_of_validation_photos_as_far_from_the_training_photos():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([3.0, 1.0, 0.2])
    train = torch.randn(4000, 3, generator=generator) * scales + torch.tensor([1.0, -2.0, 0.5])
    val = torch.randn(1000, 3, generator=generator) * scales + torch.tensor([1.0, -2.0, 0.5])
    model = FamiliarityModel.fit(train, val, flagged_share=0.05)
    # The Mahalanobis distance by hand: per-axis standardised squares (the axes are independent here).
    point = torch.tensor([[1.0 + 3.0, -2.0, 0.5 + 0.4]])
    assert model.distances(point).item() == pytest.approx(1.0 + 0 + 4.0, rel=0.08)
    expected = (model.reference_distances >= model.distances(point)).float().mean().item()
    assert model.familiarity(point).item() == pytest.approx(expected)
    assert model.familiarity(torch.tensor([[1.0, -2.0, 0.5]])).item() > 0.99  # the centre: as typical as it gets
    assert model.familiarity(torch.tensor([[1.0, -2.0, 5.0]])).item() == 0.0  # 22 standard deviations off
    # A tenth of fresh in-domain photos fall below familiarity 0.1.
    fresh = torch.randn(2000, 3, generator=generator) * scales + torch.tensor([1.0, -2.0, 0.5])
    assert (model.familiarity(fresh) < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.03)
    again = FamiliarityModel.from_dict(model.to_dict())
    assert torch.equal(again.familiarity(fresh), model.familiarity(fresh))


def test_auroc_counts_pairs_ranked_right_and_half_the_ties():
    assert auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2])) == 1.0
    assert auroc(torch.tensor([0.1]), torch.tensor([0.9])) == 0.0
    assert auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.5, 0.1])) == pytest.approx((0.5 + 1 + 1 + 1) / 4)


@pytest.fixture
def banked_model(tmp_path, captioning_model, tiny_tokenizer):
    """A model file whose training photos are near-copies of the cat: every other example is unfamiliar."""
    plain = Captioner(captioning_model, tiny_tokenizer, device="cpu")
    features = plain.encode(EXAMPLES).class_tokens
    cat = [path.name for path in EXAMPLES].index("cat.jpg")
    generator = torch.Generator().manual_seed(0)
    near_cat = features[cat] + 0.01 * torch.randn(500, features.shape[1], generator=generator)
    familiarity = FamiliarityModel.fit(near_cat[:400], near_cat[400:], flagged_share=0.03)
    save_captioner(tmp_path / "banked.pt", captioning_model, tiny_tokenizer, {"familiarity": familiarity.to_dict()})
    return tmp_path / "banked.pt", familiarity.familiarity(features), cat


def test_captions_carry_familiarity_and_the_unfamiliar_flag(banked_model):
    path, expected, cat = banked_model
    captions = Captioner.load(path, device="cpu").caption(EXAMPLES, GREEDY, num_return_sequences=1)
    for index, result in enumerate(captions):
        assert result.familiarity == pytest.approx(expected[index].item(), abs=0.01)
        assert result.unfamiliar == (index != cat)
    no_bank = Captioner(*load_model_file(path)[:2], device="cpu").caption(EXAMPLES[:1], GREEDY)[0]
    assert no_bank.familiarity is None and no_bank.unfamiliar is None


def test_command_line_jsonl_and_csv_carry_familiarity(banked_model, capsys):
    path = banked_model[0]
    assert caption.main(["--model", str(path), "--strategy", "greedy", "--format", "jsonl", *map(str, EXAMPLES)]) == 0
    out, err = capsys.readouterr()
    rows = {row["image"].split("/")[-1]: row for row in map(json.loads, out.splitlines())}
    assert rows["cat.jpg"]["unfamiliar"] is False and rows["coffee.jpg"]["unfamiliar"] is True
    assert isinstance(rows["coffee.jpg"]["familiarity"], float)
    assert "look unlike the photos the model learned from" in err
    assert caption.main(["--model", str(path), "--strategy", "greedy", "--format", "csv", str(EXAMPLES[0])]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header == "image,caption,confidence,familiarity,unfamiliar,neighbours,labels"
    *_, unfamiliar, neighbours, labels = row.split(",")
    assert unfamiliar in ("true", "false") and neighbours == labels == ""  # no retrieval, no recogniser


def test_the_bank_survives_the_safetensors_layout(banked_model, tmp_path):
    model, tokenizer, metadata = load_model_file(banked_model[0])
    export_safetensors(tmp_path / "hub", model, tokenizer, metadata)
    _, _, again = load_model_file(tmp_path / "hub")
    for name in ("mean", "precision", "reference_distances"):
        assert torch.equal(again["familiarity"][name], metadata["familiarity"][name])
    assert again["familiarity"]["flagged_share"] == metadata["familiarity"]["flagged_share"]


@pytest.mark.skipif(shutil.which("java") is None, reason="evaluate.py needs Java (pycocoevalcap)")
def test_evaluate_reports_flag_rates_and_aurocs_against_an_out_of_domain_folder(banked_model, tmp_path, capsys):
    import evaluate

    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "ood").mkdir()
    for path in EXAMPLES:
        target = tmp_path / ("data/test" if path.name == "cat.jpg" else "ood") / path.name
        shutil.copy(path, target)
        target.with_suffix(".txt").write_text("a photo\n")
    argv = ["--model", str(banked_model[0]), "--data", str(tmp_path / "data"), "--strategy", "greedy"]
    assert evaluate.main(["familiarity", *argv, "--max-new-tokens", "4", str(tmp_path / "ood")]) == 0
    out = capsys.readouterr().out
    others = len(EXAMPLES) - 1
    assert f"flagged as unfamiliar: test 0 of 1 (0.0%), out-of-domain {others} of {others} (100.0%)" in out
    assert "AUROC test vs out-of-domain, familiarity: 1.0000" in out and "confidence: " in out
    assert "examples flagged: cat.jpg NO, coffee.jpg yes, rocket.jpg yes" in out
