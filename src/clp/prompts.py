"""Turning a user's prompt into token ids: the chat template for instruct backbones."""

from __future__ import annotations

from clp.errors import ClpError


def encode_prompt(tokenizer, prompt: str, raw: bool = False) -> list[int]:
    """Token ids for ``prompt``; wrapped as one user turn unless ``raw`` or no chat template."""
    if not prompt or not prompt.strip():
        raise ClpError("the prompt is empty")
    if raw or not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(prompt)["input_ids"])
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
