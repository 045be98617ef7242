import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score

from medmeta.evaluation.metrics import mean_ci
from medmeta.tasktype import TaskType


def auroc(task_type, y, z):
    return TaskType(task_type).auroc(y, z)


def accuracy(task_type, y, z):
    return TaskType(task_type).accuracy(y, z)


def evaluate(task_type, y, z):
    return TaskType(task_type).evaluate(y, z)


def expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --- A direct re-statement of medmnist 3.0.2 evaluator.getAUC / getACC (scores are probabilities).
def official_get_auc(y_true, y_score, task):
    y_true = y_true.squeeze()
    y_score = y_score.squeeze()
    if task == "multi-label, binary-class":
        auc = 0
        for i in range(y_score.shape[1]):
            auc += roc_auc_score(y_true[:, i], y_score[:, i])
        return auc / y_score.shape[1]
    if task == "binary-class":
        if y_score.ndim == 2:
            y_score = y_score[:, -1]
        return roc_auc_score(y_true, y_score)
    auc = 0
    for i in range(y_score.shape[1]):
        auc += roc_auc_score((y_true == i).astype(float), y_score[:, i])
    return auc / y_score.shape[1]


def official_get_acc(y_true, y_score, task, threshold=0.5):
    y_true = y_true.squeeze()
    y_score = y_score.squeeze()
    if task == "multi-label, binary-class":
        y_pre = y_score > threshold
        acc = 0
        for label in range(y_true.shape[1]):
            acc += accuracy_score(y_true[:, label], y_pre[:, label])
        return acc / y_true.shape[1]
    if task == "binary-class":
        if y_score.ndim == 2:
            y_score = y_score[:, -1]
        return accuracy_score(y_true, y_score > threshold)
    return accuracy_score(y_true, np.argmax(y_score, axis=-1))


OFFICIAL_TASK = {"binary": "binary-class", "multi-class": "multi-class", "ordinal": "ordinal-regression",
                 "multi-label": "multi-label, binary-class"}


def random_case(task_type, rng, n=120, c=5):
    if task_type == "binary":
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        logits = rng.normal(size=(n, 1)) + 0.8 * y[:, None]
        probs = expit(logits)
        return y[:, None], logits, probs  # MedMNIST label layout (N, 1)
    if task_type == "multi-label":
        y = rng.integers(0, 2, (n, c))
        y[0], y[1] = 0, 1
        logits = rng.normal(size=(n, c)) + y
        return y, logits, expit(logits)
    y = rng.integers(0, c, n)
    y[:c] = np.arange(c)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += 1.0
    return y[:, None], logits, softmax(logits, axis=1)


@pytest.mark.parametrize("task_type", ["binary", "multi-class", "ordinal", "multi-label"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_official_evaluator(task_type, seed):
    rng = np.random.default_rng(seed)
    y, logits, probs = random_case(task_type, rng)
    official = OFFICIAL_TASK[task_type]
    assert auroc(task_type, y, logits) == pytest.approx(official_get_auc(y, probs, official), abs=1e-12)
    assert accuracy(task_type, y, logits) == pytest.approx(official_get_acc(y, probs, official), abs=1e-12)
    # torch inputs (float32 logits with grad, int labels) give the same numbers
    res = evaluate(task_type, torch.from_numpy(y), torch.tensor(logits, dtype=torch.float32, requires_grad=True))
    assert res["auroc"] == pytest.approx(official_get_auc(y, probs, official), abs=1e-6)
    assert res["acc"] == pytest.approx(official_get_acc(y, probs, official), abs=1e-12)


def test_binary_known_values():
    y = np.array([0, 0, 1, 1])
    assert evaluate("binary", y, np.array([-2.0, -1.0, 1.0, 2.0])) == {"auroc": 1.0, "acc": 1.0}
    assert evaluate("binary", y, np.array([2.0, 1.0, -1.0, -2.0])) == {"auroc": 0.0, "acc": 0.0}
    # positives {0.3, 2} vs negatives {-1, 0.5}: 3 of 4 pairs ordered right; predictions [0,1,1,1]
    z = torch.tensor([[-1.0], [0.5], [0.3], [2.0]])
    assert auroc("binary", torch.tensor([0, 0, 1, 1]), z) == pytest.approx(0.75)
    assert accuracy("binary", torch.tensor([[0], [0], [1], [1]]), z) == pytest.approx(0.75)
    # logit 0 is sigmoid 0.5, which is not above the threshold
    assert accuracy("binary", np.array([0, 1]), np.array([0.0, 0.0])) == 0.5


def test_multiclass_hand_computed():
    z = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]])
    y = np.array([0, 1, 2, 2])
    # class 0: pos score p vs negatives q, q, p (tie) -> 2.5/3; class 1: 1.0;
    # class 2: positives {p, q} vs negatives {q, q} -> (2 + 0.5 + 0.5)/4
    expected = (2.5 / 3 + 1.0 + 0.75) / 3
    assert auroc("multi-class", y, z) == pytest.approx(expected)
    assert auroc("ordinal", y, z) == pytest.approx(expected)
    assert accuracy("multi-class", y, z) == pytest.approx(0.75)
    perfect = np.eye(3)[[0, 1, 2, 2]] * 5
    assert evaluate("multi-class", y, perfect) == {"auroc": 1.0, "acc": 1.0}
    assert auroc("multi-class", y, -perfect) == 0.0


def test_multilabel_known_values():
    y = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    z = np.where(y == 1, 3.0, -3.0)
    assert evaluate("multi-label", y, z) == {"auroc": 1.0, "acc": 1.0}
    assert evaluate("multi-label", y, -z) == {"auroc": 0.0, "acc": 0.0}
    z2 = z.copy()
    z2[0, 0] = 4.0  # label 0: one negative now ranks above both positives -> AUC 0.5; 7/8 right
    assert auroc("multi-label", y, z2) == pytest.approx((0.5 + 1.0) / 2)
    assert accuracy("multi-label", torch.tensor(y, dtype=torch.float32), z2) == pytest.approx(7 / 8)


def test_undefined_auc_is_skipped_or_nan():
    # class 2 never occurs: mean over classes 0 and 1 only
    rng = np.random.default_rng(3)
    z = rng.normal(size=(6, 3))
    y = np.array([0, 1, 0, 1, 1, 0])
    p = softmax(z, axis=1)
    expected = np.mean([roc_auc_score(y == k, p[:, k]) for k in (0, 1)])
    assert auroc("multi-class", y, z) == pytest.approx(expected)
    # multi-label: a constant label is skipped; all constant -> nan
    y_ml = np.array([[0, 1], [1, 1], [1, 1], [0, 1]])
    z_ml = np.array([[-1.0, 0.3], [2.0, -0.2], [1.0, 0.1], [-3.0, 0.0]])
    assert auroc("multi-label", y_ml, z_ml) == 1.0
    assert math.isnan(auroc("multi-label", np.ones((4, 2)), z_ml))
    # binary with one class present: AUROC nan, accuracy still defined
    res = evaluate("binary", np.ones(3), np.array([1.0, -1.0, 2.0]))
    assert math.isnan(res["auroc"]) and res["acc"] == pytest.approx(2 / 3)


def test_large_logits_do_not_create_ties():
    # sigmoid(40) and sigmoid(50) are both 1.0 in float64, as are softmax([0, 60])[1] and
    # softmax([0, 80])[1]; ranking uses log-odds, which keep the order
    assert auroc("binary", np.array([0, 1]), np.array([40.0, 50.0])) == 1.0
    assert auroc("multi-class", np.array([0, 1]), np.array([[0.0, 60.0], [0.0, 80.0]])) == 1.0


@pytest.mark.parametrize(
    "task_type, y, z, match",
    [
        ("regression", [0, 1], [0.0, 1.0], "not a valid TaskType"),
        ("binary", [0, 1], [[0.0, 1.0], [1.0, 0.0]], "one logit"),
        ("binary", [0, 2], [0.0, 1.0], "only 0 and 1"),
        ("binary", [0, 1, 1], [0.0, 1.0], "shape"),
        ("multi-class", [0, 3], [[0.0, 1.0, 2.0]] * 2, "class indices"),
        ("multi-class", [0, 1], [0.0, 1.0], r"\(N, C\)"),
        ("ordinal", [0.5, 1], [[0.0, 1.0]] * 2, "class indices"),
        ("multi-label", [0, 1], [[0.0, 1.0]] * 2, "shape"),
        ("multi-class", [0, 1], [[0.0, float("nan")], [1.0, 0.0]], "NaN"),
        ("binary", [], [], "empty"),
    ],
)
def test_invalid_inputs(task_type, y, z, match):
    with pytest.raises(ValueError, match=match):
        evaluate(task_type, np.array(y), np.array(z))


def test_mean_ci_hand_computed():
    mean, hw = mean_ci([1.0, 2.0, 3.0, 4.0])
    # sample std = sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5/3); SEM = that / 2
    assert mean == pytest.approx(2.5)
    assert hw == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    # NaNs are ignored: [1, 3] -> std sqrt(2), SEM 1
    mean, hw = mean_ci(np.array([1.0, np.nan, 3.0]))
    assert (mean, hw) == (pytest.approx(2.0), pytest.approx(1.96))
    assert mean_ci(torch.tensor([0.7])) == (pytest.approx(0.7), 0.0)
    assert mean_ci([0.8, float("nan")]) == (pytest.approx(0.8), 0.0)
    assert all(math.isnan(v) for v in mean_ci([float("nan")]))
    assert all(math.isnan(v) for v in mean_ci([]))
    assert isinstance(mean_ci([1.0, 2.0])[0], float)


def test_paired_difference_hand_computed():
    from medmeta.evaluation.metrics import paired_difference

    a = [0.70, 0.60, float("nan"), 0.90]
    b = [0.60, 0.65, 0.50, 0.80]
    d = np.array([0.10, -0.05, 0.10])  # episode 2 has no value for a, so it is left out
    out = paired_difference(a, b)
    assert out["episodes"] == 3 and not out["identical"]
    assert out["mean"] == pytest.approx(d.mean())
    assert out["ci95"] == pytest.approx(1.96 * d.std(ddof=1) / math.sqrt(3))
    same = paired_difference(b, b)
    assert same == {"mean": 0.0, "ci95": 0.0, "episodes": 4, "identical": True}
    # A zero mean difference from differing episodes is not "identical".
    assert not paired_difference([0.6, 0.4], [0.4, 0.6])["identical"]
    with pytest.raises(ValueError, match="values per episode for both methods"):
        paired_difference([0.5], [0.5, 0.6])


def test_summary_counts_episodes_with_a_defined_auroc():
    from medmeta.evaluation.results import summarise

    per_episode = [{"auroc": 0.8, "acc": 0.7}, {"auroc": float("nan"), "acc": 0.5}, {"auroc": 0.6, "acc": 0.9}]
    s = summarise(per_episode)
    assert s["episodes"] == 3 and s["episodes_auroc"] == 2
    assert s["auroc"] == pytest.approx(0.7) and s["acc"] == pytest.approx(0.7)


def test_table_shows_paired_differences_and_identical_methods():
    from medmeta.evaluation.results import add_paired_differences, format_table, summarise

    def method(values):
        per = [{"episode": i, "auroc": v, "acc": v} for i, v in enumerate(values)]
        return {"summary": summarise(per), "per_episode": per, "seconds": {"train": 0, "adapt": 1, "total": 1}}

    methods = {"scratch": method([0.5, 0.6, 0.7]), "same": method([0.5, 0.6, 0.7]), "better": method([0.6, 0.8, 0.8])}
    add_paired_differences(methods, "scratch")
    assert methods["same"]["paired"]["auroc"]["identical"] and "paired" not in methods["scratch"]
    assert methods["better"]["paired"]["auroc"]["mean"] == pytest.approx(0.4 / 3)
    table = format_table({"target": "t", "config": {"size": 28}, "sources": [], "reference": "scratch",
                          "methods": methods})
    lines = {line.split()[0]: line for line in table.splitlines()[2:5]}
    assert "reference" in lines["scratch"] and "identical" in lines["same"] and "+0.133 ±" in lines["better"]
