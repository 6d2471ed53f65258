"""The launchpad's typed configuration: the schema's sections as documented Dagster config
fields, checked by Dagster before a run starts; a config file still works underneath."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from assets.definitions import ALL_ASSETS, default_resources
from bitmar_pipeline.config import ConfigError, PipelineConfig
from bitmar_pipeline.resources.settings import BitmarSettings

ROBOTS = ["robot_selection_tasks"]


def _launch(tmp_path: Path, settings_config: dict, **kwargs) -> dg.ExecuteInProcessResult:
    settings = BitmarSettings(overrides={"storage.root": str(tmp_path / "store")})
    return dg.materialize(
        ALL_ASSETS,
        selection=ROBOTS,
        resources=default_resources(settings),
        run_config={"resources": {"settings": {"config": settings_config}}},
        instance=dg.DagsterInstance.ephemeral(),
        **kwargs,
    )


def _fields(config_type) -> dict:
    return config_type.fields


def test_the_launchpad_schema_has_every_section_typed_and_documented():
    profile = _fields(BitmarSettings.to_config_schema().as_field().config_type)["profile"].config_type
    assert set(_fields(profile)) == set(PipelineConfig.model_fields)
    batch = _fields(_fields(profile)["vision"].config_type)["batch_size"]
    assert batch.config_type.inner_type.given_name == "Int" or "Int" in batch.config_type.key
    assert "Default: 32." in batch.description
    mode = _fields(_fields(profile)["wandb"].config_type)["mode"]
    assert mode.description == "One of offline, online, disabled. Default: 'offline'."
    assert [v.config_value for v in mode.config_type.inner_type.enum_values] == ["offline", "online", "disabled"]
    rehearsal = _fields(_fields(profile)["training"].config_type)["caption_rehearsal_weight"]
    assert "caption" in rehearsal.description and "Default: 0.5." in rehearsal.description


@pytest.mark.parametrize(
    ("profile", "named"),
    [
        ({"data": {"robot": {"sample_num_tasks": "many"}}}, "sample_num_tasks"),
        ({"wandb": {"mode": "sometimes"}}, "mode"),
        ({"vision": {"batchsize": 8}}, "batchsize"),
    ],
)
def test_an_invalid_typed_field_fails_before_the_run_starts(tmp_path, profile, named):
    with pytest.raises(dg.DagsterInvalidConfigError) as raised:
        _launch(tmp_path, {"profile": profile})
    assert named in str(raised.value)
    assert not (tmp_path / "store").exists()


def test_a_bound_is_checked_before_any_asset_runs(tmp_path):
    result = _launch(tmp_path, {"profile": {"data": {"robot": {"sample_num_tasks": 0}}}}, raise_on_error=False)
    assert not result.success and result.get_asset_materialization_events() == []
    (init,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.RESOURCE_INIT_FAILURE]
    assert "data.robot.sample_num_tasks: got 0" in init.event_specific_data.error.message


def test_typed_fields_lie_over_the_config_file(tmp_path):
    profile_file = tmp_path / "profile.yaml"
    profile_file.write_text(
        f"storage:\n  root: {tmp_path / 'store'}\ndata:\n  robot:\n    sample_num_tasks: 30\n    sample_seed: 3\n"
    )
    result = _launch(
        tmp_path, {"config_file": str(profile_file), "profile": {"data": {"robot": {"sample_num_tasks": 12}}}}
    )
    assert result.success
    settings = BitmarSettings(config_file=str(profile_file), profile={"data": {"robot": {"sample_num_tasks": 12}}})
    assert (settings.config.data.robot.sample_num_tasks, settings.config.data.robot.sample_seed) == (12, 3)
    assert (tmp_path / "store" / "tables" / "robot_tasks" / "all.parquet").is_file()


def test_the_launchpad_describes_the_users_own_robots(tmp_path):
    """The `robots:` map of sections crosses the launchpad as one value and is validated there."""
    robots = {"Window Cleaner": {"capabilities": ["window cleaning"], "environments": ["glass facades"]}}
    settings = BitmarSettings(profile={"storage": {"root": str(tmp_path)}, "robots": robots})
    assert settings.config.robots["Window Cleaner"].model_dump() == {**robots["Window Cleaner"], "limitations": []}
    bad = BitmarSettings(profile={"robots": {"Drone": {"capabilities": ["flying"]}}})
    with pytest.raises(ConfigError, match="robots: got .*'Drone' is a robot of the data"):
        _ = bad.config
