"""Publish a Keye-VL-2.0 checkpoint to the Hugging Face Hub as one complete repo that loads with the Auto classes.

:func:`save_hub_folder` writes everything a Hub user needs into one flat folder: the model (sharded safetensors and
their index, ``config.json`` with ``auto_map``, the modeling and DSA-kernel ``.py`` files, ``generation_config.json``),
the processor (its ``.py`` files and configs, tokenizer and chat template) and the model card as ``README.md``
(:func:`render_model_card`: ``keye_vl/model_card.md`` with the repo id filled in). :func:`push_to_hub` saves that
folder in a temporary directory and uploads it in one commit through ``huggingface_hub`` (``HfApi.create_repo``,
``create_branch`` for a new ``revision``, ``create_commit``).

The token is the standard one: ``token=None`` lets ``huggingface_hub`` use the ``HF_TOKEN`` environment variable or
the login saved by ``hf auth login``.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

CARD_TEMPLATE = "model_card.md"
DEFAULT_BASE_MODEL = "Kwai-Keye/Keye-VL-2.0-30B-A3B"

# Files every pushed folder must have besides the weights and the .py files (checked by save_hub_folder).
REQUIRED_FILES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "configuration_keye_vl_2.py",
    "modeling_keye_vl_2.py",
    "processing_keye_vl_2.py",
)


def render_model_card(
    repo_id: str,
    *,
    base_model: str | None = DEFAULT_BASE_MODEL,
    base_model_relation: str | None = "finetune",
    template: str | os.PathLike | None = None,
):
    """The model card for ``repo_id``: the template with ``{{ repo_id }}`` filled in, its YAML metadata updated.

    Args:
        repo_id: ``"owner/name"`` the card is pushed to (its usage code loads this id).
        base_model / base_model_relation: the Hub's model-tree metadata; None removes the field. Relations the Hub
            knows: ``"finetune"``, ``"adapter"``, ``"merge"``, ``"quantized"``.
        template: path of a card template (default: ``keye_vl/model_card.md``, shipped with the package).
    Returns:
        ``huggingface_hub.ModelCard`` (``str(card)`` is the README text; ``card.data`` the parsed YAML).
    Raises:
        ValueError: ``repo_id`` is not ``owner/name``.
    """
    from huggingface_hub import ModelCard

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must be 'owner/name', got {repo_id!r}")
    if template is None:
        text = resources.files("keye_vl").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")
    else:
        text = Path(template).read_text(encoding="utf-8")
    card = ModelCard(text.replace("{{ repo_id }}", repo_id))
    for key, value in (("base_model", base_model), ("base_model_relation", base_model_relation)):
        if value is None:
            card.data.pop(key, None)
        else:
            card.data[key] = value
    return card


def save_hub_folder(
    folder: str | os.PathLike,
    model: Any,
    processor: Any,
    repo_id: str,
    *,
    max_shard_size: str | int = "5GB",
    **card_kwargs: Any,
) -> list[str]:
    """Write the complete Hub repo for ``repo_id`` into ``folder`` (created if missing).

    Args:
        folder: target folder; existing files of the same names are overwritten.
        model: a :class:`KeyeVL2MoeForConditionalGeneration` (this package's class or one loaded with
            ``trust_remote_code=True``); its ``generation_config`` is written as ``generation_config.json``.
        processor: a :class:`KeyeVL2Processor` (tokenizer, image and video processors, chat template).
        repo_id: the Hub id the card's usage code loads.
        max_shard_size: safetensors shard size (``save_pretrained``'s argument).
        card_kwargs: ``base_model``, ``base_model_relation``, ``template`` for :func:`render_model_card`.
    Returns:
        the sorted names of the files written (the folder is flat).
    Raises:
        ValueError: bad ``repo_id``, or a required file (:data:`REQUIRED_FILES`, weights) was not written, e.g.
            a model or processor class that is not marked for remote code.
    """
    folder = Path(folder)
    card = render_model_card(repo_id, **card_kwargs)  # validates repo_id before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    processor.save_pretrained(folder)
    card.save(folder / "README.md")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    missing = [n for n in REQUIRED_FILES if n not in names]
    if not any(n.endswith(".safetensors") for n in names):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"the Hub folder {folder} lacks {missing}: is the model / processor marked for remote code?")
    return names


def push_to_hub(
    repo_id: str,
    model: Any,
    processor: Any,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload Keye-VL-2.0 (keye-vl)",
    commit_description: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    max_shard_size: str | int = "5GB",
    **card_kwargs: Any,
):
    """Publish ``model`` + ``processor`` + card as the Hub repo ``repo_id`` in one commit.

    Args:
        repo_id: ``"owner/name"``; the repo is created if it does not exist (``private`` applies then).
        private: visibility of a new repo (None: the Hub's default).
        revision: branch to commit to (created from the default branch if missing); None = the default branch.
        commit_message / commit_description: of the commit.
        create_pr: open a pull request instead of committing to the branch (against ``revision`` if given).
        token: a Hub token; None = ``HF_TOKEN`` or the saved login (``huggingface_hub``'s usual lookup).
        max_shard_size, card_kwargs: as :func:`save_hub_folder`.
    Returns:
        ``huggingface_hub.CommitInfo`` of the commit (``.pr_url`` set with ``create_pr``).
    Raises:
        ValueError: bad ``repo_id`` or an incomplete folder (before anything is uploaded);
        ``huggingface_hub`` errors (authentication, network) as raised by ``HfApi``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)  # local; save_hub_folder renders the card (a bad id fails there, before any upload)
    with tempfile.TemporaryDirectory(prefix="keye-hub-") as tmp:
        names = save_hub_folder(tmp, model, processor, repo_id, max_shard_size=max_shard_size, **card_kwargs)
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=os.path.join(tmp, n)) for n in names]
        return api.create_commit(
            repo_id, operations, commit_message=commit_message, commit_description=commit_description,
            repo_type="model", revision=revision, create_pr=create_pr,
        )


__all__ = ["DEFAULT_BASE_MODEL", "REQUIRED_FILES", "push_to_hub", "render_model_card", "save_hub_folder"]
