"""The MoE FFN: routing, router losses by hand, capacity dropping, backend equivalence, tags."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tcd_ds.config import ConfigError, ModelConfig, MoEConfig
from tcd_ds.model.bert import BertForMaskedLM, Intermediate, ResidualOutput
from tcd_ds.model.moe import MoELayer, build_moe
from tcd_ds.model.routing import capacity


def moe_layer(hidden=8, inter=16, **moe) -> MoELayer:
    cfg = ModelConfig(hidden_size=hidden, num_heads=1, intermediate_size=inter, moe=MoEConfig(**moe))
    cfg.validate()
    layer = build_moe(cfg)
    layer.reset_expert_parameters(0.5)
    return layer


def test_one_expert_moe_equals_dense_ffn():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=8, num_heads=1, intermediate_size=16)
    inter, out = Intermediate(cfg), ResidualOutput(cfg, 16)
    layer = moe_layer(num_experts=1)
    with torch.no_grad():
        layer.experts.w1[0].copy_(inter.dense.weight.t())
        layer.experts.b1[0].copy_(inter.dense.bias)
        layer.experts.w2[0].copy_(out.dense.weight.t())
        layer.experts.b2[0].copy_(out.dense.bias)
    x = torch.randn(3, 5, 8)
    y, stats = layer(x)
    assert torch.allclose(y, out.dense(inter(x)), atol=1e-6)
    assert stats.balance_loss.item() == pytest.approx(1.0)  # one expert: f = P = 1
    assert stats.counts.tolist() == [15]


def test_balance_and_z_loss_match_hand_computed_values():
    layer = moe_layer(hidden=2, inter=8, num_experts=2, aux_loss_weight=0.1, z_loss_weight=0.01)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))  # logits = x
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    _, stats = layer(x[None])
    # softmax([a, 0]) = sigmoid(a): p0 = s(2), s(1), s(3), 1 - s(1); first choices 0, 0, 0, 1
    s = lambda a: 1 / (1 + math.exp(-a))  # noqa: E731
    p0 = (s(2) + s(1) + s(3) + (1 - s(1))) / 4
    balance = 2 * (0.75 * p0 + 0.25 * (1 - p0))
    z = (math.log(math.exp(2) + 1) ** 2 + math.log(math.exp(1) + 1) ** 2 + math.log(math.exp(3) + 1) ** 2
         + math.log(1 + math.exp(1)) ** 2) / 4
    assert stats.balance_loss.item() == pytest.approx(balance, rel=1e-6)  # 1.2083...
    assert stats.z_loss.item() == pytest.approx(z, rel=1e-6)
    assert stats.loss.item() == pytest.approx(0.1 * balance + 0.01 * z, rel=1e-6)
    assert stats.counts.tolist() == [3, 1]


def test_capacity_drops_later_tokens_of_a_full_expert():
    # 6 tokens, 2 experts, top-1: tokens 0,1,2,4,5 choose expert 0 and token 3 expert 1.
    # capacity = max(1, ceil(0.5 * 6 * 1 / 2)) = 2: expert 0 serves tokens 0 and 1 only.
    layer = moe_layer(hidden=8, inter=8, num_experts=2, capacity_factor=0.5, min_capacity=1)
    assert capacity(6, layer.cfg, training=True) == 2
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
        layer.router.weight[1, 1] = 1.0
    x = torch.randn(6, 8) * 0.1
    x[:, 0] += torch.tensor([2.0, 2.0, 2.0, -2.0, 2.0, 2.0])
    x[:, 1] += torch.tensor([0.0, 0.0, 0.0, 2.0, 0.0, 0.0])
    y, stats = layer.train()(x[None])
    y = y[0]
    kept = torch.tensor([True, True, False, True, False, False])
    assert torch.all(y[~kept] == 0)
    assert torch.all(y[kept].abs().sum(-1) > 0)
    assert stats.dropped.item() == pytest.approx(3 / 6)
    assert stats.counts.tolist() == [5, 1]  # counted before dropping
    # dropless reference for the kept tokens: same values
    layer.cfg.capacity_factor = 0.0
    y_all, _ = layer(x[None])
    assert torch.allclose(y, y_all[0] * kept[:, None])


def test_capacity_serves_all_first_choices_before_second_choices():
    # top-2 over 2 experts: every token uses both. Tokens 0-2 prefer expert 0, token 3 prefers 1.
    # capacity = max(1, ceil(0.5 * 4 * 2 / 2)) = 2 per expert. Expert 0 first serves the first
    # choices of tokens 0 and 1 (token 2's first choice is dropped: capacity reached) and never the
    # second choice of token 3; expert 1 serves token 3's first choice, then token 0's second.
    layer = moe_layer(hidden=8, inter=8, num_experts=2, top_k=2, capacity_factor=0.5, min_capacity=1,
                      normalize_top_k=False)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
    x = torch.zeros(4, 8)
    x[:, 0] = torch.tensor([3.0, 2.0, 1.0, -1.0])
    x[:, 1:] = torch.randn(4, 7) * 0.1
    routing = layer.router(x)
    from tcd_ds.model.routing import plan_dispatch
    plan = plan_dispatch(routing, 2, 2)
    assert plan.expert.tolist() == [0, 0, 1, 1]
    assert plan.token.tolist() == [0, 1, 3, 0]
    assert plan.dropped.item() == pytest.approx(4 / 8)


@pytest.mark.parametrize("top_k,cf", [(1, 0.0), (2, 0.0), (1, 1.25), (2, 2.0)])
def test_grouped_backend_equals_torch_reference(top_k, cf):
    torch.manual_seed(top_k)
    ref = moe_layer(hidden=16, inter=32, num_experts=8, top_k=top_k, capacity_factor=cf, backend="torch")
    grp = moe_layer(hidden=16, inter=32, num_experts=8, top_k=top_k, capacity_factor=cf, backend="grouped")
    grp.load_state_dict(ref.state_dict())
    x1 = torch.randn(3, 10, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    (y1, s1), (y2, s2) = ref(x1), grp(x2)
    assert torch.allclose(y1, y2, atol=1e-5)
    assert torch.equal(s1.counts, s2.counts) and s1.dropped == s2.dropped
    g = torch.randn_like(y1)
    (y1 * g).sum().add(s1.loss).backward()
    (y2 * g).sum().add(s2.loss).backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    for (name, p), q in zip(ref.named_parameters(), grp.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_grouped_backend_runs_in_bf16():
    torch.manual_seed(0)
    ref = moe_layer(hidden=16, inter=32, num_experts=4, backend="torch").to(torch.bfloat16)
    grp = moe_layer(hidden=16, inter=32, num_experts=4, backend="grouped").to(torch.bfloat16)
    grp.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 16, dtype=torch.bfloat16)
    y1, y2 = ref(x)[0], grp(x)[0]
    assert y2.dtype == torch.bfloat16
    assert torch.allclose(y1.float(), y2.float(), atol=2e-2)


def test_grouped_backend_rejects_unaligned_sizes():
    with pytest.raises(ValueError, match="multiples of 8"):
        moe_layer(hidden=12, inter=32, num_experts=2, backend="grouped")


def test_jitter_only_in_training():
    torch.manual_seed(0)
    layer = moe_layer(num_experts=4, jitter=0.5)
    x = torch.randn(2, 8, 8)
    layer.eval()
    assert torch.equal(layer.router(x.view(-1, 8)).logits, layer.router(x.view(-1, 8)).logits)
    layer.train()
    assert not torch.equal(layer.router(x.view(-1, 8)).logits, layer.router(x.view(-1, 8)).logits)


def test_moe_every_places_moe_layers():
    cfg = ModelConfig(num_layers=4, moe=MoEConfig(num_experts=4, moe_every=2))
    model = BertForMaskedLM(cfg)
    assert [layer.is_moe for layer in model.bert.encoder.layer] == [False, True, False, True]
    cfg.moe.moe_every = 1
    assert all(cfg.is_moe_layer(i) for i in range(4))


def test_expert_params_are_tagged_for_deepspeed():
    model = BertForMaskedLM(ModelConfig(moe=MoEConfig(num_experts=4)))
    tagged = {n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False}
    assert tagged == {f"bert.encoder.layer.{i}.moe.experts.{w}" for i in range(2) for w in ("w1", "b1", "w2", "b2")}
    assert {p.group_name for p in model.parameters() if hasattr(p, "group_name")} == {"ep_size_1"}
    router = model.bert.encoder.layer[0].moe.router.weight
    assert not hasattr(router, "allreduce")  # the router is replicated and all-reduced like dense weights


def test_moe_config_errors():
    with pytest.raises(ConfigError, match="ep_size=2 needs model.moe.backend=deepspeed"):
        MoEConfig(num_experts=4, ep_size=2).validate()
    with pytest.raises(ConfigError, match="ep_size=3 must divide model.moe.num_experts=4"):
        MoEConfig(num_experts=4, ep_size=3, backend="deepspeed").validate()
    with pytest.raises(ConfigError, match="top_k must be in"):
        MoEConfig(num_experts=2, top_k=3).validate()
    with pytest.raises(ConfigError, match="backend must be one of"):
        MoEConfig(num_experts=2, backend="tutel").validate()


def test_dropped_tokens_still_train_through_the_residual():
    layer = moe_layer(num_experts=2, capacity_factor=0.1, min_capacity=1)
    x = torch.randn(1, 20, 8, requires_grad=True)
    y, stats = layer.train()(x)
    assert stats.dropped.item() > 0.5
    F.mse_loss(y, torch.zeros_like(y)).backward()
    assert torch.isfinite(x.grad).all()


def _per_token_reference(x, router_w, w1, b1, w2, b2, top_k: int, aux_w: float, z_w: float, probe):
    """The MoE layer's objective `sum(y * probe) + aux_w * balance + z_w * z`, token by token in float64
    from the canonical weights: softmax router, top-k, gates renormalised over the k choices, expert
    e = gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]; Switch balance E * sum_e f_e * mean_t p_te with f_e the
    (constant) fraction of first choices; z = mean_t logsumexp^2."""
    num_experts = router_w.shape[0]
    ys, probs, lses, first = [], [], [], []
    for t in range(x.shape[0]):
        logits = router_w @ x[t]
        p = logits.softmax(-1)
        gate, chosen = p.topk(top_k)
        gate = gate / gate.sum() if top_k > 1 else gate
        y = sum(g * (F.gelu(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]) for g, e in zip(gate, chosen.tolist()))
        ys.append(y)
        probs.append(p)
        lses.append(torch.logsumexp(logits, -1))
        first.append(int(chosen[0]))
    probs = torch.stack(probs)
    fraction = torch.bincount(torch.tensor(first), minlength=num_experts).double() / x.shape[0]
    balance = num_experts * (fraction * probs.mean(0)).sum()
    z = torch.stack(lses).square().mean()
    return (torch.stack(ys) * probe).sum() + aux_w * balance + z_w * z


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "grouped"])
def test_router_gradient_equals_a_float64_per_token_reference(backend, top_k):
    """The router's gradient (through the gates into the output, and through the balance and z
    losses) and the input's gradient equal autograd's through a per-token float64 computation of the
    same objective: no other backend is the reference, so a router left without a gradient through
    the gate (or a gate that is not the renormalised top-k probability) is caught here."""
    torch.manual_seed(0)
    layer = moe_layer(num_experts=4, top_k=top_k, aux_loss_weight=0.3, z_loss_weight=0.1, backend=backend)
    x = torch.randn(2, 5, 8, requires_grad=True)
    probe = torch.randn(2, 5, 8)
    y, stats = layer(x)
    ((y * probe).sum() + stats.loss).backward()

    ref_params = {"router_w": layer.router.weight, **{k: getattr(layer.experts, k) for k in ("w1", "b1", "w2", "b2")}}
    ref = {k: v.detach().double().requires_grad_(True) for k, v in ref_params.items()}
    x64 = x.detach().double().reshape(-1, 8).requires_grad_(True)
    objective = _per_token_reference(x64, **ref, top_k=top_k, aux_w=0.3, z_w=0.1, probe=probe.double().reshape(-1, 8))
    grads = torch.autograd.grad(objective, [ref["router_w"], x64])
    through_gate = grads[0].abs().max()
    assert through_gate > 1e-2  # the gate's pull on the router, not only the router losses'
    torch.testing.assert_close(layer.router.weight.grad.double(), grads[0], rtol=1e-4, atol=1e-5 * through_gate)
    torch.testing.assert_close(x.grad.double().reshape(-1, 8), grads[1], rtol=1e-4, atol=1e-6)
