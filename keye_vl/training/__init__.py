"""The training library the trainers in ``examples/`` share (pre-training, MOPD, RL), imported as
``keye_vl.training.<module>``.

Modules (import them directly; importing this package imports nothing heavy):

- ``args``: argument dataclasses (model, data, optimisation, LoRA, output) for ``HfArgumentParser``.
- ``models``: load a checkpoint, build a random model (``tiny`` / JSON config), LoRA, load any causal LM as a
  teacher.
- ``data``: JSONL conversations -> full-conversation samples (packing) or prompts (rollouts); resumable streams.
- ``loop``: Accelerate pieces (accelerator, optimizer, schedule, optimizer step, metric reduction, memory).
- ``checkpoint``: save / exact resume (model, optimizer, schedule, RNG, data position) and the final folder.
- ``logging``: TensorBoard + JSON + JSON lines + tqdm.
- ``losses``: the LM loss by the model's formula; the MOPD losses.
- ``logprobs``: per-token log-probabilities of completions, chunked (no [L, vocab] logits).
- ``rollout``: batched sampling with recorded sampler log-probs, vision features once per prompt, FSDP2
  unshard-once rollout layout.
- ``gspo``, ``rewards``: the RL trainer's loss and verifiable rewards.
"""
