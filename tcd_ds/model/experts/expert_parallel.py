"""The `deepspeed` MoE backend: `deepspeed.moe.layer.MoE` (GShard-style gate, expert parallelism).

`DeepSpeedMoE` wraps DeepSpeed's layer and returns `(y, MoEStats)` like every backend. What DeepSpeed
does, checked against deepspeed 0.19.8 (`deepspeed/moe/sharded_moe.py`), and how it maps to ours:

- gate: fp32 `softmax(x @ wg.T)`, top-k; top-1 keeps the raw probability, top-2 and top-k renormalise
  the kept gates to sum to 1 (ours with `normalize_top_k=True`; `False` is refused for k >= 2). We turn
  off its random parts: `use_rts=False` (random token selection) and `top2_2nd_expert_sampling=False`
  (Gumbel noise on the second choice). Jitter is ours, `U(1-j, 1+j)` on the gate input in training,
  applied by a pre-hook: DeepSpeed's `noisy_gate_policy='Jitter'` has a fixed epsilon of 0.01.
- `l_aux` for k = 1, 2 is `E * sum_e mean_prob_e * first_choice_fraction_e`, our `balance_loss`
  exactly (tested equal). For k > 2 DeepSpeed uses all k choices (`E/k * sum_e P_e * f_e^(all k)`), so we
  recompute ours from the gate logits instead.
- `exp_counts` are the assignments of all k choices per expert *before* dropping: our `counts`.
- capacity `max(min_capacity, ceil(cf * T * k / E))` as ours; without dropping (`capacity_factor=0`)
  DeepSpeed pads every expert to the largest load (all-reduced over the expert-parallel group), so
  nothing is dropped. With dropping it differs from ours in two places: the kept gates are
  renormalised over the *kept* choices (a token whose second choice is dropped gets weight 1 on its
  first), and for top-1 which of an over-full expert's tokens survive is up to `torch.topk` over a 0/1
  mask (not token order); top-2 keeps ours (first choices in token order, then second choices), top-k>2
  keeps the most probable. Drop decisions are per mode: `drop_tokens` follows `capacity_factor` in
  training and `eval_capacity_factor` in eval (DeepSpeed has one flag for both; we set it per call).
- experts: `ep_size` ranks share the E experts; expert-parallel rank r holds experts
  `[r * E_local, (r + 1) * E_local)` (`local_expert_offset`) and tokens travel there by all-to-all.
  DeepSpeed tags their parameters `allreduce=False`, `group_name="ep_size_<ep>"` itself; we add
  `active_fraction = top_k / E_local` like `tag_expert_params`, and `expert_shards = ep_size` (the
  global model holds ep_size times this rank's experts: `num_parameters`). The gate is replicated (not tagged).
- process groups: DeepSpeed's layer needs `deepspeed.comm` and its expert groups. Inside
  `deepspeed.initialize` the engine creates them (`module.set_deepspeed_parallelism()`); elsewhere
  (tests, one process) call `ensure_expert_groups(ep_size)` after `torch.distributed.init_process_group`.

Weights: each local expert is `fc2(gelu(fc1(x)))` with `nn.Linear` weights `[out, in]`, so in the
canonical layout `w1[e] = fc1.weight.T` ([H, F]) and `w2[e] = fc2.weight.T` ([F, H]).
`canonical_state_dict()` holds this rank's local experts only; gathering them across expert-parallel
ranks is the exporter's job.
"""
from __future__ import annotations

import deepspeed
import deepspeed.comm as ds_comm
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from tcd_ds.config import ConfigError, ModelConfig
from tcd_ds.model.experts.params import expert_seed, expert_weights
from tcd_ds.model.routing import MoEStats, balance_loss, z_loss

_NO_GROUPS = ("the deepspeed MoE backend needs torch.distributed and DeepSpeed's expert groups: run the model "
              "inside deepspeed.initialize(...), or call tcd_ds.model.experts.expert_parallel.ensure_expert_groups"
              "(ep_size) after torch.distributed.init_process_group(...)")


def ensure_expert_groups(ep_size: int = 1) -> None:
    """Create DeepSpeed's expert-parallel groups for `ep_size` outside a DeepSpeed engine.

    Needs `torch.distributed` initialised (gloo is fine on CPU). Wraps the existing process group in
    `deepspeed.comm` when DeepSpeed has not done so (this loads DeepSpeed's shared-memory comm op,
    JIT-compiled with g++ on first use and cached), then makes the same groups DeepSpeed's `MoE`
    would (`groups._create_expert_and_data_parallel`). Idempotent; `DeepSpeedMoE` layers attach to the
    groups on their first forward.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError("ensure_expert_groups needs torch.distributed initialised first, e.g. "
                           "torch.distributed.init_process_group('gloo', ...)")
    world = torch.distributed.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    if f"ep_size_{ep_size}" not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


class _MoE(MoE):
    """DeepSpeed's MoE whose `set_deepspeed_parallelism` may run twice (engine after a first forward)."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        if self.deepspeed_moe.ep_group is None:
            super().set_deepspeed_parallelism(use_data_before_expert_parallel_)


class _FFN(nn.Module):
    """One expert: H -> F -> H with exact gelu."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def build(cfg: ModelConfig) -> "DeepSpeedMoE":
    """The `deepspeed` backend's builder (tcd_ds/model/experts/registry.py)."""
    return DeepSpeedMoE(cfg)


def unavailable(device_type: str) -> str | None:
    """The registry's probe: importing this module (and so deepspeed) is the check."""
    return None


class DeepSpeedMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = cfg.moe
        if moe.top_k > 1 and not moe.normalize_top_k:
            raise ConfigError("the deepspeed MoE backend always renormalises the top-k gates; "
                              "set model.moe.normalize_top_k=true or use backend torch/grouped")
        self.cfg = moe
        self.num_experts, self.ep_size = moe.num_experts, moe.ep_size
        self.num_local_experts = moe.num_experts // moe.ep_size
        self.moe = _MoE(cfg.hidden_size, _FFN(cfg.hidden_size, cfg.intermediate_size), num_experts=moe.num_experts,
                        ep_size=moe.ep_size, k=moe.top_k, capacity_factor=moe.capacity_factor,
                        eval_capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity,
                        use_residual=False, noisy_gate_policy=None, drop_tokens=moe.capacity_factor > 0,
                        use_rts=False, top2_2nd_expert_sampling=False)
        for p in self.local_experts.parameters():  # DeepSpeed already set allreduce=False and group_name
            p.active_fraction = moe.top_k / self.num_local_experts
            p.expert_shards = moe.ep_size  # this rank holds 1 / ep_size of the layer's experts (num_parameters)

    @property
    def gate(self) -> nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    @property
    def local_expert_offset(self) -> int:
        """Global index of this rank's first expert (rank in the expert-parallel group * E_local)."""
        if self.ep_size == 1:
            return 0
        name = f"ep_size_{self.ep_size}"
        if not torch.distributed.is_initialized() or name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(_NO_GROUPS)
        return torch.distributed.get_rank(groups._get_expert_parallel_group(name)) * self.num_local_experts

    def init_expert_offset(self) -> int:
        """Global index of this rank's first expert, known before DeepSpeed's groups exist (the model is
        built, and initialised, before `deepspeed.initialize` creates them): from the groups when they
        exist, else from DeepSpeed's own layout of the expert-parallel groups over the world
        (`groups._get_expert_parallel_ranks`, ranks `[i * ep, (i + 1) * ep)` with no tensor parallelism);
        0 in one process without torch.distributed (which cannot run ep_size > 1 anyway)."""
        if self.ep_size == 1:
            return 0
        if (torch.distributed.is_initialized()
                and f"ep_size_{self.ep_size}" in groups._get_expert_parallel_group_dict()):
            return self.local_expert_offset
        if not torch.distributed.is_initialized():
            return 0
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if world % self.ep_size:
            raise ConfigError(f"model.moe.ep_size={self.ep_size} does not divide the world size {world}")
        ep_groups, _ = groups._get_expert_parallel_ranks(world, 1, self.ep_size)
        ranks = next(g for g in ep_groups if rank in g)
        return ranks.index(rank) * self.num_local_experts

    def reset_expert_parameters(self, std: float) -> None:
        """The gate from the global RNG (replicated), then global expert e = offset + i from its own
        generator (`tcd_ds.model.experts.params.expert_weights`): the gathered experts are the same for every
        ep_size, and equal to the torch backend's expert e for the same base seed."""
        nn.init.normal_(self.gate.weight, std=std)
        base, offset = expert_seed(), self.init_expert_offset()
        with torch.no_grad():
            for i, expert in enumerate(self.local_experts):
                w1, w2 = expert_weights(base, offset + i, expert.fc1.in_features, expert.fc1.out_features, std)
                expert.fc1.weight.copy_(w1.t())
                expert.fc2.weight.copy_(w2.t())
                nn.init.zeros_(expert.fc1.bias)
                nn.init.zeros_(expert.fc2.bias)

    def _attach_groups(self) -> None:
        if self.moe.deepspeed_moe.ep_group is not None:
            return
        if (not torch.distributed.is_initialized() or not ds_comm.is_initialized()
                or f"ep_size_{self.ep_size}" not in groups._get_expert_parallel_group_dict()):
            raise RuntimeError(_NO_GROUPS)
        self.moe.set_deepspeed_parallelism()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        self._attach_groups()
        cfg, gate = self.cfg, self.moe.deepspeed_moe.gate
        num_tokens = x.numel() // x.shape[-1]
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        gate.drop_tokens = factor > 0
        # min(., T): the same capacity in effect (>= T drops nothing) and DeepSpeed's top-1 asserts T >= it
        gate.min_capacity = min(cfg.min_capacity, num_tokens) if factor > 0 else 0

        seen = {}

        def before_gate(module, args):
            h = args[0].float()
            if self.training and cfg.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - cfg.jitter, 1.0 + cfg.jitter)
            seen["input"] = h
            return (h, *args[1:])

        def after_gate(module, args, out):
            seen["expert"] = out[3]  # [k, T] expert of each route, -1 where dropped for capacity

        handles = (gate.register_forward_pre_hook(before_gate), gate.register_forward_hook(after_gate))
        try:
            y, l_aux, counts = self.moe(x)
        finally:
            for h in handles:
                h.remove()

        logits = None
        if cfg.z_loss_weight > 0 or cfg.top_k > 2:
            logits = F.linear(seen["input"], self.gate.weight.float())
        if cfg.top_k > 2:
            probs = logits.softmax(dim=-1)
            l_aux = balance_loss(probs, probs.argmax(dim=-1))
        z = z_loss(logits) if cfg.z_loss_weight > 0 else l_aux.new_zeros(())
        dropped = (seen["expert"] < 0).float().mean()
        stats = MoEStats(cfg.aux_loss_weight * l_aux + cfg.z_loss_weight * z, l_aux, z, counts.detach(), dropped)
        return y, stats

    # --- canonical layout -------------------------------------------------------------------

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's experts (global ids `local_expert_offset + i`) in the canonical layout."""
        fc1 = [e.fc1 for e in self.local_experts]
        fc2 = [e.fc2 for e in self.local_experts]
        return {
            "router.weight": self.gate.weight.detach(),
            "experts.w1": torch.stack([m.weight.detach().t() for m in fc1]),
            "experts.b1": torch.stack([m.bias.detach() for m in fc1]),
            "experts.w2": torch.stack([m.weight.detach().t() for m in fc2]),
            "experts.b2": torch.stack([m.bias.detach() for m in fc2]),
        }

    def canonical_grads(self) -> dict[str, torch.Tensor]:
        """The parameters' gradients, in the canonical layout (gpucheck)."""
        fc1 = [e.fc1 for e in self.local_experts]
        fc2 = [e.fc2 for e in self.local_experts]
        return {"router.weight": self.gate.weight.grad,
                "experts.w1": torch.stack([m.weight.grad.t() for m in fc1]),
                "experts.b1": torch.stack([m.bias.grad for m in fc1]),
                "experts.w2": torch.stack([m.weight.grad.t() for m in fc2]),
                "experts.b2": torch.stack([m.bias.grad for m in fc2])}

    def load_canonical_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load canonical weights holding either all E experts (this rank's slice is taken) or E_local."""
        expected = {"router.weight", "experts.w1", "experts.b1", "experts.w2", "experts.b2"}
        if set(sd) != expected:
            raise ValueError(f"canonical MoE weights need keys {sorted(expected)}, got {sorted(sd)}")
        n = sd["experts.w1"].shape[0]
        if n == self.num_experts:
            start = self.local_expert_offset
        elif n == self.num_local_experts:
            start = 0
        else:
            raise ValueError(f"canonical MoE weights hold {n} experts; expected {self.num_experts} (all) "
                             f"or {self.num_local_experts} (this rank's)")
        with torch.no_grad():
            self.gate.weight.copy_(sd["router.weight"])
            for i, expert in enumerate(self.local_experts):
                e = start + i
                expert.fc1.weight.copy_(sd["experts.w1"][e].t())
                expert.fc1.bias.copy_(sd["experts.b1"][e])
                expert.fc2.weight.copy_(sd["experts.w2"][e].t())
                expert.fc2.bias.copy_(sd["experts.b2"][e])
