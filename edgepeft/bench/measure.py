"""Benchmarks on real runtimes: speed, memory, quality and adapter swap, as JSON records.

One record per artifact x runtime x device x adapter (``None`` = the base alone). Metric
names follow llama-bench where they overlap (``pp`` and ``tg`` in tokens/s at
``--prompt-tokens`` / ``--gen-tokens``). Every timed metric runs ``repetitions`` times after
one warm-up and is reported as mean and stddev; tokenization and sampling are outside the
timed regions (``tg`` feeds fixed tokens, as llama-bench does).

``bw_util`` = tg tok/s x bytes read per token / memory bandwidth: how close decoding gets
to the memory-bound ceiling. Bytes per token are the weights a decode step reads (all
tensors but the embedding table, which is gathered one row at a time, plus the active
adapter); the bandwidth is measured here by read probes over a buffer the size of that
working set (256 MiB and larger: DRAM; smaller ones may sit in cache, whose bandwidth is then
the ceiling), recorded per record as ``bandwidth_gb_s``. The ceiling is the best read rate of four numpy
probes (:func:`measure_bandwidth`): for a working set in DRAM ``bw_util`` above 1 means the byte accounting
is wrong; a set that fits in cache can be read faster by llama.cpp's kernels than by numpy.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from edgepeft.bench.artifacts import bytes_per_token, check_fits, merged_adapters, task_template
from edgepeft.bench.config import DEFAULT_TEXT, BenchConfig
from edgepeft.bench.report import document
from edgepeft.errors import EdgepeftError
from edgepeft.profiles import DeviceProfile
from edgepeft.runtimes.base import FORMAT_RUNTIMES, RUNTIMES, Artifact, get_runtime
from edgepeft.ui import stage


# ------------------------------------------------------------------ measurements
def stats(values: list[float], digits: int = 3) -> dict:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(mean, digits), "std": round(std, digits), "n": len(values)}


DRAM_PROBE_MIB = 256  # measure_bandwidth's default buffer: far larger than any last-level cache


def working_set_bandwidth(nbytes: int, dram_gb_s: float) -> float:
    """The ceiling for a decode step reading ``nbytes``: a working set smaller than the DRAM probe may sit in
    cache, and then the cache's copy bandwidth is the bound (a 13 MB tiny model measured bw_util 1.2 against
    DRAM; 24 GB/s at 13 MiB vs 3.6 GB/s at 256 MiB on the shared CI box)."""
    mib = -(-int(nbytes) // (1 << 20))
    if mib >= DRAM_PROBE_MIB:
        return dram_gb_s
    return max(dram_gb_s, measure_bandwidth(mib=max(1, mib)))


def measure_bandwidth(mib: int = DRAM_PROBE_MIB, reps: int = 5) -> float:
    """Memory read bandwidth in GB/s over a buffer of ``mib`` MiB: the best of four probes, each the best of
    ``reps`` passes. A decode step reads its weights (a gemv), so the ceiling is what reading can reach:
    a copy (read + write bytes, one thread), a max and a float32 gemv over the buffer split across the
    cores (read, one thread each, numpy drops the GIL), and one gemv through numpy's BLAS (its own threads).
    The copy alone underestimated it: a 13 MiB working set in cache copies at 22 GB/s but gemv reads it
    at 78 (llama.cpp decoded a tiny model at bw_util 1.52 against the copy on this 2-core EPYC)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    nbytes = mib * (1 << 20)
    mat = np.ones((nbytes // 1024, 256), dtype=np.float32)  # touched pages, normal floats (no denormal slow path)
    words = mat.reshape(-1).view(np.uint64)
    dst = np.empty_like(words)
    vec = np.ones(256, dtype=np.float32)

    def best(fn) -> float:
        t_best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            t_best = min(t_best, time.perf_counter() - t)
        return t_best

    cores = max(1, os.cpu_count() or 1)
    parts, rows = np.array_split(words, cores), np.array_split(mat, cores)
    with ThreadPoolExecutor(cores) as pool:  # per core: BLAS may be held to one thread (OMP_NUM_THREADS=1)
        read_split = best(lambda: list(pool.map(np.max, parts)))
        gemv_split = best(lambda: list(pool.map(lambda m: m @ vec, rows)))
    probes = (2 * nbytes / best(lambda: np.copyto(dst, words)), nbytes / read_split, nbytes / gemv_split,
              nbytes / best(lambda: mat @ vec))
    return round(max(probes) / 1e9, 2)


class PeakRSS:
    """Peak resident memory of this process during a block (Linux resets the high-water mark)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.linux = True
        except OSError:
            self.linux = False
        return self

    def __exit__(self, *exc):
        self.mb = self.read()

    def read(self) -> float:
        if self.linux:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return round(int(line.split()[1]) / 1024, 1)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1 << 20 if sys.platform == "darwin" else 1024), 1)


def prompt_tokens(rt, n: int, text_file: Path | None) -> list[int]:
    text = text_file.read_text() if text_file else DEFAULT_TEXT.read_text()
    toks = rt.tokenize(text[: n * 12])
    while len(toks) < n:
        toks = toks + toks
    return toks[:n]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _speed_samples(rt, prompt: list[int], gen: list[int]) -> tuple[float, float]:
    """One pp and one tg sample in seconds: pp on a fresh KV cache with the whole prompt,
    tg as len(gen) single steps after one token."""
    rt.reset()
    t = _timed(lambda: (rt.prefill(prompt), rt.logits()))
    rt.reset()
    rt.prefill(prompt[:1])
    g = _timed(lambda: rt.decode(len(gen), tokens=gen))
    return t, g


def _speed_stats(prompt: list[int], cfg: BenchConfig, pp_s: list[float], tg_s: list[float]) -> dict:
    return {"ttft_ms": stats([s * 1e3 for s in pp_s]),
            "pp": {**stats([len(prompt) / s for s in pp_s], 2), "tokens": len(prompt)},
            "tg": {**stats([cfg.gen_tokens / s for s in tg_s], 2), "tokens": cfg.gen_tokens}}


def interleaved_speed(rt, prompt: list[int], cfg: BenchConfig, names: list[str | None]) -> dict:
    """Speed of each adapter (None = the base alone), measured interleaved: every repetition runs
    base, adapter 1, adapter 2, ... back to back, so a load change on a shared machine hits all of
    them alike. Repetition 0 of each is the warm-up.

    Returns ``{name: speed}``; every adapter's speed also carries ``adapter_tg_ratio`` and
    ``adapter_pp_ratio``: the median over repetitions of its tok/s over the base's tok/s in the
    same repetition (paired, not a ratio of means: pairs sit seconds apart, means minutes).
    """
    gen = [prompt[i % len(prompt)] for i in range(cfg.gen_tokens)]
    samples: dict = {n: ([], []) for n in names}
    for rep in range(cfg.repetitions + 1):
        for name in names:
            rt.set_adapter(name)
            t, g = _speed_samples(rt, prompt, gen)
            if rep:
                samples[name][0].append(t)
                samples[name][1].append(g)
    out = {n: _speed_stats(prompt, cfg, *samples[n]) for n in names}
    if None in samples:
        base_pp, base_tg = samples[None]
        for n in names:
            if n is not None:  # tok/s ratio = inverse time ratio
                pp, tg = samples[n]
                out[n]["adapter_pp_ratio"] = round(statistics.median(b / a for a, b in zip(pp, base_pp)), 4)
                out[n]["adapter_tg_ratio"] = round(statistics.median(b / a for a, b in zip(tg, base_tg)), 4)
    return out


def perplexity(rt, cfg: BenchConfig) -> dict | None:
    from edgepeft.calib import token_nll

    if cfg.ppl_file is None:
        return None
    toks = rt.tokenize(cfg.ppl_file.read_text())[: cfg.ppl_tokens + 1]
    nll, count = 0.0, 0
    for start in range(0, len(toks) - 1, cfg.ppl_ctx):
        chunk = toks[start: start + cfg.ppl_ctx + 1]
        if len(chunk) < 2:
            break
        rt.reset()
        rt.prefill(chunk[:-1], all_logits=True)
        nll += float(token_nll(rt.logits(), chunk[1:]).sum())
        count += len(chunk) - 1
    return {"ppl": round(math.exp(nll / count), 4), "tokens": count, "file": cfg.ppl_file.name}


def swap_times(rt, names: list[str], cycles: int) -> dict | None:
    """Median time to switch among the adapters and back to none, KV reset included."""
    if not names:
        return None
    order = [*names, None]
    rt.set_adapter(order[0])  # warm-up
    samples = []
    for _ in range(cycles):
        for name in order:
            samples.append(_timed(lambda n=name: rt.set_adapter(n)) * 1e3)
    return {"median": round(statistics.median(samples), 4), "mean": round(statistics.fmean(samples), 4),
            "n": len(samples), "order": [n or "none" for n in order]}


def top1_agreement(rt, tokens: list[int], ref_argmax) -> float | None:
    import numpy as np

    if ref_argmax is None:
        return None
    rt.reset()
    rt.prefill(tokens, all_logits=True)
    return round(float((rt.logits().argmax(axis=1) == np.asarray(ref_argmax)).mean()), 4)


def task_accuracy(rt, cfg: BenchConfig, tokenizer) -> dict | None:
    """Greedy exact match on ``cfg.task`` (bundled name or JSONL file), scored by :func:`edgepeft.evaluate.score_task`
    with the runtime loop; ``tokenizer`` is the artifact's own chat template (:func:`task_template`)."""
    if not cfg.task:
        return None
    from edgepeft import evaluate
    from edgepeft.train.tasks import get_task

    task = get_task(cfg.task)
    gen = evaluate.runtime_generate_batch(rt, task.max_new_tokens, evaluate.stop_markers(tokenizer),
                                          f"{Path(task.name).name} accuracy")
    return _task_record(evaluate.score_task(task, gen, tokenizer, limit=cfg.task_limit))


def _task_record(res: dict) -> dict:
    return {k: res[k] for k in ("task", "accuracy", "correct", "total")} | {"misses": res["misses"][:3]}


# ------------------------------------------------------------------ PyTorch reference
def measure_reference(cfg: BenchConfig, device_label: str = "local") -> dict:
    """The PyTorch fp32 reference, measured once: its own records (the same perplexity and task
    scoring as every artifact) and its top-1 tokens on the agreement text, per adapter (None = base).

    ``{"tokens": ids, "argmax": {name: ids}, "records": [...]}``; empty without ``cfg.reference``.
    """
    if not cfg.reference:
        return {}
    from edgepeft.bench.reference import TorchReference

    names = [None, *cfg.reference_adapters]
    with stage(f"PyTorch reference {cfg.reference} (fp32)", total=len(names), unit="adapters") as st:
        rt = TorchReference(cfg.reference, cfg.reference_adapters)
        try:
            tokens = prompt_tokens(rt, cfg.top1_tokens, cfg.ppl_file)
            argmax, records = {}, []
            for name in names:
                rt.set_adapter(name)
                rt.prefill(tokens, all_logits=True)
                argmax[name] = rt.logits().argmax(axis=1).tolist()
                records.append({
                    "artifact": f"pytorch:{cfg.reference}", "model_file": None, "format": "pytorch", "quant": "fp32",
                    "runtime": "pytorch", "providers": ["cpu"], "device": device_label, "profile": None,
                    "adapter": name or "none", "reference": True, "model_bytes": 0, "adapter_bytes": 0,
                    "load_ms": None, "check_ms": None, "ttft_ms": None, "pp": None, "tg": None, "swap_ms": None,
                    "perplexity": perplexity(rt, cfg), "accuracy": reference_accuracy(rt, cfg),
                    "top1_agree": 1.0, "adapter_tg_ratio": None, "adapter_pp_ratio": None, "bytes_per_token": None, "bandwidth_gb_s": None, "bw_util": None,
                    "peak_rss_mb": None})
                st.advance()
        finally:
            rt.close()
    return {"tokens": tokens, "argmax": argmax, "records": records}


def reference_accuracy(rt, cfg: BenchConfig) -> dict | None:
    """The task score of the PyTorch reference on the same examples, prompts and stopping rule as
    :func:`task_accuracy`, generated greedily in batches (transformers' generate): one token at a time
    in Python costs minutes on a CPU for what a batch does in seconds."""
    if not cfg.task:
        return None
    from edgepeft import evaluate
    from edgepeft.train.tasks import get_task

    task = get_task(cfg.task)
    gen = evaluate.hf_generate_batch(rt.model, rt.tokenizer, task.max_new_tokens)
    return _task_record(evaluate.score_task(task, gen, rt.tokenizer, limit=cfg.task_limit))


def reference_key(artifact: Artifact, adapter: str | None) -> str | None:
    """Which PyTorch reference a record is compared with: its adapter, or for a merged artifact
    the one adapter merged into it (several merged adapters have no single reference)."""
    if adapter is not None:
        return adapter
    merged = merged_adapters(artifact)
    return merged[0] if len(merged) == 1 else None if not merged else "+".join(merged)


# ------------------------------------------------------------------ one case
def run(artifacts: list[Artifact], runtimes: list[str], profile: DeviceProfile, cfg: BenchConfig,
        device_label: str = "local", reference: dict | None = None) -> dict:
    """The one benchmark loop (``edgepeft bench`` and the quickstart): fit checks for every case first,
    then bandwidth, the PyTorch reference (with ``cfg.reference``), then each artifact on each of its
    runtimes; returns the schema document (reference records first)."""
    plan = [(a, r) for a in artifacts for r in pick_runtimes(a, profile, list(runtimes))]
    for a, r in plan:  # refuse everything that cannot fit before spending minutes on the rest
        check_fits(a, profile, r, cfg.n_ctx)
    with stage(f"measure memory bandwidth on {profile.name} (read probes)"):
        gb_s = measure_bandwidth()
    bandwidth = {"bandwidth_gb_s": gb_s,
                 "bandwidth_source": "measured here: best read rate over 256 MiB of a numpy copy (read+write bytes), "
                                     "a per-core max and a BLAS gemv, best of 5 each",
                 "profile_bandwidth_gb_s": profile.bandwidth.gb_s}
    # before any case, so its memory is freed before RSS is measured; the quickstart passes its own
    ref = reference if reference is not None else measure_reference(cfg, device_label)
    records = list(ref.get("records", []))
    for a, r in plan:
        records += run_case(a, r, profile, cfg, gb_s, device_label, ref)
    return document(records, profile, cfg, bandwidth)


def run_case(artifact: Artifact, runtime: str, profile: DeviceProfile, cfg: BenchConfig,
             bandwidth_gb_s: float, device_label: str, ref_cache: dict | None = None) -> list[dict]:
    """All records for one artifact on one runtime: the base alone, then each adapter.

    ``ref_cache`` holds :func:`reference`'s result (filled here on first use when empty)."""
    check_fits(artifact, profile, runtime, cfg.n_ctx)
    tokenizer = task_template(artifact) if cfg.task else None
    names = list(artifact.adapters)
    merged = merged_adapters(artifact)
    if ref_cache is not None and cfg.reference and "argmax" not in ref_cache:
        ref_cache.update(measure_reference(cfg, device_label))
    ref = ref_cache or {}
    steps = ["speed", *(["perplexity"] if cfg.ppl_file else []), *(["accuracy"] if cfg.task else []),
             *(["top-1"] if ref else [])]
    with stage(f"bench {artifact.path} on {runtime}", total=(1 + len(names)) * len(steps), unit="steps") as st, \
            PeakRSS() as rss:
        rt = get_runtime(runtime)
        t = time.perf_counter()
        with stage("load"):
            rt.load(artifact, profile, n_ctx=cfg.n_ctx)  # fit checks read every file first: the page cache is warm
        total_ms = (time.perf_counter() - t) * 1e3
        try:
            prompt = prompt_tokens(rt, cfg.prompt_tokens, cfg.ppl_file)
            swap = swap_times(rt, names, cfg.swap_cycles)
            st.update(note="speed" + (", base and adapters interleaved" if names else ""))
            speeds = interleaved_speed(rt, prompt, cfg, [None, *names])
            st.advance(1 + len(names))
            records = []
            for name in [None, *names]:
                label = name or ("+".join(merged) + " merged" if merged else "base")
                rt.set_adapter(name)
                sp = speeds[name]
                ratios = {k: sp.pop(k, None) for k in ("adapter_tg_ratio", "adapter_pp_ratio")}
                bpt = bytes_per_token(artifact, name)
                st.update(note=f"{label}: perplexity")
                ppl = perplexity(rt, cfg)
                st.advance(1 if cfg.ppl_file else 0)
                st.update(note=f"{label}: {cfg.task and Path(cfg.task).name} accuracy")
                acc = task_accuracy(rt, cfg, tokenizer)
                st.advance(1 if cfg.task else 0)
                top1 = None
                if ref:
                    key = reference_key(artifact, name)
                    top1 = top1_agreement(rt, ref["tokens"], ref["argmax"].get(key)) if key in ref["argmax"] else None
                    st.advance()
                rec = {
                    "artifact": str(artifact.path), "model_file": _model_file(artifact), "format": artifact.format,
                    "quant": artifact.quant, "runtime": runtime, "providers": _providers(rt, profile, runtime),
                    "device": device_label, "profile": profile.name, "adapter": name or "none",
                    "merged_adapters": merged if name is None else [],
                    "model_bytes": artifact.model_bytes,
                    "adapter_bytes": artifact.adapter_bytes.get(name, 0) if name else 0,
                    "load_ms": round(rt.load_ms, 3), "check_ms": round(total_ms - rt.load_ms, 3), **sp,
                    # this adapter's tok/s over the base alone's, same run, interleaved (None for the base)
                    **ratios,
                    "swap_ms": swap,
                    "perplexity": ppl,
                    "accuracy": acc,
                    "top1_agree": top1,
                    "bytes_per_token": bpt,
                    "bandwidth_gb_s": (ceiling := working_set_bandwidth(bpt, bandwidth_gb_s)),
                    "bw_util": round(sp["tg"]["mean"] * bpt / (ceiling * 1e9), 4),
                }
                records.append(rec)
            st.update(note="")
        finally:
            rt.close()
    for rec in records:
        rec["peak_rss_mb"] = rss.mb
    return records


def _providers(rt, profile: DeviceProfile, runtime: str) -> list[str]:
    got = getattr(rt, "providers", None)
    return list(got) if got else list(profile.runtimes[runtime].providers)


def pick_runtimes(artifact: Artifact, profile: DeviceProfile, wanted: list[str]) -> list[str]:
    for r in wanted:
        if r not in RUNTIMES:
            raise EdgepeftError(f"unknown runtime {r!r}", f"Known runtimes: {', '.join(RUNTIMES)}")
    if wanted:
        return [r for r in wanted if r in FORMAT_RUNTIMES[artifact.format]] or [wanted[0]]
    for r in FORMAT_RUNTIMES[artifact.format]:
        if r in profile.runtimes:
            return [r]
    return [FORMAT_RUNTIMES[artifact.format][0]]


def _model_file(artifact) -> str:
    """The model's path as a user can open it: a bundle member under the bundle folder (the runtime
    was handed a verified descriptor); a member of a bundle .tar keeps its name inside the tar."""
    name = artifact.name_of(artifact.model)
    if artifact.model in artifact.names and artifact.path.is_dir():
        return str(artifact.path / name)
    return name
