"""The high-level Python API: ``clp.load(name).generate(prompt, mode=...)``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from clp import policies
from clp.backbones import DEFAULT_MODEL, Backbone, clp_home, load_backbone
from clp.cpu.weights import FORMATS
from clp.decoding import Policy, Result, SamplingConfig, generate
from clp.errors import ClpError
from clp.prompts import encode_prompt
from clp.runtime import TransformersRuntime

MODES = ("ar", "mtp", "gate", "clp", "clp+", "verify", "competing", "lookup")
# clp / clp+ accept no drafts unless given a tau <= 1 (tau > 1: the output of ar). On HumanEval
# no tau that accepts drafts kept task accuracy within 2 points of ar's and ran faster
# (docs/tasks.md); the paper's operating point is 0.8.
DEFAULT_TAU = 2.0
DEFAULT_LOOKUP = 4  # verify: drafts copied after an earlier occurrence of the last bigram
# verify: a head's draft is sent only while the heads give the chain up to it at least this
# probability. Replayed on the calib split of both qwen backbones with their cpu-runtime
# forward costs, 0.05-0.15 give the most tokens per unit of cost (benchmarks/draft_cut.py).
DEFAULT_MIN_PROB = 0.1
RUNTIMES = ("auto", "cpu", "transformers", "llama.cpp")
# verify's tree drafts: with the backbone's token, one forward of at most 16 rows (the cpu
# runtime's decode kernels; wider forwards take its prefill kernels, other bits)
MAX_TREE_NODES = 15
WEIGHTS = FORMATS  # the cpu runtime's weight formats


def resolve_runtime(backbone: Backbone, runtime: str) -> str:
    """``auto``: the cpu runtime wherever it runs the backbone's family (llama, qwen2) on this
    CPU, the fastest here; transformers otherwise."""
    if runtime != "auto":
        return runtime
    from clp.cpu.runtime import FAMILIES, cpu_runs_bf16_kernels

    family = getattr(backbone.config, "model_type", None)
    return "cpu" if family in FAMILIES and cpu_runs_bf16_kernels() else "transformers"


def make_runtime(backbone: Backbone, runtime: str, weights: str = "q4"):
    """The runtime under the decode loop: the cpu runtime (a static-cache decoder on torch's
    int4 / int8 kernels; ``weights`` q4, q8 or bf16), transformers' own model, or llama.cpp on
    a bf16 GGUF of the same weights (bundled backbones only)."""
    if runtime == "cpu":
        from clp.cpu.runtime import CpuRuntime

        return CpuRuntime(backbone, weights)
    if runtime == "transformers":
        return TransformersRuntime(backbone)
    if runtime == "llama.cpp":
        from clp.llama_runtime import LlamaCppRuntime, ensure_gguf

        kind = "f32" if backbone.dtype == torch.float32 else "bf16"
        return LlamaCppRuntime(backbone, ensure_gguf(backbone.name, kind))
    raise ClpError(f"unknown runtime '{runtime}'; choose from {', '.join(RUNTIMES)}")


def check_tree_nodes(tree_nodes: int, mode: str, runtime: str) -> None:
    """Trees are for verify, on a runtime that runs a tree mask, within one forward's rows."""
    if not tree_nodes:
        return
    if mode != "verify" or not 0 < tree_nodes <= MAX_TREE_NODES:
        raise ClpError(
            f"tree_nodes is a number of draft nodes, 0 to {MAX_TREE_NODES}, for mode verify; "
            f"got {tree_nodes} for mode {mode}"
        )
    if runtime == "llama.cpp":
        from clp.llama_runtime import NO_TREES

        raise ClpError(NO_TREES)


def default_heads_dir(name: str) -> Path | None:
    """Committed artifacts for a bundled backbone: the repo's artifacts/ or $CLP_HOME's."""
    if Path(name).is_absolute():  # a local checkpoint folder: its config.json is no heads'
        return None
    for root in (Path(__file__).resolve().parents[2] / "artifacts", clp_home() / "artifacts"):
        if (root / name / "config.json").is_file():
            return root / name
    return None


class Model:
    """A backbone ready to decode, with the heads and predictors its modes need (loaded on
    first use, from ``heads_dir`` or the committed artifacts of a bundled backbone)."""

    def __init__(
        self,
        backbone: Backbone,
        heads_dir: str | os.PathLike | None = None,
        runtime: str = "auto",
        weights: str = "q4",
    ):
        self.backbone = backbone
        self.runtime_name = resolve_runtime(backbone, runtime)
        self.runtime = make_runtime(backbone, self.runtime_name, weights)
        self.weights = weights if self.runtime_name == "cpu" else None
        self.heads_dir = Path(heads_dir) if heads_dir else default_heads_dir(backbone.name)
        self._loaded: dict = {}

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def default_mode(self) -> str:
        """The mode of a call that names none: ``verify`` (plain greedy decoding's output,
        faster) where trained heads are found and the runtime gives a token the same bits
        whatever the forward's width (cpu, transformers), else ``ar``. On llama.cpp ``verify``
        is exact only up to near-ties and gains little (docs/design.md#exactness)."""
        exact = self.runtime_name != "llama.cpp"
        return "verify" if self.heads_dir is not None and exact else "ar"

    def _dir(self, sub: str = "") -> Path:
        if self.heads_dir is None:
            raise ClpError(
                f"no trained heads for '{self.backbone.name}'; pass --heads DIR "
                "(train them with `clp train heads`)"
            )
        return self.heads_dir / sub if sub else self.heads_dir

    def heads(self, sub: str = ""):
        """The heads in ``heads_dir`` (or its ``sub`` folder), loaded once."""
        from clp.heads import load_heads

        if ("heads", sub) not in self._loaded:
            heads = load_heads(self._dir(sub), self.backbone)
            if hasattr(self.runtime, "prepare_heads"):  # the runtime's own kernels for them
                self.runtime.prepare_heads(heads)
            self._loaded["heads", sub] = heads
        return self._loaded["heads", sub]

    def predictor(self, kind: str):
        """The ``kind`` predictor saved beside the heads, loaded once."""
        from clp.features import fingerprint
        from clp.predictor import load_predictor

        if kind not in self._loaded:
            self._loaded[kind] = load_predictor(
                self._dir(), kind, self.heads().config, fingerprint(self.backbone)
            )
        return self._loaded[kind]

    def policy(
        self,
        mode: str,
        tau: float | None = None,
        k: int | None = None,
        lookup: int | None = None,
        tree_nodes: int = 0,
        tree: str = "dynamic",
        min_prob: float | None = None,
    ) -> Policy:
        """The decoding policy of ``mode``; ``k`` runs only the first k heads (mtp and verify:
        the predictors and the gate are trained for the heads' own k). ``lookup`` (verify
        only, default 4): when the last two tokens occurred before, the drafts are the
        ``lookup`` tokens that followed them, not the heads'; 0: always the heads'.
        ``tree_nodes`` (verify only, 0 to MAX_TREE_NODES): draft a tree of that many nodes,
        the heads' likeliest branches and the lookup span, checked in one forward; ``tree``
        "dynamic" (grown per step from the heads' probabilities) or "static" (one shape
        chosen from the heads' held-out rank accuracy). ``min_prob`` (verify only, default
        DEFAULT_MIN_PROB; 0: always all k): a chain of head drafts ends before the first the
        heads give a chain probability below it."""
        if mode not in MODES:
            raise ClpError(f"unknown mode '{mode}'; available: {', '.join(MODES)}")
        check_tree_nodes(tree_nodes, mode, self.runtime_name)
        if tau is not None and tau < 0:
            raise ClpError(f"tau must be >= 0, got {tau}")
        if lookup is not None and (mode != "verify" or lookup < 0):
            raise ClpError(
                f"lookup is a number >= 0 of drafts for mode verify; got {lookup} for mode {mode}"
            )
        if min_prob is not None and mode != "verify":
            raise ClpError(f"min_prob is a setting of mode verify, not of mode {mode}")
        if mode == "ar":
            return Policy()
        if mode == "lookup":
            return policies.PromptLookup(k or 3)
        if mode == "competing":
            return policies.Competing(self.heads("competing"))
        heads = self.heads()
        if k is not None and k != heads.config.k:
            if mode not in ("mtp", "verify") or (mode == "verify" and tau is not None):
                raise ClpError(
                    f"mode {mode} needs predictors trained for k={k}; only mtp and verify run "
                    f"truncated heads (these have k={heads.config.k})"
                )
            heads = heads.truncated(k)
        if mode == "mtp":
            return policies.AcceptAll(heads)
        if mode == "gate":
            return policies.Gated(heads, self.predictor("gate"))
        if mode == "verify":
            predictor = self.predictor("clp") if tau is not None else None
            if lookup is None:  # a runtime may cap drafts where wider forwards cost more
                lookup = min(DEFAULT_LOOKUP, getattr(self.runtime, "max_drafts", DEFAULT_LOOKUP))
            if min_prob is None:
                min_prob = DEFAULT_MIN_PROB
            return policies.Verified(
                heads, predictor, tau or 0.0, lookup, tree_nodes, tree, min_prob
            )
        cls = policies.PredictedLength if mode == "clp" else policies.PredictedLengthPlus
        return cls(heads, self.predictor(mode), DEFAULT_TAU if tau is None else tau)

    def generate(
        self,
        prompt: str | list[int],
        mode: str | None = None,
        tau: float | None = None,
        k: int | None = None,
        lookup: int | None = None,
        tree_nodes: int = 0,
        tree: str = "dynamic",
        min_prob: float | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        raw: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Result:
        """Decode a text prompt (chat-formatted unless ``raw``) or a list of token ids, in
        ``mode`` (default: ``default_mode``)."""
        mode = mode or self.default_mode
        policy = self.policy(mode, tau, k, lookup, tree_nodes, tree, min_prob)
        ids = prompt if isinstance(prompt, list) else encode_prompt(self.tokenizer, prompt, raw)
        return generate(
            self.runtime,
            self.tokenizer,
            ids,
            policy=policy,
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature, top_k, top_p, seed),
            eos_ids=self.backbone.eos_token_ids,
            stop=stop,
            context_length=self.backbone.context_length,
            on_text=on_text,
        )


def load(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | None = None,
    heads: str | os.PathLike | None = None,
    runtime: str = "auto",
    weights: str = "q4",
) -> Model:
    """A backbone with its heads: ``clp.load("qwen2.5-coder-0.5b").generate(p, mode="verify")``.
    ``runtime`` auto takes the cpu runtime where it runs the backbone (``weights``: its format).
    On the llama.cpp runtime, ``dtype`` auto means bf16: its bf16 kernels are fast on any
    AVX2 CPU."""
    if runtime not in RUNTIMES:
        raise ClpError(f"unknown runtime '{runtime}'; choose from {', '.join(RUNTIMES)}")
    if weights not in WEIGHTS:
        raise ClpError(f"unknown weight format '{weights}'; choose from {', '.join(WEIGHTS)}")
    if runtime == "llama.cpp" and dtype in (None, "auto"):
        dtype = "bf16"
    return Model(load_backbone(name_or_path, dtype), heads, runtime, weights)
