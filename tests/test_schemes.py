"""Scheme catalog: frozen dataclasses, versioned JSON round trip, TOML files, override validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from auto_quantize_model.configs import AUTOQUANT_FP8_SCHEMES, Scheme, get_scheme, resolve_scheme, scheme_catalog
from auto_quantize_model.errors import UserError
from auto_quantize_model.modelopt_configs import CUSTOM_QUANT_CONFIGS, FP8_ALL_LAYERS_CFG, resolve_quant_config

SEED_SCHEMES = ["fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full", "fp8_autoquant_all_layers_fp8"]


def test_seed_schemes_present_and_ordered_by_budget():
    assert set(SEED_SCHEMES) <= set(AUTOQUANT_FP8_SCHEMES)
    bits = [AUTOQUANT_FP8_SCHEMES[n].effective_bits for n in SEED_SCHEMES[:3]]
    assert bits == sorted(bits, reverse=True)


@pytest.mark.parametrize("name", sorted(AUTOQUANT_FP8_SCHEMES))
def test_every_scheme_round_trips_through_json(name):
    scheme = AUTOQUANT_FP8_SCHEMES[name]
    again = Scheme.from_dict(json.loads(json.dumps(scheme.to_dict())))
    assert again == scheme
    assert resolve_scheme(scheme) == scheme  # every catalog scheme is valid as shipped
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.effective_bits = 1.0  # type: ignore[misc]


def test_unknown_schema_version_and_keys_refused():
    d = AUTOQUANT_FP8_SCHEMES["fp8_autoquant_top25"].to_dict()
    with pytest.raises(UserError, match="schema_version"):
        Scheme.from_dict({**d, "schema_version": 99})
    with pytest.raises(UserError, match="unknown keys"):
        Scheme.from_dict({**d, "bogus": 1})


def test_fp8_all_layers_has_no_name_pattern_exclusions():
    assert CUSTOM_QUANT_CONFIGS["FP8_ALL_LAYERS_CFG"] is FP8_ALL_LAYERS_CFG
    names = [e["quantizer_name"] for e in FP8_ALL_LAYERS_CFG["quant_cfg"]]
    assert names == ["*", "*weight_quantizer", "*input_quantizer"]
    assert not any("lm_head" in n or "visual" in n for n in names)
    assert FP8_ALL_LAYERS_CFG["quant_cfg"][1]["cfg"]["num_bits"] == (4, 3)
    import auto_quantize_model.modelopt_configs as mc  # the seed's import path

    assert "FP8_ALL_LAYERS_CFG" in mc.CUSTOM_QUANT_CONFIGS


def test_schemes_file_adds_and_overrides(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(
        '[schemes.my_nvfp4_fp8]\nquantization_formats = ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"]\n'
        'effective_bits = 6.0\nmethod = "kl_div"\ndisabled_layers = ["*lm_head*"]\n'
        '[schemes.fp8_autoquant_top25]\nquantization_formats = ["FP8_DEFAULT_CFG"]\neffective_bits = 15.0\n'
    )
    cat = scheme_catalog(f)
    mine = cat["my_nvfp4_fp8"]
    assert mine.quantization_formats == ("NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG")
    assert mine.disabled_layers == ("*lm_head*",) and mine.method == "kl_div"
    assert cat["fp8_autoquant_top25"].effective_bits == 15.0
    assert resolve_scheme(mine).effective_bits == 6.0  # NVFP4 reaches below 8 bits


def test_resolve_overrides_and_validation():
    base = get_scheme("fp8_autoquant_top50")
    s = resolve_scheme(base, effective_bits=10, method="kl_div", num_score_steps=3, quant_config="FP8_ALL_LAYERS_CFG")
    assert (s.effective_bits, s.method, s.num_score_steps, s.quantization_formats) == (10.0, "kl_div", 3, ("FP8_ALL_LAYERS_CFG",))
    for kwargs, match in [
        ({"effective_bits": 7.5}, "between 8 and 16"),
        ({"effective_bits": 16.5}, "between 8 and 16"),
        ({"num_score_steps": 0}, "positive"),
        ({"num_calib_steps": -2}, "positive"),
        ({"method": "hessian"}, "unknown"),
        ({"quant_config": "NOPE_CFG"}, "unknown quant config"),
    ]:
        with pytest.raises(UserError, match=match):
            resolve_scheme(base, **kwargs)
    with pytest.raises(UserError, match="unknown scheme"):
        get_scheme("fp8_autoquant_top99")


def test_quant_config_copies_are_independent():
    a = resolve_quant_config("FP8_DEFAULT_CFG")
    a["quant_cfg"].clear()
    assert resolve_quant_config("FP8_DEFAULT_CFG")["quant_cfg"]
