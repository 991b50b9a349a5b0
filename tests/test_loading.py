"""Loading: one loader (``load_model``) for the language model only or the whole VLM, through the same
from_pretrained path as a real checkpoint; the scope strings manifests and scoring keys carry."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from auto_quantize_model.errors import UserError
from auto_quantize_model.models.loading import config_hash, load_language_model, load_model, read_checkpoint_config
from auto_quantize_model.models.scope import Scope
from auto_quantize_model.models.tiny import QWEN2_5_VL_3B_CONFIG


def test_tiny_checkpoint_is_a_shrunk_real_config(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["model_type"] == "qwen2_5_vl"
    text = cfg.get("text_config", cfg)
    assert text["num_hidden_layers"] == 4 and text["hidden_size"] == 64
    # What was not shrunk comes from the real 3B config.
    assert text["num_key_value_heads"] == QWEN2_5_VL_3B_CONFIG["num_key_value_heads"]
    assert cfg["tie_word_embeddings"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (tiny_model_dir / name).is_file(), name


def test_language_model_only_vision_left_out(loaded):
    names = [n for n, _ in loaded.model.named_modules()]
    assert not any("visual" in n for n in names)
    assert "lm_head" in names and "model.layers.3.mlp.down_proj" in names
    counts = loaded.param_counts
    assert counts["left_out"] > 0  # the vision tower was in the checkpoint
    assert counts["checkpoint_total"] == counts["language_model"] + counts["left_out"]
    linears = [m for m in loaded.model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * 7 + 1
    # Tied embeddings stay tied: lm_head shares the embedding matrix.
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_lm_logits_match_the_full_vlm(tiny_model_dir, loaded):
    from transformers import Qwen2_5_VLForConditionalGeneration

    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = loaded.tokenizer(["A red dog sitting on a wooden bench."], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = full(input_ids=ids).logits
        got = loaded.model(ids, torch.ones_like(ids))
    torch.testing.assert_close(got, expected)


def test_plain_causal_lm_loads(tmp_path, tiny_model_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from auto_quantize_model.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    lm = load_language_model(tmp_path / "lm", device="cpu")
    assert lm.architecture == "Qwen2ForCausalLM" and lm.param_counts["left_out"] == 0
    assert sum(isinstance(m, nn.Linear) for m in lm.model.modules()) == 2 * 7 + 1
    with pytest.raises(UserError, match="no vision tower"):
        load_model(tmp_path / "lm", Scope.WHOLE_VLM, device="cpu")


def test_scope_strings_are_pinned(loaded, calib):
    # Manifests and the scoring identity carry these strings: renaming one would orphan every cached search and
    # make old manifests unreadable as their scope.
    from typing import get_args

    from auto_quantize_model.autoquant.identity import DataIdentity
    from auto_quantize_model.records.manifest import ModelRecord

    assert {s.name: s.value for s in Scope} == {"LANGUAGE_MODEL": "language_model",
                                                "WHOLE_VLM": "vision_language_model"}
    assert set(get_args(ModelRecord.__annotations__["scope"])) == {s.value for s in Scope}
    assert loaded.scope is Scope.LANGUAGE_MODEL
    described = loaded.describe()["scope"]
    assert type(described) is str and json.dumps(described) == '"language_model"'
    assert DataIdentity.of(loaded, calib).to_dict()["scope"] == "language_model"
    assert Scope.of({}) is Scope.LANGUAGE_MODEL  # manifests from before the field
    assert Scope.of({"scope": "vision_language_model"}) is Scope.WHOLE_VLM


def test_config_hash_ignores_library_version(tiny_model_dir):
    cfg = read_checkpoint_config(tiny_model_dir)
    assert config_hash(cfg) == config_hash({**cfg, "transformers_version": "0.0"})
    assert config_hash(cfg) != config_hash({**cfg, "vocab_size": cfg.get("vocab_size", 1) + 1})


@pytest.mark.parametrize("kind", ["missing", "file", "no_config", "bad_arch"])
def test_bad_model_dirs(tmp_path, kind):
    path = tmp_path / "m"
    if kind == "file":
        path.write_text("x")
    elif kind == "no_config":
        path.mkdir()
    elif kind == "bad_arch":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(UserError):
        load_language_model(path, device="cpu")


def test_split_follows_modelopts_language_model_lineage(tiny_model_dir):
    # split_language_model applies ModelOpt's rule without importing ModelOpt (seconds of every load): both must agree.
    from modelopt.torch.export.model_utils import get_language_model_from_vl
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    from auto_quantize_model.models.loading import split_language_model

    with torch.device("meta"):
        vlm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(tiny_model_dir))
        lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1))
    decoder, head = split_language_model(vlm)
    assert decoder is get_language_model_from_vl(vlm)[-1] and head is vlm.lm_head
    assert get_language_model_from_vl(lm) is None and split_language_model(lm) == (lm.model, lm.lm_head)
