"""Model loading for the trainers: a checkpoint, a random model from ``tiny`` or a JSON config, LoRA, teachers.

All weights load through ``from_pretrained`` (safetensors) and nothing is downloaded: a path is a local folder.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import torch

# LoRA targets (regular expressions over module names; PEFT ``target_modules`` / ``target_parameters``)
DECODER_ATTN = r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
INDEXER = r"model\.layers\.\d+\.self_attn\.sa_indexer\.(q_proj|k_proj)"
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Kept in the checkpoint but never read by the model (it interpolates the learned 2D position table instead);
# always frozen, so DDP sees no parameter without a gradient.
UNUSED_PARAMS = ("visual.vision_model.embeddings.packing_position_embedding.weight",)
VISION_PREFIXES = ("visual.", "mlp_AR.")


def config_from_spec(spec: str):
    """A :class:`KeyeVL2Config` from ``"tiny"``, a JSON file or inline JSON of config fields.

    A JSON object with a ``"tiny_overrides"`` key builds ``tiny_config(**tiny_overrides)``.
    Raises ValueError for JSON that is neither a file nor parseable.
    """
    from keye_vl.modeling_keye import KeyeVL2Config, tiny_config

    if spec == "tiny":
        return tiny_config()
    if os.path.isfile(spec):
        with open(spec) as f:
            fields = json.load(f)
    else:
        try:
            fields = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {spec!r} is neither 'tiny', a JSON file nor inline JSON: {e}") from e
    return tiny_config(**fields.pop("tiny_overrides")) if "tiny_overrides" in fields else KeyeVL2Config(**fields)


def build_model(model_name_or_path: str | None = None, model_config: str | None = None,
                attn_implementation: str | None = None, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32):
    """Load a Keye-VL-2.0 checkpoint folder, or build a random model from ``model_config`` (see
    :func:`config_from_spec`); ``dtype`` master weights (fp32 by default) with the given attention.

    A random model is built directly on ``device`` when it is a GPU (initialising billions of weights on the CPU is
    slow); every process seeds the same way first, so the replicas are identical.
    Raises ValueError unless exactly one of ``model_name_or_path`` / ``model_config`` is given.
    """
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration

    if (model_name_or_path is None) == (model_config is None):
        raise ValueError("give exactly one of model_name_or_path (a checkpoint) and model_config (random init)")
    if model_name_or_path:
        if not os.path.isdir(model_name_or_path):  # never a Hub download
            raise FileNotFoundError(f"checkpoint folder not found: {model_name_or_path} (the trainers load local "
                                    "folders only; download a Hub repo first, e.g. `hf download REPO --local-dir DIR`)")
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        return KeyeVL2MoeForConditionalGeneration.from_pretrained(model_name_or_path, dtype=dtype, **kw)
    config = config_from_spec(model_config)
    with torch.device(device if device is not None and device.type == "cuda" else "cpu"):
        model = KeyeVL2MoeForConditionalGeneration(config)
    if dtype != torch.float32:
        model.to(dtype)
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return model


def load_any_causal_lm(path: str, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                       attn_implementation: str | None = None, trust_remote_code: bool = False):
    """Load a local model folder as a causal LM: this package's model, any ``AutoModelForImageTextToText`` or any
    ``AutoModelForCausalLM`` (in that order). Returns ``(model, multimodal)``: ``multimodal`` is False for a
    text-only model (it gets the text of the conversation). A folder of this package's model needs no remote code
    (its classes are registered in-process); ``trust_remote_code=True`` runs a folder's own code, only when asked.

    Raises FileNotFoundError for a missing folder, ValueError when no Auto class can load it.
    """
    import keye_vl.modeling_keye  # noqa: F401  (registers KeyeVL2Config with the Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kw = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    errors = []
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) in auto._model_mapping or getattr(config, "auto_map", {}).get(auto.__name__):
            try:
                model = auto.from_pretrained(path, **kw)
                break
            except (ValueError, KeyError) as e:  # mapped but not loadable this way
                errors.append(f"{auto.__name__}: {e}")
    else:
        raise ValueError(f"{path}: neither AutoModelForImageTextToText nor AutoModelForCausalLM loads "
                         f"{type(config).__name__} ({'; '.join(errors) or 'not mapped'})")
    if device is not None:
        model.to(device)
    multimodal = getattr(config, "vision_config", None) is not None
    return model.eval(), multimodal


def set_trainable(model, names: Iterable[str]) -> int:
    """``requires_grad`` True exactly for the parameters named in ``names``; returns how many elements train.

    Raises KeyError for a name the model does not have.
    """
    names = set(names)
    params = dict(model.named_parameters())
    missing = names - params.keys()
    if missing:
        raise KeyError(f"no such parameters: {sorted(missing)[:5]}")
    for n, p in params.items():
        p.requires_grad_(n in names)
    return sum(params[n].numel() for n in names)


def vision_is_frozen(model) -> bool:
    """True when no parameter of the vision tower (``visual.*``) or projector (``mlp_AR.*``) trains; the names are
    read on the unwrapped model (:func:`unwrap_base`: DDP's ``module.``, PEFT's ``base_model.model.``)."""
    for n, p in unwrap_base(model).named_parameters():
        if p.requires_grad and n.startswith(VISION_PREFIXES):
            return False
    return True


def configure_trainable(model, trainable, *, gradient_checkpointing: bool = False, lora: bool = False,
                        lora_modules: Sequence[str] = (DECODER_ATTN,), lora_parameters: Sequence[str] | None = None,
                        lora_r: int = 16, lora_alpha: int = 32):
    """What every trainer does before ``accelerator.prepare``: parameters train where ``trainable(name)`` is True
    (all frozen with ``lora``: then only the adapters train), gradient checkpointing, LoRA. Returns the model to
    train (the ``PeftModel`` with ``lora``).

    Gradient checkpointing is re-entrant: the non-re-entrant kind raises CheckpointError ("a different number of
    tensors was saved") on some packed inputs with this model (examples/README.md); re-entrant needs a layer input
    that requires grad, so the embedding output is made to require it (stages with a frozen embedding).
    """
    for n, p in model.named_parameters():
        p.requires_grad_(bool(trainable(n)) and not lora)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    if lora:
        return add_lora(model, lora_modules, lora_parameters, r=lora_r, alpha=lora_alpha)
    return model


def add_lora(model, target_modules: Sequence[str], target_parameters: Sequence[str] | None = None,
             r: int = 16, alpha: int = 32):
    """Wrap ``model`` with PEFT LoRA adapters (dropout 0) on the modules matching any regex of ``target_modules``
    and the parameters ``target_parameters`` (fused expert weights); returns the ``PeftModel``.

    Only the adapters train afterwards (PEFT freezes the base weights).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="|".join(f"(?:{m})" for m in target_modules),
        target_parameters=list(target_parameters) if target_parameters else None,
    )
    return get_peft_model(model, config)


def load_lora(base, adapter_dir: str):
    """Reload a saved adapter onto a base model (a model or a checkpoint folder) -> PeftModel in eval mode."""
    from peft import PeftModel

    if isinstance(base, str):
        from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration

        if not os.path.isdir(base):
            raise FileNotFoundError(f"base checkpoint folder not found: {base}")
        base = KeyeVL2MoeForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def unwrap_base(model):
    """The underlying transformers model under PEFT / Accelerate wrappers (same object under FSDP2)."""
    m = model.module if hasattr(model, "module") and not hasattr(model, "config") else model
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def count_parameters(model) -> tuple[int, int]:
    """``(trained, total)`` numbers of parameter elements."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
