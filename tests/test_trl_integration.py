"""fastalign.integrations.trl.patch_trl against stock TRL: real trainer steps, both ways.

A tiny Llama (built from a config, no download) is trained for 2 steps by TRL's own DPOTrainer,
once stock and once under `use_fastalign()`, from identical weights and seeds, fp32 on the CPU.
Compared: the loss and every logged metric, the gradients seen by the optimizer at each step,
and the updated parameters. A counting wrapper around `fastalign.linear_gather_logprobs` proves
the patched run really went through fastalign (and the stock run did not).

Bounds (derived, see tests/numerics.py for the primitives). At a step's start both runs hold the same
weights, so their forward activations are the same bits (same code, same inputs, same process); only the head
(fastalign's fused log-softmax vs TRL's chunked one) and what flows back from it differ. Hooks on every
nn.Linear / RMSNorm / embedding and on the fused-head seam capture, per parameter, the magnitude of what its
gradient sums: M = |delta|^T |X| (float64; delta the gradient into the Linear's output, X its input; the
head's |dlogits|^T |h| with |dlogits| <= |c| (p + onehot)). Each run's gradient errs by at most
(K_fp32 u_fp32 + K_bf16 u_bf16) M, K counting the relative roundings on the backward path from the loss down
to that parameter (_path_roundings: gamma_k per matmul / reduction, EXP_ULPS per exp, one u_bf16 per bf16
tensor under autocast); two runs differ by twice that. From the second step the weights differ by the first
update's difference: each matmul's terms move by at most rho = (|X||dW|^T)/(|X||W|^T) (and the backward
twin), a relative perturbation on every path through it (_rho). Weights: the SGD updates' bounds (lr times
the clipped-gradient bound, clipping's scale difference from ||dG|| / ||G||) plus each update's rounding.
Per-token head values (_head_call_bounds): each side's fp32 log-softmax within logprob_bounds
(tests/test_logprobs.py: argument roundings, EXP_ULPS per exp, online rescales, gamma_V per V-term sum) of the
exact value of its logits, whose GEMM adds gamma_H |h||W| (+ u_bf16 (|z| + that) for a bf16 logits tile);
TRL's kernel also rounds log_z = m + log S and forms H = log_z - sum e^d z / S, whose terms z_j (not z_j - m)
carry |m| times the stats' relative error (_trl_stats_error); the difference of the two heads is the sum of
both bounds (+ 2 rho max|h||W| on log p once the weights differ). Logged metrics: those per-token bounds times
each metric's slope in them (DPO: summed over the scored tokens, beta for rewards, ...; GRPO / RLOO, see
_online_bounds: kl = e^x - x - 1 or old - ref, the loss through the advantages and importance ratios), means
over tokens via _mean_bound (largest per-token bound, the sum's gamma_n, the division), each run's own fp32
roundings counted twice. The functional adapters (selective_log_softmax & co.) and FusedLMHead against TRL's
kernel: every output and gradient within the sum of fastalign's bound (logprob_bounds / linear_bounds,
tests/test_linear_logprobs.py) and TRL's (_eager_pair_bounds, _trl_kernel_bounds: TRL's own extra roundings
written out); the CUDA Triton comparison the same with GPU rescales and bf16 roundings. Exact: whatever both
runs take from TRL's own code on the same inputs (log_sum_sq_probs, mean_logits and is_top1 in the direct
FusedLMHead test, soft-capping and mixed-dtype fallbacks), rewards / counters / lengths, GRPO's advantages, the
clip ratios (GRPO's ratio is exp(l - l.detach()) = 1 exactly; RLOO's is bounded inside the clip range in both
runs), 0/1 accuracies (not derived: they flip only if a margin / top-1 gap is within its bound, none is here).
These are worst cases (measured: fp32 gradients ~5 u_fp32 M apart, bf16 ~7 u_bf16 M, bounds ~3000 u_fp32 M and
~28-56 u_bf16 M; head values and metrics 10-1000x below their bounds); a head gradient off by 1% fails the fp32
tests (55x its bound), off by 10% the bf16 one (2x), log-probs off by 5% all three; in the direct tests log-probs
off by 1e-3, entropies by 1e-3 or gradients by 1% fail (2-20000x). GRPO / RLOO are invariant to a log-prob
offset common to all tokens (KL and ratios are differences): there a log-prob scale error of 1e-3 fails the
gradients, an entropy off by 1e-3 the entropy metric. The bound model is first order and treats each rounding
as a relative perturbation of the value it rounds (a delta that cancels to near 0 is covered only through M's
sum over tokens). Thresholds that are not tolerances: the DPO loss must differ from log 2 and the weights must
move (preconditions that the comparison is not trivial).
"""

import os

# Nothing may reach the network: set before TRL / transformers / datasets are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import contextlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

hf_trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl==1.16.0)")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (TRL needs it)")

import fastalign  # noqa: E402
from fastalign.integrations import trl as fa_trl  # noqa: E402
from fastalign.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402
from fastalign import _backends  # noqa: E402
from tests.numerics import EXP_ULPS, f64, assert_within, gamma, sum_bound, unit_roundoff  # noqa: E402
from tests.test_linear_logprobs import linear_bounds  # noqa: E402
from tests.test_logprobs import logprob_bounds, rescales  # noqa: E402

trl_utils = pytest.importorskip("trl.trainer.utils")

U32, U_BF16 = unit_roundoff(torch.float32), unit_roundoff(torch.bfloat16)
FN = 2 * EXP_ULPS * U32  # one exp/log: EXP_ULPS ulps, one ulp <= 2u|x|


def _trl_stats_error(z, arg_err, n_rescales):
    """Per row of fp64 logits z [N, V]: (u |lse|, extra entropy error) of TRL's fused head on top of
    logprob_bounds' model (which is log p = (z_y - m) - log S and H = log S - t / S, t = sum e^d_j d_j).
    TRL forms log_z = fl(m + log S) (one more rounding, u |lse|, on log p and on H) and
    H = log_z - xs / S with xs = sum_j e^d_j z_j: its terms are z_j, not d_j = z_j - m, so the m S part of xs
    carries the errors that the kernel form never sees: each e^d_j's relative error (at most
    r = expm1(max_j alpha_j + (R + 1)(F + u)), alpha_j = 5u|d_j| + u|z_j| + arg_err_j, R online rescales), the
    sum's gamma(V) and 2u per rescale, the division by S (rel_S <= r + gamma(V)(1 + r)) and the quotient's
    rounding, all times |m|: extra = u |lse| + |m| ((r + gamma(V) + 2 (R + 1) u + rel_S) / (1 - rel_S) + u)."""
    z = f64(z)
    m = z.max(-1).values
    d = z - m[:, None]
    alpha = 5 * U32 * d.abs() + U32 * z.abs() + f64(arg_err)
    r = torch.expm1(alpha.amax(-1) + (n_rescales + 1) * (FN + U32))
    gam = gamma(z.shape[-1])
    rel_s = r + gam * (1 + r)
    lse_u = U32 * torch.logsumexp(z, -1).abs()
    return lse_u, lse_u + m.abs() * ((r + gam + 2 * (n_rescales + 1) * U32 + rel_s) / (1 - rel_s) + U32)


def _head_call_bounds(c, rho=0.0):
    """For one recorded fused-head call c (fp64 logits z = s h W^T / T of the operands both heads multiply),
    per scored token: bounds on |log p_fastalign - log p_TRL| and |H_fastalign - H_TRL|, and the per-logit
    error dz of one head's logits (each side's own GEMM; used by the logits/* metrics).
    Each head's logits carry arg = gamma_H |h||W| s / T (fp32 accumulation of the same H products, any blocking;
    under bf16 autocast both multiply the same bf16-rounded operands, and their bf16 logits tile rounds once
    more: u_bf16 (|z| + arg)); a scale or temperature != 1 rounds z up to 3 more times (fl(1/T), two products):
    3u|z|. fastalign: logprob_bounds on those logits (its backend's online rescales); TRL: logprob_bounds with
    its chunk's rescales (ceil(V / chunk) - 1) plus _trl_stats_error. The bound is the sum of the two. The
    trained model's calls at a later step see weights that differ by the earlier updates: every logit moves by
    <= rho |h||W| (_rho): log p_y by <= 2 rho max_j |h||W|_j (|dz_y| + max |dz|), H by
    sum_j p_j |z_j - E z| dz_j (dH/dz_j = -p_j (z_j - E z); first order)."""
    z, zabs, y = c["z"], c["zabs"], c["targets"]
    vocab = z.shape[-1]
    arg = gamma(c["H"]) * zabs
    if c["low"]:
        arg = arg + U_BF16 * (z.abs() + arg)
    if c["s"] != 1.0:
        arg = arg + 3 * U32 * z.abs()
    backend = _backends.resolve("auto", torch.device("cpu"), op="linear_gather_logprobs")
    dtype = torch.bfloat16 if c["low"] else torch.float32
    fa = logprob_bounds(z, y, rescales=rescales(backend, vocab, dtype), arg_err=arg)
    n_resc = -(-vocab // c["chunk"]) - 1
    trl = logprob_bounds(z, y, rescales=n_resc, arg_err=arg)
    lse_u, ent_x = _trl_stats_error(z, arg, n_resc)
    lp_b = fa.lp_err + trl.lp_err + lse_u
    ent_b = fa.ent_err + trl.ent_err + ent_x
    if rho:
        dz = rho * zabs
        p = torch.softmax(z, -1)
        ez = (p * z).sum(-1, keepdim=True)
        lp_b = lp_b + 2 * dz.amax(-1)
        ent_b = ent_b + (p * (z - ez).abs() * dz).sum(-1)
    return lp_b, ent_b, arg
SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
SEQ_LEN = 32  # an upper bound on the tokenized prompt + completion lengths of PAIRS (at most ~15 characters)

PAIRS = {
    "prompt": ["ab", "hello ", "x=", "q:", "sum 2+2=", "hi", "color:", "say yes:"],
    "chosen": ["cd", "world", "12", "yes", "4", "there", "red", "yes"],
    "rejected": ["zz", "there!", "9", "no no", "five", "?", "blue sky", "no"],
}


@pytest.fixture(autouse=True)
def _always_unpatched():
    fa_trl.unpatch_trl()
    yield
    fa_trl.unpatch_trl()


def _train(trainer, recorder, patched, model):
    """trainer.train(), patched with fastalign or stock: (loss logs, recorded gradients, weights).
    TRL's fused-head seam is wrapped by _HeadProbe (after patching, so it wraps whichever head runs)."""
    with (fa_trl.use_fastalign() if patched else contextlib.nullcontext()):
        inner = trl_utils._ChunkedLogProbFunction
        trl_utils._ChunkedLogProbFunction = _HeadProbe(inner, recorder)
        try:
            trainer.train()
        finally:
            trl_utils._ChunkedLogProbFunction = inner
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, recorder, {n: p.detach().clone() for n, p in model.named_parameters()}


class _GradRecorder:
    """TrainerCallback: per step, the weights at its start, the gradients the optimizer is about to apply,
    and (hooks, float64) the magnitude of what each gradient sums: M = sum over its terms of |term|:
    nn.Linear weight: |delta|^T |X| (delta: gradient into the Linear's output, X: its input, over tokens);
    RMSNorm weight: sum_t |delta_t| |x_hat_t|; embedding rows: sum of |delta| of their lookups, plus the
    fused head's |dlogits|^T |h| (added by _HeadProbe). lin: the (|X|, |delta|) of each Linear, for rho."""

    def __init__(self):
        self.grads, self.mags, self.starts, self.heads, self.lin = [], [], [], [], []
        self.inputs, self.rewards = [], []  # online trainers: what each step's loss / advantages came from

    def __getattr__(self, name):  # every other TrainerCallback event: no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.names = {id(p): n for n, p in model.named_parameters()}
        for name, mod in model.named_modules():
            kind = type(mod).__name__
            if kind in ("Linear", "Embedding") or kind.endswith("RMSNorm"):
                mod.register_forward_hook(self._hook(name + ".weight", kind))

    def add(self, key, m):
        self.cur[key] = self.cur.get(key, 0) + m

    def _hook(self, key, kind):
        def forward_hook(mod, inp, out):
            if not out.requires_grad:  # the reference model's / generation's / a no-grad checkpoint pass
                return
            x = inp[0].detach()

            def grad_hook(g):
                d = g.detach().double().abs().reshape(-1, g.shape[-1])
                if kind == "Linear":
                    X = x.double().abs().reshape(-1, x.shape[-1])
                    self.add(key, d.T @ X)
                    self.lin_cur.setdefault(key, []).append((X, d))
                elif kind == "Embedding":
                    self.add(key, torch.zeros(mod.weight.shape, dtype=torch.float64).index_add_(0, x.reshape(-1), d))
                else:
                    xd = x.double().reshape(-1, x.shape[-1])
                    self.add(key, (d * (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)).abs()).sum(0))
            out.register_hook(grad_hook)
        return forward_hook

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.starts.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self.cur, self.lin_cur, self.head_cur = {}, {}, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        self.mags.append(self.cur)
        self.lin.append(self.lin_cur)
        self.heads.append(self.head_cur)


class _HeadProbe:
    """Wraps TRL's fused-head seam (stock ChunkedLogProbFunction or fastalign's FusedLMHead), changing nothing:
    records each call's float64 logits z, their magnitudes |h||W|^T and targets, and on the backward adds the
    head's M = |dlogits|^T |h| to the tied weight, with |dlogits_tv| <= |c_t| (p_tv + [v = y_t]) (c: the
    gradient into the log-prob)."""

    def __init__(self, inner, recorder):
        self.inner, self.rec = inner, recorder

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, scale=1.0, outputs=()):
        res = self.inner.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, scale, outputs)
        s = scale / temperature
        # the operands both heads multiply: under autocast each rounds h and W to the autocast dtype first
        low = torch.is_autocast_enabled(hidden.device.type)
        dt = torch.get_autocast_dtype(hidden.device.type) if low else hidden.dtype
        h, w = hidden.detach().to(dt).double(), weight.detach().to(dt).double()
        z, zabs = s * h @ w.T, s * h.abs() @ w.abs().T
        self.rec.head_cur.append(dict(z=z, zabs=zabs, habs=h.abs(), targets=targets.clone(), grad=res[0].requires_grad,
                                      H=h.shape[-1], low=low and dt != torch.float32, s=s, chunk=chunk_size,
                                      policy=id(weight) in self.rec.names))
        if res[0].requires_grad:
            key = self.rec.names[id(weight)]

            def grad_hook(c):
                hot = torch.nn.functional.one_hot(targets.clamp(min=0), z.shape[-1]).double()
                dl = s * c.detach().double().abs()[:, None] * (torch.softmax(z, -1) + hot)
                self.rec.add(key, dl.T @ h.abs())
            res[0].register_hook(grad_hook)
        return res


def _path_roundings(name, cfg, n_tok, seq_len, vocab, zabs, low):
    """(K_fp32, K_low): how many relative roundings (units of u_fp32, u_bf16) lie on the backward path from the
    loss to the gradient `name`, per run. Derivation (first order, one run; the forward activations at a step's
    start are the same bits in both runs: same code on the same inputs -- only the head and what flows back
    from it differs):
      head: logits h W^T, k = H, absolute error gamma_H |h||W| -> relative on p <= 2 H max|h||W| u; logsumexp
        and its recomputation in the backward: V terms + EXP_ULPS each, twice; the loss from the sequence
        log-probs: T-term sums and ~20 elementwise ops; dh = dlogits W: k = V;
      each decoder layer the path crosses: o/down/q/k/v input gradients (k = H each, 5H), gate/up (k = I, 2I),
        two RMSNorm backwards (H-term reductions, 2H), attention backward (P^T dO, dP V^T, softmax, k = T, 3T),
        ~20 elementwise ops (SiLU, products, RoPE, residual adds);
      the weight gradient itself: a sum over n_tok tokens.
    Under bf16 autocast, in addition, every bf16 tensor the path crosses is one bf16 rounding: head 3 (TRL's
    logits-gradient tile, fastalign's bf16 hidden / weight gradients), per layer 12 (outputs of the 7 Linears'
    input gradients, SiLU/product/RoPE/SDPA gradients in bf16), the weight gradient's bf16 output 1.
    Layers counted: those from the top down to the parameter's own (the embedding: all)."""
    H, I, L = cfg
    layer = 7 * H + 2 * I + 3 * seq_len + 20
    depth = L - int(name.split(".")[2]) if ".layers." in name else (L if "embed" in name else 0)
    k32 = 2 * H * zabs + 2 * (vocab + EXP_ULPS) + 2 * seq_len + 20 + vocab + depth * layer + n_tok
    return k32, (4 + 12 * depth if low else 0)


def _rho(rec_p, rec_s, step):
    """The relative perturbation of every matmul at `step` caused by the two runs' different weights (earlier
    steps' updates differed): for each Linear, the worst ratio over tokens of (|X||dW|^T) / (|X||W|^T) (its
    output) and (|delta||dW|) / (|delta||W|) (its input gradient); for the tied head/embedding the same with the
    head's |h|. A weight that differs by dW perturbs each product of the matmul by at most that fraction of the
    terms' magnitude: it acts like one more relative rounding of size rho on every path through it, forward and
    backward. Returns the sum over all weights (every path crosses each at most once each way)."""
    if step == 0:
        return 0.0
    total = 0.0
    for name, pairs in rec_p.lin[step].items():
        w = rec_s.starts[step][name].double()
        dw = (rec_p.starts[step][name].double() - w).abs()
        for X, d in pairs:
            total += max(((X @ dw.T) / (X @ w.abs().T)).max().item(), ((d @ dw) / (d @ w.abs())).max().item())
    for name in rec_s.starts[step]:
        if "embed" in name or "norm" in name:  # elementwise roles: rows looked up / scales
            w = rec_s.starts[step][name].double()
            dw = (rec_p.starts[step][name].double() - w).abs()
            used = dw.reshape(dw.shape[0], -1).sum(-1) > 0
            if "embed" in name:  # the tied head, per logit, and the lookup, per row
                for c in rec_p.heads[step]:
                    total += ((c["habs"] @ dw.T) / (c["habs"] @ w.abs().T)).max().item()
                total += (dw.sum(-1)[used] / w.abs().sum(-1)[used]).max().item() if used.any() else 0.0
            else:
                total += (dw / w.abs()).max().item()
    return total


def _run_dpo(tmp_path, patched, **config):
    from trl import DPOConfig, DPOTrainer

    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0, **SMALL)
    ref = tiny_model(tok, seed=1, **SMALL)  # another model: the first step's loss is not log 2
    args = DPOConfig(output_dir=str(tmp_path / ("patched" if patched else "stock")), per_device_train_batch_size=4,
                     max_steps=2, learning_rate=0.5, optim="sgd", report_to="none", logging_steps=1, use_cpu=True,
                     seed=0, data_seed=0, save_strategy="no", disable_tqdm=True, **config)
    recorder = _GradRecorder()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_dict(PAIRS),
                         processing_class=tok, callbacks=[recorder])
    return _train(trainer, recorder, patched, model)


@pytest.fixture
def lgl_calls(monkeypatch):
    """Counts calls of fastalign.linear_gather_logprobs (looked up on the module at each call)."""
    calls = []
    real = fastalign.linear_gather_logprobs

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastalign, "linear_gather_logprobs", counting)
    return calls


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_trainer_step_matches_stock(tmp_path, lgl_calls, loss_type):
    _compare_dpo(tmp_path, lgl_calls, dict(loss_type=[loss_type], beta=0.1, bf16=False))


def test_dpo_trainer_step_bf16_autocast_matches_stock(tmp_path, lgl_calls):
    """TRL's default (bf16=True): on the CPU too, the step runs under bf16 autocast: every Linear multiplies
    bf16-rounded operands (oneDNN, fp32 accumulation) and returns bf16, so each gradient flowing back through the
    body is a bf16 tensor, rounded once per op (u_bf16 = 2^-8 relative). TRL rounds the head's logits-gradient
    tile to bf16; fastalign keeps it fp32 and rounds the bf16 hidden / weight gradients it returns. Bound per
    gradient element: 2 (K_bf16 u_bf16 + K_fp32 u_fp32) (|delta|^T |X|), K_bf16 = 4 (head: TRL's tile, fastalign's
    two outputs, the weight gradient's own bf16 output) + 12 per layer between the head and the parameter (7
    Linear input gradients, SiLU, product, RoPE and SDPA gradients), both runs: x2; from step 2 plus 2 rho M.
    (Was: rtol 2^-7, atol 2^-7 max|G| -- fitted, it failed on an Intel AVX-512 CPU by 1.2x at one element of
    layers.1.mlp.up_proj: a bound scaled by the tensor's largest gradient, not by what that element sums.) Forward values only see the same
    bf16 operands: the fp32 per-token bound there."""
    _compare_dpo(tmp_path, lgl_calls, dict(loss_type=["sigmoid"], beta=0.1))


def _token_bound(calls, rho):
    """Per fused-head call, the sum over its scored tokens of how far the two heads' log-probs may be apart
    (_head_call_bounds; rho only for the trained model's calls: the reference model's weights are the same in
    both runs), summed over all scored tokens (an upper bound for any one sequence's sum), plus a T-term sum's
    2 gamma_T sum |logp_t|."""
    out = []
    for c in calls:
        keep = c["targets"] >= 0
        lp_b = _head_call_bounds(c, rho if c["policy"] else 0.0)[0]
        logp = torch.log_softmax(c["z"], -1).gather(-1, c["targets"].clamp(min=0)[:, None])[:, 0]
        out.append((lp_b[keep].sum() + sum_bound(logp[keep].abs().sum(), int(keep.sum()))).item())
    return out


def _mean_bound(tok_b, vals, metric):
    """|mean_p - mean_s| for a metric that is the mean over some of a call's tokens (sum / count, each run in
    fp32): at most the largest per-token bound tok_b (a mean of bounded differences), the sum's 2 gamma_n
    sum|x| / count <= 2 gamma_n max|x|, and each run's division u |metric|."""
    return (tok_b.max() + sum_bound(vals.abs().max(), vals.numel())).item() + 2 * U32 * abs(metric)


def _check_steps(rec_s, rec_p, logs_s, logs_p, params_s, low, lr, max_norm=1.0):
    """Every step's gradients within (2 (K_fp32 u_fp32 + K_bf16 u_bf16) + 2 rho) M (see _path_roundings, _rho),
    and the weight drift that the steps' SGD updates allow. Returns per step (rho, bounds, ||G||, ||bound||, P)
    and the drift bound."""
    cfg = (SMALL["hidden_size"], SMALL["intermediate_size"], SMALL["num_layers"])
    drift = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params_s.items()}  # bound on |W_p - W_s|
    out = []
    for step, (ls, lp) in enumerate(zip(logs_s, logs_p)):
        rho = _rho(rec_p, rec_s, step)
        gs, gp = rec_s.grads[step], rec_p.grads[step]
        heads = rec_p.heads[step]
        n_tok = max(c["z"].shape[0] for c in heads if c["grad"])
        zabs, vocab = max(c["zabs"].max().item() for c in heads), heads[0]["z"].shape[-1]
        assert gs.keys() == gp.keys() == rec_s.mags[step].keys() and len(gs) > 0
        bounds = {}
        for name in gs:
            assert gs[name].abs().max() > 0 or gp[name].abs().max() == 0
            k32, klow = _path_roundings(name, cfg, n_tok, SEQ_LEN, vocab, zabs, low)
            m = torch.maximum(torch.as_tensor(rec_s.mags[step][name]), torch.as_tensor(rec_p.mags[step][name]))
            bounds[name] = (2 * (k32 * U32 + klow * U_BF16) + 2 * rho) * m
            assert_within(gp[name], gs[name], bounds[name], f"step {step} grad {name}")
        # the step's update: SGD, W -= lr * s * G with s = min(1, max_norm / (||G|| + 1e-6)) from each run's own
        # ||G||: |s_p G_p - s_s G_s| <= s |dG| + |s_p - s_s| |G|, |s_p - s_s| <= s ||dG|| / ||G|| (+ the norm's and
        # the product's roundings, 2 gamma_P); then W - lr * (...) rounds once more in each run
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in gs.values()]))
        n_par = sum(g.numel() for g in gs.values())
        dnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b) for b in bounds.values()])).item()
        scale = min(1.0, max_norm / (norm.item() + 1e-6))
        ds = 0.0 if norm.item() + dnorm < max_norm else scale * (dnorm / norm.item() + 2 * gamma(n_par + 2))
        for name in drift:
            g = gs[name].double().abs() if name in gs else 0.0
            drift[name] += lr * (scale * bounds.get(name, 0.0) + ds * g) + \
                2 * U32 * (rec_s.starts[step][name].double().abs() + 2 * lr * scale * g)
        out.append((rho, bounds, norm.item(), dnorm, n_par))
    return out, drift


def _compare_dpo(tmp_path, lgl_calls, config):
    """Both runs, and every metric, gradient and weight against its derived bound (module docstring)."""
    torch.manual_seed(0)
    loss_type, beta = config["loss_type"][0], config["beta"]
    logs_s, rec_s, params_s = _run_dpo(tmp_path, patched=False, **config)
    assert lgl_calls == [], "the stock run must not touch fastalign"
    logs_p, rec_p, params_p = _run_dpo(tmp_path, patched=True, **config)
    # policy forward per step (chosen+rejected batch) + reference forward per step
    assert len(lgl_calls) == 4, f"expected 4 fastalign head calls in 2 patched steps, got {len(lgl_calls)}"
    assert len(logs_s) == len(logs_p) == 2 and len(rec_s.grads) == len(rec_p.grads) == 2
    if loss_type == "sigmoid":
        assert abs(logs_s[0]["loss"] - 0.6931) > 1e-3, "the reference differs from the policy: loss is not log 2"
    lr = 0.5
    steps, drift = _check_steps(rec_s, rec_p, logs_s, logs_p, params_s, config.get("bf16", True), lr)
    for step, (ls, lp) in enumerate(zip(logs_s, logs_p)):
        rho, bounds, norm, dnorm, n_par = steps[step]
        heads = rec_p.heads[step]  # [policy (with grad), reference]
        assert [c["grad"] for c in heads] == [True, False]
        zabs = max(c["zabs"].max().item() for c in heads)
        # logged metrics
        b_pol, b_ref = _token_bound(heads, rho)
        metric = {"logps/chosen": b_pol, "logps/rejected": b_pol, "rewards/chosen": beta * (b_pol + b_ref),
                  "rewards/rejected": beta * (b_pol + b_ref), "rewards/margins": 2 * beta * (b_pol + b_ref),
                  "grad_norm": dnorm + sum_bound(norm, n_par)}  # | ||a|| - ||b|| | <= ||a - b||
        # entropy: the policy call's per-token entropies (fastalign's in the patched run, TRL's in the stock one),
        # _head_call_bounds; logits/*: TRL's own kernel in both runs (the extras), but on other rows (the patched
        # run scores only the labelled positions: other GEMM blocking): each logit within its GEMM bound `arg`
        # per run (+ rho |h||W| once the weights differ), the V-term mean gamma_V mean|z| and its division u
        pol = heads[0]
        _, ent_b, arg = _head_call_bounds(pol, rho)
        z = pol["z"]
        ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
        mean_b = 2 * (arg.mean(-1) + gamma(z.shape[-1]) * z.abs().mean(-1) + U32 * z.mean(-1).abs()) \
            + rho * pol["zabs"].mean(-1)
        metric.update({"entropy": _mean_bound(ent_b, ent, ls["entropy"]),
                       "logits/chosen": _mean_bound(mean_b, z.mean(-1), ls["logits/chosen"]),
                       "logits/rejected": _mean_bound(mean_b, z.mean(-1), ls["logits/rejected"])})
        if loss_type == "sigmoid":  # mean of -log sigmoid(beta (margin)): slope <= beta per unit of each of 4 log-probs
            metric["loss"] = 2 * beta * (b_pol + b_ref) + 20 * U32 * ls["loss"]
        else:  # ipo: mean of (m - 1/(2 beta))^2, |m - 1/(2 beta)| <= sqrt(pairs * loss); m of per-token means
            metric["loss"] = 2 * (4 * ls["loss"]) ** 0.5 * 2 * (b_pol + b_ref) + 20 * U32 * ls["loss"]
        assert ls.keys() == lp.keys()
        for key in ls:
            if key in ("train_runtime", "train_samples_per_second", "train_steps_per_second"):
                continue
            # counters, learning rate: exact; 0/1 accuracies (rewards/accuracies, mean_token_accuracy) exact too:
            # not derived -- they flip only if a margin / top-1 gap is within its bound, none is here
            assert_within(lp[key], ls[key], metric.get(key, 0.0), f"step {step} metric {key}")
    for name in params_s:
        assert_within(params_p[name], params_s[name], drift[name], f"weights {name}")
    init = dict(tiny_model(tiny_tokenizer(), seed=0, **SMALL).named_parameters())
    # the steps changed the weights (the comparison is not between two untouched models)
    assert any((params_s[n] - p).abs().max() > 1e-4 for n, p in init.items())


def test_patch_and_unpatch_restore_trl(lgl_calls):
    originals = {name: getattr(trl_utils, name) for name in
                 ("_ChunkedLogProbFunction", "_use_triton", "selective_log_softmax", "entropy_from_logits",
                  "selective_log_softmax_and_entropy")}
    patched = fa_trl.patch_trl()
    assert set(patched) == {f"trl.trainer.utils.{n}" for n in originals}
    assert fa_trl.patch_trl() == patched  # idempotent
    for name, original in originals.items():
        assert getattr(trl_utils, name) is not original, name
    fa_trl.unpatch_trl()
    for name, original in originals.items():
        assert getattr(trl_utils, name) is original, name
    with fa_trl.use_fastalign():
        assert fa_trl.is_patched()
    assert not fa_trl.is_patched()
    assert trl_utils._ChunkedLogProbFunction is originals["_ChunkedLogProbFunction"]


def test_module_imported_by_name_is_patched_and_restored():
    # a trl module that did `from .utils import selective_log_softmax` (as the experimental trainers do)
    import sys
    import types

    fake = types.ModuleType("trl._fastalign_test_mod")
    fake.selective_log_softmax = trl_utils.selective_log_softmax
    original = fake.selective_log_softmax
    sys.modules[fake.__name__] = fake
    try:
        fa_trl.patch_trl()
        assert fake.selective_log_softmax is trl_utils.selective_log_softmax is not original
        fa_trl.unpatch_trl()
        assert fake.selective_log_softmax is original
    finally:
        del sys.modules[fake.__name__]


def _eager_pair_bounds(logits, labels, temperature=1.0, g=None, gh=None):
    """Exact (fp64) values and the bound on |fastalign - TRL eager| for the patched functions, per entry: each
    side within logprob_bounds of the exact value (any backend, any summation order; fastalign's backend and its
    online rescales), TRL's eager code also rounds lse = fl(m + log S) before z_y - lse (u |lse| on log p, and as
    an argument error of autograd's exp(z - lse) in logsumexp's backward: bwd_arg_err), and
    selective_log_softmax_and_entropy adds its two autograd paths (log-prob, entropy) into one gradient: one
    more rounding of their magnitudes, u (|g| [j = y] + p_j C_j) / T, C_j = |g| + |gh| (|log p_j| + H + 1)."""
    backend = _backends.resolve("auto", logits.device, op="gather_logprobs")
    lse = torch.logsumexp(f64(logits) / temperature, -1)
    fa = logprob_bounds(logits, labels, temperature, g=g, gh=gh, rescales=rescales(backend, logits.shape[-1]))
    trl = logprob_bounds(logits, labels, temperature, g=g, gh=gh, bwd_arg_err=U32 * lse.reshape(-1, 1).abs())
    valid = labels != -100
    out = dict(lp=(fa.lp, fa.lp_err + trl.lp_err + torch.where(valid, U32 * lse.abs(), 0.0)),
               ent=(fa.ent, fa.ent_err + trl.ent_err))
    if g is not None:
        err = fa.grad_err + trl.grad_err
        if gh is not None:
            z = f64(logits) / temperature
            logp, p = z.log_softmax(-1), z.softmax(-1)
            ent = -(p * logp).sum(-1, keepdim=True)
            gv, ghv = (torch.where(valid, f64(x), 0.0)[..., None] for x in (g, gh))
            hot = torch.nn.functional.one_hot(labels.clamp(min=0), z.shape[-1]) * valid[..., None]
            err = err + U32 * (gv.abs() * hot + p * (gv.abs() + ghv.abs() * (logp.abs() + ent + 1))) / temperature
        out["grad"] = (fa.grad, err)
    return out


def test_patched_functions_match_trl():
    """fastalign's adapters against TRL's eager functions (through trl.trainer.utils' names), fp32 logits:
    every log-prob, entropy and gradient within both implementations' error bounds (_eager_pair_bounds);
    masked rows (row_mask 0) exactly 0 in both."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40, dtype=torch.float32, requires_grad=True)
    index = torch.randint(0, 40, (3, 5))
    idx_k = torch.randint(0, 40, (3, 5, 2))
    row_mask = torch.rand(3, 5) > 0.3
    masked = index.masked_fill(~row_mask, -100)
    ones = torch.ones(3, 5)

    def run():  # through trl.trainer.utils' names: stock, or fastalign once patched
        res = []
        for temperature in (1.0, 0.7):
            lp = trl_utils.selective_log_softmax(logits, index, temperature=temperature, row_mask=row_mask)
            res += [lp, *torch.autograd.grad(lp.sum(), logits)]
            lp, ent = trl_utils.selective_log_softmax_and_entropy(logits, index, temperature=temperature,
                                                                  row_mask=row_mask)
            res += [lp, ent, *torch.autograd.grad((lp + 0.3 * ent).sum(), logits)]
        res.append(trl_utils.selective_log_softmax(logits, idx_k))
        ent = trl_utils.entropy_from_logits(logits)
        return res + [ent, *torch.autograd.grad(ent.sum(), logits)]

    want = run()
    with fa_trl.use_fastalign():
        got = run()
        counts = fa_trl.call_counts()
    bounds = []  # (exact, bound) per result, in run()'s order
    for temperature in (1.0, 0.7):
        b = _eager_pair_bounds(logits, masked, temperature, g=ones)
        bounds += [b["lp"], b["grad"]]
        b = _eager_pair_bounds(logits, masked, temperature, g=ones, gh=0.3 * ones)
        bounds += [b["lp"], b["ent"], b["grad"]]
    bk = [_eager_pair_bounds(logits, idx_k[..., k])["lp"] for k in range(2)]
    bounds.append(tuple(torch.stack([x[i] for x in bk], -1) for i in range(2)))
    b = _eager_pair_bounds(logits, torch.zeros_like(index), g=torch.zeros(3, 5), gh=ones)
    bounds += [b["ent"], b["grad"]]
    assert len(got) == len(want) == len(bounds)
    for i, (g, w, (exact, bound)) in enumerate(zip(got, want, bounds)):
        assert_within(w, exact, bound, f"result {i}: TRL vs exact")  # the pairing of results and bounds
        assert_within(g, w, bound, f"result {i}")
    assert counts == {"selective_log_softmax": 3, "selective_log_softmax_and_entropy": 2, "entropy_from_logits": 1}


def _trl_kernel_bounds(h, w, b, t, temperature, scale, chunk, g, gh, dtype=torch.float32):
    """Exact (fp64) log-probs, entropy and gradients to hidden, weight, bias of sum(g lp + gh H) for TRL's
    ChunkedLogProbFunction, with the error of one evaluation by it (its torch tiles on the CPU, its Triton
    kernel on a GPU: the same arithmetic). z = fl(fl(tile s) fl(1/T)): tile = h W^T + b with
    gamma(H + 1)(|h||W| + |b|) (16-bit: the tile is stored in the dtype, u_d (|x| + that)), then up to three
    roundings 3u|z| when s or T != 1, so logprob_bounds at temperature T / s with that argument error and
    ceil(V / chunk) - 1 online rescales; _trl_stats_error's u|lse| on log p and its entropy form's |m| terms;
    the backward recomputes log p = z - log_z (u|lse| more: bwd_arg_err), uses the forward's H (its extra
    error, times |gh| p_j / T), multiplies by inv_t and then s (one rounding more than logprob_bounds counts:
    u (|G| + dG)) and, in 16 bits, stores the tile's gradient in the dtype (logprob_bounds' grad_dtype). The
    gradient GEMMs (fp32 accumulation, across chunks too) as linear_bounds: G W with gamma(V), G^T h and
    sum_i G with gamma(N), plus 2 u_d (product and final cast to the dtype) in 16 bits."""
    temp = temperature / scale
    vocab, hsize = w.shape
    hh, ww = f64(h).reshape(-1, hsize), f64(w)
    bb = torch.zeros(vocab, dtype=torch.float64) if b is None else f64(b)
    x = hh @ ww.T + bb
    ud = 0.0 if dtype == torch.float32 else unit_roundoff(dtype)
    acc = gamma(hsize + 1) * (hh.abs() @ ww.abs().T + bb.abs())
    x_err = acc + ud * (x.abs() + acc)
    z = x / temp
    arg = x_err / temp + (3 * U32 * z.abs() if (temperature, scale) != (1.0, 1.0) else 0.0)
    n_resc = -(-vocab // chunk) - 1
    lse_u, ent_x = _trl_stats_error(z, arg, n_resc)
    own = U32 * z.abs() if temp != 1 else 0.0  # the one rounding of z that logprob_bounds counts itself
    r = logprob_bounds(x, t, temp, g=g, gh=gh, rescales=n_resc, arg_err=arg - own, bwd_arg_err=lse_u[:, None],
                       grad_dtype=dtype)
    r.lp_err = r.lp_err + lse_u
    r.ent_err = r.ent_err + ent_x
    p = torch.softmax(z, -1)
    big_g = r.grad
    d_g = r.grad_err + (f64(gh).abs()[:, None] * p * ent_x[:, None] + U32 * (big_g.abs() + r.grad_err)) / temp
    abs_g, n = big_g.abs() + d_g, hh.shape[0]
    r.grad_hidden = big_g @ ww
    r.grad_hidden_err = d_g @ ww.abs() + (gamma(vocab) + 2 * ud) * (abs_g @ ww.abs())
    r.grad_weight = big_g.T @ hh
    r.grad_weight_err = d_g.T @ hh.abs() + (gamma(n) + 2 * ud) * (abs_g.T @ hh.abs())
    r.grad_bias = big_g.sum(0)
    r.grad_bias_err = d_g.sum(0) + (gamma(n) + ud) * abs_g.sum(0)
    return r


def test_fused_head_matches_trl_kernel(lgl_calls):
    """FusedLMHead against TRL's ChunkedLogProbFunction directly: every output field, logit_scale,
    temperature, bias, and the gradients from log-probs and entropy; soft-capping falls back to TRL.
    Log-probs, entropy and gradients: within the sum of fastalign's error (linear_bounds, at temperature T / s)
    and TRL's kernel's (_trl_kernel_bounds). log_sum_sq_probs, mean_logits, is_top1: exact -- FusedLMHead gets
    them from one forward of TRL's own kernel on the same inputs (same torch ops, same tiles); the soft-capped
    call is TRL's kernel in both: exact."""
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(0)
    head = fa_trl.FusedLMHead(ChunkedLogProbFunction)
    h = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (9,))
    g, gh = torch.ones(9), torch.full((9,), 0.5)
    backend = _backends.resolve("auto", h.device, op="linear_gather_logprobs")
    outs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    for temperature, scale in ((1.0, 1.0), (0.7, 0.5)):
        want = ChunkedLogProbFunction.apply(h, w, b, t, temperature, 32, None, scale, outs)
        got = head.apply(h, w, b, t, temperature, 32, None, scale, outs)
        fa = linear_bounds(h, w, b, t, backend, temperature=temperature / scale, g=g, gh=gh)
        tr = _trl_kernel_bounds(h, w, b, t, temperature, scale, 32, g, gh)
        for name, x, y, ex, e1, e2 in zip(outs[:2], got, want, (tr.lp, tr.ent), (fa.lp_err, fa.ent_err),
                                          (tr.lp_err, tr.ent_err)):
            assert_within(y, ex, e1 + e2, f"TRL {name} vs exact")  # the pairing of values and bounds
            assert_within(x, y, e1 + e2, f"{name} at T={temperature}, s={scale}")
        for name, x, y in zip(outs[2:], got[2:], want[2:]):
            assert torch.equal(x, y), name
        gw = torch.autograd.grad((want[0] + 0.5 * want[1]).sum(), (h, w, b))
        gg = torch.autograd.grad((got[0] + 0.5 * got[1]).sum(), (h, w, b))
        for name, x, y in zip(("hidden", "weight", "bias"), gg, gw):
            bound = getattr(fa, f"grad_{name}_err") + getattr(tr, f"grad_{name}_err")
            assert_within(y, getattr(tr, f"grad_{name}"), bound, f"TRL grad {name} vs exact")
            assert_within(x, y, bound, f"grad {name} at T={temperature}, s={scale}")
    assert len(lgl_calls) == 2
    # fields not asked for are None, as in TRL
    got = head.apply(h, w, None, t, 1.0, 32, None, 1.0, ("log_probs",))
    assert got[1:] == (None, None, None, None)
    # soft-capping: TRL's own kernel, counted as a fallback
    fa_trl._COUNTS.clear()
    want = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32, 30.0, 1.0, outs)
    got = head.apply(h, w, None, t, 1.0, 32, 30.0, 1.0, outs)
    assert torch.equal(got[0], want[0])
    assert fa_trl.call_counts() == {"lm_head_fallback": 1} and len(lgl_calls) == 3


def _reward(completions, **kwargs):
    # a deterministic reward with spread inside each group: vowels minus a length cost
    return [float(sum(c.count(ch) for ch in "aeiou")) - 0.1 * len(c) for c in completions]


def _run_online(tmp_path, kind, patched):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    tok = tiny_tokenizer()
    path = tmp_path / f"{kind}-{'patched' if patched else 'stock'}"
    # TRL builds the KL reference (beta > 0) from the policy's path: save the tiny model locally
    tiny_model(tok, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64).save_pretrained(path / "m")
    tok.save_pretrained(path / "m")
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config_cls(output_dir=str(path), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                      max_steps=2, learning_rate=0.1, optim="sgd", report_to="none", logging_steps=1, use_cpu=True,
                      seed=0, bf16=False, save_strategy="no", disable_tqdm=True, beta=0.04)
    # the metric bounds (_online_bounds) follow these defaults' formulas
    assert (args.loss_type == "dapo" and args.num_iterations == 1) if kind == "grpo" else not args.normalize_advantages
    recorder = _GradRecorder()

    def reward(completions, **kwargs):  # _reward, recorded (named _reward: the metrics' keys)
        out = _reward(completions)
        recorder.rewards.append(out)
        return out
    reward.__name__ = "_reward"
    trainer = trainer_cls(model=str(path / "m"), reward_funcs=reward, args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_dict({"prompt": ["ab", "hello ", "x=", "q:"]}),
                          callbacks=[recorder])
    inner = trainer._compute_loss

    def compute_loss(model, inputs):  # records what the step's loss is computed from
        recorder.inputs.append({k: inputs[k].detach().clone() for k in (
            "advantages", "completion_mask", "completion_ids", "num_items_in_batch", "ref_per_token_logps")
            if inputs.get(k) is not None})
        return inner(model, inputs)
    trainer._compute_loss = compute_loss
    return _train(trainer, recorder, patched, trainer.model)


def _online_bounds(kind, heads, rho, inp, rewards, beta, ls):
    """Bounds on |patched - stock| of the online trainers' loss, kl and entropy metrics, and of RLOO's
    advantages, from each step's head calls (GRPO: reference, policy; RLOO: old policy, reference, policy --
    one row per scored completion token, the same rows in every call), per token (_head_call_bounds: d log p,
    dH; rho for the trained model's calls only), and what the loss was computed from (inp: advantages A,
    completion mask, GRPO's normalizer N; rewards r). Metrics that are means over the completion tokens get
    _mean_bound. Each run rounds its own fp32 arithmetic (u per operation, gamma_n per n-term sum); both: x2.
    GRPO (loss_type dapo, one iteration): coef_1 = exp(l - l.detach()) = exp(0) = 1 exactly, so
    per-token loss = -A_b + beta kl_t, kl_t = e^x - x - 1 with x = ref - l:
      kl_t moves by |e^x - 1| dx + e^(|x| + dx) dx^2 / 2 (dx = d ref + d l), and each run rounds x (u|x|, also
      inside exp), exp (F e^x), the two subtractions: e^x (F + u|x|) + u|x| + u (e^x + |x|) + u kl;
      loss = sum_t mask (-A_b + beta kl_t) / N: A identical in both runs (rewards are), so
      |dL| <= (count beta max dkl + 2u (count beta max kl + S) + 2 gamma_n S) / N + 2u|L|, S = sum mask |A| +
      count beta max kl >= sum |per-token loss|.
    RLOO: kl_t = old_t - ref_t (u|kl_t| each run); a sequence's KL sum moves by at most K = sum over all rows
    of d kl_t plus the sum's 2 gamma_n sum|kl_t|; advantages A = r' - (sum_g r'_g - r'_b) / (G - 1),
    r' = r - beta kl_seq: exactly by <= 2 beta K, plus each run's roundings of r' (<= R' = max|r| + beta sum|kl|)
    and its G-term group sum: u (beta sum|kl| + (G gamma_G / u + 2G + 2) R' + max|A|). Loss: mean_b of
    -min(c A, clip(c) A), c = exp(logps_b - old_b): the same head on the same weights in one run, twice, so
    |logps_b - old_b| <= Lam = sum over all rows of 2 (d log p of one head) plus both sums' 2 gamma_n sum|lp|;
    c in [c_lo, c_hi] = [e^-Lam (1 - F), e^Lam (1 + F)] inside (1 - 0.2, 1 + 0.28) in both runs: no clipping
    (the clip ratios are exactly 0), and |dL| <= c_hi dA + max|A| (c_hi - c_lo) + 2 (u + gamma_B) c_hi max|A| +
    2u|L|."""
    pol = next(c for c in heads if c["grad"])
    ref = next(c for c in heads if not c["policy"])
    # the policy's rows are the completion tokens of the loss's batch, in order (generation-time calls may
    # see the sequences in another order: those are paired by sequence only where they share it)
    mask = inp["completion_mask"].bool()
    assert torch.equal(pol["targets"], inp["completion_ids"][mask])

    def logp(c):
        return torch.log_softmax(c["z"], -1).gather(-1, c["targets"][:, None])[:, 0]

    def d_logp(c):
        return _head_call_bounds(c, rho if c["policy"] else 0.0)[0]

    _, ent_b, _ = _head_call_bounds(pol, rho)
    ent = -(torch.softmax(pol["z"], -1) * torch.log_softmax(pol["z"], -1)).sum(-1)
    out = {"entropy": _mean_bound(ent_b, ent, ls["entropy"])}
    adv = inp["advantages"].double().reshape(-1)
    count, n = mask.sum().item(), mask.numel()
    mask = mask.double()
    if kind == "grpo":
        # the reference's log-probs (computed at generation, in another order) as the loss saw them (the stock
        # run's fp32 values: within d ref of the exact ones, which only shifts where e^x is evaluated), and every
        # token's d ref bounded by the largest
        x = f64(inp["ref_per_token_logps"])[inp["completion_mask"].bool()] - logp(pol)
        dx = d_logp(ref).max() + d_logp(pol)
        ex, ax = x.exp(), x.abs()
        kl = ex - x - 1
        dkl = (ex - 1).abs() * dx + (ax + dx).exp() * dx**2 / 2 + \
            2 * (ex * (FN + U32 * ax) + U32 * ax + U32 * (ex + ax) + U32 * kl)
        out["kl"] = _mean_bound(dkl, kl, ls["kl"])
        s_abs = (mask * adv.abs()[:, None]).sum().item() + count * beta * kl.max().item()
        big_n = inp["num_items_in_batch"].double().item()
        out["loss"] = (count * beta * dkl.max().item() + 2 * U32 * s_abs + sum_bound(s_abs, n)) / big_n + \
            2 * U32 * abs(ls["loss"])
        return out
    old = next(c for c in heads if c["policy"] and not c["grad"])
    assert torch.equal(old["targets"], ref["targets"])  # both at generation, the same rows
    kl = logp(old) - logp(ref)
    dkl = d_logp(old) + d_logp(ref) + 2 * U32 * kl.abs()
    out["kl"] = _mean_bound(dkl, kl, ls["kl"])
    kl_abs, n_rows = kl.abs().sum().item(), kl.numel()
    big_k = dkl.sum().item() + sum_bound(kl_abs, n_rows)
    groups = 2  # num_generations
    r_max = max(abs(v) for v in rewards) + beta * kl_abs
    a_max = adv.abs().max().item()
    eps_a = U32 * (beta * kl_abs + (groups * gamma(groups) / U32 + 2 * groups + 2) * r_max + a_max)
    out["advantages"] = 2 * beta * big_k + 2 * eps_a
    lp0 = _head_call_bounds(pol)[0]
    lam = 2 * lp0.sum().item() + 2 * sum_bound(logp(pol).abs().sum().item(), n_rows)
    c_lo, c_hi = math.exp(-lam) * (1 - FN), math.exp(lam) * (1 + FN)
    assert 0.8 < c_lo and c_hi < 1.28, "the importance ratio's bound reaches a clip threshold"
    b = adv.numel()
    out["loss"] = c_hi * out["advantages"] + a_max * (c_hi - c_lo) + 2 * (U32 + gamma(b)) * c_hi * a_max + \
        2 * U32 * abs(ls["loss"])
    return out


# RLOO goes through the same patched head as GRPO: marked slow to keep this file near 30 s on 2 cores
@pytest.mark.parametrize("kind", ["grpo", pytest.param("rloo", marks=pytest.mark.slow)])
def test_online_trainer_steps_match_stock(tmp_path, lgl_calls, kind):
    """GRPOTrainer / RLOOTrainer, 2 steps, fp32, KL to a reference (beta 0.04). Sampling is seeded and
    generation uses the model's own forward (not patched), so both runs score the same completions; the
    log-probs of policy, old policy and reference then go through fastalign's head. Gradients and weights as
    in the DPO tests (_check_steps); loss, kl, entropy (and RLOO's advantages) within _online_bounds; rewards,
    counters, GRPO's advantages and the clip ratios (0: no ratio can reach a clip threshold) exact."""
    beta = 0.04
    logs_s, rec_s, params_s = _run_online(tmp_path, kind, patched=False)
    assert lgl_calls == []
    logs_p, rec_p, params_p = _run_online(tmp_path, kind, patched=True)
    assert len(lgl_calls) >= 4, f"fastalign's head ran {len(lgl_calls)} times"
    assert len(logs_s) == len(logs_p) == 2 and len(rec_s.grads) == len(rec_p.grads) == 2
    assert len(rec_s.inputs) == len(rec_p.inputs) == 2 and rec_s.rewards == rec_p.rewards
    steps, drift = _check_steps(rec_s, rec_p, logs_s, logs_p, params_s, False, 0.1)
    for step, (ls, lp) in enumerate(zip(logs_s, logs_p)):
        rho = steps[step][0]
        inp_s, inp_p = rec_s.inputs[step], rec_p.inputs[step]
        assert torch.equal(inp_s["completion_mask"], inp_p["completion_mask"])
        bounds = _online_bounds(kind, rec_p.heads[step], rho, inp_s, rec_s.rewards[step], beta, ls)
        _, _, norm, dnorm, n_par = steps[step]
        bounds["grad_norm"] = dnorm + sum_bound(norm, n_par)  # | ||a|| - ||b|| | <= ||a - b||
        assert_within(inp_p["advantages"], inp_s["advantages"], bounds.pop("advantages", 0.0),
                      f"step {step} advantages")
        assert ls.keys() == lp.keys()
        for key in ls:
            if "time" in key or "per_second" in key:
                continue
            # everything else (rewards, lengths, counters, clip ratios) is exact
            assert_within(lp[key], ls[key], bounds.get(key, 0.0), f"step {step} metric {key}")
    for name in params_s:
        assert_within(params_p[name], params_s[name], drift[name], f"weights {name}")


def test_fused_head_mixed_dtypes_fall_back(lgl_calls):
    """cast_lm_head_to_fp32 with a bf16 head (fp32 hidden, bf16 weight, no autocast): handed to TRL whole,
    which casts one vocabulary chunk at a time (fastalign would copy the whole head to fp32)."""
    from trl.kernels import ChunkedLogProbFunction

    head = fa_trl.FusedLMHead(ChunkedLogProbFunction)
    h = torch.randn(5, 16)
    w = torch.randn(30, 16, dtype=torch.bfloat16)
    t = torch.randint(0, 30, (5,))
    fa_trl._COUNTS.clear()
    got = head.apply(h, w, None, t, 1.0, 32, None, 1.0, ("log_probs",))
    want = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32, None, 1.0, ("log_probs",))
    assert torch.equal(got[0], want[0]) and lgl_calls == [] and fa_trl.call_counts() == {"lm_head_fallback": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (TRL's Triton head runs on CUDA only)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_matches_trl_triton_kernel_cuda(dtype):
    """On a GPU, against TRL's Triton path of ChunkedLogProbFunction: log-probs, entropy and the gradients
    within the sum of fastalign's error (linear_bounds on its CUDA backend: its online rescales, a GPU exp's
    argument rounding, in bf16 the logits tile and gradient roundings to bf16) and TRL's (_trl_kernel_bounds
    with ceil(V / 1024) - 1 rescales: one BLOCK_SIZE block per 1024-wide chunk; in bf16 its bf16 logits tile,
    its logits gradient stored in bf16 before the fp32-accumulating GEMMs, the final cast). Both assume fp32
    accumulation in the GEMMs: TF32 stays off (torch's default) and cuBLAS's reduced-precision bf16 split-K
    reduction is switched off for the test. mean_logits comes from TRL's kernel in both (FusedLMHead's extras
    call, another compiled specialisation): per run each logit's GEMM error, the V-term sum gamma_V sum|z| and
    the division u."""
    from trl.kernels import ChunkedLogProbFunction

    torch.manual_seed(0)
    head = fa_trl.FusedLMHead(ChunkedLogProbFunction)
    h = torch.randn(300, 64, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.1 * torch.randn(5000, 64, device="cuda")).to(dtype).requires_grad_()
    t = torch.randint(0, 5000, (300,), device="cuda")
    g, gh = torch.ones(300), torch.full((300,), 0.5)
    outs = ("log_probs", "entropy", "mean_logits", "is_top1")
    reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        want = ChunkedLogProbFunction.apply(h, w, None, t, 0.9, 1024, None, 1.0, outs)
        got = head.apply(h, w, None, t, 0.9, 1024, None, 1.0, outs)
        gw = torch.autograd.grad((want[0] + 0.5 * want[1]).sum(), (h, w))
        gg = torch.autograd.grad((got[0] + 0.5 * got[1]).sum(), (h, w))
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
    backend = _backends.resolve("auto", h.device, op="linear_gather_logprobs")
    fa = linear_bounds(h, w, None, t, backend, temperature=0.9, g=g, gh=gh)
    tr = _trl_kernel_bounds(h, w, None, t, 0.9, 1.0, 1024, g, gh, dtype)
    for name, x, y, ex, err in ((outs[0], got[0], want[0], tr.lp, fa.lp_err + tr.lp_err),
                                (outs[1], got[1], want[1], tr.ent, fa.ent_err + tr.ent_err)):
        assert_within(y, ex, err, f"TRL {name} vs exact")
        assert_within(x, y, err, name)
    hh, ww = f64(h), f64(w)
    ud = 0.0 if dtype == torch.float32 else unit_roundoff(dtype)
    zabs = hh.abs() @ ww.abs().T / 0.9
    z = hh @ ww.T / 0.9
    arg = gamma(64) * zabs + ud * (z.abs() + gamma(64) * zabs) + 3 * U32 * z.abs()
    mean_b = 2 * (arg.mean(-1) + gamma(5000) * z.abs().mean(-1) + U32 * z.mean(-1).abs())
    assert got[2] is None and want[2] is None  # log_sum_sq_probs, not asked for
    assert_within(got[3], want[3], mean_b, "mean_logits")
    for name, x, y in zip(("hidden", "weight"), gg, gw):
        bound = getattr(fa, f"grad_{name}_err") + getattr(tr, f"grad_{name}_err")
        assert_within(y, getattr(tr, f"grad_{name}"), bound, f"TRL grad {name} vs exact")
        assert_within(x, y, bound, f"grad {name}")
