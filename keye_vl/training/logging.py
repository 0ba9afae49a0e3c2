"""Training logs: TensorBoard (through Accelerate's trackers), a JSON file (arguments, per-step rows, summary),
an optional JSON-lines stream (one row per logged step, appended as it happens) and a tqdm bar."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass


def write_json(path: str, args, history: list, summary: dict) -> None:
    """Write ``{"args", "history", "summary"}`` to ``path`` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": asdict(args) if is_dataclass(args) else dict(args), "history": history, "summary": summary},
                  f, indent=1, default=str)


class TrainLogger:
    """Per-step logging for the main process (every method is a no-op elsewhere, except the tracker init that
    Accelerate needs on all ranks).

    Args:
        accelerator: the run's ``Accelerator`` (its trackers receive every row).
        args: the run's argument dataclass (``log_json``, ``log_jsonl``, ``max_steps`` are read).
        project: tracker / TensorBoard sub-folder name.
        initial_step: the step the run starts from (a resumed run).
        desc: tqdm label.
    """

    def __init__(self, accelerator, args, project: str, initial_step: int = 0, desc: str | None = None):
        from tqdm.auto import tqdm

        from .args import hparams

        self.accelerator, self.args = accelerator, args
        self.history: list[dict] = []
        accelerator.init_trackers(project, config=hparams(args))
        self.main = accelerator.is_main_process
        self.bar = tqdm(total=args.max_steps, initial=initial_step, disable=not self.main, desc=desc or project)
        self.jsonl = getattr(args, "log_jsonl", None)
        if self.main and self.jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(self.jsonl)), exist_ok=True)

    def print(self, *a) -> None:
        if self.main:
            print(*a, flush=True)

    def advance(self) -> None:
        self.bar.update(1)

    def log(self, row: dict, postfix: str = "loss") -> None:
        """Record one row (must hold ``step``): trackers, history, JSON-lines, JSON file, bar postfix."""
        self.history.append(row)
        self.accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                             step=row["step"])
        if postfix in row and isinstance(row[postfix], float):
            self.bar.set_postfix({postfix: f"{row[postfix]:.4f}"})
        if not self.main:
            return
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        if self.args.log_json:
            write_json(self.args.log_json, self.args, self.history, {})

    def finish(self, summary: dict) -> None:
        """Close the bar, write the summary into the JSON file and end the trackers."""
        self.bar.close()
        if self.main and self.args.log_json:
            write_json(self.args.log_json, self.args, self.history, summary)
        self.accelerator.end_training()
