"""A tiny random Llama causal LM with a word-level tokenizer, saved to a directory (no download)."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the cat dog sat on mat a an and of to in is was it he she they we you ran saw big small red blue "
         "green house tree sun moon star bird fish water fire earth wind one two three four five").split()


def make_tiny_llama(path: Path, n_layers: int = 4, d: int = 32, seed: int = 0) -> Path:
    """Save a random ``LlamaForCausalLM`` (``n_layers`` blocks, d_model ``d``) and its tokenizer
    (``<s>`` BOS, ``</s>`` EOS, ``<pad>``, ``<unk>``, one id per word of WORDS) into ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from softsae.hf import without_checkout_on_path

    with without_checkout_on_path():  # the checkout's kernels/ would shadow HF's kernels package
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sample_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    """``n`` random word sequences over WORDS."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]
