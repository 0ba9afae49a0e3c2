"""Evaluate a model on verifiable RL tasks (the trainer's JSONL format) with the reward parsers of the trainer.

Metrics (one JSON report):

- temporal grounding (``task: grounding``), as TimeLens reports them: ``R1@0.3``, ``R1@0.5``, ``R1@0.7`` (percent
  of samples whose first predicted span has IoU >= the threshold with the ground truth) and ``mIoU`` (mean IoU, in
  percent); IoU 0 when no span parses or ``s >= e`` (TimeLens' rule: the span as written, not clipped to the video).
- multi-span grounding: mean IoU of the span unions (percent).
- timestamps: mean reward ``max(0, 1 - |dt| / tau)``, mean absolute error in seconds over parsed answers, and the
  parse-failure rate.
- counting / ordering / exact answers: accuracy in percent.
- per task: number of samples and the mean of its reward (``keye_vl.training.rewards.compute_rewards``).

Predictions come from the model (batched greedy ``generate``) or from a JSONL of ``{"id", "prediction"}`` lines
(``--predictions``), so a user's own benchmark file in the same format can be scored with another system's
outputs. Usage::

    python examples/eval_rl.py --model_name_or_path outputs/rl/final --tasks outputs/rl_tasks/video.jsonl \\
        --batch_size 8 --max_new_tokens 64 --output outputs/rl_eval.json
    python examples/eval_rl.py --tasks tasks.jsonl --predictions preds.jsonl --output report.json
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterable, Mapping, Sequence

from keye_vl.training.rewards import (
    DEFAULT_WEIGHTS,
    answer_text,
    compute_rewards,
    get_reward,
    multi_tiou_reward,
    parse_number,
    parse_span,
    tiou_reward,
)

THRESHOLDS = (0.3, 0.5, 0.7)


def _pct(x: float) -> float:
    return 100.0 * x


def score(tasks: Sequence[Mapping], predictions: Mapping[str, str] | Sequence[str]) -> dict:
    """Metrics of ``predictions`` (by task ``id``, or a list aligned with ``tasks``) on ``tasks``.

    Returns the report dict: ``{"num_samples", "tasks": {task: {...metrics...}}, "per_sample": [...]}``; every
    percentage is in [0, 100]. Raises: KeyError for a task without a prediction, ValueError for malformed tasks.
    """
    if isinstance(predictions, Mapping):
        preds = []
        for t in tasks:
            if t.get("id") not in predictions:
                raise KeyError(f"no prediction for task id {t.get('id')!r}")
            preds.append(predictions[t["id"]])
    else:
        if len(predictions) != len(tasks):
            raise ValueError(f"{len(predictions)} predictions for {len(tasks)} tasks")
        preds = list(predictions)
    by_task: dict[str, list] = {}
    per_sample = []
    for t, p in zip(tasks, preds):
        total, parts = compute_rewards(p, t)
        row = {"id": t.get("id"), "task": t["task"], "reward": total, "parts": parts}
        dur = t.get("duration")
        if t["task"] in ("count", "order", "exact"):  # accuracy from the task's own check, whatever the weights
            row["correct"] = get_reward(next(iter(DEFAULT_WEIGHTS[t["task"]])))(p, t["solution"]) == 1.0
        if t["task"] == "grounding":
            row["iou"] = tiou_reward(p, t["solution"], duration=dur)
            row["parsed"] = parse_span(answer_text(p)) is not None
        elif t["task"] == "multi_grounding":
            row["iou"] = multi_tiou_reward(p, t["solution"], duration=dur)
        elif t["task"] == "timestamp":
            v = parse_number(answer_text(p))
            row["parsed"] = v is not None
            row["abs_error"] = None if v is None else abs(v - float(t["solution"]))
        by_task.setdefault(t["task"], []).append(row)
        per_sample.append(row)
    report: dict = {"num_samples": len(per_sample), "tasks": {}, "per_sample": per_sample}
    for task, rows in sorted(by_task.items()):
        n = len(rows)
        m = {"n": n, "mean_reward": sum(r["reward"] for r in rows) / n}
        if task == "grounding":
            for th in THRESHOLDS:
                m[f"R1@{th}"] = _pct(sum(r["iou"] >= th for r in rows) / n)
            m["mIoU"] = _pct(sum(r["iou"] for r in rows) / n)
            m["parse_failures"] = sum(not r["parsed"] for r in rows)
        elif task == "multi_grounding":
            m["mIoU"] = _pct(sum(r["iou"] for r in rows) / n)
        elif task == "timestamp":
            errs = [r["abs_error"] for r in rows if r["abs_error"] is not None]
            m["mean_abs_error_s"] = sum(errs) / len(errs) if errs else None
            m["parse_failures"] = n - len(errs)
        else:  # count / order / exact: the share answered right by the task's own check
            key = {"count": "counting_accuracy", "order": "ordering_accuracy", "exact": "exact_accuracy"}[task]
            m[key] = _pct(sum(r["correct"] for r in rows) / n)
        report["tasks"][task] = m
    return report


def read_jsonl(path: str) -> list[dict]:
    """Lines of a JSONL file as dicts (blank lines skipped); ValueError naming the line on bad JSON."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
    return out


def generate_predictions(model, processor, tasks: Sequence[Mapping], base_dir: str, batch_size: int = 8,
                         max_new_tokens: int = 64) -> list[str]:
    """Greedy completions of each task's prompt, ``batch_size`` prompts per batched ``generate`` (the shared rollout
    code with top-k 1, i.e. argmax decoding; DSA with the indexer cache)."""
    import torch

    from keye_vl.training.data import PromptEncoder, collate_prompts
    from keye_vl.training.rollout import generate_rollouts

    tok = processor.tokenizer
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tok.pad_token_id
    encoder = PromptEncoder(processor, base_dir=base_dir)
    device = next(model.parameters()).device
    texts = []
    for i in range(0, len(tasks), batch_size):
        chunk = [dict(t) for t in tasks[i: i + batch_size]]
        batch = {k: v.to(device) for k, v in collate_prompts([encoder(t) for t in chunk], pad).items()}
        with torch.no_grad():
            rb = generate_rollouts(model, batch, 1, max_new_tokens, eos, pad, top_k=1)
        lengths = rb.completion_mask.sum(1).tolist()
        texts += tok.batch_decode([ids[:n] for ids, n in zip(rb.completion_ids.tolist(), lengths)],
                                  skip_special_tokens=True)
    return texts


def main(argv: Iterable[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", required=True, help="JSONL of tasks (examples/make_rl_tasks.py format)")
    ap.add_argument("--predictions", default=None, help="JSONL of {id, prediction}; default: generate with the model")
    ap.add_argument("--model_name_or_path", default=None)
    ap.add_argument("--model_config", default=None, help="random model instead: 'tiny' or a JSON config")
    ap.add_argument("--processor_name_or_path", default=None)
    ap.add_argument("--attn_implementation", default=None)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--output", required=True, help="report JSON path")
    args = ap.parse_args(list(argv) if argv is not None else None)
    tasks = read_jsonl(args.tasks)
    if not tasks:
        raise SystemExit(f"{args.tasks} has no tasks")
    if args.predictions:
        preds = {r["id"]: r["prediction"] for r in read_jsonl(args.predictions)}
    else:
        if not (args.model_name_or_path or args.model_config):
            raise SystemExit("give --predictions or a model (--model_name_or_path / --model_config)")
        import torch

        from keye_vl.training.data import load_processor
        from keye_vl.training.models import build_model

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(args.model_name_or_path, args.model_config, args.attn_implementation, device, dtype)
        model.to(device).eval()
        processor = load_processor(args.processor_name_or_path or args.model_name_or_path)
        texts = generate_predictions(model, processor, tasks, os.path.dirname(os.path.abspath(args.tasks)),
                                     args.batch_size, args.max_new_tokens)
        preds = {t["id"]: x for t, x in zip(tasks, texts)}
    report = score(tasks, preds)
    report["tasks_file"] = args.tasks
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report["tasks"], indent=1))
    return report


if __name__ == "__main__":
    main()
