"""Per-sample learning signals from model outputs: loss, confidence, correctness.

gekolib gives every sample of an HF batch the batch-mean loss and measures
confidence as the mean max-probability over all positions, padding
included; these are per sample and on target tokens only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Signals", "causal_lm", "classification"]


class Signals(NamedTuple):
    """Per-sample signals, each shape (B,).

    ``loss`` keeps its graph (weight it and call backward); ``confidence`` and ``correct`` are detached.
    A sample with no target token has loss NaN (not 0), so the feedback API counts it and skips it.
    """

    loss: torch.Tensor
    confidence: torch.Tensor
    correct: torch.Tensor


def causal_lm(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
              correct_threshold: float = 0.5) -> Signals:
    """Signals of a causal LM: logits (B, T, V) predict labels (B, T) shifted by one position.

    loss = mean token cross-entropy over non-ignored targets; confidence = mean probability of the target
    token; correct = token accuracy >= ``correct_threshold``.
    """
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be (batch, seq, vocab), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"`labels` must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    if not 0.0 <= correct_threshold <= 1.0:
        raise ValueError(f"`correct_threshold` must be in [0, 1], got {correct_threshold}")
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
        prob = torch.exp(-token_loss.detach()) * mask
        confidence = torch.where(count > 0, prob.sum(dim=1) / denom, nan)
        hits = (shift_logits.argmax(dim=-1) == target) & mask
        accuracy = hits.sum(dim=1).to(denom.dtype) / denom
        correct = (count > 0) & (accuracy >= correct_threshold)
    return Signals(loss=loss, confidence=confidence, correct=correct)


def classification(logits: torch.Tensor, labels: torch.Tensor) -> Signals:
    """Signals of a classifier: logits (B, C), labels (B,): loss, max-softmax probability, argmax == label."""
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
    return Signals(loss=loss, confidence=confidence, correct=correct)
