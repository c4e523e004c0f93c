"""Plot speculative decoding: each mode's round cost (in plain decode steps) against the tokens a
round yields, with the lines of equal speedup. A point below the 1x line is slower than plain
decoding.

    python -m pallax.bench.plot_speculative bench/results/speculative_h100.json bench/results/speculative_h100.png
    python -m pallax.bench.plot_speculative --real bench/results/speculative_real_pair_h100.json \
        bench/results/speculative_real_ngram_h100_run2.json bench/results/speculative_real_pair_h100.png
    python -m pallax.bench.plot_speculative --real bench/results/speculative_real_ngram_corpus_h100.jsonl \
        bench/results/speculative_real_ngram_corpus_h100.png

The first form plots a `speed` run (round costs with random weights, acceptance from a CPU run);
`--real` plots `real` runs of the real pair, where both come from the same GPU run: tokens per
round over all rounds (n-gram rounds with nothing drafted included, where the run counted them)
and the round cost that the measured speedup implies; "+ corpus": n-gram drafts that fall back on
the earlier prompts' tokens.
"""

from __future__ import annotations

import json
import sys


def real_points(records: list[dict]) -> list[tuple[str, float, float]]:
    """(label, round cost in plain steps, tokens per round) of each speculative `real` record.
    Records from before empty rounds were counted give tokens per verification, which is tokens
    per round only for the draft model (it always drafts); their n-gram modes are left out."""
    points, runs = [], sum(r.get("bench") == "speculative_real_pair" and r.get("mode") == "plain" for r in records)
    run = 0
    for r in records:
        if r.get("bench") != "speculative_real_pair":
            continue
        if r.get("mode") == "plain":  # each run starts with its plain greedy record
            run += 1
            continue
        per_round = r.get("tokens_per_round")
        if per_round is None and r["mode"] == "draft":
            per_round = r["mean_accepted_length"]
        if per_round is None:
            continue
        corpus = " + corpus" if r.get("ngram_corpus") == "earlier prompts" else ""
        variant = f", {r['variant']}" if r.get("variant") else ""  # what a later run changed, if it says
        label = f"{r['mode']}{corpus} k={r['k']}{variant}" + (f" (run {run})" if runs > 1 else "")
        points.append((label, per_round / r["speedup"], per_round))
    return points


def _speedup_lines(ax, top):
    for s, style in ((1.0, "-"), (1.8, "--"), (2.0, ":")):
        ax.plot([0, top], [0, top * s], style, c="gray", lw=1)
        ax.annotate(f"{s:g}x", (top / s / 1.05, top * 0.97), fontsize=8, color="gray")


def plot_real(srcs: list[str], dst: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for src in srcs for line in open(src) if line.strip()]
    points = real_points(records)
    if not points:
        raise SystemExit(f"no speculative real records with tokens per round in {srcs}")
    plains = [r for r in records if r.get("bench") == "speculative_real_pair" and r.get("mode") == "plain"]
    plain = plains[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(max(x, y) for _, x, y in points) * 1.15
    _speedup_lines(ax, top)
    named = set()
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], s=40, label=f"{label}: {y / x:.2f}x")
        name = label.split(" (run")[0]
        if name not in named:  # each mode named once, beside its first run
            named.add(name)  # stacked, so names of nearby points do not overwrite each other
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(-6, 6 + 11 * (len(named) - 1)), ha="right",
                        fontsize=8)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    rates = ", ".join(sorted({f"{r['tokens_per_s']:.0f}" for r in plains}))
    ax.set_xlabel(f"round cost, in plain decode steps (plain greedy: {rates} tok/s, each run its own)")
    ax.set_ylabel("tokens per round (greedy, 164 HumanEval prompts)")
    ax.set_title(f"Speculative decoding at batch 1, real pair — {plain.get('device', '')}\n"
                 f"{plain['target']} (draft {next((r['draft'] for r in records if r.get('draft')), '-')})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--real":
        return plot_real(argv[1:-1], argv[-1])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = argv[:2]
    records = [json.loads(line) for line in open(src) if line.strip()]
    rows = [r for r in records if r.get("bench") == "speculative_speed" and r.get("mode") != "plain"
            and r.get("tokens_per_target_step_cpu")]
    plain = next(r for r in records if r.get("bench") == "speculative_speed" and r.get("mode") == "plain")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(max(r["round_cost_in_plain_steps"] for r in rows), max(r["tokens_per_target_step_cpu"] for r in rows)) * 1.15
    _speedup_lines(ax, top)
    for r in rows:
        x, y = r["round_cost_in_plain_steps"], r["tokens_per_target_step_cpu"]
        ax.scatter([x], [y], s=40, label=f"{r['mode']} k={r['k']}: {r['expected_speedup']:.2f}x expected")
        ax.annotate(f"{r['mode']} k={r['k']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel(f"round cost, in plain decode steps ({plain['tokens_per_s']:.0f} tok/s plain)")
    ax.set_ylabel("tokens per round (greedy HumanEval, CPU run)")
    ax.set_title(f"Speculative decoding at batch 1 — {plain.get('device', '')}\n{plain['model']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
