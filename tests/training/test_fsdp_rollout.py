"""FSDP2 rollout layout on the CPU: two processes (gloo), the tiny model sharded per decoder layer.

``unsharded_for_rollout`` must all-gather each FSDP unit once for the whole ``generate`` (instead of every layer
for every decoded token), give the same samples as the plain sharded run and as the unsharded model, and leave the
parameters sharded again afterwards; a MOPD training step (chunked log-probs, loss, backward) under FSDP2 after it
equals the unsharded model's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch.distributed.fsdp")

WORKER = textwrap.dedent('''
    import contextlib, json, os, sys
    import torch, torch.distributed as dist

    def worker(rank, port, out_dir):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        from keye_vl.modeling_keye import KeyeVL2MoeForConditionalGeneration, tiny_config
        from keye_vl.training import rollout as R

        torch.manual_seed(0)
        model = KeyeVL2MoeForConditionalGeneration(tiny_config()).eval()
        model.set_attn_implementation("dsa_torch")
        ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 151645, 198, 151644, 77091, 198]])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        new = 6
        ref = R.generate_rollouts(model, batch, 2, new, [151645], 151643, generator_seed=0)
        import copy
        from keye_vl.training.logprobs import completion_logprobs
        from keye_vl.training import losses as L

        def mopd_step(m, rb):
            # the trainer's loss on this rollout, with a fixed stand-in teacher (sampler log-probs - 0.1 per token)
            lp = completion_logprobs(m, rb.model_inputs(), rb.completion_ids, rb.completion_mask, chunk_size=5)
            w, _ = L.truncated_importance_weights(lp["logprobs"], rb.sampler_logprobs, 0.5, 2.0)
            adv = L.mopd_advantages(rb.sampler_logprobs - 0.1, lp["logprobs"])
            loss = L.mopd_loss(lp["logprobs"], adv, w, rb.completion_mask)
            loss.backward()
            return loss

        plain = copy.deepcopy(model).train()
        ref_loss = float(mopd_step(plain, ref))
        ref_grad = plain.model.layers[0].self_attn.q_proj.weight.grad.clone()
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gathers, forwards = [0], [0]
        orig = dist.all_gather_single if hasattr(dist, "all_gather_single") else dist.all_gather_into_tensor
        def counting(*a, **k):
            gathers[0] += 1
            return orig(*a, **k)
        setattr(dist, orig.__name__, counting)
        model.register_forward_pre_hook(lambda m, a: forwards.__setitem__(0, forwards[0] + 1))
        res = {}
        for mode in ("unshard", "plain"):
            gathers[0] = forwards[0] = 0
            ctx = R.unsharded_for_rollout(model) if mode == "unshard" else contextlib.nullcontext()
            with ctx:
                rb = R.generate_rollouts(model, batch, 2, new, [151645], 151643, generator_seed=0)
            res[mode] = {"gathers": gathers[0], "forwards": forwards[0], "tokens": rb.completion_ids.tolist(),
                         "same_as_unsharded": torch.equal(rb.completion_ids, ref.completion_ids),
                         "mu_diff": float((rb.sampler_logprobs - ref.sampler_logprobs).abs().max())}
            res[mode]["sharded_after"] = all(isinstance(p.data, DTensor) for p in model.parameters())
        model.train()
        loss = mopd_step(model, rb)  # training layout again: per-layer all-gathers, reduce-scattered gradients
        g = model.model.layers[0].self_attn.q_proj.weight.grad.full_tensor()
        res["loss"], res["ref_loss"] = float(loss), ref_loss
        res["grad_diff"] = float((g - ref_grad).abs().max())
        res["grad_norm"] = float(ref_grad.norm())
        res["units"] = sum(1 for m in model.modules() if type(m).__name__.startswith("FSDP"))
        json.dump(res, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unsharded_for_rollout_gathers_each_unit_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    units = r0["units"]
    assert units == 3  # two decoder layers + the root (embeddings, vision, head)
    for r in (r0, r1):
        u, p = r["unshard"], r["plain"]
        assert u["forwards"] == p["forwards"] == 6  # one prefill + 5 decode steps for 6 new tokens
        assert u["gathers"] == units  # once per unit for the whole rollout
        # plain FSDP2: the root stays gathered after its first forward; each layer gathers in every forward
        assert p["gathers"] == 1 + 2 * p["forwards"]
        assert u["same_as_unsharded"] and p["same_as_unsharded"] and u["tokens"] == p["tokens"]
        assert u["mu_diff"] < 1e-5 and p["mu_diff"] < 1e-5
        assert u["sharded_after"]  # (plain FSDP2 keeps the root gathered after a forward)
    assert r0["loss"] == r1["loss"] and r0["unshard"]["tokens"] == r1["unshard"]["tokens"]
    # the MOPD step through the chunked log-probs under FSDP2 == the unsharded model's (both ranks hold the same
    # batch here, so the averaged gradient equals the single-process one)
    assert abs(r0["loss"] - r0["ref_loss"]) < 1e-5 and r0["grad_norm"] > 0
    assert r0["grad_diff"] < 1e-5 * max(1.0, r0["grad_norm"])
