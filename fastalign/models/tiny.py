"""The bundled tiny model and its character-level tokenizer, built in code: no downloads, ever.

The tokenizer is a `tokenizers` WordLevel model over single characters (a pre-tokenizer splits
the text into characters, a Fuse decoder glues them back), wrapped as a `PreTrainedTokenizerFast`
with a compact chat template: one token per role marker keeps the sequences of the synthetic task
short, which is what lets the demo train on a CPU in minutes.
"""

from __future__ import annotations

import string

# Characters of the synthetic task and of the bundled sample files; anything else maps to <unk>.
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " \n.,:;!?'\"()[]{}-+*/=<>_#%&@$|~`^\\"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]

# Role markers are single special tokens; the assistant turn ends with <eos>.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'system' %}<|system|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<eos>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A character-level `PreTrainedTokenizerFast` (vocabulary: SPECIAL + CHARS, ~100 tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # every character is its own "word"; "[\\s\\S]" so that newlines are kept too
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 256
    return fast


def tiny_model(tokenizer=None, *, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256,
               max_positions=256, arch="llama", seed=0):
    """A small Llama-style (or GPT-2-style, `arch="gpt2"`) causal LM from a transformers config,
    ~0.6M parameters with the defaults, randomly initialised from `seed`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_heads, intermediate_size=intermediate_size,
            max_position_embeddings=max_positions, rms_norm_eps=1e-5, attention_dropout=0.0, **ids,
        )
        cls = LlamaForCausalLM
    elif arch == "gpt2":
        cfg = GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=intermediate_size,
            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids,
        )
        cls = GPT2LMHeadModel
    else:
        raise ValueError(f"tiny_model: arch must be 'llama' or 'gpt2', got {arch!r}")
    # Seed only the initialisation, leaving the caller's global RNG stream as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
