"""Schema records: YAML / JSON round trips, validation errors that name the field, overrides."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvdistill.schemas import (
    DEFAULT_TEMPLATE,
    AlignSpec,
    CalibrateConfig,
    CompareConfig,
    ConfigError,
    DataSpec,
    DemoConfig,
    DumpConfig,
    DumpTask,
    EvalConfig,
    Example,
    JobsConfig,
    KVGeometry,
    LatentSpec,
    ModelSpec,
    Record,
    SlurmSpec,
    StoreSpec,
    SyntheticSpec,
    TeacherSpec,
    TrainConfig,
    apply_overrides,
    build,
)

TEACHER = ModelSpec(
    name_or_path="Qwen/Qwen2-7B",
    revision="main",
    dtype="bfloat16",
    prompt_template="Q: {question}\nThink: {reasoning}\nA: {answer}",
    name="qwen-7b",
)
STUDENT = ModelSpec(name_or_path="/ckpt/student", dtype="float16")
DATA = DataSpec(
    source="gsm8k.jsonl",
    split="test",
    config_name="main",
    limit=50,
    synthetic=SyntheticSpec(n_train=10, n_test=3, seed=7, style="sentences", min_steps=1, max_steps=3, max_number=99),
)
GEOMETRY = KVGeometry(num_layers=28, num_kv_heads=4, head_dim=128)

# One instance of every record, with every field away from its default where it has one.
RECORDS: list[Record] = [
    Example(id="gsm8k-0", question="2+2?", reasoning="2+2=4", answer="4"),
    TEACHER,
    STUDENT,
    DATA,
    DATA.synthetic,
    AlignSpec(),
    GEOMETRY,
    StoreSpec(
        student=STUDENT,
        geometry=GEOMETRY,
        tokenizer_fingerprint="abc",
        data=DATA,
        data_fingerprint="0123456789abcdef",
        num_shards=8,
        kv_dtype="float32",
        schema_version=1,
    ),
    TeacherSpec(
        name="qwen-7b",
        model=TEACHER,
        geometry=GEOMETRY,
        align=AlignSpec(layer_map="layermap.json", time_map="segment_linear", projection="pca.npz"),
        time_map="segment_linear",
        layer_map=[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0 / 3.0]],
        width=96,
        fingerprint="feedface",
        layer_similarity=[[0.9, 0.1, -0.02]] * 3,
        projection={"dim": 96, "k_explained_variance": [0.99, 0.98, 0.97]},
    ),
    CalibrateConfig(
        teacher=TEACHER,
        student=STUDENT,
        data=DATA,
        samples=16,
        top_k=3,
        out="m.json",
        pca=32,
        time_map="char_overlap",
        batch_size=2,
        device="cpu",
    ),
    DumpConfig(
        teacher=TEACHER,
        student=STUDENT,
        store="out.zarr",
        data=DATA,
        shard=3,
        num_shards=8,
        batch_size=4,
        max_len=512,
        on_too_long="skip",
        kv_dtype="float32",
        device="cuda:1",
    ),
    TrainConfig(
        store="out.zarr",
        student=STUDENT,
        out="runs/a",
        teachers=["qwen-7b", "llama"],
        teacher_weights={"qwen-7b": 0.75, "llama": 0.25},
        kv_weight=0.0,
        ce_weight=2.5,
        kv_norm="none",
        lr=3e-4,
        adapter_lr=1e-2,
        weight_decay=0.01,
        batch_size=2,
        max_steps=7,
        warmup_steps=1,
        grad_clip=0.0,
        seed=3,
        shuffle_buffer=1,
        num_workers=2,
        log_every=1,
        device="cpu",
    ),
    EvalConfig(
        model="runs/a",
        data=DATA,
        prompt_template=TEACHER.prompt_template,
        batch_size=1,
        max_new_tokens=8,
        out="eval.json",
        device="cpu",
    ),
    DemoConfig(
        out="demo", data=DATA, num_shards=3, teacher_steps=1, student_steps=2, batch_size=4, seed=9, kv_weight=0.5
    ),
]


def minimal_dump(**extra) -> dict:
    return {"teacher": {"name_or_path": "t"}, "student": {"name_or_path": "s"}, "store": "out.zarr", **extra}


def minimal_train(**extra) -> dict:
    return {"store": "out.zarr", "student": {"name_or_path": "s"}, "out": "runs/a", **extra}


def config_error(cls: type[Record], data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        cls.from_dict(data)
    return str(e.value)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips_through_yaml_and_json_text(record):
    cls = type(record)
    assert cls.from_yaml(record.to_yaml()) == record
    assert cls.from_json(record.to_json()) == record
    assert cls.from_dict(json.loads(record.to_json())) == record
    assert json.loads(record.to_json()) == record.to_dict()


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_round_trips_through_a_saved_file(record, suffix, tmp_path):
    path = record.save(tmp_path / "sub" / f"config{suffix}")
    assert path.exists()
    text = path.read_text()
    if suffix == ".json":
        assert json.loads(text) == record.to_dict()
    else:
        assert not text.lstrip().startswith("{")  # block YAML a person can edit, not JSON
    assert type(record).load(path) == record


def test_nested_records_are_built_from_mappings_in_python_too():
    cfg = DumpConfig(teacher={"name_or_path": "t"}, student=STUDENT, store="s", data={"split": "test"})
    assert cfg.teacher == ModelSpec(name_or_path="t")
    assert cfg.data == DataSpec(split="test")
    assert EvalConfig(model="m").data.split == "test"  # eval's default data is the test split


# --- validation errors -------------------------------------------------------------------------


def test_a_wrong_field_type_names_the_field_and_the_expected_type():
    msg = config_error(DumpConfig, minimal_dump(batch_size="eight"))
    assert msg == "DumpConfig.batch_size: expected int, got str 'eight'"


def test_a_wrong_nested_field_type_names_the_dotted_path():
    msg = config_error(DumpConfig, minimal_dump(teacher={"name_or_path": 7}))
    assert msg == "DumpConfig.teacher.name_or_path: expected str, got int 7"
    msg = config_error(DumpConfig, minimal_dump(data={"synthetic": {"seed": "x"}}))
    assert msg.startswith("DumpConfig.data.synthetic.seed: expected int")
    msg = config_error(DumpConfig, minimal_dump(teacher="Qwen/Qwen2-7B"))
    assert msg.startswith("DumpConfig.teacher: expected a mapping for ModelSpec, got str")


def test_list_and_dict_element_errors_name_the_element():
    assert config_error(TrainConfig, minimal_train(teachers=["a", 3])).startswith(
        "TrainConfig.teachers[1]: expected str, got int 3"
    )
    assert config_error(TrainConfig, minimal_train(teachers="a")).startswith(
        "TrainConfig.teachers: expected a list, got str"
    )
    assert config_error(TrainConfig, minimal_train(teacher_weights={"a": 1.0, "b": "half"})).startswith(
        "TrainConfig.teacher_weights['b']: expected float, got str 'half'"
    )
    assert config_error(TrainConfig, minimal_train(teacher_weights={1: 0.5})).startswith(
        "TrainConfig.teacher_weights key: expected str, got int 1"
    )
    assert config_error(TrainConfig, minimal_train(teacher_weights=[0.5])).startswith(
        "TrainConfig.teacher_weights: expected a mapping"
    )
    spec = RECORDS[8].to_dict() | {"layer_map": [[1.0, 0.0], [0.5, "x"]]}
    assert config_error(TeacherSpec, spec).startswith("TeacherSpec.layer_map[1][1]: expected float, got str 'x'")


def test_an_unknown_field_is_refused_with_the_list_of_valid_fields():
    msg = config_error(DumpConfig, minimal_dump(batchsize=8))
    assert msg.startswith("DumpConfig: unknown field(s) ['batchsize']; valid fields are [")
    valid = re.search(r"valid fields are (\[.*\])", msg).group(1)
    assert valid == repr(sorted(f for f in DumpConfig.__dataclass_fields__))
    assert config_error(DumpConfig, minimal_dump(teacher={"name_or_path": "t", "revison": "v1"})).startswith(
        "DumpConfig.teacher: unknown field(s) ['revison']"
    )


def test_a_missing_required_field_is_named():
    assert config_error(DumpConfig, {"store": "s"}) == "DumpConfig: missing required field(s) ['student', 'teacher']"
    assert (
        config_error(DumpConfig, minimal_dump(teacher={}))
        == "DumpConfig.teacher: missing required field(s) ['name_or_path']"
    )
    with pytest.raises(ConfigError, match="DumpConfig: missing required field"):
        DumpConfig.from_yaml("")


def test_a_literal_violation_lists_the_allowed_values():
    assert (
        config_error(DumpConfig, minimal_dump(on_too_long="ignore"))
        == "DumpConfig.on_too_long: expected one of 'error' | 'skip', got 'ignore'"
    )
    assert (
        config_error(DumpConfig, minimal_dump(teacher={"name_or_path": "t", "dtype": "int8"}))
        == "DumpConfig.teacher.dtype: expected one of 'float32' | 'bfloat16' | 'float16', got 'int8'"
    )


def test_bool_is_not_an_int_and_a_float_is_not_an_int():
    assert (
        config_error(DumpConfig, minimal_dump(batch_size=True)) == "DumpConfig.batch_size: expected int, got bool True"
    )
    assert config_error(DumpConfig, minimal_dump(batch_size=8.0)).startswith("DumpConfig.batch_size: expected int")
    assert config_error(TrainConfig, minimal_train(lr=False)).startswith("TrainConfig.lr: expected float, got bool")
    with pytest.raises(ConfigError, match=r"DumpConfig.shard: expected int, got bool"):
        DumpConfig(teacher=STUDENT, student=STUDENT, store="s", shard=False)  # in Python too


def test_an_int_is_accepted_as_a_float_and_stored_as_one():
    cfg = TrainConfig.from_dict(minimal_train(lr=1, kv_weight=0))
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.kv_weight == 0.0 and type(cfg.kv_weight) is float
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert type(TrainConfig.from_dict(minimal_train(teacher_weights={"a": 2})).teacher_weights["a"]) is float


def test_null_unsets_an_optional_field_but_not_a_required_one():
    assert TrainConfig.from_dict(minimal_train(teachers=None)).teachers is None
    assert config_error(DumpConfig, minimal_dump(store=None)).startswith(
        "DumpConfig.store: expected str, got NoneType"
    )


def test_yaml_floats_in_exponent_notation_without_a_dot_load_as_floats():
    cfg = TrainConfig.from_yaml("store: s\nstudent: {name_or_path: x}\nout: o\nlr: 1e-3\n")
    assert cfg.lr == 1e-3


# --- load with overrides -----------------------------------------------------------------------


def test_load_applies_dotted_overrides_over_the_file_and_none_leaves_the_file_value(tmp_path):
    path = tmp_path / "dump.yaml"
    path.write_text(
        "teacher: {name_or_path: file-teacher, dtype: bfloat16}\nstudent: {name_or_path: s}\n"
        "store: file.zarr\nbatch_size: 8\nnum_shards: 4\n"
    )
    cfg = DumpConfig.load(
        path,
        {
            "teacher.name_or_path": "flag-teacher",
            "shard": 3,
            "batch_size": None,
            "data.synthetic.seed": 5,
            "store": None,
        },
    )
    assert cfg.teacher == ModelSpec(name_or_path="flag-teacher", dtype="bfloat16")  # sibling kept
    assert (cfg.shard, cfg.num_shards, cfg.batch_size, cfg.store) == (3, 4, 8, "file.zarr")
    assert cfg.data.synthetic.seed == 5 and cfg.data.synthetic.n_train == SyntheticSpec().n_train


def test_an_override_is_validated_and_the_error_names_the_file_and_field(tmp_path):
    path = tmp_path / "dump.yaml"
    DumpConfig.from_dict(minimal_dump(num_shards=2)).save(path)
    with pytest.raises(ConfigError) as e:
        DumpConfig.load(path, {"shard": 2})
    assert str(e.value) == f"{path}: DumpConfig.shard: need 0 <= shard < num_shards, got 2 of 2"


def test_build_layers_a_base_under_the_file_under_the_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("store: file.zarr\nstudent: {name_or_path: s}\nout: o\nweight_decay: 0.0\nlora_r: 16\n")
    base = {
        "lora_r": 128,
        "weight_decay": 0.1,
        "grad_clip": 2.0,
        "student": {"name_or_path": "base", "dtype": "bfloat16"},
    }
    cfg = build(TrainConfig, path, {"lora_r": 8, "grad_clip": None}, base=base)
    assert (cfg.lora_r, cfg.weight_decay, cfg.grad_clip) == (8, 0.0, 2.0)  # flag > file > base; None: not given
    assert cfg.student == ModelSpec(name_or_path="s")  # a layer replaces a nested record whole
    assert (
        build(TrainConfig, None, {"store": "s", "student.name_or_path": "x", "out": "o"}, base=base).student.dtype
        == "bfloat16"
    )


@pytest.mark.parametrize("where", ["file", "flag"])
def test_a_field_set_above_drops_the_field_below_that_stands_in_for_it(where, tmp_path):
    """warmup_ratio is used instead of warmup_steps, num_train_epochs instead of max_steps: a
    lower layer's stand-in must not silently win over what a higher layer set."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(minimal_train(**({"warmup_steps": 5, "max_steps": 50} if where == "file" else {}))))
    flags = {"warmup_steps": 5, "max_steps": 50} if where == "flag" else {}
    cfg = build(TrainConfig, path, flags, base={"warmup_ratio": 0.05, "num_train_epochs": 2.0})
    assert (cfg.warmup_ratio, cfg.warmup_over(50), cfg.num_train_epochs, cfg.max_steps) == (None, 5, None, 50)
    kept = build(TrainConfig, path, {"warmup_ratio": 0.1}, base={"warmup_steps": 5})
    assert (kept.warmup_ratio, kept.warmup_steps) == (0.1, 5)  # a stand-in set above keeps what it stands in for


CONFIG_RECORDS = [DumpConfig, CalibrateConfig, TrainConfig, EvalConfig, DemoConfig, CompareConfig, JobsConfig]


def _documented(cls, seen):
    if cls in seen:
        return
    seen.add(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield cls, f
        for arm in [hints[f.name], *typing.get_args(hints[f.name])]:
            if isinstance(arm, type) and issubclass(arm, Record):
                yield from _documented(arm, seen)


def test_every_field_of_the_config_records_and_their_nested_records_documents_itself():
    """The help text of its flag: `option(..., help=...)` in schemas/records.py."""
    seen: set = set()
    undocumented = [
        f"{cls.__name__}.{f.name}"
        for top in CONFIG_RECORDS
        for cls, f in _documented(top, seen)
        if not f.metadata.get("help")
    ]
    assert not undocumented
    assert {ModelSpec, DataSpec, SyntheticSpec, AlignSpec, LatentSpec, SlurmSpec, DumpTask} <= seen


def test_option_is_a_dataclass_field_with_its_default_or_factory_and_the_cli_metadata():
    lr, targets = (next(f for f in dataclasses.fields(TrainConfig) if f.name == n) for n in ("lr", "lora_targets"))
    assert (
        lr.default == 1e-3
        and lr.metadata["aliases"] == ("--learning-rate",)
        and lr.metadata["group"] == "optimisation"
    )
    assert targets.default_factory() == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (
        TrainConfig(store="s", student=STUDENT, out="o").lora_targets
        is not TrainConfig(store="s", student=STUDENT, out="o").lora_targets
    )


def test_apply_overrides_copies_its_input_and_refuses_to_descend_into_a_value():
    data = {"teacher": {"name_or_path": "a"}, "store": "s"}
    out = apply_overrides(data, {"teacher.name": "x", "student": STUDENT})
    assert data == {"teacher": {"name_or_path": "a"}, "store": "s"}
    assert out == {"teacher": {"name_or_path": "a", "name": "x"}, "store": "s", "student": STUDENT.to_dict()}
    with pytest.raises(ConfigError, match="cannot set store.x: store is not a mapping"):
        apply_overrides(data, {"store.x": 1})


def test_a_malformed_or_missing_config_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {name_or_path: t\nstore: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(bad))}: cannot parse"):
        DumpConfig.load(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"store": ')
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(bad_json))}: cannot parse"):
        DumpConfig.load(bad_json)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping of DumpConfig fields"):
        DumpConfig.load(listed)
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        DumpConfig.load(tmp_path / "nope.yaml")


def test_a_bad_value_in_a_file_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("store: s\nstudent: {name_or_path: x}\nout: o\nmax_steps: many\n")
    with pytest.raises(ConfigError) as e:
        TrainConfig.load(path)
    assert str(e.value) == f"{path}: TrainConfig.max_steps: expected int, got str 'many'"


# --- record-specific validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "Q: {question} R: {reasoning}",  # no answer
        "{reasoning} {question} {answer}",  # out of order
        "Q: {question} A: {answer} R: {reasoning}",
        "Q: {question} R: {reasoning} A: {answer",  # not a placeholder
        "",
    ],
)
def test_a_prompt_template_needs_question_reasoning_answer_in_order(template):
    with pytest.raises(
        ConfigError, match=r"ModelSpec.prompt_template: must contain \{question\}, \{reasoning\} and \{answer\}"
    ):
        ModelSpec(name_or_path="m", prompt_template=template)
    with pytest.raises(ConfigError, match=r"DumpConfig.teacher|ModelSpec.prompt_template"):
        DumpConfig.from_dict(minimal_dump(teacher={"name_or_path": "t", "prompt_template": template}))


def test_a_prompt_template_with_the_placeholders_in_order_is_accepted():
    assert (
        ModelSpec(name_or_path="m", prompt_template="{question}{reasoning}{answer}").prompt_template
        == "{question}{reasoning}{answer}"
    )
    assert ModelSpec(name_or_path="m").prompt_template == DEFAULT_TEMPLATE


@pytest.mark.parametrize(
    "name_or_path, name, short",
    [
        ("Qwen/Qwen2-7B", None, "Qwen2-7B"),
        ("/ckpt/runs/student-0.5b/", None, "student-0.5b"),
        ("my org/my model (v2)", None, "my-model--v2-"),
        ("Qwen/Qwen2-7B", "qwen7", "qwen7"),
        ("/", None, "model"),
    ],
)
def test_model_short_name_is_the_given_name_or_a_safe_last_path_component(name_or_path, name, short):
    assert ModelSpec(name_or_path=name_or_path, name=name).short_name == short


@pytest.mark.parametrize("name", ["a/b", "has space", "", "ünï"])
def test_a_model_name_with_unsafe_characters_is_refused(name):
    with pytest.raises(ConfigError, match="ModelSpec.name"):
        ModelSpec(name_or_path="m", name=name)


@pytest.mark.parametrize("shard, num_shards", [(2, 2), (-1, 2), (5, 1)])
def test_dump_shard_must_lie_in_the_shard_range(shard, num_shards):
    with pytest.raises(
        ConfigError, match=rf"DumpConfig.shard: need 0 <= shard < num_shards, got {shard} of {num_shards}"
    ):
        DumpConfig.from_dict(minimal_dump(shard=shard, num_shards=num_shards))


def test_zero_shards_is_refused():
    with pytest.raises(ConfigError, match=r"DumpConfig.num_shards: must be >= 1, got 0"):
        DumpConfig.from_dict(minimal_dump(shard=0, num_shards=0))


def test_dump_shard_range_boundaries_are_accepted():
    assert DumpConfig.from_dict(minimal_dump(shard=1, num_shards=2)).shard == 1
    assert DumpConfig.from_dict(minimal_dump()).shard == 0


@pytest.mark.parametrize(
    "cls, data, match",
    [
        (DumpConfig, minimal_dump(batch_size=0), r"DumpConfig.batch_size: must be >= 1, got 0"),
        (TrainConfig, minimal_train(max_steps=0), r"TrainConfig.max_steps: must be >= 1, got 0"),
        (TrainConfig, minimal_train(kv_weight=-0.1), r"TrainConfig.kv_weight: must be >= 0, got -0.1"),
        (
            TrainConfig,
            minimal_train(teacher_weights={"a": -1}),
            r"TrainConfig.teacher_weights\['a'\]: must be >= 0, got -1",
        ),
        (DataSpec, {"limit": 0}, r"DataSpec.limit: must be >= 1 or null, got 0"),
        (
            SyntheticSpec,
            {"min_steps": 3, "max_steps": 2},
            r"SyntheticSpec.max_steps: must be >= min_steps \(3\), got 2",
        ),
        (Example, {"id": "", "question": "q", "reasoning": "r", "answer": "1"}, "Example.id: must be a non-empty"),
    ],
)
def test_cross_field_checks_name_the_record_and_the_rule(cls, data, match):
    with pytest.raises(ConfigError, match=match):
        cls.from_dict(data)


# --- property: random valid TrainConfigs round-trip -------------------------------------------

names = st.text(min_size=1, max_size=12)
weights = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_subnormal=True)
any_float = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0, exclude_min=True, max_value=1e6, allow_nan=False)

train_configs = st.builds(
    TrainConfig,
    store=st.text(max_size=20),
    student=st.builds(
        ModelSpec,
        name_or_path=st.text(min_size=1, max_size=20),
        dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    ),
    out=st.text(max_size=20),
    teachers=st.none() | st.lists(names, max_size=4),
    teacher_weights=st.none()
    | st.dictionaries(names, weights | st.integers(0, 10**6), max_size=4).filter(
        lambda w: not w or any(v > 0 for v in w.values())
    ),
    kv_weight=weights,
    ce_weight=weights,
    kv_norm=st.sampled_from(["layer_std", "none"]),
    lr=positive,
    adapter_lr=positive | st.integers(1, 2**40),
    weight_decay=weights,
    batch_size=st.integers(1, 2**31),
    max_steps=st.integers(1, 2**40),
    warmup_steps=st.integers(0, 2**63),
    seed=st.integers(0, 2**64),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=train_configs)
def test_random_valid_train_configs_round_trip_through_yaml_and_json(cfg):
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert TrainConfig.from_json(cfg.to_json()) == cfg
