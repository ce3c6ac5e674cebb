"""The GEKO policy as pure numpy functions: no I/O, no torch.

Every rule that decides what a sample's learning state means lives here:
the Q-value update, bucket classification, the Mountain curriculum (phase,
per-bucket weights, LR multiplier) and each epoch's expected multiplicity
and loss weight per sample for every mode. ``state.py`` keeps the arrays,
``plan.py`` turns expected multiplicities into an order.

gekolib 0.3.1 flaws fixed here (docs/architecture.md says how the rules fit together):

* curriculum progress is the epoch *midpoint*, so a 3-epoch run reaches PEAK;
* the Mountain LR multiplier is applied smoothly, so WARMUP's 0.5 takes effect;
* an epoch's length is the number of active samples: frozen and pruned samples
  really cost nothing (gekolib draws N samples with replacement every epoch);
* frozen samples are re-checked (``recheck_frozen``) so forgetting is seen.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from geko_data.config import MOUNTAIN, GEKOConfig

__all__ = [
    "BUCKET_NAMES",
    "FOCUS",
    "FREEZE",
    "HARD",
    "LIGHT",
    "PHASES",
    "PHASE_LR",
    "PHASE_WEIGHTS",
    "balance_answers",
    "balances_answers",
    "bucket_weight_table",
    "classify",
    "annealing",
    "anneal_share",
    "epoch_expected",
    "epoch_progress",
    "freeze_threshold",
    "expected_counts",
    "loss_ema_update",
    "lr_multiplier",
    "phase_index",
    "phase_name",
    "prune_mask",
    "q_update",
    "stability",
    "thaw",
    "uses_curriculum",
    "wrong_bucket",
]

FREEZE, LIGHT, FOCUS, HARD = 0, 1, 2, 3
BUCKET_NAMES = ("FREEZE", "LIGHT", "FOCUS", "HARD")

PHASES = ("WARMUP", "ASCENT", "PEAK", "DESCENT", "CONSOLIDATE")
# Upper progress bound of each phase (the last one ends at 1.0).
_PHASE_ENDS = np.array([0.15, 0.35, 0.65, 0.85, 1.0])
#: (HARD, FOCUS, LIGHT) sampling weights per phase, gekolib's Mountain table (the ``gekolib`` presets'
#: ``GEKOConfig.phase_weights``; the default is ``config.FLAT``).
PHASE_WEIGHTS = MOUNTAIN
#: LR multiplier per phase.
PHASE_LR = (0.5, 0.8, 1.0, 0.8, 0.3)
_PHASE_MID = np.array([0.075, 0.25, 0.5, 0.75, 0.925])


def epoch_progress(epoch: int, total_epochs: int) -> float:
    """Curriculum progress of an epoch: its midpoint ``(epoch + 0.5) / total_epochs``, clipped to [0, 1]."""
    if total_epochs < 1:
        raise ValueError(f"`total_epochs` must be >= 1, got {total_epochs}")
    return float(min(max((epoch + 0.5) / total_epochs, 0.0), 1.0))


def phase_index(progress: float) -> int:
    """Index into ``PHASES`` of training progress in [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    return int(min(np.searchsorted(_PHASE_ENDS, p, side="right"), len(PHASES) - 1))


def phase_name(progress: float) -> str:
    return PHASES[phase_index(progress)]


def lr_multiplier(progress: float) -> float:
    """The Mountain LR multiplier, linear between phase midpoints (flat before the first / after the last)."""
    return float(np.interp(min(max(float(progress), 0.0), 1.0), _PHASE_MID, PHASE_LR))


def uses_curriculum(total_epochs: int | None, config: GEKOConfig) -> bool:
    """Whether a run of ``total_epochs`` samples by the curriculum's phase weights (``GEKOConfig.follows_curriculum``)."""
    return config.follows_curriculum(total_epochs)


def kept_share(total_epochs: int | None, config: GEKOConfig) -> float | None:
    """The expected count every unpruned sample keeps at least when a run of ``total_epochs`` rescales loss
    weights: ``keep_frozen`` in ``unbiased`` mode, ``short_run_keep`` in a ``geko`` run too short for the
    curriculum; ``None`` when FREEZE samples are only re-checked."""
    if config.mode == "unbiased":
        return config.keep_frozen
    if config.mode == "geko" and not uses_curriculum(total_epochs, config):
        return config.short_run_keep
    return None


def anneal_share(total_epochs: int | None, config: GEKOConfig) -> float | None:
    """The share of FREEZE samples an annealing epoch of a run of ``total_epochs`` draws, at rescaled loss
    weights: ``anneal_keep`` in a ``geko`` run that follows the curriculum and whose ``anneal`` fraction
    anneals at least one epoch by itself (8+ epochs at 0.125); ``None`` when an annealing epoch draws every
    sample once at weight 1, as the last epoch that ``annealing`` adds to a run of 5-7 epochs does.

    Why not in 5-7 epochs: there the FREEZE samples of epoch 1 wait three or more epochs for that last one,
    and on MNIST with 10% changed labels (dev, 5 epochs, 5 seeds) keeping a quarter or a half of them in it
    ended 1.12 and 0.88 points under uniform, training all of them 0.54 (it saved 5-8% of the passes)."""
    if (config.mode == "geko" and total_epochs is not None and uses_curriculum(total_epochs, config)
            and config.anneal_fraction * total_epochs >= 1.0 - 1e-9):
        return config.anneal_keep
    return None


def rescales(total_epochs: int | None, config: GEKOConfig) -> bool:
    """Whether a run of ``total_epochs`` keeps a share of FREEZE samples at rescaled loss weights
    (``kept_share``)."""
    return kept_share(total_epochs, config) is not None


def balances_answers(total_epochs: int | None, config: GEKOConfig) -> bool:
    """Whether the plans of a run of ``total_epochs`` scale loss weights by answer (``balance_answers``): a
    ``geko`` run with ``answer_weight_cap`` set that follows no curriculum (shorter than
    ``curriculum_min_epochs``; ``GEKOConfig.answer_weight_cap`` says why not the longer ones)."""
    return (config.mode == "geko" and config.answer_weight_cap is not None
            and not uses_curriculum(total_epochs, config))


def bucket_weight_table(progress: float, config: GEKOConfig, *, total_epochs: int | None = None) -> np.ndarray:
    """Sampling weight per bucket code, shape (4,): [FREEZE, LIGHT, FOCUS, HARD]; FREEZE is always 0.

    The phase's ``config.phase_weights`` when the run follows the curriculum (``uses_curriculum``), else
    ``config.bucket_weights``."""
    if uses_curriculum(total_epochs, config):
        hard, focus, light = config.phase_weights[phase_index(progress)]
    else:
        hard, focus, light = config.bucket_weights
    return np.array([0.0, light, focus, hard], dtype=np.float64)


def q_update(q: np.ndarray, loss: np.ndarray, *, lr: float, loss_scale: float) -> np.ndarray:
    """``Q <- (1 - lr) Q + lr (1 - min(loss / loss_scale, 1))``; negative losses count as 0."""
    target = 1.0 - np.clip(np.asarray(loss, dtype=np.float32) / np.float32(loss_scale), 0.0, 1.0)
    return ((1.0 - lr) * np.asarray(q, dtype=np.float32) + lr * target).astype(np.float32)


def stability(loss_var: np.ndarray) -> np.ndarray:
    """``1 - min(sqrt(loss_var), 1)``: 1 for a loss that stopped moving, 0 for one that moves by >= 1."""
    return (1.0 - np.minimum(np.sqrt(np.maximum(loss_var, 0.0)), 1.0)).astype(np.float32)


def classify(*, seen: np.ndarray, correct: np.ndarray, confidence: np.ndarray, q: np.ndarray,
             loss_var: np.ndarray, config: GEKOConfig, loss: np.ndarray | None = None,
             last_step: np.ndarray | None = None) -> np.ndarray:
    """Bucket code per sample (uint8); never-seen samples are FOCUS.

    FREEZE, with ``freeze_share`` (the default): correct and among the easiest ``freeze_share`` of the
    samples reported at about the same time (``easiest_in_windows``): the rank alone decides, after one
    pass. Stability and Q are not asked for: a loss that falls fast is a sample being learnt, not an
    unreliable one, and Q needs several passes; both kept samples the model already gets right from
    freezing when a 3-epoch run has two chances to skip anything.
    FREEZE with an absolute ``freeze_confidence`` or with ``freeze_share=None`` (gekolib's rules): correct,
    confidence > ``freeze_threshold``, stability > freeze_quality, q >= min_q_for_freeze.
    LIGHT: correct otherwise. HARD: wrong and confidence > focus_confidence. FOCUS: wrong otherwise.

    ``loss`` and ``last_step`` (the state's columns) are what the share rule ranks by; without ``last_step``
    every sample is in one window, without ``loss`` the rank is by confidence (for a right answer of a
    classifier the same order: its confidence is ``exp(-loss)``).
    """
    correct = np.asarray(correct, dtype=bool)
    conf = np.asarray(confidence, dtype=np.float32)
    out = np.empty(correct.shape[0], dtype=np.uint8)
    # The freeze mask is made in the codes' memory (a step's mask is read before its codes are written
    # there): one fresh byte a sample, not two (a fresh page costs this VM more kernel time than its writes).
    freeze = out.view(bool)
    if config.freeze_confidence is None and config.freeze_share is not None:
        with np.errstate(divide="ignore"):
            rank_by = -np.log(conf) if loss is None else loss
        when = np.zeros(correct.shape[0], np.int64) if last_step is None else last_step
        easiest_in_windows(seen=seen, loss=rank_by, last_step=when, share=config.freeze_share, out=freeze)
        freeze &= correct
    else:
        threshold = freeze_threshold(seen=seen, correct=correct, confidence=conf, config=config)
        np.greater(conf, np.float32(threshold), out=freeze)
        freeze &= correct
        # stability > freeze_quality  <=>  sqrt(loss_var) < 1 - freeze_quality  <=>  loss_var < (1 - fq)^2:
        # the same rule without a square root over every sample.
        freeze &= np.asarray(loss_var) < np.float32((1.0 - config.freeze_quality) ** 2)
        freeze &= np.asarray(q) >= config.min_q_for_freeze
    seen = np.asarray(seen, dtype=bool)
    for a in range(0, out.shape[0], _STEP):  # a step at a time: the masks and codes of a step stay in cache
        code = wrong_bucket(conf[a:a + _STEP], config)
        # The overrides as uint8 arithmetic on the codes (FREEZE is 0), 3x faster than masked writes:
        # correct -> LIGHT, frozen -> FREEZE, unseen -> FOCUS.
        code -= (code - np.uint8(LIGHT)) * correct[a:a + _STEP]
        code *= ~freeze[a:a + _STEP]
        unseen = ~seen[a:a + _STEP]
        code *= ~unseen
        code += unseen.view(np.uint8) * np.uint8(FOCUS)
        out[a:a + _STEP] = code
    return out


#: ``easiest_in_windows`` compares a sample with the others reported in the same one of this many spans of
#: report time (equal sample counts), so that early and late reports of a first epoch are not compared.
RANK_WINDOWS = 8
#: ... but a span holds at least this many samples (fewer windows on small data), so a rank means something.
MIN_WINDOW = 64


def easiest_in_windows(*, seen: np.ndarray, loss: np.ndarray, last_step: np.ndarray, share: float,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Mask of the seen samples whose last loss is among the lowest ``share`` of the samples reported at about
    the same time: the seen samples are cut by ``last_step`` into ``RANK_WINDOWS`` equal spans (fewer when a
    span would hold under ``MIN_WINDOW``) and ranked by loss inside their span. Written into ``out`` ((N,)
    bool) when given.

    Why spans: a loss measured at step 10 of a first epoch and one at step 1,000 come from two different
    models. Ranked together, nearly every sample of the first part of the epoch looks hard and nearly every
    one of the last part easy, whatever the sample (measured on MNIST, ranking the right answers all
    together: no sample of the first 40% of the epoch froze, though 86% of them were right at the epoch's
    end). Inside a span the model barely changes, and a random order puts a fair sample of the data in
    each. In later epochs the samples
    not trained in the last epoch (frozen ones) share the earliest spans and half of them thaw each epoch,
    so a stale measurement is refreshed.
    """
    seen = np.asarray(seen, dtype=bool)
    loss, last_step = np.asarray(loss), np.asarray(last_step)
    if loss.dtype.kind != "f":  # ranked as float64 (the cuts are losses, compared in their dtype)
        loss = loss.astype(np.float64)
    n = seen.shape[0]
    # Every pass goes a step at a time, its temporaries in cache, and never builds an index of the seen
    # samples (8 bytes each): a mask of them, and their steps and losses packed where a pass needs them. The
    # steps are packed as int32 while they fit (a step counter does; widened to the column's dtype when one
    # does not): half the fresh memory of int64, whose pages cost more kernel time than the writes.
    # ``np.empty``: only the first m values of a packed array are ever touched.
    mask = np.empty(n, dtype=bool) if out is None else out
    narrow = last_step.dtype.kind in "iu" and last_step.dtype.itemsize >= 4
    steps = np.empty(n, dtype=np.int32 if narrow else last_step.dtype)
    m, lo, hi = 0, None, None
    for a in range(0, n, _STEP):
        s = np.isfinite(loss[a:a + _STEP], out=mask[a:a + _STEP])
        s &= seen[a:a + _STEP]
        k = int(np.count_nonzero(s))
        if not k:
            continue
        part = np.compress(s, last_step[a:a + _STEP])
        low, high = int(part.min()), int(part.max())
        lo, hi = (low, high) if lo is None else (min(lo, low), max(hi, high))
        if steps.dtype != last_step.dtype and not -2**31 <= low <= high < 2**31:  # past int32: widen
            wide = np.empty(n, dtype=last_step.dtype)
            wide[:m] = steps[:m]
            steps = wide
        steps[m:m + k] = part
        m += k
    if not m or share >= 1.0:  # every seen sample (none when m is 0)
        return mask
    windows = max(1, min(RANK_WINDOWS, m // MIN_WINDOW))
    # Span of a sample: floor(windows * r / m), r = the count of samples reported at an earlier step (so
    # samples of one step share a span). r >= k exactly when the step is above the k-th smallest step, so
    # span w holds the steps above the ceil(w m / windows)-th smallest: windows - 1 order statistics.
    spans = _SpanOf(steps[:m], [-(-w * m // windows) - 1 for w in range(1, windows)], lo, hi)
    span_of = np.concatenate([spans(steps[a:min(a + _STEP, m)]) for a in range(0, m, _STEP)])
    # The cut of each span: its "lower" ``share`` quantile (np.quantile's index floor((k - 1) * share)), one of
    # the losses, so a cut in the column's dtype selects what a float64 one would. Found by a radix select
    # over the seen samples (_radix_cuts), not a copy and a partition of each span's losses. The losses as
    # order-preserving unsigned ints go where the packed steps were when they fit (pages already touched: a
    # fresh page costs more kernel time than the write).
    key_type = np.dtype(f"u{loss.dtype.itemsize}")
    held = steps.view(np.uint8)[:m * steps.itemsize]
    keys = held[:m * key_type.itemsize].view(key_type) if key_type.itemsize <= steps.itemsize else np.empty(m, key_type)
    del steps, held
    hist = np.zeros((windows, 1 << _RADIX_BITS), dtype=np.int64)
    at = 0
    for a in range(0, n, _STEP):
        s = mask[a:a + _STEP]
        k = int(np.count_nonzero(s))
        key = _ordered_bits(np.compress(s, loss[a:a + _STEP], out=keys[at:at + k].view(loss.dtype)))
        _radix_count(hist, key, span_of[at:at + k])  # while the step's keys are in cache
        at += k
    cuts = _radix_cuts(keys, span_of, hist, share, loss.dtype)
    del keys, span_of
    cut_of = spans.lookup(cuts)
    for a in range(0, n, _STEP):  # the answer written over the mask of the ranked samples
        # ties at the cut all pass: equally easy samples are not told apart by their position
        mask[a:a + _STEP] &= loss[a:a + _STEP] <= cut_of(last_step[a:a + _STEP])
    return mask


class _SpanOf:
    """The span (uint8) of each of a step's samples, by their report steps: the count of ``bounds`` (the steps'
    order statistics ``kth``) below each. Through a table of every step value when the steps' range is small
    (report steps usually are: about one per batch): one look-up a sample instead of a compare and an add per
    bound. Steps outside the seen ones' range (unseen samples) get the nearest end's span."""

    def __init__(self, steps: np.ndarray, kth: list[int], lo: int, hi: int) -> None:
        self.lo, hi = (lo, hi) if kth else (0, 0)
        self.bounds = _order_statistics(steps, kth, lo, hi)
        self.table: np.ndarray | None = None
        if hi - self.lo < max(_STEP, steps.shape[0] // 4):  # as _order_statistics' histogram: small
            self.table = np.zeros(hi - self.lo + 1, dtype=np.uint8)
            for b in self.bounds.tolist():  # step values above b are one span later
                self.table[b - self.lo + 1:] += np.uint8(1)

    def __call__(self, step_values: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return self.table.take(np.subtract(step_values, self.lo, dtype=np.intp), mode="clip")
        code = np.zeros(step_values.shape[0], dtype=np.uint8)  # windows <= RANK_WINDOWS
        for b in self.bounds:
            np.add(code, step_values > b, out=code, casting="unsafe")
        return code

    def lookup(self, values: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """A function of step values giving ``values[span]`` of each: one look-up through the table."""
        if self.table is None:
            return lambda step_values: values.take(self(step_values))
        table = values.take(self.table)
        return lambda step_values: table.take(np.subtract(step_values, self.lo, dtype=np.intp), mode="clip")


def _ordered_bits(x: np.ndarray) -> np.ndarray:
    """Floats (no NaN) as unsigned ints of their size in the same order: the sign bit set on the positive ones,
    every bit flipped on the negative ones (-0.0 just below 0.0). In place over ``x``'s memory."""
    key = x.view(f"u{x.dtype.itemsize}")
    top = key.dtype.type(x.dtype.itemsize * 8 - 1)
    flip = key >> top  # 1 on the negative ones
    np.negative(flip, out=flip)  # all ones on the negative ones (unsigned wrap), 0 on the others
    flip |= key.dtype.type(1) << top
    key ^= flip
    return key


def _float_of(key: int, dtype: np.dtype) -> np.floating:
    """The float whose ``_ordered_bits`` is ``key``."""
    utype = np.dtype(f"u{dtype.itemsize}").type
    top = dtype.itemsize * 8 - 1
    bits = key ^ (1 << top) if key >> top else ~key & ((1 << (top + 1)) - 1)
    return np.array([bits], dtype=utype).view(dtype)[0]


#: Bits of a loss's ``_ordered_bits`` that ``_radix_cuts`` counts in its first pass (a table of 2**12 counts a
#: span, 256 KB for 8 spans: counted a step at a time in cache).
_RADIX_BITS = 12


def _radix_count(hist: np.ndarray, keys: np.ndarray, span_of: np.ndarray) -> None:
    """Add to ``hist`` ((windows, 2**_RADIX_BITS)) the count of ``keys`` of each span by their top bits."""
    where = span_of.astype(np.intp)
    where <<= _RADIX_BITS
    shift = keys.dtype.type(keys.dtype.itemsize * 8 - _RADIX_BITS)
    np.bitwise_or(where, keys >> shift, out=where, dtype=np.intp, casting="unsafe")
    hist += np.bincount(where, minlength=hist.size).reshape(hist.shape)


def _radix_cuts(keys: np.ndarray, span_of: np.ndarray, hist: np.ndarray, share: float,
                dtype: np.dtype) -> np.ndarray:
    """(windows,) the cut of each span: its ``floor((count - 1) * share)``-th smallest loss (as ``dtype``; inf
    for an empty span), from the losses' ``keys`` (``_ordered_bits``), their spans and ``hist``, the keys of
    each span counted by their top ``_RADIX_BITS`` bits (``_radix_count``).

    A radix select: the counts name the bin that holds each span's cut; one pass takes the keys in those bins
    (a small share of the samples) and a partition of each span's few finds the cut. Linear passes in cache,
    where copying each span's losses out (a compare and an extract over every seen sample per span) and
    partitioning them made ``easiest_in_windows`` take 1.6x the CPU time (30M samples, half of them seen).
    """
    windows, bins = hist.shape
    shift = keys.dtype.type(keys.dtype.itemsize * 8 - _RADIX_BITS)
    counts = hist.cumsum(axis=1)  # (windows, bins) keys at or below each bin
    cuts = np.full(windows, np.inf, dtype=dtype)
    # the bin of each span's cut (``bins``, which no key's top bits reach, for an empty span) and its rank there
    target = np.full(windows, bins, dtype=np.result_type(keys.dtype, np.uint32))
    rank = np.zeros(windows, dtype=np.int64)
    for w in range(windows):
        total = int(counts[w, -1])
        if total:
            k = int(np.floor((total - 1) * share))
            target[w] = int(np.searchsorted(counts[w], k, side="right"))  # the first bin with more than k keys
            rank[w] = k - (int(counts[w, target[w] - 1]) if target[w] else 0)
    found_keys, found_spans = [], []
    for a in range(0, keys.shape[0], _STEP):
        key, code = keys[a:a + _STEP], span_of[a:a + _STEP]
        hit = np.flatnonzero((key >> shift) == target.take(code))  # few: one scan, two small gathers
        found_keys.append(key.take(hit))
        found_spans.append(code.take(hit))
    found, in_span = np.concatenate(found_keys), np.concatenate(found_spans)
    for w in range(windows):
        if target[w] < bins:
            mine = found[in_span == w]
            mine.partition(int(rank[w]))
            cuts[w] = _float_of(int(mine[rank[w]]), dtype)
    return cuts


#: Fewer wrong samples than this and their confidences say little: ``freeze_threshold`` falls back.
MIN_WRONG_FOR_QUANTILE = 10


def freeze_threshold(*, seen: np.ndarray, correct: np.ndarray, confidence: np.ndarray,
                     config: GEKOConfig) -> float:
    """The confidence a correct sample must exceed to freeze.

    ``config.freeze_confidence`` when set. Otherwise (with ``freeze_share=None``: ``classify`` does not ask
    for a threshold when ``freeze_share`` is set) it is the ``freeze_quantile``
    quantile of the confidences of the seen samples the model gets wrong, i.e. a sample freezes when the
    model is surer of it than of (by default) 90% of its mistakes, whatever the scale of the confidence (a
    3-class head, a 10-class CNN, an LLM's weakest answer token). With fewer than
    ``MIN_WRONG_FOR_QUANTILE`` mistakes that quantile is noise, so the surer half of the right answers may
    freeze (confidence at or above their median).
    """
    if config.freeze_confidence is not None:
        return float(config.freeze_confidence)
    seen = np.asarray(seen, dtype=bool)
    conf = np.asarray(confidence, dtype=np.float32)
    ok = seen & np.isfinite(conf)
    wrong = conf[ok & ~np.asarray(correct, dtype=bool)]
    if wrong.shape[0] >= MIN_WRONG_FOR_QUANTILE:
        # "higher": an observed confidence, so the rule depends on ranks only (any increasing rescaling of
        # the confidences freezes the same samples)
        return float(np.quantile(wrong, config.freeze_quantile, method="higher"))
    right = conf[ok & np.asarray(correct, dtype=bool)]
    if not right.shape[0]:
        return 1.0
    # just under the median, so ties freeze: right answers all equally sure must not freeze none of them
    return float(np.nextafter(np.quantile(right, 0.5, method="higher"), np.float32(0.0)))


def prune_mask(frozen_epochs: np.ndarray, config: GEKOConfig) -> np.ndarray:
    """Samples to prune for good: ``frozen_epochs >= prune_frozen_after`` (never when it is 0 or for baselines)."""
    if config.prune_frozen_after <= 0 or config.mode not in ("geko", "unbiased"):
        return np.zeros(np.shape(frozen_epochs), dtype=bool)
    return np.asarray(frozen_epochs) >= config.prune_frozen_after


def annealing(epoch: int, total_epochs: int, config: GEKOConfig) -> bool:
    """Whether ``epoch`` is in the final ``anneal`` fraction of training: it *starts* at or after
    ``(1 - anneal) * total_epochs``, InfoBatch's rule (so with anneal 0.125 an 8-epoch run anneals its last
    epoch and a run of fewer than 8 epochs anneals none). A ``geko`` run that follows the curriculum
    (``uses_curriculum``) with ``anneal=None`` anneals at least its last epoch: it trains no FREEZE sample
    otherwise (a 5-epoch run would end without ever training again the half of the data that froze)."""
    frac = config.anneal_fraction
    if config.anneal is None and config.mode == "geko" and uses_curriculum(total_epochs, config):
        frac = max(frac, 1.0 / total_epochs)
    return frac > 0 and epoch >= (1.0 - frac) * total_epochs - 1e-9


def epoch_expected(*, bucket: np.ndarray, pruned: np.ndarray, times_seen: np.ndarray, loss: np.ndarray,
                   epoch: int, total_epochs: int, config: GEKOConfig,
                   epoch_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Expected multiplicity and loss weight of every sample in ``epoch`` of ``total_epochs``.

    The one place that turns an epoch number into its curriculum progress and its annealing decision
    (``annealing``): the epoch plan, ``SampleState.sampling_weights`` / ``loss_weights`` and therefore the
    efficiency report all ask it, so they cannot disagree about an epoch.
    """
    return expected_counts(bucket=bucket, pruned=pruned, times_seen=times_seen, loss=loss,
                           progress=epoch_progress(epoch, total_epochs), config=config,
                           epoch_length=epoch_length, anneal=annealing(epoch, total_epochs, config),
                           total_epochs=total_epochs)


def expected_counts(*, bucket: np.ndarray, pruned: np.ndarray, times_seen: np.ndarray, loss: np.ndarray,
                    progress: float, config: GEKOConfig, anneal: bool,
                    epoch_length: int | None = None,
                    total_epochs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Expected multiplicity and loss weight of every sample for one epoch (pruned samples: 0 and 0).

    ``anneal``: whether this epoch is an annealing one. Progress alone cannot say (InfoBatch's rule needs
    the epoch and the run's length), so the caller passes ``annealing(epoch, total_epochs, config)``;
    ``epoch_expected`` does both. ``total_epochs`` decides whether the curriculum applies
    (``uses_curriculum``). See ``_expected_counts`` for the rules of each mode.
    """
    if not isinstance(anneal, (bool, np.bool_)):
        raise ValueError(f"`anneal` must be a bool (see policy.annealing), got {anneal!r}")
    expected, weight = _expected_counts(bucket=bucket, pruned=pruned, times_seen=times_seen, loss=loss,
                                        progress=progress, config=config, epoch_length=epoch_length,
                                        anneal=bool(anneal), total_epochs=total_epochs)
    weight[np.asarray(pruned, dtype=bool)] = 0.0
    return expected, weight


def _expected_counts(*, bucket: np.ndarray, pruned: np.ndarray, times_seen: np.ndarray, loss: np.ndarray,
                     progress: float, config: GEKOConfig, epoch_length: int | None,
                     anneal: bool, total_epochs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Expected multiplicity and loss weight of every sample for one epoch.

    Returns ``(expected, loss_weight)``, both shape (N,): ``expected`` float64 >= 0 (``plan.py`` rounds it
    stochastically, so ``E[count] == expected``), ``loss_weight`` float32. In ``geko`` mode a FREEZE sample
    drawn for a forgetting re-check has loss weight 0 (forward only).

    Modes:

    * ``geko``: active samples (not FREEZE, not pruned, under ``max_times_seen``) share an epoch of
      ``epoch_length`` (default: their count) in proportion to their bucket weight, capped at ``max_repeats``
      (what a capped sample cannot take goes to the others); FREEZE samples get ``recheck_frozen`` at
      weight 0. Biased on purpose, as GEKO is.
    * ``unbiased``: as ``geko``, but every unpruned sample keeps an expected count of at least
      ``keep_frozen`` and carries loss weight ``c / expected`` with ``c`` the mean expected count, so the
      weighted gradient is an unbiased estimate of the full-data one (InfoBatch's rescaling). A ``geko`` run
      shorter than ``curriculum_min_epochs`` does the same with ``short_run_keep`` (``rescales``).
    * ``uniform``: every unpruned sample once. ``random_subset``: a fresh ``subset_fraction`` of them (RS2).
    * ``infobatch``: samples whose last loss is below the mean are kept with probability ``1 - prune_ratio``
      at weight ``1 / (1 - prune_ratio)`` (Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased
      Dynamic Data Pruning", ICLR 2024).

    In the final ``anneal`` fraction of training every unpruned sample (under ``max_times_seen`` for GEKO's
    modes) is drawn once at weight 1, FREEZE ones included: set ``anneal=0`` for GEKO's rule that a FREEZE
    sample is never trained. A ``geko`` run with ``anneal_keep`` (``anneal_share``) draws there every
    trainable sample once and FREEZE at that share, with loss weights ``c / expected`` as a short run.
    """
    bucket = np.asarray(bucket)
    n = bucket.shape[0]
    alive = ~np.asarray(pruned, dtype=bool)
    expected = np.zeros(n, dtype=np.float64)
    weight = np.ones(n, dtype=np.float32)
    mode = config.mode
    # max_times_seen retires a sample from GEKO's epochs for good (annealing included); baselines ignore it.
    eligible = alive.copy()
    if mode in ("geko", "unbiased") and config.max_times_seen > 0:
        eligible &= np.asarray(times_seen) < config.max_times_seen
    if mode == "uniform":
        expected[alive] = 1.0
        return expected, weight
    anneal_keep = anneal_share(total_epochs, config) if anneal else None
    if anneal and anneal_keep is None:
        expected[eligible] = 1.0
        return expected, weight
    if mode == "random_subset":
        expected[alive] = config.subset_fraction
        return expected, weight
    if mode == "infobatch":
        loss = np.asarray(loss, dtype=np.float64)
        seen = np.isfinite(loss) & alive
        expected[alive] = 1.0
        if seen.any():
            well_learned = seen & (loss < loss[seen].mean())
            expected[well_learned] = 1.0 - config.prune_ratio
            weight[well_learned] = 1.0 / (1.0 - config.prune_ratio)
        return expected, weight

    if anneal:  # anneal_keep: the short-run rule at flat weights, FREEZE drawn at that share
        table = np.array([0.0, 1.0, 1.0, 1.0])
    else:
        table = bucket_weight_table(progress, config, total_epochs=total_epochs)
    w = _lookup(table, bucket)  # (N,) weight per sample, 0 for FREEZE
    w[~eligible] = 0.0
    active = alive & (bucket != FREEZE)
    n_active = int((active & eligible).sum())
    length = n_active if epoch_length is None or anneal else int(epoch_length)  # an annealing epoch: once each
    if w.sum() == 0.0:
        # Every trainable sample sits in a zero-weight bucket (e.g. all LIGHT at PEAK): an empty epoch would
        # train nothing, so fall back to uniform over the active samples still under max_times_seen.
        w = (active & eligible).astype(np.float64)
    expected = _fill(w, float(length), float(config.max_repeats))
    frozen = alive & (bucket == FREEZE)
    keep = anneal_keep if anneal else kept_share(total_epochs, config)
    if keep is None:
        expected[frozen] = config.recheck_frozen
        weight[frozen] = 0.0
        return expected, weight
    # unbiased (or a short geko run): nobody alive may have probability 0, and weights undo the sampling bias.
    expected[alive] = np.maximum(expected[alive], keep)
    n_alive = int(alive.sum())
    c = rescale_constant(float(expected[alive].sum()), n_alive) if n_alive else 1.0
    weight[alive] = (c / expected[alive]).astype(np.float32)
    return expected, weight


#: ``balance_answers`` gives an answer its own share only when at least this many samples have it (and
#: ``ANSWER_MIN_SHARE`` of the data): rarer answers are balanced together, as one. An open-ended generative
#: task, where nearly every answer is its own, is then one pool and nothing changes.
ANSWER_MIN_SAMPLES = 16
ANSWER_MIN_SHARE = 0.01


def balance_answers(counts: np.ndarray, weight: np.ndarray, answer: np.ndarray, *, pruned: np.ndarray,
                    cap: float, seen: np.ndarray | None = None) -> np.ndarray | None:
    """Scale the loss weights of an epoch's plan (``weight``, in place) so that every answer's share of the
    epoch's trained weight (``counts * weight`` summed over its samples) is its share of the data, as in a
    uniform epoch; returns the factor of each answer pool (the common answers in order, then the pool of the
    rare ones), or ``None`` when nothing changed.

    Why: freezing the right answers of a model close to chance freezes mostly the answer it favours, so
    the next epoch trains mostly the others and the model swings to one of them (the SFT task: an answer
    at 93% on dev after epoch 2, 28% after epoch 3). The draws stay as planned (the same passes); only
    their loss weights move. The factors are ``clip(s * target / mass, 1 / cap, cap)`` with the one scale
    ``s`` that keeps the epoch's total trained weight (a few left samples of a mostly frozen answer must not
    carry its whole share; what a pool held at a bound cannot carry is spread over the others in proportion
    to their shares). Only unpruned samples that were ``seen`` (reported: their answer is known) count
    and are scaled. Answers held by fewer than ``ANSWER_MIN_SAMPLES`` of them or ``ANSWER_MIN_SHARE`` are
    pooled; with fewer than two pools nothing changes. Everything goes a step of ``_STEP`` samples at a
    time: at 20M samples 36 MB of temporaries and 1.1 s (a whole-array np.unique took 760 MB and 5.8 s).
    """
    answer = np.asarray(answer)
    # one answer (or none reported): found a step at a time, before np.unique sorts them all
    if answer.shape[0] == 0 or all(not (answer[a:a + _STEP] != answer[0]).any()
                                   for a in range(0, answer.shape[0], _STEP)):
        return None
    pruned = np.asarray(pruned, dtype=bool)
    seen = None if seen is None else np.asarray(seen, dtype=bool)
    steps = range(0, answer.shape[0], _STEP)

    def member(a: int) -> np.ndarray:  # the step's samples that count: unpruned and reported
        m = ~pruned[a:a + _STEP]
        return m if seen is None else m & seen[a:a + _STEP]

    n = sum(int(np.count_nonzero(member(a))) for a in steps)
    if n == 0:
        return None
    common = _common_answers(answer, member, steps, n)
    n_pools = common.shape[0] + 1  # the common answers, then one pool for all the rare ones
    size = np.zeros(n_pools, dtype=np.int64)
    mass = np.zeros(n_pools)
    for a in steps:  # a step at a time: no (N,) temporary (8 bytes a sample of pool ids, 100M samples)
        m = member(a)
        pool = _pool_of(answer[a:a + _STEP][m], common)
        size += np.bincount(pool, minlength=n_pools)
        mass += np.bincount(pool, weights=counts[a:a + _STEP][m] * weight[a:a + _STEP][m].astype(np.float64),
                            minlength=n_pools)
    if int(np.count_nonzero(size)) < 2:
        return None
    total = float(mass.sum())
    drawn = mass > 0  # a pool nothing of which is drawn has no weight to scale
    if total <= 0.0 or int(np.count_nonzero(drawn)) < 2:
        return None
    ratio = np.ones(n_pools)
    ratio[drawn] = size[drawn] / n * total / mass[drawn]  # each pool's factor if nothing were capped

    def kept(scale: float) -> float:  # the epoch's total weight with every factor clip(scale * ratio)
        return float((mass[drawn] * np.clip(scale * ratio[drawn], 1.0 / cap, cap)).sum())

    # kept() grows with the scale from total / cap (every pool at the lower bound) to total * cap (every
    # pool at the upper one), so one scale gives the total back: bisected (on its log) to float precision.
    lo, hi = np.log(1.0 / cap / ratio[drawn].max()), np.log(cap / ratio[drawn].min())
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kept(float(np.exp(mid))) < total else (lo, mid)
    factor = np.ones(n_pools)
    factor[drawn] = np.clip(np.exp(0.5 * (lo + hi)) * ratio[drawn], 1.0 / cap, cap)
    scale = factor.astype(np.float32)
    for a in steps:
        m = member(a)
        part = weight[a:a + _STEP]
        part[m] *= scale[_pool_of(answer[a:a + _STEP][m], common)]
    return factor


def _common_answers(answer: np.ndarray, member: Callable[[int], np.ndarray], steps: range, n: int) -> np.ndarray:
    """The answers (sorted) held by at least ``max(ANSWER_MIN_SAMPLES, ANSWER_MIN_SHARE * n)`` of the ``n``
    counted samples, found a step at a time. An answer that common overall holds at least that share of the
    counted samples of some step (else its total would be under it), so each step's answers above its share
    are the candidates (at most 1 / ANSWER_MIN_SHARE of them a step), counted exactly in a second pass."""
    limit = max(ANSWER_MIN_SAMPLES, ANSWER_MIN_SHARE * n)
    found: set[int] = set()
    for a in steps:
        values, tally = np.unique(answer[a:a + _STEP][member(a)], return_counts=True)
        found.update(values[tally >= tally.sum() * limit / n].tolist())
    candidates = np.array(sorted(found), dtype=answer.dtype)
    tally = np.zeros(candidates.shape[0] + 1, dtype=np.int64)
    for a in steps:
        tally += np.bincount(_pool_of(answer[a:a + _STEP][member(a)], candidates), minlength=tally.shape[0])
    return candidates[tally[:-1] >= limit]


def _pool_of(values: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Pool of each value: its index in ``common`` (sorted), or ``len(common)`` when it is not there."""
    at = np.searchsorted(common, values)
    hit = at < common.shape[0]
    hit[hit] = common[at[hit]] == values[hit]
    return np.where(hit, at, common.shape[0])


def rescale_constant(total: float, n: int) -> float:
    """``c``, the mean expected count of ``n`` unpruned samples whose expected counts sum to ``total``,
    rounded to float32: a sum taken in another order (``plan._geko_plan`` sums counts per kind) differs in
    the last bits of a float64 and must give the same float32 loss weights ``c / expected``."""
    return float(np.float32(total / n))


#: Elements per step of the chunked loops here: temporaries of a few MB at any number of samples.
_STEP = 1 << 20


def _order_statistics(values: np.ndarray, kth: list[int], lo: int, hi: int) -> np.ndarray:
    """``np.sort(values)[kth]`` of integers from ``lo`` to ``hi``: from a histogram when their range is small
    (report steps usually are: about one per batch), else by selection."""
    if not kth:
        return values[:0]
    if hi - lo >= max(_STEP, values.shape[0] // 4):  # a histogram would cost more than the values
        return np.partition(values, kth)[kth]
    hist = np.zeros(hi - lo + 1, dtype=np.int64)
    for a in range(0, values.shape[0], _STEP):  # bincount converts to int64: a chunk at a time
        hist += np.bincount(values[a:a + _STEP] - lo, minlength=hist.shape[0])
    # the k-th smallest (from 0) is the first value with more than k values at or below it
    return np.searchsorted(np.cumsum(hist), np.asarray(kth) + 1, side="left") + lo


def _lookup(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``table[codes]`` a million codes at a time: numpy converts a uint8 index to int64 first, a temporary
    of 8 bytes a sample (800 MB at 100M) that a whole-array lookup would hold."""
    out = np.empty(codes.shape[0], dtype=table.dtype)
    for a in range(0, codes.shape[0], _STEP):
        out[a:a + _STEP] = table[codes[a:a + _STEP]]
    return out


def _fill(w: np.ndarray, length: float, cap: float) -> np.ndarray:
    """Expected counts proportional to ``w`` summing to ``length``, none above ``cap``.

    Water-filling: what a capped sample cannot take goes to the uncapped ones in proportion to their
    weights, so one HARD sample among many LIGHT ones at PEAK does not shrink the epoch to ``cap`` draws.
    The sum falls short of ``length`` only when every weighted sample is at the cap.
    """
    total = float(w.sum())
    if total <= 0.0 or length <= 0:
        return np.zeros(w.shape[0], dtype=np.float64)
    scale = length / total
    if w.max() * scale <= cap:  # the common case, without the boolean-indexed copies below
        # in place (the caller's weights are not needed after): one float64 array less, 800 MB at 100M
        return np.multiply(w, scale, out=w)
    expected = np.zeros(w.shape[0], dtype=np.float64)
    free = w > 0
    left = length
    # Each pass caps at least one more distinct weight, so this ends within (distinct weights) passes.
    while left > 0 and free.any():
        share = w[free] * (left / w[free].sum())
        over = share > cap
        if not over.any():
            expected[free] = share
            break
        idx = np.flatnonzero(free)[over]
        expected[idx] = cap
        free[idx] = False
        left = length - expected.sum()
    return expected


# ---------------------------------------------------------------------- report's update rules
# What one report does to a sample: ``SampleState.apply`` gathers the reported samples' rows, asks these
# rules (and ``q_update``) for their new values and scatters them back.


def loss_ema_update(ema: np.ndarray, var: np.ndarray, loss: np.ndarray, *, prev_seen: np.ndarray,
                    beta: float) -> tuple[np.ndarray, np.ndarray]:
    """New loss EMA and exponentially weighted variance (West 1979) of samples given one new loss each.

    ``ema <- ema + (1 - beta) * delta`` and ``var <- beta * (var + (1 - beta) * delta^2)`` with
    ``delta = loss - ema``, in float64 and capped at 1e30 so that an absurd but finite loss cannot turn the
    float32 column into inf. A sample seen for the first time (``prev_seen`` False) starts at its loss with
    variance 0. Returns ``(ema, var)`` as float32, shaped like ``loss``.
    """
    beta = np.float32(beta)
    delta = np.where(prev_seen, loss.astype(np.float64) - ema, 0.0)
    new_ema = np.where(prev_seen, ema + (1 - beta) * delta, loss)
    new_var = np.where(prev_seen, np.minimum(beta * (var + (1 - beta) * delta * delta), 1e30), 0.0)
    return new_ema.astype(np.float32), new_var.astype(np.float32)


def wrong_bucket(confidence: np.ndarray, config: GEKOConfig) -> np.ndarray:
    """The bucket of a wrong answer (uint8): HARD when its confidence exceeds ``focus_confidence``, else FOCUS."""
    # FOCUS + the comparison as a byte (HARD is FOCUS + 1): 25x faster than np.where on a step of 1M
    code = (np.asarray(confidence) > config.focus_confidence).view(np.uint8)
    code += np.uint8(FOCUS)
    return code


def thaw(bucket: np.ndarray, *, correct: np.ndarray, confidence: np.ndarray, pruned: np.ndarray,
         config: GEKOConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """FREEZE samples reported wrong leave FREEZE at once, not at the next repartition.

    Returns ``(which, codes)``: a mask over the reported samples and the new bucket of those it selects
    (``wrong_bucket``, the split ``classify`` makes); ``None`` when no sample thaws. Pruned samples stay.
    """
    which = (np.asarray(bucket) == FREEZE) & ~np.asarray(correct, dtype=bool) & ~np.asarray(pruned, dtype=bool)
    if not which.any():
        return None
    return which, wrong_bucket(np.asarray(confidence)[which], config)
