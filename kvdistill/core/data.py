"""Data rows for every stage: GSM8K-format files and data sets, and the built-in synthetic
arithmetic word problems.

`load_examples(spec)` is the one entry point; it dispatches on `spec.source`:

- `"synthetic"`: `synthetic_examples(spec.synthetic, spec.split)`, split `train` or `test`.
- a path ending in `.jsonl` / `.json` (JSON lines) or `.parquet`: GSM8K rows
  `{"question": ..., "answer": "reasoning...\\n#### 42"}`, optional `"id"`.
- anything else: a local directory or a hub data set id, read with
  `datasets.load_dataset(spec.source, spec.config_name, split=spec.split)`
  (e.g. `openai/gsm8k` with config `main`).

Malformed input raises `DataError` naming the file and line (or data set and row), the
problem and the fix; so does a data file with no rows. A leading UTF-8 byte order mark is
accepted. Duplicate ids raise. `spec.limit` keeps the first N rows.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from kvdistill.schemas import DataSpec, Example, SyntheticSpec

__all__ = [
    "DataError",
    "parse_gsm8k_answer",
    "load_examples",
    "data_fingerprint",
    "synthetic_examples",
    "write_jsonl",
]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SYNTHETIC_SPLITS = ("train", "test")
GSM8K_FORMAT = "GSM8K format: reasoning lines, then '#### 42'"

# A number as written in a gold answer: optional minus, optional '$', digits with either
# correct thousands grouping or none, optional decimals. Anything else is rejected rather
# than guessed ("3,5" could be 35 or 3.5).
_GOLD_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


class DataError(ValueError):
    """Malformed input data; the message names the file and line (or row), the problem and
    the fix."""


def parse_gsm8k_answer(text: str, where: str) -> tuple[str, str]:
    """Split a GSM8K `answer` field into (reasoning, answer).

    `reasoning` is the text before the last `####`, stripped; `answer` is the number after
    it with spaces, `$` and thousands commas removed (`$1,000` -> `1000`; `5.0` stays).
    Raises DataError naming `where` if `####` is missing, the reasoning is empty (there
    would be nothing to distil) or the answer is not a number.
    """
    reasoning, sep, tail = text.rpartition("####")
    if not sep:
        raise DataError(f"{where}: answer has no '#### <number>' line ({GSM8K_FORMAT})")
    reasoning = reasoning.strip()
    if not reasoning:
        raise DataError(
            f"{where}: answer has no reasoning before '####'; a reasoning trace is needed to distil ({GSM8K_FORMAT})"
        )
    raw = "".join(tail.split())
    if not _GOLD_NUMBER.fullmatch(raw):
        raise DataError(
            f"{where}: answer after '####' must be a number like 42, -3, 1,000 or 12.5, "
            f"got {tail.strip()!r} ({GSM8K_FORMAT})"
        )
    return reasoning, raw.replace("$", "").replace(",", "")


def _row_to_example(row: Any, where: str, default_id: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with keys 'question' and 'answer', got {type(row).__name__}")
    for key in ("question", "answer"):
        if key not in row:
            raise DataError(
                f"{where}: missing key {key!r}; each row needs 'question' and 'answer' "
                f"(optional 'id'), got keys {sorted(row)}"
            )
        if not isinstance(row[key], str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    question = row["question"].strip()
    if not question:
        raise DataError(f"{where}: 'question' is empty")
    reasoning, answer = parse_gsm8k_answer(row["answer"], where)
    rid = row.get("id")
    if rid is None:
        rid = default_id
    elif isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    elif not isinstance(rid, str) or not rid:
        raise DataError(f"{where}: 'id' must be a non-empty string or an integer, got {rid!r}")
    return Example(id=rid, question=question, reasoning=reasoning, answer=answer)


def _load_jsonl(path: Path) -> list[Example]:
    examples = []
    # utf-8-sig: a leading byte order mark (Windows editors, Excel exports) is dropped, not
    # parsed as part of the first JSON object.
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno}); the file is read as "
                    "JSON lines, one object per line"
                ) from e
            examples.append(_row_to_example(row, where, f"{path.stem}-{len(examples):06d}"))
    return examples


def _load_parquet(path: Path) -> list[Example]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as parquet: {e}") from e
    return [_row_to_example(r, f"{path} row {i}", f"{path.stem}-{i:06d}") for i, r in enumerate(rows)]


def _load_datasets(spec: DataSpec) -> list[Example]:
    import datasets

    name = f"data set {spec.source!r}"
    if spec.config_name:
        name += f" (config {spec.config_name!r})"
    try:
        ds = datasets.load_dataset(spec.source, spec.config_name, split=spec.split)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as e:
        raise DataError(
            f"{name}, split {spec.split!r}: cannot load: {e}. The source is neither 'synthetic' "
            f"nor a {'/'.join(FILE_SUFFIXES)} file, so it was read with datasets.load_dataset as "
            "a local directory or a hub id: check the path exists, or the hub id, config_name "
            "and split (and that the hub is reachable, or the data set is cached when "
            "HF_HUB_OFFLINE=1)"
        ) from e
    stem = Path(spec.source.rstrip("/")).name or "data"
    return [
        _row_to_example(r, f"{name} split {spec.split!r} row {i}", f"{stem}-{spec.split}-{i:06d}")
        for i, r in enumerate(ds)
    ]


def load_examples(spec: DataSpec) -> list[Example]:
    """The rows `spec` names, in order; see the module docstring for the sources."""
    source = spec.source
    path = Path(source).expanduser()
    if source == "synthetic":
        examples = synthetic_examples(spec.synthetic, spec.split)
    elif path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file {source} does not exist (or is not a file); check the path")
        examples = _load_parquet(path) if path.suffix == ".parquet" else _load_jsonl(path)
        if not examples:
            raise DataError(
                f"data file {source} holds no rows (it is empty or only blank lines); check "
                "the path, or that the file was fully written"
            )
    elif path.is_file():
        raise DataError(
            f"data file {source}: unsupported extension {path.suffix!r}; use one of "
            f"{list(FILE_SUFFIXES)}, a directory or a hub data set id"
        )
    elif not path.exists() and source.startswith(("/", ".", "~")):
        # Hub ids never look like this, so do not ask the hub about a mistyped path.
        raise DataError(
            f"data source {source} does not exist; give an existing file or directory, "
            "'synthetic', or a hub data set id such as 'openai/gsm8k'"
        )
    else:
        examples = _load_datasets(spec)

    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise DataError(f"data source {source}: duplicate id {ex.id!r}; ids must be unique")
        seen.add(ex.id)
    if spec.limit is not None:
        examples = examples[: spec.limit]
    return examples


def data_fingerprint(examples: list[Example]) -> str:
    """16 hex chars of sha256 over every row's id, question, reasoning and answer, in order."""
    h = hashlib.sha256()
    for ex in examples:
        # JSON keeps field boundaries unambiguous ("ab"+"c" != "a"+"bc").
        h.update(json.dumps([ex.id, ex.question, ex.reasoning, ex.answer]).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def write_jsonl(examples: list[Example], path: str | Path) -> Path:
    """Write GSM8K-format rows (`id`, `question`, `answer` = reasoning + '\\n#### ' + answer)
    that `load_examples` reads back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            answer = f"{ex.reasoning}\n#### {ex.answer}"
            row = {"id": ex.id, "question": ex.question, "answer": answer}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# --- synthetic arithmetic word problems ---------------------------------------------------

_SHE = ("Mia", "Ava", "Emma", "Zoe", "Lily", "Sara", "Nina", "Iris", "Rosa", "Yuki")
_HE = ("Leo", "Noah", "Liam", "Omar", "Ben", "Raj", "Tom", "Kai", "Sam", "Max")
_PEOPLE = [(n, "she", "her") for n in _SHE] + [(n, "he", "his") for n in _HE]  # name, pronouns
_PLURALS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "stamps")
_OBJECTS = [(p[:-1], p) for p in (*_PLURALS, "coins", "cards")]  # (singular, plural)
_MAX_PRODUCT = 99  # multiplying only while the result stays small keeps answers short
_MUL_WORDS = {2: "doubles", 3: "triples"}
Step = tuple[str, int, int, int]  # (op, a, b, result): a op b = result


def _count(n: int, obj: tuple[str, str]) -> str:
    return f"{n} {obj[0] if n == 1 else obj[1]}"


def _problem(rng: random.Random, spec: SyntheticSpec) -> tuple[str, list[Step], int, tuple]:
    """One problem: (question, steps, final value, (person, other person, object))."""
    person = rng.choice(_PEOPLE)
    other = rng.choice([p for p in _PEOPLE if p is not person])
    obj = rng.choice(_OBJECTS)
    name, she, her = person
    value = rng.randint(1, spec.max_number)
    sentences = [f"{name} has {_count(value, obj)}."]
    steps = []
    for i in range(rng.randint(spec.min_steps, spec.max_steps)):
        ops = ["+"]
        if value >= 1:
            ops.append("-")
            if value * 2 <= _MAX_PRODUCT:
                ops.append("*")
        op = rng.choice(ops)
        if op == "+":
            b = rng.randint(1, spec.max_number)
            result, text = value + b, f"buys {b} more {obj[0] if b == 1 else obj[1]}"
        elif op == "-":
            b = rng.randint(1, min(value, spec.max_number))
            result, text = value - b, f"gives {_count(b, obj)} to {other[0]}"
        else:
            b = rng.choice([k for k in (2, 3) if value * k <= _MAX_PRODUCT])
            result, text = value * b, f"{_MUL_WORDS[b]} {her} {obj[1]}"
        lead = she.capitalize() if i == 0 else f"Then {she}"
        sentences.append(f"{lead} {text}.")
        steps.append((op, value, b, result))
        value = result
    sentences.append(f"How many {obj[1]} does {name} have now?")
    return " ".join(sentences), steps, value, (person, other, obj)


def _reasoning(style: str, steps: list[Step], who: tuple) -> str:
    if style == "equations":
        return "\n".join(f"{a}{op}{b}=<<{a}{op}{b}={r}>>{r}" for op, a, b, r in steps)
    (name, she, her), other, obj = who
    lines = [f"{name} starts with {_count(steps[0][1], obj)}."]
    for op, a, b, r in steps:
        action = {
            "+": f"buys {b} more",
            "-": f"gives {b} to {other[0]}",
            "*": f"{_MUL_WORDS.get(b, '')} {her} {obj[1]}",
        }[op]
        lines.append(f"{she.capitalize()} {action}, so {she} has {a} {op} {b} = {_count(r, obj)}.")
    return "\n".join(lines)


def synthetic_examples(spec: SyntheticSpec, split: str) -> list[Example]:
    """`spec.n_train` / `spec.n_test` multi-step arithmetic word problems for `split`.

    Deterministic by (seed, split), with private `random.Random` streams. The test split is
    generated first; train skips every question text that is in test, so the two are
    disjoint. The random draws do not depend on `spec.style`, so both styles give the same
    problems (only the reasoning text differs): parallel corpora.
    """
    if split not in SYNTHETIC_SPLITS:
        raise DataError(f"synthetic data: unknown split {split!r}; valid splits are {list(SYNTHETIC_SPLITS)}")

    def generate(which: str, n: int, exclude: set[str]) -> list[Example]:
        # String seeds are hashed with sha512 by `random`, so streams are stable across runs.
        rng = random.Random(f"kvdistill-synthetic/{spec.seed}/{which}")
        out: list[Example] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise DataError(
                    f"synthetic data: cannot draw {n} {which} questions distinct from the test "
                    f"split with max_number={spec.max_number}, steps {spec.min_steps}.."
                    f"{spec.max_steps}; raise max_number or max_steps, or lower n_{which}"
                )
            question, steps, value, who = _problem(rng, spec)
            if question in exclude:
                continue
            out.append(
                Example(
                    id=f"synth-{which}-{len(out):06d}",
                    question=question,
                    reasoning=_reasoning(spec.style, steps, who),
                    answer=str(value),
                )
            )
        return out

    test = generate("test", spec.n_test, set())
    if split == "test":
        return test
    return generate("train", spec.n_train, {ex.question for ex in test})
