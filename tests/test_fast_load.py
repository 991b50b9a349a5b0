"""The safetensors loader (``models/weights.py``, ``models/safetensors_read.py``): bit-identical to
``from_pretrained``, reads only the scope's tensors, hashes the fingerprint alongside; checkpoints whose weights do not
match their config.json, and truncated files, are refused in one line; the fingerprint cache catches edits in place.

The refusal and cache tests failed on the code before this loader (each says how).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import refused_one_line

import auto_quantize_model.models.fingerprint as fingerprint
import auto_quantize_model.models.safetensors_read as st_read
from auto_quantize_model.errors import UserError
from auto_quantize_model.models.loading import load_model
from auto_quantize_model.models.safetensors_read import DTYPES
from auto_quantize_model.models.scope import Scope
from auto_quantize_model.safetensors_header import ITEM_BYTES, check_header


@pytest.fixture(autouse=True)
def own_fingerprint_cache(tmp_path, monkeypatch):
    """Each test starts from an empty fingerprint cache of its own."""
    monkeypatch.setenv("AUTOQUANT_FINGERPRINT_CACHE", str(tmp_path / "fp-cache" / "file-hashes.json"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: Path, **text: object) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["text_config"].update(text)
    if "num_hidden_layers" in text:
        cfg["text_config"]["layer_types"] = ["full_attention"] * int(text["num_hidden_layers"])  # type: ignore[arg-type]
    path.write_text(json.dumps(cfg))


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def _assert_identical(fast, slow) -> None:
    a, b = _tensors(fast.model), _tensors(slow.model)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].device == b[name].device, name
        assert torch.equal(a[name], b[name]), name
    assert fast.param_counts == slow.param_counts and fast.weights_fingerprint == slow.weights_fingerprint


# -- bit-identical to from_pretrained ----------------------------------------------------------------------------

@pytest.mark.parametrize("scope", [Scope.LANGUAGE_MODEL, Scope.WHOLE_VLM])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_load_is_bit_identical_to_from_pretrained(tiny_model_dir, scope, dtype):
    fast = load_model(tiny_model_dir, scope, device="cpu", dtype=dtype)
    slow = load_model(tiny_model_dir, scope, device="cpu", dtype=dtype, via_from_pretrained=True)
    assert (fast.loader, slow.loader) == ("safetensors", "from_pretrained")
    _assert_identical(fast, slow)
    ids = fast.tokenizer(["A red dog sitting on a wooden bench."], return_tensors="pt").input_ids
    with torch.no_grad():
        if scope is Scope.LANGUAGE_MODEL:
            m = fast.model
            assert m.lm_head.weight is m.model.embed_tokens.weight  # tied, as from_pretrained ties them
            assert torch.equal(m(ids, torch.ones_like(ids)), slow.model(ids, torch.ones_like(ids)))
        else:
            m = fast.model
            assert m.lm_head.weight is m.model.language_model.embed_tokens.weight
            assert m.config.to_dict() == slow.model.config.to_dict()
            assert m.generation_config.to_dict() == slow.model.generation_config.to_dict()
            assert not m.training and not slow.model.training
            assert set(vars(m)) == set(vars(slow.model))
            assert [repr(c) for c in m._weight_conversions] == [repr(c) for c in slow.model._weight_conversions]
            assert torch.equal(m(input_ids=ids).logits, slow.model(input_ids=ids).logits)


def test_whole_model_saves_under_the_checkpoints_own_names(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    loaded = load_model(tiny_model_dir, Scope.WHOLE_VLM, device="cpu")
    loaded.model.save_pretrained(tmp_path / "again")
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as a, safe_open(tmp_path / "again" / "model.safetensors",
                                                                               "pt") as b:
        assert set(a.keys()) == set(b.keys())  # model.layers.*, visual.*: the load's renaming reversed
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_language_model_scope_reads_no_vision_tensor(tiny_model_dir, monkeypatch):
    import auto_quantize_model.models.weights as weights

    asked: list[str] = []
    real_map = weights.map_tensors

    def spy(header, entries):
        asked.extend(e.name for e in entries)
        return real_map(header, entries)

    monkeypatch.setattr(weights, "map_tensors", spy)
    loaded = load_model(tiny_model_dir, Scope.LANGUAGE_MODEL, device="cpu")
    header = check_header(tiny_model_dir / "model.safetensors")
    lm = [e for e in header.entries.values() if not e.name.startswith("visual.")]
    assert sorted(asked) == sorted(e.name for e in lm)  # every LM tensor, no vision tensor
    assert loaded.load_bytes == sum(e.end - e.start for e in lm) and loaded.load_gb_per_s > 0


@pytest.mark.parametrize("to", [torch.float32, torch.bfloat16])
def test_gpu_reader_fills_every_tensor_exactly_and_hashes_alongside(tiny_model_dir, monkeypatch, to):
    """The reader a GPU load uses (staging buffers, ranges in threads, cast on the device), run on the host: tiny
    staging buffers so tensors straddle them, and every other tensor skipped so ranges break."""
    from safetensors.torch import load_file

    from auto_quantize_model.io_utils import sha256_file

    monkeypatch.setattr(st_read, "CHUNK", 1000)
    monkeypatch.setattr(st_read, "PIECE", 20_000)
    path = tiny_model_dir / "model.safetensors"
    header = check_header(path)
    names = sorted(header.entries)[::2]
    dests = [(header.entries[n], torch.full(header.entries[n].shape, 7, dtype=to)) for n in names]
    read: list[tuple[int, int]] = []
    real = st_read._read_unit
    monkeypatch.setattr(st_read, "_read_unit", lambda u, s: read.append((u.start, u.end)) or real(u, s))
    stats = st_read.read_into([(path, dests)], torch.device("cpu"), [path], threads=3)
    expected = load_file(path)
    for (entry, dest) in dests:
        assert torch.equal(dest, expected[entry.name].to(to)), entry.name
    assert stats.digests == {path: sha256_file(path)} and stats.bytes_hashed == path.stat().st_size
    assert stats.bytes_loaded == sum(e.end - e.start for e, _ in dests) == sum(b - a for a, b in read)
    skipped = [header.entries[n] for n in header.entries if n not in names]
    assert not any(a < e.end and e.start < b for a, b in read for e in skipped if e.end > e.start)


def test_fingerprint_is_hashed_alongside_the_read_not_after(tiny_model_dir, monkeypatch):
    from auto_quantize_model.io_utils import sha256_file, sha256_json

    def no_second_read(*a, **k):
        raise AssertionError("the fingerprint was computed by a separate pass over the files")

    expected = sha256_json([["model.safetensors", sha256_file(tiny_model_dir / "model.safetensors")]])
    monkeypatch.setattr(fingerprint, "hash_files", no_second_read)
    monkeypatch.setattr(fingerprint, "sha256_file", no_second_read)
    hashed = []
    real = st_read._hash_file
    monkeypatch.setattr(st_read, "_hash_file", lambda p: hashed.append(p) or real(p))
    loaded = load_model(tiny_model_dir, Scope.LANGUAGE_MODEL, device="cpu")
    assert loaded.weights_fingerprint == expected and hashed == [tiny_model_dir / "model.safetensors"]
    again = load_model(tiny_model_dir, Scope.LANGUAGE_MODEL, device="cpu")  # now cached: nothing hashed
    assert again.weights_fingerprint == expected and len(hashed) == 1


def test_sharded_and_bin_checkpoints_load_identically(tiny_model_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    reference = load_model(tiny_model_dir, Scope.WHOLE_VLM, device="cpu", via_from_pretrained=True)
    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    full.save_pretrained(sharded, max_shard_size="300KB")
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith(("model", "config")):
            shutil.copy(f, sharded / f.name)
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    got = load_model(sharded, Scope.WHOLE_VLM, device="cpu")
    ref, new = _tensors(reference.model), _tensors(got.model)
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    # A .bin checkpoint goes through from_pretrained (the old path), same tensors.
    binary = _copy(sharded, tmp_path / "bin")
    for f in binary.glob("model*.safetensors*"):
        f.unlink()
    state = {k: v for k, v in full.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, binary / "pytorch_model.bin")
    old = load_model(binary, Scope.LANGUAGE_MODEL, device="cpu")
    assert old.loader == "from_pretrained"
    lm = _tensors(load_model(tiny_model_dir, Scope.LANGUAGE_MODEL, device="cpu").model)
    assert all(torch.equal(lm[k], v) for k, v in _tensors(old.model).items())


# -- weights that do not match config.json: refused in one line, before any search ------------------------------



def _run_argv(model_dir: Path, out: Path) -> list[str]:
    return ["run", "--scheme-name", "fp8_autoquant_top25", "--model-dir", str(model_dir), "--output-dir", str(out),
            "--captions-path", "demo", "--max-calib-samples", "8", "--calib-seq-len", "32", "--device", "cpu"]


def test_config_naming_more_layers_than_the_weights_hold_is_refused(tiny_model_dir, tmp_path, capsys):
    # Old code: layer 4 was initialised at random, searched, scored and recorded; `run` exited 0.
    bad = _copy(tiny_model_dir, tmp_path / "more")
    _edit_config(bad, num_hidden_layers=5)
    err = refused_one_line(capsys, _run_argv(bad, tmp_path / "out"), "do not match its config.json")
    assert "missing" in err and "layers.4." in err and "fix config.json" in err
    assert not list((tmp_path / "out").glob("**/*manifest*"))
    for via in (False, True):
        with pytest.raises(UserError, match="missing"):
            load_model(bad, Scope.WHOLE_VLM, device="cpu", via_from_pretrained=via)


def test_extra_and_misshaped_tensors_are_refused(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    # Old code: the weights of layer 3 were dropped without a word and the 3-layer model was searched (exit 0).
    fewer = _copy(tiny_model_dir, tmp_path / "fewer")
    _edit_config(fewer, num_hidden_layers=3)
    err = refused_one_line(capsys, _run_argv(fewer, tmp_path / "o1"), "not in the model")
    assert "model.layers.3." in err
    # One tensor stored with another shape. Old code: exit 2, but after transformers' 10-line load report on stderr.
    odd = _copy(tiny_model_dir, tmp_path / "odd")
    tensors = load_file(odd / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key] = tensors[key].t().contiguous()
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})
    err = refused_one_line(capsys, _run_argv(odd, tmp_path / "o2"), "wrong shape")
    assert key in err
    # A mis-shaped vision tensor does not stop a language-model load (nothing of the vision tower is read) ...
    vis = _copy(tiny_model_dir, tmp_path / "vis")
    tensors = load_file(vis / "model.safetensors")
    vkey = "visual.blocks.0.mlp.down_proj.weight"
    tensors[vkey] = tensors[vkey].t().contiguous()
    save_file(tensors, vis / "model.safetensors", metadata={"format": "pt"})
    load_model(vis, Scope.LANGUAGE_MODEL, device="cpu")
    # ... but does stop a whole-VLM one.
    with pytest.raises(UserError, match="wrong shape"):
        load_model(vis, Scope.WHOLE_VLM, device="cpu")


def test_infer_on_truncated_weights_is_one_line(tiny_model_dir, tmp_path, capsys):
    # Old code: `infer` printed a safetensors traceback.
    bad = _copy(tiny_model_dir, tmp_path / "trunc")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    argv = ["infer", "--bf16", "--model-dir", str(bad), "--prompt", "A dog", "--max-new-tokens", "2", "--device", "cpu"]
    err = refused_one_line(capsys, argv, "is corrupt")
    assert "truncated" in err and "model.safetensors" in err
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    refused_one_line(capsys, argv, "is corrupt")


def test_file_shrinking_during_the_read_is_one_line(tiny_model_dir, tmp_path):
    bad = _copy(tiny_model_dir, tmp_path / "shrinks")
    weights = bad / "model.safetensors"
    header = check_header(weights)
    os.truncate(weights, header.size - 100)  # after the header check: what a concurrent writer would do
    entry = max(header.entries.values(), key=lambda e: e.end)
    dest = torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    with pytest.raises(UserError, match="is corrupt: it ends at byte"):
        st_read.read_into([(weights, [(entry, dest)])], torch.device("cpu"), [])


def _header_blob(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("blob", [b"", b"\x01\x00", b"\xff" * 64, b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
                                  b"\x20\x00\x00\x00\x00\x00\x00\x00" + b'{"a": {"dtype": "F32"}}         ',
                                  # a dtype that is no string: a TypeError traceback in the shared check's first cut
                                  _header_blob({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
                                               b"\0" * 4)])
def test_corrupt_headers_are_one_line(tmp_path, blob):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(UserError, match="is corrupt|does not read"):
        check_header(path)
    with pytest.raises(UserError, match="is corrupt|does not read"):  # the preflight: the same check, no torch
        check_header(path)


@pytest.mark.parametrize("header, match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "holds 4 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "overlap"),
    ({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, "does not read"),
])
def test_preflight_refuses_what_the_loader_would_and_only_in_the_files_it_reads(tiny_model_dir, tmp_path, header,
                                                                                match):
    """The preflight once checked only that data ended inside the file: overlapping or mis-sized tensors and dtypes
    the loader cannot read passed it (and a run then failed after starting). It also checked every *.safetensors in
    the directory; a stray file the loader never opens is not refused."""
    from auto_quantize_model.preflight import check_checkpoint_files

    ckpt = _copy(tiny_model_dir, tmp_path / "ckpt")
    (ckpt / "stray.safetensors").write_bytes(_header_blob(header, b"\0" * 8))
    check_checkpoint_files(ckpt)  # model.safetensors is what loads; the stray file is not read
    (ckpt / "model.safetensors").write_bytes(_header_blob(header, b"\0" * 8))
    with pytest.raises(UserError, match=match):
        check_checkpoint_files(ckpt)


def test_every_header_dtype_has_a_torch_dtype():
    assert DTYPES.keys() == ITEM_BYTES.keys()
    assert all(torch.empty((), dtype=DTYPES[k]).element_size() == n for k, n in ITEM_BYTES.items())


# -- the fingerprint cache ---------------------------------------------------------------------------------------

def test_fingerprint_cache_catches_an_edit_in_place_with_the_mtime_put_back(tiny_model_dir, tmp_path):
    # Old code: the cache key was (path, size, mtime, inode), all unchanged: the old fingerprint was returned.
    from auto_quantize_model.models.fingerprint import weights_fingerprint

    ckpt = _copy(tiny_model_dir, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    before = weights_fingerprint(ckpt)
    st = weights.stat()
    with open(weights, "r+b") as fh:  # same inode, same size
        fh.seek(st.st_size // 3)
        byte = fh.read(1)
        fh.seek(st.st_size // 3)
        fh.write(bytes([byte[0] ^ 1]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns and weights.stat().st_ino == st.st_ino
    assert weights_fingerprint(ckpt) != before
    assert load_model(ckpt, device="cpu").weights_fingerprint != before


def test_fingerprint_cache_checks_a_content_sample(tiny_model_dir, tmp_path):
    """Where file times cannot be trusted, the content sample still tells an edited file from the hashed one."""
    from auto_quantize_model.models.fingerprint import _cache_path, content_sample, weights_fingerprint

    ckpt = _copy(tiny_model_dir, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    size = len(data)
    base = content_sample(weights, size)
    for offset in (0, size - 1, size * 5 // 17):  # head, tail, one of the fixed-offset blocks
        edited = bytearray(data)
        edited[offset] ^= 1
        other = tmp_path / f"edit{offset}"
        other.write_bytes(bytes(edited))
        assert content_sample(other, size) != base
    first = weights_fingerprint(ckpt)
    cache = json.loads(_cache_path().read_text())
    (entry,) = cache["files"].values()
    entry["sample"] = "0" * 64  # same size, times and inode; other sampled content
    entry["sha256"] = "f" * 64
    _cache_path().write_text(json.dumps(cache))
    assert weights_fingerprint(ckpt) == first  # the entry was not trusted: the file was hashed again


def _fingerprint_in_subprocess(model_dir: str, cache: str) -> str:
    os.environ["AUTOQUANT_FINGERPRINT_CACHE"] = cache
    from auto_quantize_model.models.fingerprint import weights_fingerprint

    return weights_fingerprint(model_dir)


def test_fingerprint_cache_survives_concurrent_writers(tiny_model_dir, tmp_path):
    from auto_quantize_model.models.fingerprint import _cache_path, _read_cache, plan_fingerprint

    dirs = []
    for i in range(6):
        d = tmp_path / f"c{i}"
        d.mkdir()
        data = bytearray((tiny_model_dir / "model.safetensors").read_bytes())
        data[-1] ^= i  # six different files
        (d / "model.safetensors").write_bytes(bytes(data))
        dirs.append(str(d))
    cache = str(_cache_path())
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        prints = pool.starmap(_fingerprint_in_subprocess, [(d, cache) for d in dirs])
    assert len(set(prints)) == 6
    assert len(_read_cache(_cache_path())) == 6  # every writer's entry merged in, the file still valid JSON
    assert all(not plan_fingerprint(d).todo for d in dirs)
    assert not list(_cache_path().parent.glob(".*.tmp"))


def test_fingerprint_cache_stays_small(tiny_model_dir, tmp_path, monkeypatch):
    from auto_quantize_model.models.fingerprint import _cache_path, _read_cache, weights_fingerprint

    monkeypatch.setattr(fingerprint, "MAX_ENTRIES", 3)
    for i in range(5):
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(bytes([i]) * 100)
        weights_fingerprint(d)
    kept = _read_cache(_cache_path())
    assert len(kept) == 3 and all(Path(k).parent.name in ("c2", "c3", "c4") for k in kept)
