"""Job config loading, overrides and errors; the output row schema."""

from __future__ import annotations

import pyarrow as pa
import pytest

from schemas import OUTPUT_COLUMNS, OUTPUT_SCHEMA, ConfigError, JobConfig
from schemas.rows import empty_row, markdown_table, output_schema


def test_defaults_yaml_and_flags_layer_in_order(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  uri: s3://bucket/shards/\n  id_column: key\nsparsity:\n  method: fastv\n"
                    "  keep_ratio: 0.25\ngeneration:\n  max_new_tokens: 32\n")
    config = JobConfig.load(path, {"generation.max_new_tokens": 8, "output.uri": "/tmp/out"},
                            base={"generation": {"task": "vqa"}})
    assert config.input.uri == "s3://bucket/shards/" and config.input.id_column == "key"
    assert config.sparsity.method == "fastv" and config.sparsity.keep_ratio == 0.25
    assert config.generation.max_new_tokens == 8 and config.generation.task == "vqa"
    assert config.output.uri == "/tmp/out" and config.output.resume
    assert JobConfig.load().sparsity.method == "sparsevlm"


def test_schedule_keeps_counts_and_ratios_apart():
    config = JobConfig.load(overrides={"sparsity.schedule": {2: 300, 6: 0.5}})
    assert config.sparsity.schedule == {2: 300, 6: 0.5}
    assert isinstance(config.sparsity.schedule[2], int) and isinstance(config.sparsity.schedule[6], float)


@pytest.mark.parametrize("yaml_text, overrides, expected", [
    ("generation:\n  max_new_token: 5\n", {}, "generation.max_new_token: Extra inputs are not permitted"),
    ("", {"sparsity.method": "pdrop"}, "sparsity.method: Input should be"),
    ("", {"sparsity.preset": 100}, "sparsity.preset"),
    ("", {"sparsity.preset": 64, "sparsity.keep_ratio": 0.5}, "give one budget, not preset and keep_ratio"),
    ("", {"media.num_frames": 80}, "num_frames (80) exceeds max_frames (64)"),
    ("", {"generation.temperature": -1}, "generation.temperature: Input should be greater than or equal to 0"),
    ("- a\n- b\n", {}, "must be a mapping of sections"),
    ("", {"nosection": 1}, "must name section.field"),
], ids=["typo", "method", "preset", "two-budgets", "frames", "temperature", "not-a-mapping", "bad-override"])
def test_errors_name_the_field_and_why(tmp_path, yaml_text, overrides, expected):
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        JobConfig.load(path, overrides)
    assert expected in str(error.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        JobConfig.load(tmp_path / "nope.yaml")


def test_output_schema_columns_and_rows():
    required = ["id", "task", "prompt", "output", "error", "model", "method", "n_prompt_tokens", "n_visual_tokens",
                "n_visual_tokens_kept", "equiv_visual_tokens", "n_generated_tokens", "preprocess_ms", "vision_ms",
                "prefill_ms", "decode_ms"]
    assert all(name in OUTPUT_COLUMNS for name in required)
    assert OUTPUT_SCHEMA.names == list(OUTPUT_COLUMNS)
    assert output_schema(pa.int64()).field("id").type == pa.int64()
    row = empty_row(7, error="decode: not an image", task="caption",
                    kept_per_pruning_layer=[(2, 300)], kept_visual_positions=[0, 5])
    table = pa.Table.from_pylist([row], schema=output_schema(pa.int64()))
    assert table.column("output").null_count == 1 and table.column("id")[0].as_py() == 7
    with pytest.raises(KeyError, match="not output columns"):
        empty_row(1, answer="x")
    assert all(f"`{name}`" in markdown_table() for name in OUTPUT_COLUMNS)


def test_every_sparsity_knob_from_yaml_and_from_flags(tmp_path):
    from pipeline.cli import overrides, parser
    from sparsevlm import SparsityConfig

    path = tmp_path / "job.yaml"
    path.write_text("sparsity:\n  method: sparsevlm\n  schedule: {2: 300, 6: 0.5}\n  tau: 0.2\n  theta: 0.05\n"
                    "  recycle: false\n  rank_adaptive: true\n  rank_scale: 8\n  rank_bias: 1.5\n  fastv_layer: 3\n")
    expected = SparsityConfig(method="sparsevlm", schedule={2: 300, 6: 0.5}, tau=0.2, theta=0.05, recycle=False,
                              rank_adaptive=True, rank_scale=8.0, rank_bias=1.5, fastv_layer=3)
    assert JobConfig.load(path).sparsity.engine_config() == expected
    argv = ["--method", "sparsevlm", "--schedule", "2:300,6:r0.5", "--tau", "0.2", "--theta", "0.05", "--recycle",
            "off", "--rank-adaptive", "--rank-scale", "8", "--rank-bias", "1.5", "--fastv-layer", "3"]
    assert JobConfig.load(overrides=overrides(parser("").parse_args(argv))).sparsity.engine_config() == expected
    # one label for the whole section, over a YAML that said otherwise; flags still apply on top
    flags = overrides(parser("").parse_args(["--sparsity", expected.label]))
    assert JobConfig.load(path, flags).sparsity.engine_config() == expected
    flags = overrides(parser("").parse_args(["--sparsity", "fastv-r0.25", "--fastv-layer", "5"]))
    assert JobConfig.load(path, flags).sparsity.label == "fastv-r0.25+fastv_layer=5"


def test_sparsity_rules_are_the_engines():
    with pytest.raises(ConfigError, match="rank_adaptive applies to method='sparsevlm' only"):
        JobConfig.load(overrides={"sparsity.method": "fastv", "sparsity.rank_adaptive": True})
    with pytest.raises(ConfigError, match="tau must be in"):
        JobConfig.load(overrides={"sparsity.tau": 2.0})
    from pipeline.cli import parser

    with pytest.raises(SystemExit):
        parser("").parse_args(["--schedule", "2-300"])


def test_vision_fp8_from_yaml_and_from_the_flag(tmp_path):
    from pipeline.cli import overrides, parser

    assert JobConfig.load().model.vision_fp8 is False
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  vision_fp8: true\n")
    assert JobConfig.load(path).model.vision_fp8 is True
    assert JobConfig.load(overrides=overrides(parser("").parse_args(["--vision-fp8"]))).model.vision_fp8 is True
    path.write_text("model:\n  vision_fp8: maybe\n")
    with pytest.raises(ConfigError, match="vision_fp8"):
        JobConfig.load(path)
