"""Scale-out: the trainer under torchrun (2 CPU processes, gloo) with DDP and FSDP2 gives the
single-process run of the same global batch -- losses per step, eval metrics, final weights --
for SFT and DPO, with and without gradient accumulation, and resumes exactly from a
distributed checkpoint. Token-level normalisation is the point: the ranks hold different token
counts, so averaging per-rank (or per-micro-batch) means would give a different gradient (shown
in test_naive_per_rank_means_would_differ).

One torchrun launch runs every distributed case (this file is its worker script, see
`_worker`); the single-process references run in the pytest process.

Tolerance: fp32 throughout. The distributed run computes every micro-batch exactly as the
single-process run does (same examples, same padding) except that gradients are summed in a
different order (all-reduce / reduce-scatter over ranks instead of accumulation in one process),
and x2 then /2 (exact in binary): a few fp32 roundings per gradient element. Hence:
  * first-step gradients, element by element: rtol 1e-5, atol 1e-7 (measured: <= 6e-8 absolute
    on gradients up to 0.4, i.e. a few ulps);
  * losses per step and eval metrics: rtol 1e-5, atol 1e-6 (measured ~1e-7 relative);
  * weights after 4 AdamW steps: see _assert_weights_close (AdamW amplifies rounding where a
    gradient is ~ its eps = 1e-8: elementwise within lr/100, in norm < 1e-4 of the update).
The normalisation bug this guards against changes the first gradient by 16% in norm here (ranks
with 34 and 47 completion tokens; elementwise up to 0.06 absolute, test_naive_per_rank_means_would_differ),
~1e6 times the measured gradient differences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import torch

TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-7)
STEPS = 4
LR = 3e-3

# name -> (algorithm, distributed mode, per-rank batch_size, grad_accum, algorithm options);
# the single-process reference uses batch_size and grad_accum * 2: the same global batch of 8
# examples and the same micro-batches (rank r takes the r-th contiguous half of each step's
# global batch), or for "sft_ddp_big" batch 8 in one micro-batch (different micro-batches).
CASES = {
    "sft_ddp_accum": ("sft", "ddp", 2, 2, {}),
    "sft_ddp_big": ("sft", "ddp", 4, 1, {}),
    "sft_fsdp_accum": ("sft", "fsdp", 2, 2, {}),
    "dpo_ddp_accum": ("dpo", "ddp", 2, 2, {"beta": 0.5, "precompute_ref_logps": True}),
    "dpo_fsdp": ("dpo", "fsdp", 2, 2, {"beta": 0.5}),
    # a scalar-head model whose loss calls .score(): routed through DDP / registered with FSDP2
    "reward_ddp": ("reward", "ddp", 2, 2, {}),
    "reward_fsdp": ("reward", "fsdp", 2, 1, {}),
}
REFERENCE = {"sft_ddp_big": (8, 1)}  # else (batch_size, 2 * grad_accum)
RESUMED = ("sft_fsdp_accum", "dpo_ddp_accum", "reward_fsdp")  # also run as steps 1-2, checkpoint, resume for 3-4


def _tok():
    from fastalign.models import tiny_tokenizer

    return tiny_tokenizer()


def _data(algo, tok):
    """Synthetic examples of very different lengths (uneven token counts per rank)."""
    from fastalign.algorithms import get_algorithm
    from fastalign.data.synthetic import SyntheticTask

    task = SyntheticTask()
    alg = get_algorithm(algo)()
    if algo == "sft":
        recs = task.demonstrations(48, 3)
        # make completion lengths vary a lot: cut every third one to a single character
        recs = [{"messages": [r["messages"][0], {"role": "assistant", "content": r["messages"][1]["content"][:1]}]}
                if i % 3 == 0 else r for i, r in enumerate(recs)]
        ex = alg.encode(recs, tok, 64, Counter())
    else:
        from fastalign.data.synthetic import Oracle

        recs, _ = task.preference_pairs(48, Oracle(seed=3), 3)
        ex = alg.encode(recs, tok, 64, Counter())
    return ex[:36], ex[36:]  # 12 eval examples: 3 eval batches of 4, uneven over 2 ranks


def _models(algo, tok, seed=0):
    from fastalign.models import tiny_model
    from fastalign.models.heads import ScalarHeadModel

    if algo == "reward":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the head's initialisation draws from the global RNG
            return {"reward": ScalarHeadModel(tiny_model(tok, seed=seed, **TINY))}
    models = {"policy": tiny_model(tok, seed=seed, **TINY)}
    if algo == "dpo":
        models["reference"] = tiny_model(tok, seed=seed, **TINY)
    return models


def _trainer(name, out, *, mode, batch_size, grad_accum, max_steps=STEPS, save_every=0, resume_from=None):
    from fastalign.algorithms import get_algorithm
    from fastalign.trainer import Trainer

    algo, _, _, _, opts = CASES[name]
    tok = _tok()
    train, evald = _data(algo, tok)
    alg = get_algorithm(algo)(opts)
    # rank 1 initialises differently: the trainer must start every rank from rank 0's weights
    models = _models(algo, tok, seed=7 if mode != "none" and os.environ.get("RANK") == "1" else 0)
    cfg = dict(output_dir=str(out), max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=LR,
               warmup_steps=1, schedule="linear", max_grad_norm=1.0, weight_decay=0.01, precision="fp32",
               device="cpu", distributed=mode, progress=False, plot=False, save_every=save_every,
               save_total_limit=10, resume_from=resume_from, handle_sigint=False)
    return Trainer(alg, models, tok, train, evald, cfg)


def _first_step_grads(tr):
    """The gradient of the first step's global batch (then undone: cursor rewound, grads
    cleared), as full tensors by parameter name."""
    tr.accumulate(tr.next_micro_batches())
    grads = {}
    for role, m in tr.trainable.items():
        for n, p in m.named_parameters():
            g = p.grad
            grads[f"{role}.{n}"] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    tr.optimizer.zero_grad(set_to_none=True)
    tr.epoch, tr.pos, tr._perm = 0, 0, None
    return grads


def _run(tr, grads_path=None):
    if grads_path is not None:
        grads = _first_step_grads(tr)
        if tr.is_main:
            torch.save(grads, grads_path)
    losses, local_units = [], []
    orig = tr.next_micro_batches

    def next_micro_batches():
        mbs = orig()
        local_units.append(sum(tr.algorithm.loss_units(mb) for mb in mbs))
        return mbs

    tr.next_micro_batches = next_micro_batches
    tr.callbacks.append(lambda t, m: losses.append(m["loss"]))
    summary = tr.fit()
    return {"losses": losses, "eval": summary["eval"], "checkpoint": summary["checkpoint"],
            "local_units": local_units, "units": tr.last_metrics["units"], "roles": sorted(tr.train_models)}


# ---- the torchrun worker -------------------------------------------------------------------------


def _worker(out_root):
    import torch.distributed as dist

    from fastalign.trainer import distributed as D

    torch.set_num_threads(1)
    results = {}
    for name, (_, mode, bs, ga, _) in CASES.items():
        out = os.path.join(out_root, name)
        r = _run(_trainer(name, out, mode=mode, batch_size=bs, grad_accum=ga), grads_path=out + "-grads.pt")
        r["grads"] = out + "-grads.pt"
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, r["local_units"])
        r["local_units"] = gathered
        r["world"], r["mode"] = D.world_size(), _trainer_mode(name)
        results[name] = r
        if name in RESUMED:  # stopped after step 2 (checkpoint), then a fresh trainer resumes for 3-4
            out = os.path.join(out_root, name + "_resumed")
            tr = _trainer(name, out, mode=mode, batch_size=bs, grad_accum=ga)
            tr.callbacks.append(lambda t, m: t.request_stop() if t.step == 2 and t.rank == 1 else None)
            first = _run(tr)
            assert len(first["losses"]) == 2  # rank 1 asked to stop: every rank stopped
            second = _run(_trainer(name, out, mode=mode, batch_size=bs, grad_accum=ga, resume_from=first["checkpoint"]))
            results[name + "_resumed"] = {"losses": first["losses"] + second["losses"], "eval": second["eval"],
                                          "checkpoint": second["checkpoint"], "first_checkpoint": first["checkpoint"]}
        if name == "sft_fsdp_accum":  # checkpoints are the same in every mode: single-process -> FSDP2
            out = os.path.join(out_root, "single_to_fsdp")
            if dist.get_rank() == 0:
                tr = _trainer(name, out, mode="none", batch_size=bs, grad_accum=2 * ga)
                tr.callbacks.append(lambda t, m: t.request_stop() if t.step == 2 else None)
                _run(tr)
            D.barrier()
            second = _run(_trainer(name, out, mode=mode, batch_size=bs, grad_accum=ga, resume_from="latest"))
            results["single_to_fsdp"] = {"losses": second["losses"], "checkpoint": second["checkpoint"]}
    results["errors"] = _error_cases(os.path.join(out_root, "errors"))
    if dist.get_rank() == 0:
        with open(os.path.join(out_root, "results.json"), "w") as f:
            json.dump(results, f)
    D.barrier()
    D.shutdown()  # as the CLI does: free the trainers' DDP/FSDP state, then destroy the group


def _error_cases(out):
    """A NaN loss on one rank only, and unequal micro-batch counts: every rank raises the same
    error (none hangs in a collective, none steps)."""
    from fastalign.trainer import TrainingDivergedError

    tr = _trainer("sft_ddp_accum", out, mode="ddp", batch_size=2, grad_accum=2)
    before = [p.detach().clone() for p in tr.params]
    mbs = tr.next_micro_batches()

    def nan_on_rank1(models, batch):
        loss_sum, metrics = tr.algorithm.loss(models, batch)
        return (loss_sum * float("nan") if tr.rank == 1 else loss_sum), metrics

    got = {}
    try:
        tr.optimize(mbs, loss_fn=nan_on_rank1)
    except TrainingDivergedError as e:
        got["nan"] = str(e)
    got["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, tr.params))
    try:
        tr.optimize(mbs[: 1 + tr.rank])
    except ValueError as e:
        got["count"] = str(e)
    got.update(_ppo_cases(out))
    got["generation_lengths"] = _sharded_generation_ending_early_on_one_rank()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, got)
    return gathered


def _ppo_cases(out):
    """PPO under DDP: a NaN reward on rank 1 only stops every rank before any update; a normal
    run keeps the rollout monitors (and so the over-optimisation monitor's state) identical on
    every rank. PPO under FSDP2: sharded generation (synced steps), sharded reference and value
    models, the same monitors on every rank."""
    from collections import Counter

    from fastalign.algorithms import get_algorithm
    from fastalign.data.synthetic import Oracle, SyntheticTask
    from fastalign.models import ScalarHeadModel, tiny_model
    from fastalign.trainer import Trainer, TrainingDivergedError
    from fastalign.trainer import distributed as D

    tok = _tok()
    tiny = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    got = {}
    for name, reward, mode in (("ppo_nan", lambda p, r: float("nan") if D.rank() == 1 else 1.0, "ddp"),
                               ("ppo", lambda p, r: float(len(r)), "ddp"),
                               ("ppo_fsdp", lambda p, r: float(len(r)), "fsdp")):
        alg = get_algorithm("ppo")({"max_new_tokens": 3, "ppo_epochs": 1, "mini_batches": 1}, reward_fn=reward,
                                   oracle_fn=Oracle.score)
        models = {"policy": tiny_model(tok, **tiny), "reference": tiny_model(tok, **tiny),
                  "value": ScalarHeadModel(tiny_model(tok, **tiny), seed=0)}
        data = alg.encode(SyntheticTask().sample(16, seed=0), tok, 64, Counter())
        tr = Trainer(alg, models, tok, data, None, dict(output_dir=os.path.join(out, name), distributed=mode,
                                                        batch_size=2, max_steps=2, progress=False, plot=False))
        before = [p.detach().clone() for p in tr.params]
        try:
            tr.fit()
            got[name] = {"monitor": alg.monitor.state_dict(), "reward": tr.last_metrics["rollout/reward"]}
        except TrainingDivergedError as e:
            got[name] = {"error": str(e), "unchanged": all(torch.equal(a, p) for a, p in zip(before, tr.params))}
    return got


def _sharded_generation_ending_early_on_one_rank():
    """FSDP2 generation where rank 0's responses end at the first token (its EOS is set to the
    greedy first token) and rank 1's run to max_new_tokens: without synced steps rank 1 would
    wait forever in an all-gather. Returns this rank's response lengths."""
    from fastalign.models import tiny_model
    from fastalign.trainer import distributed as D
    from fastalign.trainer.generation import generate

    tok = _tok()
    model = tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    D.shard_(model, torch.device("cpu"))
    prompts = ["a b c", "d e"]
    if D.rank() == 0:
        _, first, _ = generate(model, tok, prompts[:1], max_new_tokens=1, do_sample=False)
        tok.eos_token_id = first[0][0]
    else:
        generate(model, tok, prompts[:1], max_new_tokens=1, do_sample=False)  # the same collectives
    _, ids, _ = generate(model, tok, prompts[:1], max_new_tokens=6, do_sample=False)
    return [len(r) for r in ids]


def _trainer_mode(name):
    return CASES[name][1]


# ---- the tests -------------------------------------------------------------------------------------

import pytest  # noqa: E402


def _launch(args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1")  # a crash shows its Python stack
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _launch([os.path.abspath(__file__), "--worker", str(out)], cwd=str(out))
    with open(out / "results.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def single_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        res = {}
        for name, (_, _, bs, ga, _) in CASES.items():
            rbs, rga = REFERENCE.get(name, (bs, 2 * ga))
            res[name] = _run(_trainer(name, out / name, mode="none", batch_size=rbs, grad_accum=rga),
                             grads_path=str(out / name) + "-grads.pt")
            res[name]["grads"] = str(out / name) + "-grads.pt"
        return res
    finally:
        torch.set_num_threads(threads)


def _weights(ckpt_dir):
    """The trained model's weights in a checkpoint (a reward model's head as head.*)."""
    from safetensors.torch import load_file

    role = "reward" if os.path.exists(os.path.join(ckpt_dir, "reward")) else "policy"
    out = load_file(os.path.join(ckpt_dir, role, "model.safetensors"))
    head = os.path.join(ckpt_dir, role, "score_head.safetensors")
    if os.path.exists(head):
        out.update({f"head.{k}": v for k, v in load_file(head).items()})
    return out


def _initial_weights(name):
    m = next(iter(_models(CASES[name][0], _tok()).values()))
    return {k.removeprefix("lm."): v for k, v in m.state_dict().items()}


def _assert_weights_close(name, a_dir, b_dir):
    """Weights after 4 AdamW steps. AdamW's update lr * m / (sqrt(v) + eps) has slope lr / eps
    (3e5) in the gradient where |g| ~ eps = 1e-8, so an element whose gradient is ~1e-8 -- the
    size of the reduction-order difference of the gradients -- may move differently by a
    sizeable fraction of lr (measured: up to 1.4e-6, in ~20 of 24k elements). Hence: elementwise
    within 1% of one step (lr / 100), and the whole difference tiny against the whole update
    (the normalisation bug changes the update direction by ~1e-2 relative)."""
    a, b = _weights(a_dir), _weights(b_dir)
    w0 = _initial_weights(name)
    common = sorted(set(a) & set(b) & set(w0))
    assert "model.embed_tokens.weight" in common and len(common) >= 20
    for k in common:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=LR / 100, msg=lambda m, k=k: f"{k}: {m}")
    diff = torch.cat([(a[k] - b[k]).flatten() for k in common]).norm()
    update = torch.cat([(b[k] - w0[k]).flatten() for k in common]).norm()
    assert update > 100 * LR and diff < 1e-4 * update, (float(diff), float(update))


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_single_process(name, dist_results, single_results):
    d, s = dist_results[name], single_results[name]
    assert d["world"] == 2 and d["mode"] == CASES[name][1]
    # the ranks see different token counts (so the normalisation matters), adding up to the global count
    per_rank = d["local_units"]
    assert [sum(x) for x in zip(*per_rank)] == s["local_units"]
    if CASES[name][0] == "sft":  # (preference data: the units are pairs, equal per rank)
        assert any(a != b for a, b in zip(*per_rank)), per_rank
    assert d["units"] == s["units"]
    # the first step's gradient, element by element: the direct check of the normalisation
    gd, gs = torch.load(d["grads"]), torch.load(s["grads"])
    assert gd.keys() == gs.keys() and len(gd) >= 20
    for k in gs:
        torch.testing.assert_close(gd[k], gs[k], **GRAD_TOL, msg=lambda m, k=k: f"grad {k}: {m}")
    assert len(d["losses"]) == len(s["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(d["losses"], dtype=torch.float64),
                               torch.tensor(s["losses"], dtype=torch.float64), **TOL)
    # the weights changed, identically (the final checkpoint, written by rank 0)
    assert s["losses"][-1] != s["losses"][0]
    _assert_weights_close(name, d["checkpoint"], s["checkpoint"])
    # evaluation, batches spread over the ranks (3 batches on 2 ranks), unit-weighted; metrics
    # that are means per batch (seq_nll) depend on the batching, so only the loss when it differs
    assert set(d["eval"]) == set(s["eval"])
    for k in s["eval"] if name not in REFERENCE else ["loss"]:
        assert d["eval"][k] == pytest.approx(s["eval"][k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("name", RESUMED)
def test_distributed_resume_is_exact(name, dist_results):
    full, resumed = dist_results[name], dist_results[name + "_resumed"]
    # same processes, same reduction order: resuming from the checkpoint reproduces the run
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-6, abs=1e-7)
    _assert_weights_close(name, resumed["checkpoint"], full["checkpoint"])
    for k in full["eval"]:
        assert resumed["eval"][k] == pytest.approx(full["eval"][k], rel=1e-6, abs=1e-7), k


def test_checkpoints_move_between_modes(dist_results, single_results, tmp_path):
    """A single-process checkpoint resumes under FSDP2 and an FSDP2 checkpoint in a single
    process: both continue the single-process run (steps 3-4)."""
    ref = single_results["sft_fsdp_accum"]
    d = dist_results["single_to_fsdp"]
    torch.testing.assert_close(torch.tensor(d["losses"]), torch.tensor(ref["losses"][2:]), **TOL)
    _assert_weights_close("sft_fsdp_accum", d["checkpoint"], ref["checkpoint"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = _trainer("sft_fsdp_accum", tmp_path, mode="none", batch_size=2, grad_accum=4,
                      resume_from=dist_results["sft_fsdp_accum_resumed"]["first_checkpoint"])
        s = _run(tr)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(torch.tensor(s["losses"]), torch.tensor(ref["losses"][2:]), **TOL)
    _assert_weights_close("sft_fsdp_accum", s["checkpoint"], ref["checkpoint"])


def test_errors_are_raised_on_every_rank(dist_results):
    for got in dist_results["errors"]:  # one dict per rank
        assert "summed over ranks" in got["nan"] and got["unchanged"]
        assert "ranks have 1 to 2 micro-batches" in got["count"]


def test_ppo_under_ddp(dist_results):
    rank0, rank1 = dist_results["errors"]
    assert "non-finite reward" in rank0["ppo_nan"]["error"] and "another rank" in rank0["ppo_nan"]["error"]
    assert "non-finite reward(s), e.g. nan" in rank1["ppo_nan"]["error"]
    assert rank0["ppo_nan"]["unchanged"] and rank1["ppo_nan"]["unchanged"]
    assert rank0["ppo"] == rank1["ppo"] and rank0["ppo"]["monitor"]["count"] == 2
    assert rank0["ppo_fsdp"] == rank1["ppo_fsdp"] and rank0["ppo_fsdp"]["monitor"]["count"] == 2
    # sharded generation: rank 0 stopped after one token, rank 1 ran on (and nobody hung)
    assert rank0["generation_lengths"] == [1] and rank1["generation_lengths"] == [6]


def test_precomputed_reference_is_released(dist_results):
    # DPO with precompute_ref_logps deletes the reference model: the DDP views follow
    assert dist_results["dpo_ddp_accum"]["roles"] == ["policy"]
    assert dist_results["dpo_fsdp"]["roles"] == ["policy", "reference"]


def test_naive_per_rank_means_would_differ(tmp_path):
    """The bug class: each rank (or micro-batch) normalising by its own token count and the
    ranks averaging. On this data that gradient is far outside the tolerance above."""
    tr = _trainer("sft_ddp_accum", tmp_path, mode="none", batch_size=2, grad_accum=4)
    mbs = tr.next_micro_batches()
    units = [tr.algorithm.loss_units(mb) for mb in mbs]
    rank_units = [sum(units[:2]), sum(units[2:])]
    assert rank_units[0] != rank_units[1]
    tr.accumulate(mbs)
    right = torch.cat([p.grad.flatten() for p in tr.params])
    tr.optimizer.zero_grad(set_to_none=True)
    for i, mb in enumerate(mbs):  # per-rank mean, then the mean over 2 ranks
        loss_sum, _ = tr.algorithm.loss(tr.models, mb)
        (loss_sum / rank_units[i // 2] / 2).backward()
    naive = torch.cat([p.grad.flatten() for p in tr.params])
    rel = float((naive - right).norm() / right.norm())
    assert rel > 0.05, rel  # measured 0.157


def test_torchrun_cli_matches_single_process(tmp_path):
    """`torchrun -m fastalign train sft` (auto -> DDP on gloo) logs the losses of the
    single-process run with the same global batch (rank 0 alone writes the log)."""
    from fastalign.trainer.metrics import read_jsonl
    from fastalign.trainer.run import load_config, run_training

    common = ["data.format=synthetic", "data.train_size=32", "data.eval_size=8", "data.max_length=48",
              "model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
              "trainer.max_steps=3", "trainer.device=cpu", "trainer.progress=false", "trainer.plot=false",
              "trainer.lr=0.003", "trainer.batch_size=2", "trainer.precision=fp32"]
    p = _launch(["-m", "fastalign", "train", "sft", *common, f"trainer.output_dir={tmp_path / 'dist'}",
                 "trainer.grad_accum=2"], cwd=ROOT)
    assert p.stdout.count("sft: done at step 3") == 1, p.stdout  # rank 0 alone prints
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, common + [f"trainer.output_dir={tmp_path / 'single'}", "trainer.grad_accum=4",
                                          "trainer.distributed=none"])
        run_training("sft", cfg)
    finally:
        torch.set_num_threads(threads)
    d, s = (read_jsonl(str(tmp_path / x / "metrics.jsonl")) for x in ("dist", "single"))
    d_train, s_train = ([r["loss"] for r in rows if r["split"] == "train"] for rows in (d, s))
    assert len(d_train) == len(s_train) == 3  # one line per step: only rank 0 logged
    assert d_train == pytest.approx(s_train, rel=1e-5, abs=1e-6)
    d_eval, s_eval = ([r["loss"] for r in rows if r["split"] == "eval"] for rows in (d, s))
    assert d_eval == pytest.approx(s_eval, rel=1e-5, abs=1e-6) and len(d_eval) == 1


# ---- without a process group -------------------------------------------------------------------------


def test_helpers_without_process_group(monkeypatch):
    from fastalign.trainer import distributed as D

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not D.is_initialized() and D.world_size() == 1 and D.rank() == 0 and D.is_main()
    assert D.resolve_mode("auto") == "none" and D.resolve_mode("fsdp") == "fsdp"
    with pytest.raises(ValueError, match="distributed must be one of"):
        D.resolve_mode("deepspeed")
    assert D.all_reduce([1.0, 2.0]) == [1.0, 2.0] and D.all_agree(True) and not D.any_rank(False)
    assert D.reduce_weighted({"a": 6.0, "b": 1.0}, {"a": 3.0, "b": 0.0}) == {"a": 2.0, "b": 0.0}
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert D.resolve_mode("auto") == "ddp"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            D.resolve_device("cuda")


def test_ddp_without_torchrun_says_how(tmp_path, monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        _trainer("sft_ddp_accum", tmp_path, mode="ddp", batch_size=2, grad_accum=1)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
