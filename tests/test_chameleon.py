"""Chameleon's pieces, each against a hand computation or an independent one: data (LaMP-2
reader, MovieLens gold rule), directions (planted-direction recovery), the edit and its hooks,
scoring and bootstrap, the frozen check, and the control-vector GGUF."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from newllm.chameleon.data import (
    ProfileItem,
    Question,
    build_movielens_task,
    candidates,
    gold_tag,
    majority_accuracy,
    profile_free_oracle_accuracy,
    profile_rule,
    random_listed_accuracy,
    read_lamp2,
    split_users,
)
from newllm.chameleon.directions import estimate, first_right_singular, random_like
from newllm.chameleon.editing import (
    EditStats,
    LayerEdit,
    edit_of,
    projection_edit,
    resolve_targets,
)
from newllm.chameleon.export import read_control_vector, write_control_vector
from newllm.chameleon.scoring import (
    INVALID,
    bootstrap_ci,
    entropy,
    exact_tag,
    leak_figures,
    macro_f1,
    macro_f1_resampled,
    null_distribution,
    paired_difference,
    parse_tag,
    resamples,
    view_predictions,
)
from newllm.core.errors import NewllmError
from newllm.core.frozen import check_unchanged, freeze

# --- data --------------------------------------------------------------------------------------

LAMP_INPUT = ("Which tag does this movie relate to among the following tags? Just answer with "
              "the tag name without further explanation. tags: [sci-fi, comedy, classic] "
              "description: {}")


def write_lamp(folder: Path, questions: list, golds: list) -> Path:
    path = folder / "dev_questions.json"
    path.write_text(json.dumps(questions))
    (folder / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_2", "golds": golds}))
    return path


def lamp_question(qid: str, description: str, profile: list) -> dict:
    return {"id": qid, "input": LAMP_INPUT.format(description), "profile": profile}


def test_lamp2_reader_reads_the_published_format(tmp_path):
    path = write_lamp(tmp_path, [
        lamp_question("110", "A robot learns to love.", [
            {"id": "1100", "description": "Space travel gone wrong.", "tag": "sci-fi"},
            {"id": "1101", "description": "Two friends on a road trip.", "tag": "comedy"}]),
        lamp_question("111", "A silent film star.", [
            {"id": "1110", "description": "A 1950s musical.", "tag": "classic"}]),
    ], [{"id": "110", "output": "sci-fi"}, {"id": "111", "output": "classic"}])
    task = read_lamp2(path)
    assert task.tags == ("sci-fi", "comedy", "classic")
    assert [q.id for q in task.questions] == ["110", "111"]
    first = task.questions[0]
    assert first.gold == "sci-fi" and first.user == "110" and first.item_key is None
    assert [(p.id, p.tag) for p in first.profile] == [("1100", "sci-fi"), ("1101", "comedy")]
    assert first.profile[0].description == "Space travel gone wrong."
    assert first.input.endswith("description: A robot learns to love.")
    assert profile_free_oracle_accuracy(task.questions) is None


@pytest.mark.parametrize(("questions", "golds", "needle"), [
    ([lamp_question("1", "x", [{"id": "a", "description": "y", "tag": "comedy"}])],
     [{"id": "1", "output": "horror"}], "'horror', not one of the task's tags"),
    ([lamp_question("1", "x", [])], [{"id": "1", "output": "comedy"}], "empty profile"),
    ([lamp_question("1", "x", [{"id": "a", "description": "y", "tag": "comedy"}])],
     [{"id": "2", "output": "comedy"}], "has no gold for question 1"),
])
def test_lamp2_reader_rejects_bad_files(tmp_path, questions, golds, needle):
    path = write_lamp(tmp_path, questions, golds)
    with pytest.raises(NewllmError, match=needle.replace("(", r"\(")):
        read_lamp2(path)


def write_movielens(folder: Path, movies: dict[int, str], ratings: list[tuple]) -> Path:
    folder.mkdir()
    (folder / f"{folder.name}.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{m}\tMovie {m}\t1990\t{g}\n" for m, g in movies.items()))
    (folder / f"{folder.name}.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in ratings))
    return folder


def test_gold_rule_picks_the_genre_the_profile_favours():
    counts = Counter({"Action": 3, "Drama": 2, "Comedy": 1})
    assert gold_tag(("Action", "Comedy"), counts) == "Action"
    assert gold_tag(("Comedy", "Drama"), counts) == "Drama"
    assert gold_tag(("Drama", "Romance"), Counter({"Drama": 1, "Romance": 1})) is None  # tie
    assert gold_tag(("War", "Western"), counts) is None  # the profile says nothing


def test_movielens_gold_depends_on_the_users_profile(tmp_path):
    movies = {1: "Action Comedy", 2: "Action", 3: "Action Thriller", 4: "Comedy", 5: "Drama",
              6: "Action Drama", 7: "Comedy Romance", 8: "Comedy", 9: "Comedy"}
    # user 1 likes action (movie 7 is rated 2: not liked, so not in the profile); user 2 likes
    # comedy; both are asked about movie 1 (Action, Comedy) whichever the seed picks
    ratings = [(1, m, 5, 10 + m) for m in (1, 2, 3, 4, 5, 6)] + [(1, 7, 2, 30)]
    ratings += [(2, m, 5, 10 + m) for m in (1, 4, 8, 9)] + [(2, 2, 1, 40)]
    folder = write_movielens(tmp_path / "ml-hand", movies, ratings)
    task = build_movielens_task(folder, high_rating=4, max_profile_items=10,
                                min_profile_items=3, seed=0)
    by_user = {q.user: q for q in task.questions}
    assert task.tags == ("Action", "Comedy", "Drama", "Romance", "Thriller")
    one = by_user["1"]
    # whichever multi-genre movie is the question, the profile's counts make it Action
    assert one.gold == "Action"
    assert all(p.id != "7" for p in one.profile)
    tags = {p.id: p.tag for p in one.profile}
    assert tags.get("5") == "Drama" and tags.get("2") == "Action"
    assert tags.get("1", "Action") == "Action"  # Action 3 (or 2) beats Comedy 1
    two = by_user["2"]
    assert two.id == "2-1" and two.gold == "Comedy"  # movie 1 is user 2's only candidate
    assert [p.id for p in two.profile] == ["4", "8", "9"]  # oldest first, question left out
    assert "Movie 1 (1990); genres: Action, Comedy" in two.input
    assert majority_accuracy(task.questions) == 0.5
    # the oracle sees only the genres: one genre set with two golds can get only one right
    same_movie = one.item_key == two.item_key
    assert profile_free_oracle_accuracy(task.questions) == (0.5 if same_movie else 1.0)


def test_split_by_user_is_seeded_and_disjoint(tmp_path):
    from chameleon_helpers import make_mini_movielens

    task = build_movielens_task(make_mini_movielens(tmp_path / "ml-mini"), high_rating=4,
                                max_profile_items=6, min_profile_items=3, seed=0)
    a, b = split_users(task, 5, 8, seed=0), split_users(task, 5, 8, seed=0)
    assert a == b
    users = ({q.user for q in a.direction}, {q.user for q in a.evaluation})
    assert len(users[0]) == 5 and len(users[1]) == 8 and not users[0] & users[1]
    assert {q.user for q in split_users(task, 5, 8, seed=1).evaluation} != users[1]
    with pytest.raises(NewllmError, match="fewer than"):
        split_users(task, 50, 50, seed=0)


# --- directions ----------------------------------------------------------------------------------

def test_planted_directions_are_recovered():
    g = torch.Generator().manual_seed(0)
    d, n = 48, 40
    u = torch.randn(d, generator=g)
    u /= u.norm()
    w = torch.randn(d, generator=g)
    w /= w.norm()
    personal = (2 + torch.rand(n, 1, generator=g)) * u + 0.05 * torch.randn(n, d, generator=g)
    neutral = personal - (1 + torch.rand(n, 1, generator=g)) * w \
        + 0.05 * torch.randn(n, d, generator=g)
    for method in ("diff_svd", "diff_mean"):
        found = estimate(personal, neutral, theta_n_method=method)
        assert abs(float(found.theta_p @ u)) > 0.99
        assert abs(float(found.theta_n @ w)) > 0.99
        # sign convention: personalized states project positively; θ_n points from neutral
        # toward personalized
        assert float(found.theta_p @ u) > 0 and float(found.theta_n @ w) > 0
    # the quality figures against an independent computation (numpy's SVD)
    s = np.linalg.svd(personal.double().numpy(), compute_uv=False)
    assert found.quality["sigma1_share_p"] == pytest.approx(s[0] ** 2 / (s ** 2).sum())
    diff = (personal - neutral).double().numpy()
    cos = diff @ found.theta_n.double().numpy() / np.linalg.norm(diff, axis=1)
    assert found.quality["diff_cos_mean"] == pytest.approx(cos.mean(), abs=1e-6)
    assert found.quality["theta_p_dot_theta_n"] == pytest.approx(float(u @ w), abs=0.02)


def test_centering_removes_the_mean_shift_of_the_difference():
    """A constant difference (pure mean shift) is all signal uncentered, nothing centered."""
    g = torch.Generator().manual_seed(1)
    personal = torch.randn(20, 16, generator=g)
    shift = torch.zeros(16)
    shift[3] = 1.0
    neutral = personal - shift + 1e-3 * torch.randn(20, 16, generator=g)
    assert abs(float(estimate(personal, neutral).theta_n[3])) > 0.99
    assert abs(float(estimate(personal, neutral, center=True).theta_n[3])) < 0.5


def test_first_right_singular_and_random_direction():
    m = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    v, share = first_right_singular(m)
    assert abs(float(v[0])) == pytest.approx(1.0) and share == pytest.approx(0.9)
    theta = torch.tensor([3.0, 4.0, 0.0])
    r = random_like(theta, torch.Generator().manual_seed(0))
    assert float(r.norm()) == pytest.approx(5.0) and not torch.allclose(r / 5, theta / 5)


# --- editing -------------------------------------------------------------------------------------

def test_edit_is_alpha_proj_p_minus_abs_beta_proj_n_on_a_hand_made_tensor():
    x = torch.tensor([[3.0, 4.0, 12.0]])
    p_hat, n_hat = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.6, 0.8])
    # ⟨x, p̂⟩ = 3, ⟨x, n̂⟩ = 2.4 + 9.6 = 12
    expected = 0.5 * torch.tensor([3.0, 0.0, 0.0]) - 0.25 * 12 * torch.tensor([0.0, 0.6, 0.8])
    for beta in (0.25, -0.25):  # |beta|: the sign of beta does not matter
        assert torch.allclose(edit_of(x, p_hat, n_hat, 0.5, beta), expected)
    assert torch.allclose(edit_of(x, -p_hat, -n_hat, 0.5, 0.25), expected)  # nor θ's sign


def test_edit_ratio_control_hits_its_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g) * torch.rand(2, 5, 1, generator=g) * 10
    p_hat, n_hat = torch.randn(16, generator=g), torch.randn(16, generator=g)
    p_hat, n_hat = p_hat / p_hat.norm(), n_hat / n_hat.norm()
    edit = edit_of(x, p_hat, n_hat, 0.6, 0.4, target_edit_ratio=0.025)
    ratio = edit.norm(dim=-1) / x.norm(dim=-1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.025), atol=1e-6)
    raw = edit_of(x, p_hat, n_hat, 0.6, 0.4)  # same direction as the controlled edit
    assert torch.allclose(torch.nn.functional.cosine_similarity(raw, edit, dim=-1),
                          torch.ones(2, 5), atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from newllm.core.base import load_base

    return load_base(str(tiny_model), device="cpu")


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _edits(model, generator, layers=(0, 1)):
    d = model.config.hidden_size
    return [LayerEdit(t, torch.randn(d, generator=generator), torch.randn(d, generator=generator))
            for t in resolve_targets(model, list(layers), "test.layers")]


def test_hooks_change_outputs_and_leave_them_bit_identical_after(tiny):
    model = tiny.model
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    before = _logits(model, ids)
    edits = _edits(model, torch.Generator().manual_seed(0))
    stats = EditStats()
    with projection_edit(model, edits, 0.6, 0.4, 0.025, stats):
        during = _logits(model, ids)
    after = _logits(model, ids)
    assert not torch.equal(before, during)
    assert torch.equal(before, after)
    assert all(not m._forward_hooks for m in model.modules())
    assert stats.mean_ratio == pytest.approx(0.025, rel=1e-4)  # realized = target
    assert set(stats.edit_sums) == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_an_exception_inside_generation_still_removes_the_hooks(tiny):
    model = tiny.model
    ids = torch.tensor([[5, 17, 42]])
    before = _logits(model, ids)
    with pytest.raises(RuntimeError, match="boom"), \
            projection_edit(model, _edits(model, torch.Generator().manual_seed(1)), 1.0, 1.0):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(before, _logits(model, ids))


def test_hook_output_equals_the_edit_of_the_captured_mlp_output(tiny):
    """What the hook does inside the model is x + edit_of(x) for the module's real output."""
    from newllm.chameleon.editing import capture_outputs

    model = tiny.model
    ids = torch.tensor([[5, 17, 42, 8]])
    edits = _edits(model, torch.Generator().manual_seed(2), [1])
    path = edits[0].target.path
    with torch.inference_mode(), capture_outputs(model, [path]) as plain:
        model(input_ids=ids)
    x = plain[path][0]
    p_hat = edits[0].theta_p / edits[0].theta_p.norm()
    n_hat = edits[0].theta_n / edits[0].theta_n.norm()
    # the last layer's MLP output is the last thing added to the residual before the norm
    with torch.inference_mode(), projection_edit(model, edits, 0.6, 0.4), \
            capture_outputs(model, [path]) as edited:
        model(input_ids=ids)
    expected = x + 0.6 * (x @ p_hat)[..., None] * p_hat - 0.4 * (x @ n_hat)[..., None] * n_hat
    assert torch.allclose(edited[path][0], expected, atol=1e-6)


def test_targets_resolve_indices_and_paths(tiny):
    model = tiny.model
    assert [t.path for t in resolve_targets(model, [0, -1], "k")] == \
        ["model.layers.0.mlp", "model.layers.1.mlp"]
    # the order given is kept; an index may also come as text
    assert [t.layer for t in resolve_targets(model, ["1", 0], "k")] == [1, 0]
    assert resolve_targets(model, ["model.layers.1.mlp"], "k")[0].layer == 1
    with pytest.raises(NewllmError, match=r"target_decoder_layers must hold decoder layer "
                                          r"indices in \[-2, 1\].*got 2\."):
        resolve_targets(model, [2], "estimate_directions.target_decoder_layers")
    with pytest.raises(NewllmError, match=r"has no module 'model\.layers\.7\.mlp'"):
        resolve_targets(model, ["model.layers.7.mlp"], "k")
    with pytest.raises(NewllmError, match="names a module twice"):
        resolve_targets(model, [1, "model.layers.1.mlp"], "k")
    with pytest.raises(NewllmError, match=r"k must list decoder layer indices"):
        resolve_targets(model, [], "k")


# --- frozen --------------------------------------------------------------------------------------

def test_frozen_check_counts_and_catches_a_changed_weight(tiny_model):
    from newllm.core.base import load_base

    model = load_base(str(tiny_model), device="cpu").model
    model.train()
    state = freeze(model)
    assert not model.training and state.trainable_params == 0
    assert state.total_params == sum(p.numel() for p in model.parameters())
    assert check_unchanged(model, state, "test") == state.weights_hash
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    with pytest.raises(NewllmError, match="weights changed during the run"):
        check_unchanged(model, state, "test")


# --- scoring -------------------------------------------------------------------------------------

TAGS = ("Action", "Comedy", "Sci-Fi", "Children's")


@pytest.mark.parametrize(("text", "exact", "named"), [
    ("Action", "Action", "Action"), (" comedy.\nmore", "Comedy", "Comedy"),
    ("Tag: Sci-Fi", "Sci-Fi", "Sci-Fi"), ("Children's", "Children's", "Children's"),
    ("sci fi movie", INVALID, "Sci-Fi"), ("Drama", INVALID, INVALID), ("", INVALID, INVALID),
    ("This movie belongs to the genre of Comedy, Action", INVALID, "Comedy"),
    ("It is an action-comedy", INVALID, "Action"), ("Actionable advice", INVALID, INVALID)])
def test_parse_tag(text, exact, named):
    assert exact_tag(text, TAGS) == exact
    assert parse_tag(text, TAGS) == named


def test_macro_f1_and_its_resampled_form_agree_with_hand_counts():
    gold = ["Action", "Action", "Comedy", "Sci-Fi"]
    pred = ["Action", "Comedy", "Comedy", INVALID]
    # Action: tp1 fp0 fn1 -> 2/3; Comedy: tp1 fp1 fn0 -> 2/3; Sci-Fi: tp0 fn1 -> 0
    assert macro_f1(gold, pred, TAGS) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    index = resamples(4, 200, seed=0)
    fast = macro_f1_resampled(gold, pred, TAGS, index)
    slow = [macro_f1([gold[i] for i in row], [pred[i] for i in row], TAGS) for row in index]
    assert np.allclose(fast, slow)
    ci = bootstrap_ci(gold, pred, TAGS, 200, seed=0)
    assert ci["accuracy"] == 0.5 and ci["accuracy_lo"] <= 0.5 <= ci["accuracy_hi"]
    assert ci["macro_f1"] == pytest.approx(4 / 9)
    assert ci["macro_f1_lo"] <= ci["macro_f1"] <= ci["macro_f1_hi"]


def test_paired_difference_and_entropy():
    a = np.array([1, 1, 1, 0, 1, 1, 0, 1] * 5)
    same = paired_difference(a, a, 500, seed=0)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    better = paired_difference(a, np.zeros_like(a), 500, seed=0)
    assert better["diff"] == pytest.approx(0.75) and better["lo"] > 0.5
    # against a mean over draws (fractions): the interval is of the mean difference
    half = paired_difference(a, np.full(len(a), 0.5), 500, seed=0)
    assert half["diff"] == pytest.approx(0.25) and half["lo"] < 0.25 < half["hi"]
    uniform = np.log(np.full((1, 4), 0.25))
    assert entropy(uniform)[0] == pytest.approx(np.log(4))
    assert entropy(np.array([[0.0, -1e9]]))[0] == pytest.approx(0.0, abs=1e-9)


# --- export --------------------------------------------------------------------------------------

def test_control_vector_gguf_reads_back(tmp_path):
    vectors = {21: np.arange(8, dtype=np.float32) / 10, 29: -np.ones(8, dtype=np.float32)}
    path = tmp_path / "cv.gguf"
    write_control_vector(path, vectors, "llama")
    import gguf

    reader = gguf.GGUFReader(str(path))  # independent of our reader
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert sorted(t.name for t in reader.tensors) == ["direction.21", "direction.29"]
    meta, back = read_control_vector(path)
    assert meta == {"general.architecture": "controlvector",
                    "controlvector.model_hint": "llama", "controlvector.layer_count": 2}
    assert set(back) == {21, 29} and all(np.array_equal(back[k], vectors[k]) for k in vectors)
    with pytest.raises(NewllmError, match="cannot set layer 0"):
        write_control_vector(tmp_path / "zero.gguf", {0: vectors[21]}, "llama")
    assert not (tmp_path / "zero.gguf").exists()


def test_tag_logprobs_equal_one_sequence_at_a_time(tiny):
    """The packed pass (all tags side by side, kept apart by the mask) against scoring each
    prompt + tag as its own unpadded sequence."""
    from newllm.chameleon.lm import tag_logprobs

    model = tiny.model
    prompts = [[5, 17, 42, 8, 9], [3, 4, 6], [7]]
    tags = [[11], [12, 13], [14, 15, 16]]
    packed = tag_logprobs(model, prompts, tags, batch_size=2, pad_id=0)
    for i, prompt in enumerate(prompts):
        for k, tag in enumerate(tags):
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt + tag])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            expected = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(tag))
            assert float(packed[i, k]) == pytest.approx(expected, abs=1e-4)


# --- scoring views, baselines, the null distribution, the leak check ---------------------------

def test_scoring_views_against_a_hand_computed_case():
    """Tags 0..2 with 1, 2 and 4 tokens; row 0 lists tags 1 and 2, row 1 lists all three."""
    summed = np.array([[-1.0, -3.0, -4.4],    # per token: -1, -1.5, -1.1
                       [-2.0, -2.2, -6.0]])   # per token: -2, -1.1, -1.5
    prior = np.array([[-1.0, -4.0, -4.0],     # per token: -1, -2, -1
                      [-3.0, -2.0, -8.0]])    # per token: -3, -1, -2
    lengths, listed = [1, 2, 4], [[1, 2], [0, 1, 2]]
    # all: summed over every tag (the seed's view) favours the short tag 0 in both rows
    assert view_predictions(summed, lengths, listed, "all").tolist() == [0, 0]
    # listed: the best mean log-probability among the row's own candidates
    assert view_predictions(summed, lengths, listed, "listed").tolist() == [2, 1]
    # calibrated: minus the no-profile mean; row 0: tag1 -1.5+2 = 0.5, tag2 -1.1+1 = -0.1;
    # row 1: tag0 -2+3 = 1, tag1 -1.1+1 = -0.1, tag2 -1.5+2 = 0.5
    assert view_predictions(summed, lengths, listed, "calibrated", prior).tolist() == [1, 0]
    # a tie goes to the first candidate listed
    assert view_predictions(np.zeros((1, 3)), lengths, [[2, 0]], "listed").tolist() == [2]
    with pytest.raises(ValueError, match="prior"):
        view_predictions(summed, lengths, listed, "calibrated")


def test_candidates_profile_rule_and_random_listed_baseline():
    profile = (ProfileItem("1", "A (1990); genres: Action, Drama", "Action"),
               ProfileItem("2", "B (1991); genres: Drama", "Drama"),
               ProfileItem("3", "C (1992); genres: Comedy, Drama", "Drama"))
    tags = ("Action", "Comedy", "Drama", "War")
    drama = Question("u-9", "u", "...", profile, "Drama", item_key="Action,Drama")
    comedy = Question("v-9", "v", "...", profile, "Comedy", item_key="Comedy,War,Action")
    assert candidates(drama, tags) == ("Action", "Drama")
    # the rule counts the profile's genres: Drama 3 > Action 1; Comedy 1 = Action 1 > War 0,
    # a tie that goes to the first listed
    assert profile_rule(drama, tags) == "Drama" and profile_rule(comedy, tags) == "Comedy"
    assert random_listed_accuracy((drama, comedy), tags) == pytest.approx((1 / 2 + 1 / 3) / 2)
    lamp = Question("1", "1", "...", (ProfileItem("a", "text", "comedy"),), "comedy")
    assert candidates(lamp, ("comedy", "sci-fi")) == ("comedy", "sci-fi")
    assert profile_rule(lamp, ("sci-fi", "comedy")) == "comedy"  # LaMP-2: by profile tags


def test_the_profile_rule_is_the_ceiling_on_movielens(tmp_path):
    from chameleon_helpers import make_mini_movielens

    task = build_movielens_task(make_mini_movielens(tmp_path / "ml-mini"), high_rating=4,
                                max_profile_items=6, min_profile_items=3, seed=0)
    assert all(profile_rule(q, task.tags) == q.gold for q in task.questions)
    assert all(q.gold in candidates(q, task.tags) for q in task.questions)


def test_null_distribution_p_on_a_planted_effect_and_on_none():
    rng = np.random.default_rng(0)
    tags = ("a", "b")
    gold = list(rng.choice(tags, size=100))
    flip = {"a": "b", "b": "a"}

    def predictions(accuracy: float) -> list[str]:
        return [g if rng.random() < accuracy else flip[g] for g in gold]

    nulls = [predictions(0.5) for _ in range(19)]
    planted, draws = null_distribution(gold, predictions(0.8), nulls, tags, 500, 0, "listed")
    assert planted["edit_null_rank_listed"] == 1 and planted["edit_null_p_listed"] == 0.05
    assert planted["edit_minus_null_listed_lo"] > 0.15
    assert planted["null_listed_accuracy_sd"] == pytest.approx(np.std(draws["accuracy"],
                                                                      ddof=1))
    # no effect: the edit is one more draw of the same distribution, so p is uniform on
    # {1/20, ..., 20/20} over seeds (ties only make p larger)
    ps = []
    for _ in range(300):
        ps.append(null_distribution(gold, predictions(0.5), [predictions(0.5) for _ in range(19)],
                                    tags, 20, 0, "listed")[0]["edit_null_p_listed"])
    ps = np.array(ps)
    assert 0.45 < ps.mean() < 0.65
    assert (ps <= 0.05).mean() < 0.1 and (ps <= 0.5).mean() > 0.3


def test_leak_figures_on_planted_generations():
    listed = [("Drama", "War"), ("Comedy", "Drama", "Romance"), ("Action", "Drama")]
    golds = ["Drama", "Comedy", "Action"]
    clean = ["A war story with drama.", "A drama and romance comedy.", "Action and drama."]
    figures = leak_figures(clean, golds, listed)  # every listed genre named: no leak
    assert figures["names_gold_share"] == 1 and figures["names_other_candidate_share"] == 1
    assert figures["leak"] == 0
    leaky = ["It is a drama.", "A comedy.", "Pure action."]  # only the gold named
    figures = leak_figures(leaky, golds, listed)
    assert figures["leak"] == 1 and figures["names_other_candidate_share"] == 0
    half = ["It is a drama.", "A drama.", "Pure action."]  # 2 golds; 1 other of 2 in text 2
    figures = leak_figures(half, golds, listed)
    assert figures["names_gold_share"] == pytest.approx(2 / 3)
    assert figures["names_other_candidate_share"] == pytest.approx(0.5 / 3)
    assert figures["leak"] == pytest.approx(2 / 3 - 0.5 / 3)
    assert figures["leak_lo"] <= figures["leak"] <= figures["leak_hi"]
    assert leak_figures(["x"], ["Drama"], [("Drama",)]) == {"leak_texts": 0}


def test_within_genre_leak_separates_a_genre_prior_from_a_leak():
    # every text names Drama and nothing else; Drama is the gold in 3 of 4 questions: the raw
    # figure sees a leak, the within-genre one none (Drama is named whether gold or not)
    listed = [("Drama", "War"), ("Comedy", "Drama"), ("Drama", "Romance"), ("Action", "Drama")]
    golds = ["Drama", "Drama", "Drama", "Action"]
    prior = leak_figures(["a drama"] * 4, golds, listed)
    assert prior["leak"] == pytest.approx((3 * 1 + 0 - 1) / 4)
    # Drama: named 3/3 as gold, 1/1 as another candidate; Action: 0/1 as gold, never other
    assert prior["leak_within_genre"] == 0
    # texts that name exactly the gold: within each genre seen both ways, rate 1 against 0
    texts = ["a drama", "a drama", "a drama", "an action film"]
    listed[1] = ("Action", "Drama")
    golds = ["Drama", "Action", "Drama", "Action"]
    texts[1] = "an action film"
    leaky = leak_figures(texts, golds, listed)
    assert leaky["leak_within_genre"] == pytest.approx(1.0)
    assert leaky["leak_within_genre_lo"] <= 1.0 <= leaky["leak_within_genre_hi"] + 1e-12


def test_alpha_only_edit_is_parallel_to_theta_p_and_linear_in_alpha_beta():
    """The seed's two numerical checks, as unit tests (they hold by construction of edit_of)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 24, generator=g, dtype=torch.float64)
    p_hat, n_hat = (v / v.norm() for v in torch.randn(2, 24, generator=g, dtype=torch.float64))
    only_p = edit_of(x, p_hat, n_hat, 0.6, 0.0)
    cos = (only_p @ p_hat).abs() / only_p.norm(dim=-1)
    assert torch.allclose(cos, torch.ones(7, dtype=torch.float64))
    once, twice = edit_of(x, p_hat, n_hat, 0.6, 0.4), edit_of(x, p_hat, n_hat, 1.2, 0.8)
    assert torch.allclose(twice, 2 * once)
