"""Mixture-of-experts block of Keye-VL-2.0 (Qwen3-MoE router + fused experts in the official layout).

The experts keep the checkpoint's fused tensors (``gate_up_proj`` [E, hidden, 2I], ``down_proj`` [E, I, hidden], the
transformers-4.57 layout) and run either an eager loop over the experts hit (the reference) or two grouped GEMMs over
the (token, slot) pairs sorted by expert (``torch._grouped_mm``, the idea of transformers' ``grouped_mm`` experts
implementation, ``integrations/moe.py``): no host synchronisation and shapes fixed by the token count, so a decode
step with it can be captured in a CUDA graph.

Flat remote-code file (copied beside ``modeling_keye_vl_2.py`` by ``save_pretrained``): imports torch and the public
transformers API only.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .configuration_keye_vl_2 import KeyeVL2Config

_GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_GROUPED_MM_PROBES: dict[tuple[str, int | None, torch.dtype], tuple[str | None, str | None]] = {}


def _grouped_mm_fn():
    """``F.grouped_mm`` (torch >= 2.10) or ``torch._grouped_mm`` (2.8 / 2.9), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the grouped GEMM's backward rejects the
    zero-stride (``sum().backward()``) and transposed gradients autograd may hand it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _mm_operand_problem(t: torch.Tensor) -> str | None:
    """Why ``t`` (2-D or 3-D, unit stride in one of its last two dims) cannot be a grouped-GEMM operand."""
    if t.data_ptr() % 16:
        return "a base pointer not 16-byte aligned"
    rows, cols = t.stride(-2), t.stride(-1)
    lead = rows if cols == 1 else (cols if rows == 1 else None)
    if lead is None:
        return f"no unit stride in the last two dims (strides {tuple(t.stride())})"
    if (lead * t.element_size()) % 16:
        return f"a leading stride of {lead * t.element_size()} bytes (must be a multiple of 16)"
    return None


def _grouped_mm_probe(device: torch.device, dtype: torch.dtype, backward: bool = False) -> str | None:
    """Run a tiny grouped GEMM with an expert that gets no rows once per (device, dtype): forward, then
    backward (which must give that expert a zero weight gradient). Returns why the forward (or, with
    ``backward=True``, the backward) failed, or None. Cached: later calls cost a dict lookup."""
    key = (device.type, device.index, dtype)
    if key not in _GROUPED_MM_PROBES:
        # In a thread of its own: autograd's grad mode and saved-tensor hooks are thread-local, so a probe that
        # first runs inside an activation-checkpointed layer adds no tensors to that layer's recorded graph
        # (otherwise the recomputation, which finds the probe cached, saves fewer tensors: CheckpointError).
        worker = threading.Thread(target=_run_grouped_mm_probe, args=(key, device, dtype), daemon=True)
        worker.start()
        worker.join()
    fwd, bwd = _GROUPED_MM_PROBES[key]
    return bwd if backward else fwd


def _run_grouped_mm_probe(key, device: torch.device, dtype: torch.dtype) -> None:
    """Body of :func:`_grouped_mm_probe`: stores (forward problem, backward problem) under ``key``."""
    fn = _grouped_mm_fn()
    fwd = bwd = None
    if fn is None:
        fwd = bwd = "this torch has no grouped_mm"
    else:
        try:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors even under inference_mode
                offs = torch.tensor([2, 2, 6], device=device, dtype=torch.int32)
                y = fn(torch.ones(6, 8, device=device, dtype=dtype), torch.ones(3, 8, 8, device=device, dtype=dtype), offs=offs)
                fwd = None if float(y[0, 0]) == 8.0 and float(y[5, 7]) == 8.0 else "wrong numbers in the forward probe"
        except Exception as e:  # noqa: BLE001 - any failure means "do not use it here"
            fwd = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        bwd = fwd
        if fwd is None:
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    offs = torch.tensor([2, 2, 6], device=device, dtype=torch.int32)
                    a = torch.ones(6, 8, device=device, dtype=dtype, requires_grad=True)
                    b = torch.ones(3, 8, 8, device=device, dtype=dtype, requires_grad=True)
                    _ContiguousGrad.apply(fn(a, b, offs=offs)).sum().backward()
                ok = float(a.grad[0, 0]) == 8.0 and float(b.grad[1].abs().sum()) == 0.0 and float(b.grad[2, 0, 0]) == 4.0
                bwd = None if ok else "wrong numbers in the backward probe (e.g. an expert without rows got a gradient)"
            except Exception as e:  # noqa: BLE001
                bwd = f"backward: {type(e).__name__}: {e}".splitlines()[0][:200]
    _GROUPED_MM_PROBES[key] = (fwd, bwd)


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-expert GEMM over rows grouped by expert, without a host sync.

    Args:
        x: [R, K] rows sorted by expert: expert e owns rows ``offs[e-1]:offs[e]`` (``offs[-1]`` = R).
        w: [E, K, M] expert weights (any strides with a unit stride in one of the last two dims).
        offs: [E] int32 cumulative row ends, on x's device (equal neighbours = an expert with no rows).
    Returns:
        [R, M] in ``w.dtype`` (fp32 accumulation). Autograd-aware; the backward gets contiguous gradients.
    """
    y = _grouped_mm_fn()(x.to(w.dtype).contiguous(), w, offs=offs)
    return _ContiguousGrad.apply(y) if y.requires_grad else y


class KeyeVL2Experts(nn.Module):
    """Fused experts in the official transformers-4.57 layout (docs/keye_vl2.md section 2):
    ``gate_up_proj`` [E, hidden, 2I] (gate = [..., :I], up = [..., I:]), ``down_proj`` [E, I, hidden].

    Expert e computes ``down(silu(gate(x)) * up(x))``; the output is ``sum_j w[n, j] * expert_{idx[n, j]}(x[n])``.
    ``config.moe_implementation`` picks:

    - "eager": the reference, a loop over the experts that received tokens (one host sync for the list);
    - "grouped_mm": the (token, slot) pairs sorted by expert, one grouped GEMM per projection
      (``torch._grouped_mm``), offsets from ``searchsorted`` on the device: no host sync, no Python loop
      over experts, deterministic (gathers, and sums over the k slots, never scatter-adds);
    - "auto": "grouped_mm" where it runs (a once-per-device/dtype probe, 16-byte aligned weights and rows),
      else "batched_mm" for few tokens (each (token, slot) pair gathers its expert's weights; no host sync: decode
      steps stay capturable) and "eager" for many. On CPU the grouped GEMM needs 16-byte strides (hidden and I
      multiples of 4 fp32 / 8 bf16).

    Both compute in the weights' dtype (the autocast dtype under autocast) with fp32 accumulation, and return
    ``hidden_states.dtype``. Parameters are read inside ``forward``, so PEFT ``target_parameters`` LoRA applies.
    """

    def __init__(self, config: KeyeVL2Config):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.intermediate_size = config.moe_intermediate_size
        H, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.act_fn = ACT2FN[config.hidden_act]

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.gate_up_proj.dtype

    def grouped_mm_problem(self, x: torch.Tensor) -> str | None:
        """Why the grouped path cannot run for input ``x`` here (forward, and backward too when autograd will
        need it), or None when it can."""
        dtype = self._compute_dtype(x)
        if dtype not in _GROUPED_MM_DTYPES:
            return f"dtype {dtype} (grouped_mm takes {[str(d) for d in _GROUPED_MM_DTYPES]})"
        es = torch.empty((), dtype=dtype).element_size()
        H, I = self.gate_up_proj.shape[1], self.intermediate_size
        if (H * es) % 16 or (I * es) % 16:
            return f"hidden {H} / moe_intermediate {I} rows of {dtype} are not multiples of 16 bytes"
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            why = _mm_operand_problem(w if w.dtype == dtype else w.to(dtype))
            if why:
                return f"{name} has {why}"
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.gate_up_proj.requires_grad or self.down_proj.requires_grad
        )
        return _grouped_mm_probe(x.device, dtype, backward=needs_grad)

    # "auto" with no grouped GEMM (e.g. fp32 on CUDA): few (token, slot) pairs take the gathered-weights batched
    # path (no host sync, fixed shapes: a decode step) while its weight copies stay below this many bytes.
    batched_max_bytes = 256 * 2**20

    def implementation(self, x: torch.Tensor, top_k: int = 1) -> str:
        """The implementation ``forward`` uses for input ``x`` [N, hidden] with ``top_k`` slots per token:
        "eager", "grouped_mm", or (``moe_implementation="auto"`` where the grouped GEMM cannot run) "batched_mm"
        for few rows.

        Under ``torch.compile`` (a decode step traced for CUDA graphs) the pointer-alignment checks cannot be
        traced: the grouped-GEMM verdict of the last eager call (the prefill) is reused."""
        impl = self.config.moe_implementation
        if impl == "eager":
            return "eager"
        if torch.compiler.is_compiling() and hasattr(self, "_grouped_why"):
            why = self._grouped_why
            if why is None and self._compute_dtype(x) == torch.float32:
                why = "torch.compile: grouped_mm's meta kernel takes bf16 / fp16 only"
        else:
            why = self._grouped_why = self.grouped_mm_problem(x)
        if impl == "grouped_mm" and why is not None:
            raise ValueError(
                f"moe_implementation='grouped_mm' cannot run on {x.device.type}: {why}; use 'auto' (falls back to "
                "'eager') or 'eager'"
            )
        if why is None:
            return "grouped_mm"
        H, I = self.gate_up_proj.shape[1], self.intermediate_size
        copy = x.shape[0] * top_k * 3 * H * I * self.gate_up_proj.element_size()
        return "batched_mm" if copy <= self.batched_max_bytes else "eager"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """
        Args:
            hidden_states: [N, hidden]; top_k_index: [N, k] int64 expert ids in [0, E); top_k_weights: [N, k]
                routing weights.
        Returns:
            [N, hidden] in hidden_states.dtype: ``sum_j w[n, j] * expert_{idx[n, j]}(x[n])``.
        """
        if hidden_states.shape[0] == 0:
            return hidden_states.new_zeros(hidden_states.shape)
        impl = self.implementation(hidden_states, top_k_index.shape[-1])
        if impl == "grouped_mm":
            return self._forward_grouped(hidden_states, top_k_index, top_k_weights)
        if impl == "batched_mm":
            return self._forward_batched(hidden_states, top_k_index, top_k_weights)
        return self._forward_eager(hidden_states, top_k_index, top_k_weights)

    def _forward_eager(self, x, top_k_index, top_k_weights):
        """Reference: loop over the experts that received tokens; fp32 accumulation over the k slots."""
        dtype = self._compute_dtype(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        I = self.intermediate_size
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for e in hit:
            token_idx, slot = torch.where(top_k_index == e)
            h = x[token_idx].to(dtype) @ self.gate_up_proj[e].to(dtype)  # [n_e, 2I]
            h = self.act_fn(h[:, :I]) * h[:, I:]
            y = (h @ self.down_proj[e].to(dtype)) * top_k_weights[token_idx, slot, None].to(dtype)  # [n_e, hidden]
            out.index_add_(0, token_idx, y.float())
        return out.to(x.dtype)

    def _forward_batched(self, x, top_k_index, top_k_weights):
        """Each (token, slot) pair gathers its expert's weights and runs batched GEMMs ([N*k, 1, H] @ [N*k, H, 2I]):
        no host sync, shapes fixed by N (transformers' ``batched_mm`` experts idea, ``integrations/moe.py``)."""
        N, k = top_k_index.shape
        H, I = x.shape[-1], self.intermediate_size
        dtype = self._compute_dtype(x)
        flat = top_k_index.reshape(-1)
        xs = x.to(dtype)[:, None].expand(N, k, H).reshape(N * k, 1, H)
        # gather the hit experts first, then cast: with fp32 master weights under bf16 autocast (the trainers'
        # rollouts) this converts N*k experts' weights per step, not all of them
        h = torch.bmm(xs, self.gate_up_proj.index_select(0, flat).to(dtype))  # [N*k, 1, 2I]
        h = self.act_fn(h[..., :I]) * h[..., I:]
        y = torch.bmm(h, self.down_proj.index_select(0, flat).to(dtype)).view(N, k, H)  # [N*k, 1, H]
        out = torch.bmm(top_k_weights.to(dtype).reshape(N, 1, k), y)  # fp32 accumulation over the k slots
        return out.view(N, H).to(x.dtype)

    def _forward_grouped(self, x, top_k_index, top_k_weights):
        """Sort the N*k (token, slot) pairs by expert, two grouped GEMMs, unsort, weighted sum over the k slots."""
        N, k = top_k_index.shape
        H, I, E = x.shape[-1], self.intermediate_size, self.num_experts
        dtype = self._compute_dtype(x)
        key_dtype = torch.int16 if E <= torch.iinfo(torch.int16).max else torch.int32  # fewer radix passes
        flat = top_k_index.reshape(-1).to(key_dtype)  # [N*k]
        sorted_expert, order = torch.sort(flat, stable=True)  # order[r] = flat pair at sorted row r
        experts = torch.arange(E, device=x.device, dtype=sorted_expert.dtype)
        offs = torch.searchsorted(sorted_expert, experts, right=True, out_int32=True)  # [E] row ends, no sync
        if torch.is_grad_enabled() and x.requires_grad:
            # gather through a permutation: its backward is a scatter without collisions (deterministic)
            xs = x.to(dtype)[:, None].expand(N, k, H).reshape(N * k, H).index_select(0, order)
        else:
            xs = x.to(dtype).index_select(0, order // k)  # [N*k, hidden]
        h = _grouped_mm(xs, self.gate_up_proj.to(dtype), offs)  # [N*k, 2I]
        h = self.act_fn(h[:, :I]) * h[:, I:]  # [N*k, I]
        y = _grouped_mm(h, self.down_proj.to(dtype), offs)  # [N*k, hidden], sorted rows
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=x.device))
        y = y.index_select(0, inv).view(N, k, H)  # back to (token, slot) order
        out = torch.bmm(top_k_weights.to(dtype).reshape(N, 1, k), y)  # [N, 1, hidden], fp32 accumulation
        return out.view(N, H).to(x.dtype)


class KeyeVL2SparseMoeBlock(nn.Module):
    """Router (Linear hidden -> E, no bias; softmax in fp32; top-k; renormalise) + experts
    (docs/keye_vl2.md section 4)."""

    def __init__(self, config: KeyeVL2Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = KeyeVL2Experts(config)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, hidden] -> ([B, T, hidden], router logits [B*T, E] fp32)."""
        B, T, H = hidden_states.shape
        x = hidden_states.reshape(-1, H)
        router_logits = self.gate(x).float()
        probs = torch.softmax(router_logits, dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out = self.experts(x, top_i, top_w.to(x.dtype))
        return out.reshape(B, T, H), router_logits


__all__ = ["KeyeVL2Experts", "KeyeVL2SparseMoeBlock"]
