"""The replica leader's engine: requests in, results out, continuous batching.

Owns: turning a ``Request`` into prompt ids (or an error ``Result``), the step loop around the
``Scheduler`` (admission and the step plan live there): execute the plan on the replica
(``ModelRunner.execute``), sample one token per sampled sequence, apply stop conditions, detokenise and
free a finished sequence's KV at once, so the next waiting request starts in the very next step.

Typical use::

    engine = Engine(runner, tokenizer, default_seed=0)
    for r in engine.generate(requests):   # or add() / step() for streaming
        ...
"""
from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator

import torch

from ..config import ConfigError
from ..messages import Choice, ErrorInfo, Request, Result
from .kv_cache import MIN_SHARED_BLOCKS, MIN_SHARED_BLOCKS_NATIVE
from .pooling import checkpoint_pooling, pool
from .runner import ModelRunner
from .sampling import make_generator, sample
from .scheduler import Scheduler, Sequence, rows_needed
from .structured import ConstraintError, Grammars


def prompt_topk(sp) -> int:
    """How many alternatives each prompt position reports: completions' echo with logprobs k, or vLLM's
    prompt_logprobs k."""
    if sp.vllm_prompt_logprobs >= 0:
        return sp.vllm_prompt_logprobs
    return sp.top_logprobs if sp.echo else 0


def min_shared_blocks(ec, native: bool) -> int:
    """The shortest prefix-cache hit taken: the engine config's ``prefix_min_blocks``, else every hit on the CPU
    kernels (a split cache costs them nothing) and 4 blocks on the torch paths (kv_cache.MIN_SHARED_BLOCKS)."""
    if ec.prefix_min_blocks is not None:
        return ec.prefix_min_blocks
    return MIN_SHARED_BLOCKS_NATIVE if native else MIN_SHARED_BLOCKS


# what a constraint kind is called in error messages (the record's field names)
STRUCTURED_NAMES = {"json": "JSON schema", "json_object": "json_object response format", "regex": "regex",
                    "choice": "choice list", "grammar": "grammar"}


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, default_seed: int = 0, max_batch: int | None = None,
                 step_tokens: int | None = None, max_seq_len: int | None = None,
                 cp_min_tokens: int | None = None, cp_short: str | None = None):
        self.runner = runner
        self.tok = tokenizer
        self.cfg = runner.cfg
        self.default_seed = default_seed
        ec = runner.engine_cfg
        ctx = self.cfg.max_position_embeddings
        self.max_seq_len = min(max_seq_len or ec.max_seq_len or ctx, ctx)
        self.cp = runner.mesh.cp
        self.cp_min_tokens = cp_min_tokens if cp_min_tokens is not None else ec.cp_min_tokens
        # with cp > 1, requests below cp_min_tokens are independent work: "spread" gives each to the least
        # loaded CP rank (data parallelism inside the CP group), "first" keeps them all on CP rank 0
        self.sched = Scheduler(self.cp, runner.pool_tokens, max_batch or ec.max_batch,
                               step_tokens or ec.prefill_chunk_tokens, cp_short or ec.cp_short,
                               block_size=ec.kv_block, prefix_cache=ec.prefix_cache,
                               min_shared_blocks=min_shared_blocks(ec, runner.native))
        self.eos = frozenset(self.cfg.eos_token_ids)
        self.steps = 0
        self.tokens_generated = 0
        self.peak_running = 0          # most sequences holding KV cache at once
        self._samples: dict = {}       # request index -> its finished samples so far (sampled, n > 1), or the
        #                                count of those still running once the request is dropped (``_left``)
        # wide EP: every replica runs every step (an idle one with zero tokens) for the expert all-to-alls
        self.lockstep = runner.mesh.wide_ep
        self._grammars = None          # structured outputs: made with the first constrained request
        self._pooling = None           # embeddings: the checkpoint's (pooling, normalize), read when first needed

    @property
    def grammars(self) -> Grammars:
        """The grammar engine for this model's tokenizer; ConstraintError (every time) when it cannot be made."""
        if self._grammars is None:
            eos = list(self.cfg.eos_token_ids)
            if not eos and self.tok.eos_token is not None and self.tok.tok.token_to_id(self.tok.eos_token) is not None:
                eos = [self.tok.tok.token_to_id(self.tok.eos_token)]     # config.json names none: the tokenizer's
            try:
                if not eos:
                    raise ValueError("the model declares no end-of-sequence token (config.json eos_token_id, "
                                     "tokenizer_config.json eos_token), which ends a constrained answer")
                self._grammars = Grammars(self.tok.tok.to_str(), self.cfg.vocab_size, eos,
                                          tokenizer_vocab=self.tok.vocab_size)
            except Exception as e:         # llguidance refusing the tokenizer: every constrained record says why
                self._grammars = f"structured output is not available for this model: {type(e).__name__}: {e}"
        if isinstance(self._grammars, str):
            raise ConstraintError(self._grammars)
        return self._grammars

    max_batch = property(lambda self: self.sched.max_batch)
    running = property(lambda self: self.sched.running)
    waiting = property(lambda self: self.sched.waiting)

    # -------------------------------------------------------------- requests
    def prepare(self, req: Request):
        """A ``Sequence`` ready to queue, or an error ``Result`` (never raises for bad input)."""
        if not self.cfg.lm_head:
            return self._error(req, "invalid_request", f"this checkpoint ({self.cfg.arch}) is a base model without an "
                                                       "LM head: it serves embedding records (input) only")
        try:
            if req.prompt_token_ids is not None:
                ids = list(req.prompt_token_ids)
                bad = [t for t in ids if t >= self.cfg.vocab_size]
                if bad:
                    return self._error(req, "invalid_request",
                                       f"prompt_token_ids contains id {bad[0]} >= vocab_size {self.cfg.vocab_size}")
            elif req.messages is not None:
                ids = self.tok.encode_messages(req.messages)
            else:
                ids = self.tok.encode(req.prompt)
        except ValueError as e:   # chat template errors
            return self._error(req, "invalid_request", str(e))
        if not ids:
            return self._error(req, "invalid_request", "the prompt encodes to zero tokens")
        bad = [t for t, _ in req.sampling.logit_bias if t >= self.cfg.vocab_size]
        if bad:
            return self._error(req, "invalid_request", f"logit_bias names token id {bad[0]} >= vocab_size "
                                                       f"{self.cfg.vocab_size}")
        if len(ids) >= self.max_seq_len:
            return self._error(req, "prompt_too_long",
                               f"prompt has {len(ids)} tokens; this run allows at most {self.max_seq_len - 1} "
                               f"(model context {self.cfg.max_position_embeddings}, --max-seq-len)")
        sp = req.sampling
        if sp.prompt_logprobs and self.cp > 1:
            return self._error(req, "invalid_request", "prompt_logprobs is not available with --cp > 1")
        # generation stops at the context length (finish_reason "length"), as in transformers
        max_new = min(sp.max_tokens, self.max_seq_len - len(ids))
        use_cp = self.cp > 1 and len(ids) >= self.cp_min_tokens
        need = max(rows_needed(len(ids), max(max_new, 1), self.cp, use_cp))
        usable = self.sched.usable_rows
        if max(self.sched.blocks_needed(len(ids), max(max_new, 1), use_cp)) * self.sched.bs > usable:
            where = (f"{need} KV-cache rows on each of the {self.cp} CP ranks" if use_cp else
                     f"{need} KV-cache rows")
            hint = "" if self.cp > 1 else " or split the document over ranks with --cp"
            return self._error(req, "prompt_too_long",
                               f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) needs {where} but the cache "
                               f"of a rank holds {usable}: raise --kv-budget, lower max_tokens{hint}")
        if sp.structured:
            try:
                self.grammars.matcher(sp.structured)
            except ConstraintError as e:
                return self._error(req, "invalid_request", f"the {STRUCTURED_NAMES[sp.structured[0]]} cannot be "
                                                           f"used for structured output: {e}")
        eos = frozenset() if sp.ignore_eos else self.eos
        eos = eos | frozenset(sp.stop_token_ids)
        return self._sequence(req, ids, max_new, eos, use_cp, 0)

    def _sequence(self, req: Request, ids: list, max_new: int, eos: frozenset, use_cp: bool, i: int) -> Sequence:
        """Sample ``i`` of a request.  Sampled: its own generator, seeded ``seed + i`` (the record's seed, else one
        derived from --seed and the record's position, samples 2**40 apart), so results never depend on the
        batch, the layout or a preemption."""
        sp = req.sampling
        new_gen = None
        if sp.temperature > 0:
            if sp.seed is not None:
                seed = (sp.seed + i) % (1 << 63)
            else:
                seed = (self.default_seed * 1_000_003 + req.index + (i << 40)) % (1 << 63)
            dev = self.runner.device.torch
            new_gen = lambda: make_generator(seed, dev)
        return Sequence(req, ids, max_new, eos, new_gen() if new_gen else None, cp=use_cp,
                        t_added=time.perf_counter(), new_generator=new_gen, sample=i,
                        prompt_logprobs=[None] if sp.prompt_logprobs else None,
                        prompt_top=[None] if sp.prompt_logprobs and prompt_topk(sp) > 0 else None,
                        prompt_ranks=[None] if sp.vllm_prompt_logprobs >= 0 else None,
                        matcher=self.grammars.matcher(sp.structured) if sp.structured else None)

    def add(self, req: Request) -> Result | None:
        """Queue a request; returns an error Result right away when it cannot run.  With ``n`` > 1 and sampling,
        ``n`` sequences queue together: the prefix cache gives the later ones the first one's prompt blocks (one
        prefill; with ``--cp`` "spread", one per CP rank the samples land on: sending them all to the rank computing
        the prompt measured no faster, as waiting for its blocks stalls admission); greedy ``n`` runs once and its
        result is repeated."""
        if req.inputs is not None:
            return self._add_embedding(req)
        seq = self.prepare(req)
        if isinstance(seq, Result):
            return seq
        self.sched.waiting.append(seq)
        n = req.sampling.n
        if n > 1 and req.sampling.temperature > 0:
            self._samples[req.index] = [None] * n
            for i in range(1, n):
                self.sched.waiting.append(self._sequence(req, seq.prompt, seq.max_new, seq.eos, seq.cp, i))
        return None

    def _add_embedding(self, req: Request) -> Result | None:
        """Queue one prefill-only sequence per input of an embedding request (its vectors come back together)."""
        sp = req.sampling
        pooling, normalize = sp.pooling, sp.normalize
        if pooling == "auto" or normalize is None:      # the checkpoint decides (read once)
            if self._pooling is None:
                try:
                    self._pooling = checkpoint_pooling(self.runner.model_dir)
                except ConfigError as e:
                    self._pooling = str(e)
            if isinstance(self._pooling, str):
                return self._error(req, "invalid_request", f"{self._pooling}; give pooling and normalize in the "
                                                           "record to pool the final hidden states yourself")
            pooling = self._pooling[0] if pooling == "auto" else pooling
            normalize = self._pooling[1] if normalize is None else normalize
        dims = sp.dimensions
        if dims:
            c = self.cfg
            why = (f"dimensions {dims} is more than the model's hidden size {c.hidden_size}" if dims > c.hidden_size
                   else "the model is not Matryoshka-trained (config.json has no is_matryoshka or "
                        "matryoshka_dimensions)" if not c.is_matryoshka
                   else f"dimensions {dims} is not one of the model's {list(c.matryoshka_dimensions)}"
                   if c.matryoshka_dimensions and dims not in c.matryoshka_dimensions else None)
            if why:
                return self._error(req, "invalid_request", why)
        seqs = []
        for i, x in enumerate(req.inputs):
            where = f"input {i}: " if len(req.inputs) > 1 else ""
            ids = list(x) if isinstance(x, list) else self.tok.encode(x)
            bad = [t for t in ids if t >= self.cfg.vocab_size]
            if bad:
                return self._error(req, "invalid_request", f"{where}token id {bad[0]} >= vocab_size "
                                                           f"{self.cfg.vocab_size}")
            if not ids:
                return self._error(req, "invalid_request", f"{where}the input encodes to zero tokens")
            use_cp = self.cp > 1 and len(ids) >= self.cp_min_tokens     # a long document: over the CP ranks
            if len(ids) > self.max_seq_len or \
                    max(self.sched.blocks_needed(len(ids), 1, use_cp)) * self.sched.bs > self.sched.usable_rows:
                hint = "" if self.cp > 1 else " (split long documents over ranks with --cp)"
                return self._error(req, "prompt_too_long", f"{where}input has {len(ids)} tokens; this run embeds at "
                                                           f"most {min(self.max_seq_len, self.sched.usable_rows)} "
                                                           f"per rank{hint}")
            seqs.append(Sequence(req, ids, 0, frozenset(), None, cp=use_cp, t_added=time.perf_counter(), sample=i,
                                 pooling=pooling, normalize=normalize, dimensions=dims))
        if len(seqs) > 1:
            self._samples[req.index] = [None] * len(seqs)
        self.sched.waiting.extend(seqs)
        return None

    @staticmethod
    def _error(req: Request, typ: str, msg: str) -> Result:
        return Result(index=req.index, id=req.id, error=ErrorInfo(typ, msg), extra=req.extra)

    def has_work(self) -> bool:
        return self.sched.has_work()

    def drop_waiting(self) -> None:
        """Forget the requests not started yet (a stop: they are computed on resume).  A request whose samples
        have not all started is dropped whole: its running samples finish, but give no result."""
        queued = collections.Counter(seq.req.index for seq in self.sched.waiting if seq.req.index in self._samples)
        for index, k in queued.items():                # dropped: the count of its parts still running
            self._left(index, self._unfinished(index) - k)
        self.sched.waiting.clear()

    def _unfinished(self, index: int) -> int:
        """The parts (samples, embedding inputs) of a request in ``_samples`` not finished yet."""
        got = self._samples[index]
        return got if isinstance(got, int) else sum(g is None for g in got)

    def _left(self, index: int, k: int) -> None:
        """A dropped request (its result given up) has k parts still to finish: kept as that count, so that they
        are recognised and give nothing, and forgotten with the last of them."""
        if k > 0:
            self._samples[index] = k
        else:
            del self._samples[index]

    # -------------------------------------------------------------- stepping
    def step(self) -> list:
        """Run one model step; return the Results of the sequences that finished."""
        self.sched.admit()
        self.sched.grow()                      # a block for every decode's next token (preempting if it must)
        self.peak_running = max(self.peak_running, len(self.sched.running))
        if not self.sched.running and not self.lockstep:
            return []
        batch, planned, sampled, scored, embedded = self.sched.plan()
        constrained = [i for i, seq in enumerate(sampled) if seq.matcher is not None]
        # the allowed tokens of constrained sequences, computed while the model step runs
        masks = self.grammars.start_masks([sampled[i].matcher for i in constrained]) if constrained else None
        logits = self.runner.execute(batch)
        self.sched.advance(planned)            # cache counters; finished prompt blocks into the prefix cache
        self.steps += 1
        finished = []
        if embedded:                           # embeddings: the final hidden states of their rows
            hidden, at = self.runner.hidden, 0
            for seq, k in embedded:
                part = hidden[at:at + k]
                at += k
                if seq.pooling == "mean":
                    s = part.sum(dim=0)
                    seq.hidden_sum = s if seq.hidden_sum is None else seq.hidden_sum + s
                    seq.hidden_n += k
                else:
                    seq.hidden_last = part[-1]
        if scored:                             # prompt_logprobs: the rows after the sampled ones
            target = torch.tensor([seq.prompt[j] for seq, j in scored], device=logits.device)
            logp = torch.log_softmax(logits[len(sampled):], dim=-1)
            lps = logp.gather(1, target[:, None])[:, 0].tolist()
            for (seq, _), v in zip(scored, lps):
                seq.prompt_logprobs.append(v)
            k = max((prompt_topk(seq.req.sampling) for seq, _ in scored if seq.prompt_top is not None), default=0)
            if k:                              # echo / vLLM's prompt_logprobs: the alternatives at each position
                vals, ids = (x.tolist() for x in torch.topk(logp, k, dim=-1))
                for n, (seq, _) in enumerate(scored):
                    if seq.prompt_top is not None:
                        kj = prompt_topk(seq.req.sampling)
                        seq.prompt_top.append([[t, v] for t, v in zip(ids[n][:kj], vals[n][:kj])])
            ranked = [n for n, (seq, _) in enumerate(scored) if seq.prompt_ranks is not None]
            if ranked:                         # vLLM's prompt_logprobs: each prompt token's rank
                r = torch.tensor(ranked, device=logp.device)
                ranks = ((logp[r] > logp[r].gather(1, target[r][:, None])).sum(dim=1) + 1).tolist()
                for n, rank in zip(ranked, ranks):
                    scored[n][0].prompt_ranks.append(rank)
        for seq, _ in planned:                 # max_tokens 0: scored, done once its prompt is
            if seq.max_new == 0 and not seq.in_prefill:
                seq.finish_reason = "length"
                finished.append(seq)
        allowed = None
        if constrained:
            bias, stuck = self.grammars.masks(masks, logits.device)
            for j, i in enumerate(constrained):
                seq = sampled[i]
                if stuck[j] or seq.matcher.is_error():    # the matcher failed (a parser limit...): say so
                    self._matcher_failed(seq)
                    finished.append(seq)
                    bias[j] = 0.0                         # sampled anyway (and dropped): no all -inf row
            allowed = (constrained, bias)
        if sampled:
            toks, lps, tops = sample(logits[:len(sampled)] if scored else logits, [s.req.sampling for s in sampled],
                                     [s.generator for s in sampled], [s.req.sampling.logprobs for s in sampled],
                                     [(s.prompt, s.out, s.eos) for s in sampled], allowed)
            now = time.perf_counter()
            for seq, tok, lp, top in zip(sampled, toks, lps, tops):
                if seq.error is not None:
                    continue
                if seq.t_first is None:
                    seq.t_first = now
                seq.out.append(tok)
                if seq.matcher is not None and not seq.matcher.consume_token(tok):
                    self._matcher_failed(seq)
                    finished.append(seq)
                    continue
                if lp is not None:
                    seq.logprobs.append(lp)
                if top is not None:
                    seq.top_logprobs.append(top)
                self.tokens_generated += 1
                if self._check_stop(seq, tok):
                    finished.append(seq)
        for seq in finished:
            self.sched.finish(seq)
        return [r for r in map(self._finished, finished) if r is not None]

    def _finished(self, seq: Sequence) -> Result | None:
        """The Result of a finished sequence's request, once all its samples are done (None until then)."""
        r = self._result(seq)
        if seq.pooling:
            return self._embedded(seq, r)
        n = seq.req.sampling.n
        if n == 1:
            return r
        choice = Choice(r.text, r.token_ids, r.finish_reason, r.logprobs, r.top_logprobs)
        if seq.req.index not in self._samples:       # greedy: every sample is this one (or its error)
            if r.error is None:
                r.choices = [choice] * n
            return r
        if r.error is not None:                      # one failed sample fails the request (the others are dropped)
            dropped = isinstance(self._samples[seq.req.index], int)
            self._left(seq.req.index, self._unfinished(seq.req.index) - 1)
            return None if dropped else r
        got = self._collect(seq, (choice, r))
        if got is None:
            return None
        first = got[0][1]
        first.choices = [c for c, _ in got]
        first.ttft = min((x.ttft for _, x in got if x.ttft is not None), default=None)
        first.latency = max(x.latency for _, x in got)
        first.preemptions = sum(x.preemptions for _, x in got)
        return first

    def _embedded(self, seq: Sequence, r: Result) -> Result | None:
        """An embedding request's Result once the vectors of all its inputs are made (None until then)."""
        vec = pool(seq.pooling, seq.normalize, seq.hidden_last, seq.hidden_sum, seq.hidden_n, seq.dimensions)
        r = Result(index=r.index, id=r.id, prompt_tokens=len(seq.prompt), embeddings=[vec], extra=r.extra,
                   latency=r.latency, preemptions=r.preemptions, cached_tokens=r.cached_tokens)
        if seq.req.index not in self._samples:
            return r
        got = self._collect(seq, r)
        if got is None:
            return None
        first = got[0]
        first.embeddings = [g.embeddings[0] for g in got]
        first.prompt_tokens = sum(g.prompt_tokens for g in got)
        first.latency = max(g.latency for g in got)
        first.preemptions = sum(g.preemptions for g in got)
        first.cached_tokens = sum(g.cached_tokens for g in got)
        return first

    def _collect(self, seq: Sequence, part) -> list | None:
        """Keep one finished part (a sample, an embedding input's vector) of a request that runs as several
        sequences; all its parts in order once the last is in, else None (also when a stop dropped the request:
        it is computed again on resume)."""
        got = self._samples[seq.req.index]
        if isinstance(got, int):                     # dropped: one part fewer to wait for
            self._left(seq.req.index, got - 1)
            return None
        got[seq.sample] = part
        if any(g is None for g in got):
            return None
        del self._samples[seq.req.index]
        return got

    @staticmethod
    def _matcher_failed(seq: Sequence) -> None:
        seq.error = ErrorInfo("structured_output_error", "the structured-output engine failed on this answer: "
                              f"{seq.matcher.get_error() or 'no token can follow'}")

    def _check_stop(self, seq: Sequence, tok: int) -> bool:
        if tok in seq.eos:
            seq.finish_reason = "stop"
            return True
        if seq.matcher is not None and seq.matcher.is_stopped():   # the constraint is complete
            seq.finish_reason = "stop"
            return True
        stops = seq.req.sampling.stop
        mt = seq.req.sampling.min_tokens
        if stops and len(seq.out) >= mt:
            text = self.tok.decode(seq.out)
            # min_tokens (vLLM's): a stop string must end after the text of the first min_tokens - 1 tokens
            head = len(self.tok.decode(seq.out[:mt - 1])) if mt > 1 else 0
            cut = min((i for i in (text.find(s, max(0, head - len(s) + 1)) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                seq.finish_reason = "stop"
                return True
        if len(seq.out) >= seq.max_new:
            seq.finish_reason = "length"
            return True
        return False

    def _result(self, seq: Sequence) -> Result:
        if seq.error is not None:
            return Result(index=seq.req.index, id=seq.req.id, error=seq.error, extra=seq.req.extra)
        text = seq.text if seq.text is not None else self.tok.decode(seq.out)
        now = time.perf_counter()
        sp = seq.req.sampling
        return Result(index=seq.req.index, id=seq.req.id, text=text, token_ids=list(seq.out),
                      finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt),
                      logprobs=list(seq.logprobs) if seq.req.sampling.logprobs else None,
                      top_logprobs=list(seq.top_logprobs) if seq.req.sampling.top_logprobs else None,
                      prompt_logprobs=list(seq.prompt_logprobs) if seq.prompt_logprobs is not None else None,
                      prompt_token_ids=list(seq.prompt) if sp.echo or sp.vllm_prompt_logprobs >= 0 else None,
                      prompt_text=(seq.req.prompt if seq.req.prompt is not None else self.tok.decode(seq.prompt))
                      if sp.echo else None,
                      prompt_top_logprobs=list(seq.prompt_top) if seq.prompt_top is not None else None,
                      prompt_ranks=list(seq.prompt_ranks) if seq.prompt_ranks is not None else None,
                      extra=seq.req.extra, ttft=(seq.t_first - seq.t_added) if seq.t_first else None,
                      latency=now - seq.t_added,
                      max_tokens_clipped_to=seq.max_new if seq.max_new < seq.req.sampling.max_tokens else None,
                      preemptions=seq.preemptions, cached_tokens=seq.cached_tokens)

    # -------------------------------------------------------------- convenience
    def generate(self, requests: Iterable) -> Iterator[Result]:
        """Run requests (or error Results passed through) to completion; yields Results as they finish."""
        it = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(self.waiting) < self.max_batch:
                item = next(it, None)
                if item is None:
                    exhausted = True
                    break
                if isinstance(item, Result):
                    yield item
                    continue
                err = self.add(item)
                if err is not None:
                    yield err
            if not self.has_work():
                if exhausted:
                    return
                continue
            yield from self.step()
