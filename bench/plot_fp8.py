"""Plot the fp8 (W8A8) products against the bf16 dot, from `bench/matmul.py`'s records: the
Mosaic GPU kernel and XLA's fp8 dot at 8192^3 and at Llama-3-8B's projections (`fp8-shapes`).

    python -m pallax.bench.plot_fp8 bench/results/matmul_fp8_h200.json bench/results/fp8_h200.png
"""

from __future__ import annotations

import json
import sys

KINDS = {"fp8-xla": "XLA's fp8 dot", "fp8-mgpu": "ours, Mosaic GPU", "fp8-ours": "ours, Triton"}


def speedups(records) -> tuple[list[str], dict[str, list[float]]]:
    """Column labels ('q/k/v\\nM=512', ..., '8192^3') and each kind's speedup over the bf16 dot
    of the same run, by column (0 where the run has no such record)."""
    cols: dict[str, dict[str, float]] = {}
    for r in records:
        kind = r.get("kind", "")
        if "speedup" not in r or not kind.startswith(("fp8-shapes", "fp8-bench")):
            continue
        label = f"{r['kind_shape']}\nM={r['m']}" if "kind_shape" in r else f"{r['m']}^3"
        cols.setdefault(label, {})[kind.split(" ")[1]] = r["speedup"]
    labels = list(cols)
    return labels, {k: [cols[lab].get(k, 0.0) for lab in labels] for k in KINDS
                    if any(k in c for c in cols.values())}


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = (argv or sys.argv[1:])[:2]
    data = json.load(open(src))
    labels, series = speedups(data["records"])
    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / len(series)
    for i, (kind, ys) in enumerate(series.items()):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))], ys, width,
               label=KINDS[kind])
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axhline(1.5, color="tab:red", lw=0.8, ls=":", label="1.5x (the target at 8192^3)")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("speedup over the bf16 XLA dot")
    ax.set_title(f"{data['environment'].get('device', '')}: fp8 e4m3 GEMMs (x quantized per token"
                 " beforehand, w per channel), device_time loops, one run")
    ax.legend(fontsize=8, loc="lower right", ncol=4)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
