"""Where the Hopper int4 kernel's time goes: its on-device timeline, CTA by CTA.

    python3 -m pallax.bench.int4_timeline --preset llama3-8b --m 2 --out $OUT/int4_timeline.jsonl

For each projection of the preset's layer (as the engine serves them), the kernel's device time
(`device_time`, enough weight copies to miss L2), then one call with Mosaic GPU's on-device
profiler (`int4_matmul_mgpu(profile_dir=...)`): every warpgroup records its regions (consumers:
`wait` for a slot, `math` on it, `flush`, `drain`; producer: `issue`). From the traces, per call:
- `start_spread_us`: how far apart the CTAs started (the global timer at each CTA's entry);
- `first_data_us`: from a consumer's first event (Pallas's `Init`, at the CTA's entry) to its first
  slot ready (the ring's fill);
- `step_us`: a consumer's median time from one slot ready to the next (steady state);
- `wait_frac`: the share of a consumer's time spent waiting for data;
- `tail_us`: from the last slot ready to the consumer's end (last math, flush, drain);
- `cta_us`: a consumer's whole run; `span_us`: first CTA start to last CTA end.
`--plot TRACE PNG` draws a trace kept with `--keep-traces` (bench/results/int4_timeline_o_h200.png).

Against them: `us`, the device time of a call in a loop of calls (`device_time`), and
`kernel_us` / `fixup_us`, the profiler's (CUPTI) time of the kernel itself and of the XLA fusion
that adds its partial sums, one call at a time. Clock cycles become time at the median SM clock
nvidia-smi reported while the loop ran (`--clock-mhz` overrides); the weights are random words
(the kernel's time does not depend on their values).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from pallax.bench.common import append_records, device_time, emit, environment, kernel_profile, table
from pallax.bench.int4_sweep import GROUP, projections
from pallax.bench.matmul import _summed
from pallax.kernels_pallas import int4_matmul_mgpu as i4h
from pallax.model.config import preset


class ClockSampler:
    """The SM clock (MHz) nvidia-smi reports every 20 ms while the `with` block runs; `median`
    is None where there is no nvidia-smi."""

    def __enter__(self):
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits", "-lms", "20"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._proc = None
        self.median = None
        return self

    def __exit__(self, *exc):
        if self._proc is None:
            return
        self._proc.terminate()
        out = self._proc.communicate(timeout=30)[0]
        mhz = [float(v) for v in out.split() if v.replace(".", "").isdigit()]
        busy = [v for v in mhz if v > 0.5 * max(mhz, default=0)]  # not the idle clock between runs
        self.median = float(np.median(busy)) if busy else None


def traces(path: str) -> list[dict]:
    """One Mosaic GPU profiler dump -> a list of warpgroup traces: `{"sm", "tid", "start_us",
    "regions": [(name, begin_cycles, end_cycles)]}` (cycles from the trace's first event; the
    dump writes each event as (global timer at the CTA's start in ns + cycles) / 1000)."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    by_trace: dict[tuple[int, int], list] = {}
    for e in events:
        by_trace.setdefault((e["pid"], e["tid"]), []).append(e)
    out = []
    for (pid, tid), evs in sorted(by_trace.items(), key=lambda kv: kv[0][1]):
        start = evs[0]["ts"]
        stack, regions = [], []
        for e in evs:
            cyc = round((e["ts"] - start) * 1e3)
            if e["ph"] == "B":
                stack.append((e["name"], cyc))
            else:
                name, b = stack.pop()
                regions.append((name, b, cyc))
        out.append({"sm": pid - 1, "tid": tid, "start_us": start, "regions": regions})
    return out


def summarize(trs: list[dict], traces_per_cta: int, consumers: int, mhz: float) -> dict:
    """The timeline's figures (module docstring) over every CTA's consumer warpgroups."""
    us = 1.0 / mhz  # microseconds a cycle
    starts = {t["tid"]: t["start_us"] for t in trs}
    first_data, steps, wait_frac, tails, runs, ends = [], [], [], [], [], []
    for t in trs:
        if (t["tid"] - 1) % traces_per_cta >= consumers:
            continue  # the producer (and any warpgroup past the consumers)
        waits = sorted((b, e) for n, b, e in t["regions"] if n == "wait")
        if not waits:
            continue
        end = max(e for _, _, e in t["regions"])
        first_data.append(waits[0][1] * us)
        readies = np.array([e for _, e in waits])
        if len(readies) > 1:
            steps.extend(np.diff(readies) * us)
        wait_frac.append(sum(e - b for b, e in waits) / max(end, 1))
        tails.append((end - readies[-1]) * us)
        runs.append(end * us)
        ends.append(starts[t["tid"]] + end * us)
    spread = max(starts.values()) - min(starts.values())
    return {
        "ctas": len(trs) // traces_per_cta,
        "start_spread_us": spread,
        "first_data_us": float(np.median(first_data)),
        "first_data_max_us": float(np.max(first_data)),
        "step_us": float(np.median(steps)) if steps else None,
        "wait_frac": float(np.mean(wait_frac)),
        "tail_us": float(np.median(tails)),
        "cta_us": float(np.median(runs)),
        "cta_max_us": float(np.max(runs)),
        "span_us": max(ends) - min(starts.values()),
    }


COLORS = {"wait": "#d62728", "math": "#1f77b4", "flush": "#2ca02c", "drain": "#9467bd", "issue": "#ff7f0e"}


def plot(trace: str, png: str, consumers: int, mhz: float, ctas: int = 24, title: str = "") -> None:
    """A Gantt chart of the first `ctas` CTAs of one kept trace: a lane per warpgroup (the
    producer's `issue` regions, each consumer's `wait` / `math` / `flush` / `drain`), in
    microseconds from the earliest CTA's start (the global timer), cycles at `mhz`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_cta = consumers + 1
    trs = traces(trace)[:ctas * per_cta]
    t0 = min(t["start_us"] for t in trs)
    fig, ax = plt.subplots(figsize=(11, 0.22 * len(trs) + 1.2))
    for lane, t in enumerate(trs):
        wg = (t["tid"] - 1) % per_cta
        for name, b, e in t["regions"]:
            if name in COLORS and not (wg < consumers and name == "issue"):
                ax.broken_barh([(t["start_us"] - t0 + b / mhz, (e - b) / mhz)], (lane - 0.4, 0.8),
                               color=COLORS[name], linewidth=0)
    ax.set_yticks([i * per_cta + (per_cta - 1) / 2 for i in range(len(trs) // per_cta)])
    ax.set_yticklabels([f"CTA {i}" for i in range(len(trs) // per_cta)], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("us from the first CTA's start")
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=n) for n, c in COLORS.items()],
              loc="lower right", fontsize=7, ncol=5)
    ax.set_title(title or f"int4 kernel timeline ({consumers} consumers + producer per CTA)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=130)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--m", type=int, nargs="+", default=[2])
    ap.add_argument("--ops", nargs="+", default=None, help="which projections (default: all)")
    ap.add_argument("--clock-mhz", type=float, default=None)
    ap.add_argument("--keep-traces", default=None, help="copy the profiled calls' traces to this folder")
    ap.add_argument("--out", default="int4_timeline.jsonl")
    ap.add_argument("--plot", nargs=2, metavar=("TRACE", "PNG"),
                    help="only draw a kept trace (--keep-traces) as a PNG, at --clock-mhz (default 1980)")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    if args.plot:
        plot(*args.plot, consumers=i4h.blocks_for(4096).consumers, mhz=args.clock_mhz or 1980.0,
             title=args.title)
        return
    env = environment()
    cfg = preset(args.preset)
    records = []
    key = jax.random.key(0)
    for op, k, n, copies in projections(cfg, args.ops):
        blocks = i4h.blocks_for(k)
        packed_bytes = k * n // 2
        ws = []
        for _ in range(copies):
            key, kw, ks = jax.random.split(key, 3)
            words = jax.random.bits(kw, (n // 64, k // GROUP, GROUP // 16, 128), jnp.uint32)
            ws += [jax.lax.bitcast_convert_type(words, jnp.int32),
                   jax.random.uniform(ks, (k // GROUP, n), jnp.float32, 1e-3, 2e-3)]
        for m in args.m:
            key, sub = jax.random.split(key)
            x = jax.random.normal(sub, (m, k), jnp.bfloat16)
            fn = lambda x, w, s: i4h.int4_matmul_mgpu(x, w, s, group_size=GROUP)  # noqa: E731
            with ClockSampler() as clock:
                t = device_time(_summed(fn, copies), x, *ws, iters=100) / copies
            mhz = args.clock_mhz or clock.median or 1980.0
            # each kernel's own device time, one call at a time (weights rotated out of L2)
            one = jax.jit(fn)
            turn = itertools.count()

            def call():
                c = next(turn) % copies
                jax.block_until_ready(one(x, ws[2 * c], ws[2 * c + 1]))

            for _ in range(copies):
                call()
            prof = kernel_profile(call, 10 * copies)
            mosaic = sum(v for name, v in prof["kernels_us"].items() if "mosaic" in name)
            with tempfile.TemporaryDirectory() as d:
                # Mosaic GPU writes one trace file a compiled kernel (its first call's): copy 0,
                # last read `copies - 1` calls ago, so not from L2
                y = i4h.int4_matmul_mgpu(x, ws[0], ws[1], group_size=GROUP, profile_dir=d)
                jax.block_until_ready(y)
                jax.effects_barrier()
                [trace] = glob.glob(os.path.join(d, "*-trace.json"))
                if args.keep_traces:
                    os.makedirs(args.keep_traces, exist_ok=True)
                    shutil.copy(trace, os.path.join(args.keep_traces, f"{op}_m{m}.json"))
                summary = summarize(traces(trace), blocks.consumers + 1, blocks.consumers, mhz)
            sched = i4h.Schedule.make(k, n, blocks, 132)
            records.append(emit({**env, "bench": "int4_timeline", "preset": args.preset, "op": op,
                                 "k": k, "n": n, "m": m, "blocks": repr(blocks),
                                 "units_per_cta": sched.units / sched.ctas, "clock_mhz": mhz,
                                 "us": t * 1e6, "GBps": packed_bytes / t / 1e9,
                                 "kernel_us": mosaic, "fixup_us": prof["kernel_us_total"] - mosaic,
                                 "kernels": prof["kernels_us"], **summary}))
    append_records(args.out, records)
    print(table(records, ["op", "m", "us", "kernel_us", "fixup_us", "span_us", "cta_us", "start_spread_us",
                          "first_data_us", "step_us", "tail_us", "wait_frac"]))


if __name__ == "__main__":
    main()
