"""Judges for online DPO (online_dpo.py): given a prompt and two responses, which is better.

Every judge answers, per pair, 0 (the first response is better), 1 (the second) or None (no
preference: a tie, which online DPO drops), and may give a per-response score [N, 2] for the logs:

    oracle        the synthetic task's Oracle (fastalign/data/synthetic.py) as labeller, with its
                  noise (a fraction of labels flipped), length_bias and style_bias, so that judge
                  bias can be studied; the noise is drawn from the step's seed (a resumed run
                  flips the same labels)
    reward_model  a reward model (model.reward: a ScalarHeadModel) scores prompt + response as it
                  was trained (the chat template's completion); the higher score wins, equal
                  scores tie
    fn            a Python function judge_fn(prompt, a, b) -> 0 | 1 | None: given to the
                  algorithm, or named by algo.judge_fn as "package.module:function" (or
                  "package.module.function") or a name registered with `register_judge_fn`
    llm           a language model as the judge ("AI feedback", RLAIF / self-rewarding): the model
                  of algo.judge_model (the frozen model.judge, the reference, or the policy being
                  trained) reads algo.judge_template filled with the prompt and both responses
                  and its next-token log-probs of the two answer labels ("A" / "B") are compared.
                  Position bias is cancelled by asking in both orders:
                      s(x, y) = log p(A | template(x, y)) - log p(B | template(x, y))
                      margin  = (s(a, b) - s(b, a)) / 2
                  margin > min_margin: a; < -min_margin: b; else a tie. A judge that always says
                  "A" (pure position bias) gives margin 0 on every pair. Swapping a and b negates
                  the margin exactly: the pair is always evaluated in one canonical order.

TRL 1.16's OnlineDPOTrainer takes `reward_funcs` (reward models or functions; the higher reward
wins, ties go to the first completion; `missing_eos_penalty` is subtracted from responses without
EOS); older TRL releases had pairwise judges (`BasePairwiseJudge.judge(prompts,
completion_pairs, shuffle_order)` -> index of the better completion; PairRM and LLM judges that
shuffle the order at random rather than evaluate both). Here ties are dropped, not given to the
first response, and responses cut without EOS are handled by online DPO (algo.truncated).
"""

from __future__ import annotations

import importlib
import math

import torch

from fastalign.algorithms.base import token_logps
from fastalign.algorithms.context import TrainingDivergedError
from fastalign.data import collate as C
from fastalign.data.synthetic import Oracle
from fastalign.errors import ConfigError

JUDGES = ("oracle", "reward_model", "fn", "llm")

DEFAULT_TEMPLATE = ("Which response answers the prompt better? Answer A or B.\n"
                    "Prompt: {prompt}\nResponse A: {a}\nResponse B: {b}")

# ---- judge functions: a registry, so a config can name one -----------------------------------------

JUDGE_FNS: dict = {}


def register_judge_fn(name: str):
    """Decorator: registers judge_fn(prompt, a, b) -> 0 | 1 | None under `name` (algo.judge_fn: name)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_judge_fn: name must be a non-empty string, got {name!r}")

    def deco(fn):
        if not callable(fn):
            raise TypeError(f"register_judge_fn({name!r}): expected a callable, got {fn!r}")
        if name in JUDGE_FNS and JUDGE_FNS[name] is not fn:
            raise ValueError(f"judge function {name!r} is already registered")
        JUDGE_FNS[name] = fn
        return fn

    return deco


@register_judge_fn("longer")
def prefer_longer(prompt: str, a: str, b: str):
    """Prefers the response with more whitespace-separated items (a pure verbosity judge)."""
    na, nb = len(a.split()), len(b.split())
    return None if na == nb else (0 if na > nb else 1)


def resolve_judge_fn(spec: str):
    """The function `spec` names: a registered name, "module:attr" or "module.attr"."""
    if spec in JUDGE_FNS:
        return JUDGE_FNS[spec]
    module, sep, attr = spec.partition(":")
    if not sep:
        module, _, attr = spec.rpartition(".")
    known = f"registered: {', '.join(sorted(JUDGE_FNS))}; or a dotted path package.module:function"
    if not module or not attr:
        raise ConfigError(f"algo.judge_fn: {spec!r} is neither a registered judge function nor a dotted path ({known})")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"algo.judge_fn: cannot import {spec!r} ({type(e).__name__}: {e}); {known}") from None
    if not callable(obj):
        raise ConfigError(f"algo.judge_fn: {spec!r} is not callable ({obj!r})")
    return obj


# ---- the judges ------------------------------------------------------------------------------------


class Judge:
    """judge(context, prompts, a, b, seed=) -> (choices: list of 0 | 1 | None, scores [N, 2] or None)."""

    role: str | None = None  # the model role the judge reads from context.models (None: none)

    def judge(self, context, prompts, a, b, *, seed: int):
        raise NotImplementedError


class OracleJudge(Judge):
    def __init__(self, noise: float = 0.0, length_bias: float = 0.0, style_bias: float = 0.0):
        Oracle(noise, length_bias, style_bias)  # checks the settings
        self.settings = (noise, length_bias, style_bias)

    def judge(self, context, prompts, a, b, *, seed):
        oracle = Oracle(*self.settings, seed=seed)
        choices = [oracle.prefer(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
        scores = torch.tensor([[oracle.utility(p, x), oracle.utility(p, y)] for p, x, y in zip(prompts, a, b)],
                              dtype=torch.float32).reshape(len(prompts), 2)
        return choices, scores


class FnJudge(Judge):
    def __init__(self, fn, name: str = "judge_fn"):
        if not callable(fn):
            raise TypeError(f"{name} must be callable (prompt, a, b) -> 0 | 1 | None, got {fn!r}")
        self.fn, self.name = fn, name

    def judge(self, context, prompts, a, b, *, seed):
        out = []
        for p, x, y in zip(prompts, a, b, strict=True):
            c = self.fn(p, x, y)
            if c is not None and (isinstance(c, bool) or c not in (0, 1)):
                raise TypeError(f"{self.name} must return 0 (the first response is better), 1 (the second) or None "
                                f"(no preference); got {c!r} for the prompt {p!r}")
            out.append(None if c is None else int(c))
        return out, None


def _prompt_str(prompt) -> str:
    """A prompt as text for a judge's question: chat prompts (message lists) as their contents."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def _rows(tok, prompts, completions, labelled: bool):
    """collate_lm rows of prompt_text(prompt) + completion ids (labels on the completion)."""
    exs = []
    for p, comp in zip(prompts, completions):
        pid = tok(C.prompt_text(tok, p), add_special_tokens=False)["input_ids"]
        cid = tok(comp, add_special_tokens=False)["input_ids"]
        exs.append({"input_ids": pid + cid, "labels": ([C.IGNORE] * len(pid) + cid) if labelled else pid + cid})
    return C.collate_lm(exs, tok.pad_token_id)


class RewardModelJudge(Judge):
    role = "reward"

    def __init__(self, packed: bool = False):
        self.packed = packed

    @torch.no_grad()
    def judge(self, context, prompts, a, b, *, seed):
        tok, n = context.tokenizer, len(prompts)
        # prompt + the completion as the reward model was trained on it (the template's end of turn)
        texts = [C.completion_text(tok, p, r) for p, r in zip(prompts + prompts, list(a) + list(b))]
        batch = context.to_device(_rows(tok, prompts + prompts, texts, labelled=False))
        with context.autocast():
            s = context.models["reward"].score(batch["input_ids"], batch["attention_mask"], packed=self.packed).float()
        if not torch.isfinite(s).all():
            i = int((~torch.isfinite(s)).nonzero()[0])
            raise TrainingDivergedError(f"step {context.step + 1}: the reward-model judge gave a non-finite score "
                                        f"{float(s[i])} to {texts[i]!r}; the step was not applied")
        scores = torch.stack([s[:n], s[n:]], 1).cpu()
        choices = [None if x == y else (0 if x > y else 1) for x, y in scores.tolist()]
        return choices, scores


class LLMJudge(Judge):
    def __init__(self, role: str = "judge", template: str = DEFAULT_TEMPLATE, labels=("A", "B"),
                 min_margin: float = 0.0, batch_size: int | None = None):
        try:
            template.format(prompt="", a="", b="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"algo.judge_template must be a format string with the fields {{prompt}}, {{a}} and "
                              f"{{b}} only; {template!r}: {type(e).__name__}: {e}") from None
        if not all(f"{{{k}}}" in template for k in ("prompt", "a", "b")):
            raise ConfigError(f"algo.judge_template must contain {{prompt}}, {{a}} and {{b}}; got {template!r}")
        labels = tuple(labels)
        if len(labels) != 2 or not all(isinstance(x, str) and x for x in labels) or labels[0] == labels[1]:
            raise ConfigError(f"algo.judge_labels must be two different non-empty strings, got {list(labels)!r}")
        if not (isinstance(min_margin, (int, float)) and math.isfinite(min_margin) and min_margin >= 0):
            raise ConfigError(f"algo.judge_min_margin must be a finite number >= 0, got {min_margin!r}")
        self.role, self.template, self.labels = role, template, labels
        self.min_margin, self.batch_size = float(min_margin), batch_size

    @torch.no_grad()
    def margins(self, context, prompts, a, b) -> torch.Tensor:
        """[N] fp32 margin of each pair (> 0: a is better), position bias cancelled (module docstring)."""
        tok, model = context.tokenizer, context.models[self.role]
        flip = [y < x for x, y in zip(a, b)]  # one canonical order per pair: exact antisymmetry
        first = [y if f else x for x, y, f in zip(a, b, flip)]
        second = [x if f else y for x, y, f in zip(a, b, flip)]
        qs, answers = [], []
        for p, x, y in zip(prompts, first, second):
            for u, v in ((x, y), (y, x)):
                q = self.template.format(prompt=_prompt_str(p), a=u, b=v)
                qs += [q, q]
                answers += list(self.labels)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        out, rows = [], 4 * (self.batch_size or context.batch_size)
        for i in range(0, len(qs), rows):
            batch = context.to_device(_rows(tok, qs[i: i + rows], answers[i: i + rows], labelled=True))
            if limit is not None and batch["input_ids"].shape[1] > limit:
                raise ValueError(f"llm judge: a judge prompt is {batch['input_ids'].shape[1]} tokens, more than the "
                                 f"judge model's {limit} positions; shorten algo.judge_template or "
                                 "algo.max_new_tokens")
            with context.autocast():
                logps, mask = token_logps(model, batch)
            out.append(logps.float().mul(mask).sum(1))  # log p(label | question), summed over its tokens
        lp = torch.cat(out).view(-1, 2, 2)  # [pair, order, label]
        s = lp[..., 0] - lp[..., 1]  # [pair, order]: A over B
        m = (s[:, 0] - s[:, 1]) / 2  # canonical (first, second): > 0 means `first` is better
        sign = torch.tensor([-1.0 if f else 1.0 for f in flip], device=m.device)
        return (m * sign).cpu()

    def judge(self, context, prompts, a, b, *, seed):
        if not prompts:
            return [], None
        m = self.margins(context, prompts, a, b)
        choices = [None if abs(x) <= self.min_margin else (0 if x > 0 else 1) for x in m.tolist()]
        return choices, torch.stack([m / 2, -m / 2], 1)


def build_judge(cfg, judge_fn=None, *, packed: bool = False) -> Judge:
    """The judge of an online_dpo config (OnlineDPOConfig); judge_fn: a callable given in Python."""
    kind = cfg.judge
    if kind == "oracle":
        return OracleJudge(cfg.oracle_noise, cfg.oracle_length_bias, cfg.oracle_style_bias)
    if kind == "reward_model":
        return RewardModelJudge(packed=packed)
    if kind == "fn":
        if judge_fn is None and not cfg.judge_fn:
            raise ConfigError("algo.judge: fn needs algo.judge_fn (a registered name or package.module:function) "
                              "or a judge_fn given to the algorithm")
        if judge_fn is not None and cfg.judge_fn:
            raise ConfigError("algo.judge_fn is set and a judge_fn was given to the algorithm: give one")
        return FnJudge(judge_fn if judge_fn is not None else resolve_judge_fn(cfg.judge_fn))
    if kind == "llm":
        return LLMJudge(cfg.judge_model, cfg.judge_template, cfg.judge_labels, cfg.judge_min_margin)
    raise ConfigError(f"algo.judge must be one of {', '.join(JUDGES)}; got {kind!r}")

