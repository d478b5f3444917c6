"""How far `verify` should send the heads' chain: the cut by chain probability, offline.

A draft costs a row of the next forward whether or not it is accepted. `verify --min-prob P`
sends head j's draft only while the heads' chain probability up to it (the product of each
head's probability of its own token) is >= P. This replays that cut on the feature caches
the heads were trained beside (their `config.json` names them): tokens per forward from the
backbone's greedy continuation, and the cost of the forward from a measured curve of one
forward over 1..k+1 rows relative to one (`benchmarks/forward_cost.py`). P is chosen on the
calib split and checked on the held-out one.

    python benchmarks/draft_cut.py --heads artifacts/qwen2.5-coder-1.5b --costs 1,1.1,1.2
    python benchmarks/draft_cut.py --heads artifacts/qwen2.5-coder-0.5b --costs 1,1.135,1.247
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clp.backbones import load_backbone
from clp.features import FeatureCache
from clp.heads import load_heads
from clp.training import Rows

CUTS = (0.0, 0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3)


@torch.inference_mode()
def chain_outcomes(heads, cache: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the chain probability of each draft [N, k], and how many drafts are right in
    a row from the first (what verification would accept) [N]."""
    rows = Rows(FeatureCache(cache).load(), heads.config)
    probs, accepted = [], []
    for b in range(0, len(rows.index), 512):
        hidden, tokens, targets = rows.batch(rows.index[b : b + 512])
        ids, logits, _ = heads.chain(hidden.float(), tokens[:, 0])
        logp = torch.stack([torch.log_softmax(lg.float(), -1).amax(-1) for lg in logits], 1)
        probs.append(logp.cumsum(1).exp())
        accepted.append((ids == targets).long().cumprod(1).sum(1))
    return torch.cat(probs), torch.cat(accepted)


def replay(probs, accepted, costs: list[float], cut: float) -> tuple[float, float]:
    """Tokens per forward and mean forward cost when drafts below ``cut`` are not sent."""
    sent = (probs >= cut).sum(1)
    tokens = 1 + torch.minimum(sent, accepted).float()
    cost = torch.tensor(costs)[sent]
    return float(tokens.mean()), float(cost.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", required=True)
    ap.add_argument("--costs", required=True, help="forward cost of 1..k+1 rows over one row")
    args = ap.parse_args()
    config = json.loads((Path(args.heads) / "config.json").read_text())
    costs = [float(x) for x in args.costs.split(",")]
    if len(costs) != config["k"] + 1:
        raise SystemExit(f"--costs needs {config['k'] + 1} numbers (1..k+1 rows)")
    heads = load_heads(args.heads, load_backbone(config["fingerprint"]["name"]), torch.float32)
    caches = config["training"]["data"]["caches"]
    splits = {s: chain_outcomes(heads, caches[s]) for s in ("calib", "heldout")}
    print(
        f"{args.heads}: rows calib {len(splits['calib'][1])}, held-out {len(splits['heldout'][1])}"
    )
    print("| min-prob | calib tokens/cost | held-out tokens/forward | cost | tokens/cost | vs 0 |")
    print("|---|---|---|---|---|---|")
    base = None
    for cut in CUTS:
        cal = replay(*splits["calib"], costs, cut)
        tok, cost = replay(*splits["heldout"], costs, cut)
        base = base or tok / cost
        print(
            f"| {cut:g} | {cal[0] / cal[1]:.4f} | {tok:.3f} | {cost:.3f} | {tok / cost:.4f} "
            f"| {tok / cost / base:.3f}x |"
        )


if __name__ == "__main__":
    main()
