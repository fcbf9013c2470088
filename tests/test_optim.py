"""The optimizer's rules in every MoE backend, the LR schedule on skipped steps, and the router's
gradient through the trainer's step (DeepSpeed engines in this process, a gloo world of one)."""
from __future__ import annotations

import copy
import json
import re
from datetime import timedelta

import deepspeed.comm as ds_comm
import pytest
import torch
import torch.distributed as td

from tcd_ds import train as trainer
from tcd_ds.config import DistillConfig, ModelConfig, MoEConfig, build_config
from tcd_ds.distill.objective import RelationObjective
from tcd_ds.distill.taps import Taps, tap_points
from tcd_ds.distill.teacher import FrozenTeacher
from tcd_ds.model.bert import BertForMaskedLM, BertModel
from tcd_ds.optim import lr_lambda, param_groups

from trainer_utils import REPO, free_port

E, H, V, S = 4, 16, 60, 12
BACKENDS = ("torch", "grouped", "deepspeed")
OVERRIDES = ["mode=moe", f"model.vocab_size={V}", f"model.hidden_size={H}", "model.intermediate_size=32",
             "model.num_heads=2", "model.num_layers=2", "model.max_position=16", "data.max_seq_len=16",
             f"model.moe.num_experts={E}", "model.moe.top_k=2", "model.hidden_dropout=0",
             "model.attention_dropout=0", "train.warmup_steps=3", "train.max_steps=10", "train.micro_batch_size=2",
             "train.lr=0.01", "train.weight_decay=0.1"]


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo world of one process, with the environment DeepSpeed's engine expects of a launcher."""
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            env.setenv(key, value)
        owned = not td.is_initialized()
        if owned:
            td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                  timeout=timedelta(seconds=60))
        yield
        if owned:
            if ds_comm.is_initialized():
                ds_comm.destroy_process_group()  # also drops DeepSpeed's cached expert groups
            else:
                td.destroy_process_group()


# --------------------------------------------------------------------------- parameter groups

_DS_EXPERT = re.compile(r"^(.*)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(fc1|fc2)\.(weight|bias)$")
_DS_GATE = re.compile(r"^(.*)\.moe\.deepspeed_moe\.gate\.wg\.weight$")
_BANK = re.compile(r"^(.*)\.moe\.experts\.(w1|b1|w2|b2)$")
_CANONICAL = {("fc1", "weight"): "w1", ("fc1", "bias"): "b1", ("fc2", "weight"): "w2", ("fc2", "bias"): "b2"}


def _logical(name: str, p: torch.Tensor) -> list[str]:
    """The backend-independent names a parameter holds: one per expert for a stacked expert bank."""
    if m := _DS_EXPERT.match(name):
        return [f"{m[1]}.experts.{_CANONICAL[(m[3], m[4])]}[{m[2]}]"]  # m[1] ends in the layer's .moe
    if m := _DS_GATE.match(name):
        return [f"{m[1]}.router.weight"]
    if _BANK.match(name):
        return [f"{name}[{e}]" for e in range(p.shape[0])]
    return [name]


def test_every_backend_puts_the_same_parameters_in_the_same_group():
    """Weight decay by role: expert biases are biases whether stacked [E, F] (torch, grouped) or 1-D
    (deepspeed), so every backend trains the same logical parameters the same way."""
    decay_of = {}
    for backend in BACKENDS:
        cfg = build_config("tiny", OVERRIDES + [f"model.moe.backend={backend}"])
        model = BertForMaskedLM(cfg.student_model())
        groups = param_groups(model, 0.1)
        group_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        assert sum(len(g["params"]) for g in groups) == len(group_of) == len(list(model.parameters()))
        decay_of[backend] = {ln: group_of[id(p)] for n, p in model.named_parameters() for ln in _logical(n, p)}
    for backend in BACKENDS[1:]:
        assert decay_of[backend] == decay_of["torch"], backend
    d, moe = decay_of["torch"], "bert.encoder.layer.0.moe."
    assert all(d[f"{moe}experts.{b}[{e}]"] == 0.0 for b in ("b1", "b2") for e in range(E))
    assert all(d[f"{moe}experts.{w}[{e}]"] == 0.1 for w in ("w1", "w2") for e in range(E))
    assert d[f"{moe}router.weight"] == 0.1 and d["bert.embeddings.word_embeddings.weight"] == 0.1
    assert d["bert.encoder.layer.0.attention.output.LayerNorm.weight"] == 0.0 == d["cls.predictions.bias"]
    assert d["bert.encoder.layer.0.attention.self.query.bias"] == 0.0
    assert d["bert.encoder.layer.0.attention.self.query.weight"] == 0.1


# --------------------------------------------------------------------------- the LR schedule


# (warmup_steps, total_steps, schedule, min_lr_ratio) -> the factor of steps 0, 1, 2, ... by hand
SCHEDULES = {
    (4, 10, "linear", 0.0): [1 / 4, 2 / 4, 3 / 4, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0, 0.0],
    (3, 9, "linear", 0.0): [1 / 3, 2 / 3, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0],
    (2, 6, "cosine", 0.0): [1 / 2, 1.0, 1.0, (1 + 2 ** -0.5) / 2, 1 / 2, (1 - 2 ** -0.5) / 2, 0.0, 0.0],
    (2, 6, "linear", 0.1): [1 / 2, 1.0, 1.0, 0.1 + 0.9 * 3 / 4, 0.1 + 0.9 / 2, 0.1 + 0.9 / 4, 0.1, 0.1],
    (0, 4, "linear", 0.0): [1.0, 3 / 4, 2 / 4, 1 / 4, 0.0],
}


@pytest.mark.parametrize("key", list(SCHEDULES), ids=lambda k: "-".join(map(str, k)))
def test_the_lr_schedule_is_the_hand_computed_one(key):
    """Step n (0-based, the LR of the n-th applied step) warms up linearly to 1 over `warmup_steps`
    steps ((n + 1) / warmup, so step warmup - 1 is the first at the peak), then decays to min_lr_ratio
    at total_steps; never above 1. Pinned to values worked out by hand, not to lr_lambda itself: a
    warm-up one step too long (4/3 at its end) passed every test that compared with lr_lambda."""
    from tcd_ds.config import TrainConfig
    from tcd_ds.optim import GuardedLambdaLR, warmup_decay

    warmup, total, schedule, floor = key
    expected = SCHEDULES[key]
    factors = [warmup_decay(warmup, total, schedule, floor)(n) for n in range(len(expected))]
    assert factors == pytest.approx(expected, abs=1e-12)
    assert max(warmup_decay(warmup, total, schedule, floor)(n) for n in range(3 * total)) <= 1.0
    # the trainer's schedule object: LR of the first step, then after each applied step
    t = TrainConfig(lr=2e-3, warmup_steps=warmup, max_steps=total, schedule=schedule, min_lr_ratio=floor)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched, lrs = GuardedLambdaLR(opt, lr_lambda(t)), []
    for _ in expected:
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([t.lr * f for f in expected], rel=1e-12, abs=1e-18)


# --------------------------------------------------------------------------- engines


def _engine(tmp_path, overrides: list[str], stage: int = 2):
    cfg = build_config("tiny", OVERRIDES + overrides)
    ds_file = tmp_path / f"zero{stage}.json"
    ds = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    ds_file.write_text(json.dumps(ds))
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg.student_model())
    engine, optimizer, scheduler = trainer.build_engine(cfg, model, trainer.load_ds_config(
        str(ds_file), cfg, torch.device("cpu")))
    return cfg, engine, optimizer, scheduler


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (2, S), generator=gen)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, S - 3:] = 0
    labels = torch.where(torch.rand(2, S, generator=gen) < 0.4, ids, -100)
    labels[:, 0] = ids[:, 0]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": labels.masked_fill(mask == 0, -100)}


def test_a_skipped_step_does_not_advance_the_lr_schedule(world_of_one, tmp_path):
    """Steps skipped by our guard (a non-finite loss: the trainer back-propagates an exact zero and asks
    for a skip) and steps with non-finite gradients leave the weights and the LR schedule as they were,
    as DeepSpeed does for the steps it skips itself: after n applied steps the LR is lr * lr_lambda(n)."""
    cfg, engine, optimizer, scheduler = _engine(tmp_path, [])
    kinds = ["ok", "nonfinite-loss", "ok", "nonfinite-grad", "nonfinite-loss", "ok"]
    applied, lrs, expected = 0, [], []
    for i, kind in enumerate(kinds):
        batch = _batch(i)
        before = {k: v.clone() for k, v in engine.module.state_dict().items()}
        optimizer.begin_step()
        out = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"])
        loss = out.loss
        if kind == "nonfinite-loss":  # what the trainer does when a loss term is not finite
            optimizer.skip_requested = True
            loss = sum(p.sum() * 0.0 for p in engine.module.parameters())
        elif kind == "nonfinite-grad":
            poison = next(engine.module.parameters()).sum() * 0.0
            poison.register_hook(lambda g: g * float("nan"))
            loss = loss + poison
        engine.backward(loss)
        engine.step()
        skipped = optimizer.skipped or bool(getattr(engine.optimizer, "overflow", False))
        assert skipped == (kind != "ok"), (i, kind)
        after = engine.module.state_dict()
        changed = any(not torch.equal(after[k], v) for k, v in before.items())
        assert changed == (kind == "ok"), (i, kind)
        applied += kind == "ok"
        lrs.append(scheduler.get_last_lr()[0])
        expected.append(cfg.train.lr * lr_lambda(cfg.train)(applied))
    assert lrs == pytest.approx(expected, rel=1e-12), (lrs, expected)


# --------------------------------------------------------------------------- router gradient


def _router_weight(moe: torch.nn.Module) -> torch.nn.Parameter:
    return moe.gate.weight if hasattr(moe, "gate") else moe.router.weight


def _expected_router_loss_grad(h: torch.Tensor, weight: torch.Tensor, aux_w: float, z_w: float) -> torch.Tensor:
    """d/dW of aux_w * Switch balance + z_w * z-loss, recomputed in float64 from the router's input:
    balance = E * sum_e f_e * mean_t softmax(x W^T)_te (f_e: fraction of first choices, constant),
    z = mean_t logsumexp(x W^T)_t^2."""
    w = weight.detach().double().requires_grad_(True)
    logits = h.detach().reshape(-1, h.shape[-1]).double() @ w.T
    probs = logits.softmax(-1)
    fraction = torch.bincount(probs.argmax(-1), minlength=w.shape[0]).double() / probs.shape[0]
    balance = w.shape[0] * (fraction * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    (grad,) = torch.autograd.grad(aux_w * balance + z_w * z, w)
    return grad


@pytest.mark.parametrize("mode", ["moe", "tcd"])
@pytest.mark.parametrize("z_weight", [0.0, 0.1], ids=["balance", "balance+z"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_router_gradient_includes_the_router_losses_through_the_trainer_step(world_of_one, tmp_path, backend,
                                                                             z_weight, mode):
    """The gradient the trainer's step (`forward_loss` + `engine.backward`) leaves on the router is that
    of the MLM (+ relation) loss plus aux_loss_weight * balance + z_loss_weight * z: switching the router
    losses' weights off changes it by exactly their float64-recomputed gradient (one MoE layer, the last,
    so the router losses reach its router directly)."""
    aux_weight = 0.5
    cfg, engine, _, _ = _engine(tmp_path, [f"model.moe.backend={backend}", "model.moe.moe_every=2",
                                           f"model.moe.aux_loss_weight={aux_weight}",
                                           f"model.moe.z_loss_weight={z_weight}"], stage=0)
    model = engine.module
    taps = teacher = objective = None
    if mode == "tcd":
        tcfg = ModelConfig(vocab_size=V, hidden_size=H, num_layers=2, num_heads=2, intermediate_size=32,
                           max_position=16, hidden_dropout=0.0, attention_dropout=0.0)
        torch.manual_seed(1)
        distill = DistillConfig()
        teacher = FrozenTeacher(BertModel(tcfg), distill.positions, distill.include_embeddings, tcfg.num_layers)
        objective = RelationObjective(distill, 2, 2)
        taps = Taps(tap_points(model, distill.positions, distill.include_embeddings))
    moe_layer = model.bert.encoder.layer[1].moe
    router = _router_weight(moe_layer)
    seen = {}
    handle = moe_layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0].detach().clone()))
    batch = _batch(3)

    def router_grad() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss, parts, _ = trainer.forward_loss(engine, batch, taps, teacher, objective)
        if mode == "tcd":
            assert all(float(parts[f"L_{p}"]) > 0 for p in "TIA")  # the relation losses are in the step too
        engine.backward(loss)
        return router.grad.detach().double().clone()

    try:
        full = router_grad()
        h = seen["h"]
        moe_cfg = model.config.moe
        moe_cfg.aux_loss_weight = moe_cfg.z_loss_weight = 0.0  # the same objective without the router losses
        without = router_grad()
        moe_cfg.aux_loss_weight, moe_cfg.z_loss_weight = aux_weight, z_weight
        assert torch.equal(seen["h"], h)  # the same routing input both times
    finally:
        handle.remove()
        if taps:
            taps.remove()
    expected = _expected_router_loss_grad(h, router, aux_weight, z_weight)
    assert expected.abs().max() > 1e-4  # the router losses do pull on the router
    torch.testing.assert_close(full - without, expected, rtol=1e-3, atol=1e-6 * float(expected.abs().max()) + 1e-7)


def test_fused_adamw_is_used_on_cpu_and_equals_the_single_tensor_path_in_float64():
    from tcd_ds.optim import GuardedAdamW, adamw, fused_kwargs

    torch.manual_seed(0)
    model = BertForMaskedLM(ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                        intermediate_size=32, max_position=16,
                                        moe=MoEConfig(num_experts=4, top_k=1))).double()
    groups = param_groups(model, 0.01)
    opt = adamw(groups, GuardedAdamW, lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    assert isinstance(opt, GuardedAdamW) and opt.defaults["fused"] is True
    assert fused_kwargs([torch.zeros(2, dtype=torch.long)]) == {}  # no kernel for integer tensors
    ref_model = copy.deepcopy(model)
    ref = torch.optim.AdamW(param_groups(ref_model, 0.01), lr=1e-2, betas=(0.9, 0.98), eps=1e-8, foreach=False)
    for step in range(5):
        for m, o in ((model, opt), (ref_model, ref)):
            gen = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            o.step()
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    assert any(g["weight_decay"] == 0 for g in opt.param_groups) and any(g["weight_decay"] > 0 for g in opt.param_groups)


def test_train_fused_optimizer_false_builds_torchs_default_adamw():
    from tcd_ds.config import TrainConfig
    from tcd_ds.optim import build_optimizer

    model = BertForMaskedLM(ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                        intermediate_size=32, max_position=16))
    fused, _ = build_optimizer(model, TrainConfig())
    plain, _ = build_optimizer(model, TrainConfig(fused_optimizer=False))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]


def test_one_rank_without_zero_skips_the_allreduce_and_steps_the_same(world_of_one, tmp_path):
    """On one rank without ZeRO the trainer turns off DeepSpeed's backward all-reduce (a flatten, a
    reduction over a group of one and a copy back): the weights after accumulated steps are the same
    to the bit as with it, experts included; under ZeRO-2 it stays on."""
    overrides = ["train.grad_accum=2"]
    weights = {}
    for skip in (True, False):
        cfg, engine, optimizer, _ = _engine(tmp_path, overrides, stage=0)
        assert engine.enable_backward_allreduce is False  # the trainer's engine, one rank, stage 0
        if not skip:
            engine.enable_backward_allreduce = True  # DeepSpeed's default
        for i in range(4):  # two optimizer steps of two micro-batches
            batch = _batch(i)
            if i % 2 == 0:
                optimizer.begin_step()
            out = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"])
            engine.backward(out.loss)
            engine.step()
        weights[skip] = {k: v.clone() for k, v in engine.module.state_dict().items()}
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])
    assert any("experts" in k for k in weights[True])
    _, engine, _, _ = _engine(tmp_path, overrides, stage=2)
    assert engine.enable_backward_allreduce is True


# --------------------------------------------------------------------------- the skip guard under ZeRO


class _CountingDist:
    """`torch.distributed` as tcd_ds.optim sees it, counting its all-reduces and claiming 2 ranks (the
    reduction itself runs on the real world of one)."""

    ReduceOp = td.ReduceOp

    def __init__(self):
        self.reductions = 0

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self, group=None) -> int:
        return 2

    def get_backend(self, group=None) -> str:
        return td.get_backend()

    def all_reduce(self, tensor, *args, **kwargs):
        self.reductions += 1
        return td.all_reduce(tensor, *args, **kwargs)


@pytest.mark.parametrize("offload", [False, True], ids=["zero2", "zero2-offload"])
def test_the_skip_guard_decides_once_per_step_for_every_group(world_of_one, tmp_path, monkeypatch, offload):
    """ZeRO calls the optimizer once per parameter group (4 here: decay, no-decay, and the experts'
    two). The guard makes one all-reduce a step (it made one per group), and a non-finite gradient in
    the last group skips the whole step (the groups before it had stepped already). bf16 with
    DeepSpeed's own gradient check off, so the guard is what meets the NaN; also with ZeRO-Offload
    (fp32 partitions on the CPU)."""
    from tcd_ds import optim

    cfg = build_config("tiny", OVERRIDES + ["model.moe.backend=deepspeed"])
    ds = json.loads((REPO / "ds_configs" / "cpu_zero2_bf16.json").read_text())
    ds["bf16"]["check_grad_overflow"] = False  # DeepSpeed's own check (on by default) would skip it first
    if offload:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        ds["zero_force_ds_cpu_optimizer"] = False  # ours is torch's AdamW
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg.student_model())
    expert_bias = model.bert.encoder.layer[0].moe.local_experts[0].fc1.bias  # in the last group
    engine, optimizer, _ = trainer.build_engine(cfg, model, trainer.load_ds_config(
        str(tmp_path / "ds.json"), cfg, torch.device("cpu")))
    assert len(optimizer.param_groups) == 4 and getattr(engine.optimizer, "cpu_offload", False) == offload
    counting = _CountingDist()
    monkeypatch.setattr(optim, "dist", counting)
    for i, poisoned in enumerate([False, True, False]):
        batch = _batch(i)
        before = {k: v.clone() for k, v in engine.module.state_dict().items()}
        optimizer.begin_step()
        out = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=batch["labels"])
        loss = out.loss
        if poisoned:
            poison = expert_bias.sum() * 0.0
            poison.register_hook(lambda g: g * float("nan"))
            loss = loss + poison
        reductions = counting.reductions
        engine.backward(loss)
        engine.step()
        assert counting.reductions - reductions == 1, (i, counting.reductions - reductions)
        assert not getattr(engine.optimizer, "overflow", False)  # not DeepSpeed's own check: the guard's
        assert optimizer.skipped == optimizer.bad_gradients == poisoned, i
        after = engine.module.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
        assert (not changed) if poisoned else len(changed) > len(after) // 2, (i, changed[:5])


def test_the_skip_guard_reduces_on_the_process_groups_device(monkeypatch, tmp_path):
    """Under NCCL the flag goes to the current CUDA device whatever the partitions' device (the CPU
    under ZeRO-Offload, which NCCL cannot reduce); and a ZeRO config without a global gradient norm,
    which the guard decides from, is refused in one line."""
    from tcd_ds import optim
    from tcd_ds.config import ConfigError

    monkeypatch.setattr(optim.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(optim.torch.cuda, "current_device", lambda: 3)
    assert optim.comm_device() == torch.device("cuda", 3)
    monkeypatch.undo()
    cfg = build_config("tiny", OVERRIDES)
    ds = json.loads((REPO / "ds_configs" / "cpu_zero2.json").read_text())
    ds["zero_optimization"]["compute_grad_norm"] = False
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="compute_grad_norm=false"):
        trainer.load_ds_config(str(tmp_path / "ds.json"), cfg, torch.device("cpu"))
