"""How many head proposals to accept: the CLP predictor (the paper), ``clp+`` and the gate.

- ``clp``: ONE linear layer on h_n -> k+1 logits over L in {0..k}. d(k+1)+(k+1) parameters.
- ``clp+``: the same single linear layer over [h_n ; confidence features] — top probability
  and top-1/top-2 margin of the backbone's next-token distribution and of each head's
  proposal. A few parameters more; they predict L* far better than h_n alone.
- ``gate`` (prior work): a per-position binary accept gate, an MLP of about 1M parameters
  over [h_n ; head j's output state]; drafts are accepted while it says yes.

Inference rule for clp / clp+: accept the largest l with P(L* >= l) >= tau (tau > 1: none).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from clp.errors import ClpError

KINDS = ("clp", "clp+", "gate")


def confidence_features(backbone_logits: torch.Tensor, head_logits: list[torch.Tensor]):
    """[top prob, top1 - top2 margin] of the backbone and of each head: [B, 2 (1 + k)]."""
    feats = []
    for logits in [backbone_logits, *head_logits]:
        top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
        feats += [top2[:, 0], top2[:, 0] - top2[:, 1]]
    return torch.stack(feats, dim=-1)


def accept_length(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """Largest l with P(L* >= l) >= tau, per row of class probabilities [B, k+1]."""
    survival = probs.flip(-1).cumsum(-1).flip(-1)  # survival[l] = P(L* >= l)
    ok = survival >= tau - 1e-6
    ok[:, 0] = tau <= 1.0
    positions = torch.arange(probs.shape[-1]).expand_as(ok)
    return torch.where(ok, positions, torch.zeros_like(positions)).max(-1).values


@dataclass
class PredictorConfig:
    kind: str = "clp"
    k: int = 2
    hidden_size: int = 0
    extra_features: int = 0  # clp+: 2 (1 + k) confidence features
    gate_hidden: int = 1024
    fingerprint: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ClpError(f"unknown predictor kind '{self.kind}'; use one of {', '.join(KINDS)}")


class LengthPredictor(nn.Module):
    """clp and clp+: one nn.Linear, nothing more."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.linear = nn.Linear(config.hidden_size + config.extra_features, config.k + 1)
        # standardisation of the inputs, fitted on the training labels' data (not trained)
        self.register_buffer("mean", torch.zeros(config.hidden_size + config.extra_features))
        self.register_buffer("scale", torch.ones(config.hidden_size + config.extra_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x.float() - self.mean) / self.scale)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.linear.parameters())


class Gate(nn.Module):
    """Prior work's accept gate: MLP over [h_n ; head state] -> P(accept this position)."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        config.validate()
        self.config = config
        d, m = config.hidden_size, config.gate_hidden
        self.net = nn.Sequential(
            nn.Linear(2 * d, m), nn.SiLU(), nn.Linear(m, m // 4), nn.SiLU(), nn.Linear(m // 4, 1)
        )
        self.register_buffer("mean", torch.zeros(2 * d))
        self.register_buffer("scale", torch.ones(2 * d))

    def forward(self, hidden: torch.Tensor, head_state: torch.Tensor) -> torch.Tensor:
        x = torch.cat([hidden.float(), head_state.float()], dim=-1)
        return self.net((x - self.mean) / self.scale)[..., 0]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def build(config: PredictorConfig) -> nn.Module:
    return Gate(config) if config.kind == "gate" else LengthPredictor(config)


def save_predictor(model: nn.Module, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = model.config.kind.replace("+", "plus")
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / f"{name}.safetensors.tmp"))
    os.replace(out / f"{name}.safetensors.tmp", out / f"{name}.safetensors")
    (out / f"{name}.json.tmp").write_text(json.dumps(asdict(model.config), indent=1))
    os.replace(out / f"{name}.json.tmp", out / f"{name}.json")


def load_predictor(folder: str | Path, kind: str, heads_config, fingerprint: dict) -> nn.Module:
    """Load a predictor saved beside heads; it must match their backbone and horizon k."""
    from clp.heads import check_fingerprint

    folder = Path(folder)
    name = kind.replace("+", "plus")
    try:
        config = PredictorConfig(**json.loads((folder / f"{name}.json").read_text()))
    except FileNotFoundError as exc:
        raise ClpError(
            f"no {kind} predictor in {folder}; train one with `clp train "
            f"{'gate' if kind == 'gate' else 'predictor'} --heads {folder}`"
        ) from exc
    except (json.JSONDecodeError, TypeError) as exc:
        raise ClpError(f"corrupted {kind} predictor config in {folder}: {exc}") from exc
    check_fingerprint(config.fingerprint, fingerprint, f"the {kind} predictor in {folder}")
    if config.k != heads_config.k:
        raise ClpError(
            f"the {kind} predictor in {folder} was trained for k={config.k}, "
            f"but the heads have k={heads_config.k}"
        )
    model = build(config)
    try:
        state = load_file(str(folder / f"{name}.safetensors"))
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as exc:
        raise ClpError(f"corrupted {kind} predictor weights in {folder}: {exc}") from exc
    return model.eval().requires_grad_(False)


def fit_standardisation(model: nn.Module, x: torch.Tensor) -> None:
    model.mean.copy_(x.float().mean(0))
    model.scale.copy_(x.float().std(0).clamp(min=1e-4))


def train_classifier(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 512,
    class_weights: torch.Tensor | None = None,
    seed: int = 0,
    validation_share: float = 0.15,
) -> list[float]:
    """AdamW on cross-entropy (BCE for the gate), keeping the epoch with the lowest loss on a
    held-back share of the rows: a linear layer on a 1k-dimensional input overfits ~10k rows."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    perm = torch.randperm(len(labels), generator=gen)
    n_val = int(len(labels) * validation_share)
    val, train = perm[:n_val], perm[n_val:]

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        out = model(*(x[idx] for x in inputs))
        if isinstance(model, Gate):
            return F.binary_cross_entropy_with_logits(out, labels[idx].float())
        return F.cross_entropy(out, labels[idx], weight=class_weights)

    best, best_state, val_losses = float("inf"), None, []
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for b in range(0, len(order), batch_size):
            loss = loss_of(order[b : b + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            current = loss_of(val).item() if n_val else 0.0
        val_losses.append(current)
        if current < best:
            best, best_state = current, {k: v.clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return val_losses
