import json
import re

import pytest
import tokenizers

from data_tools import synthetic as synthetic_cli
from ttt_train.data import indexed
from ttt_train.data.synthetic import TASKS, generate, generate_many, score_exact_match
from ttt_train.data.tokenizer import BYTE_TOKENIZER_PATH, load_tokenizer


def solve(record: dict) -> str:
    """The answer recovered from the context and query alone, by a parser independent of the generator."""
    context, query = record["context"], record["query"]
    if record["task"] == "passkey":
        keys = set(re.findall(r"The pass key is (\d+)\.", context))
        assert len(keys) == 1
        return keys.pop()
    if record["task"] == "multikey":
        lines = re.findall(r"The value of key ([0-9a-f-]{36}) is (\d+)\.", context)
        table = dict(lines)
        assert len(table) == len(lines) == len(context.splitlines())  # keys unique, every line parsed
        return " ".join(table[key] for key in re.findall(r"[0-9a-f-]{36}", query))
    if record["task"] == "mqar":
        pairs = dict(pair for pair in context.split("\n")[0].split())
        assert len(pairs) == len(context.split("\n")[0].split())  # keys distinct
        assert all(value.islower() for value in pairs.values())
        assert not set(pairs) & set(context.split("\n", 1)[1])  # keys never in filler
        return pairs[query.split()[-1]]
    if record["task"] == "copy":
        assert query == "<"
        return re.match(r"<([a-z]+)>", context).group(1) + ">"
    value = re.search(r"the value (\d+)\?", query).group(1)
    values, order = {}, []
    for name, source, number in re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.", context):
        values[name] = values[source] if source else number
        order.append(name)
    return " ".join(name for name in order if values[name] == value)


def recalled(record: dict) -> list[str]:
    return [record["text"][a:b] for a, b in record["recall_spans"]]


def expected_recall(record: dict) -> list[str]:
    """What only a memory of the context predicts, found by parsing the text: the queried values of
    mqar, the second copy of copy, the answer otherwise."""
    head, _, tail = record["text"].rpartition("\n")
    if record["task"] == "mqar":
        pairs = dict(pair for pair in head.split("\n")[0].split())
        return [pairs[key] for key, _ in tail.split()]
    if record["task"] == "copy":
        return [tail[1:-1]]
    return [record["answer"]]


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A small BPE trained locally, whose tokens are not bytes."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [generate(task, 3000, seed)["text"] for task in ("passkey", "multikey", "variable_tracking") for seed in range(3)]
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return load_tokenizer(str(path))


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [500, 4000])
def test_answers_are_recoverable_and_length_is_respected(task, length, byte_tokenizer):
    for record in generate_many(task, 3, length, seed=10):
        assert solve(record) == record["answer"]
        separator = "" if task in ("mqar", "copy") else " "
        assert record["text"] == f"{record['context']}\n{record['query']}{separator}{record['answer']}"
        assert record["length_tokens"] == len(byte_tokenizer.encode(record["text"]))
        assert recalled(record) == expected_recall(record)
        assert length - 100 <= record["length_tokens"] <= length


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_by_seed(task, bpe_tokenizer):
    first = generate(task, 1500, 7, bpe_tokenizer)
    assert first == generate(task, 1500, 7, bpe_tokenizer)
    assert first["context"] != generate(task, 1500, 8, bpe_tokenizer)["context"]
    assert first["length_tokens"] == len(bpe_tokenizer.encode(first["text"]))
    assert 1500 - 40 <= first["length_tokens"] <= 1500  # measured in the given tokenizer's tokens
    assert solve(first) == first["answer"]


def test_options_and_refusals():
    record = generate("variable_tracking", 2000, 1, num_chains=3, num_hops=6)
    assert len(record["answer"].split()) == 7 and solve(record) == record["answer"]
    record = generate("multikey", 2000, 1, num_queries=4)
    assert len(record["answer"].split()) == 4 and solve(record) == record["answer"]
    record = generate("mqar", 500, 1, num_pairs=50)
    assert len(record["recall_spans"]) == 50 and solve(record) == record["answer"]
    record = generate("copy", 500, 1, copy_length=10)
    assert len(record["answer"]) == 11 and recalled(record) == expected_recall(record)
    with pytest.raises(ValueError, match="num_pairs must be in 1..50"):
        generate("mqar", 500, 1, num_pairs=51)
    shallow, deep = generate("passkey", 3000, 1, depth=0.0), generate("passkey", 3000, 1, depth=1.0)
    assert shallow["context"].startswith("The pass key is") and deep["context"].endswith("is the pass key.")
    with pytest.raises(ValueError, match="too short"):
        generate("multikey", 50, 0)
    with pytest.raises(ValueError, match="unknown task"):
        generate("nope", 100, 0)


def test_score_exact_match():
    assert score_exact_match(" 12345.\nmore text", "12345") == 1.0
    assert score_exact_match("abcde  fghij", "ABCDE FGHIJ") == 1.0
    assert score_exact_match("1234", "12345") == 0.0
    assert score_exact_match("", "12345") == 0.0


def test_cli_writes_jsonl_and_dataset(tmp_path, byte_tokenizer, capsys):
    args = ["passkey", "multikey", "variable_tracking", "--num", "5", "--length", "400", "--seed", "3"]
    assert synthetic_cli.main([*args, "--output", str(tmp_path / "s.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["passkey", "multikey", "variable_tracking", "passkey", "multikey"]
    assert records[4] == generate("multikey", 400, 7)
    assert synthetic_cli.main([*args, "--output-prefix", str(tmp_path / "s")]) == 0
    dataset = indexed.open_dataset(str(tmp_path / "s"))
    assert [byte_tokenizer.decode(dataset[i]) for i in range(5)] == [
        r["text"] + "<|endoftext|>" for r in records
    ]
    indexed.check_against_tokenizer(str(tmp_path / "s"), byte_tokenizer)
    assert "5 records" in capsys.readouterr().out


def test_cli_outputs_are_safe(tmp_path, capsys):
    args = ["passkey", "--num", "2", "--length", "300"]
    out = tmp_path / "s.jsonl"
    assert synthetic_cli.main([*args, "--output", str(out)]) == 0
    first = out.read_bytes()
    assert synthetic_cli.main([*args, "--seed", "5", "--output", str(out)]) == 2
    assert "s.jsonl already exists: pass --force to replace it" in capsys.readouterr().err
    assert synthetic_cli.main([*args, "--seed", "5", "--output", str(out), "--force"]) == 0
    assert out.read_bytes() != first and sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]
    # The tokenizer is an input: neither the JSON-lines output nor a dataset's sidecar may replace it.
    tokenizer = tmp_path / "tok.meta.json"
    tokenizer.write_text(BYTE_TOKENIZER_PATH.read_text())
    for output in (["--output", str(tokenizer)], ["--output-prefix", str(tmp_path / "tok")]):
        assert synthetic_cli.main([*args, "--tokenizer", str(tokenizer), *output, "--force"]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert tokenizer.read_text() == BYTE_TOKENIZER_PATH.read_text()
    with pytest.raises(SystemExit) as exit:
        synthetic_cli.main(["passkey", "--num", "0", "--length", "300", "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and "--num and --length must be >= 1, got 0" in err
