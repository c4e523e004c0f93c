"""Plot the speculative speed run: each drafter's round cost (in plain decode steps, measured on
the GPU) against the tokens a round yields (the acceptance profile), with the lines of equal
speedup. A point left of the 1x line is slower than plain decoding.

    python -m pallax.bench.plot_speculative bench/results/speculative_h100.json bench/results/speculative_h100.png
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = (argv or sys.argv[1:])[:2]
    records = [json.loads(line) for line in open(src) if line.strip()]
    rows = [r for r in records if r.get("bench") == "speculative_speed" and r.get("mode") != "plain"
            and r.get("tokens_per_target_step_cpu")]
    plain = next(r for r in records if r.get("bench") == "speculative_speed" and r.get("mode") == "plain")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(max(r["round_cost_in_plain_steps"] for r in rows), max(r["tokens_per_target_step_cpu"] for r in rows)) * 1.15
    for s, style in ((1.0, "-"), (1.8, "--"), (2.0, ":")):
        ax.plot([0, top], [0, top * s], style, c="gray", lw=1)
        ax.annotate(f"{s:g}x", (top / s / 1.05, top * 0.97), fontsize=8, color="gray")
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
