"""JSONL conversations -> encoded samples (full conversations or prompts only) -> packed or padded batches.

Shared by the trainers in ``examples/`` (pre-training packs full conversations; MOPD and RL encode prompts only
and let the model write the answer). The pieces, each usable alone:

- :class:`SampleEncoder` turns one JSONL record into token ids, labels and vision tensors with the Keye-VL-2.0
  processor. A record is either ``{"messages": [...]}`` (the qwen-vl-utils message format: text, images,
  videos, local paths relative to the JSONL file) or ``{"text": "..."}`` (plain text pretraining). Labels
  keep the assistant turns only (``loss_on="assistant"``: from after ``<|im_start|>assistant\\n`` through
  ``<|im_end|>``), or every token (``loss_on="all"``).
- :class:`PackedStream` streams the file (never loads it whole), keeps every ``world_size``-th line for this
  rank, and packs whole samples greedily into sequences of at most ``max_len`` tokens. It cycles over the file
  (epochs) forever; training stops by step count. Its position is a small :class:`StreamState` (epoch, byte
  offset and line number of the first sample of the next pack), saved with each checkpoint, so a resumed
  run reads exactly the packs an uninterrupted run would have read.
- :func:`collate_packs` builds a model batch from packs: ``input_ids``/``labels``/``attention_mask``
  ``[B, L]``, ``segment_ids`` ``[B, L]`` (sample index inside its pack: attention and M-RoPE positions restart
  per sample in the model), and the concatenated ``pixel_values`` / ``image_grid_thw`` /
  ``pixel_values_videos`` / ``video_grid_thw``.
- :class:`PromptEncoder` encodes a record's prompt (every message before the last assistant turn, with the
  generation prompt ``<|im_start|>assistant\n`` appended), optionally without its images and videos (for
  text-only teachers); :class:`RecordStream` streams records (sharded, resumable like :class:`PackedStream`) and
  :func:`collate_prompts` left-pads prompts into a ``generate`` batch.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


# ---------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------
def load_processor(name_or_path: str | None = None):
    """The Keye-VL-2.0 processor: from a saved folder / Hub id (``AutoProcessor``), else the package default.

    Raises:
        ImportError: when ``keye_vl.processing`` has no ``KeyeVL2Processor`` and no path was given.
    """
    if name_or_path:
        from transformers import AutoProcessor

        try:
            import keye_vl.processing  # noqa: F401  (registers the classes in-process when installed)
        except ImportError:
            pass
        return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=True)
    try:
        from keye_vl.processing import build_keye_processor
    except ImportError as e:
        raise ImportError(
            "keye_vl.processing.build_keye_processor is not available; pass --processor_name_or_path (a folder "
            "saved with the processor) or install the package with its processing module"
        ) from e
    return build_keye_processor()


def processor_path(processor_name_or_path: str | None, model_name_or_path: str | None) -> str | None:
    """Where the trainers take the processor from: ``processor_name_or_path`` when given, else the checkpoint folder
    when it holds a saved processor (``processor_config.json`` / ``preprocessor_config.json``; a tokenizer alone
    would load as a tokenizer, not a processor), else None (the package default, :func:`load_processor`)."""
    if processor_name_or_path is not None:
        return processor_name_or_path
    if model_name_or_path and any(os.path.isfile(os.path.join(model_name_or_path, f))
                                  for f in ("processor_config.json", "preprocessor_config.json")):
        return model_name_or_path
    return None


def _process_vision_info_fn():
    from keye_vl.processing import process_vision_info

    return process_vision_info


def _is_local_path(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    return "://" not in value and not value.startswith("data:")


def resolve_media_paths(messages: list[dict], base_dir: str) -> list[dict]:
    """Copy of ``messages`` with relative local image/video paths made absolute against ``base_dir``."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list):
            items = []
            for item in content:
                item = dict(item)
                for key in ("image", "video"):
                    v = item.get(key)
                    if _is_local_path(v) and not os.path.isabs(v):
                        item[key] = os.path.normpath(os.path.join(base_dir, v))
                    elif isinstance(v, list):  # a video given as a list of frame paths
                        item[key] = [
                            os.path.normpath(os.path.join(base_dir, f)) if _is_local_path(f) and not os.path.isabs(f) else f
                            for f in v
                        ]
                items.append(item)
            msg = {**msg, "content": items}
        out.append(msg)
    return out


# ---------------------------------------------------------------------------------------------------------
# One record -> one sample
# ---------------------------------------------------------------------------------------------------------
class SampleEncoder:
    """Encode one JSONL record into a training sample.

    Args:
        processor: a Keye-VL-2.0 processor (``apply_chat_template``, ``__call__`` returning ``input_ids`` and the
            vision tensors, ``.tokenizer``).
        loss_on: "assistant" (labels on assistant turns only) or "all" (every token; plain-text pretraining).
        base_dir: folder that relative media paths are resolved against (the JSONL's folder).
        process_vision_info: ``messages -> (images, videos, video_kwargs)``; default ``keye_vl.processing``'s.

    Returns (``__call__``): dict with ``input_ids`` [L] int64, ``labels`` [L] int64 (-100 = no loss) and, when
    present, ``pixel_values`` [N, 588], ``image_grid_thw`` [n, 3], ``pixel_values_videos``, ``video_grid_thw``.
    """

    def __init__(self, processor, loss_on: str = "assistant", base_dir: str = ".",
                 process_vision_info: Callable | None = None):
        if loss_on not in ("assistant", "all"):
            raise ValueError(f"loss_on must be 'assistant' or 'all', got {loss_on!r}")
        self.processor = processor
        self.loss_on = loss_on
        self.base_dir = base_dir
        self._pvi = process_vision_info
        tok = processor.tokenizer
        self.im_start = tok.convert_tokens_to_ids("<|im_start|>")
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self.assistant_header = tok.encode("assistant\n", add_special_tokens=False)
        self.eos_id = self.im_end

    def __call__(self, record: dict) -> dict[str, torch.Tensor]:
        if "messages" in record:
            return self.encode_messages(record["messages"])
        if "text" in record:
            return self.encode_text(record["text"])
        raise ValueError(f"a record needs 'messages' (chat) or 'text' (plain text); got keys {sorted(record)}")

    def encode_text(self, text: str) -> dict[str, torch.Tensor]:
        """Plain text: token ids + ``<|im_end|>`` (end of document); every token is a label."""
        ids = self.processor.tokenizer.encode(text, add_special_tokens=False) + [self.eos_id]
        ids = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}

    def encode_messages(self, messages: list[dict]) -> dict[str, torch.Tensor]:
        messages = resolve_media_paths(messages, self.base_dir)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        pvi = self._pvi or _process_vision_info_fn()
        result = pvi(messages)
        images, videos = result[0], result[1]
        video_kwargs = result[2] if len(result) > 2 and result[2] else {}
        if not videos:
            video_kwargs = {}
        enc = self.processor(text=[text], images=images, videos=videos, return_tensors="pt", **video_kwargs)
        ids = enc["input_ids"][0].long()
        sample = {"input_ids": ids, "labels": self.make_labels(ids)}
        for key in VISION_KEYS:
            v = enc.get(key) if hasattr(enc, "get") else None
            if v is not None:
                sample[key] = v
        return sample

    def make_labels(self, ids: torch.Tensor) -> torch.Tensor:
        """Labels for ``ids``: assistant spans (after ``<|im_start|>assistant\\n`` through ``<|im_end|>``) or all."""
        if self.loss_on == "all":
            return ids.clone()
        labels = torch.full_like(ids, IGNORE_INDEX)
        seq = ids.tolist()
        hdr = [self.im_start] + list(self.assistant_header)
        i, n = 0, len(seq)
        while i < n:
            if seq[i: i + len(hdr)] == hdr:
                start = i + len(hdr)
                end = start
                while end < n and seq[end] != self.im_end:
                    end += 1
                end = min(end + 1, n)  # the <|im_end|> is learned too (the model must stop)
                labels[start:end] = ids[start:end]
                i = end
            else:
                i += 1
        return labels


# ---------------------------------------------------------------------------------------------------------
# Streaming + packing
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StreamState:
    """Position of a :class:`PackedStream`: the first sample of the next pack is at line ``line`` (0-based),
    byte ``offset`` of the file, in epoch ``epoch``."""

    epoch: int = 0
    offset: int = 0
    line: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "StreamState":
        return cls(**d) if d else cls()



def _rank_lines(path: str, start: StreamState, rank: int, world_size: int):
    """The non-blank lines of rank ``rank`` (``line % world_size == rank``) from ``start``, cycling epochs forever:
    yields ``(raw bytes, StreamState of that line)``, and ``(None, started_at_zero)`` at the end of each epoch (the
    readers refuse a whole epoch that gave this rank nothing)."""
    epoch, offset, line = start.epoch, start.offset, start.line
    while True:
        from_start = offset == 0
        with open(path, "rb") as f:
            f.seek(offset)
            for raw in iter(f.readline, b""):
                here = StreamState(epoch, offset, line)
                offset += len(raw)
                line += 1
                if here.line % world_size == rank and raw.strip():
                    yield raw, here
        yield None, from_start
        epoch, offset, line = epoch + 1, 0, 0

class PackedStream:
    """Stream packs of whole samples from a JSONL file, for one rank.

    Args:
        path: JSONL file (one record per line; blank lines skipped).
        encode: ``record -> sample`` (a :class:`SampleEncoder`).
        max_len: tokens per pack (the stage's context length). A sample longer than this is skipped with a
            warning (cutting it would cut through an image or an assistant turn).
        pack: False -> one sample per pack.
        rank, world_size: this rank keeps lines ``line % world_size == rank``.
        state: where to start (a resumed run passes the saved state).
        cache_size: keep up to this many encoded samples in memory (LRU), so later epochs skip decoding media.

    Iterating yields ``(pack, state_after)``: ``pack`` a list of samples, ``state_after`` the position of the
    next pack's first sample. Raises ValueError if the file gives this rank no usable sample in a whole epoch.
    """

    def __init__(self, path: str, encode: Callable[[dict], dict], max_len: int, pack: bool = True,
                 rank: int = 0, world_size: int = 1, state: StreamState | None = None, cache_size: int = 0):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"train file not found: {path}")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.path, self.encode, self.max_len, self.pack = path, encode, int(max_len), pack
        self.rank, self.world_size = rank, world_size
        self.state = state or StreamState()
        self.cache_size = int(cache_size)
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.skipped = 0

    def _encode_cached(self, offset: int, raw: bytes) -> dict:
        if self.cache_size and offset in self._cache:
            self._cache.move_to_end(offset)
            return self._cache[offset]
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: line at byte {offset} is not valid JSON: {e}") from e
        sample = self.encode(record)
        if self.cache_size:
            self._cache[offset] = sample
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return sample

    def _samples(self, start: StreamState) -> Iterator[tuple[dict, StreamState]]:
        """Yield (sample, position of that sample) for this rank, forever."""
        produced = False
        for raw, here in _rank_lines(self.path, start, self.rank, self.world_size):
            if raw is None:  # end of an epoch
                if not produced and here:
                    raise ValueError(
                        f"{self.path} gives rank {self.rank} of {self.world_size} no sample of at most {self.max_len} "
                        "tokens: add data, raise max_len or use fewer processes"
                    )
                produced = False
                continue
            sample = self._encode_cached(here.offset, raw)
            n = int(sample["input_ids"].numel())
            if n > self.max_len:
                self.skipped += 1
                logger.warning("skipping line %d of %s: %d tokens > max_len %d", here.line + 1, self.path, n, self.max_len)
                continue
            produced = True
            yield sample, here

    def __iter__(self) -> Iterator[tuple[list[dict], StreamState]]:
        cur: list[dict] = []
        used = 0
        for sample, pos in self._samples(self.state):
            n = int(sample["input_ids"].numel())
            if cur and (not self.pack or used + n > self.max_len):
                self.state = pos
                yield cur, pos
                cur, used = [], 0
            cur.append(sample)
            used += n


def _dummy_image(config) -> dict:
    """A 3-token sample ``<|vision_start|><|image_pad|><|vision_end|>`` with one blank 28 x 28 image (no labels).

    Appended by :func:`collate_packs` (``ensure_vision``) so that every rank runs the vision tower in every
    micro-batch: FSDP / DDP need the same parameters to get gradients on all ranks.
    """
    vc = config.vision_config
    m = vc.spatial_merge_size
    patch = vc.num_channels * vc.patch_size**2
    ids = torch.tensor([config.vision_start_token_id, config.image_token_id, config.vision_end_token_id])
    return {
        "input_ids": ids,
        "labels": torch.full_like(ids, IGNORE_INDEX),
        "pixel_values": torch.zeros(m * m, patch),
        "image_grid_thw": torch.tensor([[1, m, m]]),
    }


def collate_packs(packs: list[list[dict]], pad_token_id: int, ensure_vision_config=None) -> dict[str, torch.Tensor]:
    """Packs -> a model batch (right padding to the longest pack).

    Returns ``input_ids``, ``labels`` (the first token of every sample is -100, so no sample learns from its
    predecessor), ``attention_mask`` (0 = padding), ``segment_ids`` (sample index in the pack; the padding of a
    row is one more segment of its own, so the model needs no ``attention_mask``) and the vision tensors
    concatenated in order (omitted when absent). ``ensure_vision_config``: a
    model config; when given and the batch has no image and no video, a blank 1-token image is appended (see
    :func:`_dummy_image`).
    """
    if ensure_vision_config is not None and not any(
        s.get("pixel_values") is not None or s.get("pixel_values_videos") is not None for p in packs for s in p
    ):
        packs = [list(p) for p in packs]
        packs[-1].append(_dummy_image(ensure_vision_config))
    lens = [sum(int(s["input_ids"].numel()) for s in p) for p in packs]
    L = max(lens)
    B = len(packs)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    segment_ids = torch.zeros((B, L), dtype=torch.long)
    vision: dict[str, list] = {k: [] for k in VISION_KEYS}
    for b, pack in enumerate(packs):
        pos = 0
        for i, s in enumerate(pack):
            n = int(s["input_ids"].numel())
            input_ids[b, pos: pos + n] = s["input_ids"]
            labels[b, pos: pos + n] = s["labels"]
            labels[b, pos] = IGNORE_INDEX
            attention_mask[b, pos: pos + n] = 1
            segment_ids[b, pos: pos + n] = i
            pos += n
            for k in VISION_KEYS:
                if s.get(k) is not None:
                    vision[k].append(s[k])
        segment_ids[b, pos:] = len(pack)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "segment_ids": segment_ids}
    for k, v in vision.items():
        if v:
            batch[k] = torch.cat(v, dim=0)
    return batch


class BatchStream:
    """Micro-batches of ``batch_size`` packs: yields ``(batch, state_after)`` (state after the last pack)."""

    def __init__(self, stream: PackedStream, batch_size: int, pad_token_id: int, ensure_vision_config=None):
        self.stream, self.batch_size = stream, int(batch_size)
        self.pad_token_id, self.ensure_vision_config = pad_token_id, ensure_vision_config

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], StreamState]]:
        buf = []
        for pack, state in self.stream:
            buf.append(pack)
            if len(buf) == self.batch_size:
                yield collate_packs(buf, self.pad_token_id, self.ensure_vision_config), state
                buf = []


class Prefetcher:
    """Run an iterator in a background thread, ``depth`` items ahead (media decoding overlaps training).

    Order is unchanged, so a resumed run still reads exactly what an uninterrupted one would; an exception in the
    thread is re-raised by ``__next__``. ``depth=0`` iterates in the caller's thread.
    """

    _END = object()

    def __init__(self, iterable, depth: int = 2):
        self.depth = int(depth)
        self._it = iter(iterable)
        if self.depth > 0:
            self._q: queue.Queue = queue.Queue(maxsize=self.depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True, name="keye-data-prefetch")
            self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for item in self._it:
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)
        self._put(self._END)

    def close(self) -> None:
        """Stop the background thread (it exits within 0.1 s)."""
        if self.depth > 0:
            self._stop.set()
            self._thread.join(timeout=5)

    def __iter__(self):
        return self

    def __next__(self):
        if self.depth <= 0:
            return next(self._it)
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


# ---------------------------------------------------------------------------------------------------------
# Prompts (rollouts)
# ---------------------------------------------------------------------------------------------------------
def prompt_messages(messages: list[dict]) -> list[dict]:
    """The messages before the last assistant turn (all of them when there is none).

    Raises ValueError when nothing is left (the conversation starts with the assistant) or the prompt does not end
    with a user turn.
    """
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    prompt = list(messages[:last])
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("a rollout prompt needs at least one message and must end with a user turn; got roles "
                         f"{[m.get('role') for m in messages]}")
    return prompt


def strip_media(messages: list[dict]) -> list[dict]:
    """Copy of ``messages`` with every image and video item removed (the text a text-only model gets).

    A message whose content was only media keeps an empty text item, so the turn structure is unchanged.
    """
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            media = ("image", "video", "image_url", "video_url")  # qwen-vl-utils and OpenAI-style items
            items = [dict(c) for c in content if c.get("type") not in media and not any(k in c for k in media)]
            m = {**m, "content": items or [{"type": "text", "text": ""}]}
        out.append(m)
    return out


class PromptEncoder:
    """Encode a record's prompt for ``generate``: chat template with the generation prompt, plus vision tensors.

    Args:
        processor: a Keye-VL-2.0 processor.
        base_dir: folder that relative media paths are resolved against.
        text_only: drop images and videos (the prompt a text-only teacher gets).
        process_vision_info: ``messages -> (images, videos, video_kwargs)``; default ``keye_vl.processing``'s.

    Returns (``__call__``): dict with ``input_ids`` [P] int64, the vision tensors when present (as
    :class:`SampleEncoder`), ``messages`` (the prompt messages, media paths absolute) and ``record`` (the record).
    Raises ValueError for a record without ``messages`` (see :func:`prompt_messages` for the other cases).
    """

    def __init__(self, processor, base_dir: str = ".", text_only: bool = False, process_vision_info: Callable | None = None):
        self.processor, self.base_dir, self.text_only, self._pvi = processor, base_dir, text_only, process_vision_info

    def __call__(self, record: dict) -> dict[str, Any]:
        if "messages" not in record:
            raise ValueError(f"a rollout record needs 'messages'; got keys {sorted(record)}")
        messages = prompt_messages(resolve_media_paths(record["messages"], self.base_dir))
        return self.encode_messages(messages, record)

    def encode_messages(self, messages: list[dict], record: dict | None = None) -> dict[str, Any]:
        """Encode already-selected prompt messages (no assistant turn is removed)."""
        if self.text_only:
            messages = strip_media(messages)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = videos = None
        video_kwargs: dict = {}
        if not self.text_only:
            result = (self._pvi or _process_vision_info_fn())(messages)
            images, videos = result[0], result[1]
            video_kwargs = (result[2] if len(result) > 2 and result[2] else {}) if videos else {}
        enc = self.processor(text=[text], images=images, videos=videos, return_tensors="pt", **video_kwargs)
        out: dict[str, Any] = {"input_ids": enc["input_ids"][0].long(), "messages": messages, "record": record or {}}
        for key in VISION_KEYS:
            v = enc.get(key) if hasattr(enc, "get") else None
            if v is not None:
                out[key] = v
        return out


def collate_prompts(prompts: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Encoded prompts -> a left-padded ``generate`` batch.

    Returns ``input_ids`` / ``attention_mask`` [B, P] int64 (padding on the left, mask 0 there) and the vision
    tensors concatenated in prompt order (omitted when absent). Raises ValueError for an empty list.
    """
    if not prompts:
        raise ValueError("collate_prompts needs at least one prompt")
    P = max(int(p["input_ids"].numel()) for p in prompts)
    ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for b, p in enumerate(prompts):
        n = int(p["input_ids"].numel())
        ids[b, P - n:] = p["input_ids"]
        mask[b, P - n:] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    for k in VISION_KEYS:
        parts = [p[k] for p in prompts if p.get(k) is not None]
        if parts:
            batch[k] = torch.cat(parts, dim=0)
    return batch


class RecordStream:
    """Stream JSON records of one rank from a JSONL file, forever (epochs), resumable.

    Yields ``(record, state_after)`` where ``state_after`` (:class:`StreamState`) is the position of the next
    record of this rank, so a run restarted from it reads exactly the records an uninterrupted run would.
    Rank ``rank`` keeps lines ``line % world_size == rank``; blank lines are skipped.

    Raises FileNotFoundError for a missing file, ValueError for a line that is not JSON or a file that gives this
    rank no record in a whole epoch.
    """

    def __init__(self, path: str, rank: int = 0, world_size: int = 1, state: StreamState | None = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        self.path, self.rank, self.world_size = path, rank, world_size
        self.state = state or StreamState()

    def __iter__(self) -> Iterator[tuple[dict, StreamState]]:
        pending, pending_epoch, produced = None, None, False
        for raw, here in _rank_lines(self.path, self.state, self.rank, self.world_size):
            if raw is None:  # end of an epoch
                if not produced and here:
                    raise ValueError(f"{self.path} gives rank {self.rank} of {self.world_size} no record")
                produced = False
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: line {here.line + 1} is not valid JSON: {e}") from e
            if pending is not None:
                # the state after a record is where the next one of this rank starts (in the next epoch for the
                # epoch's last one: the first line at or after offset 0)
                yield pending, here if here.epoch == pending_epoch else StreamState(here.epoch, 0, 0)
            pending, pending_epoch, produced = record, here.epoch, True

    def take(self, n: int) -> tuple[list[dict], StreamState]:
        """The next ``n`` records and the state after them (advances ``self.state``)."""
        out, state = [], self.state
        it = iter(self)
        for _ in range(n):
            rec, state = next(it)
            out.append(rec)
        self.state = state
        return out, state
