"""``Layout``: the rank arithmetic of every axis, EP included, checked against the examples of its docstring."""
import pytest

from mpiinfer.comm.mesh import Layout, Mesh
from mpiinfer.config import ConfigError


def groups(layout, of):
    return sorted({tuple(of(r)) for r in range(layout.world)})


def test_dp_cp_tp_groups():
    L = Layout(world=8, tp=2)
    assert L.dp == 4
    assert groups(L, L.tp_group) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert groups(L, L.dp_group) == [(0, 2, 4, 6), (1, 3, 5, 7)]
    L = Layout(world=8, tp=2, cp=2)
    assert L.dp == 2
    assert groups(L, L.cp_group) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert groups(L, L.replica_group) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [L.replica_leader(d) for d in range(L.dp)] == [0, 4]
    for r in range(8):
        assert L.rank_of(*L.coords(r)) == r


def test_ep_inside_a_replica():
    L = Layout(world=4, tp=4, ep=2)
    assert not L.wide_ep and L.etp == 2
    assert [L.ep_rank(r) for r in range(4)] == [0, 0, 1, 1]       # ranks 0, 1 own the first half of the experts
    assert [L.etp_rank(r) for r in range(4)] == [0, 1, 0, 1]       # ... each one slice of every such expert
    assert groups(L, L.ep_group) == [(0, 2), (1, 3)]
    L = Layout(world=8, tp=4, ep=4)                                 # two replicas, each its own EP group
    assert L.etp == 1 and groups(L, L.ep_group) == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_wide_ep():
    L = Layout(world=4, tp=2, ep=4)
    assert L.wide_ep and L.dp == 2 and L.etp == 1
    assert [L.ep_rank(r) for r in range(4)] == [0, 1, 2, 3]
    assert [L.etp_rank(r) for r in range(4)] == [0, 0, 0, 0]
    assert groups(L, L.ep_group) == [(0, 1, 2, 3)]
    L = Layout(world=8, tp=2, cp=2, ep=4)                           # one EP group per CP slice
    assert L.wide_ep and groups(L, L.ep_group) == [(0, 1, 4, 5), (2, 3, 6, 7)]


def test_no_ep_every_rank_holds_every_expert():
    L = Layout(world=2, tp=2)
    assert L.etp == 2 and [L.ep_rank(r) for r in range(2)] == [0, 0] and [L.etp_rank(r) for r in range(2)] == [0, 1]


@pytest.mark.parametrize("kw,message", [
    (dict(world=2, tp=3), "world size 2 is not divisible by tp x cp = 3 x 1"),
    (dict(world=4, tp=2, ep=3), "--ep 3 must divide --tp 2"),
    (dict(world=2, tp=0), "--tp must be >= 1"),
    (dict(world=0), "world size must be >= 1"),
])
def test_impossible_layouts_refused_when_built(kw, message):
    with pytest.raises(ConfigError, match=message):
        Layout(**kw)


def test_mesh_is_immutable_and_reduces_over_tp_comm_by_default():
    m = Mesh(Layout(world=4, tp=2, ep=4), 3)
    assert (m.dp_rank, m.cp_rank, m.tp_rank, m.ep_rank) == (1, 0, 1, 3) and m.wide_ep
    assert m.tp_reduce is m.tp_comm is None
    with pytest.raises(AttributeError):
        m.tp_comm = object()


def test_experts_spread_as_evenly_as_they_go():
    """Experts that do not divide by ep: contiguous blocks, the first E % ep ranks one more; every expert has
    exactly one owner; a model with fewer experts than EP ranks is refused before loading."""
    from mpiinfer.config import ModelConfig
    from mpiinfer.models.registry import validate_layout
    from mpiinfer.parallel.shard import expert_owners, experts_for_rank
    assert [experts_for_rank(6, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    sizes = [b - a for a, b in (experts_for_rank(60, 8, r) for r in range(8))]
    assert sizes == [8, 8, 8, 8, 7, 7, 7, 7]
    for E, ep in ((60, 8), (6, 4), (5, 2), (8, 8), (7, 3)):
        owners = expert_owners(E, ep)
        assert len(owners) == E and owners == sorted(owners)
        assert all(experts_for_rank(E, ep, o)[0] <= e < experts_for_rank(E, ep, o)[1] for e, o in enumerate(owners))
    raw = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 256,
           "rms_norm_eps": 1e-6, "max_position_embeddings": 128, "num_experts": 6, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32}
    cfg = ModelConfig.from_hf(raw)
    validate_layout(cfg, Layout(world=4, tp=4, ep=4))          # 6 experts at ep=4: 2 2 1 1
    with pytest.raises(ConfigError, match="--ep 8 is larger than the number of experts"):
        validate_layout(cfg, Layout(world=8, tp=1, ep=8))          # wide EP over 8 ranks
