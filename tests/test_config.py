"""entropy_core/config.py: every shipped YAML loads, defaults are the demo, every bad input names its key."""
from pathlib import Path

import pytest

from entropy_core.config import (DEMO_BASE, ConfigError, MeasureConfig, config_from_dict, config_section_dict,
                                 dump_config, load_config)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _problems(data: dict, overrides=()) -> str:
    """The ConfigError message for `data`; fails the test if `data` is accepted."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, overrides)
    return str(info.value)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ shipped files
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, MeasureConfig)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), f"{path.name} must open with a comment saying what it is for"
    assert "python flows/measure.py" in text, f"{path.name} must show the command that runs it"


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"demo.yaml", "qwen2_5_1_5b.yaml"} <= names


def test_demo_yaml_equals_model_defaults():
    # the defaults in the model ARE the demo; demo.yaml writes them out as documentation
    assert load_config(CONFIGS / "demo.yaml") == MeasureConfig()


def test_demo_defaults():
    cfg = MeasureConfig()
    assert cfg.checkpoint.base == DEMO_BASE and cfg.checkpoint.adapter is None and cfg.checkpoint.optimizer is None
    assert (cfg.batches.B_E, cfg.batches.B_U, cfg.batches.G) == (16, 2, 4)
    assert (cfg.generation.top_k, cfg.generation.top_p, cfg.generation.temperature) == (0, 1.0, 1.0)
    assert cfg.generation.max_new_tokens == 48 and cfg.generation.stop == "</answer>"
    assert cfg.estimator.eta_list == [2.0e-6, 5.0e-6, 1.0e-5, 2.0e-5]
    assert cfg.precision.runtime_dtype == "float32" and not cfg.precision.allow_tf32
    assert cfg.precision.matmul_precision == "highest"
    assert cfg.update.dropout is False and cfg.update.clip_norm is None
    assert cfg.data.format_weight == 0.1 and cfg.output_dir == "runs/demo"
    assert cfg.pipeline.retry_delay_seconds == [5.0, 30.0]


def test_qwen_config_is_the_real_setting():
    cfg = load_config(CONFIGS / "qwen2_5_1_5b.yaml")
    assert (cfg.batches.B_E, cfg.batches.B_U, cfg.batches.G) == (2048, 64, 8)
    assert cfg.precision.runtime_dtype == "float64" and cfg.device == "cuda"
    assert cfg.checkpoint.adapter and cfg.checkpoint.optimizer


def test_every_field_has_a_description():
    # the Prefect UI renders these as the parameter form
    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, f"{prefix}{name}.")
    walk(MeasureConfig, "")
    assert MeasureConfig.model_json_schema()["properties"]["batches"]


def test_dump_round_trips_and_sections_are_json():
    cfg = load_config(CONFIGS / "qwen2_5_1_5b.yaml")
    assert config_from_dict(dump_config(cfg)) == cfg
    assert config_section_dict(cfg, "update") == {"microbatch_size": "auto", "clip_norm": None, "dropout": False}
    assert config_section_dict(cfg, "estimator")["eta_list"] == [8.0e-7, 1.6e-6, 3.2e-6, 6.4e-6, 1.28e-5]
    with pytest.raises(ValueError, match="unknown config section 'updat'.*update"):
        config_section_dict(cfg, "updat")


def test_empty_section_means_defaults():
    assert config_from_dict({"pipeline": None}).pipeline.retries == 2


# ------------------------------------------------------------------------------------------ one bad input each
@pytest.mark.parametrize("data, path, needle", [
    ({"batches": {"BE": 16}}, "batches.BE", "did you mean batches.B_E"),
    ({"loging": {}}, "loging", "did you mean logging"),
    ({"batches": {"max_new_tokens": 8}}, "batches.max_new_tokens", "generation.max_new_tokens"),
    ({"batches": {"B_E": "many"}}, "batches.B_E", "valid integer"),
    ({"checkpoint": "smollm2_135m"}, "checkpoint", "must be a section"),
    ({"batches": {"B_E": 0}}, "batches.B_E", "greater than 0"),
    ({"batches": {"B_E": -3}}, "batches.B_E", "got -3"),
    ({"batches": {"G": 1}}, "batches.G", "no advantage can be formed with one response per prompt"),
    ({"estimator": {"eta_list": []}}, "estimator.eta_list", "is empty"),
    ({"estimator": {"eta_list": [1e-5, 2e-5, 0]}}, "estimator.eta_list[2]", "ΔH(0) is 0 by definition"),
    ({"estimator": {"eta_list": [1e-5, float("nan")]}}, "estimator.eta_list[1]", "finite"),
    ({"estimator": {"eta_list": [1e-5, 1e-5]}}, "estimator.eta_list", "repeats"),
    ({"estimator": {"fd_step": 0}}, "estimator.fd_step", "greater than 0"),
    ({"generation": {"top_k": 50}}, "generation.top_k", "generation.top_k=50 truncates the sampling distribution"),
    ({"generation": {"top_p": 0.9}}, "generation.top_p", "generation.top_p=0.9 truncates"),
    ({"generation": {"temperature": 0}}, "generation.temperature", "greater than 0"),
    ({"precision": {"runtime_dtype": "float16"}}, "precision.runtime_dtype", "'float16'"),
    ({"precision": {"runtime_dtype": "fp8"}}, "precision.runtime_dtype", "'fp8'"),
    ({"precision": {"runtime_dtype": "float128"}}, "precision.runtime_dtype", "'float32' or 'float64'"),
    ({"precision": {"matmul_precision": "high"}}, "precision.matmul_precision", "precision.allow_tf32=false"),
    ({"precision": {"matmul_precision": "medium"}}, "precision.matmul_precision", "switches TF32 on"),
    ({"checkpoint": {"base": "qwen2_5_15"}}, "checkpoint.adapter",
     "required unless checkpoint.base is smollm2_135m (the demo)"),
    ({"checkpoint": {"adapter": "ckpt/adapter"}}, "checkpoint.optimizer", "checkpoint.adapter is set"),
    ({"checkpoint": {"optimizer": "ckpt/optimizer.pt"}}, "checkpoint.adapter", "checkpoint.optimizer is set"),
    ({"checkpoint": {"demo": {"lr": 0}}}, "checkpoint.demo.lr", "greater than 0"),
    ({"data": {"prompt_template": "Q: {q}"}}, "data.prompt_template", "{question}"),
    ({"data": {"format_weight": 1.5}}, "data.format_weight", "less than or equal to 1"),
    ({"update": {"clip_norm": -1.0}}, "update.clip_norm", "greater than 0"),
    ({"logging": {"level": "verbose"}}, "logging.level", "'verbose'"),
    ({"device": "gpu"}, "device", "auto, cpu, cuda or cuda:N"),
])
def test_bad_value_names_its_key(data, path, needle):
    message = _problems(data)
    assert f"\n  {path}: " in message, message
    assert needle in message, message
    assert message.startswith("1 problem in config:"), message


def test_valid_edge_values_pass():
    cfg = config_from_dict({"device": "cuda:1", "estimator": {"eta_list": [-1e-5, 1e-5]},
                            "precision": {"allow_tf32": True, "matmul_precision": "high"},
                            "checkpoint": {"adapter": "a", "optimizer": "a/optimizer.pt"}})
    assert cfg.device == "cuda:1" and cfg.estimator.eta_list == [-1e-5, 1e-5]


def test_every_problem_reported_at_once():
    message = _problems({
        "batches": {"B_E": 0, "G": 1},
        "estimator": {"eta_list": [1e-5, 0]},
        "generation": {"top_k": 50},
        "precision": {"runtime_dtype": "float16", "matmul_precision": "high"},
        "loging": {"level": "debug"},
    })
    assert message.startswith("7 problems in config:"), message
    for path in ("batches.B_E", "batches.G", "estimator.eta_list[1]", "generation.top_k",
                 "precision.runtime_dtype", "precision.matmul_precision", "loging"):
        assert f"\n  {path}: " in message, f"{path} missing from:\n{message}"


# ------------------------------------------------------------------------------------------ --set overrides
def test_overrides_parse_lists_null_and_floats(tmp_path):
    path = _write(tmp_path, "checkpoint:\n  adapter: a\n  optimizer: a/optimizer.pt\n")
    cfg = load_config(path, ["estimator.eta_list=[1e-6,2e-6]", "checkpoint.adapter=null",
                             "checkpoint.optimizer=null", "update.clip_norm=1e-3", "batches.B_E=64",
                             "generation.stop=null", "precision.runtime_dtype=float64"])
    assert cfg.estimator.eta_list == [1e-6, 2e-6]          # YAML 1.1 reads 1e-6 as a string; still a float here
    assert cfg.checkpoint.adapter is None and cfg.checkpoint.optimizer is None
    assert cfg.update.clip_norm == 1e-3 and cfg.batches.B_E == 64
    assert cfg.generation.stop is None and cfg.precision.runtime_dtype == "float64"


def test_override_creates_missing_section():
    cfg = config_from_dict({}, ["pipeline.retries=0", "checkpoint.demo.steps=1"])
    assert cfg.pipeline.retries == 0 and cfg.checkpoint.demo.steps == 1


def test_override_without_equals_is_an_error():
    message = _problems({}, ["batches.B_E"])
    assert "--set batches.B_E: expected 'dotted.key=value'" in message, message


def test_override_errors_are_reported_like_yaml_errors():
    message = _problems({}, ["batches.BE=3", "batches.B_E=0", "batches.B_U.x=1"])
    assert message.startswith("3 problems in config:"), message
    assert "batches.BE: unknown key; did you mean batches.B_E? (from --set batches.BE=3)" in message, message
    assert "batches.B_E: Input should be greater than 0 (got 0) (from --set batches.B_E=0)" in message, message
    assert "batches.B_U: is a value, not a section; cannot --set batches.B_U.x=1" in message, message


# ------------------------------------------------------------------------------------------ files
def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "batches:\n  B_E: 16\n  B_U: [2\ngeneration:\n  top_k: 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "YAML syntax error at line" in message, message


def test_yaml_duplicate_key_is_an_error(tmp_path):
    path = _write(tmp_path, "batches:\n  B_E: 16\n  B_E: 32\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'B_E' \(first at line 2\)"):
        load_config(path)


def test_file_problems_name_the_file(tmp_path):
    path = _write(tmp_path, "batches:\n  B_E: 0\n")
    with pytest.raises(ConfigError, match=f"1 problem in {path}:\n  batches.B_E: "):
        load_config(path)


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="<top level>: must be a mapping"):
        load_config(_write(tmp_path, text))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
