"""Accelerate pieces of the training loops: the accelerator, the optimizer and schedule, one optimizer step,
metric reduction and peak memory."""

from __future__ import annotations

import os

import torch


def fsdp_enabled() -> bool:
    """True when ``accelerate launch`` runs with an FSDP config (``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def make_accelerator(args, project_dir: str | None = None):
    """An ``Accelerator`` for ``args`` (:class:`~keye_vl.training.args.OptimArguments` + ``OutputArguments``).

    Under FSDP the mixed-precision policy already runs the model in bf16 (weights cast per unit); autocast on top
    would run the LayerNorm of the DSA indexer keys in fp32 while its queries stay bf16, which the DSA kernels
    refuse (they need one dtype). So autocast is off there. ``args.mixed_precision`` applies only when the
    launcher did not set one.
    """
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    return Accelerator(
        kwargs_handlers=[AutocastKwargs(enabled=False)] if fsdp_enabled() else None,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=None if os.environ.get("ACCELERATE_MIXED_PRECISION") else args.mixed_precision,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_dir=project_dir or args.output_dir,
    )


def make_optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: weight decay on matrices (ndim >= 2) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    if not decay and not no_decay:
        raise ValueError("no parameter trains: nothing for the optimizer")
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
    )


def make_scheduler(optimizer, args):
    """``transformers.get_scheduler(args.lr_scheduler_type)`` over ``args.max_steps`` with ``args.warmup_steps``."""
    from transformers import get_scheduler

    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                         num_training_steps=args.max_steps)


def prepare_training(accelerator, model, args):
    """The set-up every trainer does once its model is configured: count the parameters, AdamW
    (:func:`make_optimizer`) and the schedule (:func:`make_scheduler`), ``accelerator.prepare`` of model and
    optimizer, and the scheduler registered for checkpoints (exact resume).

    Returns ``(model, optimizer, scheduler, n_trainable, n_total)`` (the counts before wrapping).
    """
    from .models import count_parameters

    n_train, n_total = count_parameters(model)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler, n_train, n_total


def backward_and_step(accelerator, model, optimizer, loss: torch.Tensor, max_grad_norm: float):
    """``accelerator.backward(loss)``, then (on a synchronising micro-step) clip and step; call it inside
    ``accelerator.accumulate(model)``. Returns the gradient norm before clipping (a tensor) on a synchronising
    micro-step, else None."""
    accelerator.backward(loss)
    grad_norm = None
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) \
            if max_grad_norm > 0 else torch.tensor(0.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def to_float(x) -> float:
    """A Python float from a tensor, DTensor (FSDP2 may return one) or number."""
    x = x.full_tensor() if hasattr(x, "full_tensor") else x
    return float(x)


def reduce_mean(accelerator, values: list[float]) -> list[float]:
    """Mean over the processes of a list of numbers (float64)."""
    t = torch.tensor(values, device=accelerator.device, dtype=torch.float64)
    return accelerator.reduce(t, reduction="mean").tolist()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(accelerator) -> float | None:
    """The largest peak allocated CUDA memory over the processes, in GiB (None on CPU)."""
    device = accelerator.device
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    return accelerator.gather(peak).max().item()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def finish_run(accelerator, log, model, processor, args, step: int, summary: dict, device: torch.device) -> dict:
    """The end every trainer shares: the peak memory of the logged rows (CUDA), the final save when the run reached
    ``args.max_steps`` and ``args.save_final`` is set (:func:`keye_vl.training.checkpoint.save_final`), the summary
    written by the logger (JSON + trackers closed). Updates ``summary`` and returns
    ``{"history": log.history, **summary, "model": the unwrapped model}``."""
    from .checkpoint import save_final

    history = log.history
    if device.type == "cuda":
        summary["peak_memory_gib"] = max((r.get("peak_memory_gib", 0.0) for r in history), default=0.0)
    if args.save_final and step >= args.max_steps:
        summary["final_dir"] = save_final(accelerator, model, processor, args.output_dir, adapter_only=args.lora)
    log.finish(summary)
    return {"history": history, **summary, "model": accelerator.unwrap_model(model)}
