"""Answer extraction and numeric matching: a table of real-world generations, and properties."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvdistill.train.answers import answers_match, extract_answer, normalize_number

EXTRACTION_TABLE = [
    # GSM8K-style gold and model outputs
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("She pays 500*2 = <<500*2=1000>>1000 dollars.\n#### 1,000", "1000"),
    ("#### 1,234,567", "1234567"),
    ("####72", "72"),
    ("#### -3", "-3"),
    ("#### $18", "18"),
    ("#### 12.50", "12.5"),
    ("#### 5.0", "5"),
    ("#### 3\nmore text\n#### 4", "4"),  # several '####': the last one counts
    ("The answer is 72\n#### 7\nQuestion: Tom has 9 apples", "7"),  # '####' beats the cue
    ("7 + 5 = 12\n#### \nThe answer is 12", "12"),  # an empty '####' falls through
    # "The answer is" / "answer:" cues, case-insensitive
    ("The answer is $5.", "5"),
    ("The answer is 7.", "7"),
    ("the answer is: **42**", "42"),
    ("So the final answer is -3 degrees.", "-3"),
    ("Answer: 1,000 dollars", "1000"),
    ("ANSWER: +4", "4"),
    ("He had 3, then 10. The answer is 8 because 10 - 2 = 8", "8"),
    ("The answer is unclear.\nShe has 3 + 4 = 7", "7"),  # cue with no number on its line
    # the last number in the text
    ("So she has 5.0 apples", "5"),
    ("Mia starts with 7 apples.\nShe buys 5 more, so she has 7 + 5 = 12 apples.", "12"),
    ("7+5=<<7+5=12>>12\n12-3=<<12-3=9>>9", "9"),
    ("12 - 3", "3"),  # a minus between numbers is an operator, not a sign
    ("The temperature fell to -3", "-3"),
    ("It costs $12.50 in total", "12.5"),
    ("The total is **42**", "42"),
    ("They have 0.50 litres left.", "0.5"),
    ("That is 50% of the class", "50"),
    ("She counts 1,2,3 chairs", "3"),  # not one number 123
    ("  \n  17  \n ", "17"),
    # no number at all
    ("I don't know.", None),
    ("The answer is five.", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_TABLE)
def test_extract_answer_finds_the_final_number_in_real_world_generations(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1,000", "1000"),
        ("$5", "5"),
        ("5.0", "5"),
        ("-3", "-3"),
        ("+4", "4"),
        ("12.50", "12.5"),
        ("7.", "7"),
        ("**42**", "42"),
        (" 42 ", "42"),
        ("-0", "0"),
        ("-0.00", "0"),
        (".5", "0.5"),
        ("100.0", "100"),
        ("123456789012345678901234567890.5", "123456789012345678901234567890.5"),
        ("five", None),
        ("1,00", None),
        ("3 4", None),
        ("", None),
    ],
)
def test_normalize_number_gives_the_canonical_string_or_none(raw, expected):
    assert normalize_number(raw) == expected


def test_normalize_number_uses_exact_decimals_not_floats():
    assert normalize_number("0.30000000000000004") == "0.30000000000000004"
    assert normalize_number("0.1000") == "0.1"


@given(st.decimals(allow_nan=False, allow_infinity=False, places=4, max_value=10**12, min_value=-(10**12)))
def test_normalize_number_round_trips_random_decimals(d):
    plain = normalize_number(format(d, "f"))
    grouped = normalize_number(format(d, ",f"))
    assert plain is not None
    assert plain == grouped
    assert Decimal(plain) == d
    assert normalize_number(plain) == plain  # canonical form is a fixed point


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_extract_answer_reads_any_integer_after_hashes(n):
    assert extract_answer(f"some reasoning 1 + 2 = 3\n#### {n:,}") == str(n)


@pytest.mark.parametrize(
    ("pred", "gold", "match"),
    [
        ("5", "5", True),
        ("5.0", "5", True),
        ("1000", "1,000", True),
        ("$1,000.00", "1000", True),
        ("+4", "4", True),
        ("12.50", "12.5", True),
        ("-3", "3", False),
        ("5", "6", False),
        ("0.30000000000000004", "0.3", False),
        (None, "5", False),
        ("five", "5", False),
        ("", "0", False),
    ],
)
def test_answers_match_compares_numbers_not_strings(pred, gold, match):
    assert answers_match(pred, gold) is match


def test_answers_match_rejects_a_non_numeric_gold_answer():
    with pytest.raises(ValueError, match="gold answer 'five' is not a number"):
        answers_match("5", "five")
