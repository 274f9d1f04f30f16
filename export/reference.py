"""The verifier's PyTorch fp32 reference, computed layer by layer from the base's safetensors.

The checks (export/verify.py) need, per model variant and per fixed token sequence: the top-1
token at every position, the summed next-token NLL, and for float types the full logit rows.
Holding an fp32 model for that costs 4 bytes per parameter. Here transformers builds the model
with its parameters on the meta device (buffers such as rotary tables and Gemma's embedding
scale are real), and

1. the embedding rows the sequences use are read; the decoder's own ``forward`` runs once per
   batch of sequences with every decoder layer stubbed to record what it is called with (masks,
   rotary embeddings, whatever this architecture passes), so transformers still decides all
   but the weights;
2. layer by layer: its weights are read in fp32 with the adapters' ΔW added exactly as the
   export's reference defines them (the NF4 round trip first for the ``dequantized`` target, then
   every merged plan in order, then the variant's own adapter), the layer runs on every batch of
   every variant, and its weights go back to meta;
3. the final norm, then the output matrix in row chunks: each chunk's logits are reduced at
   once (running argmax and log-sum-exp, the target logits, the rows the checks keep).

Resident: one decoder layer in fp32, one chunk of the output matrix, the activations and the
kept rows. Reads are plain ``pread`` s (``TensorEntry``), so no page of the weight files stays in
this process. Sequences are right-padded into a few batches: under a causal mask a position
never sees the padding after it, so every kept logit is the unpadded sequence's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgepeft.export.plan import AdapterPlan
    from edgepeft.models import ResolvedBase

HEAD_CHUNK_BYTES = 8 << 20  # fp32 bytes of output-matrix rows per step (vocab chunk)
PAD_SLACK = 1.3  # a batch computes at most this many padded positions per real one


@dataclass
class SeqStats:
    """What the checks read of one sequence's logits (reference or runtime)."""

    argmax: np.ndarray  # (n,) top-1 token per position (first maximum, as numpy's argmax)
    nll: float  # summed -log p(ids[t+1] | ids[:t+1]), t < n-1, in float64
    vocab: int
    rows: np.ndarray | None = None  # (n, vocab) float32, where max |Δlogit| is checked


class Reducer:
    """Argmax, log-sum-exp and target logits of (n, vocab) logits fed in vocabulary chunks."""

    def __init__(self, ids: Sequence[int], vocab: int, keep_rows: bool, nll: bool = True):
        n = len(ids)
        self.ids, self.vocab, self.want_nll = np.asarray(ids), vocab, nll
        self.best = np.full(n, -np.inf, np.float64)
        self.arg = np.zeros(n, np.int64)
        self.m = np.full(n, -np.inf, np.float64)
        self.s = np.zeros(n, np.float64)
        self.target = np.zeros(max(n - 1, 0), np.float64)
        self.rows = np.empty((n, vocab), np.float32) if keep_rows else None

    def add(self, c0: int, chunk: np.ndarray) -> None:
        k = chunk.shape[1]
        if self.rows is not None:
            self.rows[:, c0:c0 + k] = chunk
        x = chunk.astype(np.float64)
        a = x.argmax(-1)
        v = x[np.arange(len(x)), a]
        better = ~(v <= self.best)  # strictly greater keeps the first maximum; a NaN wins, as in argmax
        self.arg[better], self.best[better] = a[better] + c0, v[better]
        if not self.want_nll:
            return
        mx = x.max(-1)
        new_m = np.maximum(self.m, mx)
        with np.errstate(invalid="ignore", over="ignore"):
            self.s = self.s * np.exp(self.m - new_m) + np.exp(x - new_m[:, None]).sum(-1)
        self.m = new_m
        tgt = self.ids[1:]
        inside = (tgt >= c0) & (tgt < c0 + k)
        rows = np.nonzero(inside)[0]
        self.target[rows] = x[rows, tgt[rows] - c0]

    def result(self) -> SeqStats:
        if not self.want_nll:
            return SeqStats(self.arg, 0.0, self.vocab, self.rows)
        lse = self.m[:-1] + np.log(self.s[:-1])
        return SeqStats(self.arg, float((lse - self.target).sum()), self.vocab, self.rows)


def stats(logits: np.ndarray, ids: Sequence[int], keep_rows: bool, nll: bool = True) -> SeqStats:
    """SeqStats of full (len(ids), vocab) logits (the runtime side)."""
    r = Reducer(ids, logits.shape[1], keep_rows, nll)
    r.add(0, np.asarray(logits, dtype=np.float32))
    return r.result()


# ------------------------------------------------------------------ weights
def delta(m):
    """s·B·A written out here, not through the writers' helpers, so a writer's wrong scale cannot hide."""
    return m.scale * (m.b.float() @ m.a.float())


def _row_delta(m, rows):
    return m.scale * (m.b.float()[rows] @ m.a.float())


def _by_weight(plans: Sequence[AdapterPlan]) -> dict[str, list]:
    out: dict[str, list] = {}
    for plan in plans:
        for t, m in plan.modules.items():
            out.setdefault(t + ".weight", []).append(m)
    return out


_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class Weights:
    """fp32 tensors of the reference model by safetensors name: the base's bytes (read, not mapped),
    the NF4 round trip where the ``dequantized`` target asks for it, then every merged plan's ΔW."""

    def __init__(self, base: ResolvedBase, merged: Sequence[AdapterPlan], target: str):
        self.entries = {t.name: t for t in base.tensors()}
        self.deltas = _by_weight(merged)
        self.target = target

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _tensor(self, buf, dtype: str, shape):
        import torch

        if dtype not in _TORCH_DTYPES:
            from edgepeft.errors import EdgepeftError

            raise EdgepeftError(f"the reference reads float weights; {dtype} found", "Save the base in a float type")
        return torch.frombuffer(buf, dtype=getattr(torch, _TORCH_DTYPES[dtype])).reshape(shape).float()

    def get(self, name: str):
        from edgepeft.export.merge import is_nf4_quantized, nf4_round_trip

        e = self.entries[name]
        w = self._tensor(e.read(), e.dtype, e.shape)
        if self.target == "dequantized" and is_nf4_quantized(name, tuple(e.shape)):
            w = nf4_round_trip(w)
        for m in self.deltas.get(name, ()):
            w.add_(delta(m))
        return w

    def rows(self, name: str, rows: np.ndarray, extra: Sequence = ()):
        """Rows ``rows`` (sorted, unique) of a 2-D weight; ``extra`` modules' ΔW rows added after the merged ones.

        Never the NF4 target: embeddings and the output matrix are not quantized in QLoRA training."""
        e = self.entries[name]
        width = int(np.prod(e.shape[1:]))
        item = (e.end - e.start) // max(e.numel, 1)
        buf = bytearray(len(rows) * width * item)
        view = memoryview(buf)
        fd = os.open(e.file, os.O_RDONLY)
        try:
            at = 0
            for lo, hi in _runs(rows):  # one read per run of consecutive rows
                n = (hi - lo) * width * item
                if os.preadv(fd, [view[at:at + n]], e.start + lo * width * item) != n:
                    from edgepeft.errors import IntegrityError

                    raise IntegrityError(f"{e.file} ends inside tensor {name}", "The file is truncated")
                at += n
        finally:
            os.close(fd)
        w = self._tensor(buf, e.dtype, (len(rows), *e.shape[1:]))
        for m in (*self.deltas.get(name, ()), *extra):
            w.add_(_row_delta(m, rows))
        return w


def _runs(rows: np.ndarray):
    start = prev = int(rows[0])
    for r in rows[1:]:
        r = int(r)
        if r != prev + 1:
            yield start, prev + 1
            start = r
        prev = r
    yield start, prev + 1


# ------------------------------------------------------------------ the model, on meta
def _skeleton(base: ResolvedBase):
    """transformers' model for ``base``: parameters on meta, buffers computed as its __init__ does."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base.path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _assign(module, tensors: dict) -> None:
    module.load_state_dict(tensors, strict=True, assign=True)


def _release(module) -> None:
    import torch

    _assign(module, {n: torch.empty(p.shape, device="meta") for n, p in module.named_parameters()})


class _Stop(Exception):
    pass


def _capture(decoder, layers, input_ids, tuple_out: bool):
    """Run the decoder's forward with every layer stubbed: (embeddings, [(args, kwargs) per layer])."""
    calls: list = []

    def stub(i):
        def forward(hidden_states, *args, **kwargs):
            calls.append((hidden_states, args, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return (hidden_states,) if tuple_out else hidden_states

        return forward

    for i, layer in enumerate(layers):
        layer.forward = stub(i)
    try:
        decoder(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for layer in layers:
            del layer.forward
    h0 = calls[0][0]
    if any(c[0] is not h0 for c in calls):  # the model did not pass our output on as the next input
        return None
    return h0, [(a, k) for _, a, k in calls]


def pad_batches(lengths: Sequence[int], budget: int | None = None) -> list[list[int]]:
    """Indices of sequences of ``lengths`` grouped longest first (ties in index order) so a group's padding adds
    at most PAD_SLACK x its real positions and, with ``budget``, a group holds at most that many padded ones.
    The reference and the importance matrix (``importance_sums``) batch their texts with it."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        padded = lengths[g[0]] * (len(g) + 1) if g else 0
        if g and (budget is None or padded <= budget) and \
                padded <= PAD_SLACK * (sum(lengths[j] for j in g) + lengths[i]):
            g.append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class _Batch:
    index: list[int]  # into the sequences
    lengths: list[int]
    calls: list  # (args, kwargs) per decoder layer
    hidden: dict  # variant -> (b, L, hidden) fp32


def _plus(w, mods, rows=None):
    """w + each module's ΔW in turn (the rows ``rows`` of it), as a new tensor; ``w`` itself when none."""
    for m in mods:
        w = w + (delta(m) if rows is None else _row_delta(m, rows))
    return w


def _module_names(model) -> tuple[str, str, bool]:
    """(input embedding weight, output matrix weight, tied) as transformers names them."""
    where = {m: n for n, m in model.named_modules()}
    emb = where[model.get_input_embeddings()] + ".weight"
    out = model.get_output_embeddings()
    tied_keys = getattr(model, "all_tied_weights_keys", None)  # transformers 5; before, tying shares the tensor
    tied = (where[out] + ".weight") in tied_keys if tied_keys is not None else out.weight is model.get_input_embeddings().weight
    return emb, where[out] + ".weight", tied


@dataclass
class _Parts:
    """The meta-device model and the names both streamed forwards (reference, importance matrix) use."""

    model: object
    decoder: object
    prefix: str  # the decoder's module path + "." ("model.")
    embed: object
    embed_name: str
    out_name: str
    tied: bool
    names: list[str]  # every parameter the weights must hold (the tied output matrix once)


def _parts(base: ResolvedBase, W: Weights) -> _Parts:
    """transformers' model for ``base`` on meta; one line if its safetensors lack a tensor the model expects."""
    model = _skeleton(base)
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    embed_name, out_name, tied = _module_names(model)
    names = [n for n, _ in model.named_parameters() if not (tied and n == out_name)]
    missing = [n for n in names if n not in W]
    if missing:
        from edgepeft.errors import EdgepeftError

        raise EdgepeftError(f"base {base.spec}: its safetensors hold no tensor {missing[0]}, which transformers' "
                            f"{type(model).__name__} expects", "Re-save the base with save_pretrained")
    embed = model.get_input_embeddings()
    embed.padding_idx = None  # forward only: the gathered rows are fewer than the vocabulary
    return _Parts(model, decoder, prefix + "." if prefix else "", embed, embed_name, out_name, tied, names)


def _padded_ids(seqs: Sequence[Sequence[int]], idx: list[int]):
    """(lengths, unique token ids, the right-padded batch as indices into them) of the sequences ``idx``."""
    import torch

    lengths = [len(seqs[i]) for i in idx]
    ids = np.zeros((len(idx), max(lengths)), np.int64)
    for r, i in enumerate(idx):
        ids[r, :lengths[r]] = seqs[i]
    uniq, inv = np.unique(ids, return_inverse=True)
    return lengths, uniq, torch.from_numpy(inv.reshape(ids.shape))


def _layer_inputs(p: _Parts, rows, inv):
    """(embeddings, (args, kwargs) per decoder layer) of the batch ``inv`` with ``rows`` as the embedding table."""
    import torch

    p.embed.weight = torch.nn.Parameter(rows, requires_grad=False)
    layers = p.decoder.layers
    return _capture(p.decoder, layers, inv, tuple_out=False) or _capture(p.decoder, layers, inv, tuple_out=True)


def reference_stats(base: ResolvedBase, merged: Sequence[AdapterPlan], merge_target: str,
                    adapters: dict[str, AdapterPlan], variants: Sequence[str | None], seqs: Sequence[Sequence[int]],
                    keep_rows: Sequence[bool], nll: Sequence[bool], step: Callable[[], None] = lambda: None,
                    only: Sequence[Sequence[str | None] | None] | None = None) -> dict[str | None, list[SeqStats]]:
    """Per variant (None: the model with ``merged`` folded in; a name: that adapter on top), SeqStats per sequence.

    ``only``: per sequence, the variants that need it (None: every variant); the others skip it, and its
    entry in their list is None (an adapter's task examples are never run on the base alone).
    ``step`` is called before each layer and each output chunk (the child process adjusts its threads there)."""
    import torch

    W = Weights(base, merged, merge_target)
    p = _parts(base, W)
    model, decoder, prefix, embed_name = p.model, p.decoder, p.prefix, p.embed_name
    layers = decoder.layers
    head_name = embed_name if p.tied else p.out_name
    # a variant's adapters: one plan, or a list of them (verify.BARE: the merged plans negated)
    own = {v: (_by_weight(adapters[v] if isinstance(adapters[v], list) else [adapters[v]]) if v else {})
           for v in variants}

    with torch.no_grad():
        # --- 1. the layers' inputs, per batch (and per variant where an adapter changes the embedding)
        small = {n.removeprefix(prefix): W.get(n) for n in p.names
                 if n.startswith(prefix) and not n.startswith(prefix + "layers.") and n != embed_name}
        decoder.load_state_dict(small, strict=False, assign=True)  # the final norm (and any other small tensor)
        groups: dict[tuple, list[int]] = {}  # the variants that need a sequence -> those sequences (batched apart)
        for k in range(len(seqs)):
            need = variants if only is None or only[k] is None else [v for v in variants if v in only[k]]
            groups.setdefault(tuple(need), []).append(k)
        batches = []
        for need, members in groups.items():
            for group in pad_batches([len(seqs[k]) for k in members]):
                idx = [members[j] for j in group]
                lengths, uniq, inv = _padded_ids(seqs, idx)
                hidden, calls = {}, None
                for v in need:
                    hidden[v], calls = _layer_inputs(p, W.rows(embed_name, uniq, own[v].get(embed_name, ())), inv)
                batches.append(_Batch(idx, lengths, calls, hidden))
        _release(p.embed)

        # --- 2. layer by layer
        for i, layer in enumerate(layers):
            step()
            lp = f"{prefix}layers.{i}."
            sd = {n: W.get(lp + n) for n, _ in layer.named_parameters()}
            for v in variants:
                _assign(layer, {n: _plus(w, own[v].get(lp + n, ())) for n, w in sd.items()})
                for b in batches:
                    if v not in b.hidden:
                        continue
                    args, kwargs = b.calls[i]
                    out = layer(b.hidden[v], *args, **kwargs)
                    b.hidden[v] = out[0] if isinstance(out, tuple) else out
            _release(layer)
            del sd

        # --- 3. the final norm, then the output matrix in row chunks
        flat, spans = {}, {}  # variant -> (positions, hidden); variant -> [(sequence index, its first row in flat)]
        for v in variants:
            parts, at, spans[v] = [], 0, []
            for b in batches:
                if v not in b.hidden:
                    continue
                h = decoder.norm(b.hidden[v])
                for r, (i, n) in enumerate(zip(b.index, b.lengths)):
                    parts.append(h[r, :n])
                    spans[v].append((i, at))
                    at += n
            flat[v] = torch.cat(parts)
        vocab, width = (int(d) for d in W.entries[head_name].shape)
        red = {v: [None] * len(seqs) for v in variants}
        for v in variants:
            for i, _ in spans[v]:
                red[v][i] = Reducer(seqs[i], vocab, keep_rows[i], nll[i])
        cap = getattr(model.config, "final_logit_softcapping", None)
        per = max(1024, HEAD_CHUNK_BYTES // (4 * width))
        for c0 in range(0, vocab, per):
            step()
            rows = np.arange(c0, min(vocab, c0 + per))
            w = W.rows(head_name, rows)
            for v in variants:
                logits = flat[v] @ _plus(w, own[v].get(head_name, ()), rows).T
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                logits = logits.numpy()
                for i, at in spans[v]:
                    red[v][i].add(c0, logits[at:at + len(seqs[i])])
            del w
    return {v: [r.result() if r is not None else None for r in red[v]] for v in variants}


# ------------------------------------------------------------------ the importance matrix, streamed the same way
def importance_sums(base: ResolvedBase, passes: Sequence[tuple[Sequence[AdapterPlan], Sequence[Sequence[int]], str]],
                    names: dict[str, str], budget: int, bf16: bool = False,
                    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Sum of x_j² per input column j and the token count at every linear in ``names`` (HF module path ->
    key), over each pass's token lists run through ``base`` with that pass's plans added (into its target).

    The forward is the reference's: one decoder layer in fp32 at a time, the embedding rows the texts
    use, right-padded batches of at most ``budget`` positions; padded positions are dropped before the
    sums. Nothing past the last layer runs (the final norm and the output matrix feed no listed linear).
    ``bf16``: the layers' matmuls under bf16 autocast (norms, residuals and the sums stay fp32)."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    real: list = [None]  # flat indices of the current batch's real positions

    def hook(key: str):
        def pre(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).index_select(0, real[0])
            s = torch.square(x.float()).sum(0, dtype=torch.float64)
            sums[key] = sums[key] + s if key in sums else s
            counts[key] = counts.get(key, 0) + x.shape[0]
        return pre

    with torch.no_grad():
        for plans, seqs, target in passes:
            W = Weights(base, plans, target)
            p = _parts(base, W)
            seqs = [list(x) for x in seqs if len(x)]
            batches = []  # (batch, flat indices of its real positions)
            for idx in pad_batches([len(x) for x in seqs], budget):
                lengths, uniq, inv = _padded_ids(seqs, idx)
                hidden, calls = _layer_inputs(p, W.rows(p.embed_name, uniq), inv)
                keep = np.arange(inv.shape[1])[None, :] < np.array(lengths)[:, None]
                batches.append((_Batch(idx, lengths, calls, {None: hidden}), torch.from_numpy(np.flatnonzero(keep))))
            _release(p.embed)
            for i, layer in enumerate(p.decoder.layers):
                lp = f"{p.prefix}layers.{i}."
                _assign(layer, {n: W.get(lp + n) for n, _ in layer.named_parameters()})
                handles = [layer.get_submodule(path.removeprefix(lp)).register_forward_pre_hook(hook(key))
                           for path, key in names.items() if path.startswith(lp)]
                try:
                    for b, keep in batches:
                        real[0] = keep
                        args, kwargs = b.calls[i]
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                            out = layer(b.hidden[None], *args, **kwargs)
                        b.hidden[None] = (out[0] if isinstance(out, tuple) else out).float()
                finally:
                    for h in handles:
                        h.remove()
                _release(layer)
    return {k: v.numpy() for k, v in sums.items()}, counts


# ------------------------------------------------------------------ the child process verify.py starts
class _FastTokenizer:
    """``tokenizers`` on the effective tokenizer.json, called the way verify calls a transformers tokenizer."""

    def __init__(self, text: str, bos: str | None):
        from tokenizers import Tokenizer

        self.tk = Tokenizer.from_str(text)
        self.bos_token_id = self.tk.token_to_id(bos) if bos else None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.tk.encode(text, add_special_tokens=add_special_tokens).ids}


class LazyTokenizer:
    """The base's tokenizer as verify calls it: a plain ``tok(text, add_special_tokens=...)`` (and
    ``bos_token_id``) goes through ``_FastTokenizer`` on the cached effective tokenizer.json where an earlier
    export stored one (the ids AutoTokenizer gives); anything else (a chat template, a special token's name)
    loads AutoTokenizer, once.

    The reference child tokenizes its fixed texts with it (``fixed_ids``: 0.3 CPU-s where AutoTokenizer costs
    2.3 on smollm2-135m), and so does the export process for the importance matrix's calibration text, which
    then imports neither transformers nor torch for the bundled text: 4.5 s of a verified Q4_K_M export of
    smollm2-135m, spent before its first byte was written."""

    def __init__(self, base: ResolvedBase):
        self._base, self._fast, self._full = base, None, None

    def _fast_path(self) -> _FastTokenizer | None:
        if self._full is None and self._fast is None:
            from edgepeft.export.gguf_tokenizer import cached_tokenizer_text

            cached = cached_tokenizer_text(self._base.path)
            self._fast = _FastTokenizer(cached, _bos_token(self._base.path)) if cached is not None else False
        return self._fast or None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return (self._fast_path() or self.full)(text, add_special_tokens=add_special_tokens)

    @property
    def bos_token_id(self) -> int | None:
        fast = self._fast_path()
        return fast.bos_token_id if fast else getattr(self.full, "bos_token_id", None)

    @property
    def full(self):
        if self._full is None:
            self._full = self._base.load_tokenizer()
        return self._full

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.full, name)


def _bos_token(folder) -> str | None:
    import json

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            bos = json.loads((folder / name).read_text(encoding="utf-8")).get("bos_token")
        except (OSError, ValueError):
            continue
        if isinstance(bos, dict):
            bos = bos.get("content")
        if isinstance(bos, str):
            return bos
    return None


def fixed_ids(base: ResolvedBase, tasks: dict | None = None) -> tuple[list, list, int | None, dict]:
    """(prompt ids, held-out ids, BOS id, task ids) as transformers' tokenizer gives them (``LazyTokenizer``:
    through ``tokenizers`` on the GGUF writer's cached effective tokenizer.json when one is on disk).

    ``tasks``: variant -> (prompt, completion) pairs (``verify.task_pairs``); task ids are, per variant,
    ``(ids, n_ctx)`` with the prompt's ids first, as ``edgepeft.calib.completion_nll`` builds them.
    """
    from edgepeft.export.verify import PROMPTS, _ids, held_out_ids, task_ids

    tok = LazyTokenizer(base)
    task = {v: task_ids(tok, pairs) for v, pairs in (tasks or {}).items()}
    return [_ids(tok, p) for p in PROMPTS], held_out_ids(tok), tok.bos_token_id, task


def sequences(prompts: list, held: list, task: dict) -> list:
    """Every sequence both sides run, in order: the fixed prompts, the held-out chunks, each variant's task ids."""
    return prompts + held + [ids for v in task for ids, _ in task[v]]


def _serve(request_file: str) -> None:
    """Read the pickled request; send ("ids", prompts, held, bos, task) then ("stats", {variant: [SeqStats]}),
    pickled, on the original stdout (anything printed goes to stderr); ("error", ...) on a failure.

    Threads: the idle cores but one (left to the export's writer and quantizer) until the parent
    closes this process's stdin, which it does when it only waits for the result; then the idle
    cores (``verify.free_cores``: on a saturated machine, one thread is several times faster)."""
    import pickle
    import select
    import sys

    import torch

    from edgepeft.export.verify import free_cores

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    full = torch.get_num_threads()
    torch.set_num_threads(max(1, min(full, free_cores() - 1)))
    waiting = [False]

    def step():
        if not waiting[0] and select.select([sys.stdin], [], [], 0)[0]:  # stdin closed: the parent waits
            waiting[0] = True
            torch.set_num_threads(max(1, min(full, torch.get_num_threads() + free_cores())))

    try:
        with open(request_file, "rb") as f:
            req = pickle.load(f)  # pickle-ok: own child process (the parent wrote it: O_EXCL, 0600)
        imx = req.get("imatrix")
        if imx is None:
            _fixed_mmap_threshold()
        else:  # first: the export's quantizer waits for it (edgepeft.imatrix.matrix_request)
            torch.set_num_threads(max(1, min(full, free_cores())))
            pickle.dump(("matrix", *importance_sums(imx["base"], imx["passes"], imx["names"], imx["budget"],
                                                    bf16=imx["bf16"])), out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
            if "base" not in req:
                return
            torch.set_num_threads(max(1, min(full, free_cores() - 1)))
        prompts, held, bos, task = fixed_ids(req["base"], req.get("tasks"))
        pickle.dump(("ids", prompts, held, bos, task), out)
        out.flush()
        seqs, n, m = sequences(prompts, held, task), len(prompts), len(prompts) + len(held)
        stats = reference_stats(req["base"], req["merged"], req["merge_target"], req["adapters"], req["variants"],
                                seqs, keep_rows=[req["keep_rows"] and k < n for k in range(len(seqs))],
                                nll=[n <= k < m for k in range(len(seqs))], step=step,
                                only=[None] * m + [(v,) for v in task for _ in task[v]])
        pickle.dump(("stats", stats), out, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 -- reported to the parent, which raises it
        import traceback

        traceback.print_exc(file=sys.stderr)
        pickle.dump(("error", type(e).__name__, getattr(e, "problem", str(e)), getattr(e, "fix", None)), out)
    out.flush()


def _fixed_mmap_threshold() -> None:
    """glibc's sliding mmap threshold keeps each freed layer's blocks in the heap (+60 MiB RSS); fix it at
    1 MiB. Not for the importance matrix: its batches of 2048 positions then fault in fresh pages for every
    op (16 s of system time on smollm2-135m). What MALLOC_MMAP_THRESHOLD_ does, set once the request is read."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its own allocator
        pass


def _preload(model_type: str | None) -> None:
    """What every request needs, imported before the request arrives (``verify.prestart``): torch,
    transformers, and the configuration and modeling modules of ``model_type`` (importing them was 40 % of
    the child's start-up for smollm2-135m, profiled). A model type transformers does not map is left to the
    request, which reports it."""
    import accelerate  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    if model_type:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        try:
            AutoModelForCausalLM._model_mapping[CONFIG_MAPPING[model_type]]
        except (KeyError, ImportError, AttributeError, ValueError):
            pass


def _request_path() -> str | None:
    """One line on stdin, read unbuffered (``_serve`` then watches stdin for its close); None at EOF."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            return None
        line += byte
    return line[:-1].decode()


if __name__ == "__main__":
    import sys

    from edgepeft.export import reference  # by its package name, so SeqStats unpickles in the parent

    path = sys.argv[1]
    if path == "-":  # started ahead of its request: import now, then wait for the request's path
        reference._preload(sys.argv[2] if len(sys.argv) > 2 else None)
        path = reference._request_path()
    if path is not None:
        reference._serve(path)
    # the parent waits for this exit: skip the interpreter's teardown of torch and transformers (1.3 s
    # of the 4.8 s verification of a tiny model, measured); the result is flushed, nothing else is owed
    sys.stderr.flush()
    os._exit(0)
