"""Training the accept-length predictors (clp, clp+) and the gate on data the heads never saw.

Label L* at row n = length of the longest prefix of the heads' chained proposals (exactly as
decoding runs them) that equals the backbone's greedy continuation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clp.features import FeatureCache, fingerprint
from clp.heads import MTPHeads
from clp.predictor import (
    Gate,
    PredictorConfig,
    accept_length,
    build,
    confidence_features,
    fit_standardisation,
    save_predictor,
    train_classifier,
)
from clp.training import Rows

TAUS = (0.5, 0.7, 0.8, 0.9, 0.95)


@torch.no_grad()
def label_rows(
    heads: MTPHeads,
    backbone,
    data: dict[str, torch.Tensor],
    batch_size: int = 256,
    max_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per row: h_n, confidence features, each head's state, proposals and the label L*."""
    rows = Rows(data, heads.config)
    index = rows.index if max_rows is None else rows.index[:max_rows]
    lm_head = backbone.model.get_output_embeddings()
    k = heads.config.k
    out: dict[str, list[torch.Tensor]] = {"hidden": [], "feats": [], "states": [], "right": []}
    for b in range(0, len(index), batch_size):
        hidden, tokens, targets = rows.batch(index[b : b + batch_size])
        backbone_logits = lm_head(hidden.to(lm_head.weight.dtype)).float()
        ids, head_logits, states = heads.chain(hidden.to(heads.lm_head.dtype), tokens[:, 0])
        head_logits = [lg.float() for lg in head_logits]
        states = [st.float() for st in states]
        out["hidden"].append(hidden.float())
        out["feats"].append(confidence_features(backbone_logits, head_logits))
        out["states"].append(torch.stack(states, 1))
        out["right"].append(ids == targets)
    res = {key: torch.cat(v) for key, v in out.items()}
    right = res["right"].long()
    res["L"] = right.cumprod(1).sum(1)  # longest all-correct prefix
    res["k"] = torch.tensor(k)
    return res


def _inputs(kind: str, labelled: dict[str, torch.Tensor]) -> torch.Tensor:
    if kind == "clp":
        return labelled["hidden"]
    return torch.cat([labelled["hidden"], labelled["feats"]], dim=-1)


def _gate_pairs(labelled):
    """One example per (row, position j): [h_n ; head j's state] -> accept iff L* >= j."""
    n, k, d = labelled["states"].shape
    hidden = labelled["hidden"][:, None].expand(n, k, d).reshape(-1, d)
    states = labelled["states"].reshape(-1, d)
    labels = (labelled["L"][:, None] > torch.arange(k)[None]).reshape(-1).long()
    return hidden, states, labels


def train_predictor(
    kind: str, heads: MTPHeads, train: dict, epochs: int = 30, balanced: bool = False
) -> torch.nn.Module:
    k, d = heads.config.k, heads.config.hidden_size
    config = PredictorConfig(
        kind=kind,
        k=k,
        hidden_size=d,
        extra_features=0 if kind != "clp+" else 2 * (1 + k),
        gate_hidden=64 * max(4, round(1e6 / (2 * d) / 64)),  # about 1M parameters
        fingerprint=heads.config.fingerprint,
    )
    model = build(config)
    if kind == "gate":
        hidden, states, labels = _gate_pairs(train)
        fit_standardisation(model, torch.cat([hidden, states], -1))
        train_classifier(model, (hidden, states), labels, epochs=max(3, epochs // 6), lr=1e-3)
        return model
    x = _inputs(kind, train)
    fit_standardisation(model, x)
    weights = None
    if balanced:
        counts = torch.bincount(train["L"], minlength=k + 1).float().clamp(min=1)
        weights = (counts.sum() / counts / (k + 1)).sqrt()
    train_classifier(model, (x,), train["L"], epochs=epochs, class_weights=weights)
    return model


@torch.no_grad()
def accepted_lengths(model: torch.nn.Module, labelled: dict, tau: float) -> torch.Tensor:
    """How many proposals the policy would accept at each row (tau = gate threshold for gates)."""
    if isinstance(model, Gate):
        hidden, states, _ = _gate_pairs(labelled)
        n, k = labelled["states"].shape[:2]
        yes = (torch.sigmoid(model(hidden, states)) >= tau).reshape(n, k).long()
        return yes.cumprod(1).sum(1)
    probs = torch.softmax(model(_inputs(model.config.kind, labelled)), -1)
    return accept_length(probs, tau)


def report(model: torch.nn.Module, labelled: dict, train_labels: torch.Tensor) -> dict:
    """Accuracy against always-majority, confusion matrix, and per tau the mean accepted
    extra tokens and the share of accepted tokens that differ from the backbone's greedy."""
    k = int(labelled["k"])
    L = labelled["L"]
    right = labelled["right"]
    out = {"rows": int(len(L)), "label_distribution": torch.bincount(L, minlength=k + 1).tolist()}
    if not isinstance(model, Gate):
        with torch.no_grad():
            pred = model(_inputs(model.config.kind, labelled)).argmax(-1)
        majority = int(torch.bincount(train_labels, minlength=k + 1).argmax())
        out["accuracy"] = round(float((pred == L).float().mean()), 4)
        out["majority_accuracy"] = round(float((L == majority).float().mean()), 4)
        confusion = torch.zeros(k + 1, k + 1, dtype=torch.long)
        confusion.index_put_((L, pred), torch.ones_like(L), accumulate=True)
        out["confusion (rows: true L*, cols: predicted)"] = confusion.tolist()
        out["parameters"] = model.parameter_count()
    else:
        out["parameters"] = model.parameter_count()
    taus = (0.5,) if isinstance(model, Gate) else TAUS
    out["by_tau"] = {}
    for tau in taus:
        n = accepted_lengths(model, labelled, tau)
        accepted = int(n.sum())
        wrong = sum(int((~right[:, j])[n > j].sum()) for j in range(k))
        out["by_tau"][str(tau)] = {
            "mean_accepted": round(accepted / max(1, len(n)), 4),
            "wrong_share": round(wrong / max(1, accepted), 4),
        }
    return out


def train_and_save(
    kind: str,
    heads: MTPHeads,
    backbone,
    heads_dir: str | Path,
    calib: FeatureCache,
    heldout: FeatureCache,
    log=print,
    balanced: bool = False,
) -> dict:
    train = label_rows(heads, backbone, calib.load())
    test = label_rows(heads, backbone, heldout.load())
    model = train_predictor(kind, heads, train, balanced=balanced)
    result = report(model, test, train["L"])
    result["train_rows"] = int(len(train["L"]))
    model.config.fingerprint = fingerprint(backbone)
    model.config.training = {"calib_cache": str(calib.root), "heldout": result}
    save_predictor(model, heads_dir)
    return result
