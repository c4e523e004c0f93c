"""Plot decode tokens/s against batch size from a `bench/decode.py` JSON (ours and baselines).

    python -m pallax.bench.plot_decode bench/results/decode_h100.json bench/results/decode_h100.png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = (argv or sys.argv[1:])[:2]
    records = json.load(open(src))
    series = defaultdict(list)
    for r in records:
        if r.get("case") == "decode" and "tok_s" in r:
            series[r["impl"]].append((r["batch"], r["tok_s"]))
    offline = next((r for r in records if r.get("case") == "offline-sharegpt"), None)
    device = records[-1].get("device", "")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, pts in sorted(series.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=impl)
        for b, t in pts:
            ax.annotate(f"{t:,.0f}", (b, t), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if offline:
        ax.axhline(offline["output_tok_s"], ls="--", c="gray",
                   label=f"pallax offline ShareGPT, 1000 req: {offline['output_tok_s']:,.0f} out tok/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (context 1024)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Llama-3-8B shape, bf16, random weights — {device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
