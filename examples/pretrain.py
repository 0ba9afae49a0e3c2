"""Pre-train / adapt Keye-VL-2.0 with Accelerate: projector alignment, full training, and the two DSA stages.

Stages (spec ``keye_vl2.md`` sections 3 and 8), picked with ``--stage``:

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
packed into ``--max_seq_len``-token sequences with per-sample boundaries (``examples/data.py``).

Run (tiny random model on CPU, a few seconds a step)::

    python examples/pretrain.py --model_config tiny --stage full --train_file examples/data/train.jsonl \\
        --max_steps 20 --max_seq_len 2048 --output_dir outputs/tiny_full

Two GPUs, FSDP2 (see ``examples/README.md`` for every stage)::

    accelerate launch --config_file examples/configs/fsdp2.yaml examples/pretrain.py --stage dsa-sparse \\
        --model_name_or_path PATH --train_file examples/data/train.jsonl --gradient_checkpointing
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import BatchStream, PackedStream, Prefetcher, SampleEncoder, StreamState, load_processor  # noqa: E402

STAGES = {
    "align": dict(learning_rate=1e-3, max_seq_len=8192, attn="sdpa", indexer_loss=None),
    "full": dict(learning_rate=1e-5, max_seq_len=32768, attn="sdpa", indexer_loss=None),
    "dsa-warmup": dict(learning_rate=1e-3, max_seq_len=32768, attn="sdpa", indexer_loss="dense"),
    "dsa-sparse": dict(learning_rate=7.3e-6, max_seq_len=32768, attn="dsa", indexer_loss="sparse"),
}
DECODER_ATTN = r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
INDEXER = r"model\.layers\.\d+\.self_attn\.sa_indexer\.(q_proj|k_proj)"
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Kept in the checkpoint but never read by the model (it interpolates the learned 2D position table instead);
# always frozen, so DDP sees no parameter without a gradient.
UNUSED_PARAMS = ("visual.vision_model.embeddings.packing_position_embedding.weight",)


@dataclass
class PretrainArguments:
    # ---- model
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Checkpoint folder or Hub id to start from."})
    model_config: Optional[str] = field(default=None, metadata={
        "help": "Random init instead of a checkpoint: 'tiny' (keye_vl.modeling_keye.tiny_config), a JSON file or inline "
                "JSON of KeyeVL2Config fields (e.g. examples/configs/model_1b.json)."})
    processor_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Processor folder; default: the model folder if it holds one, else the package default processor."})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "Override the stage's attention: sdpa / eager (dense), dsa / dsa_torch / dsa_triton (sparse)."})
    # ---- stage
    stage: str = field(default="full", metadata={"help": "align | full | dsa-warmup | dsa-sparse"})
    freeze_vision: bool = field(default=False, metadata={"help": "Also freeze the vision tower (visual.*)."})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "Peak lr (default: per stage, see the table)."})
    max_seq_len: Optional[int] = field(default=None, metadata={"help": "Tokens per packed sequence (default: per stage)."})
    indexer_loss_coef: Optional[float] = field(default=None, metadata={"help": "lambda of the indexer KL (config default 1.0)."})
    router_aux_loss_coef: Optional[float] = field(default=None, metadata={"help": "MoE load-balancing loss weight."})
    # ---- data
    train_file: str = field(default="examples/data/train.jsonl", metadata={"help": "JSONL of conversations or texts."})
    loss_on: str = field(default="assistant", metadata={"help": "assistant (assistant turns only) | all (plain text)."})
    pack: bool = field(default=True, metadata={"help": "Pack several samples per sequence (--no_pack: one each)."})
    per_device_batch_size: int = field(default=1, metadata={"help": "Packed sequences per micro-batch and device."})
    cache_samples: int = field(default=0, metadata={"help": "Keep this many encoded samples in memory (LRU)."})
    prefetch: int = field(default=2, metadata={"help": "Micro-batches prepared ahead in a background thread (0 = off)."})
    # ---- optimisation
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "constant | linear | cosine (with warm-up)."})
    warmup_steps: int = 0
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16 (the accelerate config may set it)."})
    gradient_checkpointing: bool = False
    seed: int = 0
    # ---- LoRA
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the weights."})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_experts: bool = field(default=True, metadata={"help": "Also adapt the fused expert weights (target_parameters)."})
    # ---- output
    output_dir: str = "outputs/pretrain"
    logging_steps: int = 1
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0 = only at the end)."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "A step_N folder, or 'latest'."})
    stop_at_step: Optional[int] = field(default=None, metadata={
        "help": "End the run after this step as if interrupted (saves a checkpoint; for resume tests)."})
    save_final: bool = field(default=True, metadata={"help": "save_pretrained (or the LoRA adapter) in output_dir/final."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | none"})
    log_json: Optional[str] = field(default=None, metadata={"help": "Write args, per-step metrics and a summary here."})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {list(STAGES)}, got {self.stage!r}")
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise ValueError("give exactly one of --model_name_or_path (a checkpoint) and --model_config (random init)")
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
    """Load the checkpoint or build a random model (fp32 master weights), with the stage's attention.

    A random model is built directly on ``device`` when it is a GPU (initialising billions of weights on the CPU
    is slow); every process uses the same seed, so the replicas are identical.
    """
    from keye_vl.modeling_keye import KeyeVL2Config, KeyeVL2MoeForConditionalGeneration, tiny_config

    if args.model_name_or_path:
        return KeyeVL2MoeForConditionalGeneration.from_pretrained(
            args.model_name_or_path, dtype=torch.float32, attn_implementation=args.attn_implementation)
    if args.model_config == "tiny":
        config = tiny_config()
    else:
        spec = args.model_config
        fields = json.load(open(spec)) if os.path.isfile(spec) else json.loads(spec)
        config = tiny_config(**fields.pop("tiny_overrides")) if "tiny_overrides" in fields else KeyeVL2Config(**fields)
    with torch.device(device if device is not None and device.type == "cuda" else "cpu"):
        model = KeyeVL2MoeForConditionalGeneration(config)
    model.set_attn_implementation(args.attn_implementation)
    return model


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
    for n, p in model.named_parameters():
        p.requires_grad_(n in train and not args.lora)
    if args.gradient_checkpointing:
        # Re-entrant checkpointing: the non-re-entrant kind raises CheckpointError ("a different number of tensors
        # was saved") on some packed inputs with this model (see examples/README.md). Re-entrant needs a layer
        # input that requires grad, so the embedding output is made to require it (frozen-embedding stages).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    if not args.lora:
        return model
    from peft import LoraConfig, get_peft_model

    modules = [INDEXER] if args.stage == "dsa-warmup" else [DECODER_ATTN] + ([INDEXER] if args.stage == "dsa-sparse" else [])
    experts = args.lora_experts and args.stage != "dsa-warmup"  # experts learn only from the LM loss
    config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="|".join(f"(?:{m})" for m in modules),
        target_parameters=EXPERT_PARAMS if experts else None,
    )
    return get_peft_model(model, config)


def load_lora(base, adapter_dir: str):
    """Reload a saved adapter onto a base model (a model or a checkpoint folder) -> PeftModel in eval mode."""
    from peft import PeftModel

    if isinstance(base, str):
        from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration

        base = KeyeVL2MoeForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def forward_loss(model, batch: dict, indexer_loss: str | None, config) -> tuple[torch.Tensor, dict]:
    """One forward; returns ``(loss, {"lm_loss", "aux_loss", "indexer_loss"})``.

    ``loss = LM + router_aux_loss_coef * aux + indexer_loss_coef * KL`` (the model's own formula), with the LM
    head run only at positions that predict a label (``logits_to_keep``): assistant-only data labels a small
    part of a packed sequence, and a 32K x 151,936 fp32 logits tensor alone would take 20 GB. In ``dsa-warmup``
    (``indexer_loss="dense"``) the loss is ``indexer_loss_coef * KL`` only. ``batch`` holds ``input_ids``,
    ``labels``, ``segment_ids`` and the vision tensors (no ``attention_mask``: padding is its own segment).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "segment_ids" in inputs and not bool(inputs["segment_ids"].any()):
        inputs.pop("segment_ids")  # one sample per row, no padding: nothing to separate
    if indexer_loss == "dense":
        out = model(**inputs, indexer_loss="dense", logits_to_keep=1)
        kl = out.indexer_loss
        return config.indexer_loss_coef * kl, {"lm_loss": None, "aux_loss": out.aux_loss, "indexer_loss": kl}
    target = batch["labels"][:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(1)  # positions whose next token is a label
    if keep.numel() == 0:
        keep = keep.new_zeros(1)
    out = model(**inputs, indexer_loss=indexer_loss, logits_to_keep=keep)
    logits = out.logits.float()
    tgt = target[:, keep]
    n = (tgt != -100).sum()
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum")
    lm = lm / n.clamp(min=1)
    loss = lm
    if out.aux_loss is not None:
        loss = loss + config.router_aux_loss_coef * out.aux_loss
    if out.indexer_loss is not None:
        loss = loss + config.indexer_loss_coef * out.indexer_loss
    return loss, {"lm_loss": lm, "aux_loss": out.aux_loss, "indexer_loss": out.indexer_loss}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def find_checkpoint(output_dir: str, which: str) -> str:
    if which != "latest":
        if not os.path.isdir(which):
            raise FileNotFoundError(f"--resume_from_checkpoint {which!r} is not a folder")
        return which
    steps = sorted(glob.glob(os.path.join(output_dir, "checkpoints", "step_*")), key=lambda p: int(p.rsplit("_", 1)[1]))
    if not steps:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoints/step_* under {output_dir}")
    return steps[-1]


def save_checkpoint(accelerator, output_dir: str, step: int, data_state: StreamState) -> str:
    """``accelerator.save_state`` (model, optimizer, scheduler, RNG) + step + every rank's data position."""
    path = os.path.join(output_dir, "checkpoints", f"step_{step}")
    accelerator.save_state(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"data_state_rank{accelerator.process_index}.json"), "w") as f:
        json.dump({"step": step, **data_state.to_dict()}, f)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator, path: str) -> tuple[int, StreamState]:
    accelerator.load_state(path)
    state_file = os.path.join(path, f"data_state_rank{accelerator.process_index}.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{state_file} missing: resume with the same number of processes as the saved run")
    d = json.load(open(state_file))
    return int(d.pop("step")), StreamState.from_dict(d)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def main(args: PretrainArguments | None = None, processor=None) -> dict:
    """Train as ``args`` says (parsed from the command line when None); ``processor`` overrides the loaded one.

    Returns the summary written to ``--log_json`` (also when it is not set), the per-step ``history`` and the trained
    ``model`` (unwrapped).
    """
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs, set_seed
    from tqdm.auto import tqdm
    from transformers import HfArgumentParser, get_scheduler

    if args is None:
        (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses()
    # Under FSDP the mixed-precision policy already runs the model in bf16 (weights cast per unit); autocast on top
    # would run the LayerNorm of the DSA indexer keys in fp32 while its queries stay bf16, which the DSA kernels
    # refuse (they need one dtype). So autocast is off there.
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    accelerator = Accelerator(
        kwargs_handlers=[AutocastKwargs(enabled=False)] if fsdp else None,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=None if os.environ.get("ACCELERATE_MIXED_PRECISION") else args.mixed_precision,
        log_with="tensorboard" if args.report_to == "tensorboard" else None,
        project_dir=args.output_dir,
    )
    set_seed(args.seed)
    stage = STAGES[args.stage]

    # ---- model
    model = configure_stage(build_model(args, accelerator.device), args)
    base = model.get_base_model() if args.lora else model
    config = base.config
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
    )
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=args.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    # ---- resume
    step, data_state = 0, StreamState()
    if args.resume_from_checkpoint:
        step, data_state = load_checkpoint(accelerator, find_checkpoint(args.output_dir, args.resume_from_checkpoint))

    # ---- data
    proc_path = args.processor_name_or_path
    if proc_path is None and args.model_name_or_path and any(
            os.path.isfile(os.path.join(args.model_name_or_path, f)) for f in ("processor_config.json", "tokenizer.json")):
        proc_path = args.model_name_or_path
    processor = processor or load_processor(proc_path)
    encoder = SampleEncoder(processor, loss_on=args.loss_on, base_dir=os.path.dirname(os.path.abspath(args.train_file)))
    packs = PackedStream(args.train_file, encoder, args.max_seq_len, pack=args.pack, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, state=data_state, cache_size=args.cache_samples)
    vision_trains = any(p.requires_grad for n, p in model.named_parameters() if "visual." in n or "mlp_AR." in n)
    batches = Prefetcher(BatchStream(packs, args.per_device_batch_size, config.pad_token_id,
                                     ensure_vision_config=config if accelerator.num_processes > 1 and vision_trains else None),
                         args.prefetch)

    # ---- tracking
    hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(args).items()}
    accelerator.init_trackers("pretrain", config=hparams)
    if accelerator.is_main_process:
        print(f"stage {args.stage}: {n_train:,} of {n_total:,} parameters train; attention {args.attn_implementation}; "
              f"{accelerator.num_processes} process(es) x {args.per_device_batch_size} x {args.max_seq_len} tokens "
              f"x {args.gradient_accumulation_steps} accumulation; lr {args.learning_rate}; from step {step}", flush=True)
    history, summary = [], {}
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_main_process, desc=args.stage)
    model.train()
    t_start = time.perf_counter()
    tokens_run = 0
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
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm) \
                        if args.max_grad_norm > 0 else torch.tensor(0.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in (("loss", loss), *parts.items()):
                sums[k] += float(v.detach()) / args.gradient_accumulation_steps if v is not None else 0.0
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        step += 1
        tokens_run += tokens
        dt = time.perf_counter() - t0
        bar.update(1)
        if step % args.logging_steps == 0 or step == args.max_steps:
            stats = torch.tensor([sums["loss"], sums["lm_loss"], sums["aux_loss"], sums["indexer_loss"], tokens / dt],
                                 device=device, dtype=torch.float64)
            stats = accelerator.reduce(stats, reduction="mean")
            row = {"step": step, "loss": stats[0].item(), "lm_loss": stats[1].item(), "aux_loss": stats[2].item(),
                   "indexer_loss": stats[3].item(), "tokens_per_s_per_device": stats[4].item(),
                   "lr": lr, "grad_norm": _to_float(grad_norm), "step_time_s": dt,
                   "tokens_this_device": tokens}
            if device.type == "cuda":  # the largest over the processes
                peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
                row["peak_memory_gib"] = accelerator.gather(peak).max().item()
            history.append(row)
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if accelerator.is_main_process and args.log_json:
                _write_json(args.log_json, args, history, {})
        interrupted = args.stop_at_step is not None and step >= args.stop_at_step
        if (args.save_steps and step % args.save_steps == 0) or interrupted:
            save_checkpoint(accelerator, args.output_dir, step, data_state)
        if interrupted:
            break
    bar.close()
    batches.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        "final_step": step, "parameters_total": n_total, "parameters_trained": n_train,
        "processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision, "elapsed_s": elapsed, "skipped_samples": packs.skipped,
        "mean_tokens_per_s_per_device": (sum(r["tokens_per_s_per_device"] for r in history[1:]) / max(1, len(history) - 1))
        if len(history) > 1 else (history[0]["tokens_per_s_per_device"] if history else 0.0),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if device.type == "cuda":
        summary["peak_memory_gib"] = max((r.get("peak_memory_gib", 0.0) for r in history), default=0.0)
        summary["peak_reserved_gib_rank0"] = torch.cuda.max_memory_reserved(device) / 2**30
    if args.save_final and step >= args.max_steps:
        summary["final_dir"] = save_final(accelerator, model, processor, args)
    if accelerator.is_main_process and args.log_json:
        _write_json(args.log_json, args, history, summary)
    accelerator.end_training()
    return {"history": history, **summary, "model": accelerator.unwrap_model(model)}


def save_final(accelerator, model, processor, args) -> str:
    """``save_pretrained`` a self-contained folder (weights + remote code + processor), or the LoRA adapter."""
    final = os.path.join(args.output_dir, "final")
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(final, state_dict=state_dict, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    if accelerator.is_main_process and not args.lora:
        processor.save_pretrained(final)
    accelerator.wait_for_everyone()
    return final


def _to_float(x) -> float:
    x = x.full_tensor() if hasattr(x, "full_tensor") else x  # FSDP2 may return a DTensor
    return float(x)


def _write_json(path: str, args, history: list, summary: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": asdict(args), "history": history, "summary": summary}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
