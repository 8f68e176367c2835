"""Model runner: the part of the engine that every rank of a replica executes.

Owns: validating the layout and the checkpoint against the config (before anything
is read), building the model at shard size, loading this rank's weights, packing
them for the CPU kernels, sizing and allocating the KV cache, and the step protocol
of a replica over ``mesh.replica_comm`` (lowercase pickle API, a few small arrays):
the leader's ``execute`` sends the step's ``StepBatch`` (``bcast``, or ``scatter``
of one batch per CP rank) and runs it; a follower's ``receive`` gets it (None: the
leader is done) and ``run`` runs it (``replica.follow`` is that loop).
"""
from __future__ import annotations

import logging
import time

import torch

from .. import kernels, native
from ..comm.mesh import Mesh
from ..config import ConfigError, EngineConfig, ModelConfig
from ..device import Device, parse_dtype
from ..faults import inject
from ..models import registry
from ..models.llama import CausalLM
from ..models.registry import validate_layout
from ..models.step import StepBatch
from ..parallel.shard import kv_heads_for_rank
from ..weights.index import CheckpointIndex
from ..weights.loader import FileRows, WeightSource
from .kv_cache import MIN_KV_TOKENS, KVCache, kv_budget, kv_bytes_per_token

log = logging.getLogger("mpiinfer")



class ModelRunner:
    def __init__(self, model_dir: str, engine_cfg: EngineConfig, mesh: Mesh, device: Device):
        self.mesh, self.device, self.engine_cfg = mesh, device, engine_cfg
        self.model_dir = model_dir
        self.cfg = ModelConfig.from_dir(model_dir)
        validate_layout(self.cfg, mesh.layout)
        index = CheckpointIndex(model_dir)
        registry.check_checkpoint(self.cfg, index)
        self.dtype = parse_dtype(engine_cfg.dtype) or device.default_dtype(self.cfg.torch_dtype)
        self.kv_dtype = parse_dtype(engine_cfg.kv_dtype) or self.dtype
        if engine_cfg.threads:
            torch.set_num_threads(engine_cfg.threads)
        t0 = time.perf_counter()
        self.model = self._load(index)
        self.load_seconds = time.perf_counter() - t0
        if native.usable(device.torch, self.dtype) and not native.usable(device.torch, self.dtype, self.kv_dtype):
            log.warning("--kv-dtype %s: the CPU's C kernels take float32 and bfloat16 caches; attention takes the "
                        "slower torch paths", str(self.kv_dtype).replace("torch.", ""))
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.packed = self._pack(index)
        self.kv_bytes_per_token = kv_bytes_per_token(self.cfg, self.kv_dtype.itemsize, mesh.tp, mesh.tp_rank)
        self.kv = self._allocate_kv()
        log.info("rank %d: loaded %s (%s, %.2f GB of weights on this rank) in %.1fs; KV cache %d tokens (%.2f GB, %s)",
                 mesh.rank, self.cfg.arch, str(self.dtype).replace("torch.", ""), self.weight_bytes / 1e9,
                 self.load_seconds, self.kv.pool_tokens, self.kv.nbytes() / 1e9,
                 str(self.kv_dtype).replace("torch.", ""))

    def _load(self, index: CheckpointIndex) -> CausalLM:
        """The model at shard size on the device, with this rank's slices of the checkpoint read into it."""
        self.device.activate()
        with torch.device(self.device.torch):
            model = CausalLM(self.cfg, self.mesh, self.dtype, self.device.torch, kv_dtype=self.kv_dtype)
        src = WeightSource(index, fp8_block=self.cfg.fp8_block)
        try:
            model.load(src)
        finally:
            src.close()
        self.weight_bytes_read = src.bytes_read
        return model

    def _pack(self, index: CheckpointIndex) -> bool:
        """Reorder the weights for the CPU kernels when that pays (``kernels.should_pack``) or is asked for."""
        packed = self.engine_cfg.pack_weights
        if packed is None:
            packed = kernels.should_pack(self.device.torch, self.dtype, self.engine_cfg.max_batch)
        elif packed and not kernels.can_pack(self.device.torch, self.dtype):
            raise ConfigError(f"--pack-weights: no packed kernels for {self.dtype} on {self.device.torch}")
        if packed:
            rows = None
            if self.cfg.tie_word_embeddings:
                e = self.model.embed
                rows = FileRows(index, e.name + ".weight", e.start, e.stop, self.dtype)
            self.model.pack(rows)
        return packed

    def _allocate_kv(self) -> KVCache:
        """The KV cache of ``--kv-budget`` bytes (default: enough for max_batch sequences of the longest allowed
        length, within a share of free memory)."""
        ec, per_tok = self.engine_cfg, self.kv_bytes_per_token
        budget = kv_budget(ec.max_batch, ec.max_seq_len or self.cfg.max_position_embeddings, per_tok,
                           self.device.free_memory(), ec.kv_budget_bytes)
        pool = budget // per_tok
        if pool < MIN_KV_TOKENS:
            raise ConfigError(f"--kv-budget {budget} bytes holds only {pool} tokens ({per_tok} bytes per token); "
                              "raise it")
        return self._kv_cache(pool)

    def _kv_cache(self, pool: int) -> KVCache:
        """A KV cache of ``pool`` token rows of this rank's KV heads."""
        k0, k1 = kv_heads_for_rank(self.cfg.num_kv_heads, self.mesh.tp, self.mesh.tp_rank)
        return KVCache(self.cfg.num_layers, k1 - k0, self.cfg.head_dim, int(pool), self.kv_dtype, self.device.torch,
                       v_is_k=bool(self.cfg.mla))

    def agree_kv(self) -> None:
        """Collective over the replica, once every rank has loaded: one pool size for all, the smallest (the
        leader's scheduler hands out rows every rank must hold, and the free memory behind a default budget
        differs between ranks, on a shared GPU above all).  A rank with more reallocates its cache smaller."""
        comm = self.mesh.replica_comm
        if comm is None or comm.Get_size() == 1:
            return
        from mpi4py import MPI
        pool = comm.allreduce(self.kv.pool_tokens, op=MPI.MIN)
        if pool < self.kv.pool_tokens:
            self.kv = None                   # the larger cache is freed before the smaller one is made
            self.kv = self._kv_cache(pool)

    @property
    def native(self) -> bool:
        """The model runs the CPU C kernels (``mpiinfer.native``) rather than the torch paths."""
        return self.model.use_native

    @property
    def hidden(self):
        """Leader, after ``execute``: the final hidden states of the step's ``hidden_rows`` (embeddings)."""
        return self.model.hidden

    @property
    def pool_tokens(self) -> int:
        return self.kv.pool_tokens

    # ------------------------------------------------------------------ the step protocol of a replica
    def execute(self, batch):
        """Leader: send the step to the replica's other ranks and run it; logits (S, vocab) float32.
        ``batch``: one ``StepBatch``, or with context parallelism a list of one per CP rank."""
        comm = self.mesh.replica_comm
        if isinstance(batch, list):          # context parallelism: one batch per CP rank
            comm.scatter([batch[j // self.mesh.tp].to_arrays() for j in range(comm.Get_size())], root=0)
            batch = batch[0]
        elif comm is not None and comm.Get_size() > 1:
            comm.bcast(batch.to_arrays(), root=0)
        return self.run(batch)

    def receive(self):
        """Follower: the next step's ``StepBatch`` from the leader, or None when the leader is done."""
        comm = self.mesh.replica_comm
        arrays = comm.scatter(None, root=0) if self.mesh.cp > 1 else comm.bcast(None, root=0)
        return None if arrays is None else StepBatch.from_arrays(arrays)

    def run(self, batch: StepBatch):
        """Every rank: this rank's part of one step.  Logits (S, vocab) float32 on the leader, None elsewhere
        (with ``batch.gather_logits`` the other CP ranks' logits rows are gathered to the leader)."""
        inject("step", self.mesh.rank)
        logits = self.model(batch, self.kv)
        if batch.gather_logits:
            logits = self._gather_cp_rows(logits)
        if batch.gather_hidden:
            h = self.model.hidden
            if h is None and self.mesh.tp_rank == 0:
                h = torch.empty(0, self.cfg.hidden_size, device=self.device.torch)
            self.model.hidden = self._gather_cp_rows(h if self.mesh.tp_rank == 0 else None)
        return logits

    def _gather_cp_rows(self, rows):
        """Leader and followers alike: the rows (logits, or embeddings' hidden states) of every CP rank (its TP
        rank 0 holds them), in CP rank order, end up on the leader; None elsewhere."""
        mine = None if rows is None else rows.cpu().numpy()
        parts = self.mesh.replica_comm.gather(mine, root=0)
        if parts is None:
            return None
        out = [torch.from_numpy(p) for j, p in enumerate(parts) if j % self.mesh.tp == 0]
        return torch.cat(out).to(rows.device)

    def release_followers(self) -> None:
        """Leader: tell the replica's other ranks that there are no more steps."""
        comm = self.mesh.replica_comm
        if comm is not None and comm.Get_size() > 1:
            if self.mesh.cp > 1:
                comm.scatter([None] * comm.Get_size(), root=0)
            else:
                comm.bcast(None, root=0)
