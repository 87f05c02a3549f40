"""Tokenizers: GPT-2's BPE gives GPT-2's ids; the caption BPE round-trips text; one token is BOS, EOS and pad."""

from conftest import GPT2_TOKENIZER, TINY_CAPTIONS, needs_shared

from tokenizer import END_OF_TEXT, CaptionTokenizer, load_gpt2_tokenizer, train_caption_tokenizer


@needs_shared(GPT2_TOKENIZER)
def test_gpt2_tokenizer_from_a_local_folder_gives_gpt2_ids():
    tokenizer = load_gpt2_tokenizer(GPT2_TOKENIZER)
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == 50256
    assert tokenizer.vocab_size == 50257
    assert tokenizer.decode([15496, 995, 50256, 995]) == "Hello world"


def test_gpt2_tokenizer_loads_from_a_save_pretrained_folder(tmp_path):
    from transformers import GPT2TokenizerFast

    source = train_caption_tokenizer(TINY_CAPTIONS, vocab_size=280)
    GPT2TokenizerFast(tokenizer_object=source.backend, eos_token=END_OF_TEXT).save_pretrained(tmp_path)
    loaded = load_gpt2_tokenizer(tmp_path)
    assert loaded.encode("a dog runs") == source.encode("a dog runs")
    assert loaded.eos_token_id == source.eos_token_id


def test_caption_tokenizer_round_trips_lower_cased_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode("A Dog runs on the grass")
    assert tiny_tokenizer.decode(ids) == "a dog runs on the grass"
    assert tiny_tokenizer.eos_token_id == 0 and tiny_tokenizer.eos_token_id not in ids
    # Unseen words and characters still encode (byte-level), nothing becomes <unk>.
    assert tiny_tokenizer.decode(tiny_tokenizer.encode("zebra über 🦓")) == "zebra über 🦓"


def test_decode_stops_at_the_first_end_of_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a cat") + [tiny_tokenizer.eos_token_id] + tiny_tokenizer.encode("a dog")
    assert tiny_tokenizer.decode(ids) == "a cat"


def test_tokenizer_json_round_trip(tiny_tokenizer):
    copy = CaptionTokenizer.from_json(tiny_tokenizer.to_json())
    assert copy.encode("two children play") == tiny_tokenizer.encode("two children play")
    assert copy.vocab_size == tiny_tokenizer.vocab_size
