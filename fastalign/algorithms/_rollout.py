"""The mechanics of an online step (used by fastalign/algorithms/online.py): sampling responses
from the policy, scoring them, the per-token tensors of a rollout batch, the epochs x
mini-batches optimisation, the monitors and evaluation. Everything of the run goes through its
TrainingContext (context.py): sampling, precision, collectives, the optimizer step.

A rollout batch holds prompt + response rows, right-padded ([N, L]); position t of the
per-token tensors ([N, L-1]) is the action that produced token t+1, so `mask` is True exactly
on the response tokens (token_logps' convention). Every per-token log-prob goes through
token_logps at the sampling temperature (never a full log_softmax; no logits where the model
allows, see fastalign/models/fused_head.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastalign.algorithms.base import token_logps
from fastalign.algorithms.context import TrainingDivergedError
from fastalign.algorithms.monitors import rollout_metrics
from fastalign.data import collate as C
from fastalign.ops.preference import sequence_logps
from fastalign.sampling.engine import eos_set

# The offsets of derive_seed for a step's sampling (7919 * (step + 1)) and its mini-batch order
# (+1), and the offset from the run's seed of the evaluation samples.
STEP_SEED_FACTOR = 7919
EVAL_SEED_OFFSET = 12345


@dataclass
class Rollout:
    prompts: list            # one entry per sample (prompts repeated for groups)
    texts: list              # decoded responses
    response_ids: list       # token ids of the responses (EOS kept when emitted)
    truncated: int           # responses cut at max_new_tokens without EOS
    batch: dict              # input_ids, attention_mask, labels [N, L] on the run's device
    mask: torch.Tensor       # [N, L-1] bool: response positions
    # filled by OnlineAlgorithm.train_step after sampling:
    scores: torch.Tensor | None = None     # [N] fp32 (reward model or reward_fn)
    old_logps: torch.Tensor | None = None  # [N, L-1] of the sampling policy, 0 off the response
    entropy: torch.Tensor | None = None    # [N, L-1] its per-token entropy
    ref_logps: torch.Tensor | None = None  # [N, L-1] of the reference (None without one)
    seq_kl: torch.Tensor | None = None     # [N] sum of old_logps - ref_logps per response (k1)
    # the sampler's own log-probs and entropies laid out as old_logps ([N, L-1], 0 off the
    # response), when sample(with_logprobs=True) was asked and the engine gave them:
    sampler_logps: torch.Tensor | None = None
    sampler_entropy: torch.Tensor | None = None
    # [N] bool: the responses cut at max_new_tokens without an EOS (their count is `truncated`)
    truncated_rows: torch.Tensor | None = None
    # [N] fp32: the score of the greedy response to each sample's prompt (ReMax's baseline), when asked
    baseline_scores: torch.Tensor | None = None
    # the per-response sampler outputs as the engine gave them (for rebuilding a subset: `subset`)
    _lps: list | None = None
    _ents: list | None = None

    def __len__(self):
        return len(self.texts)


def sample(context, prompts, *, temperature: float, max_new_tokens: int, seed: int,
           with_logprobs: bool = False, do_sample: bool = True) -> Rollout:
    """Samples one response per entry of `prompts` from context.models["policy"] (seeded: a
    resumed run samples what the uninterrupted one did). with_logprobs: keep the sampler's
    per-token log-probs and entropies (Rollout.sampler_logps / sampler_entropy; None when the
    engine gives none). do_sample=False: greedy decoding (ReMax's baseline responses)."""
    kw = dict(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    if not do_sample:  # the context's default is sampling: pass the flag only when it differs
        kw["do_sample"] = False
    if with_logprobs:
        texts, ids, _, lps, ents = context.generate(prompts, return_logprobs=True, **kw)
    else:
        (texts, ids, _), lps, ents = context.generate(prompts, **kw), None, None
    return build(context, list(prompts), list(texts), list(ids), lps, ents, max_new_tokens=max_new_tokens)


def build(context, prompts, texts, ids, lps, ents, *, max_new_tokens: int) -> Rollout:
    """The Rollout of sampled responses: prompt + response rows collated on the device, the
    response mask, the per-response truncation flags and the sampler's values laid out."""
    tok = context.tokenizer
    eos = eos_set(tok)
    exs, cut = [], []
    for i, (p, r) in enumerate(zip(prompts, ids)):
        # cut at max_new_tokens without an EOS (the engines keep the first EOS and stop there)
        cut.append(len(r) >= max_new_tokens and int(r[-1]) not in eos)
        if not r:  # nothing but padding came out: score the EOS alone rather than an empty response
            ids[i] = r = [tok.eos_token_id]
        pid = tok(C.prompt_text(tok, p), add_special_tokens=False)["input_ids"]
        exs.append({"input_ids": pid + list(r), "labels": [C.IGNORE] * len(pid) + list(r)})
    batch = context.to_device(C.collate_lm(exs, tok.pad_token_id))
    rollout = Rollout(prompts, texts, ids, sum(cut), batch, batch["labels"][:, 1:] != C.IGNORE)
    rollout.truncated_rows = torch.tensor(cut, dtype=torch.bool, device=rollout.mask.device)
    rollout.sampler_logps = _on_response(rollout.mask, lps)
    rollout.sampler_entropy = _on_response(rollout.mask, ents)
    rollout._lps, rollout._ents = lps, ents
    return rollout


def subset(context, parts: list, *, max_new_tokens: int) -> Rollout:
    """One Rollout of chosen rows of several scored rollouts: parts = [(rollout, row indices)], in
    order (dynamic sampling's kept groups from several sampling rounds). Scores, truncation flags
    and baseline scores are carried over; the rows are collated afresh (widths differ)."""
    pick = [(r, i) for r, rows in parts for i in rows]
    lists = {k: [getattr(r, k)[i] for r, i in pick] for k in ("prompts", "texts", "response_ids")}
    with_lps = all(r._lps is not None for r, _ in pick)
    with_ents = all(r._ents is not None for r, _ in pick)
    out = build(context, lists["prompts"], lists["texts"], lists["response_ids"],
                [r._lps[i] for r, i in pick] if with_lps and pick else None,
                [r._ents[i] for r, i in pick] if with_ents and pick else None, max_new_tokens=max_new_tokens)
    out.scores = torch.stack([r.scores[i] for r, i in pick]) if pick else torch.zeros(0, device=context.device)
    if pick and all(r.baseline_scores is not None for r, _ in pick):
        out.baseline_scores = torch.stack([r.baseline_scores[i] for r, i in pick])
    return out


def _on_response(mask: torch.Tensor, per_response: list | None) -> torch.Tensor | None:
    """Per-response value tensors laid out on the response positions of mask [N, L-1] (0
    elsewhere); None when there are none or a response's count does not match its positions."""
    if per_response is None or [len(x) for x in per_response] != mask.sum(1).tolist():
        return None
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if per_response:
        out[mask] = torch.cat([x.float() for x in per_response]).to(mask.device)  # row-major, as mask is
    return out


@torch.no_grad()
def scores(context, rollout: Rollout, reward_fn=None, *, packed: bool = False) -> torch.Tensor:
    """[N] fp32 scores: reward_fn(prompt, response) when given, else the reward model's score of
    prompt + response (context.models["reward"]). Non-finite scores raise TrainingDivergedError
    before anything is updated. packed: the reward model's forward runs padding-free (data.packing)."""
    if reward_fn is not None:
        s = torch.tensor([float(reward_fn(p, r)) for p, r in zip(rollout.prompts, rollout.texts)],
                         dtype=torch.float32, device=context.device)
    elif "reward" in context.models:
        b = rollout.batch
        with context.autocast():
            s = context.models["reward"].score(b["input_ids"], b["attention_mask"], packed=packed).float()
    else:
        raise RuntimeError("no reward: give the algorithm a reward_fn or the trainer a 'reward' model")
    bad = (~torch.isfinite(s)).nonzero().flatten().tolist()
    if context.any_rank(bool(bad)):  # all ranks stop together (the next step is a collective)
        where = f"(last checkpoint: {context.last_checkpoint})"
        if not bad:
            raise TrainingDivergedError(f"step {context.step + 1}: non-finite reward(s) on another rank; the step "
                                        f"was not applied {where}")
        i = bad[0]
        raise TrainingDivergedError(
            f"step {context.step + 1}: {len(bad)} non-finite reward(s), e.g. {float(s[i])} for the response "
            f"{rollout.texts[i]!r} to {rollout.prompts[i]!r}; the step was not applied {where}")
    return s


@torch.no_grad()
def logps_of(context, model, batch, temperature: float, *, entropy: bool = False, packed: bool = False,
             fused_head: bool = True):
    """Per-token log-probs [N, L-1] (fp32, 0 off the response) of the rollout under `model`, in
    the run's precision, without gradients; with entropy=True also the per-token entropy;
    packed: padding-free (data.packing); fused_head: from the hidden states (token_logps)."""
    with context.autocast():
        out = token_logps(model, batch, temperature=temperature, return_entropy=entropy, packed=packed,
                          fused_head=fused_head)
    return out[:-1] if entropy else out[0]


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True position of each row of mask [N, T] (0 for an empty row)."""
    t = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, t, torch.zeros_like(t)).amax(1)


def minibatches(n: int, count: int, generator: torch.Generator) -> list[list[int]]:
    """A seeded permutation of range(n) cut into `count` near-equal mini-batches."""
    perm = torch.randperm(n, generator=generator).tolist()
    size = math.ceil(n / count)
    return [perm[i: i + size] for i in range(0, n, size)]


def select(tensors: dict, idx: list[int], micro: int) -> list[dict]:
    """Rows `idx` of every [N, ...] tensor in `tensors`, as micro-batches of `micro` rows, each
    cut to its longest row (right padding only)."""
    out = []
    for j in range(0, len(idx), micro):
        rows = torch.tensor(idx[j: j + micro], device=tensors["input_ids"].device)
        mb = {k: v.index_select(0, rows) for k, v in tensors.items()}
        width = int(mb["attention_mask"].sum(1).max())
        mb = {k: (v[:, :width] if k in ("input_ids", "attention_mask", "labels") else v[:, : width - 1])
              for k, v in mb.items()}
        out.append(mb)
    return out


def optimize_epochs(context, alg, data: dict, n: int, seed: int):
    """alg.config.ppo_epochs passes over `n` rollout rows in alg.config.mini_batches seeded
    mini-batches, one context.optimize step each (micro-batches of alg.config.micro_batch_size
    rows, default context.batch_size; alg.loss / alg.loss_units). Stops early when a step's approx-KL exceeds 1.5 *
    alg.config.target_kl: that step is applied, the remaining ones are skipped. Returns (the
    metrics averaged over the steps taken, the number of steps, whether it stopped early)."""
    cfg = alg.config
    gen = torch.Generator().manual_seed(seed)
    micro = cfg.micro_batch_size or context.batch_size
    steps, sums = 0, {}
    for _epoch in range(cfg.ppo_epochs):
        for idx in minibatches(n, cfg.mini_batches, gen):
            out = context.optimize(select(data, idx, micro), loss_fn=alg.loss, units_fn=alg.loss_units)
            steps += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            if cfg.target_kl is not None and out["approx_kl"] > 1.5 * cfg.target_kl:
                return {k: v / steps for k, v in sums.items()}, steps, True
    return {k: v / steps for k, v in sums.items()}, steps, False


def rollout_monitors(context, rollout: Rollout, proxy: torch.Tensor, *, kl=None, entropy=None, oracle_fn=None,
                     monitor=None) -> dict:
    """The monitors of monitors.py for this rollout (+ the over-optimisation flag
    when an oracle is available). Under torchrun, over every rank's samples (per-rank values
    averaged by sample count; distinct-n and correlations are per-rank values averaged)."""
    oracle = None
    if oracle_fn is not None:
        oracle = [float(oracle_fn(p, r)) for p, r in zip(rollout.prompts, rollout.texts)]
    out = rollout_metrics(responses_ids=rollout.response_ids, rewards=proxy, kl=kl, entropy=entropy,
                          oracle_scores=oracle, truncated=rollout.truncated)
    if context.world > 1:  # every rank's samples: means weighted by count, truncated summed
        n = len(rollout)
        out = context.reduce_weighted({k: v * n for k, v in out.items()}, {k: n for k in out})
        out["rollout/truncated"] = int(context.all_reduce([rollout.truncated])[0])
    if monitor is not None and oracle is not None:  # the same values on every rank: the same state
        out["overoptimisation"] = float(monitor.update(context.step + 1, out["rollout/reward"], out["rollout/oracle"]))
    return out


def step_seed(context) -> int:
    """The seed of this trainer step's sampling (a resumed run samples what the uninterrupted one
    did); +1 seeds its mini-batch order."""
    return context.derive_seed(STEP_SEED_FACTOR * (context.step + 1))


def response_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] mean of x [N, T] over each row's response positions (0 for an empty row)."""
    return sequence_logps(x, mask, reduce="mean")


@torch.no_grad()
def eval_rollout(alg, context, batch):
    """Eval for the online algorithms: one response per eval prompt, sampled at the training
    temperature with a fixed seed (the same prompts and noise at every evaluation), scored like
    the rollouts: (loss = -sum of scores, count, {"score", "oracle" with an oracle_fn, "length"})."""
    cfg = alg.config
    prompts = [r["prompt"] for r in batch["records"]]
    rollout = sample(context, prompts, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                     seed=context.seed + EVAL_SEED_OFFSET)
    score = scores(context, rollout, alg.reward_fn, packed=alg.packing)
    metrics = {"score": float(score.mean()), "length": sum(map(len, rollout.response_ids)) / len(rollout)}
    if alg.oracle_fn is not None:
        metrics["oracle"] = sum(alg.oracle_fn(p, r) for p, r in zip(prompts, rollout.texts)) / len(rollout)
    return -float(score.sum()), len(rollout), metrics
