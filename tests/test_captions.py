"""Caption sources (text, COCO JSON, JSONL) and the deterministic calibration loader."""

from __future__ import annotations

import json

import pytest
import torch

from auto_quantize_model.datasets.calibration import IGNORE_INDEX, build_calibration_set
from auto_quantize_model.datasets.captions import read_captions
from auto_quantize_model.datasets.demo import DEMO_CAPTIONS_PATH, demo_captions
from auto_quantize_model.errors import UserError


def test_shipped_demo_file_is_the_generator_output():
    assert DEMO_CAPTIONS_PATH.read_text(encoding="utf-8").splitlines() == demo_captions()


def test_text_file_counts_blank_duplicate_and_bad_utf8(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"A cat on a mat.\n\n  \nA cat   on a mat.\n\xff\xfe broken\nA dog.\n")
    src = read_captions(str(p))
    assert src.format == "text"
    assert src.captions == ["A cat on a mat.", "A dog."]
    assert src.dropped == {"blank": 2, "duplicate": 1, "bad_utf8": 1, "no_caption_field": 0, "zero_width": 0, "nul": 0}


def test_coco_annotations_json(tmp_path):
    p = tmp_path / "captions_train2017.json"
    data = {"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": 10, "caption": "A man riding a wave."},
        {"image_id": 1, "id": 11, "caption": "A man riding a wave."},
        {"image_id": 1, "id": 12, "caption": "Surfer on a board."},
    ]}
    p.write_text(json.dumps(data))
    src = read_captions(str(p))
    assert src.format == "coco_json"
    assert src.captions == ["A man riding a wave.", "Surfer on a board."]
    assert src.dropped["duplicate"] == 1


def test_jsonl_caption_or_text_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"caption": "One."}\n{"text": "Two."}\n{"other": 3}\nnot json\n\n')
    src = read_captions(str(p))
    assert src.format == "jsonl"
    assert src.captions == ["One.", "Two."]
    assert src.dropped["no_caption_field"] == 2 and src.dropped["blank"] == 1


def test_empty_and_missing_sources(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(UserError, match="no usable captions"):
        read_captions(str(empty))
    with pytest.raises(UserError, match="does not exist"):
        read_captions(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="annotations"):
        (tmp_path / "x.json").write_text('{"images": []}')
        read_captions(str(tmp_path / "x.json"))


def test_calibration_is_deterministic_and_masks_padding(loaded):
    src = read_captions("demo")
    a = build_calibration_set(loaded.tokenizer, src, max_samples=10, batch_size=4, seq_len=12, seed=3)
    b = build_calibration_set(loaded.tokenizer, src, max_samples=10, batch_size=4, seq_len=12, seed=3)
    c = build_calibration_set(loaded.tokenizer, src, max_samples=10, batch_size=4, seq_len=12, seed=4)
    assert a.token_hash == b.token_hash and a.captions == b.captions
    assert a.token_hash != c.token_hash
    assert [x["input_ids"].shape[0] for x in a.batches] == [4, 4, 2]
    for batch in a.batches:
        assert batch["input_ids"].shape[1] <= 12
        pad = batch["attention_mask"] == 0
        assert torch.all(batch["labels"][pad] == IGNORE_INDEX)
        assert torch.all(batch["labels"][~pad] == batch["input_ids"][~pad])
    assert a.describe()["num_samples"] == 10 and a.describe()["content_hash"] == src.content_hash


@pytest.mark.parametrize("field", ["max_samples", "batch_size", "seq_len"])
def test_non_positive_sizes(loaded, field):
    kwargs = {"max_samples": 4, "batch_size": 2, "seq_len": 8, field: 0}
    with pytest.raises(UserError, match="positive"):
        build_calibration_set(loaded.tokenizer, read_captions("demo"), **kwargs)
