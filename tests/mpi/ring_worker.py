"""Worker for tests/mpi/test_ring.py, run as ``mpiexec -n CP python tests/mpi/ring_worker.py ...``.

Every rank draws the same random Q/K/V (same seed), computes the float64 reference on the whole
sequence, runs ``ring_attention`` on its zigzag shard over COMM_WORLD (the CP group here) and
compares with the reference restricted to its positions; rank 0 also reassembles all shards
with ``gather_order``.  Then the CP decode path: a KV cache spread round-robin over the ranks,
``decode_attention_partial`` + ``combine_across_ranks``, checked against the reference and for
bitwise equality across ranks.  Rank 0 prints one line ``RESULT <json>``; every rank exits 1
if any check failed anywhere (so a mismatch is a nonzero exit of mpiexec).
"""
import argparse
import json
import sys

import torch
from mpi4py import MPI

from mpiinfer.parallel.ring import (
    causal_attention_reference,
    combine_across_ranks,
    decode_attention_partial,
    ring_attention,
)
from mpiinfer.parallel.shard import gather_order, shard_positions


def draw(L, n_q, n_kv, hd, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, n, hd, generator=g).to(dtype) for n in (n_q, n_kv, n_kv)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="37,101,1000")
    ap.add_argument("--windows", default="none", help="comma list; 'none' = full causal")
    ap.add_argument("--n-q", type=int, default=8)
    ap.add_argument("--n-kv", type=int, default=2)
    ap.add_argument("--hd", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--bf16-len", type=int, default=101, help="also one bf16 case of this length (0: none)")
    ap.add_argument("--decode-len", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(1)

    comm = MPI.COMM_WORLD
    cp, rank = comm.Get_size(), comm.Get_rank()
    scale = args.hd ** -0.5
    records, ok = [], True

    cases = [(int(L), None if w == "none" else int(w), torch.float32, args.tol)
             for L in args.lens.split(",") for w in args.windows.split(",")]
    if args.bf16_len:
        cases.append((args.bf16_len, None, torch.bfloat16, 2e-2))
    for case_no, (L, window, dtype, tol) in enumerate(cases):
        q, k, v = draw(L, args.n_q, args.n_kv, args.hd, args.seed + case_no, dtype)
        ref = causal_attention_reference(q.float(), k.float(), v.float(), scale, window=window)
        pos = torch.from_numpy(shard_positions(L, cp, rank))
        stats = {}
        out = ring_attention(q[pos], k[pos], v[pos], pos, pos, comm, scale, window=window, stats=stats)
        assert out.dtype == dtype and out.shape == (len(pos), args.n_q, args.hd)
        err = (out.float() - ref[pos]).abs().max().item() if len(pos) else 0.0
        parts = comm.gather(out.float(), root=0)
        full_err = None
        if rank == 0:
            full = torch.cat(parts)[torch.from_numpy(gather_order(L, cp))]
            full_err = (full - ref).abs().max().item() if L else 0.0
        rec = dict(case="prefill", L=L, window=window, dtype=str(dtype), rank=rank, tokens=len(pos), err=err,
                   full_err=full_err, **{key: stats[key] for key in ("blocks", "pairs", "elems", "skipped")},
                   wait_s=round(stats["wait_s"], 4), total_s=round(stats["total_s"], 4))
        bad = not (err <= tol) or (full_err is not None and not (full_err <= tol))
        if bad:
            print(f"[rank {rank}] MISMATCH prefill L={L} window={window} {dtype}: max abs err {err:.3g} "
                  f"(reassembled {full_err})", file=sys.stderr, flush=True)
        ok &= not bad
        records.append(rec)

    # ---- decode: KV spread round-robin, one new token + a 3-token chunk with causal mask
    Ld = args.decode_len
    q, k, v = draw(Ld, args.n_q, args.n_kv, args.hd, args.seed + 999, torch.float32)
    ref = causal_attention_reference(q, k, v, scale)
    mine = torch.arange(rank, Ld, cp)                                   # this rank's cache rows
    for nq in (1, 3):
        qpos = torch.arange(Ld - nq, Ld)
        o, lse = decode_attention_partial(q[qpos], k[mine], v[mine], scale, q_pos=qpos, kv_pos=mine)
        out = combine_across_ranks(o, lse, comm)
        err = (out - ref[qpos]).abs().max().item()
        first = comm.bcast(out if rank == 0 else None, root=0)
        same = bool(torch.equal(first, out))
        bad = not (err <= args.tol) or not same
        if bad:
            print(f"[rank {rank}] MISMATCH decode rows={nq}: max abs err {err:.3g}, bitwise equal to rank 0: {same}",
                  file=sys.stderr, flush=True)
        ok &= not bad
        records.append(dict(case="decode", rows=nq, rank=rank, err=err, bitwise_same=same))

    every = comm.gather(records, root=0)
    all_ok = comm.allreduce(int(ok), op=MPI.MIN)
    if rank == 0:
        flat = [r for rs in every for r in rs]
        worst = max(r["err"] for r in flat)
        print(f"cp={cp} max abs err over all cases and ranks: {worst:.3g}", flush=True)
        print("RESULT " + json.dumps({"cp": cp, "ok": bool(all_ok), "records": flat}), flush=True)
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
