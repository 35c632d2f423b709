#!/usr/bin/env python3
"""Print the tables of docs/toy_mdp.md from the toy MDP section's output directory.

    python3 docs/toy_tables.py DIR [SETTING]

DIR holds `toy_mdp_report.json` and `toy_mdp_runs.csv` (`overopt reproduce` writes them to
OUT/toy_mdp; `cargo bench --profile dev --bench toy_mdp -- [CONFIG.toml] --out DIR` too).
Prints the end-of-training table per objective and beta, the DPO seed-by-seed table, the
pooled OOD numbers and the row of the sensitivity table (labelled SETTING, default
"defaults"). Standard library only.
"""
import csv
import json
import os
import statistics
import sys


def f2(x: float) -> str:
    return f"{x:.2f}"


def short(x: float) -> str:
    """0.97 -> .97, 1.00 -> 1.00 (the seed table's style)."""
    s = f"{x:.2f}"
    return s[1:] if s.startswith("0.") else s


def dist(d: dict) -> str:
    return f"{f2(d['median'])} [{f2(d['min'])}, {f2(d['max'])}]"


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = sys.argv[1]
    setting = sys.argv[2] if len(sys.argv) > 2 else "defaults"
    with open(os.path.join(root, "toy_mdp_report.json")) as f:
        rep = json.load(f)
    with open(os.path.join(root, "toy_mdp_runs.csv"), newline="") as f:
        runs = list(csv.DictReader(f))
    for r in runs:
        for k in ("beta", "preferred", "dispreferred", "third_demo", "ood", "peak_ood", "top_ood_prob"):
            r[k] = float(r[k])

    print("| objective | beta | preferred | dispreferred | third demo | OOD (end) | OOD peak (median step) | top OOD trajectory per seed |")
    print("|---|---|---|---|---|---|---|---|")
    for c in rep["cells"]:
        tops = ", ".join(f"{t['trajectory'].replace(',', '')} x{t['seeds']}" for t in c["top_ood"])
        print(
            f"| {c['objective']} | {c['beta']:g} | {dist(c['preferred'])} | {dist(c['dispreferred'])} | "
            f"{dist(c['third_demo'])} | {dist(c['ood'])} | {dist(c['peak_ood'])} "
            f"({c['peak_ood_step']['median']:.0f}) | {tops} |"
        )

    print("\nDPO, seed by seed (end of training): pref / third / OOD, bold where the third")
    print("demonstration holds >= 0.5 or OOD >= 0.2\n")
    dpo = [r for r in runs if r["objective"] == "dpo"]
    seeds = sorted({int(r["seed"]) for r in dpo})
    print("| beta | " + " | ".join(f"seed {s}" if i == 0 else str(s) for i, s in enumerate(seeds)) + " |")
    print("|---" * (len(seeds) + 1) + "|")
    for beta in sorted({r["beta"] for r in dpo}):
        cells, tops = [], []
        for s in seeds:
            r = next(x for x in dpo if x["beta"] == beta and int(x["seed"]) == s)
            p, t, o = short(r["preferred"]), short(r["third_demo"]), short(r["ood"])
            if r["third_demo"] >= 0.5:
                p, t = f"**{p} / {t}**", None
            if r["ood"] >= 0.2:
                o = f"**{o}**"
            cells.append(f"{p} / {o}" if t is None else f"{p} / {t} / {o}")
            top = r["top_ood"].replace(",", "")
            tops.append(f"{top} ({short(r['top_ood_prob'])})" if r["top_ood_prob"] >= 0.1 else top)
        print(f"| {beta:g} pref / third / OOD | " + " | ".join(cells) + " |")
        if beta >= 0.1:
            print(f"| {beta:g} top OOD | " + " | ".join(tops) + " |")

    print()
    for obj in sorted({r["objective"] for r in runs}):
        mine = [r for r in runs if r["objective"] == obj]
        print(f"{obj}: largest end OOD {max(r['ood'] for r in mine):.2f}; "
              f"dispreferred max {max(r['dispreferred'] for r in mine):.2g}")
    # Share of the end OOD mass on the two trajectories that share the preferred prefix.
    traj_path = os.path.join(root, "toy_mdp_trajectories.csv")
    if os.path.exists(traj_path):
        with open(traj_path, newline="") as f:
            trajs = [t for t in csv.DictReader(f) if t["objective"] != "sft" and t["group"] == "ood"]
        for obj in [None] + sorted({t["objective"] for t in trajs}):
            mine = [t for t in trajs if obj is None or t["objective"] == obj]
            total = sum(float(t["prob_end"]) for t in mine)
            near = sum(float(t["prob_end"]) for t in mine if t["trajectory"].replace(",", "") in ("a1a1a1", "a1a1a2"))
            print(f"OOD mass on a1a1a1 + a1a1a2, {obj or 'all'}: {near / total:.0%}" if total else "")
    s9 = [(c["objective"], c["beta"], c["s9_soft_minus_data"]["median"], c["s9_argmax_ood_seeds"]) for c in rep["cells"]]
    print("s9: argmax OOD in", sum(x[3] for x in s9), "of", len(runs), "runs; V - Q(data) medians",
          ", ".join(f"{o} {b:g}: {m:.1g}" for o, b, m, _ in s9))

    per = {p["objective"]: p for p in rep["c9"]["per_objective"]}
    objs = [o for o in ("dpo", "ipo", "slic") if o in per]
    end = " / ".join(f"{f2(per[o]['ood']['median'])} [{f2(per[o]['ood']['max'])}]" for o in objs)
    peak = " / ".join(f2(per[o]["peak_ood"]["median"]) for o in objs)

    def pref_range(beta: float) -> str:
        v = [r["preferred"] for r in dpo if abs(r["beta"] - beta) < 1e-12]
        return f"{f2(min(v))}..{f2(max(v))}" if v else "-"

    yn = lambda b: "holds" if b else "no"
    print("\nsensitivity row:")
    print(
        f"| {setting} | {rep['sft_in_distribution']['median']:.4f} | {end} | {peak} | "
        f"{pref_range(0.1)} ; {pref_range(0.5)} | {yn(rep['c9']['holds'])} / {yn(rep['c9']['holds_during_training'])} |"
    )
    print("\nmedian peak step per cell:", statistics.median(c["peak_ood_step"]["median"] for c in rep["cells"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
