"""Anatomy of a decode step: the kernels its compiled program launches, and its time.

Batch-1 decode of the Llama-3-8B shape reads 16 GB of weights per token, about 4.8 ms at the
H100's copy bandwidth; a step once took 8.4 ms (results/decode_h100_run2.json). What is left
over is per-kernel cost (launch gaps, kernels too small to fill the chip), host time, and
rewrites by the compiler. For the engine's own pure-decode program (`--batch` sequences,
`--n-steps` model steps per call; one and one by default, what `bench/decode.py` times at batch
1) this prints:

- the kernels of the optimized program: every instruction that runs on the device, by kind
  (fusion kinds, custom-call targets such as Pallas/Triton kernels and cuBLAS GEMMs, copies,
  ...), in total and per layer, following while loops and command buffers into their bodies;
- the step's time over back-to-back calls, host dispatch included (what a batch-1 user sees);
- with `--profile`, device time by kernel from a profiler trace, the device's busy time, and its
  idle time inside a step (between the step's own kernels). A step time above busy + idle is
  the host's: the device waited between steps for the next one to be queued;
- with `--hlo FILE`, the optimized program's text, to read;
- with `--quantize int4` (or int8, fp8), the same for quantized random weights.

Run it once per XLA_FLAGS variant to compare, e.g. with command buffers (CUDA graphs) off:

    python -m pallax.bench.step_anatomy --preset llama3-8b --out anatomy.json
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python -m pallax.bench.step_anatomy --preset llama3-8b
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np

from pallax.bench.common import (add_transposed_flag, append_records, emit, environment, kernel_profile,
                                 transposed_setting)
from pallax.decode.kv_cache import KV_DTYPES

# Instructions that launch nothing: they name, reshape or bundle buffers.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency"}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(?:body|condition|to_apply|calls|branch_computations|true_computation|"
                    r"false_computation)=\{?([%\w.\-, ]+)\}?")


def _split_instruction(line: str) -> tuple[str, str] | None:
    """(opcode, the rest of the line) of an HLO instruction line, None for anything else."""
    if "=" not in line:
        return None
    body = line.split("=", 1)[1].strip()
    if body.startswith("("):  # a tuple type: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(body):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                body = body[i + 1:].strip()
                break
    else:
        body = body.split(" ", 1)[1] if " " in body else ""
    m = re.match(r"([\w\-]+)\(", body)
    return (m.group(1), body) if m else None


def computations(hlo: str) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """The entry computation's name and every computation's instructions (opcode, text)."""
    comps: dict[str, list[tuple[str, str]]] = {}
    entry, current = None, None
    for raw in hlo.splitlines():
        line = raw.strip()
        if current is None:
            m = _HEADER.match(line)
            if m and "->" in line:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line == "}":
            current = None
            continue
        ins = _split_instruction(line)
        if ins is not None:
            comps[current].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, comps


def kernel_census(hlo: str) -> Counter:
    """Device instructions of a compiled program by kind: `fusion:<kind>`, `custom-call:<target>`,
    or the opcode; control flow (while, conditional, call, command buffers) is entered, not counted.
    A while body counts once, not per trip."""
    entry, comps = computations(hlo)
    counts: Counter = Counter()
    seen: set[str] = set()

    def walk(name: str) -> None:
        if name in seen or name not in comps:
            return
        seen.add(name)
        for op, text in comps[name]:
            if op in _FREE:
                continue
            if op in ("while", "conditional", "call", "async-start", "async-done"):
                for group in _CALLS.findall(text):
                    for callee in group.split(","):
                        walk(callee.strip().lstrip("%"))
                continue
            if op == "fusion":
                kind = re.search(r"kind=(\w+)", text)
                name_hint = re.search(r'"name":"([\w$]+)"', text)  # e.g. a Triton GEMM's backend config
                counts[f"fusion:{kind.group(1) if kind else '?'}" + (f":{name_hint.group(1)}" if name_hint else "")] += 1
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', text)
                counts[f"custom-call:{target.group(1) if target else '?'}"] += 1
            else:
                counts[op] += 1

    walk(entry)
    return counts


def decode_program(llm, batch: int = 1, n_steps: int = 1, page_size: int = 16, context: int = 1024,
                   temperature: float = 0.0, kv_dtype: str = "bfloat16", decode: bool = True):
    """The engine's pure-decode program (`batch` sequences at `context`, `n_steps` model steps per
    call, a `kv_dtype` page pool; `decode`: compiled as a pure decode batch, as the engine runs
    its multi-step calls, else as a general batch), its arguments, and the jitted function."""
    from pallax.decode.engine import MIN_ROWS, compile_step, empty_batch, to_device
    from pallax.decode.kv_cache import create_pool

    c = llm.config
    pages = -(-(context + n_steps) // page_size)  # per sequence
    per_layer = isinstance(llm.params["layers"], (list, tuple))
    pool = create_pool(c, batch * pages + 1, page_size, kv_dtype, per_layer=per_layer)
    rows = max(batch, MIN_ROWS)  # as the engine pads a batch of one
    host = empty_batch(rows, rows, pages)
    for b in range(batch):  # sequence b owns pages b * pages ... in order
        host["positions"][b] = context
        host["slots"][b] = b * pages * page_size + context
        host["page_table"][b] = b * pages + np.arange(pages)
        host["query_start"][b + 1] = b + 1
        host["kv_lens"][b] = context + 1
        host["temperature"][b] = temperature
    step = compile_step(c, n_steps, full=temperature > 0, decode=decode)
    args = (llm.params, pool, to_device(host, batch), jax.numpy.zeros(rows, jax.numpy.int32))
    return step, args


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="decode sequences per step")
    ap.add_argument("--n-steps", type=int, default=1, help="model steps per call (the engine's decode_steps)")
    ap.add_argument("--temperature", type=float, default=0.0, help="the row's sampling temperature (0: greedy)")
    ap.add_argument("--steps", type=int, default=50, help="back-to-back steps timed")
    ap.add_argument("--quantize", choices=["int8", "int4", "fp8"],
                    help="the random weights in this format, as `pallax quantize` makes them")
    ap.add_argument("--group", type=int, default=128, help="int4 group size")
    ap.add_argument("--kv-dtype", default="bfloat16", choices=sorted(KV_DTYPES),
                    help="the page pool's dtype")
    ap.add_argument("--quantize-head", action="store_true", help="the output head in --quantize too")
    ap.add_argument("--unfused", action="store_true",
                    help="separate q/k/v and gate/up GEMMs (EngineConfig.fuse_projections=False)")
    add_transposed_flag(ap)
    ap.add_argument("--hlo", help="write the optimized program's text here")
    ap.add_argument("--profile", action="store_true",
                    help="also trace the steps: device time by kernel and by XLA op, and the idle time")
    ap.add_argument("--out", help="append the JSON record here")
    args = ap.parse_args(argv)

    from pallax.bench.decode import random_llm
    from pallax.model.config import preset
    from pallax.decode.scheduler import serving_layout, transposes

    llm = random_llm(preset(args.preset))
    if args.quantize:
        from pallax.model.quantize import quantize

        llm = quantize(llm, args.quantize, group_size=args.group, quantize_head=args.quantize_head)
    transposed = transposes(transposed_setting(args))
    llm.params = serving_layout(llm.params, fuse=not args.unfused, transpose=transposed)  # as the engine runs them
    step, (params, pool, batch, prev) = decode_program(llm, args.batch, args.n_steps, context=args.context,
                                                          temperature=args.temperature, kv_dtype=args.kv_dtype)
    compiled = step.lower(params, pool, batch, prev).compile()
    hlo = compiled.as_text()
    if args.hlo:
        Path(args.hlo).write_text(hlo)
    census = kernel_census(hlo)
    pool, out, prev = step(params, pool, batch, prev)  # warm
    jax.block_until_ready(out.tokens)
    t0 = time.perf_counter()
    dispatch = 0.0
    for _ in range(args.steps):
        t = time.perf_counter()
        pool, out, prev = step(params, pool, batch, prev)
        dispatch += time.perf_counter() - t
    jax.block_until_ready(out.tokens)
    dt = (time.perf_counter() - t0) / args.steps / args.n_steps  # per model step
    dispatch /= args.steps  # host time until the call returns: above the step time, the host is the bottleneck
    profile = None
    if args.profile:
        state = [pool, prev]

        def run():
            state[0], out, state[1] = step(params, state[0], batch, state[1])
            jax.block_until_ready(out.tokens)

        profile = kernel_profile(run, args.steps)
    L = llm.config.n_layers
    total = sum(census.values())
    rec = emit(dict(bench="step_anatomy", model=f"{args.preset} random {args.quantize or 'bf16'}", batch=args.batch, n_steps=args.n_steps, context=args.context, temperature=args.temperature,
                    fused=not args.unfused, transposed=transposed,
                    weights=(args.quantize or "bfloat16") + ("+head" if args.quantize_head else ""), kv_dtype=args.kv_dtype,
                    step_ms=dt * 1e3, dispatch_ms=dispatch * 1e3, kernels=total, kernels_per_layer=total / L,
                    per_layer_us=dt * 1e6 / L, census=dict(census.most_common()), profile=profile, **environment()))
    for kind, n in census.most_common():
        print(f"{n:6d}  {n / L:6.2f}/layer  {kind}")
    print(f"{total} kernels, {total / L:.1f} per layer; step {dt * 1e3:.2f} ms ({dt * 1e6 / L:.0f} us per layer), "
          f"host dispatch {dispatch * 1e3:.2f} ms")
    if profile:
        idle = profile["idle_in_call_us"]
        print(f"traced: device busy {profile['busy_us']:.0f} us/step, idle inside the step "
              f"{'?' if idle is None else f'{idle:.0f}'} us, {profile['kernel_launches']:.0f} kernels "
              f"(wall {profile['wall_us']:.0f} us/step under the profiler)")
        for name, us in list(profile["kernels_us"].items())[:25]:
            print(f"{us:9.1f} us  {name[:110]}")
    if args.out:
        append_records(args.out, [rec])


if __name__ == "__main__":
    main()
