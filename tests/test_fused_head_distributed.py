"""The trainer's fused log-prob head (fastalign/models/fused_head.py) under DDP and FSDP2 (2 CPU
processes, gloo): the fused op runs inside the wrapped model's forward -- under FSDP2 on the
all-gathered head weight (a plain Parameter, not the DTensor shard: no eager fallback) -- and
the log-probs, entropies and synchronised gradients equal the single-process fused run's BIT FOR
BIT: every rank computes the same batch with the same shapes as the single process (one thread
each, so the same GEMM blocking), and the gradient average of two identical per-rank gradients,
(g + g) / 2 or g / 2 + g / 2, is exact in binary. Padded and packed forwards, SFT-style
(log-probs only) and RL-style (with the entropy). A DTensor head weight outside FSDP2 is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _compute(wrap):
    """{name: tensor} of one fused pass per layout on the tiny model (wrapped by `wrap`), and the
    types of the head weights the fused op received."""
    import fastalign.models.fused_head as FH
    from fastalign.algorithms import token_logps
    from fastalign.data import collate as C
    from fastalign.data.synthetic import SyntheticTask
    from fastalign.models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    batch = C.collate_lm(C.encode_demonstrations(SyntheticTask().demonstrations(4, 0), tok, 64), tok.pad_token_id)
    model = tiny_model(tok, seed=0, **TINY)
    view = wrap(model)
    assert FH.fused_head_refusal(view) is None
    seen, original = [], FH.linear_gather_logprobs

    def counted(hidden, weight, *args, **kwargs):
        seen.append(type(weight).__name__)
        return original(hidden, weight, *args, **kwargs)

    FH.linear_gather_logprobs = counted
    out = {}
    try:
        for packed in (False, True):
            lp, ent, mask = token_logps(view, batch, temperature=0.8, return_entropy=True, packed=packed)
            (lp.sum() + 0.3 * (ent * mask).sum()).backward()
            out[f"logps packed={packed}"], out[f"entropy packed={packed}"] = lp.detach(), ent.detach()
    finally:
        FH.linear_gather_logprobs = original
    for name, p in model.named_parameters():
        g = p.grad
        out[f"grad {name}"] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out, seen


def _worker(path):
    import torch.distributed as dist

    from fastalign.trainer import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for mode in ("ddp", "fsdp"):
        def wrap(m, mode=mode):
            return D.wrap_models({"policy": m}, ("policy",), mode, torch.device("cpu")).get("policy", m)

        results[mode] = _compute(wrap)
    # a DTensor head weight outside FSDP2 (e.g. tensor parallel): refused, the logits path is used
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fastalign.models import tiny_model, tiny_tokenizer
    from fastalign.models.fused_head import fused_head_refusal

    m = tiny_model(tiny_tokenizer(), seed=0, **TINY)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    m.lm_head.weight = torch.nn.Parameter(distribute_tensor(m.lm_head.weight.detach().clone(), mesh, [Shard(0)]))
    results["dtensor refusal"] = fused_head_refusal(m)
    if dist.get_rank() == 0:
        torch.save(results, path)
    dist.barrier()
    dist.destroy_process_group()


def test_fused_head_under_ddp_and_fsdp2_matches_single_process(tmp_path):
    path = str(tmp_path / "results.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.abspath(__file__), "--worker", path], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        single, single_seen = _compute(lambda m: m)
    finally:
        torch.set_num_threads(threads)
    results = torch.load(path)
    # padded, the packed-leak probe (2 forwards), packed: the fused op each time, on full weights
    assert single_seen == ["Parameter"] * 4
    assert "DTensor outside an FSDP2-sharded model" in results["dtensor refusal"]
    for mode in ("ddp", "fsdp"):
        got, seen = results[mode]
        assert seen == ["Parameter"] * 4, (mode, seen)
        assert got.keys() == single.keys()
        for k, v in single.items():
            assert torch.equal(got[k], v), (mode, k, (got[k] - v).abs().max())


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
