"""Checkpoints with exact resume, and the final ``save_pretrained`` folder.

A checkpoint ``OUTPUT/checkpoints/step_N/`` is ``accelerator.save_state`` (model, optimizer, every object
registered with ``register_for_checkpointing`` such as the lr schedule, and the RNG states of every process:
Python, NumPy, torch CPU and CUDA) plus one ``trainer_state_rank{r}.json`` per rank with the step and whatever the
trainer needs to continue exactly (its data position, ...). The pre-training trainer names the file
``data_state_rank{r}.json`` (``prefix``).
"""

from __future__ import annotations

import glob
import json
import os


def find_checkpoint(output_dir: str, which: str) -> str:
    """The folder to resume from: ``which`` itself, or with ``which="latest"`` the highest
    ``output_dir/checkpoints/step_N``. Raises FileNotFoundError when there is none."""
    if which != "latest":
        if not os.path.isdir(which):
            raise FileNotFoundError(f"--resume_from_checkpoint {which!r} is not a folder")
        return which
    steps = sorted(glob.glob(os.path.join(output_dir, "checkpoints", "step_*")), key=lambda p: int(p.rsplit("_", 1)[1]))
    if not steps:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoints/step_* under {output_dir}")
    return steps[-1]


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, prefix: str = "trainer_state") -> str:
    """Save ``accelerator`` state + ``{"step": step, **state}`` of this rank; returns the folder."""
    path = os.path.join(output_dir, "checkpoints", f"step_{step}")
    accelerator.save_state(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"{prefix}_rank{accelerator.process_index}.json"), "w") as f:
        json.dump({"step": step, **state}, f)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator, path: str, prefix: str = "trainer_state") -> tuple[int, dict]:
    """Restore ``accelerator`` state from ``path``; returns ``(step, state)`` of this rank.

    Raises FileNotFoundError when this rank's state file is missing (a different number of processes).
    """
    accelerator.load_state(path)
    state_file = os.path.join(path, f"{prefix}_rank{accelerator.process_index}.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{state_file} missing: resume with the same number of processes as the saved run")
    with open(state_file) as f:
        d = json.load(f)
    return int(d.pop("step")), d


def save_final(accelerator, model, processor, output_dir: str, adapter_only: bool = False) -> str:
    """``save_pretrained`` into ``output_dir/final``: a self-contained folder (weights + remote code + processor),
    or only the adapter for a PEFT model (``adapter_only``). Works under FSDP (full state dict gathered)."""
    final = os.path.join(output_dir, "final")
    state_dict = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(final, state_dict=state_dict, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    if accelerator.is_main_process and not adapter_only and processor is not None:
        processor.save_pretrained(final)
    accelerator.wait_for_everyone()
    return final
