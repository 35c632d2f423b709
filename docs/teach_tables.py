#!/usr/bin/env python3
"""Print the end-of-epoch tables of docs/teach_sweep.md from a teach results table.

    python3 docs/teach_tables.py [artifact/expected/teach/results.csv]

For each objective: one row per beta (largest first), one column per size, each cell
`sqrt(KL) / win rate [95%] / mean length` at the last checkpoint; above them the SFT policies'
win rates (checkpoint 0). Standard library only.
"""
import csv
import math
import sys

NAMES = {"dpo": "DPO", "ipo": "IPO", "slic": "SLiC", "rdpo": "R-DPO"}
SIZES = ["small", "medium", "large"]


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "artifact/expected/teach/results.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"teach_tables: {path} has no rows", file=sys.stderr)
        return 1
    for r in rows:
        for k in ("beta", "checkpoint", "kl", "win_rate", "win_rate_lo", "win_rate_hi", "mean_length"):
            r[k] = float(r[k])
    sizes = [s for s in SIZES if any(r["size"] == s for r in rows)]
    sft = {r["size"]: r for r in rows if r["objective"] == "sft"}
    print(
        "SFT win rate (mean length): "
        + ", ".join(f"{s} {sft[s]['win_rate']:.3f} ({sft[s]['mean_length']:.2f})" for s in sizes if s in sft)
    )
    for obj in [o for o in NAMES if any(r["objective"] == o for r in rows)]:
        mine = [r for r in rows if r["objective"] == obj]
        last = max(r["checkpoint"] for r in mine)
        cols = [s for s in sizes if any(r["size"] == s for r in mine)]
        print(f"\n**{NAMES[obj]}**, end of epoch: sqrt(KL) / win rate [95%] / mean length\n")
        print("| beta | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for beta in sorted({r["beta"] for r in mine}, reverse=True):
            cells = []
            for s in cols:
                hit = [r for r in mine if r["size"] == s and r["beta"] == beta and r["checkpoint"] == last]
                if not hit:
                    cells.append("-")
                    continue
                r = hit[0]
                cells.append(
                    f"{math.sqrt(max(r['kl'], 0.0)):.2f} / {r['win_rate']:.3f} "
                    f"[{r['win_rate_lo']:.3f}, {r['win_rate_hi']:.3f}] / {r['mean_length']:.2f}"
                )
            print(f"| {beta:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
