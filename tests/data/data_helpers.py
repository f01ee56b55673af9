"""Helpers of the data tests: small deterministic corpora and a token-id check of documents."""

import json
import random

WORDS = "alpha beta gamma delta épsilon ζήτα 東京 🤖 long-context test-time training <|endoftext|>".split()


def make_texts(count: int, seed: int, min_words: int = 1, max_words: int = 60) -> list[str]:
    """`count` distinct texts, each starting with a unique header `doc-<seed>-<i>:`."""
    rng = random.Random(seed)
    return [
        f"doc-{seed}-{i}: "
        + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        + ("\n\nsecond paragraph" if i % 3 == 0 else "")
        for i in range(count)
    ]


def write_jsonl(path, texts, field="text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text, "meta": len(text)}, ensure_ascii=False) + "\n")
    return str(path)


def write_word_tokenizer(path, vocab_size: int) -> str:
    """A tokenizer.json of `vocab_size` word tokens, the last one "<|endoftext|>" (the EOD)."""
    import tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {
        "<unk>": vocab_size - 2,
        "<|endoftext|>": vocab_size - 1,
    }
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def write_permuted_byte_tokenizer(path) -> str:
    """The byte tokenizer with the ids of "a" and "b" swapped: another tokenizer with the same
    vocabulary size and EOD id, which only a fingerprint tells apart."""
    from ttt_train.data.tokenizer import BYTE_TOKENIZER_PATH

    tok = json.loads(BYTE_TOKENIZER_PATH.read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    with open(path, "w") as f:
        json.dump(tok, f)
    return str(path)
