"""One pydantic model for every experiment YAML: parse, validate, report every problem at once.

A YAML in `configs/` is a `MeasureConfig` written out; every default lives here, never in
`.get(key, default)` elsewhere (STYLE rule 11). The model's defaults ARE the offline demo
(`configs/demo.yaml`), so `MeasureConfig()` is a runnable configuration.

    cfg = load_config("configs/demo.yaml", overrides=["estimator.eta_list=[1e-5]"])
    cfg.batches.B_E                                  # 16
    config_section_dict(cfg, "update")               # JSON-able dict, for a stage's cache key

Validation never stops at the first problem: `ConfigError` lists each one as
`<dotted.path>: <what is wrong>`, unknown keys with the closest valid key. Values that would
make the measurement silently wrong are refused here, before anything runs: top-k / top-p
truncation (DESIGN §2.2), TF32 switched on by matmul_precision (§2.1), η = 0, G = 1.

Field descriptions are user-facing: the Prefect UI renders them as the flow's parameter form.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_serializer, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "DEMO_BASE", "ConfigError", "CheckpointConfig", "DemoCheckpointConfig", "DataConfig", "BatchConfig",
    "GenerationConfig", "UpdateConfig", "EstimatorConfig", "PrecisionConfig", "LoggingConfig",
    "PipelineConfig", "MeasureConfig", "load_config", "config_from_dict", "config_section_dict", "dump_config",
]

DEMO_BASE = "smollm2_135m"   # the only base whose checkpoint the pipeline can build by itself
_HALF_DTYPES = ("float16", "fp16", "half", "bfloat16", "bf16", "float8", "fp8")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _problem(text: str) -> PydanticCustomError:
    """A validation error whose message is `text` verbatim (passed through ctx so braces stay literal)."""
    return PydanticCustomError("config", "{text}", {"text": text})


def _raise_problems(title: str, problems: list[tuple[str, str, Any]]) -> None:
    """Raise every (field, message, input) of a cross-field check at once, each at its own dotted path."""
    if problems:
        raise ValidationError.from_exception_data(
            title, [InitErrorDetails(type=_problem(msg), loc=(key,), input=value) for key, msg, value in problems])


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    # allow_inf_nan=False: inf / nan in any float field is an error.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------------------------------ checkpoint
class DemoCheckpointConfig(_Section):
    """How the demo checkpoint is built when checkpoint.adapter is null (demo base only)."""
    steps: int = Field(2, ge=1, description="Real Dr.GRPO + AdamW steps taken to build the demo checkpoint, so its "
                                            "AdamW state (m, s, step) is non-trivial.")
    seed: int = Field(0, description="Seed for the demo checkpoint's LoRA init and sampling.")
    lora_r: int = Field(8, gt=0, description="LoRA rank of the demo adapter.")
    lora_alpha: int = Field(16, gt=0, description="LoRA alpha of the demo adapter (scale α/r).")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                      description="Modules that get LoRA adapters in the demo checkpoint.")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate for the demo training steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay saved in the demo optimizer state "
                                                        "(non-zero on purpose: DESIGN §2.5).")
    B_U: int = Field(2, gt=0, description="Prompts per demo training step.")
    G: int = Field(4, ge=2, description="Responses per prompt in a demo training step (≥2 for an advantage).")
    max_new_tokens: int = Field(48, gt=0, description="Response length cap while building the demo checkpoint.")


def checkpoint_dir_optimizer(folder: str) -> str:
    """Where checkpoint.dir's optimizer state is: <folder>/optimizer.pt (HF Trainer / TRL layout)."""
    return os.path.join(folder, "optimizer.pt")


class CheckpointConfig(_Section):
    """The policy and its optimizer state: base model + LoRA adapter + AdamW `optimizer.pt`."""
    base: str = Field(DEMO_BASE, min_length=1,
                      description=f"Base model: a registry name (e.g. {DEMO_BASE!r}), a Hugging Face Hub id or a "
                                  "local directory.")
    adapter: str | None = Field(None, description="peft adapter directory (adapter_config.json + "
                                "adapter_model.safetensors). Null is allowed only with the demo base: the pipeline "
                                "then builds and caches a demo checkpoint.")
    optimizer: str | None = Field(None, description="Path to the AdamW optimizer.pt saved with the adapter "
                                  "(a plain optimizer.state_dict(), loaded with weights_only=True). Given together "
                                  "with checkpoint.adapter.")
    dir: str | None = Field(None, min_length=1, description="A HF Trainer / TRL checkpoint folder (checkpoint-N/: "
                            "adapter files and optimizer.pt side by side), instead of checkpoint.adapter and "
                            "checkpoint.optimizer: it sets adapter = dir and optimizer = dir/optimizer.pt.")
    qlora: bool = Field(False, description="Load the base in 4-bit (bitsandbytes). Forward-mode JVPs are then "
                                           "unavailable (DESIGN §2.8); first order comes from finite differences.")
    demo: DemoCheckpointConfig = Field(default_factory=DemoCheckpointConfig,
                                       description="Demo checkpoint recipe; ignored when checkpoint.adapter is set.")

    @model_serializer(mode="wrap")
    def _omit_unset_dir(self, handler) -> dict[str, Any]:
        # `dir` is newer than the run manifests and cache keys already on disk: leaving it out while unset
        # keeps those valid (a config without checkpoint.dir dumps exactly as before the key existed)
        data = handler(self)
        if self.dir is None:
            data.pop("dir", None)
        return data

    @model_validator(mode="after")
    def _adapter_and_optimizer(self) -> CheckpointConfig:
        if self.dir is not None:
            # Path arithmetic only: validation never reads the disk (entropy_core.checkpoints checks it).
            derived = (self.dir, checkpoint_dir_optimizer(self.dir))
            given = [k for k, v in (("adapter", self.adapter), ("optimizer", self.optimizer)) if v is not None]
            if given and (self.adapter, self.optimizer) != derived:   # equal: a dumped config, validated again
                both = "checkpoint.dir is set together with " + " and ".join(f"checkpoint.{k}" for k in given)
                msg = (f"{both}; checkpoint.dir={self.dir!r} already means adapter={derived[0]!r} and "
                       f"optimizer={derived[1]!r}: give checkpoint.dir alone, or checkpoint.adapter and "
                       "checkpoint.optimizer without it")
                _raise_problems("CheckpointConfig", [("dir", msg, self.dir)])
            self.adapter, self.optimizer = derived
        has_adapter, has_optimizer = self.adapter is not None, self.optimizer is not None
        if not has_adapter and self.base != DEMO_BASE:
            _raise_problems("CheckpointConfig", [(
                "adapter", f"required unless checkpoint.base is {DEMO_BASE} (the demo); got checkpoint.base="
                           f"{self.base!r}. Set checkpoint.adapter and checkpoint.optimizer to a trained checkpoint",
                self.adapter)])
        if has_adapter != has_optimizer:
            missing, given = ("optimizer", "adapter") if has_adapter else ("adapter", "optimizer")
            _raise_problems("CheckpointConfig", [(
                missing, f"checkpoint.{given} is set but checkpoint.{missing} is not; checkpoint.adapter and "
                         "checkpoint.optimizer come from the same checkpoint, give both (or neither, for the demo)",
                None)])
        return self


# ------------------------------------------------------------------------------------------ data
class DataConfig(_Section):
    """Prompts and the reward that scores responses."""
    dataset: str = Field("gsm8k_r1_template", min_length=1,
                         description="Dataset registry name, or a path to a JSONL file of prompts.")
    path: str | None = Field(None, description="Local file or directory holding the dataset; null = the registry's "
                                               "default (built-in offline copy where one exists).")
    split_E: str = Field("test", description="Split the evaluation batch E draws its prompts from.")
    split_U: str = Field("train", description="Split the update batch U draws its prompts from.")
    prompt_template: str | None = Field(None, description="Prompt template containing '{question}'; null = the "
                                                          "dataset's own template.")
    reward: str = Field("gsm8k_tag_shaped", min_length=1,
                        description="Reward: a registry name, or 'module:function' taking (response_text, gold) -> float.")
    format_weight: float = Field(0.1, ge=0, le=1, description="Share of the reward given for the answer format "
                                 "alone; keeps U groups from being all-equal (zero advantage) with weak models.")
    limit: int | None = Field(None, gt=0, description="Use only the first `limit` examples of each split; null = all.")

    @field_validator("prompt_template")
    @classmethod
    def _has_question(cls, v: str | None) -> str | None:
        if v is not None and "{question}" not in v:
            raise _problem(f"must contain '{{question}}' where the question goes; got {v!r}")
        return v

    @field_validator("reward")
    @classmethod
    def _reward_ref(cls, v: str) -> str:
        if ":" in v and not all(part.strip() for part in v.split(":", 1)):
            raise _problem(f"{v!r} is neither a registry name nor 'module:function'")
        return v


# ------------------------------------------------------------------------------------------ batches
class BatchConfig(_Section):
    """Sizes of the evaluation batch E and the update batch U (DESIGN §1)."""
    B_E: int = Field(16, gt=0, description="Evaluation prompts in E (drawn with replacement), one response each.")
    B_U: int = Field(2, gt=0, description="Prompts in the update batch U.")
    G: int = Field(4, description="Responses sampled per U prompt; advantages are A = r − mean over the group.")
    max_resample_attempts: int = Field(4, ge=0, description="Times a U group whose rewards are all equal (zero "
                                                            "advantage, no gradient) is resampled before it is kept.")

    @field_validator("G")
    @classmethod
    def _group(cls, v: int) -> int:
        if v < 2:
            raise _problem(f"must be ≥ 2, got {v}: no advantage can be formed with one response per prompt "
                           "(A = r − mean_group(r) is then 0)")
        return v


# ------------------------------------------------------------------------------------------ generation
class GenerationConfig(_Section):
    """Sampling of E and U. The sampled policy must be the scored one (DESIGN §2.2)."""
    max_new_tokens: int = Field(48, gt=0, description="Response length cap, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; applied identically when scoring.")
    top_k: int = Field(0, description="Must be 0 (no truncation): a truncated sampler is not the scored policy.")
    top_p: float = Field(1.0, description="Must be 1.0 (no truncation): a truncated sampler is not the scored policy.")
    stop: str | None = Field("</answer>", description="Stop string ending a response; null = run to max_new_tokens "
                                                      "or EOS.")
    batch_size: int = Field(64, gt=0, description="Sequences generated per call to generate.")

    @field_validator("top_k")
    @classmethod
    def _no_top_k(cls, v: int) -> int:
        if v != 0:
            raise _problem(f"generation.top_k={v} truncates the sampling distribution, so the scored policy would "
                           "not be the sampled one (DESIGN §2.2); use top_k=0")
        return v

    @field_validator("top_p")
    @classmethod
    def _no_top_p(cls, v: float) -> float:
        if v != 1.0:
            raise _problem(f"generation.top_p={v} truncates the sampling distribution, so the scored policy would "
                           "not be the sampled one (DESIGN §2.2); use top_p=1.0")
        return v


# ------------------------------------------------------------------------------------------ update
class UpdateConfig(_Section):
    """The update vector v = Δθ / lr of one AdamW step on U (DESIGN §1.1)."""
    microbatch_size: MicrobatchSize = Field(4, description="Sequences per backward pass, or 'auto' (as many as "
                                                           "fit in free GPU memory); the gradient is summed over "
                                                           "microbatches, so this changes memory, not v.")
    clip_norm: float | None = Field(None, gt=0, description="Global gradient-norm clip; null = off (the clip scale "
                                                            "is recorded when on).")
    dropout: bool = Field(False, description="Keep LoRA dropout on in the gradient pass. Off by default (eval mode) "
                                             "so v is deterministic.")


# ------------------------------------------------------------------------------------------ estimator
def _microbatch_size(x: Any) -> int | str:
    """An int ≥ 1 (rows per microbatch) or "auto" (a token budget from free device memory, fastpaths)."""
    if x == "auto" or (isinstance(x, int) and not isinstance(x, bool) and x > 0):
        return x
    raise _problem(f"must be an integer greater than 0 or 'auto', got {x!r}")


MicrobatchSize = Annotated[Any, AfterValidator(_microbatch_size)]


def _eta_nonzero(eta: float) -> float:
    if eta == 0:
        raise _problem("is 0; ΔH(0) is 0 by definition and θ itself is always evaluated as the reference; "
                       "remove it")
    return eta


class EstimatorConfig(_Section):
    """Which estimates of ΔH(η) to compute, and on which step sizes η (DESIGN §1.2–1.6)."""
    eta_list: list[Annotated[float, AfterValidator(_eta_nonzero)]] = Field(
        default_factory=lambda: [2.0e-6, 5.0e-6, 1.0e-5, 2.0e-5],
        description="Step sizes η (learning-rate-like; θ' = θ + ηv) at which the true ΔH is estimated by SNIS. "
                    "Non-zero, finite, distinct; negative values step against the update.")
    linear: bool = Field(True, description="Exact first derivative ΔĤ'(0) on the same sample (JVP and finite "
                                           "differences, DESIGN §1.3).")
    quadratic: bool = Field(True, description="Second derivative ΔĤ''(0) (DESIGN §1.3).")
    variance_reduced: bool = Field(True, description="Lower-variance first-order estimate with entropy-to-go and "
                                                     "a baseline (DESIGN §1.4), reported beside the exact one.")
    fd_step: float | None = Field(None, gt=0, description="Step h of the central finite differences; null = "
                                                          "a tenth of the checkpoint's learning rate.")
    microbatch_size: MicrobatchSize = Field(8, description="Sequences per scoring / JVP pass over E, or 'auto' "
                                                           "(as many as fit in free GPU memory; 1024 tokens on CPU).")
    attribution: bool = Field(False, description="Per-U-sequence shares of ΔĤ'(0) (DESIGN §1.6): a forward and "
                                                 "a backward per surrogate over E, one pass over U.")
    attribution_groups: int = Field(8, ge=0, description="Groups of E for the attribution error bars (they add "
                                                         "a backward over one group of E); 0 = point estimates "
                                                         "only.")
    logw_clip: float | None = Field(None, gt=0, description="Clip SNIS log-weights to ±logw_clip (biased; the clip "
                                                            "fraction is reported); null = no clipping.")

    @field_validator("eta_list")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v:
            raise _problem("is empty; give at least one non-zero step size η, e.g. [1.0e-5]")
        dupes = sorted({eta for eta in v if v.count(eta) > 1})
        if dupes:
            raise _problem(f"repeats {', '.join(repr(eta) for eta in dupes)}; each η is measured once, "
                           "list it once")
        return v


# ------------------------------------------------------------------------------------------ precision
class PrecisionConfig(_Section):
    """Numerical precision, applied once by the entry point (DESIGN §2.1, STYLE rule 3)."""
    runtime_dtype: Literal["float32", "float64"] = Field(
        "float32", description="dtype of scoring, gradients and JVPs. float64 removes the round-off floor at "
                               "small η and costs about the same as float32 on A100/H100 tensor cores.")
    allow_tf32: bool = Field(False, description="Allow TF32 matmuls. Off: TF32 turns η≈1e-6 differences into "
                                                "noise (DESIGN §2.1).")
    matmul_precision: Literal["highest", "high", "medium"] = Field(
        "highest", description="torch.set_float32_matmul_precision; 'high' and 'medium' switch TF32 on.")

    @field_validator("runtime_dtype", mode="before")
    @classmethod
    def _no_half(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower().removeprefix("torch.") in _HALF_DTYPES:
            raise _problem(f"{v!r} cannot resolve log-prob differences at η≈1e-6 (a few significant digits); "
                           "use 'float32' or 'float64'")
        return v

    @field_validator("matmul_precision")
    @classmethod
    def _tf32_consistent(cls, v: str, info: ValidationInfo) -> str:
        # A field validator (allow_tf32 is validated first), so the contradiction is reported even when
        # another precision key is also wrong.
        if info.data.get("allow_tf32") is False and v != "highest":
            raise _problem(f"{v!r} switches TF32 on, which contradicts precision.allow_tf32=false "
                           "(DESIGN §2.1); use 'highest'")
        return v


# ------------------------------------------------------------------------------------------ logging, pipeline
class LoggingConfig(_Section):
    """What the run writes besides results.json."""
    level: Literal["minimal", "standard", "detailed", "debug"] = Field(
        "standard", description="minimal: results only; standard: + per-stage stats; detailed: + per-sequence "
                                "tensors; debug: everything.")
    gzip: bool = Field(False, description="Compress detailed log files.")
    max_files: int = Field(50, gt=0, description="Most detailed log files written per run.")


class PipelineConfig(_Section):
    """Prefect-only knobs; the plain-Python runner ignores them."""
    retries: int = Field(2, ge=0, description="Retries of a stage after a transient failure (never after a "
                                              "config error or a non-finite result).")
    retry_delay_seconds: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [5.0, 30.0], description="Wait before each retry, in seconds; the last value "
                                                         "repeats.")


# ------------------------------------------------------------------------------------------ the whole run
class MeasureConfig(_Section):
    """One measurement of ΔH(η): checkpoint, data, batches, sampling, update, estimators, precision."""
    seed: int = Field(0, description="Seed for sampling E and U.")
    output_dir: str = Field("runs/demo", min_length=1, description="Directory for artifacts and results.json.")
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda or cuda:N.")
    gpus: int = Field(1, description="Processes the measurement runs on, one per GPU (on CPU: gloo processes). Above "
                                     "1 the runners start `torchrun --nproc_per_node=gpus` and shard E and U over "
                                     "the ranks; 1 runs in this process.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description=CheckpointConfig.__doc__)
    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    batches: BatchConfig = Field(default_factory=BatchConfig, description=BatchConfig.__doc__)
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description=GenerationConfig.__doc__)
    update: UpdateConfig = Field(default_factory=UpdateConfig, description=UpdateConfig.__doc__)
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig, description=EstimatorConfig.__doc__)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig, description=PrecisionConfig.__doc__)
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description=LoggingConfig.__doc__)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description=PipelineConfig.__doc__)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `pipeline:` with every key commented out loads as None; it means "all defaults".
        if isinstance(data, Mapping):
            data = {k: ({} if v is None and k in _section_names() else v) for k, v in data.items()}
        return data

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE_RE.match(v):
            raise _problem(f"must be auto, cpu, cuda or cuda:N; got {v!r}")
        return v

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v: Any) -> int:
        # before pydantic's coercion: 2.0, "2" and true are typos here, not process counts
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _problem(f"must be an integer ≥ 1 (processes to run on, one per GPU); got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> MeasureConfig:
        if self.gpus > 1 and re.fullmatch(r"cuda:\d+", self.device):
            _raise_problems("MeasureConfig", [(
                "device", f"gpus={self.gpus} gives each process its own GPU (torchrun's LOCAL_RANK), so device must "
                          f"be auto, cpu or cuda, not {self.device!r}", self.device)])
        return self

    @model_serializer(mode="wrap")
    def _omit_one_gpu(self, handler) -> dict[str, Any]:
        # `gpus` is newer than the run manifests and cache keys already on disk: a one-process config
        # dumps exactly as before the key existed
        data = handler(self)
        if self.gpus == 1:
            data.pop("gpus", None)
        return data


def _section_names() -> tuple[str, ...]:
    return tuple(name for name, f in MeasureConfig.model_fields.items() if _model_of(f.annotation) is not None)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


# ------------------------------------------------------------------------------------------ errors
class ConfigError(ValueError):
    """Every problem of a configuration, one per line as `<dotted.path>: <what is wrong>`."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        n = len(self.problems)
        header = f"{n} problem{'s' if n != 1 else ''} in {source}:"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (a path of section names), or None."""
    model: type[BaseModel] | None = MeasureConfig
    for part in loc:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        model = _model_of(field.annotation) if field is not None else None
    return model


def _unknown_key(loc: Sequence[str | int]) -> str:
    key, parent = loc[-1], _model_at(loc[:-1])
    if parent is None:
        return "unknown key"
    valid = list(parent.model_fields)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {_dotted([*loc[:-1], close[0]])}?"
    elsewhere = [f"{s}.{key}" for s in _section_names()
                 if key in _model_of(MeasureConfig.model_fields[s].annotation).model_fields and (s,) != tuple(loc[:-1])]
    if elsewhere:
        return f"unknown key here; it belongs in {' or '.join(elsewhere)}"
    return f"unknown key; valid keys: {', '.join(valid)}"


def _describe(err: Mapping[str, Any]) -> str:
    loc, kind, value = err["loc"], err["type"], err.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        return "required key is missing"
    if kind == "model_type":
        return f"must be a section (a mapping of keys), got {value!r}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind != "config" and not isinstance(value, (Mapping, list)):
        msg += f" (got {value!r})"
    return msg


def _problems(exc: ValidationError, overrides: Mapping[str, str]) -> list[str]:
    lines = []
    for err in exc.errors():
        path = _dotted(err["loc"])
        line = f"{path}: {_describe(err)}"
        for key, raw in overrides.items():
            if path == key or path.startswith((key + ".", key + "[")):
                line += f" (from --set {raw})"
        lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------ loading
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *defaults` may be overridden by the node's own keys
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            continue                                    # construct_mapping reports it
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigError([f"YAML syntax error at {where}: {problem}"], source=source)


def _apply_overrides(data: dict, overrides: Sequence[str]) -> tuple[dict, dict[str, str], list[str]]:
    """Set each 'dotted.key=value' (value parsed as YAML) in a copy of `data`.

    Returns: (new data, {dotted key: raw override}, problems with overrides that could not be applied).
    """
    data, applied, problems = copy.deepcopy(data), {}, []
    for raw in overrides:
        key, sep, text = raw.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not all(p.strip() for p in parts):
            problems.append(f"--set {raw}: expected 'dotted.key=value', e.g. batches.B_E=64")
            continue
        try:
            value = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            problems.append(f"{key}: cannot parse value {text!r} of --set {raw} as YAML "
                            f"({getattr(exc, 'problem', exc)}); quote it")
            continue
        node = data
        for i, part in enumerate(parts[:-1]):
            parent = _model_at(parts[:i])
            is_value = parent is not None and part in parent.model_fields and _model_at(parts[:i + 1]) is None
            if node.get(part) is None and not is_value:
                node[part] = {}
            if is_value or not isinstance(node[part], dict):
                problems.append(f"{'.'.join(parts[:i + 1])}: is a value, not a section; cannot --set {raw}")
                break
            node = node[part]
        else:
            node[parts[-1]] = value
            applied[key] = raw
    return data, applied, problems


def config_from_dict(data: Any, overrides: Sequence[str] = (), *, source: str = "config") -> MeasureConfig:
    """Validate a plain mapping (a parsed YAML) into a MeasureConfig.

    Args:    data: mapping of sections; overrides: 'dotted.key=value' strings applied first;
             source: name used in error messages (the file).
    Returns: the validated MeasureConfig.
    Raises:  ConfigError listing every problem, each as '<dotted.path>: <what is wrong>'.
    """
    if not isinstance(data, Mapping):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise ConfigError([f"<top level>: must be a mapping of sections (checkpoint:, data:, ...), got {got}"],
                          source=source)
    data, applied, problems = _apply_overrides(dict(data), overrides)
    try:
        cfg = MeasureConfig.model_validate(data)
    except ValidationError as exc:
        problems += _problems(exc, applied)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> MeasureConfig:
    """Read a YAML experiment file, apply `--set`-style overrides, validate.

    Args:    path: the YAML file; overrides: 'dotted.key=value' strings, value parsed as YAML
             (`estimator.eta_list=[1e-6,2e-6]`, `checkpoint.adapter=null`).
    Returns: the validated MeasureConfig.
    Raises:  FileNotFoundError if `path` does not exist; ConfigError for a YAML syntax error
             (with its line) or for every invalid / unknown key at once.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise _yaml_error(str(path), exc) from None
    return config_from_dict(data, overrides, source=str(path))


def dump_config(cfg: MeasureConfig) -> dict:
    """The whole configuration as a JSON-able dict (every default filled in); round-trips through config_from_dict."""
    return cfg.model_dump(mode="json")


def config_section_dict(cfg: MeasureConfig, section: str) -> dict:
    """One section as a JSON-able dict, for a stage's cache key and artifact sidecars.

    Raises: ValueError naming the valid sections if `section` is not one.
    """
    if section not in _section_names():
        raise ValueError(f"unknown config section {section!r}; sections: {', '.join(_section_names())}")
    return getattr(cfg, section).model_dump(mode="json")
