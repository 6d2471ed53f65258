"""The three training stages as plain functions: multimodal pretraining, reasoning SFT, GRPO.

Each stage reads its inputs from storage (never recomputes upstream stages), trains with
checkpoints under `checkpoints/<stage>/<fingerprint>/`, and publishes the trained model with
`save_pretrained` to `models/<stage>/` (replaced atomically). The fingerprint covers the
stage's configuration, the model configuration and a digest of its inputs (upstream model,
data, tokenizer):
- a killed run re-materialized with the same inputs resumes from its last checkpoint;
- a run whose inputs or settings changed (a new reward weight, a retrained SFT model)
  trains afresh from its upstream model instead of being refused or resumed wrongly;
- a finished run re-materialized unchanged resumes at its last step, so it costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bitmar_model.cell_words import fit_cell_reader
from bitmar_model.grpo import GroupBatch, GRPOSettings, train_grpo
from bitmar_model.io import atomic_directory
from bitmar_model.loop import LoopSettings
from bitmar_model.losses import (
    PretrainWeights,
    class_balance_weights,
    label_token_count,
    pretrain_loss,
    sft_loss,
)
from bitmar_model.metrics import matched_vs_random_cosine, retrieval_recall_at_k
from bitmar_model.modeling import MODEL_REVISION, BitMarModel
from bitmar_model.rewards import RewardWeights
from bitmar_model.trainer import Trainer, TrainerConfig
from bitmar_pipeline.config import PipelineConfig, StageSchedule, TrainingConfig
from bitmar_pipeline.data.no_robot import load_no_robot_tasks
from bitmar_pipeline.data.robot_tasks import fleet_profiles
from bitmar_pipeline.data.typed_tasks import load_typed_tasks
from bitmar_pipeline.data.wordnet_text import bundled_examples
from bitmar_pipeline.evaluation.robustness import USER_PHRASED_VALIDATION_FILE, load_eval_set
from bitmar_pipeline.evaluation.selection_quality import ReasoningEvaluation, evaluate_reasoning
from bitmar_pipeline.features.vision_encoder import resolve_device
from bitmar_pipeline.storage import Storage
from bitmar_pipeline.text.corpus import TOKENIZER_DIR
from bitmar_pipeline.training.datasets import (
    CaptionSet,
    RehearsalSftSet,
    SftSet,
    TrainingDataError,
    build_model_config,
    build_sft_set,
    check_compatible,
    data_files_fingerprint,
    load_caption_data,
    load_pipeline_tokenizer,
    robot_multi_hot,
)
from bitmar_pipeline.training.knowledge import (
    LabelledTexts,
    SentenceTeacher,
    choose_knowledge_weight,
    choose_no_robot_threshold,
    choose_weight_and_fit,
    fit_no_robot_gate,
    install_knowledge,
)
from bitmar_pipeline.training.reasoning_targets import (
    Profiles,
    build_sft_examples,
    capability_examples,
    format_prompt,
    short_form_examples,
)

PRETRAIN, SFT, GRPO = "multimodal_pretrain", "reasoning_sft", "grpo_policy"
STAGE_INFO_FILE = "bitmar_stage.json"
HISTORY_FILE = "history.jsonl"
MAX_PROMPT_TOKENS = 64
MAX_TARGET_TOKENS = 320

Log = Callable[[dict[str, Any]], None]


@dataclass
class StageResult:
    stage: str
    model_dir: Path
    fingerprint: str
    final_step: int
    resumed_from_step: int | None
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    seconds: float
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    evaluations: dict[str, ReasoningEvaluation] = field(default_factory=dict)


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def architecture_digest(model: torch.nn.Module) -> str:
    """Parameter names and shapes plus the model code revision: code that changes the
    architecture under an unchanged config must not resume (or be refused by) checkpoints
    of the old architecture."""
    return _fingerprint({"revision": MODEL_REVISION, **{name: list(t.shape) for name, t in model.state_dict().items()}})


def model_dir(storage: Storage, stage: str) -> Path:
    return storage.path("models", stage)


def load_stage_model(storage: Storage, stage: str, device: str | torch.device = "cpu") -> BitMarModel:
    directory = model_dir(storage, stage)
    if not (directory / "config.json").is_file():
        raise TrainingDataError(f"no trained model at {directory}: materialize {stage} first")
    return BitMarModel.from_pretrained(str(directory)).to(device)


def publish_model(model: BitMarModel, directory: Path, info: dict[str, Any]) -> None:
    """save_pretrained into a temporary directory, then swap it in: readers never see a mix."""
    with atomic_directory(directory) as staging:
        model.save_pretrained(str(staging))
        (staging / STAGE_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))


class History:
    """Log records appended to a JSON-lines file beside the checkpoints, so a resumed or
    re-materialized run still reports its whole curve."""

    def __init__(self, path: Path, is_main: bool = True) -> None:
        self.path = path
        self.is_main = is_main

    def __call__(self, record: dict[str, Any]) -> None:
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record, default=float) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        by_key: dict[tuple[str, int], dict[str, Any]] = {}
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            kind = "eval" if any(k.startswith("eval/") for k in record) else "train"
            by_key[(kind, int(record.get("step", 0)))] = record  # a resumed step replaces its first try
        return [by_key[k] for k in sorted(by_key, key=lambda k: (k[1], k[0]))]


def trainer_config(config: PipelineConfig, schedule: StageSchedule, checkpoint_dir: Path) -> TrainerConfig:
    training = config.training
    return TrainerConfig(
        learning_rate=schedule.learning_rate,
        weight_decay=training.weight_decay,
        warmup_steps=schedule.warmup_steps,
        max_steps=schedule.max_steps,
        cosine_restarts=training.cosine_restarts,
        min_lr_ratio=training.min_lr_ratio,
        max_grad_norm=training.max_grad_norm,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        batch_size=schedule.batch_size,
        seed=training.seed,
        device=config.compute.device,
        compile=training.compile,
        save_every_n_steps=training.save_every_n_steps,
        keep_last_checkpoints=training.keep_last_checkpoints,
        log_every_n_steps=training.log_every_n_steps,
        max_consecutive_nan_steps=training.max_consecutive_nan_steps,
        checkpoint_dir=str(checkpoint_dir),
    )


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a single process: the one that evaluates and publishes."""
    return int(os.environ.get("RANK", "0")) == 0


def _run_trainer(trainer: Trainer) -> tuple[Any, int | None]:
    result = trainer.train(resume=True)
    return result, result.resumed_from_step


@torch.no_grad()
def retrieval_metrics(model: BitMarModel, heldout: CaptionSet, batch_size: int = 64) -> dict[str, float]:
    """Retrieval recall and matched-vs-mismatched cosine on pairs never trained on."""
    model.eval()
    device = next(model.parameters()).device
    image_emb, text_emb = [], []
    for start in range(0, len(heldout), batch_size):
        batch = heldout.collate(list(range(start, min(start + batch_size, len(heldout)))))
        out = model(
            batch["caption_ids"].to(device),
            batch["caption_mask"].to(device),
            {"cls": batch["cls"].to(device), "patches": batch["patches"].to(device)},
        )
        image_emb.append(out.image_embeds.float().cpu())
        text_emb.append(out.text_embeds.float().cpu())
    images, texts = torch.cat(image_emb).numpy(), torch.cat(text_emb).numpy()
    _, first_row, text_to_image = np.unique(heldout.image_ids, return_index=True, return_inverse=True)
    recall = retrieval_recall_at_k(images[first_row], texts, ks=(1, 5, 10), text_to_image_index=text_to_image)
    cosine = matched_vs_random_cosine(images[first_row], texts, text_to_image)
    return {
        **recall,
        **{f"cosine_{k}": v for k, v in cosine.items()},
        "heldout_images": int(len(first_row)),
        "heldout_captions": int(len(texts)),
    }


# Settings only reasoning SFT reads: changing them must not retrain (or refuse) pretraining.
SFT_ONLY_TRAINING_KEYS = frozenset(
    {
        "sft", "selection_loss_weight", "selection_class_balance", "caption_rehearsal_weight",
        "caption_rehearsal_batch_size", "capability_examples", "short_form_examples",
    }
)


def _warm_cell_reader(model: BitMarModel, train: CaptionSet, training: TrainingConfig) -> None:
    """`training.cell_reader_warmup_steps` reader-only steps (bitmar_model.cell_words) before the
    joint ones, on random training batches of the pretraining batch size (seeded: a resumed run
    repeats them, then loads its checkpoint over them)."""
    steps = training.cell_reader_warmup_steps
    if not model.config.cell_words or not steps:
        return
    generator = torch.Generator().manual_seed(training.seed)
    size = min(training.pretrain.batch_size, len(train))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            yield train.cell_word_batch(torch.randint(len(train), (size,), generator=generator).tolist())

    fit_cell_reader(
        model.cell_reader, model.embed_tokens.weight, batches(), steps, training.pretrain.learning_rate,
        model.config.special_token_ids,
    )


def run_multimodal_pretrain(
    config: PipelineConfig,
    storage: Storage,
    shards: Sequence[str],
    encoder_fingerprint: str,
    callbacks: Sequence[Log] = (),
) -> StageResult:
    started = time.perf_counter()
    tokenizer = load_pipeline_tokenizer(storage)
    data = load_caption_data(
        storage, shards, encoder_fingerprint, tokenizer, config.model.max_seq_len, config.training.heldout_fraction
    )
    model_config = build_model_config(config, tokenizer, data.feature_dim, data.num_patches)
    torch.manual_seed(config.training.seed)
    model = BitMarModel(model_config)
    data_files = [storage.partition_path("image_caption_pairs", s) for s in shards] + [
        storage.path(TOKENIZER_DIR, "tokenizer.json")
    ]
    fingerprint = _fingerprint(
        {
            "stage": PRETRAIN,
            "model": model_config.to_dict(),
            "training": config.training.model_dump(exclude=SFT_ONLY_TRAINING_KEYS),
            "data": data_files_fingerprint(data_files),
            "encoder": encoder_fingerprint,
            "architecture": architecture_digest(model),
        }
    )
    checkpoint_dir = storage.path("checkpoints", PRETRAIN, fingerprint)
    history = History(checkpoint_dir / HISTORY_FILE, is_main=is_main_process())
    _warm_cell_reader(model, data.train, config.training)
    weights = PretrainWeights(
        config.training.text_generation_loss_weight,
        config.training.cross_modal_loss_weight,
        config.training.memory_regularization_weight,
        config.training.cell_word_loss_weight,
    )
    trainer = Trainer(
        model,
        data.train,
        partial(pretrain_loss, weights=weights),
        trainer_config(config, config.training.pretrain, checkpoint_dir),
        collate_fn=data.train.collate,
        callbacks=[history, *callbacks],
        token_count_fn=label_token_count,
    )
    result, resumed = _run_trainer(trainer)
    if not is_main_process():
        return StageResult(
            PRETRAIN,
            model_dir(storage, PRETRAIN),
            fingerprint,
            result.final_step,
            resumed,
            [],
            {},
            time.perf_counter() - started,
        )
    metrics = {
        **retrieval_metrics(model, data.heldout),
        "train_pairs": len(data.train), "images": data.images, "feature_dim": data.feature_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    publish_model(
        model,
        model_dir(storage, PRETRAIN),
        {"stage": PRETRAIN, "fingerprint": fingerprint, "step": result.final_step, "metrics": metrics},
    )
    return StageResult(
        PRETRAIN,
        model_dir(storage, PRETRAIN),
        fingerprint,
        result.final_step,
        resumed,
        history.read(),
        metrics,
        time.perf_counter() - started,
    )


def _robot_tables(storage: Storage) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, list[str]]]]:
    tasks = storage.read_partition("robot_tasks", "all")
    subtasks = storage.read_partition("robot_subtasks", "all")
    if not (tasks["split"] == "train").any():
        raise TrainingDataError("robot_tasks has no train split rows: check data.robot and the split fractions")
    capabilities = fleet_profiles(tasks)
    tasks["robots"] = tasks["robots"].map(list)
    return tasks, subtasks, capabilities


def _upstream_digest(storage: Storage, stage: str) -> str:
    return data_files_fingerprint(
        sorted(model_dir(storage, stage).glob("*.safetensors"))
        + [storage.path(TOKENIZER_DIR, "tokenizer.json"), storage.partition_path("robot_tasks", "all")]
    )


def run_reasoning_sft(
    config: PipelineConfig,
    storage: Storage,
    shards: Sequence[str],
    encoder_fingerprint: str,
    callbacks: Sequence[Log] = (),
) -> StageResult:
    """SFT from the pretrained model; with training.caption_rehearsal_weight > 0, every batch
    also carries caption pairs of the pretraining train images (never the held-out ones)."""
    started = time.perf_counter()
    training = config.training
    tokenizer = load_pipeline_tokenizer(storage)
    tasks, subtasks, capabilities = _robot_tables(storage)
    examples = build_sft_examples(tasks, subtasks, capabilities, split="train")
    if training.capability_examples:
        examples += capability_examples(capabilities)
    if training.short_form_examples:
        examples += short_form_examples(examples, capabilities, training.short_form_examples, training.seed)
    sft_set = build_sft_set(examples, tokenizer, MAX_PROMPT_TOKENS, MAX_TARGET_TOKENS)
    dataset: SftSet | RehearsalSftSet = sft_set
    model = load_stage_model(storage, PRETRAIN)
    check_compatible(model.config, tokenizer)
    inputs = {"model": _upstream_digest(storage, PRETRAIN)}
    # Read (and a bad file refused) before training; their tasks, not only their names, are inputs.
    no_robot, typed = _written_tasks(training) if training.knowledge_teacher else ([], ((), ()))
    if no_robot:
        inputs["no_robot_tasks"] = _fingerprint({"tasks": no_robot})
    if typed[0]:
        inputs["typed_tasks"] = _fingerprint({"tasks": typed})
    if training.caption_rehearsal_weight > 0:
        captions = load_caption_data(
            storage, shards, encoder_fingerprint, tokenizer, config.model.max_seq_len, training.heldout_fraction
        )
        check_compatible(model.config, tokenizer, captions.feature_dim, captions.num_patches)
        dataset = RehearsalSftSet(sft_set, captions.train, training.caption_rehearsal_batch_size)
        inputs["captions"] = data_files_fingerprint([storage.partition_path("image_caption_pairs", s) for s in shards])
        inputs["encoder"] = encoder_fingerprint
    fingerprint = _fingerprint(
        {
            "stage": SFT,
            "revision": MODEL_REVISION,
            "training": training.model_dump(exclude={"pretrain"}),
            "inputs": inputs,
        }
    )
    checkpoint_dir = storage.path("checkpoints", SFT, fingerprint)
    history = History(checkpoint_dir / HISTORY_FILE, is_main=is_main_process())
    trainer = Trainer(
        model,
        dataset,
        partial(
            sft_loss,
            selection_weight=training.selection_loss_weight,
            rehearsal_weight=training.caption_rehearsal_weight,
            selection_pos_weight=class_balance_weights(sft_set.robots, training.selection_class_balance),
        ),
        trainer_config(config, config.training.sft, checkpoint_dir),
        collate_fn=dataset.collate,
        callbacks=[history, *callbacks],
        token_count_fn=label_token_count,
    )
    result, resumed = _run_trainer(trainer)
    if not is_main_process():
        return StageResult(
            SFT, model_dir(storage, SFT), fingerprint, result.final_step, resumed, [], {}, time.perf_counter() - started
        )
    caption_ids = captions.train.caption_ids if training.caption_rehearsal_weight > 0 else []
    knowledge = _install_knowledge(
        model, tokenizer, tasks, capabilities, training, subtasks, caption_ids, no_robot, typed
    )
    evaluation = evaluate_reasoning(
        model, tokenizer, tasks, "validation", max_new_tokens=config.grpo_reasoning.max_new_tokens
    )
    metrics = {
        **{f"validation_{k}": v for k, v in evaluation.summary().items()},
        **knowledge,
        "train_examples": len(examples), "task_examples": sum(e.kind == "task" for e in examples),
        "max_target_tokens": max(len(t) for t in sft_set.target_ids),
    }
    publish_model(
        model,
        model_dir(storage, SFT),
        {"stage": SFT, "fingerprint": fingerprint, "step": result.final_step, "metrics": metrics},
    )
    return StageResult(
        SFT, model_dir(storage, SFT), fingerprint, result.final_step, resumed, history.read(), metrics,
        time.perf_counter() - started, {"validation": evaluation.table()}, {"validation": evaluation},
    )


def _context_texts(
    subtasks: pd.DataFrame, caption_ids: Sequence[list[int]], tokenizer: Any, training: TrainingConfig
) -> list[str]:
    """Unlabelled text for the knowledge's context encoder: the train split's subtasks (never the
    held-out tasks' plans), up to `knowledge_context_captions` distinct training captions (the
    teacher labels each; a real COCO run has far more than it needs) and
    `knowledge_context_sentences` WordNet usage examples."""
    captions = training.knowledge_context_captions
    texts: dict[str, None] = {}
    for ids in caption_ids:  # decode only until enough: a real COCO run has ~590k captions
        if len(texts) >= captions:
            break
        if text := tokenizer.decode(ids, skip_special_tokens=True).strip():
            texts[text] = None
    train = subtasks[subtasks["split"] == "train"]["subtask_text"]
    general = bundled_examples(training.knowledge_context_sentences, training.seed)
    return list(dict.fromkeys(train)) + list(texts) + general


def _written_tasks(training: TrainingConfig) -> tuple[list[str], LabelledTexts]:
    """The no-robot gate's tasks and the typed robot tasks the config names (empty where it names none)."""
    no_robot = load_no_robot_tasks(training.knowledge_no_robot_tasks) if training.knowledge_no_robot_tasks else []
    typed = load_typed_tasks(training.knowledge_typed_tasks) if training.knowledge_typed_tasks else ((), ())
    return no_robot, typed


def _install_knowledge(
    model: BitMarModel, tokenizer: Any, tasks: pd.DataFrame, capabilities: Profiles, training: TrainingConfig,
    subtasks: pd.DataFrame, caption_ids: Sequence[list[int]] = (), no_robot: list[str] | None = None,
    typed: LabelledTexts | None = None,
) -> dict[str, Any]:
    """With training.knowledge_teacher: distil it into the model's knowledge table (fitted on the
    train split's tasks and the fleet's capability phrases; its context encoder also reads the
    train split's subtasks, captions and WordNet examples, unlabelled); returns the stage metadata naming the
    knowledge source either way. `no_robot` / `typed`: the no-robot gate's tasks and the typed tasks
    when the caller has read them (None: read `training.knowledge_no_robot_tasks` / `knowledge_typed_tasks`)."""
    if not training.knowledge_teacher:
        return {"knowledge_source": "robot labels only (training.knowledge_teacher is not set)"}
    train = tasks[tasks["split"] == "train"].drop_duplicates("task_key")
    teacher = SentenceTeacher(training.knowledge_teacher, threads=os.cpu_count())
    context_layers = training.knowledge_context_layers if training.knowledge_table == "words" else 0
    # Only a context encoder reads the unlabelled texts: without one, neither decode captions nor draw examples.
    if no_robot is None or typed is None:
        no_robot, typed = _written_tasks(training)
    context_texts = [*_context_texts(subtasks, caption_ids, tokenizer, training), *no_robot] if context_layers else ()
    fit = install_knowledge(
        model, tokenizer, teacher, train["task_text"].tolist(), train["robots"].tolist(), capabilities,
        dim=training.knowledge_dim, c=training.knowledge_c, token_tfidf=training.knowledge_token_tfidf,
        static_scale=training.knowledge_static_scale, phrase_weight=training.knowledge_phrase_weight,
        weight=training.knowledge_weights[0], words=training.knowledge_table == "words",
        context_layers=context_layers, context_steps=training.knowledge_context_steps, seed=training.seed,
        context_texts=context_texts, fleet_fit=any(training.knowledge_fit_weights),
        novelty_power=training.knowledge_fit_novelty_power, no_robot_gate=bool(no_robot), typed_tasks=typed,
        typed_weight=training.knowledge_typed_weight, label_sets=training.knowledge_label_sets,
    )
    view = " next to a token TF-IDF view" if fit.token_tfidf else ""
    rows = f"{fit.words}-word" if fit.words else "token"
    reader = f", read by a {fit.context_layers}-layer context encoder" if fit.context_layers else ""
    metadata = {
        "knowledge_source": f"teacher {fit.teacher} distilled into a {fit.dim}-wide {rows} table{reader}{view}"
    }
    if fit.context_layers:
        metadata["knowledge_context_wordnet_examples"] = training.knowledge_context_sentences
    validation = tasks[tasks["split"] == "validation"].drop_duplicates("task_key")
    validation_set = (validation["task_text"].tolist(), validation["robots"].tolist())
    sets, names = _choice_sets(validation_set, training)
    if fit.fleet_texts:
        fit.weight, scores, choice = choose_weight_and_fit(
            model, tokenizer, sets, training.knowledge_weights, training.knowledge_fit_weights
        )
        if len(training.knowledge_weights) > 1:
            metadata["knowledge_weight_validation_scores"] = {str(w): v for w, v in scores.items()}
        metadata |= {
            "knowledge_fit_multiple": choice.multiple,
            "knowledge_fit_slope": round(choice.slope, 4),
            "knowledge_fit_scores": {str(m): v for m, v in choice.scores.items()},
            "knowledge_fit_chosen_on": names,
        }
    elif len(training.knowledge_weights) > 1:
        fit.weight, scores = choose_knowledge_weight(model, tokenizer, *validation_set, training.knowledge_weights)
        metadata["knowledge_weight_validation_scores"] = {str(w): v for w, v in scores.items()}
    if no_robot:
        robot_texts = train["task_text"].tolist()
        metadata |= _fit_no_robot_gate(model, tokenizer, robot_texts, list(typed[0]), no_robot, sets, training)
        metadata["knowledge_no_robot_chosen_on"] = names
    return {**metadata, **fit.metadata()}


def _fit_no_robot_gate(
    model: BitMarModel, tokenizer: Any, robot_texts: list[str], typed_texts: list[str], no_robot: list[str],
    sets: list[LabelledTexts], training: TrainingConfig,
) -> dict[str, Any]:
    """Fit the no-robot gate on the train and typed robot tasks against the non-robot tasks, choose
    its threshold on `sets`; the stage metadata."""
    c, seed = training.knowledge_c, training.seed
    gate = fit_no_robot_gate(model, tokenizer, robot_texts, no_robot, c, seed, typed_texts)
    threshold, scores = choose_no_robot_threshold(model, tokenizer, sets, training.knowledge_no_robot_thresholds)
    return {
        "knowledge_no_robot_tasks": gate.no_robot_rows,
        "knowledge_no_robot_robot_rows": gate.robot_rows,
        "knowledge_no_robot_train_accuracy": gate.train_accuracy,
        "knowledge_no_robot_threshold": threshold,
        "knowledge_no_robot_scores": {str(p): v for p, v in scores.items()},
    }


def _choice_sets(validation: LabelledTexts, training: TrainingConfig) -> tuple[list[LabelledTexts], str]:
    """The sets the fleet fit's weight and the no-robot gate's threshold are chosen on: the dataset's
    validation tasks and, by default, the bundled user-phrased validation set (the only tasks worded
    as users type them, and the only ones labelled "No Robot"); and their names for the metadata."""
    sets, names = [validation], [f"dataset validation ({len(validation[0])} tasks)"]
    if training.knowledge_fit_user_validation:
        user = load_eval_set(USER_PHRASED_VALIDATION_FILE)
        sets.append(([t.task for t in user], [list(t.robots) for t in user]))
        names.append(f"user-phrased validation set ({len(user)} tasks, {USER_PHRASED_VALIDATION_FILE.name})")
    return sets, " + ".join(names)


def knowledge_metadata(storage: Storage) -> dict[str, Any]:
    """The published reasoning_sft model's knowledge metadata (its stage info's knowledge_* metrics)."""
    info = json.loads((model_dir(storage, SFT) / STAGE_INFO_FILE).read_text())
    return {k: v for k, v in info.get("metrics", {}).items() if k.startswith("knowledge_")}


def grpo_settings(config: PipelineConfig) -> GRPOSettings:
    grpo = config.grpo_reasoning
    return GRPOSettings(
        group_size=grpo.group_size,
        clip_epsilon=grpo.clip_epsilon,
        kl_beta=grpo.kl_beta,
        reasoning_temperature=grpo.reasoning_temperature,
        top_p=grpo.top_p,
        max_new_tokens=grpo.max_new_tokens,
        policy_epochs=grpo.policy_epochs,
        advantage_std_floor=grpo.advantage_std_floor,
        entropy_coef=grpo.training.entropy_coef,
        selection_anchor_weight=grpo.training.selection_anchor_weight,
        loss_weight=grpo.loss_weight,
        reward_scaling=grpo.training.reward_scaling,
        max_grad_norm=grpo.training.max_grad_norm,
    )


def head_drift(before: ReasoningEvaluation, after: ReasoningEvaluation) -> dict[str, float]:
    """How far GRPO moved the selection head's probabilities on one split's tasks (both
    evaluations list the same rows in the same order); the head metrics themselves are in
    the sft_*/grpo_* summaries."""
    change = np.abs(after.head_probs - before.head_probs)
    return {
        f"{after.split}_head_prob_drift_mean": round(float(change.mean()), 4),
        f"{after.split}_head_prob_drift_max": round(float(change.max()), 4),
    }


def _task_order(num_tasks: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_tasks)


def run_grpo(config: PipelineConfig, storage: Storage, callbacks: Sequence[Log] = ()) -> StageResult:
    """GRPO from the SFT model, with the SFT model frozen as the KL reference."""
    started = time.perf_counter()
    grpo = config.grpo_reasoning
    settings = grpo_settings(config)
    weights = RewardWeights(**grpo.reward_weights.model_dump())
    tokenizer = load_pipeline_tokenizer(storage)
    tasks, _, _ = _robot_tables(storage)
    train = tasks[tasks["split"] == "train"].drop_duplicates("task_key").reset_index(drop=True)
    balance = class_balance_weights(robot_multi_hot(train["robots"]), config.training.selection_class_balance)
    if balance is not None:
        settings = replace(settings, selection_pos_weight=tuple(balance.tolist()))
    device = resolve_device(config.compute.device, "compute.device")
    policy = load_stage_model(storage, SFT, device)
    reference = load_stage_model(storage, SFT, device).requires_grad_(False).eval()
    check_compatible(policy.config, tokenizer)

    fingerprint = _fingerprint(
        {
            "stage": GRPO,
            "revision": MODEL_REVISION,
            "grpo": grpo.model_dump(),
            "selection_pos_weight": settings.selection_pos_weight,
            "seed": config.training.seed,
            "inputs": _upstream_digest(storage, SFT),
        }
    )
    checkpoint_dir = storage.path("checkpoints", GRPO, fingerprint)
    history = History(checkpoint_dir / HISTORY_FILE)

    def decode(tokens: torch.Tensor) -> list[str]:
        return tokenizer.batch_decode(tokens.cpu(), skip_special_tokens=True)

    per_epoch = max(1, len(train) // grpo.tasks_per_step)

    def batch_for_step(step: int) -> GroupBatch:
        epoch, offset = divmod(step, per_epoch)
        order = _task_order(len(train), config.training.seed, epoch)
        rows = train.iloc[order[offset * grpo.tasks_per_step : (offset + 1) * grpo.tasks_per_step]]
        encoded = tokenizer(
            [format_prompt(t) for t in rows["task_text"]], add_special_tokens=False, truncation=True,
            max_length=MAX_PROMPT_TOKENS, padding=True, return_tensors="pt",
        )
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device), [set(r) for r in rows["robots"]]

    training = config.training
    loop = LoopSettings(
        grpo.steps, checkpoint_dir, training.save_every_n_steps, training.keep_last_checkpoints,
        training.max_consecutive_nan_steps,
    )
    run_config = {"model": policy.config.to_dict(), "fingerprint": fingerprint}
    run = train_grpo(
        policy, reference, batch_for_step, decode, settings, weights, loop, run_config,
        learning_rate=grpo.training.learning_rate, seed=training.seed, callbacks=[history, *callbacks],
    )

    evaluations = {}
    for split in ("validation", "test"):
        evaluations[f"sft_{split}"] = evaluate_reasoning(
            reference, tokenizer, tasks, split, max_new_tokens=grpo.max_new_tokens
        )
        evaluations[f"grpo_{split}"] = evaluate_reasoning(
            policy, tokenizer, tasks, split, max_new_tokens=grpo.max_new_tokens
        )
    metrics = {f"{name}_{k}": v for name, e in evaluations.items() for k, v in e.summary().items()}
    for split in ("validation", "test"):
        metrics.update(head_drift(evaluations[f"sft_{split}"], evaluations[f"grpo_{split}"]))
    publish_model(
        policy,
        model_dir(storage, GRPO),
        {"stage": GRPO, "fingerprint": fingerprint, "step": grpo.steps, "metrics": metrics},
    )
    comparison = pd.DataFrame(
        [{"model": name, "split": e.split, **e.summary()} for name, e in evaluations.items()]
    )
    return StageResult(
        GRPO, model_dir(storage, GRPO), fingerprint, grpo.steps, run.resumed_from_step, history.read(), metrics,
        time.perf_counter() - started, {"sft_vs_grpo": comparison}, evaluations,
    )
