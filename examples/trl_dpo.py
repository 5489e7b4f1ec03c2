"""TRL's DPOTrainer with fastalign's log-prob head: one call, same results.

    python examples/trl_dpo.py            # stock TRL, then patched, from the same weights; prints both
    python examples/trl_dpo.py --steps 20 --no-compare

Runs offline on the CPU in seconds: fastalign's tiny Llama and character tokenizer are built in
code and the preference pairs live in memory. With a real model, the only change to a TRL script
is the `with use_fastalign():` around `trainer.train()` (or `patch_trl()` once at start-up).
"""

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fastalign.integrations.trl import call_counts, use_fastalign  # noqa: E402
from fastalign.models.tiny import tiny_model, tiny_tokenizer  # noqa: E402

PAIRS = {
    "prompt": ["2+2=", "capital of France:", "say hi:", "opposite of up:", "3*3=", "color of grass:", "1+1=",
               "yes or no?"],
    "chosen": ["4", "Paris", "hi", "down", "9", "green", "2", "yes"],
    "rejected": ["5", "Rome", "bye", "left", "6", "blue", "11", "maybe"],
}


def train(patched: bool, steps: int, fp32: bool):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=0)
    ref = tiny_model(tok, seed=0)  # the usual DPO setup: the reference starts as a copy of the policy
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-3,
                         beta=0.1, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                         use_cpu=not torch.cuda.is_available(), bf16=False if fp32 else None, disable_tqdm=True)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_dict(PAIRS),
                             processing_class=tok)
        if patched:
            with use_fastalign():  # TRL's fused LM head and selective_log_softmax -> fastalign, undone after
                trainer.train()
                print("fastalign calls:", call_counts())
        else:
            trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-compare", action="store_true", help="only the patched run")
    ap.add_argument("--fp32", action="store_true", help="bf16=False (TRL's default is bf16 autocast)")
    a = ap.parse_args()
    patched = train(True, a.steps, a.fp32)
    stock = None if a.no_compare else train(False, a.steps, a.fp32)
    print(f"{'step':>4} {'loss (fastalign)':>17} {'loss (stock TRL)':>17} {'rewards/margins':>16}")
    for i, p in enumerate(patched):
        s = f"{stock[i]['loss']:17.6f}" if stock else f"{'-':>17}"
        print(f"{i + 1:4d} {p['loss']:17.6f} {s} {p['rewards/margins']:16.6f}")


if __name__ == "__main__":
    main()
