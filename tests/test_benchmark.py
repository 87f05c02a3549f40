"""benchmark.py runs end to end and checks its own premise: both decoders generate the same tokens."""

import pytest
import torch

import benchmark
import openvino_runtime


def test_quick_table_for_the_tiny_preset(capsys):
    assert benchmark.main(["--presets", "tiny", "--new-tokens", "4", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| tiny |")]
    cells = [("greedy", "1"), ("beam 3", "1"), ("greedy", "8"), ("beam 3", "8")]
    assert [(row[1], row[2]) for row in rows[:4]] == cells
    assert all(row[6] == "yes" for row in rows[:4]), lines
    assert all(float(row[7]) > 0 and float(row[8].rstrip(" x|")) > 0 for row in rows[:4])
    assert len(rows) == 5  # and the latency split, with the bytes a step reads
    config = benchmark.PRESETS["tiny"]
    # Per layer: self-attention qkv (3C) and output (C), cross-attention query (C) and output (C), MLP (4C, C).
    width = config.n_embd
    per_layer = (3 + 1 + 1 + 1 + 4) * width * width + 4 * width * width + (3 + 1 + 1 + 1 + 4 + 1) * width
    weights = config.n_layer * per_layer + config.vocab_size * width  # and the LM head
    assert rows[4][3] == f"{weights * 4 / 1e6:.2f} MB |"


def test_end_to_end_table_compares_float32_the_default_precision_and_timm_transformers(
    tmp_path, captioning_model, tiny_tokenizer, capsys
):
    from checkpoint import save_captioner

    # Recorded as captioning like float32 in OpenVINO's bfloat16 and float32, PyTorch's bfloat16 and int8 (bfloat16
    # needs a CPU that computes it natively; OpenVINO needs installing): the fastest this machine runs is the default.
    recorded = ["openvino-bfloat16", "bfloat16", "openvino-float32", "int8", "float32"]
    metadata = {"decoding": {"num_beams": 3, "max_new_tokens": 8}, "precisions": recorded}
    save_captioner(tmp_path / "model.pt", captioning_model, tiny_tokenizer, metadata)
    argv = ["end-to-end", "--model", str(tmp_path / "model.pt"), "--limit", "3", "--batch-size", "2"]
    assert benchmark.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [
        line.strip("| ").split(" | ") for line in lines if line.startswith(("| timm", "| ours |", "| ours, default"))
    ]
    import openvino_runtime
    from precision import native_half

    bfloat16 = native_half(torch.device("cpu")) == torch.bfloat16
    openvino = openvino_runtime.available()
    expected = [("timm + transformers", "timm + transformers", "float32"), ("ours", "torch", "float32")]
    runs = [
        ("openvino", "bfloat16", openvino and bfloat16), ("torch", "bfloat16", bfloat16),
        ("openvino", "float32", openvino), ("torch", "int8", True),
    ]  # fmt: skip
    for index, (runtime, precision, _) in enumerate(run for run in runs if run[2]):
        expected.append(("ours, default" if index == 0 else "ours", runtime, precision))
    assert [tuple(row[:3]) for row in rows] == expected
    assert rows[0][4] == "1.00x" and all(float(row[3]) > 0 and float(row[5]) > 0 for row in rows)
    assert rows[1][7] == "3/3"  # float32 beam search gives transformers' captions, word for word
    if openvino:  # OpenVINO's float32 is float32: the same captions
        assert [row[7] for row in rows if row[1:3] == ["openvino", "float32"]] == ["3/3"]
    parts = [
        line.strip("| ").split(" | ")
        for line in lines[
            lines.index(
                "| ours, runtime | precision | reading and resizing, ms | encoder, ms | decoding, ms "
                "| folder batch: encoder, ms a photo | folder batch: decoding, ms a photo |"
            )
            + 2 :
        ]
    ]
    assert [row[:2] for row in parts] == [row[1:3] for row in rows[1:]]
    assert all(float(cell) > 0 for row in parts for cell in row[2:])


def test_end_to_end_times_precisions_the_model_file_does_not_record_when_asked(
    tmp_path, captioning_model, tiny_tokenizer, capsys
):
    from checkpoint import save_captioner

    save_captioner(tmp_path / "model.pt", captioning_model, tiny_tokenizer, {"decoding": {"max_new_tokens": 4}})
    argv = ["end-to-end", "--model", str(tmp_path / "model.pt"), "--limit", "1", "--batch-size", "1"]
    assert benchmark.main([*argv, "--also", "int8"]) == 0
    rows = [line.strip("| ").split(" | ")[:3] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert ["ours", "torch", "int8"] in rows and not any(row[0] == "ours, default" for row in rows)  # float32 stays


def test_speculative_report_matches_plain_greedy_with_the_files_table_or_one_built_from_the_data(
    tmp_path, captioning_model, tiny_tokenizer, capsys
):
    import shutil

    from conftest import ROOT

    from checkpoint import save_captioner
    from speculative import DraftTable

    captions = ["a cat", "a cat on a rug", "a cup of coffee", "a rocket"]
    ids = [tiny_tokenizer.encode(caption) for caption in captions]
    table = DraftTable.from_captions(ids, tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id)
    save_captioner(tmp_path / "model.pt", captioning_model, tiny_tokenizer, {"draft": table.to_dict()})
    for split in ("train", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        for name, caption in zip(("cat.jpg", "coffee.jpg", "rocket.jpg"), captions, strict=False):
            shutil.copy(ROOT / "examples" / name, tmp_path / "data" / split / name)
            (tmp_path / "data" / split / name).with_suffix(".txt").write_text(caption + "\n")
    model = ["speculative", "--model", str(tmp_path / "model.pt"), "--limit", "3"]
    assert benchmark.main(model) == 0
    assert "draft of 4 tokens: identical ids for 3 of 3" in capsys.readouterr().out
    assert benchmark.main([*model, "--data", str(tmp_path / "data"), "--draft-order", "4", "--draft-tokens", "6"]) == 0
    assert "draft of 6 tokens: identical ids for 3 of 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.main([*model, "--draft-order", "4"])
    assert "pass --data" in capsys.readouterr().err


def test_the_retrieval_report_times_a_datastore_of_the_asked_size(capsys):
    assert benchmark.main(["retrieval", "--entries", "2000", "--repeats", "2"]) == 0
    assert "datastore of 2,000 photos, 4 nearest by exact search" in capsys.readouterr().out


@pytest.mark.skipif(not openvino_runtime.available(), reason="needs OpenVINO (requirements.txt)")
def test_step_report_times_pytorchs_and_openvinos_decoding_step_for_one_photo_and_a_folder_batch(
    tmp_path, captioning_model, tiny_tokenizer, capsys
):
    from checkpoint import save_captioner

    save_captioner(tmp_path / "model.pt", captioning_model, tiny_tokenizer, {})
    assert benchmark.main(["step", "--model", str(tmp_path / "model.pt"), "--repeats", "1"]) == 0
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()[3:]]
    assert [row[:3] for row in rows] == [
        [precision, rows, step]
        for precision in ("float32", "bfloat16")
        for rows in ("3", "48")
        for step in ("torch", "openvino")
    ]
    assert all(float(row[3]) > 0 for row in rows)


def test_int8_rows_report_times_both_kernels_for_each_row_count(capsys):
    assert benchmark.main(["int8-rows", "--repeats", "2"]) == 0
    rows = [line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()[3:]]
    assert [row[0] for row in rows] == ["1", "3", "6", "12", "24", "48"]
    assert all(float(cell) > 0 for row in rows for cell in row[1:])
