"""Pre-train / adapt Keye-VL-2.0 with Accelerate: projector alignment, full training, and the two DSA stages.

Stages (``docs/keye_vl2.md`` sections 3 and 8), picked with ``--stage``:

=============  =====================================  ===================  ==============================  =======  ========
stage          trains                                 attention            loss                            lr       context
=============  =====================================  ===================  ==============================  =======  ========
align          ``mlp_AR`` (projector) only            dense (sdpa)         LM + aux                        1e-3     8K
full           everything but the DSA indexers        dense (sdpa)         LM + aux                        1e-5     32K
dsa-warmup     the DSA indexers only                  dense (sdpa)         lambda * KL(attention||indexer) 1e-3     32K
dsa-sparse     everything                             sparse (DSA top-k)   LM + aux + lambda * KL(top-k)   7.3e-6   32K
=============  =====================================  ===================  ==============================  =======  ========

``--freeze_vision`` also freezes the vision tower. In ``dsa-sparse`` the indexer's input is detached by the model,
so the indexer learns only from the KL and the rest only from the LM loss. ``--lora`` trains LoRA adapters instead
(decoder attention projections, the indexer where the stage trains it, and the fused expert weights through PEFT's
``target_parameters``) and saves the adapter.

Data: a JSONL of conversations in the qwen-vl-utils message format (or ``{"text": ...}`` lines), streamed and
packed into ``--max_seq_len``-token sequences with per-sample boundaries (``keye_vl.training.data``). The trainer is built from the shared
library ``keye_vl.training`` (arguments, model loading, data, loop, checkpoints, logging).

Run (tiny random model on CPU, a few seconds a step)::

    python examples/pretrain.py --model_config tiny --stage full --train_file examples/data/train.jsonl \\
        --max_steps 20 --max_seq_len 2048 --output_dir outputs/tiny_full

Two GPUs, FSDP2 (see ``examples/README.md`` for every stage)::

    accelerate launch --config_file examples/configs/fsdp2.yaml examples/pretrain.py --stage dsa-sparse \\
        --model_name_or_path PATH --train_file examples/data/train.jsonl --gradient_checkpointing
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from keye_vl.training.args import DataArguments, LoraArguments, ModelArguments, OptimArguments, OutputArguments, parse_args
from keye_vl.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from keye_vl.training.data import BatchStream, PackedStream, Prefetcher, SampleEncoder, StreamState, load_processor, processor_path
from keye_vl.training.logging import TrainLogger
from keye_vl.training.loop import (finish_run, backward_and_step, device_name, make_accelerator, prepare_training,
                                   peak_memory_gib, reduce_mean, reset_peak_memory, to_float)
from keye_vl.training.losses import lm_forward_loss
from keye_vl.training.models import (DECODER_ATTN, EXPERT_PARAMS, INDEXER, UNUSED_PARAMS, configure_trainable,
                                     vision_is_frozen)
from keye_vl.training.models import build_model as _build_model
from keye_vl.training.models import load_lora  # noqa: F401  (re-exported: pretrain.load_lora(base, adapter_dir))

STAGES = {
    "align": dict(learning_rate=1e-3, max_seq_len=8192, attn="sdpa", indexer_loss=None),
    "full": dict(learning_rate=1e-5, max_seq_len=32768, attn="sdpa", indexer_loss=None),
    "dsa-warmup": dict(learning_rate=1e-3, max_seq_len=32768, attn="sdpa", indexer_loss="dense"),
    "dsa-sparse": dict(learning_rate=7.3e-6, max_seq_len=32768, attn="dsa", indexer_loss="sparse"),
}


@dataclass
class PretrainArguments(OutputArguments, LoraArguments, OptimArguments, DataArguments, ModelArguments):
    """The shared argument groups (``keye_vl.training.args``) plus the stage fields."""

    stage: str = field(default="full", metadata={"help": "align | full | dsa-warmup | dsa-sparse"})
    max_seq_len: Optional[int] = field(default=None, metadata={"help": "Tokens per packed sequence (default: per stage)."})
    indexer_loss_coef: Optional[float] = field(default=None, metadata={"help": "lambda of the indexer KL (config default 1.0)."})
    router_aux_loss_coef: Optional[float] = field(default=None, metadata={"help": "MoE load-balancing loss weight."})
    loss_on: str = field(default="assistant", metadata={"help": "assistant (assistant turns only) | all (plain text)."})
    pack: bool = field(default=True, metadata={"help": "Pack several samples per sequence (--no_pack: one each)."})
    cache_samples: int = field(default=0, metadata={"help": "Keep this many encoded samples in memory (LRU)."})
    prefetch: int = field(default=2, metadata={"help": "Micro-batches prepared ahead in a background thread (0 = off)."})
    output_dir: str = "outputs/pretrain"

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {list(STAGES)}, got {self.stage!r}")
        self.check_model_source()
        if self.lora and self.stage == "align":
            raise ValueError("--lora is for full / dsa-warmup / dsa-sparse; the align stage trains the small projector fully")
        if self.loss_on not in ("assistant", "all"):
            raise ValueError(f"--loss_on must be 'assistant' or 'all', got {self.loss_on!r}")
        self.learning_rate = self.learning_rate if self.learning_rate is not None else STAGES[self.stage]["learning_rate"]
        self.max_seq_len = self.max_seq_len or STAGES[self.stage]["max_seq_len"]
        self.attn_implementation = self.attn_implementation or STAGES[self.stage]["attn"]
        if self.stage == "dsa-sparse" and not self.attn_implementation.startswith("dsa"):
            raise ValueError("--stage dsa-sparse trains with sparse attention: use a dsa* attn_implementation")


# ----------------------------------------------------------------------------------------------------------------
# Model and stage
# ----------------------------------------------------------------------------------------------------------------
def build_model(args: PretrainArguments, device: torch.device | None = None):
    """Load the checkpoint or build a random model (fp32 master weights), with the stage's attention
    (``keye_vl.training.models.build_model``)."""
    return _build_model(args.model_name_or_path, args.model_config, args.attn_implementation, device)


def trainable_names(model, stage: str, freeze_vision: bool) -> list[str]:
    """Parameter names a stage trains (before LoRA): see the table in the module docstring."""
    keep = {
        "align": lambda n: n.startswith("mlp_AR."),
        "full": lambda n: ".sa_indexer." not in n,
        "dsa-warmup": lambda n: ".sa_indexer." in n,
        "dsa-sparse": lambda n: True,
    }[stage]
    names = [n for n, _ in model.named_parameters()
             if keep(n) and n not in UNUSED_PARAMS and not (freeze_vision and n.startswith("visual."))]
    if not names:
        raise ValueError(f"stage {stage!r} leaves no parameter to train (no sa_indexer in the config for dsa-warmup?)")
    return names


def configure_stage(model, args: PretrainArguments):
    """Freeze for the stage, set the loss weights, add LoRA; returns the model to train."""
    if args.indexer_loss_coef is not None:
        model.config.indexer_loss_coef = args.indexer_loss_coef
    if args.router_aux_loss_coef is not None:
        model.config.router_aux_loss_coef = args.router_aux_loss_coef
    if STAGES[args.stage]["indexer_loss"] and model.config.sa_config is None:
        raise ValueError(f"stage {args.stage} needs the DSA indexer (sa_config) in the model config")
    train = set(trainable_names(model, args.stage, args.freeze_vision))
    modules = [INDEXER] if args.stage == "dsa-warmup" else [DECODER_ATTN] + ([INDEXER] if args.stage == "dsa-sparse" else [])
    experts = args.lora_experts and args.stage != "dsa-warmup"  # experts learn only from the LM loss
    return configure_trainable(model, train.__contains__, gradient_checkpointing=args.gradient_checkpointing,
                               lora=args.lora, lora_modules=modules, lora_parameters=EXPERT_PARAMS if experts else None,
                               lora_r=args.lora_r, lora_alpha=args.lora_alpha)


def forward_loss(model, batch: dict, indexer_loss: str | None, config) -> tuple[torch.Tensor, dict]:
    """One forward; ``(loss, parts)``: ``keye_vl.training.losses.lm_forward_loss`` (the model's loss formula with
    the LM head run only at labelled positions)."""
    return lm_forward_loss(model, batch, indexer_loss, config)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def main(args: PretrainArguments | None = None, processor=None) -> dict:
    """Train as ``args`` says (parsed from the command line when None); ``processor`` overrides the loaded one.

    Returns the summary written to ``--log_json`` (also when it is not set), the per-step ``history`` and the trained
    ``model`` (unwrapped).
    """
    from accelerate.utils import set_seed

    if args is None:
        args = parse_args(PretrainArguments)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    stage = STAGES[args.stage]

    # ---- model
    model = configure_stage(build_model(args, accelerator.device), args)
    base = model.get_base_model() if args.lora else model
    config = base.config
    model, optimizer, scheduler, n_train, n_total = prepare_training(accelerator, model, args)

    # ---- resume
    step, data_state = 0, StreamState()
    if args.resume_from_checkpoint:
        step, saved = load_checkpoint(accelerator, find_checkpoint(args.output_dir, args.resume_from_checkpoint),
                                      prefix="data_state")
        data_state = StreamState.from_dict(saved)

    # ---- data
    processor = processor or load_processor(processor_path(args.processor_name_or_path, args.model_name_or_path))
    encoder = SampleEncoder(processor, loss_on=args.loss_on, base_dir=os.path.dirname(os.path.abspath(args.train_file)))
    packs = PackedStream(args.train_file, encoder, args.max_seq_len, pack=args.pack, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, state=data_state, cache_size=args.cache_samples)
    vision_trains = not vision_is_frozen(model)
    batches = Prefetcher(BatchStream(packs, args.per_device_batch_size, config.pad_token_id,
                                     ensure_vision_config=config if accelerator.num_processes > 1 and vision_trains else None),
                         args.prefetch)

    # ---- tracking
    log = TrainLogger(accelerator, args, "pretrain", initial_step=step, desc=args.stage)
    log.print(f"stage {args.stage}: {n_train:,} of {n_total:,} parameters train; attention {args.attn_implementation}; "
              f"{accelerator.num_processes} process(es) x {args.per_device_batch_size} x {args.max_seq_len} tokens "
              f"x {args.gradient_accumulation_steps} accumulation; lr {args.learning_rate}; from step {step}")
    device = accelerator.device
    reset_peak_memory(device)
    model.train()
    t_start = time.perf_counter()
    grad_norm = torch.tensor(0.0)
    while step < args.max_steps:
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0, "indexer_loss": 0.0}
        tokens = 0
        for _ in range(args.gradient_accumulation_steps):
            batch, data_state = next(batches)
            tokens += int(batch.pop("attention_mask").sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss, parts = forward_loss(model, batch, stage["indexer_loss"], config)
                norm = backward_and_step(accelerator, model, optimizer, loss, args.max_grad_norm)
                if norm is not None:  # the last micro-step of an accumulation synchronises
                    grad_norm = norm
            for k, v in (("loss", loss), *parts.items()):
                sums[k] += float(v.detach()) / args.gradient_accumulation_steps if v is not None else 0.0
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t0
        log.advance()
        if step % args.logging_steps == 0 or step == args.max_steps:
            stats = reduce_mean(accelerator, [sums["loss"], sums["lm_loss"], sums["aux_loss"], sums["indexer_loss"],
                                              tokens / dt])
            row = {"step": step, "loss": stats[0], "lm_loss": stats[1], "aux_loss": stats[2],
                   "indexer_loss": stats[3], "tokens_per_s_per_device": stats[4],
                   "lr": lr, "grad_norm": to_float(grad_norm), "step_time_s": dt,
                   "tokens_this_device": tokens}
            peak = peak_memory_gib(accelerator)  # the largest over the processes
            if peak is not None:
                row["peak_memory_gib"] = peak
            log.log(row)
        interrupted = args.stop_at_step is not None and step >= args.stop_at_step
        if (args.save_steps and step % args.save_steps == 0) or interrupted:
            save_checkpoint(accelerator, args.output_dir, step, data_state.to_dict(), prefix="data_state")
        if interrupted:
            break
    batches.close()
    history = log.history
    elapsed = time.perf_counter() - t_start
    summary = {
        "final_step": step, "parameters_total": n_total, "parameters_trained": n_train,
        "processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision, "elapsed_s": elapsed, "skipped_samples": packs.skipped,
        "mean_tokens_per_s_per_device": (sum(r["tokens_per_s_per_device"] for r in history[1:]) / max(1, len(history) - 1))
        if len(history) > 1 else (history[0]["tokens_per_s_per_device"] if history else 0.0),
        "device": device_name(device),
    }
    if device.type == "cuda":
        summary["peak_reserved_gib_rank0"] = torch.cuda.max_memory_reserved(device) / 2**30
    return finish_run(accelerator, log, model, processor, args, step, summary, device)


if __name__ == "__main__":
    main()
