"""Command-line arguments the trainers share, as dataclasses (parsed with ``transformers.HfArgumentParser``).

A trainer's argument class inherits the groups it needs and adds its own fields, e.g.
``class PretrainArguments(OutputArguments, LoraArguments, OptimArguments, DataArguments, ModelArguments)``; a
trainer redeclares a field to change its default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Checkpoint folder to start from."})
    model_config: Optional[str] = field(default=None, metadata={
        "help": "Random init instead of a checkpoint: 'tiny' (keye_vl.modeling_keye.tiny_config), a JSON file or inline "
                "JSON of KeyeVL2Config fields (e.g. examples/configs/model_1b.json)."})
    processor_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Processor folder; default: the model folder if it holds one, else the package default processor."})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "sdpa / eager (dense), dsa / dsa_torch / dsa_triton (sparse)."})
    freeze_vision: bool = field(default=False, metadata={"help": "Freeze the vision tower (visual.*)."})

    def check_model_source(self) -> None:
        """Raises ValueError unless exactly one of model_name_or_path / model_config is set."""
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise ValueError("give exactly one of --model_name_or_path (a checkpoint) and --model_config (random init)")


@dataclass
class DataArguments:
    train_file: str = field(default="examples/data/train.jsonl", metadata={"help": "JSONL of conversations or texts."})
    per_device_batch_size: int = field(default=1, metadata={"help": "Sequences (packs / prompts) per micro-batch and device."})


@dataclass
class OptimArguments:
    learning_rate: Optional[float] = field(default=None, metadata={"help": "Peak lr (default: the trainer's)."})
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


@dataclass
class LoraArguments:
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of the weights."})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_experts: bool = field(default=True, metadata={"help": "Also adapt the fused expert weights (target_parameters)."})


@dataclass
class OutputArguments:
    output_dir: str = "outputs/run"
    logging_steps: int = 1
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0 = only at the end)."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "A step_N folder, or 'latest'."})
    stop_at_step: Optional[int] = field(default=None, metadata={
        "help": "End the run after this step as if interrupted (saves a checkpoint; for resume tests)."})
    save_final: bool = field(default=True, metadata={"help": "save_pretrained (or the LoRA adapter) in output_dir/final."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | none"})
    log_json: Optional[str] = field(default=None, metadata={"help": "Write args, per-step metrics and a summary here."})
    log_jsonl: Optional[str] = field(default=None, metadata={"help": "Append one JSON line per logged step here."})


def hparams(args) -> dict:
    """The arguments as a flat dict of TensorBoard-friendly values (non-scalars as strings)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(args).items()}


def parse_args(cls):
    """Parse the command line into one ``cls`` instance (``HfArgumentParser``)."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(cls).parse_args_into_dataclasses()
    return args
