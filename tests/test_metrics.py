"""In-process CIDEr-D and PTB tokenisation against pycocoevalcap, the reference implementation."""

import shutil

import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from metrics import CiderD, ptb_tokenize

REFERENCES = {
    "dog": [
        "a black dog is running through the grass",
        "a dog runs across a green field",
        "the black dog runs on the grass",
        "a dog is running outside",
        "a black and white dog running in a field",
    ],
    "beach": [
        "people are walking on the beach",
        "two people walk along the shore",
        "a couple walks on the sand near the ocean",
        "people walking on a sandy beach",
        "a man and a woman walk on the beach at sunset",
    ],
    "bike": [
        "a man rides a bike down the street",
        "a cyclist is riding on a city street",
        "a man on a bicycle",
        "a person riding a bike on the road",
        "a man in a helmet rides his bike",
    ],
}
CANDIDATES = {
    "dog": "a black dog is running on the grass",
    "beach": "a man and a woman walk on the beach",
    "bike": "a dog runs in the snow",  # wrong: scores near zero
}


def test_cider_d_equals_pycocoevalcaps_cider_on_the_same_references():
    expected_mean, expected = Cider().compute_score(REFERENCES, {key: [text] for key, text in CANDIDATES.items()})
    scorer = CiderD(list(REFERENCES.values()))
    actual = [scorer.score(CANDIDATES[key], REFERENCES[key]) for key in REFERENCES]
    assert actual == pytest.approx(list(expected), rel=1e-9, abs=1e-12)
    assert sum(actual) / len(actual) == pytest.approx(expected_mean, rel=1e-9)
    assert actual[0] > 1.0 and actual[2] < 0.1
    # Precomputed reference vectors give the same score as texts.
    vectors = [scorer.vector(text) for text in REFERENCES["dog"]]
    assert scorer.score(scorer.vector(CANDIDATES["dog"]), vectors) == actual[0]


def test_cider_d_document_frequencies_come_from_the_corpus_given():
    small = CiderD(list(REFERENCES.values()))
    larger = CiderD([*REFERENCES.values(), ["a dog", "a dog runs", "a dog sits", "a dog", "a dog jumps"]])
    # "dog" becomes more common in the larger corpus, so matching it is worth less there.
    assert larger.score("a dog", REFERENCES["dog"]) < small.score("a dog", REFERENCES["dog"])


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer needs Java")
def test_ptb_tokenize_matches_pycocoevalcaps_tokenizer():
    captions = [
        "A dog's ball is red .",
        "Two children , a boy and a girl , play in the water !",
        "A man in a blue t-shirt isn't smiling...",
        '"Hello" says the sign; it\'s 5:30 (evening)?',
        "The  woman's   dogs' toys -- on the grass",
        "A rock-climber climbs a cliff .",
        "a 3.5 year old holds 10,000 [toys] & a hat",
    ]
    expected = PTBTokenizer().tokenize({str(i): [{"caption": text}] for i, text in enumerate(captions)})
    assert [ptb_tokenize(text) for text in captions] == [expected[str(i)][0] for i in range(len(captions))]
