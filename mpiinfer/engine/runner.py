"""Model runner: the part of the engine that every rank of a replica executes.

Owns: validating the checkpoint against its config (before anything is read),
building the model at shard size, loading this rank's weights, allocating the KV
cache, and executing one ``StepBatch``.  On the replica leader, ``execute``
first broadcasts the batch over ``mesh.replica_comm`` (lowercase pickle API, a few
small arrays); followers sit in ``follow`` executing what they receive until the
leader sends ``None``.
"""
from __future__ import annotations

import logging
import time

import torch

from .. import kernels
from ..config import ConfigError, EngineConfig, ModelConfig
from ..device import Device, parse_dtype
from ..dist.mesh import Mesh
from ..faults import inject
from ..models import registry
from ..models.llama import CausalLM
from ..weights.index import CheckpointIndex
from ..weights.loader import FileRows, WeightSource
from ..weights.shard import kv_heads_for_rank
from .batch import StepBatch
from .kv_cache import KVCache

log = logging.getLogger("mpiinfer")

_DEFAULT_KV_FRACTION = 0.3
_DEFAULT_KV_CAP = 8 << 30


def validate_layout(cfg: ModelConfig, mesh_layout) -> None:
    """Refuse a layout the model cannot be split by (same message on every rank)."""
    tp, ep = mesh_layout.tp, mesh_layout.ep
    # tp <= KV heads: each rank takes whole GQA groups, as evenly as they go (3 KV heads at tp=2: 2 + 1);
    # tp > KV heads: each KV head is replicated on tp / KV ranks, which split its group's query heads evenly
    if tp > cfg.num_kv_heads and tp % cfg.num_kv_heads:
        raise ConfigError(f"--tp {tp} is larger than num_key_value_heads={cfg.num_kv_heads} and not a multiple of it")
    if tp > cfg.num_kv_heads and cfg.num_heads % tp:
        raise ConfigError(f"--tp {tp} is larger than num_key_value_heads={cfg.num_kv_heads} and does not divide "
                          f"num_attention_heads={cfg.num_heads}")
    inner = [("intermediate_size", cfg.intermediate_size)] if cfg.intermediate_size and not all(
        cfg.is_moe_layer(i) for i in range(cfg.num_layers)) else []
    if cfg.shared_expert_intermediate_size:
        inner.append(("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size))
    for name, v in inner:
        if v < tp:
            raise ConfigError(f"--tp {tp} is larger than {name}={v}")
    if ep > 1 and not cfg.is_moe:
        raise ConfigError(f"--ep {ep} was given but {cfg.arch} has no experts")
    if cfg.is_moe:
        if cfg.num_experts % ep:
            raise ConfigError(f"--ep {ep} does not divide the number of experts ({cfg.num_experts})")
        block = tp // ep if (ep <= tp and tp % ep == 0) else 1
        if cfg.moe_intermediate_size < block:
            raise ConfigError(f"tp/ep = {block} is larger than moe_intermediate_size={cfg.moe_intermediate_size}")


class ModelRunner:
    def __init__(self, model_dir: str, engine_cfg: EngineConfig, mesh: Mesh, device: Device):
        self.mesh, self.device, self.engine_cfg = mesh, device, engine_cfg
        self.cfg = ModelConfig.from_dir(model_dir)
        validate_layout(self.cfg, mesh.layout)
        index = CheckpointIndex(model_dir)
        registry.check_checkpoint(self.cfg, index)
        self.dtype = parse_dtype(engine_cfg.dtype) or device.default_dtype(self.cfg.torch_dtype)
        if engine_cfg.threads:
            torch.set_num_threads(engine_cfg.threads)
        t0 = time.perf_counter()
        device.activate()
        with torch.device(device.torch):
            self.model = CausalLM(self.cfg, mesh, self.dtype, device.torch)
        src = WeightSource(index)
        self.model.load(src)
        src.close()
        self.weight_bytes_read = src.bytes_read
        self.load_seconds = time.perf_counter() - t0
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.packed = engine_cfg.pack_weights
        if self.packed is None:
            self.packed = kernels.should_pack(device.torch, self.dtype, engine_cfg.max_batch)
        elif self.packed and not kernels.can_pack(device.torch, self.dtype):
            raise ConfigError(f"--pack-weights: no packed kernels for {self.dtype} on {device.torch}")
        if self.packed:
            rows = None
            if self.cfg.tie_word_embeddings:
                e = self.model.embed
                rows = FileRows(index, e.name + ".weight", e.start, e.stop, self.dtype)
            self.model.pack(rows)
        k0, k1 = kv_heads_for_rank(self.cfg.num_kv_heads, mesh.tp, mesh.tp_rank)
        self.kv_dtype = self.dtype
        per_tok = KVCache.bytes_per_token(self.cfg.num_layers, k1 - k0, self.cfg.head_dim,
                                          torch.tensor([], dtype=self.kv_dtype).element_size())
        budget = engine_cfg.kv_budget_bytes
        if budget is None:
            # enough for max_batch sequences of the longest allowed length, within a share of free memory
            useful = engine_cfg.max_batch * (engine_cfg.max_seq_len or self.cfg.max_position_embeddings) * per_tok
            budget = min(_DEFAULT_KV_CAP, int(device.free_memory() * _DEFAULT_KV_FRACTION), useful)
        pool = budget // per_tok
        if pool < 16:
            raise ConfigError(f"--kv-budget {budget} bytes holds only {pool} tokens ({per_tok} bytes per token); "
                              "raise it")
        self.kv = KVCache(self.cfg.num_layers, k1 - k0, self.cfg.head_dim, int(pool), self.kv_dtype, device.torch)
        self.kv_bytes_per_token = per_tok
        log.info("rank %d: loaded %s (%s, %.2f GB of weights on this rank) in %.1fs; KV cache %d tokens (%.2f GB)",
                 mesh.rank, self.cfg.arch, str(self.dtype).replace("torch.", ""), self.weight_bytes / 1e9,
                 self.load_seconds, pool, self.kv.nbytes() / 1e9)

    @property
    def pool_tokens(self) -> int:
        return self.kv.pool_tokens

    def execute(self, batch: StepBatch):
        """Run one step; logits (S, vocab) float32 on the leader, None on followers."""
        comm = self.mesh.replica_comm
        if isinstance(batch, list):          # context parallelism: one batch per CP rank
            comm.scatter([batch[j // self.mesh.tp].to_arrays() for j in range(comm.Get_size())], root=0)
            batch = batch[0]
        elif comm is not None and comm.Get_size() > 1 and self.mesh.is_replica_leader:
            comm.bcast(batch.to_arrays(), root=0)
        inject("step", self.mesh.rank)
        logits = self.model(batch, self.kv)
        if batch.gather_logits:
            logits = self._gather_cp_logits(logits)
        return logits

    def _gather_cp_logits(self, logits):
        """Leader and followers alike: the logits rows of every CP rank (its TP rank 0 holds them), in CP rank
        order, end up on the leader; None elsewhere."""
        mine = None if logits is None else logits.cpu().numpy()
        parts = self.mesh.replica_comm.gather(mine, root=0)
        if parts is None:
            return None
        rows = [torch.from_numpy(p) for j, p in enumerate(parts) if j % self.mesh.tp == 0]
        return torch.cat(rows).to(logits.device)

    def follow(self) -> None:
        """Follower loop: execute the leader's batches until it broadcasts None."""
        comm = self.mesh.replica_comm
        while True:
            arrays = comm.scatter(None, root=0) if self.mesh.cp > 1 else comm.bcast(None, root=0)
            if arrays is None:
                return
            inject("step", self.mesh.rank)
            batch = StepBatch.from_arrays(arrays)
            logits = self.model(batch, self.kv)
            if batch.gather_logits:
                self._gather_cp_logits(logits)

    def release_followers(self) -> None:
        comm = self.mesh.replica_comm
        if comm is not None and comm.Get_size() > 1 and self.mesh.is_replica_leader:
            if self.mesh.cp > 1:
                comm.scatter([None] * comm.Get_size(), root=0)
            else:
                comm.bcast(None, root=0)
