"""The bundled synthetic instruction-following task and its programmatic oracle.

Four small tasks a tiny character-level model can learn on a CPU in minutes:

    reverse 3 1 4        -> 4 1 3
    sort 3 1 4           -> 1 3 4
    repeat ab 3          -> ab ab ab
    count 1 in 3 1 4 1   -> 2

and one multi-step family (STEP_TASKS), whose response is the solver's steps, one per line:

    countup 7 4          -> 7+1=8 / 8+1=9 / 9+1=0 / 0+1=1   (counting on mod 10; "/" = newline)

Step labels for process reward models: a step is correct iff it equals the solver's step at its
position (`Oracle.step_labels`); `SyntheticTask.step_labelled` writes step-labelled responses
with a controllable rate of responses carrying one mistake (a wrong sum or a wrong carried
value), which the following steps carry on from, as a solver that made it would. Each step
states its operand, so its own correctness is checkable at a glance (a successor table and one
comparison with the previous step's result).

The oracle plays the human/AI labeller. `Oracle.score` gives graded partial credit in [0, 1]
(position-wise matches over the longer of answer and response, so both wrong items and wrong
length cost), which makes the mean score an informative learning signal. `Oracle.prefer` turns
scores into pairwise preferences the way a labeller would, with the biases the field warns
about, each configurable: a noise rate (a random fraction of labels flipped), a length bias
(longer responses look better) and a style bias (responses ending in "!" look better).
The evaluation metric is always the unbiased `score`.

Reading a response (chat models add text; `response_items`, `response_count`): the answer must be
the response itself, but its formatting is not judged: items may be separated by spaces or commas,
and the whole may sit in brackets and end with a period ("[4, 1, 3]." reads as 4 1 3). Words
around a list are not removed: they are items, so they cost credit like wrong items. A count is
the response's only number ("3", "The answer is 3."); a response with no number or with several
("2 or 3") gets no credit, so hedging does not pay.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

TASKS = ("reverse", "sort", "repeat", "count")
STEP_TASKS = ("countup",)  # multi-step: not in TASKS, so the default task mix is unchanged
STEP_SEPARATOR = "\n"     # between the steps of a multi-step answer
WORDS = ("ab", "cat", "dog", "hi", "sun", "red", "zip", "ok", "yes", "map")


@dataclass
class SyntheticTask:
    """Generator of (prompt, answer) pairs; deterministic for a given seed."""

    tasks: tuple = TASKS
    min_items: int = 3
    max_items: int = 6
    digits: str = "0123456789"

    def make(self, rng: random.Random) -> tuple[str, str]:
        task = rng.choice(self.tasks)
        if task in STEP_TASKS:  # countup START N: N - 1 steps for min_items ... max_items items
            prompt = f"{task} {rng.choice(self.digits)} {rng.randint(self.min_items - 1, self.max_items - 1)}"
        elif task == "repeat":
            word, n = rng.choice(WORDS), rng.randint(2, 5)
            prompt = f"repeat {word} {n}"
        elif task == "count":
            items = [rng.choice(self.digits) for _ in range(rng.randint(self.min_items, self.max_items))]
            target = rng.choice(items) if rng.random() < 0.8 else rng.choice(self.digits)
            prompt = f"count {target} in {' '.join(items)}"
        else:
            items = [rng.choice(self.digits) for _ in range(rng.randint(self.min_items, self.max_items))]
            prompt = f"{task} {' '.join(items)}"
        return prompt, solve(prompt)

    def sample(self, n: int, seed: int = 0) -> list[dict]:
        """n records {"prompt", "answer"} (plain strings)."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            p, a = self.make(rng)
            out.append({"prompt": p, "answer": a})
        return out

    def demonstrations(self, n: int, seed: int = 0, error_rate: float = 0.0) -> list[dict]:
        """n SFT records in the canonical chat form {"messages": [user, assistant]}. With
        `error_rate`, that fraction of the demonstrations carries one mistake (see `corrupt`):
        demonstrators are imperfect, which is why comparisons (easier to give than perfect
        demonstrations) improve on SFT."""
        rng = random.Random(seed + 7919)
        out = []
        for r in self.sample(n, seed):
            answer = corrupt(r["answer"], rng) if error_rate > 0 and rng.random() < error_rate else r["answer"]
            out.append({"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": answer}]})
        return out


    def preference_pairs(self, n: int, oracle: "Oracle | None" = None, seed: int = 0) -> tuple[list[dict], int]:
        """n prompts, each with two candidate responses (the answer or corruptions of it: items
        dropped, added, swapped or changed), labelled by `oracle`. Needs no model: a quick
        preference set for tests and example configs. Returns (pairs, ties left out)."""
        oracle = oracle or Oracle(seed=seed)
        rng = random.Random(seed)
        prompts, a, b = [], [], []
        for r in self.sample(n, seed):
            prompts.append(r["prompt"])
            x = r["answer"] if rng.random() < 0.5 else corrupt(r["answer"], rng)
            a.append(x)
            b.append(corrupt(r["answer"], rng))
        return oracle.label_pairs(prompts, a, b)


    def unpaired_examples(self, n: int, oracle: "Oracle | None" = None, seed: int = 0,
                          desirable_rate: float = 0.5) -> list[dict]:
        """n unpaired records {"prompt", "completion", "label"} (KTO/BCO data, TRL's unpaired
        format): the completion is the answer (with probability desirable_rate) or a corruption
        of it, labelled by `oracle.label` -- desirable iff the oracle scores it correct, subject
        to the oracle's noise. Needs no model."""
        oracle = oracle or Oracle(seed=seed)
        rng = random.Random(seed + 104729)
        out = []
        for r in self.sample(n, seed):
            c = r["answer"] if rng.random() < desirable_rate else corrupt(r["answer"], rng)
            out.append({"prompt": r["prompt"], "completion": c, "label": oracle.label(r["prompt"], c)})
        return out


    def step_labelled(self, n: int, seed: int = 0, error_rate: float = 0.5) -> list[dict]:
        """n records in the stepwise format {"prompt", "completions": steps, "labels": bools} from
        the multi-step tasks among self.tasks. A fraction `error_rate` of the responses carries
        one mistake at a uniformly drawn step (`corrupt_steps`); the labels come from the
        oracle's solver (`Oracle.step_labels`): the steps before the mistake are correct, it
        and every later step (carrying its wrong value on) are not."""
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"step_labelled: error_rate must be in [0, 1], got {error_rate!r}")
        tasks = tuple(t for t in self.tasks if t in STEP_TASKS)
        if not tasks:
            raise ValueError(f"step_labelled: no multi-step task among {self.tasks}; multi-step tasks: {STEP_TASKS}")
        rng = random.Random(seed + 104729)
        out = []
        for r in dataclasses.replace(self, tasks=tasks).sample(n, seed):
            steps = solve_steps(r["prompt"])
            if rng.random() < error_rate:
                steps = corrupt_steps(r["prompt"], rng)
            out.append({"prompt": r["prompt"], "completions": steps, "labels": Oracle.step_labels(r["prompt"], steps)})
        return out


def solve_steps(prompt: str) -> list[str]:
    """The solver's steps for a multi-step task prompt (countup START N: N steps "a+1=c" with
    c = (a + 1) mod 10, a the previous step's c, the first a START); ValueError for any other."""
    parts = prompt.split()
    if len(parts) == 3 and parts[0] == "countup" and len(parts[1]) == 1 and parts[1].isdigit() and \
            parts[2].isdigit() and int(parts[2]) >= 1:
        return _countup_steps(int(parts[1]), int(parts[2]))
    raise ValueError(f"synthetic task: {prompt!r} is not a multi-step task prompt (multi-step tasks: {STEP_TASKS})")


def _countup_steps(start, n, wrong_at=None, kind=None, rng=None):
    acc, steps = start, []
    for j in range(n):
        a = acc
        if j == wrong_at and kind == "carry":  # carries a wrong value into this step
            a = rng.choice([d for d in range(10) if d != acc])
        c = (a + 1) % 10
        if j == wrong_at and kind == "sum":  # computes this step wrong
            c = rng.choice([d for d in range(10) if d != c])
        steps.append(f"{a}+1={c}")
        acc = c
    return steps


def corrupt_steps(prompt: str, rng: random.Random) -> list[str]:
    """The solver's steps with one mistake at a uniformly drawn step (a wrong result, or -- from
    the second step on -- a wrong value carried from the step before), the later steps carrying
    on from the wrong value."""
    n = len(solve_steps(prompt))  # validates the prompt
    k = rng.randrange(n)
    return _countup_steps(int(prompt.split()[1]), n, k, "sum" if k == 0 else rng.choice(("sum", "carry")), rng)


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong response: one random edit of the answer's items (dropped, added,
    swapped or changed), never the answer itself."""
    for _ in range(20):
        items = answer.split()
        op = rng.choice(("drop", "add", "swap", "change"))
        if op == "drop" and len(items) > 1:
            items.pop(rng.randrange(len(items)))
        elif op == "swap" and len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            items[i], items[j] = items[j], items[i]
        elif op == "add":
            items.insert(rng.randrange(len(items) + 1), rng.choice(items) if rng.random() < 0.5 else str(rng.randint(0, 9)))
        else:
            i = rng.randrange(len(items))
            items[i] = str(rng.randint(0, 9))
        out = " ".join(items)
        if out != answer:
            return out
    return answer + " " + answer.split()[-1]


def solve(prompt: str) -> str:
    """The correct answer to a task prompt; ValueError if the prompt is not one of the tasks."""
    parts = prompt.split()
    if not parts:
        raise ValueError("synthetic task: empty prompt")
    task, args = parts[0], parts[1:]
    if task == "reverse":
        return " ".join(reversed(args))
    if task == "sort":
        return " ".join(sorted(args))
    if task == "repeat" and len(args) == 2 and args[1].isdigit():
        return " ".join([args[0]] * int(args[1]))
    if task == "count" and len(args) >= 2 and args[1] == "in":
        return str(args[2:].count(args[0]))
    if task in STEP_TASKS:
        return STEP_SEPARATOR.join(solve_steps(prompt))
    raise ValueError(f"synthetic task: cannot parse prompt {prompt!r}")


def response_items(response: str) -> list[str]:
    """The items of a list answer: split on whitespace and commas, after removing a final period
    and brackets around the whole."""
    text = response.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if len(text) >= 2 and text[0] + text[-1] in ("[]", "()"):
        text = text[1:-1]
    return text.replace(",", " ").split()


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def response_count(response: str) -> int | None:
    """The count a response gives: its only number, if that is an integer; None otherwise (no
    number, several numbers, or a fraction)."""
    numbers = _NUMBER.findall(response)
    if len(numbers) != 1 or "." in numbers[0]:
        return None
    return int(numbers[0])


class Oracle:
    """Scores responses and labels preference pairs for the synthetic task.

    noise: probability that a preference label is flipped (labeller error).
    length_bias: utility bonus per whitespace-separated item of the response (verbosity bias).
    style_bias: utility bonus for a response ending in "!" (a surface-style bias).
    """

    def __init__(self, noise: float = 0.0, length_bias: float = 0.0, style_bias: float = 0.0, seed: int = 0):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"Oracle: noise must be in [0, 1], got {noise}")
        self.noise, self.length_bias, self.style_bias = noise, length_bias, style_bias
        self.rng = random.Random(seed)

    @staticmethod
    def score(prompt: str, response: str) -> float:
        """Graded correctness in [0, 1] (the unbiased ground truth): position-wise matches of the
        response's items over the longer of answer and response; for a count, 1 if exact, 1/2
        if off by one. How a response is read: the module docstring."""
        answer = solve(prompt)
        if prompt.startswith("count "):
            got = response_count(response)
            if got is None:
                return 0.0
            return {0: 1.0, 1: 0.5}.get(abs(got - int(answer)), 0.0)
        want, got = answer.split(), response_items(response)
        if not got:
            return 0.0
        hits = sum(a == b for a, b in zip(want, got))
        return hits / max(len(want), len(got))

    @staticmethod
    def step_labels(prompt: str, steps: list[str]) -> list[bool]:
        """Per step of a multi-step task's response: whether it equals the solver's step at its
        position (surrounding whitespace ignored). After a wrong step the solver's track is lost:
        a later step that computes right from a wrong carried value is still wrong, as in
        Math-Shepherd's labels (a step is good if the answer is still reachable from it)."""
        want = solve_steps(prompt)
        return [j < len(want) and s.strip() == want[j] for j, s in enumerate(steps)]

    def utility(self, prompt: str, response: str) -> float:
        """What the (biased) labeller perceives: score plus the configured biases."""
        u = self.score(prompt, response)
        u += self.length_bias * len(response.split())
        u += self.style_bias * float(response.rstrip().endswith("!"))
        return u

    def prefer(self, prompt: str, a: str, b: str) -> int | None:
        """0 if `a` is preferred, 1 if `b`, None for a tie (equal utility); noise flips a label."""
        ua, ub = self.utility(prompt, a), self.utility(prompt, b)
        if ua == ub:
            return None
        choice = 0 if ua > ub else 1
        if self.noise > 0 and self.rng.random() < self.noise:
            choice = 1 - choice
        return choice

    def label(self, prompt: str, response: str) -> bool:
        """The unpaired (KTO) label of one response: desirable iff the labeller perceives it as
        correct (utility >= 1, i.e. a correct answer without biases); noise flips it."""
        good = self.utility(prompt, response) >= 1.0
        if self.noise > 0 and self.rng.random() < self.noise:
            good = not good
        return good

    def best_worst(self, prompt: str, responses: list[str]) -> tuple[str, str] | None:
        """The labeller ranks K responses (as in InstructGPT's K-way comparisons) and reports its
        top and bottom one as (chosen, rejected); None when all look equally good. Noise flips
        the pair."""
        u = [self.utility(prompt, r) for r in responses]
        hi, lo = max(range(len(u)), key=u.__getitem__), min(range(len(u)), key=u.__getitem__)
        if u[hi] == u[lo]:
            return None
        if self.noise > 0 and self.rng.random() < self.noise:
            hi, lo = lo, hi
        return responses[hi], responses[lo]

    def all_pairs(self, prompt: str, responses: list[str]) -> tuple[list[dict], int]:
        """Every pair of K responses the labeller can tell apart (InstructGPT turns a ranking of
        K responses into its K(K-1)/2 comparisons), as preference records; each label is
        subject to the noise independently. Returns (pairs, ties left out)."""
        pairs, ties = [], 0
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                c = self.prefer(prompt, responses[i], responses[j])
                if c is None:
                    ties += 1
                    continue
                a, b = (responses[i], responses[j]) if c == 0 else (responses[j], responses[i])
                pairs.append({"prompt": prompt, "chosen": a, "rejected": b})
        return pairs, ties

    def label_pairs(self, prompts, responses_a, responses_b) -> tuple[list[dict], int]:
        """Preference records {"prompt", "chosen", "rejected"} from two responses per prompt.
        Ties carry no preference and are left out; their count is returned with the pairs."""
        pairs, ties = [], 0
        for p, a, b in zip(prompts, responses_a, responses_b, strict=True):
            c = self.prefer(p, a, b)
            if c is None:
                ties += 1
                continue
            chosen, rejected = (a, b) if c == 0 else (b, a)
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
        return pairs, ties
