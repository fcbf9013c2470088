"""The `megablocks` MoE backend: MegaBlocks' dropless dMoE with grouped GEMMs (NVIDIA GPUs only).

Written against megablocks 0.10.0 and never run here: megablocks (and its grouped_gemm kernels) build
only where an NVIDIA driver exists, so on a CPU machine the constructor raises one clear RuntimeError.
What the adapter relies on, and how it maps to our conventions:

- `megablocks.layers.dmoe.dMoE(Arguments(...))` with `mlp_impl="grouped"`, `mlp_type="mlp"`: router
  `dmoe.router.layer` (`nn.Linear(H, E, bias=False)`, weight [E, H] = our `router.weight`), softmax over
  all experts, top-k; `moe_normalize_expert_weights=1` (p=1 norm of positive weights) renormalises the
  k gates (ours with `normalize_top_k`, k > 1); top-1 keeps the raw probability. Jitter
  `moe_jitter_eps` is the same multiplicative `U(1-j, 1+j)` on the router input. Always dropless.
  Unlike ours, its router runs in the activations' dtype (bf16 under autocast), not in fp32.
- expert weights `dmoe.experts.mlp.w1` and `.w2` are both [E * F, H]; expert e computes
  `act(x @ w1.view(E, F, H)[e].T) @ w2.view(E, F, H)[e]`, so canonical `w1 = w1.view(E, F, H).transpose(1, 2)`
  and `w2 = w2.view(E, F, H)`. MegaBlocks' experts have no biases (its `bias` is one output bias shared
  by all experts): we build it with `bias=False`, export zero `b1`/`b2` and refuse to load non-zero ones.
- losses: MegaBlocks keeps its load-balancing loss in a module-global list
  (`moe.save_load_balancing_loss`, summed by `batched_load_balancing_loss`, emptied by
  `clear_load_balancing_loss`) and its formula counts all k choices (`E/(T*k) * sum_e n_e * P_e`, ours
  for k = 1 only). We build it with `moe_loss_weight=0` and `moe_zloss_weight=0` (nothing goes to the
  global lists, so nothing leaks across steps or doubles under activation checkpointing) and compute
  our `router_stats` from the router's logits and choices, captured by forward hooks.
- expert parameters are tagged like `tag_expert_params` (`allreduce=False`, `group_name="ep_size_1"`,
  `active_fraction = top_k / E`); the backend keeps all experts on every rank.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tcd_ds.config import ConfigError, ModelConfig
from tcd_ds.model.experts.params import expert_seed, expert_weights, tag_expert_params
from tcd_ds.model.routing import MoEStats, Routing, router_stats

UNAVAILABLE = ("the megablocks MoE backend needs the megablocks package and an NVIDIA GPU: pip install -r "
               "requirements-gpu.txt on a GPU node (megablocks 0.10.0 builds only where an NVIDIA driver "
               "exists); use model.moe.backend=grouped for dropless experts without it")


def megablocks_to_canonical(w1: torch.Tensor, w2: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MegaBlocks' [E*F, H] `w1`, `w2` -> canonical w1 [E, H, F], w2 [E, F, H]."""
    hidden = w1.shape[-1]
    return w1.view(num_experts, -1, hidden).transpose(1, 2), w2.view(num_experts, -1, hidden)


def canonical_to_megablocks(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical w1 [E, H, F], w2 [E, F, H] -> MegaBlocks' [E*F, H] `w1`, `w2`."""
    return w1.transpose(1, 2).reshape(-1, w1.shape[1]), w2.reshape(-1, w2.shape[-1])


def build(cfg: ModelConfig) -> "MegaBlocksMoE":
    """The `megablocks` backend's builder (tcd_ds/model/experts/registry.py)."""
    return MegaBlocksMoE(cfg)


def unavailable(device_type: str) -> str | None:
    """The registry's probe (after its device and package checks): what `MegaBlocksMoE` needs, the
    layers and the grouped_gemm kernels, or why not."""
    try:
        from megablocks import grouped_gemm_util
        from megablocks.layers.dmoe import dMoE  # noqa: F401
        ok = grouped_gemm_util.grouped_gemm_is_available()
    except Exception as err:  # noqa: BLE001
        return f"megablocks does not import: {str(err).splitlines()[0] if str(err) else err!r}"
    return None if ok else "megablocks is installed without its grouped_gemm kernels"


class MegaBlocksMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        try:
            from megablocks import grouped_gemm_util
            from megablocks.layers.arguments import Arguments
            from megablocks.layers.dmoe import dMoE
        except Exception:  # noqa: BLE001 - not installed, or installed without its CUDA extensions
            raise RuntimeError(UNAVAILABLE) from None
        if not torch.cuda.is_available() or not grouped_gemm_util.grouped_gemm_is_available():
            raise RuntimeError(UNAVAILABLE)
        moe = cfg.moe
        if moe.capacity_factor > 0 or moe.eval_capacity_factor > 0:
            raise ConfigError("the megablocks MoE backend is dropless: set model.moe.capacity_factor=0 and "
                              "model.moe.eval_capacity_factor=0")
        self.cfg = moe
        self.num_experts = moe.num_experts
        init = functools.partial(nn.init.normal_, mean=0.0, std=cfg.initializer_range)
        args = Arguments(
            hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size, num_layers=1, bias=False,
            return_bias=False, activation_fn=F.gelu, moe_num_experts=moe.num_experts, moe_top_k=moe.top_k,
            moe_capacity_factor=0, moe_normalize_expert_weights=1 if moe.top_k > 1 and moe.normalize_top_k else None,
            moe_loss_weight=0.0, moe_zloss_weight=0.0, moe_jitter_eps=moe.jitter or None,
            mlp_type="mlp", mlp_impl="grouped", fp16=False, bf16=False, device=torch.cuda.current_device(),
            init_method=init, output_layer_init_method=init)
        self.dmoe = dMoE(args)
        tag_expert_params(self.dmoe.experts.mlp, 1, moe.top_k / moe.num_experts)

    @property
    def router_weight(self) -> nn.Parameter:
        return self.dmoe.router.layer.weight

    @property
    def mlp(self) -> nn.Module:
        return self.dmoe.experts.mlp

    def reset_expert_parameters(self, std: float) -> None:
        """The router from the global RNG, expert e from its own generator (as every backend)."""
        nn.init.normal_(self.router_weight, std=std)
        base = expert_seed()
        f, h = self.mlp.w1.shape[0] // self.num_experts, self.mlp.w1.shape[1]
        w1, w2 = zip(*(expert_weights(base, e, h, f, std) for e in range(self.num_experts)))
        mb1, mb2 = canonical_to_megablocks(torch.stack(w1), torch.stack(w2))
        with torch.no_grad():
            self.mlp.w1.copy_(mb1)
            self.mlp.w2.copy_(mb2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        seen = {}

        def after_layer(module, args, out):
            seen["logits"] = out

        def after_router(module, args, out):
            seen["probs"], seen["gate"], seen["expert"] = out

        handles = (self.dmoe.router.layer.register_forward_hook(after_layer),
                   self.dmoe.router.register_forward_hook(after_router))
        try:
            y = self.dmoe(x)
        finally:
            for h in handles:
                h.remove()
        if isinstance(y, tuple):
            y = y[0]
        # [T, k] whatever the release: some megablocks routers squeeze top-1 indices to [T]
        # (`if moe_top_k == 1: expert_indices = expert_indices.squeeze(-1)`) and keep the weights [T, 1]
        k = self.cfg.top_k
        routing = Routing(seen["expert"].reshape(-1, k), seen["gate"].float().reshape(-1, k), seen["probs"].float(),
                          seen["logits"].float())
        return y, router_stats(routing, self.cfg, y.new_zeros((), dtype=torch.float32))

    def route_hook(self, fn):
        """Call `fn(expert)` on every routing (gpucheck compares routes); returns the hook handle."""
        return self.dmoe.router.register_forward_hook(lambda module, args, out: fn(out[2]))

    # --- canonical layout -------------------------------------------------------------------

    def canonical_grads(self) -> dict[str, torch.Tensor]:
        """The parameters' gradients in the canonical layout (no expert biases; gpucheck)."""
        w1, w2 = megablocks_to_canonical(self.mlp.w1.grad, self.mlp.w2.grad, self.num_experts)
        return {"router.weight": self.router_weight.grad, "experts.w1": w1, "experts.w2": w2}

    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        w1, w2 = megablocks_to_canonical(self.mlp.w1.detach(), self.mlp.w2.detach(), self.num_experts)
        return {"router.weight": self.router_weight.detach(), "experts.w1": w1,
                "experts.b1": w1.new_zeros(w1.shape[0], w1.shape[2]), "experts.w2": w2,
                "experts.b2": w2.new_zeros(w2.shape[0], w2.shape[2])}

    def load_canonical_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if any(sd[k].count_nonzero() for k in ("experts.b1", "experts.b2")):
            raise ValueError("the megablocks MoE backend has no expert biases, but these weights have non-zero "
                             "experts.b1/b2; load them with backend torch or grouped")
        w1, w2 = canonical_to_megablocks(sd["experts.w1"], sd["experts.w2"])
        with torch.no_grad():
            self.router_weight.copy_(sd["router.weight"])
            self.mlp.w1.copy_(w1)
            self.mlp.w2.copy_(w2)
