"""The unfamiliar-photo signal: k-nearest-neighbour familiarity, its calibration, and where users see it."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import caption
from captioner import Captioner
from checkpoint import export_safetensors, load_captioner, save_captioner
from config import DecodeConfig
from familiarity import FamiliarityBank, auroc, image_embedding

EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
GREEDY = DecodeConfig(strategy="greedy", max_new_tokens=5)


def test_familiarity_is_the_mean_cosine_to_the_k_nearest_bank_photos():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]), dim=-1)
    query = torch.tensor([[1.0, 0.0]])
    # Cosines to the bank: 1, 0, 0.7071, -1; the two nearest: 1 and 0.7071.
    assert FamiliarityBank(bank, k=2).score(query).item() == pytest.approx((1 + 2**-0.5) / 2)
    assert FamiliarityBank(bank, k=1).score(query).item() == pytest.approx(1.0)
    embeddings = image_embedding(torch.tensor([[[3.0, 0.0], [1.0, 0.0]]]))
    assert torch.allclose(embeddings, torch.tensor([[1.0, 0.0]]))


def test_calibration_flags_the_requested_share_of_in_domain_photos():
    scores = torch.linspace(0, 1, 101)
    bank = FamiliarityBank(torch.eye(2)).calibrated(scores, 0.05)
    assert (scores < bank.threshold).float().mean().item() == pytest.approx(0.05, abs=0.011)


def test_auroc_counts_pairs_ranked_right_and_half_the_ties():
    assert auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2])) == 1.0
    assert auroc(torch.tensor([0.1]), torch.tensor([0.9])) == 0.0
    assert auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.5, 0.1])) == pytest.approx((0.5 + 1 + 1 + 1) / 4)


@pytest.fixture
def banked_model(tmp_path, captioning_model, tiny_tokenizer):
    """A model file whose bank is the cat's embedding, with a threshold between the cat and the other examples."""
    plain = Captioner(captioning_model, tiny_tokenizer, device="cpu")
    embeddings = image_embedding(plain.encode(EXAMPLES).tokens)
    cat = [path.name for path in EXAMPLES].index("cat.jpg")
    bank = FamiliarityBank(embeddings[cat : cat + 1], k=1)
    others = torch.cat([bank.score(embeddings[:cat]), bank.score(embeddings[cat + 1 :])])
    threshold = (1.0 + others.max().item()) / 2  # the cat scores 1 (it is the bank), the others less
    metadata = {"familiarity": FamiliarityBank(bank.bank, 1, threshold).to_dict()}
    save_captioner(tmp_path / "banked.pt", captioning_model, tiny_tokenizer, metadata)
    return tmp_path / "banked.pt", embeddings, cat, threshold


def test_captions_carry_familiarity_and_the_unfamiliar_flag(banked_model):
    path, embeddings, cat, _ = banked_model
    captions = Captioner.load(path, device="cpu").caption(EXAMPLES, GREEDY, num_return_sequences=1)
    expected = (embeddings @ embeddings[cat]).tolist()  # cosine to the one bank photo
    for index, result in enumerate(captions):
        assert result.familiarity == pytest.approx(expected[index], abs=2e-3)  # the bank is stored in float16
        assert result.unfamiliar == (index != cat)
    no_bank = Captioner(*load_captioner(path)[:2], device="cpu").caption(EXAMPLES[:1], GREEDY)[0]
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
    assert header == "image,caption,confidence,familiarity,unfamiliar" and row.split(",")[-1] in ("true", "false")


def test_the_bank_survives_the_safetensors_layout(banked_model, tmp_path):
    model, tokenizer, metadata = load_captioner(banked_model[0])
    export_safetensors(tmp_path / "hub", model, tokenizer, metadata)
    _, _, again = load_captioner(tmp_path / "hub")
    assert torch.equal(again["familiarity"]["bank"], metadata["familiarity"]["bank"])
    assert again["familiarity"]["threshold"] == metadata["familiarity"]["threshold"]


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
    assert evaluate.main([*argv, "--max-new-tokens", "4", "--ood", str(tmp_path / "ood")]) == 0
    out = capsys.readouterr().out
    others = len(EXAMPLES) - 1
    assert f"flagged as unfamiliar: test 0 of 1 (0.0%), out-of-domain {others} of {others} (100.0%)" in out
    assert "AUROC test vs out-of-domain, familiarity: 1.0000" in out and "confidence: " in out
    assert "examples flagged: cat.jpg NO, coffee.jpg yes, rocket.jpg yes" in out
