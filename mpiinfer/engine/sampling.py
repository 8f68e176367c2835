"""Token selection from logits: logit bias and penalties, greedy, temperature, top-k, top-p, per-request seeds.

Owns: turning one step's float32 logits (S, vocab) into S token ids and their
logprobs.  Every sampled request has its own ``torch.Generator`` seeded from its
seed and draws exactly one sample per step, so its tokens do not depend on what
else is in the batch.  Greedy rows are an argmax over the whole batch at once.
Rows whose request asks for ``logit_bias`` or a penalty are processed first, in
vLLM's order (``process_logits``): bias, repetition penalty over prompt and
output tokens (Hugging Face's ``RepetitionPenaltyLogitsProcessor``), frequency and
presence penalties over output tokens (OpenAI's formula).  A structured-output constraint's mask of
allowed tokens comes before all of it.  Logprobs are those of
the model's own distribution (log-softmax of the raw logits), whatever the
temperature or processing (vLLM's default ``raw_logprobs``).
"""
from __future__ import annotations

import torch

from .. import native


def make_generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def filter_logits(x: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits of one row after temperature, top-k and top-p (disallowed tokens -> -inf)."""
    x = x / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
        drop = (cum - torch.softmax(sorted_x, dim=-1)) >= top_p
        drop[0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def process_logits(x: torch.Tensor, p, prompt: list, out: list, ends: frozenset = frozenset()) -> torch.Tensor:
    """One row's logits (vocab,) after ``p``'s logit bias and penalties (a new tensor; ``x`` is not changed).
    ``prompt`` / ``out``: the sequence's prompt and generated token ids so far; ``ends``: the tokens that would
    end it (end-of-sequence and stop_token_ids), forbidden while it has fewer than ``p.min_tokens``."""
    x = x.clone()
    V = x.shape[0]
    if len(out) < p.min_tokens and ends:
        x[torch.tensor([t for t in ends if t < V], dtype=torch.int64, device=x.device)] = float("-inf")
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias if t < V], dtype=torch.int64, device=x.device)
        x.index_add_(0, ids, torch.tensor([b for t, b in p.logit_bias if t < V], dtype=x.dtype, device=x.device))
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(list(prompt) + list(out), dtype=torch.int64, device=x.device).unique()
        v = x[seen]
        x[seen] = torch.where(v < 0, v * p.repetition_penalty, v / p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and out:
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64, device=x.device), minlength=V)[:V].to(x.dtype)
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    return x


def sample(logits: torch.Tensor, params: list, generators: list, want_logprobs: list, histories: list | None = None,
           allowed: tuple | None = None):
    """Choose one token per row. Returns (token_ids list, logprobs list with None where not wanted, top list with
    None where not wanted, else the row's ``top_logprobs`` most likely [token id, logprob] pairs, most likely first).
    ``histories[i]``: (prompt ids, output ids[, ending tokens]) of row i, needed where its params process logits.  ``allowed``:
    (row indices, (R, vocab) float32 of 0 / -inf): what structured-output constraints allow in those rows, added to
    their logits before anything else (the logprobs stay the model's own)."""
    S = logits.shape[0]
    masked = {}
    # greedy for every row (overwritten below where a row samples or is constrained); on CPU one pass in C that
    # also gives the log-softmax normalisers where logprobs are wanted (torch.argmax and log_softmax over a
    # (256, 49152) step took 7.4 and 17.7 ms on 2 threads, the kernel 1.5 / 2.5 ms)
    stats = native.logit_stats(logits, norms=any(want_logprobs))
    tokens = stats.tokens if stats is not None else torch.argmax(logits, dim=-1)
    if allowed is not None and len(allowed[0]):
        idx, bias = allowed
        dev = logits.device
        rows = logits[torch.tensor(idx, device=dev)] + bias
        masked = dict(zip(idx, rows))
        plain = [j for j, i in enumerate(idx) if params[i].temperature <= 0 and not params[i].processes_logits]
        if plain:                                       # greedy rows with nothing else to do: one argmax
            tokens[torch.tensor([idx[j] for j in plain], device=dev)] = torch.argmax(rows[plain], dim=-1)
    for i in range(S):
        p = params[i]
        if p.temperature <= 0 and not p.processes_logits:
            continue
        row = masked.get(i, logits[i])
        if p.processes_logits:
            row = process_logits(row, p, *histories[i])
            if p.temperature <= 0:
                tokens[i] = torch.argmax(row)
        if p.temperature > 0:
            x = filter_logits(row, p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(x, dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    lp = [None] * S
    top = [None] * S
    rows = [i for i in range(S) if want_logprobs[i]]
    if rows:
        r = torch.tensor(rows, device=logits.device)
        k = max(params[i].top_logprobs for i in rows)
        if stats is not None:           # log_softmax's (x - max) - log(sum(exp(x - max))), only where wanted
            mx, ls = stats.mx[r], stats.ls[r]
            chosen = (logits[r, tokens[r]].float() - mx) - ls
            if k:
                vals, ids = torch.topk(logits[r].float(), k, dim=-1)
                vals = (vals - mx[:, None]) - ls[:, None]
        else:
            logp = torch.log_softmax(logits[r].float(), dim=-1)
            chosen = logp.gather(1, tokens[r][:, None])[:, 0]
            if k:
                vals, ids = torch.topk(logp, k, dim=-1)
        for j, v in zip(rows, chosen.tolist()):
            lp[j] = v
        if k:
            vals, ids = vals.tolist(), ids.tolist()
            for n, j in enumerate(rows):
                kj = params[j].top_logprobs
                if kj:
                    top[j] = [[t, v] for t, v in zip(ids[n][:kj], vals[n][:kj])]
    return tokens.tolist(), lp, top
