"""The command line: streaming, JSON, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from clp.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import make_tiny_backbone

    bb = make_tiny_backbone(context=64)
    path = tmp_path_factory.mktemp("tiny")
    bb.model.save_pretrained(path)
    bb.tokenizer.save_pretrained(path)
    return str(path)


def cli(*args):
    return CliRunner().invoke(main, list(args))


def test_generate_json_has_the_documented_keys(tiny_dir):
    r = cli("generate", "--model", tiny_dir, "--dtype", "fp32", "-n", "9", "--json", "Hello")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for key in ("text", "new_tokens", "forward_passes", "seconds", "tokens_per_second"):
        assert key in data
    assert data["new_tokens"] == 9 == len(data["token_ids"])
    assert data["mode"] == "ar"  # the default of a backbone without trained heads


@pytest.mark.integration
def test_generate_defaults_to_verify_where_the_backbone_has_heads():
    args = ("generate", "-m", "smollm2-135m", "-n", "12", "--json", "Name three planets.")
    default, ar = (json.loads(cli(*args, *extra).stdout) for extra in ((), ("--mode", "ar")))
    assert default["mode"] == "verify" and default["token_ids"] == ar["token_ids"]


def test_generate_streams_text_and_a_summary(tiny_dir):
    r = cli("generate", "-m", tiny_dir, "--dtype", "fp32", "-n", "5", "Hello")
    assert r.exit_code == 0
    assert "5 tokens, 5 forwards" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "no-such-model", "hi"], "unknown model 'no-such-model'"),
        (["-m", "TINY", "--dtype", "fp16", "hi"], "unsupported dtype 'fp16'"),
        (["-m", "TINY", ""], "the prompt is empty"),
        (["-m", "TINY", "   "], "the prompt is empty"),
        (["-m", "TINY", "-n", "0", "hi"], "max_new_tokens must be > 0"),
        (["-m", "TINY", "-n", "-3", "hi"], "max_new_tokens must be > 0"),
        (["-m", "TINY", "x" * 80], "the model's context holds 64"),
        (["-m", "TINY", "--mode", "warp", "hi"], "unknown mode 'warp'"),
        (["-m", "TINY", "--tree-nodes", "4", "hi"], "tree_nodes is a number of draft nodes"),
        (["-m", "TINY", "--min-prob", "0.2", "hi"], "min_prob is a setting of mode verify"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(tiny_dir, args, message):
    args = [tiny_dir if a == "TINY" else a for a in args]
    r = cli("generate", *args)
    assert r.exit_code == 2
    assert r.stderr.strip() == f"error: {r.stderr.strip()[7:]}" and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_demo_prints_each_runs_speed_and_agreement(tiny_dir):
    r = cli("demo", "-m", tiny_dir, "-n", "6")
    assert r.exit_code == 0, r.output
    assert "no trained heads" in r.stderr  # a checkpoint without heads: ar only
    assert re.search(
        r"ar +[\d.]+ tok/s +1\.00x ar +1\.00 tokens/forward +identical to ar 3/3", r.stdout
    )


@pytest.mark.integration
def test_demo_puts_verify_beside_llama_cpp_on_a_bundled_backbone():
    r = cli("demo", "-m", "smollm2-135m", "-n", "8")
    assert r.exit_code == 0, r.output
    x = r"[\d.]+x"
    for name, same in (("ar", "3/3"), ("verify", "3/3"), ("llama.cpp", r"\d/3")):
        speeds = rf"\n  {re.escape(name)} +[\d.]+ tok/s +{x} ar +{x} llama\.cpp"
        assert re.search(speeds + rf" +[\d.]+ tokens/forward +identical to ar {same}\n", r.stdout)
    assert re.search(r"llama\.cpp +[\d.]+ tok/s +[\d.]+x ar +1\.00x llama\.cpp", r.stdout)
    assert "On this machine " in r.stdout  # and which of the two is faster, plainly


@pytest.mark.parametrize(
    "rate, line",
    [
        (
            {"ar": 40.0, "verify": 50.0, "llama.cpp": 40.0},
            "On this machine verify ran 1.25x llama.cpp's plain greedy decoding.",
        ),
        (
            {"ar": 16.0, "verify": 19.0, "llama.cpp": 25.0},
            "On this machine llama.cpp's plain greedy decoding ran faster than verify (1.32x): "
            "for m here, llama.cpp alone is the faster choice.",
        ),
        (
            {"ar": 30.0, "llama.cpp": 20.0},
            "On this machine ar ran 1.50x llama.cpp's plain greedy decoding.",
        ),
    ],
)
def test_the_demo_says_plainly_whether_llama_cpp_alone_is_faster(rate, line):
    from clp.cli import llama_cpp_verdict

    assert llama_cpp_verdict(rate, "m") == line


def test_missing_package_from_a_real_process(tmp_path):
    """A bundled backbone whose packages are absent: no traceback, the pip line, exit 2."""
    code = (
        "import dataclasses, sys; from clp import backbones, cli;"
        "s = dataclasses.replace(backbones.BUNDLED['smollm2-135m'], name='gone',"
        " parts=(('gone-pkg', '1.0', 'g/x.gguf'),)); backbones.BUNDLED['gone'] = s;"
        "sys.argv = ['clp', 'generate', '-m', 'gone', 'hi']; cli.main()"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"CLP_HOME": str(tmp_path), "PATH": ""},
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: backbone 'gone' needs packages that are not installed (gone-pkg); "
        "run: pip install --no-deps gone-pkg==1.0"
    ]


def test_models_lists_the_bundled_backbones():
    r = cli("models")
    assert r.exit_code == 0
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert name in r.stdout


def test_train_predictor_extends_the_calib_cache(tiny_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"question {i}: " + "xyz"[i % 3] * (i % 7)}) for i in range(400)]
    data.write_text("\n".join(lines))
    heads = str(tmp_path / "heads")
    r = cli(
        "train", "heads", "-m", tiny_dir, "--data", str(data), "--cache", str(tmp_path / "cache"),
        "--train-docs", "8", "--heldout-docs", "3", "--calib-docs", "3", "--max-new-tokens", "6",
        "--epochs", "1", "--draft-vocab", "0", "--feature-loss", "0", "--out", heads,
    )  # fmt: skip
    assert r.exit_code == 0, r.output

    def rows_trained_on(*extra):
        r = cli("train", "predictor", "--heads", heads, "--kind", "clp", *extra)
        assert r.exit_code == 0, r.output
        return int(re.search(r"trained on ([\d,]+) rows", r.output)[1].replace(",", ""))

    before = rows_trained_on()
    extended = rows_trained_on("--calib-docs", "12")  # shard 0 held 3: rebuilt, not kept
    config = json.loads(Path(heads, "config.json").read_text())
    calib = Path(config["training"]["data"]["caches"]["calib"])
    assert json.loads((calib / "meta.json").read_text())["documents"] == 12
    assert extended > before
