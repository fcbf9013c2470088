"""MoE backends against the torch reference: DeepSpeed's MoE (one process and 2-rank expert
parallelism, gloo on CPU), the canonical weight layout, parameter tagging, and MegaBlocks' adapter."""
from __future__ import annotations

import dataclasses
from datetime import timedelta

import deepspeed  # noqa: F401 - a hard requirement: an import error must fail this module, not skip it
import deepspeed.comm as ds_comm
import pytest
import torch
import torch.distributed as td
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from tcd_ds.config import ModelConfig, MoEConfig
from tcd_ds.gpucheck import canonical_grads
from tcd_ds.model.experts.dropless import (
    UNAVAILABLE, MegaBlocksMoE, canonical_to_megablocks, megablocks_to_canonical)
from tcd_ds.model.experts.expert_parallel import DeepSpeedMoE, ensure_expert_groups
from tcd_ds.model.hf import load_hf_state_dict, to_hf_state_dict
from tcd_ds.model.moe import build_moe
from trainer_utils import free_port

E, H, F_ = 4, 16, 32
KEYS = ("w1", "b1", "w2", "b2")


def _cfg(top_k: int = 1, cf: float = 0.0, ecf: float | None = None, backend: str = "deepspeed",
         ep: int = 1, z: float = 0.1, **moe) -> ModelConfig:
    cfg = ModelConfig(hidden_size=H, intermediate_size=F_, moe=MoEConfig(
        num_experts=E, top_k=top_k, capacity_factor=cf, eval_capacity_factor=cf if ecf is None else ecf,
        min_capacity=1, aux_loss_weight=0.01, z_loss_weight=z, backend=backend, ep_size=ep, **moe))
    cfg.validate()
    return cfg


def _reference(cfg: ModelConfig, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A torch-backend layer with large random weights and biases, and its canonical state dict."""
    ref = build_moe(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, backend="torch", ep_size=1)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return ref, _canonical(ref)


def _canonical(ref: nn.Module) -> dict[str, torch.Tensor]:
    return {"router.weight": ref.router.weight.detach().clone(),
            **{f"experts.{n}": getattr(ref.experts, n).detach().clone() for n in KEYS}}


def _ref_grads(ref: nn.Module) -> dict[str, torch.Tensor]:
    return canonical_grads(ref)


def _ds_grads(ds: DeepSpeedMoE) -> dict[str, torch.Tensor]:
    """DeepSpeed's parameter gradients in the canonical layout (like canonical_state_dict)."""
    return canonical_grads(ds)


def _inputs(seed: int, shape=(3, 10, H)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """Forward and backward of `sum(y * g) + stats.loss`; returns y, stats and the input gradient."""
    x = x.clone().requires_grad_(True)
    y, stats = layer(x)
    ((y * g).sum() + stats.loss).backward()
    return y.detach(), stats, x.grad


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


@pytest.fixture(scope="module")
def dist_group():
    """A world-size-1 gloo group with DeepSpeed's ep_size=1 expert groups (torn down afterwards)."""
    owned = not td.is_initialized()
    if owned:
        td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                              timeout=timedelta(seconds=60))
    ensure_expert_groups(1)
    yield
    if owned:
        ds_comm.destroy_process_group()  # also drops DeepSpeed's cached expert groups


# --------------------------------------------------------------------------- deepspeed == torch


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("cf", [0.0, float(E)], ids=["dropless", "capacity-never-full"])
def test_deepspeed_equals_torch(dist_group, top_k, cf):
    cfg = _cfg(top_k, cf)
    ref, sd = _reference(cfg)
    ds = DeepSpeedMoE(cfg)
    ds.load_canonical_state_dict(sd)
    x, g = _inputs(1)
    y_ref, s_ref, dx_ref = _run(ref, x, g)
    y_ds, s_ds, dx_ds = _run(ds, x, g)

    _close(y_ds, y_ref)
    _close(s_ds.balance_loss, s_ref.balance_loss)
    _close(s_ds.z_loss, s_ref.z_loss)
    _close(s_ds.loss, s_ref.loss)
    assert torch.equal(s_ds.counts, s_ref.counts)
    assert s_ds.counts.sum() == x.shape[0] * x.shape[1] * top_k  # all k choices, before dropping
    assert float(s_ds.dropped) == 0.0 == float(s_ref.dropped)
    _close(dx_ds, dx_ref)
    ref_grads, ds_grads = _ref_grads(ref), _ds_grads(ds)
    for name in ref_grads:
        _close(ds_grads[name], ref_grads[name], atol=1e-4)


def test_deepspeed_jitter_equals_torch(dist_group):
    """Training jitter U(1-j, 1+j) on the gate input only, drawn like the torch router's: same seed, same
    output (DeepSpeed's own 'Jitter' policy has a fixed epsilon of 0.01, so the backend applies ours)."""
    cfg = _cfg(2, jitter=0.3)
    ref, sd = _reference(cfg)
    ds = DeepSpeedMoE(cfg)
    ds.load_canonical_state_dict(sd)
    x, g = _inputs(6)
    torch.manual_seed(123)
    y_ref, s_ref, dx_ref = _run(ref, x, g)
    torch.manual_seed(123)
    y_ds, s_ds, dx_ds = _run(ds, x, g)
    _close(y_ds, y_ref)
    _close(s_ds.loss, s_ref.loss)
    _close(dx_ds, dx_ref)
    torch.manual_seed(7)
    assert not torch.allclose(ds(x)[0], y_ds)  # the noise is live in training


def test_deepspeed_reset_expert_parameters():
    ds = DeepSpeedMoE(_cfg(2))
    ds.reset_expert_parameters(0.5)
    sd = ds.canonical_state_dict()
    assert not sd["experts.b1"].any() and not sd["experts.b2"].any()
    for k in ("router.weight", "experts.w1", "experts.w2"):
        assert abs(sd[k].std().item() - 0.5) < 0.1, k


def test_deepspeed_eval_uses_eval_capacity(dist_group):
    """Training drops (capacity_factor > 0); eval with eval_capacity_factor=0 is dropless and exact."""
    cfg = _cfg(2, cf=0.25, ecf=0.0)
    ref, sd = _reference(cfg)
    ds = DeepSpeedMoE(cfg)
    ds.load_canonical_state_dict(sd)
    x, _ = _inputs(2)
    assert float(ds(x)[1].dropped) > 0
    ref.eval(), ds.eval()
    with torch.no_grad():
        (y_ref, _), (y_ds, s_ds) = ref(x), ds(x)
    _close(y_ds, y_ref)
    assert float(s_ds.dropped) == 0.0


@pytest.mark.parametrize("top_k", [1, 2])
def test_deepspeed_dropping_statistics(dist_group, top_k):
    """With a small capacity both drop the same number of assignments and report the same counts. (The
    outputs differ by design: DeepSpeed renormalises the gates over the kept choices, and its top-1 picks
    which tokens of a full expert survive with topk over a 0/1 mask; see the module docstring.)"""
    cfg = _cfg(top_k, cf=0.5)
    ref, sd = _reference(cfg)
    ds = DeepSpeedMoE(cfg)
    ds.load_canonical_state_dict(sd)
    x, _ = _inputs(3)
    with torch.no_grad():
        (_, s_ref), (_, s_ds) = ref(x), ds(x)
    assert float(s_ref.dropped) > 0
    _close(s_ds.dropped, s_ref.dropped)
    assert torch.equal(s_ds.counts, s_ref.counts)
    _close(s_ds.balance_loss, s_ref.balance_loss)


def test_deepspeed_needs_expert_groups():
    ds = DeepSpeedMoE(_cfg(1, ep=2))  # no ep_size_2 groups exist in this single process
    with pytest.raises(RuntimeError, match="ensure_expert_groups"):
        ds(torch.randn(2, 5, H))


def test_ensure_expert_groups_checks_ep_size(dist_group):
    with pytest.raises(ValueError, match="must divide the world size 1"):
        ensure_expert_groups(2)


def test_deepspeed_refuses_unnormalised_top_k():
    with pytest.raises(ValueError, match="normalize_top_k"):
        DeepSpeedMoE(_cfg(2, normalize_top_k=False))


# --------------------------------------------------------------------------- canonical layout


def test_deepspeed_canonical_round_trip(dist_group):
    cfg = _cfg(2)
    _, sd = _reference(cfg)
    ds = DeepSpeedMoE(cfg)
    ds.load_canonical_state_dict(sd)
    out = ds.canonical_state_dict()
    assert out.keys() == sd.keys()
    for k in sd:
        assert torch.equal(out[k], sd[k]), k
    assert ds.gate.weight.shape == (E, H) and ds.local_experts[0].fc1.weight.shape == (F_, H)
    with pytest.raises(ValueError, match="hold 3 experts"):
        ds.load_canonical_state_dict({k: v[:3] if k.startswith("experts.") else v for k, v in sd.items()})


def test_deepspeed_hf_export_loads_into_torch_backend(dist_group):
    """`to_hf_state_dict` writes DeepSpeed layers in the canonical layout, which the torch backend loads
    as is, and back: the same function either way."""
    class Holder(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.bert = nn.Module()
            self.bert.moe = layer

    cfg = _cfg(2)
    ref, sd = _reference(cfg, seed=5)
    ds = Holder(DeepSpeedMoE(cfg))
    ds.bert.moe.load_canonical_state_dict(sd)
    exported = to_hf_state_dict(ds)
    assert sorted(exported) == sorted(f"bert.moe.{k}" for k in sd)
    torch_model = Holder(_reference(cfg, seed=9)[0])
    load_hf_state_dict(torch_model, exported)
    ds2 = Holder(DeepSpeedMoE(cfg))
    load_hf_state_dict(ds2, to_hf_state_dict(Holder(ref)))
    x, _ = _inputs(4)
    with torch.no_grad():
        _close(torch_model.bert.moe(x)[0], ds.bert.moe(x)[0])
        _close(ds2.bert.moe(x)[0], ref(x)[0])


def test_megablocks_layout_conversion():
    """MegaBlocks' GroupedMLP computes act(x @ w1.view(E, F, H)[e].T) @ w2.view(E, F, H)[e] with both
    weights stored [E*F, H]: the conversion must give the canonical expert the same function."""
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(E, H, F_, generator=gen), torch.randn(E, F_, H, generator=gen)
    mb1, mb2 = canonical_to_megablocks(w1, w2)
    assert mb1.shape == mb2.shape == (E * F_, H)
    x = torch.randn(7, H, generator=gen)
    for e in range(E):
        mb_out = torch.nn.functional.gelu(x @ mb1.view(E, F_, H)[e].t()) @ mb2.view(E, F_, H)[e]
        _close(mb_out, torch.nn.functional.gelu(x @ w1[e]) @ w2[e])
    back1, back2 = megablocks_to_canonical(mb1, mb2, E)
    assert torch.equal(back1, w1) and torch.equal(back2, w2)


# --------------------------------------------------------------------------- megablocks


def _megablocks_usable() -> bool:
    try:
        import megablocks.layers.dmoe  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_megablocks_usable(), reason="megablocks runs here: test_megablocks_backend checks it")
def test_megablocks_backend_refused_without_gpu():
    """Without megablocks or a GPU (here): one clear RuntimeError, from the class and from build_moe."""
    cfg = _cfg(2, backend="megablocks")
    for make in (MegaBlocksMoE, build_moe):
        with pytest.raises(RuntimeError) as err:
            make(cfg)
        assert str(err.value) == UNAVAILABLE
        assert "needs the megablocks package and an NVIDIA GPU" in str(err.value)
        assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not _megablocks_usable(), reason="needs megablocks and an NVIDIA GPU (requirements-gpu.txt)")
def test_megablocks_backend():
    """Where megablocks runs (a GPU node): bias-free weights give the torch backend's function."""
    cfg = _cfg(2, backend="megablocks")
    ref, sd = _reference(cfg)
    with torch.no_grad():
        ref.experts.b1.zero_(), ref.experts.b2.zero_()
    sd = _canonical(ref)
    mb = MegaBlocksMoE(cfg)
    mb.load_canonical_state_dict({k: v.cuda() for k, v in sd.items()})
    ref.cuda()
    x, g = (t.cuda() for t in _inputs(1))
    y_ref, s_ref, dx_ref = _run(ref, x, g)
    y_mb, s_mb, dx_mb = _run(mb, x, g)
    _close(y_mb, y_ref, atol=1e-4)
    _close(s_mb.loss, s_ref.loss)
    assert torch.equal(s_mb.counts, s_ref.counts)
    _close(dx_mb, dx_ref, atol=1e-4)
    for k, v in mb.canonical_state_dict().items():
        _close(v, sd[k].cuda())


# --------------------------------------------------------------------------- parameter tagging


def _expert_params(layer: nn.Module) -> list[nn.Parameter]:
    return list(layer.local_experts.parameters() if isinstance(layer, DeepSpeedMoE) else layer.experts.parameters())


@pytest.mark.parametrize("backend,ep", [("torch", 1), ("grouped", 1), ("deepspeed", 1), ("deepspeed", 2)])
def test_expert_params_tagged(backend, ep):
    cfg = _cfg(2, backend=backend, ep=ep)
    layer = build_moe(cfg)
    experts = _expert_params(layer)
    assert experts
    for p in experts:
        assert p.allreduce is False and p.group_name == f"ep_size_{ep}"
        assert p.active_fraction == pytest.approx(cfg.moe.top_k / (E // ep))
    expert_ids = {id(p) for p in experts}
    shared = [p for p in layer.parameters() if id(p) not in expert_ids]
    assert len(shared) == 1 and shared[0].shape == (E, H)  # the router / gate, all-reduced as usual
    assert getattr(shared[0], "allreduce", True) is not False

    groups = split_params_into_different_moe_groups_for_optimizer(
        [{"name": "params", "params": list(layer.parameters()), "lr": 1e-3}])
    moe_groups = [g for g in groups if g.get("moe")]
    assert {g["name"] for g in moe_groups} == {f"ep_size_{ep}"}
    assert sorted(id(p) for g in moe_groups for p in g["params"]) == sorted(expert_ids)
    assert [id(p) for g in groups if not g.get("moe") for p in g["params"]] == [id(shared[0])]


# --------------------------------------------------------------------------- 2-rank expert parallelism


def _ep_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                          timeout=timedelta(seconds=60))
    try:
        ensure_expert_groups(2)
        for top_k in (1, 2):
            cfg = _cfg(top_k, ep=2)
            ref, sd = _reference(cfg)  # the same full weights on both ranks
            ds = DeepSpeedMoE(cfg)
            ds.load_canonical_state_dict(sd)
            local = slice(rank * (E // 2), (rank + 1) * (E // 2))
            assert ds.local_expert_offset == local.start
            assert torch.equal(ds.canonical_state_dict()["experts.w1"], sd["experts.w1"][local])
            inputs = [_inputs(10 + r, shape=(2, 6 + 3 * r, H)) for r in range(2)]  # ranks differ in tokens
            y, stats, dx = _run(ds, *inputs[rank])

            ref_out, expert_grads = None, {}
            for r, (x, g) in enumerate(inputs):
                ref.zero_grad()
                out = _run(ref, x, g)
                grads = _ref_grads(ref)
                if r == rank:
                    ref_out, router_grad = out, grads["router.weight"].clone()
                for k, v in grads.items():  # expert gradients sum over every rank's tokens
                    expert_grads[k] = expert_grads.get(k, 0) + v[local]
            y_ref, s_ref, dx_ref = ref_out
            _close(y, y_ref)
            _close(stats.balance_loss, s_ref.balance_loss)
            assert torch.equal(stats.counts, s_ref.counts)
            _close(dx, dx_ref)
            ds_grads = _ds_grads(ds)
            _close(ds_grads["router.weight"], router_grad, atol=1e-4)  # the gate is not reduced here
            for k in ("experts.w1", "experts.b1", "experts.w2", "experts.b2"):
                _close(ds_grads[k], expert_grads[k], atol=1e-4)
    finally:
        ds_comm.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiproc
def test_deepspeed_expert_parallel_two_ranks():
    """ep_size=2 over two gloo processes: each holds half the experts, tokens cross by all-to-all, and
    outputs and gradients equal the torch reference on the full weights."""
    torch.multiprocessing.spawn(_ep_worker, args=(free_port(),), nprocs=2, join=True)


# --------------------------------------------------------------------------- initialisation


def _init_model(backend: str, ep: int, seed: int = 11):
    from tcd_ds.model.bert import BertForMaskedLM

    cfg = ModelConfig(vocab_size=50, hidden_size=H, num_layers=2, num_heads=2, intermediate_size=F_, max_position=16,
                      moe=MoEConfig(num_experts=E, top_k=2, backend=backend, ep_size=ep))
    cfg.validate()
    torch.manual_seed(seed)
    return BertForMaskedLM(cfg)


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    return [layer.moe for layer in model.bert.encoder.layer]


def _non_expert_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".moe." not in k}


def _init_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                          timeout=timedelta(seconds=60))
    try:
        full = _init_model("deepspeed", 1)  # ep_size 1: every expert on this rank
        for when in ("before the expert groups exist (as in the trainer)", "with the expert groups"):
            if when.startswith("with"):
                ensure_expert_groups(2)
            half = _init_model("deepspeed", 2)
            for a, b in zip(_moe_layers(full), _moe_layers(half)):
                sa, sb = a.canonical_state_dict(), b.canonical_state_dict()
                assert torch.equal(sa["router.weight"], sb["router.weight"]), when
                for key in ("experts.w1", "experts.w2", "experts.b1", "experts.b2"):
                    parts = [torch.empty_like(sb[key]) for _ in range(2)]
                    td.all_gather(parts, sb[key].contiguous())
                    assert torch.equal(torch.cat(parts), sa[key]), (when, key)  # gathered at ep 2 == ep 1
                w1 = sa["experts.w1"]
                assert all(not torch.equal(w1[i], w1[j]) for i in range(E) for j in range(i)), when  # all differ
            for k, v in _non_expert_state(full).items():  # the same RNG stream whatever ep_size
                assert torch.equal(_non_expert_state(half)[k], v), (when, k)
    finally:
        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        else:
            td.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiproc
def test_expert_init_does_not_depend_on_ep_size():
    """Two ranks, ep_size 2: the experts gathered from both ranks equal those an ep_size 1 model builds for
    the same seed (not copies of the local ones), and every other weight is the same too."""
    torch.multiprocessing.spawn(_init_worker, args=(free_port(),), nprocs=2, join=True)


def test_expert_init_is_the_same_in_every_backend():
    """Resetting an MoE layer from the same RNG state gives every backend the same router and experts."""
    states = {}
    for backend in ("torch", "grouped", "deepspeed"):
        layer = build_moe(_cfg(2, backend=backend))
        torch.manual_seed(3)
        layer.reset_expert_parameters(0.02)
        states[backend] = layer.canonical_state_dict() if isinstance(layer, DeepSpeedMoE) else _canonical(layer)
    for backend in ("grouped", "deepspeed"):
        for k, v in states["torch"].items():
            assert torch.equal(states[backend][k], v), (backend, k)
    w1 = states["torch"]["experts.w1"]
    assert abs(w1.std().item() - 0.02) < 0.005 and not torch.equal(w1[0], w1[1])


def test_a_seed_builds_the_same_model_in_every_backend():
    """The same seed gives the same weights whichever backend builds the model: the non-expert ones
    (embeddings, attention, the dense layers after an MoE layer) and the routers and experts. The
    backends' constructors draw different amounts from the global RNG (they did shift every later
    weight: step-0 loss 4.662 vs 4.674); `build_moe` runs them on a forked RNG."""
    models, next_draw = {}, {}
    for backend in ("torch", "grouped", "deepspeed"):
        models[backend] = _init_model(backend, 1)
        next_draw[backend] = torch.randint(0, 2 ** 30, ()).item()  # the RNG stream goes on alike (dropout)
    ref = models["torch"]
    for backend in ("grouped", "deepspeed"):
        for k, v in _non_expert_state(ref).items():
            assert torch.equal(_non_expert_state(models[backend])[k], v), (backend, k)
        for a, b in zip(_moe_layers(ref), _moe_layers(models[backend])):
            other = b.canonical_state_dict() if isinstance(b, DeepSpeedMoE) else _canonical(b)
            for k, v in _canonical(a).items():
                assert torch.equal(other[k], v), (backend, k)
    assert len(set(next_draw.values())) == 1, next_draw


def test_num_parameters_counts_the_global_model_under_expert_parallelism(monkeypatch):
    """`ep_size` 2 holds half the experts on each rank; the model (summary.json's `parameters`) has all
    of them, and its active count (top_k experts per token) does not depend on ep_size either."""
    from tcd_ds.model.bert import num_parameters

    monkeypatch.setattr(DeepSpeedMoE, "init_expert_offset", lambda self: 0)  # rank 0 of 2, in one process
    full, half = _init_model("torch", 1), _init_model("deepspeed", 2)
    assert len(_moe_layers(half)[0].local_experts) == E // 2
    assert num_parameters(half) == num_parameters(full)
    assert num_parameters(half, active=True) == num_parameters(full, active=True) < num_parameters(full)


@pytest.mark.parametrize("backend", ["torch", "grouped", "deepspeed"])
def test_moe_layer_is_initialised_by_its_constructor(backend, monkeypatch):
    """A layer built and used without `init_weights` never routes on uninitialised memory: with
    torch.empty returning NaN, every parameter of a freshly built layer is still finite."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    layer = build_moe(_cfg(2, backend=backend))
    monkeypatch.setattr(torch, "empty", real_empty)
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all(), name
    router = layer.gate.weight if isinstance(layer, DeepSpeedMoE) else layer.router.weight
    assert router.abs().max() > 0
