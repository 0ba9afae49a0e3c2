"""Multi-teacher on-policy distillation (MOPD) of Keye-VL-2.0 with Accelerate: images, videos and text.

The method (Xiaomi MiMo-V2-Flash technical report, arXiv 2601.02780, section 4.4; adopted by Keye-VL-2.0 as
"cross-modal MOPD"): the student samples completions with its own ``generate`` (DSA with deterministic top-k);
each sample is routed to ONE teacher by a field of its record (``domain``); the teacher scores the student's tokens,
and per token (sg = stop-gradient, mu = the sampling distribution, recorded at sampling time)

- advantage ``A_t = sg[log pi_T(y_t) - log pi_theta(y_t)] + alpha * A_ORM`` (A_ORM: group-normalised outcome
  advantage of an optional reward; ``--alpha 0`` by default),
- truncated importance weight ``w_t = sg[pi_theta(y_t) / mu(y_t)]`` if it lies in ``[eps_low, eps_high]``, else 0,
- loss ``-(1/|y|) sum_t c_t w_t A_t log pi_theta(y_t)`` averaged over the samples (``c_t``: formatting tokens
  down-weighted with ``--format_tokens`` / ``--format_token_weight``, 1 elsewhere).

``--topk_overlap K`` switches to Keye-VL-2.0's top-k overlap estimator (known from a second-hand summary of its
report) ``A_t = sum_{v in TopK_T ∩ TopK_S} pi_theta(v) [log pi_T(v) - log pi_theta(v)]`` in one of two forms:
``--overlap_form kl``: the reverse-KL gradient ``sum_{v in O} pi_theta(v) [log pi_theta(v) - log pi_T(v)] grad log
pi_theta(v)`` restricted to the overlap set O, which does not depend on the sampled token; ``--overlap_form
masked``: the sampled-token advantage above, kept only where the sampled token is in O (0 elsewhere). See
``keye_vl.training.losses.overlap_kl_loss`` / ``sampled_in_overlap``.

Teachers: a routing table (JSON, ``--teachers``) maps the field's values to teachers, each a local folder of this
model or of any ``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` (a text-only teacher gets the text of the
conversation; it must share the student's tokenizer). ``--teacher_residency load`` (default) loads one teacher at a
time from disk, scores every sample routed to it in the step, and frees it, so at most one teacher is ever in
memory; ``offload`` keeps them all in CPU memory and moves one at a time to the accelerator; ``resident`` keeps them
all on the accelerator.

Run (tiny random models on CPU; examples/README.md has every command)::

    python examples/scripts/make_mopd_teachers.py --out outputs/mopd_teachers    # two random tiny teachers
    python examples/mopd.py --model_config tiny --teachers outputs/mopd_teachers/teachers.json \\
        --attn_implementation dsa_torch --max_steps 8 --max_new_tokens 16 --learning_rate 1e-3 \\
        --output_dir outputs/mopd_tiny
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from keye_vl.training.args import DataArguments, LoraArguments, ModelArguments, OptimArguments, OutputArguments, parse_args
from keye_vl.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from keye_vl.training.data import PromptEncoder, RecordStream, StreamState, collate_prompts, load_processor, processor_path
from keye_vl.training.logging import TrainLogger
from keye_vl.training.logprobs import completion_hidden, completion_logprobs, exact_reverse_kl
from keye_vl.training.loop import (finish_run, backward_and_step, device_name, make_accelerator, prepare_training,
                                   peak_memory_gib, reduce_mean, reset_peak_memory, to_float)
from keye_vl.training.losses import (group_normalised_rewards, mopd_advantages, mopd_loss, overlap_kl_loss,
                                     sampled_in_overlap, topk_overlap, truncated_importance_weights)
from keye_vl.training.models import (DECODER_ATTN, EXPERT_PARAMS, UNUSED_PARAMS, VISION_PREFIXES, build_model,
                                     configure_trainable, load_any_causal_lm, unwrap_base,
                                     vision_is_frozen)
from keye_vl.training.rollout import VisionFeatureCache, generate_rollouts, unsharded_for_rollout

EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class MOPDArguments(OutputArguments, LoraArguments, OptimArguments, DataArguments, ModelArguments):
    """The shared argument groups (``keye_vl.training.args``) plus the MOPD fields."""

    teachers: Optional[str] = field(default=None, metadata={
        "help": "Routing table (JSON): {'field': 'domain', 'teachers': {name: {'path': DIR, 'text_only': bool, "
                "'trust_remote_code': bool (default false)}}, "
                "'routes': {value: name}, 'default': name or null}; relative paths are resolved against its folder."})
    freeze_vision: bool = field(default=False, metadata={
        "help": "Freeze the vision tower and the projector (visual.*, mlp_AR.*); needed with several processes."})
    teacher_residency: str = field(default="load", metadata={
        "help": "load (one at a time from disk, freed after scoring) | offload (all in CPU RAM, one at a time on "
                "the accelerator) | resident (all on the accelerator)."})
    teacher_dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    train_file: str = "examples/data/mopd_train.jsonl"
    per_device_batch_size: int = field(default=2, metadata={"help": "Prompts per rollout and device."})
    num_generations: int = field(default=4, metadata={"help": "Completions per prompt (G)."})
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = field(default=0, metadata={"help": "Sampling top-k (0 = off); mu is recorded after it."})
    top_p: float = 1.0
    cache_implementation: Optional[str] = field(default=None, metadata={
        "help": "generate's cache: None (the dynamic KeyeVL2Cache) | static (the fast path: preallocated cache, "
                "CUDA-graph decode on one GPU; see README 'Fast generation')."})
    eps_low: float = field(default=0.5, metadata={"help": "Importance weights below this get no gradient."})
    eps_high: float = field(default=2.0, metadata={"help": "Importance weights above this get no gradient."})
    alpha: float = field(default=0.0, metadata={"help": "Weight of the outcome-reward advantage A_ORM."})
    reward: str = field(default="none", metadata={
        "help": "Outcome reward for A_ORM: none | exact (1 if the completion's text equals the record's assistant "
                "answer, stripped, else 0)."})
    format_tokens: str = field(default="", metadata={
        "help": "Comma-separated token strings or ids whose loss is scaled by --format_token_weight."})
    format_token_weight: float = 1.0
    topk_overlap: int = field(default=0, metadata={"help": "K of the top-k overlap estimator (0 = off)."})
    overlap_form: str = field(default="kl", metadata={"help": "kl (restricted reverse-KL gradient) | masked."})
    logprob_chunk_size: int = field(default=1024, metadata={"help": "Positions per LM-head chunk."})
    learning_rate: Optional[float] = 1e-6
    lr_scheduler_type: str = "constant"
    eval_file: Optional[str] = field(default=None, metadata={"help": "Held-out prompts (JSONL) for the exact KL."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (and at steps 0 and max_steps)."})
    eval_num_prompts: int = 8
    eval_max_new_tokens: Optional[int] = None
    output_dir: str = "outputs/mopd"

    def __post_init__(self):
        self.check_model_source()
        if not self.teachers:
            raise ValueError("--teachers (the routing table, a JSON file) is required")
        if self.teacher_residency not in ("load", "offload", "resident"):
            raise ValueError(f"--teacher_residency must be load, offload or resident, got {self.teacher_residency!r}")
        if self.overlap_form not in ("kl", "masked"):
            raise ValueError(f"--overlap_form must be kl or masked, got {self.overlap_form!r}")
        if self.reward not in ("none", "exact"):
            raise ValueError(f"--reward must be none or exact, got {self.reward!r}")
        if self.alpha and self.reward == "none":
            raise ValueError("--alpha > 0 needs an outcome reward (--reward exact)")
        if not (0.0 <= self.eps_low <= 1.0 <= self.eps_high):
            raise ValueError(f"need 0 <= eps_low <= 1 <= eps_high, got {self.eps_low}, {self.eps_high}")
        if self.num_generations < 1 or self.max_new_tokens < 1 or self.per_device_batch_size < 1:
            raise ValueError("--num_generations, --max_new_tokens and --per_device_batch_size must be >= 1")
        if self.teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--teacher_dtype must be float32, bfloat16 or float16, got {self.teacher_dtype!r}")
        self.attn_implementation = self.attn_implementation or "dsa"


# ----------------------------------------------------------------------------------------------------------------
# Routing and teachers
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TeacherSpec:
    name: str
    path: str
    text_only: bool = False
    trust_remote_code: bool = False  # run the teacher folder's own code (a routing-table opt-in)


class RoutingTable:
    """``record[field] -> teacher name`` from a JSON file (see ``--teachers``).

    Raises ValueError for a table whose routes name an unknown teacher, and (:meth:`route`) for a record whose
    field is missing or has no route and no default.
    """

    def __init__(self, path: str):
        with open(path) as f:
            cfg = json.load(f)
        base = os.path.dirname(os.path.abspath(path))
        self.field = cfg.get("field", "domain")
        self.teachers = {}
        for name, t in cfg["teachers"].items():
            p = t["path"] if os.path.isabs(t["path"]) else os.path.normpath(os.path.join(base, t["path"]))
            self.teachers[name] = TeacherSpec(name, p, bool(t.get("text_only", False)),
                                              bool(t.get("trust_remote_code", False)))
        self.routes = dict(cfg.get("routes", {}))
        self.default = cfg.get("default")
        bad = {v for v in self.routes.values() if v not in self.teachers} | (
            {self.default} if self.default is not None and self.default not in self.teachers else set())
        if bad:
            raise ValueError(f"{path}: routes name unknown teachers {sorted(bad)}; teachers: {sorted(self.teachers)}")

    def route(self, record: dict) -> str:
        value = record.get(self.field)
        name = self.routes.get(value, self.default) if value is not None else self.default
        if name is None:
            raise ValueError(f"record has {self.field}={value!r}, which has no route and the table has no default; "
                             f"routes: {sorted(self.routes)}")
        return name


class TeacherPool:
    """Teachers by name, loaded as ``--teacher_residency`` says. ``loaded_now`` / ``max_loaded`` / ``loads`` count
    models in memory (the one-at-a-time guarantee is checked against them in the tests)."""

    def __init__(self, table: RoutingTable, residency: str, device, dtype: torch.dtype, attn_implementation: str | None,
                 vocab_size: int = 0):
        self.table, self.residency, self.device, self.dtype = table, residency, device, dtype
        self.vocab_size = vocab_size  # the student's tokenizer size: a teacher must score every id of it
        self.attn = attn_implementation
        self._models: dict[str, tuple] = {}
        self.loads = 0
        self.max_loaded = 0
        self.scored: dict[str, list] = {}  # teacher -> record ids it scored (tests)

    @property
    def loaded_now(self) -> int:
        return len(self._models)

    def _load(self, spec: TeacherSpec):
        # Loading must not consume the training RNG (an exact resume replays the same random stream).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model, multimodal = load_any_causal_lm(spec.path, dtype=self.dtype,
                                                   attn_implementation=self.attn if _is_keye(spec.path) else None,
                                                   trust_remote_code=spec.trust_remote_code)
        head = model.get_output_embeddings()
        rows = head.weight.shape[0] if head is not None else 0
        if rows < self.vocab_size:
            raise ValueError(f"teacher {spec.name!r} ({spec.path}) has {rows} output rows but the student's tokenizer has "
                             f"{self.vocab_size} tokens: teachers must share the student's vocabulary")
        for p in model.parameters():
            p.requires_grad_(False)
        self.loads += 1
        return model, multimodal and not spec.text_only

    @contextlib.contextmanager
    def use(self, name: str):
        """Yield ``(model, multimodal)`` on the device; frees it afterwards in ``load`` mode."""
        spec = self.table.teachers[name]
        if name not in self._models:
            if self.residency == "load" and self._models:
                raise RuntimeError("one-at-a-time mode: another teacher is still loaded")
            model, mm = self._load(spec)
            model.to("cpu" if self.residency == "offload" else self.device)
            self._models[name] = (model, mm)
        model, mm = self._models[name]
        self.max_loaded = max(self.max_loaded, self.loaded_now if self.residency != "offload" else 1)
        if self.residency == "offload":
            model.to(self.device)
        try:
            yield model, mm
        finally:
            if self.residency == "offload":
                model.to("cpu")
            if self.residency == "load":
                del self._models[name]
                del model
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


def _is_keye(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") == "KeyeVL2"
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------
def teacher_inputs(rows: list[int], prompts: list[dict], rollout, G: int, multimodal: bool, text_encoder,
                   pad_token_id: int, device) -> tuple[dict, VisionFeatureCache | None, torch.Tensor]:
    """Inputs of a teacher forward over the rows ``rows`` (all G rows of each prompt they hold, in order).

    A multimodal teacher gets the student's prompt tokens and media; a text-only one the prompt re-encoded without
    media (same tokenizer) and explicit text positions. The completion tokens are the student's, unchanged.
    Returns ``(inputs, prompt_batch_or_None, completion_ids)``.
    """
    groups = sorted({int(rollout.group[r]) for r in rows})
    if text_encoder is not None and not multimodal:
        encoded = [text_encoder.encode_messages(prompts[g]["messages"]) for g in groups]
    else:
        encoded = [prompts[g] for g in groups]
    pb = collate_prompts(encoded, pad_token_id)
    pb = {k: v.to(device) for k, v in pb.items()}
    rep = {k: pb[k].repeat_interleave(G, 0) for k in ("input_ids", "attention_mask")}
    comp, cmask = rollout.completion_ids[rows], rollout.completion_mask[rows]
    inputs = {"input_ids": torch.cat([rep["input_ids"], comp], 1), "attention_mask": torch.cat([rep["attention_mask"], cmask], 1)}
    if not multimodal:
        inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return inputs, None, comp
    return inputs, pb, comp


def score_with_teachers(pool: TeacherPool, rollout, prompts: list[dict], G: int, args, text_encoder, pad_token_id: int,
                        device, autocast) -> tuple[dict, dict]:
    """Teacher log-probs of every rollout token, teacher by teacher (samples grouped by their routed teacher).

    Returns ``(out, routed)``: ``out["logprobs"]`` [N, C] and, with ``--topk_overlap``, ``topk_ids`` /
    ``topk_logprobs`` [N, C, K]; ``routed``: teacher name -> list of row indices.
    """
    N, C = rollout.completion_ids.shape
    routed: dict[str, list[int]] = {}
    for g, p in enumerate(prompts):
        routed.setdefault(pool.table.route(p["record"]), []).extend(range(g * G, (g + 1) * G))
    out = {"logprobs": torch.zeros(N, C, device=device)}
    K = args.topk_overlap
    if K:
        out["topk_ids"] = torch.zeros(N, C, K, dtype=torch.long, device=device)
        out["topk_logprobs"] = torch.full((N, C, K), float("-inf"), device=device)
    for name in sorted(routed):
        rows = routed[name]
        with pool.use(name) as (teacher, mm), torch.no_grad(), autocast():
            inputs, pb, comp = teacher_inputs(rows, prompts, rollout, G, mm, text_encoder, pad_token_id, device)
            cmask = rollout.completion_mask[rows]
            has_vision = pb is not None and any(k in pb for k in ("pixel_values", "pixel_values_videos"))
            cache = VisionFeatureCache(teacher, pb, G) if has_vision else None
            if cache is not None:
                inputs.update(cache.expanded_inputs())
            with (cache.serve(teacher) if cache is not None else contextlib.nullcontext()):
                res = completion_logprobs(teacher, inputs, comp, cmask, chunk_size=args.logprob_chunk_size,
                                          temperature=args.temperature, topk=K)
        idx = torch.tensor(rows, device=device)
        out["logprobs"][idx] = res["logprobs"].float()
        if K:
            out["topk_ids"][idx], out["topk_logprobs"][idx] = res["topk_ids"], res["topk_logprobs"].float()
        pool.scored.setdefault(name, []).extend(prompts[g]["record"].get("id") for g in sorted({r // G for r in rows}))
    return out, routed


def format_token_ids(tokenizer, spec: str) -> list[int]:
    """Ids of ``--format_tokens`` (comma-separated token strings or integer ids). Raises ValueError for a string
    that is not a single token of the vocabulary."""
    ids = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            ids.append(int(item))
            continue
        tid = tokenizer.convert_tokens_to_ids(item)
        if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != item:
            enc = tokenizer.encode(item, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"--format_tokens: {item!r} is not one token (encodes to {enc})")
            tid = enc[0]
        ids.append(int(tid))
    return ids


def reference_answer(record: dict) -> str:
    """Text of the record's last assistant turn ('' when none)."""
    for m in reversed(record.get("messages", [])):
        if m.get("role") == "assistant":
            c = m.get("content")
            return c if isinstance(c, str) else "".join(x.get("text", "") for x in c if isinstance(x, dict))
    return ""


def mopd_step_loss(student_lp: dict, teacher: dict, rollout, args, fmt_ids: list[int],
                   orm_adv: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """The MOPD loss of one rollout batch and its per-token statistics (see the module docstring)."""
    mask = rollout.completion_mask.float()
    s_lp = student_lp["logprobs"]
    w, clipped = truncated_importance_weights(s_lp, rollout.sampler_logprobs, args.eps_low, args.eps_high)
    tw = None
    if fmt_ids and args.format_token_weight != 1.0:
        is_fmt = torch.isin(rollout.completion_ids, torch.tensor(fmt_ids, device=mask.device))
        tw = torch.where(is_fmt, torch.full_like(mask, args.format_token_weight), torch.ones_like(mask))
    if args.topk_overlap and args.overlap_form == "kl":
        overlap = topk_overlap(teacher["topk_ids"], student_lp["topk_ids"])
        loss, adv = overlap_kl_loss(student_lp["gathered"], teacher["topk_logprobs"], overlap, w, mask, tw)
    else:
        adv = mopd_advantages(teacher["logprobs"], s_lp, orm_adv, args.alpha)
        if args.topk_overlap:  # form "masked"
            adv = adv * sampled_in_overlap(rollout.completion_ids, teacher["topk_ids"], student_lp["topk_ids"]).float()
        loss = mopd_loss(s_lp, adv, w, mask, tw)
    n = mask.sum().clamp(min=1)
    stats = {"advantage": float((adv * mask).sum() / n), "clipped_fraction": float((clipped.float() * mask).sum() / n),
             "ratio": float((torch.exp(s_lp.detach() - rollout.sampler_logprobs) * mask).sum() / n)}
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Held-out KL
# ----------------------------------------------------------------------------------------------------------------
def heldout_kl(model, pool: TeacherPool, prompts: list[dict], args, text_encoder, pad_token_id: int, eos_ids, device,
               autocast, seed: int) -> dict:
    """Exact reverse KL(student || routed teacher) over the whole vocabulary, per completion position, averaged
    over the positions of one completion per held-out prompt sampled by the current student (fixed seed).
    Returns ``{"heldout_kl": mean, "heldout_kl/<teacher>": mean of that teacher's positions}``."""
    base = unwrap_base(model)
    batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad_token_id).items()}
    with unsharded_for_rollout(model), autocast():
        rb = generate_rollouts(model, batch, 1, args.eval_max_new_tokens or args.max_new_tokens, eos_ids, pad_token_id,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator_seed=seed,
                               **_generate_kwargs(args))
        with rb.serve(model), torch.no_grad():
            h_s = completion_hidden(model, rb.model_inputs(), rb.completion_ids, rb.completion_mask)
    kls, per = [], {}
    routed: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        routed.setdefault(pool.table.route(p["record"]), []).append(i)
    for name in sorted(routed):
        rows = routed[name]
        with pool.use(name) as (teacher, mm), torch.no_grad(), autocast():
            inputs, pb, comp = teacher_inputs(rows, prompts, rb, 1, mm, text_encoder, pad_token_id, device)
            cache = VisionFeatureCache(teacher, pb, 1) if pb is not None and any(
                k in pb for k in ("pixel_values", "pixel_values_videos")) else None
            if cache is not None:
                inputs.update(cache.expanded_inputs())
            with (cache.serve(teacher) if cache is not None else contextlib.nullcontext()):
                h_t = completion_hidden(teacher, inputs, comp, rb.completion_mask[rows])
            m = rb.completion_mask[rows].bool()
            kl = exact_reverse_kl(h_s[rows][m], base.get_output_embeddings(), h_t[m], teacher.get_output_embeddings(),
                                  temperature=args.temperature)
        per[f"heldout_kl/{name}"] = float(kl.mean())
        kls.append(kl)
    return {"heldout_kl": float(torch.cat(kls).mean()), **per}


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def configure_student(model, args: MOPDArguments):
    """Freeze what never trains (and the vision tower with --freeze_vision), add LoRA; returns the model to train."""
    return configure_trainable(
        model, lambda n: n not in UNUSED_PARAMS and not (args.freeze_vision and n.startswith(VISION_PREFIXES)),
        gradient_checkpointing=args.gradient_checkpointing, lora=args.lora, lora_modules=[DECODER_ATTN],
        lora_parameters=EXPERT_PARAMS if args.lora_experts else None, lora_r=args.lora_r, lora_alpha=args.lora_alpha)


def main(args: MOPDArguments | None = None, processor=None) -> dict:
    """Train as ``args`` says (parsed from the command line when None). Returns the summary, the per-step
    ``history``, the trained ``model`` (unwrapped) and the ``pool`` of teachers (for its counters)."""
    from accelerate.utils import set_seed

    if args is None:
        args = parse_args(MOPDArguments)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    device = accelerator.device
    table = RoutingTable(args.teachers)

    model = configure_student(build_model(args.model_name_or_path, args.model_config, args.attn_implementation, device),
                              args)
    base = unwrap_base(model)
    model, optimizer, scheduler, n_train, n_total = prepare_training(accelerator, model, args)
    frozen_vision = vision_is_frozen(model)
    if accelerator.num_processes > 1 and not frozen_vision:
        # A rank whose prompts hold no image or video would give the vision tower no gradient while the others do,
        # and the gradient collectives of DDP / FSDP would not match.
        raise ValueError("with several processes the vision tower must be frozen (--freeze_vision, or --lora)")

    step, state = 0, StreamState()
    if args.resume_from_checkpoint:
        step, saved = load_checkpoint(accelerator, find_checkpoint(args.output_dir, args.resume_from_checkpoint))
        state = StreamState.from_dict(saved["data"])

    processor = processor or load_processor(processor_path(args.processor_name_or_path, args.model_name_or_path))
    tok = processor.tokenizer
    eos_ids = [tok.convert_tokens_to_ids(t) for t in EOS_TOKENS]
    pad_id = base.config.pad_token_id if base.config.pad_token_id is not None else tok.pad_token_id
    fmt_ids = format_token_ids(tok, args.format_tokens)
    encoder = PromptEncoder(processor, base_dir=os.path.dirname(os.path.abspath(args.train_file)))
    text_encoder = PromptEncoder(processor, text_only=True)
    stream = RecordStream(args.train_file, rank=accelerator.process_index, world_size=accelerator.num_processes, state=state)
    dtype = getattr(torch, args.teacher_dtype)
    pool = TeacherPool(table, args.teacher_residency, device, dtype, args.attn_implementation, vocab_size=len(tok))
    eval_prompts = []
    if args.eval_file:
        eval_enc = PromptEncoder(processor, base_dir=os.path.dirname(os.path.abspath(args.eval_file)))
        with open(args.eval_file) as f:
            recs = [json.loads(line) for line in f if line.strip()][: args.eval_num_prompts]
        eval_prompts = [eval_enc(r) for r in recs]
    autocast = accelerator.autocast

    log = TrainLogger(accelerator, args, "mopd", initial_step=step, desc="mopd")
    log.print(f"MOPD: {n_train:,} of {n_total:,} student parameters train; teachers {sorted(table.teachers)} "
              f"({args.teacher_residency}); {accelerator.num_processes} process(es) x {args.per_device_batch_size} "
              f"prompts x {args.num_generations} completions x {args.gradient_accumulation_steps} accumulation; "
              f"attention {args.attn_implementation}; vision {'frozen' if frozen_vision else 'trained'}; from step {step}")
    reset_peak_memory(device)
    G = args.num_generations

    def evaluate(at_step):
        if not eval_prompts:
            return
        model.eval()
        res = heldout_kl(model, pool, eval_prompts, args, text_encoder, pad_id, eos_ids, device, autocast, seed=args.seed + 7919)
        model.train()
        res = dict(zip(res, reduce_mean(accelerator, list(res.values()))))
        log.log({"step": at_step, "eval": True, **res}, postfix="heldout_kl")

    if step == 0 and args.eval_steps:
        evaluate(0)
    model.train()
    t_start = time.perf_counter()
    grad_norm = torch.tensor(0.0)
    while step < args.max_steps:
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        kl_sum: dict[str, float] = {}
        kl_tok: dict[str, float] = {}
        n_rollout_tokens = 0
        t_roll = t_teach = t_train = 0.0
        for micro in range(args.gradient_accumulation_steps):
            records, state = stream.take(args.per_device_batch_size)
            prompts = [encoder(r) for r in records]
            batch = {k: v.to(device) for k, v in collate_prompts(prompts, pad_id).items()}
            # -- rollout (FSDP2: parameters gathered once for the whole generate)
            ta = time.perf_counter()
            with unsharded_for_rollout(model), autocast():
                rb = generate_rollouts(model, batch, G, args.max_new_tokens, eos_ids, pad_id, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, vision_grad=not frozen_vision,
                                       **_generate_kwargs(args),
                                       generator_seed=(args.seed * 1_000_003 + step * 1009 + micro * 17
                                                       + accelerator.process_index * 7_919_111) % (2**63))
            n_rollout_tokens += rb.num_tokens
            tb = time.perf_counter()
            teacher, routed = score_with_teachers(pool, rb, prompts, G, args, text_encoder, pad_id, device, autocast)
            tc = time.perf_counter()
            orm = None
            if args.alpha:
                # generate_rollouts already put pad_id after each completion's end
                texts = tok.batch_decode(rb.completion_ids, skip_special_tokens=True)
                rewards = torch.tensor([float(t.strip() == reference_answer(prompts[i // G]["record"]).strip())
                                        for i, t in enumerate(texts)], device=device)
                orm = group_normalised_rewards(rewards, rb.group.to(device))
            with accelerator.accumulate(model):
                with rb.serve(model), autocast():
                    gather = teacher["topk_ids"] if args.topk_overlap else None
                    s_lp = completion_logprobs(model, rb.model_inputs(), rb.completion_ids, rb.completion_mask,
                                               chunk_size=args.logprob_chunk_size, temperature=args.temperature,
                                               topk=args.topk_overlap, gather_ids=gather)
                    loss, stats = mopd_step_loss(s_lp, teacher, rb, args, fmt_ids, orm)
                norm = backward_and_step(accelerator, model, optimizer, loss, args.max_grad_norm)
                if norm is not None:
                    grad_norm = norm
            t_train += time.perf_counter() - tc
            t_roll += tb - ta
            t_teach += tc - tb
            mask = rb.completion_mask.float()
            k1 = (s_lp["logprobs"].detach() - teacher["logprobs"]) * mask
            stats["loss"] = float(loss.detach())
            stats["kl"] = float(k1.sum() / mask.sum().clamp(min=1))
            stats["completion_length"] = float(mask.sum(1).mean())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / args.gradient_accumulation_steps
            for name in table.teachers:  # token sums, so every rank reduces the same keys
                rows = routed.get(name, [])
                kl_sum[name] = kl_sum.get(name, 0.0) + (float(k1[rows].sum()) if rows else 0.0)
                kl_tok[name] = kl_tok.get(name, 0.0) + (float(mask[rows].sum()) if rows else 0.0)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t0
        log.advance()
        if step % args.logging_steps == 0 or step == args.max_steps:
            keys, names = sorted(sums), sorted(table.teachers)
            vals = reduce_mean(accelerator, [sums[k] for k in keys] + [kl_sum[n] for n in names]
                               + [kl_tok[n] for n in names] + [n_rollout_tokens / max(t_roll, 1e-9)])
            per = {f"kl/{n}": (vals[len(keys) + i] / vals[len(keys) + len(names) + i]
                               if vals[len(keys) + len(names) + i] > 0 else None) for i, n in enumerate(names)}
            row = {"step": step, **dict(zip(keys, vals[: len(keys)])), **per,
                   "rollout_tokens_per_s_per_device": vals[-1],
                   "rollout_tokens": n_rollout_tokens, "rollout_s": t_roll, "teacher_s": t_teach, "train_s": t_train,
                   "step_time_s": dt, "lr": lr, "grad_norm": to_float(grad_norm), "teacher_loads": pool.loads,
                   "max_teachers_loaded": pool.max_loaded}
            peak = peak_memory_gib(accelerator)
            if peak is not None:
                row["peak_memory_gib"] = peak
            log.log(row)
        if args.eval_steps and (step % args.eval_steps == 0 or step == args.max_steps):
            evaluate(step)
        interrupted = args.stop_at_step is not None and step >= args.stop_at_step
        if (args.save_steps and step % args.save_steps == 0) or interrupted:
            save_checkpoint(accelerator, args.output_dir, step, {"data": state.to_dict()})
        if interrupted:
            break
    history = log.history
    train_rows = [r for r in history if not r.get("eval")]
    summary = {
        "final_step": step, "parameters_total": n_total, "parameters_trained": n_train,
        "processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision, "elapsed_s": time.perf_counter() - t_start,
        "device": device_name(device), "teachers": {n: t.path for n, t in table.teachers.items()},
        "teacher_loads": pool.loads, "max_teachers_loaded": pool.max_loaded,
        "mean_rollout_tokens_per_s_per_device": _mean([r["rollout_tokens_per_s_per_device"] for r in train_rows[1:]]),
        "mean_step_time_s": _mean([r["step_time_s"] for r in train_rows[1:]]),
    }
    return {**finish_run(accelerator, log, model, processor, args, step, summary, device), "pool": pool}


def _generate_kwargs(args) -> dict:
    return {"cache_implementation": args.cache_implementation} if args.cache_implementation else {}


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


if __name__ == "__main__":
    main()
