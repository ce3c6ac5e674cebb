import math

import pytest
import torch

from geko_data.signals import causal_lm, classification


def test_causal_lm_by_hand():
    # vocab 2; logits (1, 3, 2); labels shifted: positions 1 and 2 are targets, position 0 ignored
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    sig = causal_lm(logits, labels, correct_threshold=1.0)
    # target 1 at step 0: p = 3/4; target 0 at step 1: p = 3/4
    assert sig.loss[0].item() == pytest.approx(-math.log(0.75), rel=1e-5)
    assert sig.confidence[0].item() == pytest.approx(0.75, rel=1e-5)
    assert bool(sig.correct[0])


def test_causal_lm_ignores_padding_and_reports_nan_for_no_target():
    logits = torch.zeros(2, 4, 5)
    logits[0, 0, 2] = 5.0
    labels = torch.tensor([[-100, 2, -100, -100], [-100, -100, -100, -100]])
    sig = causal_lm(logits, labels)
    p = math.exp(5) / (math.exp(5) + 4)
    assert sig.loss[0].item() == pytest.approx(-math.log(p), rel=1e-5)
    assert sig.confidence[0].item() == pytest.approx(p, rel=1e-5)
    assert math.isnan(sig.loss[1].item()) and not bool(sig.correct[1])
    assert math.isnan(sig.confidence[1].item())  # not finite, so never mistaken for a 0-confidence sample


def test_causal_lm_threshold_and_grad():
    logits = torch.zeros(1, 3, 3, requires_grad=True)
    with torch.no_grad():
        logits[0, 0, 1] = 2.0  # right
        logits[0, 1, 0] = 2.0  # wrong (target 2)
    labels = torch.tensor([[0, 1, 2]])
    assert bool(causal_lm(logits, labels, correct_threshold=0.5).correct[0])
    sig = causal_lm(logits, labels, correct_threshold=1.0)
    assert not bool(sig.correct[0])
    sig.loss.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_classification_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    sig = classification(logits, torch.tensor([1, 0]))
    assert sig.loss[0].item() == pytest.approx(-math.log(0.25), rel=1e-5)
    assert sig.confidence[0].item() == pytest.approx(0.75, rel=1e-5)
    assert sig.correct.tolist() == [False, True]


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="logits"):
        causal_lm(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        classification(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def _answer_logits(probs_right):
    """Logits (1, T+1, 4) whose target tokens (labels 1, 2, 3, ...) get probabilities ``probs_right``;
    a probability under 1/2 leaves the argmax on token 0, so that token is wrong."""
    t = len(probs_right)
    logits = torch.zeros(1, t + 1, 4)
    for i, p in enumerate(probs_right):
        target = 1 + i % 3
        rest = (1 - p) / 3
        logits[0, i] = torch.log(torch.full((4,), rest))
        logits[0, i, target] = math.log(p)
        if p < 0.5:
            logits[0, i, 0] = math.log(1 - p - 2 * rest)  # the wrong token takes the argmax
    labels = torch.tensor([[-100] + [1 + i % 3 for i in range(t)]])
    return logits, labels


def test_causal_lm_default_is_sequence_exact_match_with_min_confidence():
    # four trivial tokens near-certain, the one content token wrong at p = 0.1
    logits, labels = _answer_logits([0.99, 0.99, 0.1, 0.99, 0.99])
    sig = causal_lm(logits, labels)
    assert not bool(sig.correct[0])  # 4/5 tokens right is not an answer
    assert sig.confidence[0].item() == pytest.approx(0.1, rel=1e-4)  # trivial tokens cannot lift it
    old = causal_lm(logits, labels, correct_threshold=0.5, confidence="mean")  # the earlier behaviour
    assert bool(old.correct[0]) and old.confidence[0].item() == pytest.approx((4 * 0.99 + 0.1) / 5, rel=1e-4)
    geo = causal_lm(logits, labels, confidence="geometric")
    assert geo.confidence[0].item() == pytest.approx((0.99 ** 4 * 0.1) ** 0.2, rel=1e-4)
    assert geo.confidence[0].item() == pytest.approx(math.exp(-sig.loss[0].item()), rel=1e-5)


def test_causal_lm_every_token_right_is_correct_and_padding_does_not_lower_min():
    logits, labels = _answer_logits([0.9, 0.7, 0.95])
    labels = torch.cat([labels, torch.tensor([[-100]])], dim=1)  # a padded position after the answer
    logits = torch.cat([logits, torch.zeros(1, 1, 4)], dim=1)
    sig = causal_lm(logits, labels)
    assert bool(sig.correct[0]) and sig.confidence[0].item() == pytest.approx(0.7, rel=1e-4)
    empty = causal_lm(torch.zeros(1, 3, 4), torch.full((1, 3), -100))
    assert math.isnan(empty.confidence[0].item()) and not bool(empty.correct[0])


def test_causal_lm_confidence_choice_is_validated():
    with pytest.raises(ValueError, match="`confidence` must be one of min, geometric, mean, got 'max'"):
        causal_lm(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), confidence="max")


def test_causal_lm_answer_names_the_target_tokens_wherever_they_sit():
    """Two samples with the same answer tokens get the same ``answer``, whatever the prompt's length or the
    padding before it; another answer (another token, the same tokens in another order, one token more)
    gets another; a sample without target tokens gets 0."""
    v = 7
    labels = torch.tensor([
        [-100, -100, 3, 5, -100, -100],  # answer (3, 5) after a short prompt
        [-100, -100, -100, -100, 3, 5],  # the same answer later in the row
        [-100, -100, 5, 3, -100, -100],  # the same tokens in another order
        [-100, -100, 3, 5, 0, -100],  # one token (id 0) more
        [-100, -100, 3, 6, -100, -100],  # another last token
        [-100, -100, -100, -100, -100, -100],  # no target
    ])
    sig = causal_lm(torch.randn(6, 6, v), labels)
    a = sig.answer.tolist()
    assert sig.answer.dtype == torch.int64 and a[0] == a[1]
    assert len({a[0], a[2], a[3], a[4]}) == 4 and a[5] == 0
    assert all(0 <= x < 2**31 for x in a)


def test_answer_hash_of_long_answers_stays_in_range_and_matches_a_python_reference():
    from geko_data.signals import _HASH_BASE, _HASH_MOD, answer_hash

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 200_000, (4, 700), generator=g)
    mask = torch.rand(4, 700, generator=g) < 0.8
    got = answer_hash(tokens, mask).tolist()
    for row in range(4):
        ref, k = 0, 0
        for t, m in zip(tokens[row].tolist(), mask[row].tolist()):
            if m:
                ref = (ref + (t % _HASH_MOD + 1) * pow(_HASH_BASE, k, _HASH_MOD)) % _HASH_MOD
                k += 1
        assert got[row] == ref


def test_classification_answer_is_the_label():
    sig = classification(torch.randn(4, 3), torch.tensor([2, 0, 1, 2]))
    assert sig.answer.tolist() == [2, 0, 1, 2]


def test_classification_answer_of_an_ignored_label_is_no_answer():
    from geko_data.signals import NO_ANSWER
    from geko_data.state import SampleState

    sig = classification(torch.randn(3, 4), torch.tensor([1, -100, 3]))
    assert sig.answer.tolist() == [1, NO_ANSWER, 3]
    s = SampleState(3)
    s.report([0, 1, 2], sig.loss.detach(), answer=sig.answer)  # reported without an error (-100 was refused)
    assert s.answer.tolist() == [1, 2**32 - 1, 3]
