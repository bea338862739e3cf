"""`kvdistill eval` (CoT mode): batched greedy generation with the KV cache equals each
question generated alone, the generation budget comes from the data, and the speed is
reported."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvdistill.core.data import load_examples
from kvdistill.core.models import load_model, load_tokenizer
from kvdistill.core.prompts import prompt_text, render
from kvdistill.schemas import DEFAULT_TEMPLATE, DataSpec, EvalConfig, ModelSpec
from kvdistill.train.eval import default_max_new_tokens, evaluate, greedy_generate, left_pad

# Large random weights: greedy tokens depend on the prompt and the position, and some rows
# emit EOS (a default-init tiny model repeats one token whatever it is given, which would make
# "batched == alone" hold even with wrong positions or masks).
LIVELY = {"initializer_range": 0.5}


@pytest.fixture(scope="module")
def student(make_model):
    spec = ModelSpec(name_or_path=str(make_model("qwen2", **LIVELY)))
    return load_model(spec, "cpu"), load_tokenizer(spec)


def _prompts(tok, examples) -> list[list[int]]:
    """Prompts of very different lengths: a 7-token one, real questions, and four questions
    run together (several times a real one)."""
    texts = ["Question: 7?\nReasoning:\n"] + [prompt_text(DEFAULT_TEMPLATE, ex.question) for ex in examples[:5]]
    texts.append(prompt_text(DEFAULT_TEMPLATE, " ".join(ex.question for ex in examples[5:9])))
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _alone(model, prompt: list[int], budget: int, eos: int, pad: int) -> list[int]:
    """Reference: transformers' own greedy `generate` on this prompt alone (no padding at all),
    up to and including its first EOS."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=budget,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def test_batched_greedy_generation_equals_each_question_alone_token_for_token(student, examples):
    model, tok = student
    eos, pad, budget = tok.eos_token_id, tok.pad_token_id, 24
    prompts = _prompts(tok, examples)
    lens = sorted(len(p) for p in prompts)
    assert lens[0] <= 8 and lens[-1] >= 3 * lens[len(lens) // 2]  # very different lengths: lots of left padding
    want = [_alone(model, p, budget, eos, pad) for p in prompts]
    ends = sorted(len(w) for w in want if w[-1] == eos)
    assert (
        ends and ends[0] <= 4 and any(len(w) == budget and eos not in w for w in want)
    )  # one row stops early, one runs to the cap
    assert len({tuple(w[:3]) for w in want}) == len(want)  # the tokens depend on the prompt

    ids, mask = left_pad(prompts, pad)
    new = greedy_generate(model, ids, mask, budget, eos, pad)  # [B, G]
    assert new.shape == (len(prompts), budget)
    for row, w, p in zip(new.tolist(), want, prompts, strict=True):
        assert row[: len(w)] == w
        assert row[len(w) :] == [pad] * (budget - len(w))  # padding after EOS
        assert (
            greedy_generate(model, *left_pad([p], pad), budget, eos, pad)[0].tolist() == w
        )  # batch size 1: stops at its EOS


def test_generation_ends_with_the_last_row_s_eos(student, examples):
    model, tok = student
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = _prompts(tok, examples)
    want = [_alone(model, p, 24, eos, pad) for p in prompts]
    early = [p for p, w in zip(prompts, want, strict=True) if w[-1] == eos]
    new = greedy_generate(model, *left_pad(early, pad), 24, eos, pad)
    assert new.shape[1] == max(len(w) for w in want if w[-1] == eos) < 24  # no columns after every row has ended


def test_left_pad_puts_every_prompt_s_last_token_in_the_last_column():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_eval_batches_give_the_predictions_of_batch_size_one(make_model, tiny_data, tmp_path):
    model = str(make_model("qwen2", **LIVELY))
    data = DataSpec(split="train", limit=12, synthetic=tiny_data.synthetic)  # rows 0 and 4 end early with this model
    runs = {}
    for bs in (1, 5, 16):
        out = tmp_path / f"bs{bs}.json"
        result = evaluate(
            EvalConfig(model=model, data=data, batch_size=bs, max_new_tokens=32, device="cpu", out=str(out)),
            progress=False,
        )
        assert result["max_new_tokens"] == 32  # given, so used as is
        assert result["questions_per_second"] > 0 and math.isfinite(result["questions_per_second"])
        runs[bs] = (result, json.loads(out.read_text())["predictions"])
    keys = ("id", "text", "pred", "generated_tokens", "forward_passes", "hit_cap")
    lengths = [p["generated_tokens"] for p in runs[1][1]]
    assert (
        min(lengths) <= 4 and max(lengths) == 32 and len({p["text"] for p in runs[1][1]}) == 12
    )  # some rows stop early
    for bs in (5, 16):
        assert [[p[k] for k in keys] for p in runs[bs][1]] == [
            [p[k] for k in keys] for p in runs[1][1]
        ]  # same rows, in data order
        assert runs[bs][0]["perplexity"] == pytest.approx(runs[1][0]["perplexity"], rel=1e-5)
    assert [p["id"] for p in runs[16][1]] == [ex.id for ex in load_examples(data)]


def test_default_budget_is_the_longest_gold_continuation_x_1_25_plus_16():
    assert default_max_new_tokens([48, 214, 100]) == 284  # GSM8K's range in a Qwen tokenizer: ceil(267.5) + 16
    assert default_max_new_tokens([48]) == 76
    assert default_max_new_tokens([8]) == 26  # exact: no rounding up
    with pytest.raises(ValueError, match="give --max-new-tokens"):
        default_max_new_tokens([])


GSM8K_ROWS = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "answer": "3+4=<<3+4=7>>7\n#### 7",
    },
    {
        "question": (
            "A shop sells 12 pens a day for 5 days, then 20 pens a day for 3 days. Each pen costs $2. How much money"
            " does it make?"
        ),
        "answer": (
            "12*5=<<12*5=60>>60 pens in the first 5 days.\n20*3=<<20*3=60>>60 pens in the next 3 days.\n"
            "60+60=<<60+60=120>>120 pens in all.\n120*2=<<120*2=240>>240 dollars.\n#### 240"
        ),
    },
    {"question": "What is 9 minus 2?", "answer": "9-2=<<9-2=7>>7\n#### 7"},
]


def test_eval_derives_the_budget_from_the_gold_answers_and_reports_it(make_model, tmp_path, capsys):
    from kvdistill.cli import main

    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    model = str(make_model("qwen2"))
    tok = load_tokenizer(ModelSpec(name_or_path=model))
    # The gold continuation a model must write: the rendered text after the prompt, + EOS.
    gold = []
    for ex in load_examples(DataSpec(source=str(path))):
        full = tok(render(DEFAULT_TEMPLATE, ex).text, add_special_tokens=False)["input_ids"]
        prompt = tok(prompt_text(DEFAULT_TEMPLATE, ex.question), add_special_tokens=False)["input_ids"]
        assert full[: len(prompt)] == prompt  # the prompt's tokens do not merge into the reasoning's
        gold.append(len(full) - len(prompt) + 1)
    assert max(gold) > 2 * min(gold)
    want = math.ceil(1.25 * max(gold)) + 16

    result = evaluate(EvalConfig(model=model, data=DataSpec(source=str(path)), device="cpu"), progress=False)
    assert result["max_new_tokens"] == want
    assert result["hit_cap"] == 3  # a random model never says EOS: each row ran the whole derived budget
    assert result["generated_tokens_per_question"] == want

    assert main(["eval", "--model", model, "--data", str(path), "--device", "cpu", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert f"(budget {want})" in out and " questions/s" in out
    assert f"reached --max-new-tokens {want} without finishing" in err
