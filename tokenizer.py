"""Caption text <-> token ids.

Convention, decided once for every tokenizer here: a single special token, GPT-2's ``<|endoftext|>``, is the
beginning-of-sequence token, the end-of-sequence token and the padding token. A training sequence is
``[BOS] caption [EOS]``; generation starts from ``[BOS]`` (plus an optional text prefix) and stops at EOS.
Captions are encoded without a leading space, in training and at inference alike.

Two sources: GPT-2's byte-level BPE (hub id or a local folder with vocab.json + merges.txt) for pretrained GPT-2
decoders, and a small byte-level BPE trained on caption text for decoders trained from scratch. A checkpoint stores
its tokenizer as a `tokenizers` JSON string, so a model file is self-contained.
"""

import os
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


class CaptionTokenizer:
    """A `tokenizers.Tokenizer` with the BOS = EOS = padding convention above."""

    def __init__(self, backend: Tokenizer):
        token_id = backend.token_to_id(END_OF_TEXT)
        if token_id is None:
            raise ValueError(f"tokenizer has no {END_OF_TEXT} token")
        self.backend = backend
        self.eos_token_id: int = token_id
        self.bos_token_id: int = token_id
        self.pad_token_id: int = token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, up to the first EOS, without control characters (byte-level tokens can spell any byte; a
        caption goes to terminals, CSV files and image metadata, where those do harm)."""
        ids = list(ids)
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        text = self.backend.decode(ids, skip_special_tokens=True)
        return "".join(character for character in text if character.isprintable()).strip()

    def words(self, ids: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """The words of `ids` and, for each, the positions of its tokens: a token whose text starts with a space
        begins a new word."""
        words: list[str] = []
        groups: list[list[int]] = []
        for position, token_id in enumerate(ids):
            piece = self.backend.decode([token_id])
            if not groups or piece.startswith(" "):
                words.append(piece.strip())
                groups.append([position])
            else:
                words[-1] += piece
                groups[-1].append(position)
        return words, groups

    def to_json(self) -> str:
        return self.backend.to_str()

    @classmethod
    def from_json(cls, text: str) -> "CaptionTokenizer":
        return cls(Tokenizer.from_str(text))


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int) -> CaptionTokenizer:
    """A byte-level BPE of `vocab_size` tokens learned from caption text (lower-cased, NFKC-normalised)."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(captions, trainer=trainer)
    return CaptionTokenizer(backend)


def load_gpt2_tokenizer(source: str | os.PathLike) -> CaptionTokenizer:
    """GPT-2's BPE from a hub id or a local folder (vocab.json + merges.txt, or tokenizer.json): one code path."""
    # transformers' GPT2TokenizerFast(vocab_file=..., merges_file=...) silently builds an empty tokenizer;
    # from_pretrained reads the folder or the hub correctly.
    from transformers import GPT2TokenizerFast

    return CaptionTokenizer(GPT2TokenizerFast.from_pretrained(os.fspath(source)).backend_tokenizer)
