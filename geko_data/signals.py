"""Per-sample learning signals from model outputs: loss, confidence, correctness, answer.

gekolib gives every sample of an HF batch the batch-mean loss and measures
confidence as the mean max-probability over all positions, padding
included; these are per sample and on target tokens only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["CONFIDENCES", "NO_ANSWER", "Signals", "answer_hash", "causal_lm", "classification"]


class Signals(NamedTuple):
    """Per-sample signals, each shape (B,).

    ``loss`` keeps its graph (weight it and call backward); ``confidence``, ``correct`` and ``answer`` are
    detached. A sample with no target token has loss NaN (not 0), so the feedback API counts it and skips it.
    ``answer`` (int64 in [0, 2**32), or ``None``) names the sample's answer, so that samples with the same
    answer can be told apart from the others (``GEKOConfig.answer_weight_cap``): a classifier's label, a
    hash of a causal LM's target tokens.
    """

    loss: torch.Tensor
    confidence: torch.Tensor
    correct: torch.Tensor
    answer: torch.Tensor | None = None


#: How ``causal_lm`` condenses the target tokens' probabilities into one confidence.
CONFIDENCES = ("min", "geometric", "mean")


def causal_lm(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
              correct_threshold: float = 1.0, confidence: str = "min") -> Signals:
    """Signals of a causal LM: logits (B, T, V) predict labels (B, T) shifted by one position.

    * loss: mean token cross-entropy over non-ignored targets.
    * correct: token accuracy under teacher forcing >= ``correct_threshold``. The default 1.0 is sequence
      exact match (every target token is the argmax), what a greedy exact-match metric asks of an answer;
      with 0.5 (the earlier default) a wrong answer whose trivial tokens (a leading space, end of sequence)
      are right counts as correct.
    * confidence: ``"min"`` (default) the smallest target-token probability, the model's doubt on its
      weakest token, which easy tokens cannot inflate; ``"geometric"`` the geometric mean ``exp(-loss)``;
      ``"mean"`` the arithmetic mean (the earlier default: an answer whose one content token has
      probability 0.1 among four near-certain tokens scores 0.82).
    * answer: ``answer_hash`` of the target tokens: two samples with the same answer get the same number.
    """
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be (batch, seq, vocab), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"`labels` must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    if not 0.0 <= correct_threshold <= 1.0:
        raise ValueError(f"`correct_threshold` must be in [0, 1], got {correct_threshold}")
    if confidence not in CONFIDENCES:
        raise ValueError(f"`confidence` must be one of {', '.join(CONFIDENCES)}, got {confidence!r}")
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    mask = target != ignore_index
    safe_target = target.masked_fill(~mask, 0)
    token_loss = F.cross_entropy(shift_logits.transpose(1, 2), safe_target, reduction="none")  # (B, T-1)
    token_loss = token_loss * mask
    count = mask.sum(dim=1)  # (B,)
    denom = count.clamp(min=1).to(token_loss.dtype)
    nan = torch.tensor(float("nan"), dtype=token_loss.dtype, device=token_loss.device)
    loss = torch.where(count > 0, token_loss.sum(dim=1) / denom, nan)
    with torch.no_grad():
        prob = torch.exp(-token_loss.detach())  # 1.0 at ignored positions (their loss is 0)
        if confidence == "min":
            conf = prob.masked_fill(~mask, 1.0).amin(dim=1)
        elif confidence == "geometric":
            conf = torch.exp(-loss.detach())
        else:
            conf = (prob * mask).sum(dim=1) / denom
        conf = torch.where(count > 0, conf, nan)
        hits = (shift_logits.argmax(dim=-1) == target) & mask
        # token accuracy k / count >= threshold, compared as k >= threshold * count so 1.0 is exactly "all"
        correct = (count > 0) & (hits.sum(dim=1).to(denom.dtype) >= correct_threshold * denom - 1e-6)
        answer = answer_hash(target, mask)
    return Signals(loss=loss, confidence=conf, correct=correct, answer=answer)


#: ``classification``'s answer for a label it ignores (negative, e.g. -100): above every hash and label.
NO_ANSWER = 2**32 - 1

#: ``answer_hash``'s modulus (a prime under 2**31) and base: a polynomial hash whose terms fit in int64.
_HASH_MOD = 2**31 - 1
_HASH_BASE = 1_000_003


def answer_hash(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) int64 in [0, 2**31 - 1): a polynomial hash of each row's tokens where ``mask`` is True, in order.

    The same tokens give the same number wherever they sit in the row (the position counts from the first
    masked token, so left padding or a longer prompt changes nothing); a row without any gives 0."""
    mask = mask.to(torch.bool)
    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)  # 0 at a row's first answer token
    # base ** pos mod p, by squaring: the powers of a few hundred positions, each product under 2**62
    power = torch.ones_like(pos)
    base, e = torch.full_like(pos, _HASH_BASE), pos.clone()
    for _ in range(max(1, pos.shape[1]).bit_length()):  # the bits of the longest position, known on the host
        odd = (e & 1).bool()
        power = torch.where(odd, power * base % _HASH_MOD, power)
        base = base * base % _HASH_MOD
        e = e >> 1
    # token + 1 so that token 0 counts; each term is reduced below 2**31 before the sum, so a row of up to
    # 2**32 tokens sums within int64
    terms = (tokens.to(torch.int64) % _HASH_MOD + 1) * power % _HASH_MOD * mask
    return terms.sum(dim=1) % _HASH_MOD


def classification(logits: torch.Tensor, labels: torch.Tensor) -> Signals:
    """Signals of a classifier: logits (B, C), labels (B,): loss, max-softmax probability, argmax == label;
    the answer is the label."""
    if logits.dim() != 2:
        raise ValueError(f"`logits` must be (batch, classes), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"`labels` must have shape {tuple(logits.shape[:1])}, got {tuple(labels.shape)}")
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    with torch.no_grad():
        probs = logits.softmax(dim=-1)
        confidence, pred = probs.max(dim=-1)
        correct = pred == labels
        # a label cross_entropy ignores (-100) names no answer: the value no label takes, 2**32 - 1
        answer = torch.where(labels >= 0, labels, NO_ANSWER).detach().to(torch.int64)
    return Signals(loss=loss, confidence=confidence, correct=correct, answer=answer)
