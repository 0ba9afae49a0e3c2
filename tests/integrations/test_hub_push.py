"""Push to the Hub: one call publishes a complete, loadable repo. The Hub is not reachable here, so
``HfApi.create_repo`` / ``create_branch`` / ``create_commit`` are intercepted: the test checks the exact list of
files and their contents, then loads exactly that file set in a clean offline process (this repository blocked)
and compares logits bit for bit, the shipped generation config, and the chat template's thinking switch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from keye_vl.hub import push_to_hub, render_model_card
from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config
from keye_vl.processing import KEYE_VL2_CHAT_TEMPLATE, build_keye_processor

REPO = Path(__file__).resolve().parents[2]
REPO_ID = "keye-test/keye-vl-2-tiny"
GENERATION = {  # the family's defaults, as the issue and Qwen3's generation_config.json state them
    "bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
    "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
}


class FakeHub:
    """Records the HfApi calls push_to_hub makes and the bytes of every file of the commit."""

    def __init__(self):
        self.calls, self.files = [], {}

    def install(self, mp):
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.calls.append(("create_repo", repo_id, kw, api.token))

        def create_branch(api, repo_id, **kw):
            hub.calls.append(("create_branch", repo_id, kw, api.token))

        def create_commit(api, repo_id, operations, **kw):
            hub.calls.append(("create_commit", repo_id, kw, api.token))
            for op in operations:
                assert op.path_in_repo not in hub.files
                hub.files[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
            return "commit-info"

        mp.setattr(HfApi, "create_repo", create_repo)
        mp.setattr(HfApi, "create_branch", create_branch)
        mp.setattr(HfApi, "create_commit", create_commit)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    torch.manual_seed(0)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config()).eval()
    processor = build_keye_processor()
    hub = FakeHub()
    with pytest.MonkeyPatch.context() as mp:
        hub.install(mp)
        result = push_to_hub(
            REPO_ID, model, processor, private=True, revision="v1", commit_message="tiny test push",
            token="hf_test_token", max_shard_size="20MB",
        )
    assert result == "commit-info"
    folder = tmp_path_factory.mktemp("pushed") / "repo"
    folder.mkdir()
    for name, data in hub.files.items():
        (folder / name).write_bytes(data)
    return model, hub, folder


def test_push_calls_the_hub_api_with_the_given_options(pushed):
    _, hub, _ = pushed
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "create_commit"]
    assert all(c[1] == REPO_ID and c[3] == "hf_test_token" for c in hub.calls)
    assert hub.calls[0][2] == {"private": True, "repo_type": "model", "exist_ok": True}
    assert hub.calls[1][2] == {"branch": "v1", "repo_type": "model", "exist_ok": True}
    assert hub.calls[2][2] == {
        "commit_message": "tiny test push", "commit_description": None, "repo_type": "model",
        "revision": "v1", "create_pr": False,
    }


def test_push_uploads_exactly_the_repo_files(pushed):
    _, hub, _ = pushed
    code = {p.name for folder in ("modeling_keye", "processing") for p in (REPO / folder).glob("*.py")} - {"__init__.py"}
    index = json.loads(hub.files["model.safetensors.index.json"])
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and shards == {n for n in hub.files if n.endswith(".safetensors")}
    assert set(hub.files) == code | shards | {
        "README.md", "config.json", "generation_config.json", "model.safetensors.index.json",
        "processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    }
    for name in code:  # the code files are the repository's own (real copies of the kernel links)
        src = REPO / ("processing" if "process" in name else "modeling_keye") / name
        assert hub.files[name] == src.resolve().read_bytes(), name
    cfg = json.loads(hub.files["config.json"])
    assert cfg["auto_map"]["AutoModelForImageTextToText"] == "modeling_keye_vl_2.KeyeVL2MoeForConditionalGeneration"
    assert json.loads(hub.files["processor_config.json"])["auto_map"] == {
        "AutoProcessor": "processing_keye_vl_2.KeyeVL2Processor"}
    gen = json.loads(hub.files["generation_config.json"])
    gen.pop("transformers_version")
    assert gen == GENERATION
    assert hub.files["chat_template.jinja"].decode() == KEYE_VL2_CHAT_TEMPLATE


def test_pushed_card_is_hub_metadata_for_the_pushed_repo(pushed):
    _, hub, folder = pushed
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == "Kwai-Keye/Keye-VL-2.0-30B-A3B" and data["base_model_relation"] == "finetune"
    assert "custom_code" in data["tags"]
    assert card.text.count(f'"{REPO_ID}", trust_remote_code=True') == 2  # model and processor load the pushed id
    assert "{{ repo_id }}" not in card.content and f"# {REPO_ID}\n" in card.text
    for section in ("## Attention implementations", "## Benchmarks", "## Training stages", "## Limitations",
                    "## Citation", "## Fine-tuning with PEFT"):
        assert section in card.text


def test_card_options_and_bad_repo_ids():
    card = render_model_card("me/adapter", base_model_relation="adapter")
    assert card.data.base_model_relation == "adapter" and card.data.base_model == "Kwai-Keye/Keye-VL-2.0-30B-A3B"
    assert "base_model" not in render_model_card("me/x", base_model=None, base_model_relation=None).data.to_dict()
    for bad in ("no-owner", "a/b/c", "/name", ""):
        with pytest.raises(ValueError, match="owner/name"):
            render_model_card(bad)


def test_create_pr_commits_to_a_pull_request_without_creating_a_branch(monkeypatch, tmp_path):
    hub = FakeHub()
    hub.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    torch.manual_seed(0)
    model = KeyeVL2MoeForConditionalGeneration(tiny_config(num_hidden_layers=1, vision_config=dict(num_hidden_layers=1)))
    push_to_hub(REPO_ID, model, build_keye_processor(), create_pr=True)
    assert [c[0] for c in hub.calls] == ["create_repo", "create_commit"]
    assert hub.calls[0][2]["private"] is None and hub.calls[1][2]["create_pr"] is True
    assert hub.calls[1][2]["revision"] is None
    # no token given: HfApi is left to find it the standard way (HF_TOKEN here)
    assert all(c[3] is None for c in hub.calls)
    from huggingface_hub.utils import get_token

    assert get_token() == "hf_from_env"
    assert "model.safetensors" in hub.files and "README.md" in hub.files  # one shard at the default 5 GB


def test_bad_repo_id_fails_before_any_hub_call(monkeypatch):
    hub = FakeHub()
    hub.install(monkeypatch)
    with pytest.raises(ValueError, match="owner/name"):
        push_to_hub("no-owner", object(), object())
    assert hub.calls == []


def test_pushed_files_alone_load_offline_with_identical_logits_and_the_shipped_generation_config(pushed, tmp_path, run_clean):
    model, _, folder = pushed
    ids = torch.randint(0, 5000, (1, 12), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    run_clean(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(folder)!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            torch.save(model(input_ids=ids, use_cache=False).logits, {str(tmp_path / 'got.pt')!r})
        gen = model.generation_config.to_diff_dict()
        gen.pop("transformers_version", None)
        assert gen == {GENERATION!r}, gen
        # generate() without arguments samples with the shipped settings: same tokens as passing them explicitly
        torch.manual_seed(7)
        plain = model.generate(ids, max_new_tokens=6, min_new_tokens=6)
        torch.manual_seed(7)
        explicit = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=True, temperature=0.6,
                                  top_p=0.95, top_k=20)
        greedy = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(plain, explicit) and not torch.equal(plain, greedy)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        msgs = [{{"role": "user", "content": "Hi"}}]
        off = processor.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
        on = processor.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert off == "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n", off
        assert on == "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n", on
        assert processor.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                                       enable_thinking=False) == off
        assert not [m for m in sys.modules if m.startswith("keye_vl")]
        """,
        tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "got.pt"), want)
