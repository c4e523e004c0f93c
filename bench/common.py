"""Shared benchmark plumbing: device timing inside one jit, the HBM copy ceiling, JSON records.

Every benchmark times device work the same way: `device_time` runs the function `n` times inside a
single jitted `fori_loop`, for two values of `n`, and reports the difference divided by the extra
iterations. Launch, dispatch and the host clock cancel out; what is left is the device time of one
call. Each iteration writes one element of its first argument from the previous output, so XLA can
neither hoist the call out of the loop nor drop an iteration (an in-place one-element update costs
nothing measurable).
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax


def _looped(fn: Callable, n: int):
    def run(args):
        def body(_, carry):
            args, acc = carry
            out = fn(*args)
            first_out = jax.tree.leaves(out)[0]
            s = first_out.reshape(-1)[0].astype(jnp.float32)
            a0 = args[0]
            # Feed the output back into one element of the first input: a true loop dependency.
            a0 = a0.at[(0,) * a0.ndim].add((s * 0).astype(a0.dtype))
            return (a0,) + tuple(args[1:]), acc + s

        return lax.fori_loop(0, n, body, (tuple(args), jnp.float32(0)))[1]

    return jax.jit(run)


def device_time(fn: Callable, *args, iters: int = 20, repeats: int = 5) -> float:
    """Seconds of device time for one `fn(*args)`, from loops of 1+k and 1+2k calls in one jit.

    The median over `repeats` of (t(1 + 2k) - t(1 + k)) / k.
    """
    short, long = _looped(fn, 1 + iters), _looped(fn, 1 + 2 * iters)
    jax.block_until_ready(short(args))
    jax.block_until_ready(long(args))
    diffs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(short(args))
        t1 = time.perf_counter()
        jax.block_until_ready(long(args))
        t2 = time.perf_counter()
        diffs.append(((t2 - t1) - (t1 - t0)) / iters)
    diffs.sort()
    return max(diffs[len(diffs) // 2], 1e-9)


def hbm_copy_bandwidth(gib: float = 4.0) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    t = device_time(lambda a: a + jnp.bfloat16(1), x, iters=5, repeats=3)
    return 2 * n * 2 / t


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def emit(record: dict[str, Any], stream=sys.stdout) -> dict[str, Any]:
    """Print one JSON record on its own line and return it."""
    print(json.dumps(record, sort_keys=True), file=stream, flush=True)
    return record


def append_records(path: str, records: list[dict[str, Any]]) -> None:
    """Append records to a JSON-lines file, one a line."""
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def table(records: list[dict[str, Any]], columns: list[str]) -> str:
    """A fixed-width text table of the given columns."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    rows = [[fmt(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def kernel_profile(run: Callable[[], Any], steps: int, top: int = 40) -> dict[str, Any]:
    """Device time by kernel over `steps` calls of `run` (which blocks on its result), from a
    profiler trace: per kernel name (the streams' events) and per XLA op (the `XLA Ops` line),
    in microseconds per call, plus the streams' busy time per call (the union of their kernels'
    intervals) against the wall time per call, and `idle_in_call_us` (`idle_within_calls`): the
    device's idle time inside a call's kernels. Under the profiler the host is slower, so the
    time between calls says little; to know whether a program keeps the device busy, compare
    `idle_in_call_us` and the busy time with the unprofiled time per call."""
    import glob
    import tempfile

    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            wall = (time.perf_counter() - t0) / steps
        data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        kernels: dict[str, float] = {}
        ops: dict[str, float] = {}
        intervals = []
        lines_seen = []
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                lines_seen.append(f"{plane.name} {line.name}")
                if line.name == "XLA Ops":
                    for e in line.events:
                        ops[e.name] = ops.get(e.name, 0.0) + e.duration_ns
                elif line.name.startswith("Stream"):
                    for e in line.events:
                        kernels[e.name] = kernels.get(e.name, 0.0) + e.duration_ns
                        intervals.append((e.start_ns, e.end_ns))
    idle = idle_within_calls(intervals, steps)
    per_call = lambda d: {k: v / steps / 1e3 for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]}  # noqa: E731
    return {"wall_us": wall * 1e6, "busy_us": _union_ns(intervals) / steps / 1e3,
            "idle_in_call_us": None if idle is None else idle / 1e3,
            "kernel_us_total": sum(kernels.values()) / steps / 1e3, "kernel_launches": len(intervals) / steps,
            "kernels_us": per_call(kernels), "ops_us": per_call(ops), "lines": lines_seen}


def _union_ns(intervals) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def idle_within_calls(intervals, calls: int) -> float | None:
    """Idle time per call inside the calls' kernels, from the kernel intervals of `calls` calls
    of one program, each launching the same kernels: the time-ordered intervals are cut into
    `calls` runs of equal count, and each run's span less its busy time is its idle time. None
    when the count does not divide (the calls launched different kernels)."""
    if not intervals or len(intervals) % calls:
        return None
    ordered, n = sorted(intervals), len(intervals) // calls
    runs = [ordered[i * n:(i + 1) * n] for i in range(calls)]
    return sum(max(e for _, e in r) - r[0][0] - _union_ns(r) for r in runs) / calls


TRANSPOSED_CHOICES = {"auto": None, "on": True, "off": False}


def add_transposed_flag(ap) -> None:
    """`--transposed auto|on|off`: EngineConfig.transposed_projections (auto: the engine's default,
    on where the backend is a GPU); read it with `transposed_setting`."""
    ap.add_argument("--transposed", choices=list(TRANSPOSED_CHOICES), default="auto",
                    help="small dense projections stored [N, K] (EngineConfig.transposed_projections; "
                         "auto: the engine's default, on a GPU)")


def transposed_setting(args) -> bool | None:
    return TRANSPOSED_CHOICES[args.transposed]


def kernel_parts(us: dict[str, float], parts, scale: float = 1.0) -> list[tuple[str, float]]:
    """(label, time) of each `(name prefix, label)` in `parts` among a profile's kernels `us`
    (labels shared by several prefixes add up), times `scale`; absent ones left out."""
    out: dict[str, float] = {}
    for prefix, label in parts:
        t = sum(v for k, v in us.items() if k.startswith(prefix)) * scale
        if t:
            out[label] = out.get(label, 0.0) + t
    return list(out.items())


def stacked_bars(ax, bars, parts, title: str, unit: str) -> None:
    """Horizontal bars, one a `(label, [(part, value), ...])` (`kernel_parts` of `parts`), each
    stacked by part, one color a label of `parts` in their order (the same in every panel), its
    total written after it."""
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(label for _, label in parts))}
    for i, (_, values) in enumerate(bars):
        bottom = 0.0
        for name, value in values:
            ax.barh(i, value, left=bottom, color=colors[name],
                    label=name if name not in ax.get_legend_handles_labels()[1] else None)
            bottom += value
        ax.text(bottom + 0.1, i, f"{bottom:.1f}", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
