"""`bitmar`: a thin command line front on the Dagster code location.

`bitmar run` materializes a selection in-process against the Dagster instance in
$DAGSTER_HOME (or a temporary one). Partitioned stages run once per registered shard, as a
backfill would; the order comes from the asset graph, not from this file.
"""

from __future__ import annotations

import argparse
import graphlib
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from bitmar_pipeline.config import ConfigError, load_config
from bitmar_pipeline.release.inference import add_predict_parser, predict_main
from bitmar_pipeline.resources.settings import BitmarSettings

TRAINING_STAGES = ("multimodal_pretrain", "reasoning_sft", "grpo_policy")


def _run_config(verbose: bool) -> dict[str, Any]:
    """Dagster's console logger: warnings and errors by default (the terminal gets this module's
    summary lines), everything with --verbose. The full log always goes to the run's log file."""
    return {"loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "WARNING"}}}}


def _append_run_log(instance: dg.DagsterInstance, run_id: str, path: Path) -> None:
    """Every event of one Dagster run (DEBUG included), as the console logger would print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for entry in instance.all_logs(run_id):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.timestamp))
            event = entry.dagster_event.event_type_value if entry.dagster_event else ""
            fields = [stamp, logging.getLevelName(entry.level), run_id[:8], entry.step_key or "-", event, entry.message]
            fh.write(" - ".join(f for f in fields if f) + "\n")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """["vision.model=facebook/dinov2-base", "data.coco.max_images=500"] -> typed dict."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. vision.model=facebook/dinov2-base")
        # KEY= passes "" (e.g. training.knowledge_teacher= turns the teacher off), not YAML's null.
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        if overrides[key.strip()] is None:
            # Dagster's run config cannot carry a null map value (its config processing fails deep inside).
            raise ConfigError(f"--set {pair!r}: null cannot be passed on the command line; use a --config YAML file")
    return overrides


def _instance() -> dg.DagsterInstance:
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.ephemeral()


def _selection(text: str) -> dg.AssetSelection:
    """`dagster asset materialize` style comma list ("coco_raw,*vision_features") or one
    expression of Dagster's selection language ("group:data and not text_tokenizer")."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    return dg.AssetSelection.from_coercible(items) if len(items) > 1 else dg.AssetSelection.from_string(items[0])


def _resolve_selection(text: str, assets: list[dg.AssetsDefinition], specs: dict) -> set[dg.AssetKey]:
    """The selected keys; an unknown name, a bad expression or an empty result is a ConfigError
    (one line naming the valid assets and groups), not a Dagster traceback."""
    problem = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.BetaWarning)  # group:... selections warn on every call
            selected = _selection(text).resolve(assets)
    except dg.DagsterError as exc:
        unknown = re.search(r"AssetKey\(s\) (\[.*?\])", str(exc))
        problem = f"unknown asset(s) {unknown.group(1)}" if unknown else str(exc).splitlines()[0]
    else:
        if not selected:
            problem = "selects no assets"
    if problem is None:
        return selected
    names = ", ".join(sorted(key.to_user_string() for key in specs))
    groups = ", ".join(sorted({f"group:{spec.group_name}" for spec in specs.values() if spec.group_name}))
    raise ConfigError(f"--select {text!r}: {problem}; valid assets: {names}; groups: {groups}")


def _phases(assets: list[dg.AssetsDefinition], selection: str | None) -> list[tuple[bool, list[dg.AssetKey]]]:
    """Selected asset keys in topological order, grouped into consecutive runs of partitioned
    (True) or unpartitioned (False) assets: a Dagster run targets one partition at most."""
    specs = {spec.key: spec for asset in assets for spec in asset.specs}
    selected = _resolve_selection(selection, assets, specs) if selection else set(specs)
    sorter = graphlib.TopologicalSorter(
        {k: {d.asset_key for d in s.deps if d.asset_key in specs} for k, s in specs.items()}
    )
    sorter.prepare()
    phases: list[tuple[bool, list[dg.AssetKey]]] = []
    while sorter.is_active():
        level = sorted(sorter.get_ready())
        sorter.done(*level)
        for key in level:
            if key not in selected:
                continue
            partitioned = specs[key].partitions_def is not None
            if phases and phases[-1][0] == partitioned:
                phases[-1][1].append(key)
            else:
                phases.append((partitioned, [key]))
    return phases


def _failure_message(error) -> str:
    """The failure and its causes: a retry policy wraps the real error ("Exceeded max_retries")."""
    parts = []
    while error is not None:
        parts.append(error.message.strip())
        error = error.cause
    return "\n  caused by: ".join(parts)


def _summarize(result: dg.ExecuteInProcessResult, partition: str | None) -> list[str]:
    lines = []
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        shown = {
            k: v.value
            for k, v in materialization.metadata.items()
            if k
            in {
                "images",
                "captions",
                "pairs",
                "tasks",
                "encoded",
                "reused_from_cache",
                "quarantined_rows",
                "vocab_size",
                "seconds",
            }
        }
        where = f"[{partition}]" if partition else ""
        lines.append(
            f"  {materialization.asset_key.to_user_string()}{where}: " + ", ".join(f"{k}={v}" for k, v in shown.items())
        )
    for check in result.get_asset_check_evaluations():
        if not check.passed:
            lines.append(
                f"  check FAILED ({check.severity.value}): {check.asset_key.to_user_string()}.{check.check_name}"
            )
    return lines


def _quiet_library_progress_bars() -> None:
    """transformers and huggingface_hub draw their own bars ("Loading weights", "Writing model shards")
    each time a model is loaded or saved: a dozen terminal lines per run that say nothing to a user."""
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    huggingface_hub.utils.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def run(config_file: str | None, selection: str | None, overrides: dict[str, Any], verbose: bool = False) -> int:
    from assets.definitions import ALL_ASSETS, default_resources

    load_config(config_file, overrides)  # fail fast on bad config, before Dagster starts
    if not verbose:
        _quiet_library_progress_bars()
    settings = BitmarSettings(
        config_file=config_file,
        overrides=overrides,
        progress_bars=sys.stderr.isatty(),
        console_progress=not verbose,  # training bars/lines on stderr; --verbose prints every step line instead
    )
    instance = _instance()
    resources = default_resources(settings)
    started = time.perf_counter()
    failed_checks = 0
    phases = _phases(ALL_ASSETS, selection)
    log_path = settings.storage.path("logs", f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    print(f"full Dagster log: {log_path}" + ("" if verbose else " (--verbose prints it here)"))
    for partitioned, keys in phases:
        partitions = instance.get_dynamic_partitions("coco_shards") if partitioned else [None]
        if partitioned and not partitions:
            print("no coco_shards registered yet: materialize coco_raw first", file=sys.stderr)
            return 1
        for partition in partitions:
            result = dg.materialize(
                ALL_ASSETS,
                selection=keys,
                instance=instance,
                resources=resources,
                partition_key=partition,
                raise_on_error=False,
                run_config=_run_config(verbose),
            )
            _append_run_log(instance, result.run_id, log_path)
            print("\n".join(_summarize(result, partition)))
            failed_checks += sum(
                1
                for c in result.get_asset_check_evaluations()
                if not c.passed and c.severity == dg.AssetCheckSeverity.ERROR
            )
            if not result.success:
                failure = next((e for e in result.all_events if e.is_step_failure), None)
                message = _failure_message(failure.step_failure_data.error) if failure else "run failed"
                print(
                    (
                        f"FAILED {', '.join(k.to_user_string() for k in keys)}{f'[{partition}]' if partition else ''}: "
                        f"{message}"
                    ),
                    file=sys.stderr,
                )
                print(f"full Dagster log: {log_path}", file=sys.stderr)
                return 1
    print(
        f"done in {time.perf_counter() - started:.1f}s" + (f"; {failed_checks} failed checks" if failed_checks else "")
    )
    return 1 if failed_checks else 0


_CONFIG_HELP = "YAML profile (default: $BITMAR_CONFIG or the embedded sample profile)"


def _add_overrides_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bitmar", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="materialize assets (default: all) in-process")
    run_parser.add_argument("--config", help=_CONFIG_HELP)
    run_parser.add_argument(
        "--select",
        help="assets to materialize: a comma list (coco_raw,image_caption_pairs) or a Dagster selection (group:data)",
    )
    _add_overrides_argument(run_parser)
    run_parser.add_argument("--verbose", action="store_true", help="print Dagster's full log (DEBUG) to the terminal")
    train_parser = commands.add_parser("train", help="materialize the training stages (the seed's train.py options)")
    train_parser.add_argument("--config", help=_CONFIG_HELP)
    train_parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (compute.device)")
    train_parser.add_argument(
        "--save-every-n-steps", type=int, help="checkpoint interval (training.save_every_n_steps)"
    )
    train_parser.add_argument(
        "--select", default=",".join(TRAINING_STAGES), help=f"stages to run (default: {','.join(TRAINING_STAGES)})"
    )
    _add_overrides_argument(train_parser)
    train_parser.add_argument("--verbose", action="store_true", help="print Dagster's full log (DEBUG) to the terminal")
    add_predict_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "predict":
        return predict_main(args)
    try:
        overrides = parse_overrides(args.overrides)
        if args.command == "train":
            if args.device:
                overrides["compute.device"] = args.device
            if args.save_every_n_steps:
                overrides["training.save_every_n_steps"] = args.save_every_n_steps
        return run(args.config, args.select, overrides, verbose=args.verbose)
    except ConfigError as exc:
        print(f"bitmar: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
