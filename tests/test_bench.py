"""Benchmark plumbing that can be checked without a GPU."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from pallax.bench.step_anatomy import computations, kernel_census


def test_kernel_census_counts_device_work_and_enters_loops():
    def f(x, w):
        def body(i, x):
            return jnp.tanh(x @ w) + i
        y = jax.lax.fori_loop(0, 3, body, x)
        return jnp.sort(y, axis=-1), jax.lax.top_k(y, 2)[0]

    x = jnp.ones((4, 8))
    hlo = jax.jit(f).lower(x, jnp.eye(8)).compile().as_text()
    entry, comps = computations(hlo)
    assert entry in comps and len(comps) > 2
    census = kernel_census(hlo)
    assert census["dot"] + sum(n for k, n in census.items() if k.startswith("fusion")) >= 1  # the body's matmul
    assert census["sort"] >= 1 and not {"parameter", "constant", "tuple", "while"} & set(census)
    # the loop body is entered once, not per trip: three trips of one matmul count one dot
    assert census["dot"] <= 1


def test_idle_within_calls_counts_gaps_inside_each_call_only():
    """Three calls of three kernels each (ns), with long host waits between the calls: only the
    gaps between a call's own kernels count, and overlapping kernels (two streams) are no gap."""
    from pallax.bench.common import idle_within_calls

    calls = [[(0, 10), (12, 20), (25, 30)],          # gaps 2 + 5
             [(1000, 1010), (1010, 1020), (1021, 1030)],  # gap 1
             [(5000, 5010), (5005, 5020), (5020, 5030)]]  # overlap: no gap
    intervals = [iv for c in calls for iv in reversed(c)]  # order of the trace lines is free
    assert idle_within_calls(intervals, 3) == (7 + 1 + 0) / 3
    assert idle_within_calls(intervals[:-1], 3) is None  # a call launched fewer kernels
    assert idle_within_calls([], 3) is None


def test_plot_kernels_draws_both_panels(tmp_path):
    """The kernel plot from records shaped like bench/attention.py's and bench/matmul.py's."""
    from pallax.bench import plot_kernels

    att = [dict(case="prefill", impl=impl, direction=d, tflops=t, dtype="bfloat16", device="GPU")
           for impl, d, t in (("jax.nn.cudnn", "fwd", 480.0), ("jax.nn.cudnn", "bwd", 440.0),
                              ("pallas_mgpu", "fwd", 500.0), ("pallas_mgpu", "bwd", 375.0),
                              ("pallas_triton", "fwd", 400.0), ("pallas_triton", "bwd", 345.0))]
    mm = {"records": [dict(kind=kind, k=4096, n=14336, m=m, speedup=s)
                      for kind, s in (("int4-g128", 1.6), ("int4-g128-hopper", 2.3)) for m in (1, 16)]}
    bars = plot_kernels._attention_bars(att)
    assert bars[0] == ("cuDNN", 480.0, 440.0) and bars[1][1:] == (500.0, 375.0) and bars[3][1] == 0.0
    pts = plot_kernels._int4_points(mm["records"])
    assert sorted(pts) == ["int4-g128", "int4-g128-hopper"] and len(pts["int4-g128"]) == 2
    (tmp_path / "a.json").write_text(json.dumps(att))
    (tmp_path / "m.json").write_text(json.dumps(mm))
    out = tmp_path / "k.png"
    assert plot_kernels.main([str(tmp_path / "a.json"), str(tmp_path / "m.json"), str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_speculative_real_points(tmp_path):
    """Real-pair records: tokens per round over all rounds where counted, tokens per verification
    for the draft model (it always drafts) otherwise, and the round cost the speedup implies; an
    n-gram record without the empty-round count is left out."""
    from pallax.bench import plot_speculative

    base = dict(bench="speculative_real_pair", target="t", draft=None, device="GPU")
    recs = [dict(base, mode="plain", k=None, tokens_per_s=500.0),
            dict(base, mode="draft", draft="d", k=4, mean_accepted_length=4.4, speedup=1.1),
            dict(base, mode="ngram", k=4, mean_accepted_length=2.0, speedup=1.25),  # no tokens_per_round
            dict(base, mode="ngram", k=8, mean_accepted_length=2.2, tokens_per_round=1.7, speedup=1.36)]
    pts = plot_speculative.real_points(recs)
    assert [p[0] for p in pts] == ["draft k=4", "ngram k=8"]
    assert abs(pts[0][1] - 4.4 / 1.1) < 1e-9 and pts[0][2] == 4.4
    assert abs(pts[1][1] - 1.7 / 1.36) < 1e-9 and pts[1][2] == 1.7
    # a second run, its n-gram drafts falling back on the earlier prompts: points named by run
    recs += [dict(base, mode="plain", k=None, tokens_per_s=510.0),
             dict(base, mode="ngram", k=8, tokens_per_round=2.2, speedup=2.0, ngram_corpus="earlier prompts")]
    assert [p[0] for p in plot_speculative.real_points(recs)] == [
        "draft k=4 (run 1)", "ngram k=8 (run 1)", "ngram + corpus k=8 (run 2)"]
    src, out = tmp_path / "r.json", tmp_path / "r.png"
    src.write_text("\n".join(json.dumps(r) for r in recs))
    assert plot_speculative.main(["--real", str(src), str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_norm_matmul_bench_runs_every_op_of_a_layer():
    """bench.norm_matmul on the tiny preset, kernels in interpret mode: a record for each op the
    kernel fuses, its output checked against XLA's composition."""
    import argparse

    from pallax.bench import norm_matmul as bench
    from pallax.kernels_pallas.dispatch import kernel_mode

    args = argparse.Namespace(presets=["tiny"], m=[2], sweep=1, steps=1)
    with kernel_mode("interpret"):
        records = bench.run(args)
    assert [r["op"] for r in records] == ["qkv", "gate_up"]
    assert all(r["rel_err"] < 0.02 and r["n"] % 16 == 0 for r in records), records


def test_int4_sweep_times_the_projections_the_engine_serves():
    """bench.int4_sweep's shapes are the [K, N] of the weights a served layer holds (q/k/v and
    gate/up fused), for a GQA preset and one with biases."""
    from pallax.bench.decode import random_llm
    from pallax.bench.int4_sweep import layer_shapes
    from pallax.decode.scheduler import serving_layout
    from pallax.model.config import preset

    names = {"qkv": "wqkv", "o": "wo", "gate_up": "w_gate_up", "down": "w_down"}
    for name in ("tiny", "qwen2.5-0.5b"):
        cfg = dataclasses.replace(preset(name), n_layers=1)  # the real shapes, one layer
        layer = serving_layout(random_llm(cfg).params)["layers"][0]
        assert {op: layer[w].shape for op, w in names.items()} == layer_shapes(cfg)


def test_int4_timeline_reads_mosaic_gpu_profiler_dumps(tmp_path):
    """bench.int4_timeline's figures from a trace written by Mosaic GPU's own dump (two CTAs,
    two consumers and a producer each, 1000 MHz so a cycle is a nanosecond)."""
    import numpy as np
    from jax.experimental.mosaic.gpu import profiler

    from pallax.bench import int4_timeline as tl

    spec = profiler.ProfilerSpec(64, dump_path=str(tmp_path))
    B, E = spec.ENTER, spec.EXIT

    def consumer(shift):  # waits end at 1000 and 2100 cycles after the first event, ends at 3400
        ev = [("wait", B, 100), ("wait", E, 1100), ("math", B, 1101), ("math", E, 2101),
              ("wait", B, 2150), ("wait", E, 2200), ("math", B, 2201), ("math", E, 3201),
              ("flush", B, 3210), ("flush", E, 3400 + shift), ("drain", B, 3401 + shift),
              ("drain", E, 3500 + shift)]
        return [(spec.intern_name(n) | m, t) for n, m, t in ev]

    producer = [(spec.intern_name("issue") | m, t) for m, t in ((B, 50), (E, 250), (B, 300), (E, 500))]
    buf = np.zeros((2, 3, 64), np.uint32)
    for cta, start in enumerate((1000, 1500)):  # global timer at each CTA's entry, ns
        for wg, events in enumerate((consumer(0), consumer(100 * cta), producer)):
            buf[cta, wg, :3] = (start, cta, 2 * len(events))
            buf[cta, wg, 3:3 + 2 * len(events)] = np.ravel(events)
    path = tmp_path / "trace.json"
    with open(path, "w") as f:
        spec.dump(buf.reshape(-1), f, grid=(2, 1, 1), block=(384, 1, 1))

    s = tl.summarize(tl.traces(str(path)), traces_per_cta=3, consumers=2, mhz=1000.0)
    assert s["ctas"] == 2 and s["start_spread_us"] == pytest.approx(0.5)
    assert s["first_data_us"] == pytest.approx(1.0) and s["step_us"] == pytest.approx(1.1)
    assert s["cta_us"] == pytest.approx(3.4) and s["cta_max_us"] == pytest.approx(3.5)
    assert s["tail_us"] == pytest.approx(1.3) and s["span_us"] == pytest.approx(0.5 + 3.5)
    assert s["wait_frac"] == pytest.approx(np.mean([1050 / 3400] * 3 + [1050 / 3500]))
    tl.plot(str(path), str(tmp_path / "t.png"), consumers=2, mhz=1000.0)
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_dense_gemv_bench_times_every_layout_against_the_served_dot():
    """bench.dense_gemv on the tiny preset's projections: every spelling computes the served
    product (the transposed layout included) and gets a time."""
    import argparse

    from pallax.bench import dense_gemv as bench

    # m = 2: a step the transposed layout serves as row reductions; 5: one it serves as GEMMs
    args = argparse.Namespace(presets=["tiny"], ops=["qkv", "down"], m=[2, 5], variants=list(bench.VARIANTS),
                              min_bytes=1)
    records = bench.run(args)
    assert len(records) == 2 * 2 * len(bench.VARIANTS)
    assert {r["variant"] for r in records} == set(bench.VARIANTS)
    assert all(r["rel_err_vs_dot"] < 0.02 and r["us"] > 0 for r in records), records


def test_replay_candidates_accepts_the_longest_matching_draft():
    """A round accepts the longest prefix of y that one of its candidates matches, plus the
    target's own token; drafts stop one short of max_tokens; every candidate's tokens count as
    drafted."""
    from pallax.bench.speculative import replay, replay_candidates

    y = [5, 6, 7, 8, 9, 10]
    seen = []

    def propose(i, kk):
        seen.append((i, kk))
        return [[6, 0], [6, 7, 8][:kk]] if i == 1 else []

    r = replay_candidates(y, propose, k=3, max_tokens=6)
    # y[0] from prefill; round at 1 accepts 6, 7, 8 (+ 9 from the target); round at 5 has no drafts
    assert r == dict(tokens=6, rounds=3, verifications=1, drafted=5, accepted=3)
    assert seen == [(1, 3)]  # none at 5: no room for a draft before max_tokens
    assert replay([], y, lambda i, kk: [6, 7] if i == 1 else [], 3, 6) == dict(
        tokens=6, rounds=4, verifications=1, drafted=2, accepted=2)


def test_ngram_candidates_rank_longest_then_own_then_latest():
    """Candidates have distinct first tokens; a longer suffix match comes first, the request's own
    tokens before the corpus's at one length, later occurrences before earlier ones; a corpus
    continuation stops at its request's end."""
    from pallax.bench.speculative import ngram_candidates

    tokens = [1, 2, 3, 9, 2, 3, 8, 4, 2, 3]  # suffix (2, 3): own continuations 8 (latest), then 9
    corpus = [7, 1, 2, 3, 5, 6, -1, 3, 4, -1]  # (1, 2, 3) is not the suffix; (2, 3) -> 5 6; (3) -> 4
    got = ngram_candidates(tokens, corpus, k=3, n=4)
    assert got == [[8, 4, 2], [9, 2, 3], [5, 6], [4]]
    assert ngram_candidates(tokens, corpus, k=3, n=2) == [[8, 4, 2], [9, 2, 3]]
    assert ngram_candidates([4], [], k=2, n=3) == []


def test_replay_mode_matches_the_served_drafter(tmp_path):
    """bench.speculative replay on saved outputs: one candidate replays `NgramDrafter` with its
    corpus as the engine runs it (each prompt joins after its own replay); more candidates are
    verified rows of n * k + 1."""
    import json

    from pallax.bench import speculative as bench
    from pallax.decode.speculative import NgramDrafter

    prompts = [[1, 2, 3, 4, 1, 2], [9, 1, 2, 3], [5, 5, 5]]
    greedy = [[3, 4, 1, 2, 3, 4], [4, 1, 2, 3, 4, 7], [5, 5, 1, 2, 3]]
    src = tmp_path / "outs.json"
    src.write_text(json.dumps(dict(target="t", prompts=prompts, greedy=greedy)))
    out = tmp_path / "replay.jsonl"
    bench.main(["replay", "--replay", str(src), "--k", "4", "--candidates", "1", "2", "--max-tokens", "16",
                "--out", str(out)])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["candidates"], r["rows_per_verification"]) for r in recs] == [(1, 5), (2, 9)]
    drafter, rows = NgramDrafter(corpus_tokens=65536), []
    for p, y in zip(prompts, greedy):
        rows.append(bench.replay(p, y, lambda i, kk, p=p, y=y: drafter.lookup(p + y[:i], kk), 4, 16))
        drafter.remember(p + y)
    want = bench.summarize(rows)
    assert {key: recs[0][key] for key in want} == want
    assert recs[1]["tokens"] == want["tokens"] and recs[1]["rounds"] <= want["rounds"] + 1


def test_partial_sums_bench_switches_the_kernel():
    """bench.partial_sums's variants turn the residual norm kernel off and on, and set its
    num_warps (`norm` restores the defaults)."""
    from pallax.bench.partial_sums import use_variant
    from pallax.kernels_pallas import residual_norm as rn
    from pallax.kernels_pallas._matmul_common import PartialSums, StreamK

    y = PartialSums(jnp.zeros((2, 2, 8, 128), jnp.float32), 1, jnp.dtype(jnp.bfloat16), StreamK(4, 8, 3))
    try:
        for variant, on, warps in (("xla", False, 32), ("norm-w8", True, 8), ("norm", True, 32)):
            use_variant(variant)
            assert rn.supported(y) == on and rn.BlockSizes().num_warps == warps, variant
    finally:
        use_variant("norm")


def test_l2_prefetch_bench_sets_the_units():
    """bench.l2_prefetch's `pfN` sets how many units the int4 kernel prefetches (None restores the
    default); other names fail."""
    from pallax.bench.l2_prefetch import use_units
    from pallax.kernels_pallas import int4_matmul_mgpu as i4h

    default = i4h.PREFETCH_UNITS
    try:
        for variant, units in (("pf0", 0), ("pf3", 3), (None, default)):
            use_units(variant)
            assert i4h.PREFETCH_UNITS == units, variant
        with pytest.raises(ValueError, match="pfN"):
            use_units("norm")
    finally:
        use_units(None)


def test_decode_attention_bench_switches_the_engine_path():
    """bench.decode_attention's `split` sends the engine's pure-decode steps back to two kernels
    (`fused` and None restore the fused kernel): a decode PagedCache's attention then runs
    rope_kv_write and paged_attention; other names fail."""
    import jax
    import jax.numpy as jnp

    from pallax.bench.decode_attention import use_variant
    from pallax.decode import engine
    from pallax.decode.kv_cache import PagePool
    from pallax.kernels_pallas import dispatch
    from pallax.model.attention import QKV

    def kernels():
        pool = PagePool(*(jnp.zeros((1, 2, 4, 1, 32), jnp.bfloat16) for _ in "kv"))  # 1 layer
        cache = engine.PagedCache(pool, jnp.asarray([3, -1]), jnp.asarray([[0], [1]]), jnp.asarray([0, 1, 1]),
                                  jnp.asarray([4, 0]), jnp.asarray(1), decode=True)
        x = QKV(jnp.ones((1, 2, 4, 32), jnp.bfloat16), jnp.ones((1, 2, 16)), jnp.zeros((1, 2, 16)), 1)
        with dispatch.kernel_mode("interpret"):
            return str(jax.make_jaxpr(lambda x: cache.attend(None, x, None, state=pool, index=0)[0])(x))

    try:
        use_variant("split")
        assert "name=rope_kv_write" in kernels()
        for variant in ("fused", None):
            use_variant(variant)
            text = kernels()
            assert "name=decode_attention_bkv" in text and "name=rope_kv_write" not in text, variant
        with pytest.raises(ValueError, match="not one of"):
            use_variant("pf1")
    finally:
        use_variant(None)


def test_decode_attention_plot_reads_the_committed_records(tmp_path):
    """bench.decode_attention --plot draws the committed kernel-only and step records."""
    from pathlib import Path

    from pallax.bench.decode_attention import main

    results = Path(__file__).resolve().parent.parent / "bench" / "results"
    png = tmp_path / "plot.png"
    main(["--plot", str(results / "decode_attention_kernel_h200.jsonl"),
          str(results / "decode_attention_h200.jsonl"), str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partial_sums_plot_reads_the_committed_records(tmp_path):
    """bench.partial_sums --plot draws the committed int4 steps' records, a bar a variant, each
    stacked from the kernels it names (per layer: the step's times over Llama-3-8B's 32 layers)."""
    import json
    from pathlib import Path

    from pallax.bench.common import kernel_parts
    from pallax.bench.partial_sums import _PARTS, main

    results = Path(__file__).resolve().parent.parent / "bench" / "results" / "partial_sums_pieces_h200.jsonl"
    png = tmp_path / "plot.png"
    main(["--plot", str(results), str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [r for r in map(json.loads, results.open()) if "step_ms" in r and r["model"].endswith("int4+head")]
    parts = dict(kernel_parts(steps[0]["kernels_us"], _PARTS, 1 / 32))
    assert set(parts) == {label for _, label in _PARTS}
    norms = sum(v for k, v in steps[0]["kernels_us"].items() if k.startswith("residual_norm"))
    assert parts["residual add + norm (2)"] == norms / 32


def test_int4_read_floor_reads_every_byte_in_each_timed_call(monkeypatch):
    """bench.matmul's floor for the Hopper int4 kernel sums every word and scale (their bits) of
    each copy, and its reductions stay inside `device_time`'s loop (a read hoisted out of it
    would time nothing)."""
    import numpy as np

    from pallax.bench import common
    from pallax.bench import matmul as mb

    seen = {}

    def fake_device_time(fn, *args, **kw):
        seen["fn"], seen["args"] = fn, args
        return 1e-6

    monkeypatch.setattr(mb, "device_time", fake_device_time)
    key = jax.random.split(jax.random.key(0), 4)
    copies = [jax.random.randint(key[0], (2, 2, 8, 128), -2**31, 2**31 - 1, jnp.int32),
              jax.random.normal(key[1], (2, 128), jnp.bfloat16),
              jax.random.randint(key[2], (2, 2, 8, 128), -2**31, 2**31 - 1, jnp.int32),
              jax.random.normal(key[3], (2, 128), jnp.bfloat16)]
    rec = mb._read_floor(dict(k=256, n=128), copies, 2, 256 * 128 // 2, 1e12)
    assert rec["kind"] == "int4-read-xla" and rec["us"] == pytest.approx(0.5)  # a copy: 1 us / 2
    fn, args = seen["fn"], seen["args"]
    bits = lambda a: np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint16 if a.dtype == jnp.bfloat16  # noqa: E731
                                                             else jnp.uint32), np.uint64)
    expect = sum((int(bits(w).sum()) + int(bits(s).sum())) % 2**32  # a copy's uint32 total
                 for w, s in zip(copies[::2], copies[1::2]))
    assert int(np.float64(fn(*args))) == pytest.approx(expect, rel=1e-6)
    hlo = jax.jit(common._looped(fn, 3)).lower(args).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    assert " while(" in entry and "reduce" not in entry  # every reduction runs in the loop body


def test_fp8_plot_reads_the_committed_records(tmp_path):
    from pathlib import Path

    from pallax.bench import plot_fp8

    src = str(Path(__file__).resolve().parent.parent / "bench" / "results" / "matmul_fp8_h200.json")
    labels, series = plot_fp8.speedups(json.load(open(src))["records"])
    assert labels[0] == "8192^3" and "down\nM=512" in labels and len(labels) == 13
    assert set(series) == {"fp8-xla", "fp8-mgpu", "fp8-ours"}
    assert series["fp8-mgpu"][0] >= 1.5 and series["fp8-ours"][1:] == [0.0] * 12
    dst = tmp_path / "fp8.png"
    assert plot_fp8.main([src, str(dst)]) == 0 and dst.stat().st_size > 10_000
