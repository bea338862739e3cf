"""Data loading: GSM8K files and data sets, their errors, the synthetic generator, fingerprints."""

import json
import operator
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports `datasets`: these tests never touch the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvdistill.core.data import (  # noqa: E402
    DataError,
    data_fingerprint,
    load_examples,
    parse_gsm8k_answer,
    synthetic_examples,
    write_jsonl,
)
from kvdistill.schemas import DataSpec, Example, SyntheticSpec  # noqa: E402

GSM8K_ROW = {
    "question": (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as "
        "many clips in May. How many clips did Natalia sell altogether in April and May?"
    ),
    "answer": (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    ),
}
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def row(question: str = "Q?", answer: str = "1 + 1 = 2\n#### 2", **extra) -> str:
    return json.dumps({"question": question, "answer": answer, **extra})


def synth(split: str = "train", **kw) -> list[Example]:
    return synthetic_examples(SyntheticSpec(**{"n_train": 300, "n_test": 50, **kw}), split)


# --- parse_gsm8k_answer ---------------------------------------------------------------------


def test_parse_gsm8k_answer_splits_a_real_gsm8k_answer_into_reasoning_and_number():
    reasoning, answer = parse_gsm8k_answer(GSM8K_ROW["answer"], "gsm8k row 0")
    assert answer == "72"
    assert reasoning.startswith("Natalia sold 48/2")
    assert reasoning.endswith("in April and May.")
    assert "####" not in reasoning


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("72", "72"),
        (" 1,000 ", "1000"),
        ("$1,234,567", "1234567"),
        ("-3", "-3"),
        ("-$5", "-5"),
        ("5.0", "5.0"),  # kept as written; train/answers.py compares numerically
        ("12.50", "12.50"),
    ],
)
def test_parse_gsm8k_answer_normalises_the_written_number(tail, expected):
    assert parse_gsm8k_answer(f"2 + 3 = 5\n#### {tail}", "x") == ("2 + 3 = 5", expected)


def test_parse_gsm8k_answer_without_hashes_names_the_place_and_the_format():
    with pytest.raises(DataError, match=r"^data/train.jsonl line 17: answer has no '#### <number>'"):
        parse_gsm8k_answer("She has 5 apples.", "data/train.jsonl line 17")


@pytest.mark.parametrize("tail", ["five", "", "3,5", "1,00", "12 apples", "1.2.3"])
def test_parse_gsm8k_answer_rejects_a_non_numeric_answer(tail):
    with pytest.raises(DataError, match="row 4: answer after '####' must be a number"):
        parse_gsm8k_answer(f"2 + 3 = 5\n#### {tail}", "row 4")


def test_parse_gsm8k_answer_rejects_an_empty_reasoning_trace():
    with pytest.raises(DataError, match="row 0: answer has no reasoning before '####'"):
        parse_gsm8k_answer("  \n#### 5", "row 0")


# --- JSON lines -----------------------------------------------------------------------------


def test_jsonl_loads_gsm8k_rows_with_default_ids_from_the_file_stem(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(GSM8K_ROW), row(), ""])
    examples = load_examples(DataSpec(source=str(path)))
    assert [e.id for e in examples] == ["train-000000", "train-000001"]
    assert examples[0].question == GSM8K_ROW["question"]
    assert examples[0].answer == "72"
    assert examples[1] == Example(id="train-000001", question="Q?", reasoning="1 + 1 = 2", answer="2")


def test_jsonl_keeps_explicit_ids_and_reads_json_suffix_as_json_lines(tmp_path):
    path = write_lines(tmp_path / "rows.json", [row(id="a"), row(id=7)])
    assert [e.id for e in load_examples(DataSpec(source=str(path)))] == ["a", "7"]


def test_jsonl_with_a_utf8_byte_order_mark_loads_the_same_rows_as_without(tmp_path):
    lines = [json.dumps(GSM8K_ROW, ensure_ascii=False), row(question="Qué?")]
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    plain = write_lines(tmp_path / "plain" / "train.jsonl", lines)  # same stem: same default ids
    bom = tmp_path / "bom" / "train.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    examples = load_examples(DataSpec(source=str(bom)))
    assert examples == load_examples(DataSpec(source=str(plain)))
    assert [(e.id, e.question[:8]) for e in examples] == [("train-000000", "Natalia "), ("train-000001", "Qué?")]


@pytest.mark.parametrize("text", ["", "\n \n\n"])
def test_a_jsonl_file_with_no_rows_is_refused_in_one_line_naming_the_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^data file {re.escape(str(path))} holds no rows .*check the path") as err:
        load_examples(DataSpec(source=str(path)))
    assert "\n" not in str(err.value)


def test_a_parquet_file_with_no_rows_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=rf"data file {re.escape(str(path))} holds no rows"):
        load_examples(DataSpec(source=str(path)))


def test_jsonl_bad_json_error_names_the_file_and_the_line(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", [row(), row(), '{"question": "Q?", "answer": '])
    with pytest.raises(DataError) as err:
        load_examples(DataSpec(source=str(path)))
    assert "broken.jsonl line 3: invalid JSON" in str(err.value)
    assert "one object per line" in str(err.value)


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row(), "", row(answer="no hashes here")])
    with pytest.raises(DataError, match=r"d.jsonl line 3: answer has no '#### <number>' line"):
        load_examples(DataSpec(source=str(path)))


def test_jsonl_missing_key_error_names_the_key_and_the_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row(), json.dumps({"question": "Q?"})])
    with pytest.raises(DataError, match=r"d.jsonl line 2: missing key 'answer'"):
        load_examples(DataSpec(source=str(path)))


def test_jsonl_non_numeric_answer_error_names_the_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row(answer="2 + 3 = 5\n#### five")])
    with pytest.raises(DataError, match=r"d.jsonl line 1: answer after '####' must be a number"):
        load_examples(DataSpec(source=str(path)))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"question": 3, "answer": "1\n#### 1"}), "'question' must be a string"),
        (json.dumps({"question": " ", "answer": "1\n#### 1"}), "'question' is empty"),
        (row(id=""), "'id' must be a non-empty string"),
    ],
)
def test_jsonl_rejects_malformed_rows(tmp_path, line, problem):
    path = write_lines(tmp_path / "d.jsonl", [line])
    with pytest.raises(DataError, match=f"d.jsonl line 1: {problem}"):
        load_examples(DataSpec(source=str(path)))


def test_duplicate_ids_error_names_the_id(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row(id="q1"), row(id="q2"), row(id="q1")])
    with pytest.raises(DataError, match="duplicate id 'q1'"):
        load_examples(DataSpec(source=str(path)))


def test_limit_keeps_the_first_rows(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [row(id=f"q{i}") for i in range(5)])
    assert [e.id for e in load_examples(DataSpec(source=str(path), limit=2))] == ["q0", "q1"]
    spec = DataSpec(limit=3, synthetic=SyntheticSpec(n_train=20, n_test=5))
    assert load_examples(spec) == synthetic_examples(spec.synthetic, "train")[:3]


def test_write_jsonl_round_trips_through_load_examples(tmp_path):
    examples = synth(n_train=40, style="sentences") + [
        Example(id="gsm-1", question="Tom has $1,000?", reasoning="a\nb = <<1=1>>1", answer="-2.5")
    ]
    path = write_jsonl(examples, tmp_path / "sub" / "rt.jsonl")
    assert load_examples(DataSpec(source=str(path))) == examples


_text = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1).filter(
    lambda s: s.strip() == s and "####" not in s
)


@settings(max_examples=50, deadline=None)
@given(question=_text, reasoning=_text, answer=st.integers(-(10**9), 10**9))
def test_write_jsonl_round_trips_arbitrary_text(question, reasoning, answer):
    ex = Example(id="x", question=question, reasoning=reasoning, answer=str(answer))
    with tempfile.TemporaryDirectory() as d:
        path = write_jsonl([ex], Path(d) / "rt.jsonl")
        assert load_examples(DataSpec(source=str(path))) == [ex]


# --- parquet and datasets.load_dataset ------------------------------------------------------


def test_parquet_loads_gsm8k_rows(tmp_path):
    path = tmp_path / "gsm.parquet"
    pq.write_table(pa.Table.from_pylist([GSM8K_ROW, {"question": "Q?", "answer": "1\n#### 1"}]), path)
    examples = load_examples(DataSpec(source=str(path)))
    assert [(e.id, e.answer) for e in examples] == [("gsm-000000", "72"), ("gsm-000001", "1")]


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "gsm.parquet"
    rows = [GSM8K_ROW, {"question": "Q?", "answer": "no final line"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"gsm.parquet row 1: answer has no '#### <number>'"):
        load_examples(DataSpec(source=str(path)))


def test_a_file_that_is_not_parquet_is_reported(tmp_path):
    path = write_lines(tmp_path / "fake.parquet", ["hello"])
    with pytest.raises(DataError, match="fake.parquet: cannot read as parquet"):
        load_examples(DataSpec(source=str(path)))


@pytest.fixture
def local_dataset_dir(tmp_path, monkeypatch):
    import datasets

    # Keep the Arrow cache out of ~/.cache; `load_dataset` reads this at call time.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    # In case another test module imported `datasets` before the environment was set above.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    d = tmp_path / "mygsm"
    d.mkdir()
    write_lines(d / "train.jsonl", [json.dumps(GSM8K_ROW), row(question="Q2?")])
    write_lines(d / "test.jsonl", [row(question="T?", answer="2 * 3 = 6\n#### 6")])
    return d


def test_a_local_directory_loads_through_datasets_load_dataset(local_dataset_dir):
    train = load_examples(DataSpec(source=str(local_dataset_dir), split="train"))
    test = load_examples(DataSpec(source=str(local_dataset_dir), split="test"))
    assert [(e.id, e.answer) for e in train] == [
        ("mygsm-train-000000", "72"),
        ("mygsm-train-000001", "2"),
    ]
    assert test == [Example(id="mygsm-test-000000", question="T?", reasoning="2 * 3 = 6", answer="6")]


def test_a_local_directory_with_an_unknown_split_names_the_data_set(local_dataset_dir):
    with pytest.raises(DataError, match=r"data set '.*mygsm', split 'validation': cannot load"):
        load_examples(DataSpec(source=str(local_dataset_dir), split="validation"))


def test_a_bad_row_in_a_data_set_names_the_data_set_and_the_row(local_dataset_dir):
    write_lines(local_dataset_dir / "test.jsonl", [row(), row(answer="2 + 2 = 4\n#### four")])
    with pytest.raises(DataError, match=r"mygsm' split 'test' row 1: answer after '####'"):
        load_examples(DataSpec(source=str(local_dataset_dir), split="test"))


@pytest.mark.parametrize("source", ["/no/such/train.jsonl", "missing.parquet", "./no_such_dir"])
def test_a_missing_path_says_it_does_not_exist(source):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(DataSpec(source=source))


def test_a_missing_path_without_extension_hints_at_hub_ids():
    with pytest.raises(DataError, match="hub data set id such as 'openai/gsm8k'"):
        load_examples(DataSpec(source="/no/such/dir"))


def test_an_existing_file_of_unsupported_type_lists_the_supported_ones(tmp_path):
    path = write_lines(tmp_path / "d.csv", ["question,answer"])
    with pytest.raises(DataError, match=r"unsupported extension '.csv'; use one of \['.jsonl'"):
        load_examples(DataSpec(source=str(path)))


# --- synthetic ------------------------------------------------------------------------------

_EQUATION = re.compile(r"(\d+)([-+*])(\d+)=<<(\d+)([-+*])(\d+)=(\d+)>>(\d+)")
_SENTENCE = re.compile(r"(?:She|He) .+, so (?:she|he) has (\d+) ([-+*]) (\d+) = (\d+) \w+\.")


def evaluate_equations(example: Example) -> int:
    """Recompute an `equations`-style trace: each line is right, each starts from the last."""
    (value,) = map(int, re.match(r"\w+ has (\d+) ", example.question).groups())
    for line in example.reasoning.split("\n"):
        m = _EQUATION.fullmatch(line)
        assert m, f"{example.id}: not a calculator annotation: {line!r}"
        a, op, b, a2, op2, b2, r, r2 = m.groups()
        assert (a, op, b, r) == (a2, op2, b2, r2)
        assert int(a) == value, f"{example.id}: {line!r} does not continue from {value}"
        value = OPS[op](int(a), int(b))
        assert value == int(r), f"{example.id}: {line!r} is wrong"
    return value


def test_synthetic_answers_are_the_arithmetic_of_their_equations():
    examples = synth(min_steps=1, max_steps=5, max_number=20, style="equations")
    for ex in examples:
        assert str(evaluate_equations(ex)) == ex.answer


def test_synthetic_problems_respect_the_spec_bounds():
    spec = SyntheticSpec(n_train=500, min_steps=2, max_steps=4, max_number=9)
    steps_seen = set()
    for ex in synthetic_examples(spec, "train"):
        lines = ex.reasoning.split("\n")
        steps_seen.add(len(lines))
        for line in lines:
            a, op, b, *_, r = _EQUATION.fullmatch(line).groups()
            if op == "*":
                assert b in ("2", "3") and int(r) <= 99
            else:
                assert 1 <= int(b) <= 9
            assert int(r) >= 0
        assert ex.question.endswith("have now?")
    assert steps_seen == {2, 3, 4}


def test_synthetic_is_deterministic_by_seed_and_split():
    assert synth(seed=3) == synth(seed=3)
    assert synth("test", seed=3) == synth("test", seed=3)
    assert [e.question for e in synth(seed=3)] != [e.question for e in synth(seed=4)]


def test_synthetic_is_the_same_in_a_fresh_process():
    code = (
        "from kvdistill.core.data import synthetic_examples, data_fingerprint;"
        "from kvdistill.schemas import SyntheticSpec;"
        "print(data_fingerprint(synthetic_examples(SyntheticSpec(n_train=300, n_test=50), 'train')))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == data_fingerprint(synth())


def test_synthetic_train_and_test_are_disjoint_in_question_text():
    # Few distinct problems exist with one step and small numbers, so collisions are certain.
    kw = {"n_train": 2000, "n_test": 300, "min_steps": 1, "max_steps": 1, "max_number": 3}
    train, test = synth("train", **kw), synth("test", **kw)
    assert len(train) == 2000 and len(test) == 300
    assert not {e.question for e in train} & {e.question for e in test}
    assert [e.id for e in train[:2]] == ["synth-train-000000", "synth-train-000001"]
    assert test[-1].id == "synth-test-000299"


def test_synthetic_styles_are_parallel_corpora():
    kw = {"min_steps": 1, "max_steps": 4, "max_number": 12}
    for split in ("train", "test"):
        eq, sent = synth(split, style="equations", **kw), synth(split, style="sentences", **kw)
        assert [(e.id, e.question, e.answer) for e in eq] == [(e.id, e.question, e.answer) for e in sent]
        for e, s in zip(eq, sent, strict=True):
            first, *steps = s.reasoning.split("\n")
            assert re.fullmatch(r"\w+ starts with \d+ \w+\.", first)
            written = [_SENTENCE.fullmatch(line).groups() for line in steps]
            annotated = [_EQUATION.fullmatch(line).group(1, 2, 3, 7) for line in e.reasoning.split("\n")]
            assert written == annotated


def test_synthetic_sentences_read_like_the_documented_example():
    ex = synth(style="sentences")[0]
    name = ex.question.split()[0]
    assert ex.reasoning.startswith(f"{name} starts with ")
    assert ex.answer not in ex.reasoning.split("\n")[-1].split("=")[0]  # not given away early


def test_synthetic_unknown_split_lists_the_valid_ones():
    with pytest.raises(DataError, match=r"unknown split 'validation'; valid splits are \['train', 'test'\]"):
        load_examples(DataSpec(split="validation"))


def test_synthetic_train_fails_loudly_when_test_uses_up_every_question(monkeypatch):
    import kvdistill.core.data

    # Two people and one object leave a few dozen distinct one-step questions.
    monkeypatch.setattr(
        kvdistill.core.data, "_PEOPLE", kvdistill.core.data._PEOPLE[:1] + kvdistill.core.data._PEOPLE[-1:]
    )
    monkeypatch.setattr(kvdistill.core.data, "_OBJECTS", kvdistill.core.data._OBJECTS[:1])
    spec = SyntheticSpec(n_train=50, n_test=2000, min_steps=1, max_steps=1, max_number=2)
    with pytest.raises(DataError, match="cannot draw 50 train questions distinct from the test"):
        synthetic_examples(spec, "train")


# --- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive_to_one_character():
    examples = synth()
    fp = data_fingerprint(examples)
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    assert data_fingerprint(synth()) == fp
    for field in ("id", "question", "reasoning", "answer"):
        changed = list(examples)
        old = getattr(examples[7], field)
        changed[7] = Example(**{**examples[7].to_dict(), field: old[:-1] + chr(ord(old[-1]) + 1)})
        assert data_fingerprint(changed) != fp, field
    assert data_fingerprint(examples[::-1]) != fp


def test_fingerprint_keeps_field_boundaries():
    a = Example(id="x", question="ab", reasoning="c", answer="1")
    b = Example(id="x", question="a", reasoning="bc", answer="1")
    assert data_fingerprint([a]) != data_fingerprint([b])
