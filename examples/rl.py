"""GSPO reinforcement learning for Keye-VL-2.0 with Accelerate: Video-RL and Context-RL on verifiable tasks.

Each step: draw prompts from the task JSONL (``examples/make_rl_tasks.py`` format), sample ``--num_generations``
(G) completions per prompt with the model's own ``generate`` (DSA with the indexer cache, the sampler's
log-probabilities recorded as the tokens are drawn), score them with the reward registry
(``keye_vl.training.rewards``), drop the groups whose rewards do not vary and draw more prompts until
``--prompts_per_step`` groups remain (``--oversample``, ``--max_draw_rounds``), then take
``--steps_per_generation`` optimiser steps of the GSPO loss (``keye_vl.training.gspo``):

    A_i = (r_i - mean_group) / (std_group + 1e-4)          s_i = exp(mean_t(log pi(y_t) - log pi_old(y_t)))
    loss = mean_i -min(s_i A_i, clip(s_i, 1 - eps, 1 + eps_high) A_i)  [+ beta * KL_k3(pi || pi_ref)]

``pi_old`` is the policy that generated: with one optimiser step per generation it equals the current policy
(ratio 1, as in TRL); otherwise it is recomputed by a training forward right after the rollout
(``--old_logprobs recompute``) or taken from the sampler (``sampler``). With ``recompute`` the rollout-vs-training
mismatch is corrected by the truncated sequence-level importance weight ``min(exp(mean_t(log pi_old - log mu)),
--rollout_is_cap)`` (mu = the sampler's recorded probabilities).

Video-RL (``--mode video``, the default): the vision tower and projector are frozen; their features are computed
once per prompt and reused for the G completions, the log-prob forwards and every optimiser step
(``keye_vl.training.rollout.VisionFeatureCache``). Context-RL (``--mode context``): Keye-VL-2.0's Context-RL
recipe is not public; here it is GSPO on long-context tasks with exact answers (key chains among distractor
passages, mention counts, needle frames far back in long frame lists) and a curriculum of context lengths
(``--context_curriculum 4096:20,16384:20,65536``: prompts up to 4K tokens for 20 steps, then up to 16K, ...). Long
prompts never build [L, vocab] logits: the LM head runs only on completion positions, ``--logprob_chunk_size`` at a
time (``keye_vl.training.logprobs``).

Run (tiny random model, CPU)::

    python examples/make_rl_tasks.py --output_dir outputs/rl_tasks --seed 0
    python examples/rl.py --model_config tiny --train_file outputs/rl_tasks/video.jsonl --max_steps 4 \\
        --num_generations 4 --prompts_per_step 2 --max_new_tokens 16 --output_dir outputs/rl_tiny

On GPUs: ``accelerate launch --config_file examples/configs/single_gpu.yaml examples/rl.py ...`` (or
``fsdp2.yaml``); see ``examples/README.md``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from keye_vl.training.args import DataArguments, LoraArguments, ModelArguments, OptimArguments, OutputArguments, parse_args
from keye_vl.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from keye_vl.training.data import PromptEncoder, RecordStream, StreamState, collate_prompts, load_processor, processor_path
from keye_vl.training.gspo import GroupFiller, group_advantages, gspo_loss
from keye_vl.training.logging import TrainLogger
from keye_vl.training.logprobs import completion_logprobs
from keye_vl.training.loop import (finish_run, device_name, make_accelerator, prepare_training, peak_memory_gib,
                                   reduce_mean, reset_peak_memory, to_float)
from keye_vl.training.models import (DECODER_ATTN, EXPERT_PARAMS, UNUSED_PARAMS, VISION_PREFIXES, build_model,
                                     configure_trainable, unwrap_base, vision_is_frozen)
from keye_vl.training.rewards import compute_rewards
from keye_vl.training.rollout import VISION_KINDS, RolloutBatch, _row_items, generate_rollouts, unsharded_for_rollout

EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class RLArguments(OutputArguments, LoraArguments, OptimArguments, DataArguments, ModelArguments):
    """The shared argument groups (``keye_vl.training.args``) plus GSPO's."""

    mode: str = field(default="video", metadata={"help": "video (Video-RL) | context (Context-RL)."})
    num_generations: int = field(default=8, metadata={"help": "G: completions per prompt (TimeLens uses 8)."})
    prompts_per_step: int = field(default=4, metadata={"help": "Groups (prompts) with varying rewards per step and device."})
    oversample: float = field(default=1.5, metadata={"help": "Prompts drawn per missing group (refill of dropped groups)."})
    max_draw_rounds: int = field(default=4, metadata={"help": "Rollout rounds per step at most (then train on what is kept)."})
    steps_per_generation: int = field(default=1, metadata={"help": "Optimiser steps on each rollout batch."})
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    epsilon: float = field(default=3e-4, metadata={"help": "Lower clip of the sequence ratio (TRL GSPO default)."})
    epsilon_high: float = field(default=4e-4, metadata={"help": "Upper clip of the sequence ratio (TRL GSPO default)."})
    beta: float = field(default=0.0, metadata={"help": "KL-to-reference weight (0: no reference model)."})
    old_logprobs: str = field(default="recompute", metadata={
        "help": "pi_old with several steps per generation: recompute (training forward) | sampler (recorded mu)."})
    rollout_is_cap: Optional[float] = field(default=2.0, metadata={
        "help": "Truncation of the sequence-level rollout importance weight (recompute mode); <= 0 disables."})
    reward_weights: Optional[str] = field(default=None, metadata={
        "help": "JSON {reward: weight} for every task (default: each task's own / the task type's default)."})
    context_curriculum: Optional[str] = field(default=None, metadata={
        "help": "Context lengths by step, e.g. '4096:20,16384:20,65536': tasks with context_tokens <= the stage's "
                "length (the last stage runs to the end)."})
    logprob_chunk_size: int = field(default=1024, metadata={"help": "Completion positions per LM-head chunk."})
    train_vision: bool = field(default=False, metadata={"help": "Also train the vision tower and projector."})
    per_device_batch_size: int = field(default=8, metadata={"help": "Completions per training micro-batch."})
    learning_rate: Optional[float] = 1e-6
    lr_scheduler_type: str = "constant"
    max_steps: int = 100
    output_dir: str = "outputs/rl"

    def __post_init__(self):
        self.check_model_source()
        if self.mode not in ("video", "context"):
            raise ValueError(f"--mode must be video or context, got {self.mode!r}")
        if self.num_generations < 2:
            raise ValueError("--num_generations must be >= 2 (group advantages need a group std)")
        if self.old_logprobs not in ("recompute", "sampler"):
            raise ValueError(f"--old_logprobs must be recompute or sampler, got {self.old_logprobs!r}")
        if self.old_logprobs == "sampler" and (self.top_k or self.top_p < 1.0):
            raise ValueError("--old_logprobs sampler takes pi_old from the sampler, whose --top_k / --top_p truncation "
                             "the training forward does not apply (the ratio would sit below 1 on every token); use "
                             "--old_logprobs recompute with top-k / top-p sampling")
        if self.steps_per_generation < 1 or self.per_device_batch_size < 1:
            raise ValueError("--steps_per_generation and --per_device_batch_size must be >= 1")
        for name in ("save_steps", "stop_at_step", "max_steps"):
            v = getattr(self, name)
            if v and v % self.steps_per_generation:
                raise ValueError(f"--{name} ({v}) must be a multiple of --steps_per_generation "
                                 f"({self.steps_per_generation}): checkpoints are taken between rollouts")
        if self.gradient_accumulation_steps != 1:
            raise ValueError("--gradient_accumulation_steps: every optimiser step already accumulates over all of its "
                             "micro-batches (--per_device_batch_size completions each); leave it at 1")
        self.curriculum = parse_curriculum(self.context_curriculum)
        if self.reward_weights is not None and not isinstance(self.reward_weights, dict):
            self.reward_weights = json.loads(self.reward_weights)


def parse_curriculum(spec: str | None) -> list[tuple[int, int | None]]:
    """``"4096:20,16384:20,65536"`` -> ``[(4096, 20), (16384, 20), (65536, None)]`` (None: to the end).

    Raises ValueError for lengths or step counts that are not positive integers, or a stage after an open one.
    """
    if not spec:
        return []
    out = []
    for part in spec.split(","):
        length, _, steps = part.strip().partition(":")
        try:
            n, s = int(length), (int(steps) if steps else None)
        except ValueError:
            raise ValueError(f"--context_curriculum: bad stage {part!r} (want LENGTH:STEPS)") from None
        if n <= 0 or (s is not None and s <= 0):
            raise ValueError(f"--context_curriculum: stage {part!r} needs a positive length and step count")
        if out and out[-1][1] is None:
            raise ValueError("--context_curriculum: only the last stage may omit its step count")
        out.append((n, s))
    return out


def context_limit(curriculum: list[tuple[int, int | None]], step: int) -> int | None:
    """The context length allowed at 0-based ``step`` (None: no limit)."""
    done = 0
    for n, s in curriculum:
        if s is None or step < done + s:
            return n
        done += s
    return curriculum[-1][0] if curriculum else None


# ----------------------------------------------------------------------------------------------------------------
# Rollout batches: row selection (kept groups, micro-batches) with the vision-feature cache
# ----------------------------------------------------------------------------------------------------------------
def select_rows(rb: RolloutBatch, rows: list[int], config) -> RolloutBatch:
    """The rows ``rows`` of a rollout batch, the completions trimmed to their longest real length; the vision
    features (cached) or pixels (uncached) of exactly those rows."""
    idx = torch.tensor(rows, dtype=torch.long, device=rb.completion_ids.device)
    mask = rb.completion_mask.index_select(0, idx)
    c = max(int(mask.sum(1).max()), 1)
    out = RolloutBatch(
        prompt_ids=rb.prompt_ids.index_select(0, idx), prompt_mask=rb.prompt_mask.index_select(0, idx),
        completion_ids=rb.completion_ids.index_select(0, idx)[:, :c], completion_mask=mask[:, :c],
        sampler_logprobs=rb.sampler_logprobs.index_select(0, idx)[:, :c], group=rb.group.index_select(0, idx),
        records=rb.records,
    )
    merge = config.vision_config.spatial_merge_size ** 2
    token_ids = {"image": config.image_token_id, "video": config.video_token_id}
    src = rb.cache
    if src is not None:
        cache = copy.copy(src)
        cache.features, cache.grids = {}, {}
        for kind in src.features:
            grid = src.grids[kind]
            tokens = (grid.prod(-1) // merge).tolist()
            ranges = _row_items(rb.prompt_ids, tokens, token_ids[kind])
            starts = [0]
            for t in tokens:
                starts.append(starts[-1] + t)
            feats = [src.features[kind][starts[ranges[r][0]]: starts[ranges[r][1]]] for r in rows]
            cache.features[kind] = torch.cat(feats)
            cache.grids[kind] = torch.cat([grid[ranges[r][0]: ranges[r][1]] for r in rows])
        out.cache, out.vision = cache, cache.expanded_inputs()
    elif rb.vision:
        for kind, pix_key, grid_key, _, _ in VISION_KINDS:
            if rb.vision.get(pix_key) is None:
                continue
            grid, pix = rb.vision[grid_key], rb.vision[pix_key]
            sizes = grid.prod(-1).tolist()
            ranges = _row_items(rb.prompt_ids, [s // merge for s in sizes], token_ids[kind])
            starts = [0]
            for s in sizes:
                starts.append(starts[-1] + s)
            out.vision[pix_key] = torch.cat([pix[starts[ranges[r][0]]: starts[ranges[r][1]]] for r in rows])
            out.vision[grid_key] = torch.cat([grid[ranges[r][0]: ranges[r][1]] for r in rows])
    return out


def equalise_chunks(chunks: list[tuple], target: int) -> list[tuple]:
    """``(rb, rows, adv)`` micro-batch chunks -> ``target`` chunks ``(rb, rows, adv, weight)``: the largest chunk is
    halved until there are enough (the loss is unchanged: it is normalised by the step's number of sequences); when
    every chunk has one row, zero-weight copies of the last one are added (their backward adds nothing). Under FSDP /
    DDP every rank must run the same number of forwards and backwards."""
    out = [(rb, list(rows), list(adv), 1.0) for rb, rows, adv in chunks]
    if not out:
        if target:
            raise ValueError("no micro-batch to equalise (every rank keeps the same number of groups)")
        return out
    while len(out) < target:
        i = max(range(len(out)), key=lambda j: (len(out[j][1]) if out[j][3] else 0, -j))
        rb, rows, adv, w = out[i]
        if len(rows) > 1 and w:
            h = (len(rows) + 1) // 2
            out[i: i + 1] = [(rb, rows[:h], adv[:h], w), (rb, rows[h:], adv[h:], w)]
        else:
            out.append((out[-1][0], out[-1][1], out[-1][2], 0.0))
    return out


def score(model, mb: RolloutBatch, args) -> torch.Tensor:
    """[n, C] float32 per-token log-probs of ``mb``'s completions under ``model`` (vision features from the cache;
    LM head on completion positions only, ``args.logprob_chunk_size`` at a time)."""
    with mb.serve(model):
        return completion_logprobs(model, mb.model_inputs(), mb.completion_ids, mb.completion_mask,
                                   chunk_size=args.logprob_chunk_size, temperature=args.temperature)["logprobs"]


@dataclass
class Group:
    """One prompt's G completions: their rows in the rollout batch ``rb``, rewards and reward parts."""

    rb: RolloutBatch
    rows: list[int]
    rewards: list[float]
    parts: list[dict]
    record: dict
    lengths: list[int]


class Roller:
    """Draws prompt groups: records from the stream (filtered by the curriculum), rollouts, rewards."""

    def __init__(self, model, processor, args, stream: RecordStream, encoder: PromptEncoder, config):
        self.model, self.processor, self.args, self.stream, self.encoder = model, processor, args, stream, encoder
        self.config = config
        tok = processor.tokenizer
        self.eos = [tok.convert_tokens_to_ids(t) for t in EOS_TOKENS]
        self.pad = config.pad_token_id if config.pad_token_id is not None else tok.pad_token_id
        self.limit: int | None = None
        self.rollout_time = 0.0
        self.rollout_tokens = 0
        self._n_lines = None

    def _records(self, k: int) -> list[dict]:
        out, skipped = [], 0
        if self._n_lines is None:
            with open(self.stream.path, "rb") as f:
                self._n_lines = max(1, sum(1 for line in f if line.strip()))
        while len(out) < k:
            (rec,), _ = self.stream.take(1)
            tokens = rec.get("context_tokens")
            if self.limit is not None and tokens is not None and tokens > self.limit:
                skipped += 1
                if skipped > self._n_lines:
                    raise ValueError(f"no task in {self.stream.path} fits the context length {self.limit}")
                continue
            out.append(rec)
        return out

    def draw(self, k: int) -> list[Group]:
        args, G = self.args, self.args.num_generations
        records = self._records(k)
        prompts = [self.encoder(r) for r in records]
        device = next(self.model.parameters()).device
        batch = {key: v.to(device) for key, v in collate_prompts(prompts, self.pad).items()}
        t0 = time.perf_counter()
        with unsharded_for_rollout(self.model):
            rb = generate_rollouts(self.model, batch, G, args.max_new_tokens, self.eos, self.pad,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   reuse_vision=vision_is_frozen(self.model), records=records)
        self.rollout_time += time.perf_counter() - t0
        self.rollout_tokens += rb.num_tokens
        lengths = rb.completion_mask.sum(1).tolist()
        texts = self.processor.tokenizer.batch_decode(
            [ids[:n] for ids, n in zip(rb.completion_ids.tolist(), lengths)], skip_special_tokens=True)
        groups = []
        for i, rec in enumerate(records):
            rows = list(range(i * G, (i + 1) * G))
            scored = [compute_rewards(texts[r], rec, args.reward_weights) for r in rows]
            groups.append(Group(rb, rows, [s[0] for s in scored], [s[1] for s in scored], rec,
                                [lengths[r] for r in rows]))
        return groups


def configure_model(model, args: RLArguments):
    """Freeze what RL does not train (vision tower and projector unless ``--train_vision``; the unused position
    table), add LoRA; returns the model to train."""
    return configure_trainable(
        model, lambda n: n not in UNUSED_PARAMS and (args.train_vision or not n.startswith(VISION_PREFIXES)),
        gradient_checkpointing=args.gradient_checkpointing, lora=args.lora, lora_modules=[DECODER_ATTN],
        lora_parameters=EXPERT_PARAMS if args.lora_experts else None, lora_r=args.lora_r, lora_alpha=args.lora_alpha)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def main(args: RLArguments | None = None, processor=None) -> dict:
    """Train as ``args`` says (parsed from the command line when None). Returns the summary (also written to
    ``--log_json``), the per-step ``history`` and the trained ``model`` (unwrapped)."""
    from accelerate.utils import set_seed

    if args is None:
        args = parse_args(RLArguments)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    device = accelerator.device

    model = configure_model(build_model(args.model_name_or_path, args.model_config, args.attn_implementation, device),
                            args)
    config = unwrap_base(model).config
    ref_model = None
    if args.beta and not args.lora:  # with LoRA the reference is the base model (adapters disabled)
        ref_model = copy.deepcopy(unwrap_base(model)).eval().requires_grad_(False).to(device)
    model, optimizer, scheduler, n_train, n_total = prepare_training(accelerator, model, args)

    step, stream_state = 0, StreamState()
    if args.resume_from_checkpoint:
        step, saved = load_checkpoint(accelerator, find_checkpoint(args.output_dir, args.resume_from_checkpoint))
        stream_state = StreamState.from_dict(saved["stream"])

    processor = processor or load_processor(processor_path(args.processor_name_or_path, args.model_name_or_path))
    stream = RecordStream(args.train_file, rank=accelerator.process_index, world_size=accelerator.num_processes,
                          state=stream_state)
    encoder = PromptEncoder(processor, base_dir=os.path.dirname(os.path.abspath(args.train_file)))
    roller = Roller(model, processor, args, stream, encoder, config)
    filler = GroupFiller(args.prompts_per_step, args.oversample, args.max_draw_rounds)
    G = args.num_generations
    is_cap = args.rollout_is_cap if (args.rollout_is_cap and args.rollout_is_cap > 0) else None

    log = TrainLogger(accelerator, args, "rl", initial_step=step, desc=f"gspo-{args.mode}")
    log.print(f"GSPO {args.mode}-RL: {n_train:,} of {n_total:,} parameters train (vision "
              f"{'trains' if args.train_vision else 'frozen'}); G={G}, {args.prompts_per_step} groups x "
              f"{args.steps_per_generation} step(s) per generation; lr {args.learning_rate}; from step {step}")
    reset_peak_memory(device)
    model.train()
    t_start = time.perf_counter()
    while step < args.max_steps:
        t0 = time.perf_counter()
        roller.limit = context_limit(args.curriculum, step)
        roller.rollout_time, roller.rollout_tokens = 0.0, 0
        drawn: list[Group] = []

        def draw(k):
            groups = roller.draw(k)
            drawn.extend(groups)
            return groups

        kept, fill = filler.fill(draw)
        if accelerator.num_processes > 1:  # every rank trains on the same number of groups (same collectives)
            n_min = int(accelerator.gather(torch.tensor([len(kept)], device=device)).min())
            kept = kept[:n_min]
        t_roll = time.perf_counter() - t0

        # ---- micro-batches of the kept completions (rows of one rollout batch each), with advantages
        chunks = []
        by_rb: dict[int, list] = {}
        for g in kept:
            by_rb.setdefault(id(g.rb), []).append(g)
        n_seq = len(kept) * G
        for groups in by_rb.values():
            rows, adv = [], []
            for g in groups:
                rows += g.rows
                adv += group_advantages(torch.tensor(g.rewards), G).tolist()
            for s in range(0, len(rows), args.per_device_batch_size):
                e = s + args.per_device_batch_size
                chunks.append((groups[0].rb, rows[s:e], adv[s:e]))
        if accelerator.num_processes > 1:  # the same number of forwards / backwards on every rank
            target = int(accelerator.gather(torch.tensor([len(chunks)], device=device)).max())
            chunks = equalise_chunks(chunks, target)
        else:
            chunks = [(rb, rows, adv, 1.0) for rb, rows, adv in chunks]
        micro = [{"mb": select_rows(rb, rows, config), "adv": torch.tensor(adv, device=device), "weight": w}
                 for rb, rows, adv, w in chunks]
        # pi_old / reference log-probs, once per generation (no gradient)
        if micro and (args.beta or (args.steps_per_generation > 1 and args.old_logprobs == "recompute")):
            with torch.no_grad():
                for m in micro:
                    if args.steps_per_generation > 1 and args.old_logprobs == "recompute":
                        m["old"] = score(model, m["mb"], args)
                    if args.beta:
                        if ref_model is not None:
                            m["ref"] = score(ref_model, m["mb"], args)
                        else:
                            with accelerator.unwrap_model(model).disable_adapter():
                                m["ref"] = score(model, m["mb"], args)

        for inner in range(args.steps_per_generation):
            t1 = time.perf_counter()
            stats = {"loss": 0.0, "clipped": 0.0, "ratio": 0.0, "kl": 0.0, "is_weight": 0.0}
            grad_norm = torch.tensor(0.0)
            for j, m in enumerate(micro):
                mb = m["mb"]
                sync = contextlib.nullcontext() if (j == len(micro) - 1 or accelerator.num_processes == 1) \
                    else accelerator.no_sync(model)
                with sync:
                    logp = score(model, mb, args)
                    if "old" in m:
                        old = m["old"]
                    elif args.steps_per_generation > 1:  # --old_logprobs sampler
                        old = mb.sampler_logprobs
                    else:
                        old = logp.detach()
                    out = gspo_loss(logp, old, m["adv"], mb.completion_mask, args.epsilon, args.epsilon_high,
                                    num_sequences=n_seq, ref_logp=m.get("ref"), beta=args.beta,
                                    rollout_logp=mb.sampler_logprobs if (is_cap and args.old_logprobs == "recompute")
                                    else None, rollout_is_cap=is_cap)
                    accelerator.backward(out.loss * m["weight"])
                if not m["weight"]:
                    continue
                stats["loss"] += float(out.loss.detach())
                stats["clipped"] += float(out.clipped.float().sum()) / n_seq
                stats["ratio"] += float(out.ratio.sum()) / n_seq
                if out.kl is not None:
                    stats["kl"] += float(out.kl.sum()) / n_seq
                if out.is_weight is not None:
                    stats["is_weight"] += float(out.is_weight.sum()) / n_seq
            if micro:
                if args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():  # a skipped update (no group kept) still advances the schedule
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                scheduler.step()
            step += 1
            log.advance()
            if step % args.logging_steps == 0 or step == args.max_steps:
                all_r = [r for g in drawn for r in g.rewards]
                names = sorted({k for g in drawn for p in g.parts for k in p})
                kept_adv = torch.cat([m["adv"] for m in micro]).float() if micro else torch.zeros(1)
                lens = [n for g in drawn for n in g.lengths]
                dt_train = time.perf_counter() - t1
                local = [_mean(all_r), _mean(r for g in kept for r in g.rewards), stats["loss"], stats["clipped"],
                         stats["ratio"], stats["kl"], stats["is_weight"],
                         roller.rollout_tokens / max(roller.rollout_time, 1e-9)]
                red = reduce_mean(accelerator, local)
                row = {"step": step, "reward": red[0], "reward_kept": red[1], "loss": red[2], "clip_fraction": red[3],
                       "ratio_mean": red[4], "kl": red[5], "is_weight_mean": red[6],
                       "rollout_tokens_per_s": red[7] if inner == 0 else None,
                       "advantage_abs_mean": float(kept_adv.abs().mean()), "advantage_std": float(kept_adv.std())
                       if kept_adv.numel() > 1 else 0.0,
                       **{f"reward/{n}": _mean(p.get(n, 0.0) for g in drawn for p in g.parts) for n in names},
                       "groups_drawn": fill["groups_drawn"], "groups_dropped": fill["groups_dropped"],
                       "groups_kept": len(kept), "draw_rounds": fill["draw_rounds"],
                       "completion_len_mean": _mean(lens), "completion_len_max": max(lens) if lens else 0,
                       "completion_len_min": min(lens) if lens else 0, "rollout_tokens": roller.rollout_tokens,
                       "rollout_time_s": t_roll if inner == 0 else 0.0, "train_time_s": dt_train,
                       "step_time_s": (time.perf_counter() - t0) if inner == 0 else dt_train,
                       "lr": lr, "grad_norm": to_float(grad_norm), "context_limit": roller.limit,
                       "skipped_update": not micro}
                peak = peak_memory_gib(accelerator)
                if peak is not None:
                    row["peak_memory_gib"] = peak
                log.log(row, postfix="reward")
        interrupted = args.stop_at_step is not None and step >= args.stop_at_step
        if (args.save_steps and step % args.save_steps == 0) or interrupted:
            save_checkpoint(accelerator, args.output_dir, step, {"stream": stream.state.to_dict()})
        if interrupted:
            break

    history = log.history
    summary = {
        "final_step": step, "parameters_total": n_total, "parameters_trained": n_train, "mode": args.mode,
        "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "elapsed_s": time.perf_counter() - t_start, "device": device_name(device),
        "mean_rollout_tokens_per_s": _mean(r["rollout_tokens_per_s"] for r in history
                                           if r.get("rollout_tokens_per_s") is not None),
        "mean_step_time_s": _mean(r["step_time_s"] for r in history),
        "reward_first": history[0]["reward"] if history else None,
        "reward_last": history[-1]["reward"] if history else None,
    }
    return finish_run(accelerator, log, model, processor, args, step, summary, device)


if __name__ == "__main__":
    main()
