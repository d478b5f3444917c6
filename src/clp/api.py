"""The high-level Python API: ``clp.load(name).generate(prompt, mode=...)``."""

from __future__ import annotations

from collections.abc import Callable

from clp.backbones import DEFAULT_MODEL, Backbone, load_backbone
from clp.decoding import Policy, Result, SamplingConfig, generate
from clp.errors import ClpError
from clp.prompts import encode_prompt
from clp.runtime import TransformersRuntime

MODES = ("ar",)


class Model:
    """A backbone ready to decode, with whatever heads and predictors its modes need."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.runtime = TransformersRuntime(backbone)

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    def policy(self, mode: str) -> Policy:
        if mode == "ar":
            return Policy()
        raise ClpError(f"unknown mode '{mode}'; available: {', '.join(MODES)}")

    def generate(
        self,
        prompt: str | list[int],
        mode: str = "ar",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        raw: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Result:
        """Decode a text prompt (chat-formatted unless ``raw``) or a list of token ids."""
        policy = self.policy(mode)
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


def load(name_or_path: str = DEFAULT_MODEL, dtype: str | None = None) -> Model:
    return Model(load_backbone(name_or_path, dtype))
