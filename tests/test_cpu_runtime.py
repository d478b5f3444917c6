"""The cpu runtime: GGUF blocks as int4 groups, exactness in every weight format, clear errors."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from test_decoding import PROMPTS, NoisyOracle

from clp.cpu.runtime import CpuRuntime, decoder_config
from clp.cpu.weights import FORMATS, Int4Linear, gguf_int4_groups, set_prefill_dtype
from clp.decoding import generate
from clp.errors import ClpError


def fake_tensor(kind: T, rows: int, cols: int, seed: int = 0):
    """A GGUF reader tensor of ``kind``: what ``GGUFReader.tensors`` holds."""
    rng = np.random.default_rng(seed)
    if kind == T.Q4_K:  # no quantizer in the gguf package: random blocks, sane f16 scales
        blocks = rng.integers(0, 256, (rows * cols // 256, 144), dtype=np.uint8)
        scales = rng.uniform(1e-3, 1e-2, (len(blocks), 2)).astype(np.float16)
        blocks[:, :4] = scales.view(np.uint8)
        data = blocks.reshape(rows, -1)
    else:
        data = quantize(rng.normal(0, 0.05, (rows, cols)).astype(np.float32), kind)
    return types.SimpleNamespace(tensor_type=kind, shape=np.array([cols, rows]), data=data)


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_gguf_blocks_map_to_int4_groups_that_dequantize_exactly(kind):
    t = fake_tensor(kind, 32, 512)
    groups = gguf_int4_groups(t)
    reference = torch.from_numpy(dequantize(t.data, kind).reshape(32, 512))
    assert torch.equal(groups.dense(), reference)  # the very values, not close ones
    # on the kernel only each group's scale and zero are rounded to bf16
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    expected = x.float() @ reference.t()
    error = Int4Linear(groups)(x).float() - expected
    assert error.norm() < 0.01 * expected.norm()


def test_other_gguf_types_are_not_taken_for_int4():
    assert gguf_int4_groups(fake_tensor(T.Q8_0, 32, 64)) is None


def wide_backbone(seed: int = 0):
    from conftest import make_tiny_backbone

    return make_tiny_backbone(
        seed, dtype=torch.bfloat16, hidden_size=256, intermediate_size=512, num_attention_heads=8
    )


@pytest.fixture(scope="module")
def runtimes():
    backbone = wide_backbone()
    return backbone, {f: CpuRuntime(backbone, f, context=256) for f in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_token_gets_the_same_bits_in_a_one_and_a_several_token_forward(runtimes, fmt):
    runtime = runtimes[1][fmt]
    prompt, new = list(range(3, 63)), [5, 17, 33, 8, 41]
    runtime.reset()
    runtime.feed(prompt)
    together = runtime.feed(new).clone(), runtime.logits(len(new))
    runtime.drop_last(len(new))  # the static cache: dropping is moving the length back
    alone = [(runtime.feed([t]).clone(), runtime.logits(1)) for t in new]
    assert torch.equal(together[0], torch.cat([h for h, _ in alone]))
    assert torch.equal(together[1], torch.cat([lg for _, lg in alone]))


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_the_prompts_copy_in_fp32_holds_the_same_weights_and_reads_a_prompt_alike(runtimes, fmt):
    """Where bf16 matmuls are emulated the prompt's dense copy is held in fp32: the same
    numbers, so a prompt reads as on the bf16 copy up to the order of the sums."""
    runtime = runtimes[1][fmt]
    decoder = runtime.decoder
    copies = [m for m in decoder.modules() if getattr(m, "prefill_weight", None) is not None]
    default = copies[0].prefill_weight.dtype
    prompt = list(range(3, 40))  # more rows than a decode step: the dense copy
    read, weights = {}, {}
    try:
        for dtype in (torch.bfloat16, torch.float32):
            set_prefill_dtype(decoder, dtype)
            weights[dtype] = [m.prefill_weight.clone() for m in copies]
            runtime.reset()
            read[dtype] = runtime.feed(prompt).float()
    finally:
        set_prefill_dtype(decoder, default)
    assert all(w.dtype == torch.float32 for w in weights[torch.float32])
    pairs = zip(weights[torch.bfloat16], weights[torch.float32], strict=True)
    assert all(torch.equal(a.float(), b) for a, b in pairs)
    torch.testing.assert_close(read[torch.float32], read[torch.bfloat16], rtol=0.05, atol=0.05)
    assert runtime.length == len(prompt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_equals_greedy_in_every_weight_format(runtimes, fmt):
    backbone, runtime = runtimes[0], runtimes[1][fmt]
    for prompt in PROMPTS:
        ids = backbone.tokenizer(prompt)["input_ids"]
        ref = generate(runtime, backbone.tokenizer, ids, max_new_tokens=30, eos_ids=set())
        oracle = NoisyOracle(ids + ref.token_ids + [0] * 8, k=4, error_rate=0.3)
        out = generate(runtime, backbone.tokenizer, ids, oracle, max_new_tokens=30, eos_ids=set())
        assert out.token_ids == ref.token_ids
        assert out.stats.forward_passes < ref.stats.forward_passes


def test_bf16_format_computes_what_transformers_computes(runtimes):
    from clp.runtime import TransformersRuntime

    backbone, runtime = runtimes[0], runtimes[1]["bf16"]
    reference = TransformersRuntime(backbone, patched=False)
    ids = list(range(3, 60))
    reference.reset(), runtime.reset()
    expected, got = reference.feed(ids).float(), runtime.feed(ids).float()
    assert (expected - got).abs().max() < 0.05 * expected.abs().max()
    assert torch.equal(reference.logits(1).argmax(-1), runtime.logits(1).argmax(-1))


def test_a_sequence_longer_than_the_static_cache_fails_clearly():
    runtime = CpuRuntime(wide_backbone(), "q4", context=16)
    runtime.reset()
    runtime.feed(list(range(3, 15)))
    with pytest.raises(ClpError, match="static cache holds 16"):
        runtime.feed(list(range(3, 8)))


def test_unsupported_models_and_formats_fail_clearly(tiny):
    with pytest.raises(ClpError, match="unknown weight format 'q3'"):
        CpuRuntime(tiny, "q3")
    gpt2 = types.SimpleNamespace(model_type="gpt2")
    with pytest.raises(ClpError, match="runs llama and qwen2 decoders.*'gpt2'"):
        decoder_config(gpt2, None)


def test_cli_reports_a_bad_weight_format_in_one_line(tmp_path):
    from click.testing import CliRunner

    from clp.cli import main

    res = CliRunner().invoke(main, ["generate", "hi", "--weights", "q3"])
    assert res.exit_code == 2 and "q3" in res.output and "Traceback" not in res.output


@pytest.mark.integration
@pytest.mark.parametrize("fmt", FORMATS)
def test_smollm2_gguf_on_the_cpu_runtime(smollm2_fp32, fmt):
    """The packaged Q4_1 GGUF read block by block (llama's q/k rows put back in
    transformers' order): logits close to transformers', verify == ar with the committed heads."""
    from test_integration import VERIFY_PROMPTS

    from clp.api import Model
    from clp.runtime import TransformersRuntime

    model = Model(smollm2_fp32, runtime="cpu", weights=fmt)
    reference = TransformersRuntime(smollm2_fp32)
    ids = model.tokenizer("The capital of France is Paris. The capital of Italy is")["input_ids"]
    reference.reset(), model.runtime.reset()
    reference.feed(ids), model.runtime.feed(ids)
    expected, got = reference.logits(1)[0], model.runtime.logits(1)[0]
    assert torch.corrcoef(torch.stack([expected, got]))[0, 1] > 0.98
    assert expected.topk(5).indices[0] in got.topk(5).indices
    for prompt in VERIFY_PROMPTS[:8]:
        ar = model.generate(prompt, max_new_tokens=40)
        ver = model.generate(prompt, mode="verify", max_new_tokens=40)
        assert ver.token_ids == ar.token_ids, prompt


def test_the_compiled_decoder_keeps_verify_exact():
    """torch.compile (CLP_COMPILE=1) fuses the ops between the kernels; a token must still get
    the same bits in a 1-token and a several-token forward, and verify still equal greedy."""
    from torch._dynamo.utils import counters

    backbone = wide_backbone(1)
    runtime = CpuRuntime(backbone, "q4", context=256, compile=True)
    ids = backbone.tokenizer(PROMPTS[0])["input_ids"]
    torch._dynamo.reset()
    counters.clear()
    runtime.reset()
    runtime.feed(ids)
    for rows in (1, 2, 3, 4, 1):
        runtime.feed(list(range(5, 5 + rows)))
    # one graph per layer part (before and after attention) for every row count and layer:
    # graphs specialised per row count rounded a token apart alone and among drafts
    assert counters["stats"]["unique_graphs"] == 2
    ref = generate(runtime, backbone.tokenizer, ids, max_new_tokens=30, eos_ids=set())
    oracle = NoisyOracle(ids + ref.token_ids + [0] * 8, k=3, error_rate=0.3)
    out = generate(runtime, backbone.tokenizer, ids, oracle, max_new_tokens=30, eos_ids=set())
    assert out.token_ids == ref.token_ids
    eager = CpuRuntime(backbone, "q4", context=256, compile=False)
    states = []
    for r in (runtime, eager):  # compiled and eager agree but for rounding
        r.reset()
        r.feed(ids)
        states.append(r.feed(ref.token_ids[:3]).float())
    assert (states[0] - states[1]).abs().max() < 0.05 * states[1].abs().max()


def test_heads_draft_in_bf16_on_the_quantized_kernels_whatever_the_backbones_dtype():
    """An fp32 backbone (a CPU without native bf16) still gets bf16 heads on the int8 / int4
    kernels, which are several times faster there than with fp32 activations; their logits
    stay those of the dense fp32 heads but for rounding."""
    import copy

    from conftest import make_tiny_backbone

    from clp.cpu.weights import Int8Linear
    from clp.heads import HeadConfig, MTPHeads, frozen_weights

    backbone = make_tiny_backbone(hidden_size=256, intermediate_size=512, num_attention_heads=8)
    cfg = HeadConfig(arch="chain", k=2, hidden_size=256, vocab_size=backbone.vocab_size)
    heads = MTPHeads(cfg, *frozen_weights(backbone, torch.float32)).eval()
    for p in heads.steps.parameters():  # random, not zero-initialised
        torch.nn.init.normal_(p, std=0.05)
    dense = copy.deepcopy(heads)
    CpuRuntime(backbone, "q4", context=64, compile=False).prepare_heads(heads)
    assert heads.lm_head.dtype == torch.bfloat16 and isinstance(heads.draft_head, Int4Linear)
    linears = [m for m in heads.steps.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert linears and all(isinstance(m, Int8Linear) for m in linears)
    torch.manual_seed(1)
    for hidden in torch.randn(8, 256):
        (_, want, _), (_, got, _) = dense.run(hidden, 5), heads.run(hidden, 5)
        for a, b in zip(want, got, strict=True):
            assert b.dtype == torch.bfloat16
            assert torch.corrcoef(torch.stack([a.float(), b.float()]))[0, 1] > 0.98
