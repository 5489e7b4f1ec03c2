"""Loading and saving models by name: "tiny" (the bundled model, built in code) or a local
directory written by save_pretrained / fastalign checkpoints (a causal LM, or a ScalarHeadModel
when the directory holds a score head). Hugging Face hub ids are passed to from_pretrained
unchanged (that may download; nothing in fastalign's own demo or tests does)."""

from __future__ import annotations

from fastalign.models.heads import ScalarHeadModel, is_scalar_head_dir


def load_tokenizer(name_or_path: str):
    if name_or_path == "tiny":
        from fastalign.models.tiny import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, *, tokenizer=None, scalar_head: bool = False, tiny_kwargs=None, seed: int = 0):
    """A causal LM (or, with scalar_head=True or a reward-model directory, a ScalarHeadModel; a
    new scalar head is initialised from `seed`, so the result does not depend on what ran before)."""
    if name_or_path == "tiny":
        from fastalign.models.tiny import tiny_model

        lm = tiny_model(tokenizer, seed=seed, **(tiny_kwargs or {}))
        return ScalarHeadModel(lm, seed=seed) if scalar_head else lm
    if is_scalar_head_dir(name_or_path):
        return ScalarHeadModel.from_pretrained(name_or_path)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(name_or_path)
    return ScalarHeadModel(lm, seed=seed) if scalar_head else lm


def save_model(model, path, tokenizer=None) -> None:
    """Weights as safetensors (save_pretrained) + config (+ tokenizer when given)."""
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
