"""Checkpoints: the manifest ties their files together, a refused load changes nothing, and a resume
against changed data is refused."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from crash_job import CFG, rows
from crash_job import model as gru_model
from geko_data.state import SampleState
from geko_data.train import TrainArgs, train
from geko_data.train.checkpoint import (MANIFEST, CheckpointError, file_hash, find_latest, load_checkpoint,
                                        save_checkpoint, write_manifest)

FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors", "trainer_state.json", "data_state.json",
         "state.arrow")
QUIET = lambda _msg: None  # noqa: E731


def small_model(seed=0, hidden=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Linear(hidden, 2))


def stepped_optimizer(model):
    """AdamW after one step: its state holds moment tensors."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
    return opt


def write(out, step, *, seed=0, fingerprint="fp-a"):
    """A checkpoint of ``step`` of run ``seed``: every file differs between steps and between seeds."""
    model = small_model(seed)
    opt = stepped_optimizer(model)
    for _ in range(step):
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    torch.manual_seed(1000 * seed + step)  # the RNG state the checkpoint keeps
    state = SampleState(6, fingerprint=fingerprint)
    state.report(np.arange(6), np.linspace(0.1, 2, 6) * (step + 1 + seed))
    path = save_checkpoint(str(out), step=step, model=model, optimizer=opt,
                           trainer_state={"step": step, "epoch": 0, "consumed": 2 * step, "args": {"seed": seed}},
                           data_state={"seed": seed, "epoch": 0, "position": 2 * step}, state=state, keep=10)
    torch.rand(3)  # the process's RNG moves on: a load that restores the checkpoint's is visible
    return path


def canon(x):
    """Nested optimizer state with every tensor as (dtype, shape, bytes): equal means byte-identical."""
    if isinstance(x, torch.Tensor):
        return str(x.dtype), tuple(x.shape), x.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    if isinstance(x, dict):
        return {k: canon(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [canon(v) for v in x]
    return x


def snapshot(model, opt):
    return canon(model.state_dict()), canon(opt.state_dict()), canon(torch.get_rng_state())


def read_json(path):
    with open(path) as f:
        return json.load(f)


def reseal(ckpt, **override):
    """Re-write the manifest over the files as they are now, so the checks behind it are reached."""
    m = read_json(os.path.join(ckpt, MANIFEST))
    write_manifest(ckpt, **{k: override.get(k, m[k]) for k in ("step", "seed", "fingerprint")})


@pytest.fixture
def target():
    """A model and optimizer in the middle of their own run (not the checkpoint's), and the RNG moved."""
    model = small_model(seed=5)
    opt = stepped_optimizer(model)
    torch.manual_seed(77)
    return model, opt


# ---------------------------------------------------------------- the manifest
def test_manifest_records_step_seed_fingerprint_and_every_file(tmp_path):
    ckpt = write(tmp_path / "out", 3, seed=2, fingerprint="fp-x")
    m = read_json(os.path.join(ckpt, MANIFEST))
    assert (m["step"], m["seed"], m["fingerprint"], m["hash"]) == (3, 2, "fp-x", "xxh3_64")
    assert set(m["files"]) == set(FILES) == set(os.listdir(ckpt)) - {MANIFEST}
    for name, entry in m["files"].items():
        path = os.path.join(ckpt, name)
        assert entry == {"bytes": os.path.getsize(path), "xxh3_64": file_hash(path)}
    model = small_model(9)
    opt = stepped_optimizer(model)
    trainer_state, data_state, state = load_checkpoint(ckpt, model=model, optimizer=opt)
    assert trainer_state["step"] == 3 and data_state["seed"] == 2 and state.fingerprint == "fp-x"


@pytest.mark.parametrize("field,value", [("step", -1), ("step", "3"), ("seed", 1.5), ("fingerprint", 7)])
def test_write_manifest_refuses_bad_values(tmp_path, field, value):
    ckpt = write(tmp_path / "out", 2)
    kw = {"step": 2, "seed": 0, "fingerprint": "fp-a", field: value}
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        write_manifest(ckpt, **kw)
    load_checkpoint(ckpt, model=small_model(), optimizer=None)  # the manifest is as it was


def test_file_hash_streams_in_chunks(tmp_path):
    # larger than one read: the hash covers every chunk, not the first
    import xxhash

    data = np.random.default_rng(0).bytes((4 << 20) * 2 + 123)
    path = tmp_path / "big"
    path.write_bytes(data)
    assert file_hash(path) == xxhash.xxh3_64_hexdigest(data)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert file_hash(path) != xxhash.xxh3_64_hexdigest(data)


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("source", ["later step", "other seed"])
def test_a_file_copied_from_another_checkpoint_is_refused_and_nothing_changes(tmp_path, target, name, source):
    """A later checkpoint's file, or one of another seed's checkpoint of the same step, copied in: the load
    used to go through silently with wrong results."""
    early = write(tmp_path / "out", 2, seed=0)
    other = write(tmp_path / "out", 4, seed=0) if source == "later step" else write(tmp_path / "other", 2, seed=1)
    src, dst = os.path.join(other, name), os.path.join(early, name)
    assert open(src, "rb").read() != open(dst, "rb").read()  # the copy really changes the file
    shutil.copyfile(src, dst)
    model, opt = target
    before = snapshot(model, opt)
    with pytest.raises(CheckpointError, match=f"{name} refused: it does not match {MANIFEST}"):
        load_checkpoint(early, model=model, optimizer=opt)
    assert snapshot(model, opt) == before


def test_a_checkpoint_without_manifest_is_refused_with_a_message(tmp_path, target):
    ckpt = write(tmp_path / "out", 2)
    os.remove(os.path.join(ckpt, MANIFEST))
    model, opt = target
    with pytest.raises(CheckpointError, match=f"has no {MANIFEST}, so nothing shows that its files belong"):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    # looked for in an output dir, it is not a complete checkpoint: the message says what one holds
    with pytest.raises(CheckpointError, match=f"no complete checkpoint.*{MANIFEST}"):
        find_latest(str(tmp_path / "out"))


def test_a_file_not_in_the_manifest_or_missing_from_it_is_refused(tmp_path, target):
    ckpt = write(tmp_path / "out", 2)
    model, opt = target
    before = snapshot(model, opt)
    (tmp_path / "out" / "checkpoint-2" / "notes.txt").write_text("added later")
    with pytest.raises(CheckpointError, match=f"notes.txt refused: it is not listed in {MANIFEST}"):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    os.remove(os.path.join(ckpt, "notes.txt"))
    m = read_json(os.path.join(ckpt, MANIFEST))
    m["files"]["tokenizer.json"] = {"bytes": 2, "xxh3_64": "0" * 16}
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        json.dump(m, f)
    with pytest.raises(CheckpointError, match=f"tokenizer.json is listed in {MANIFEST} but missing"):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    with open(os.path.join(ckpt, MANIFEST), "w") as f:
        f.write('{"files": ')  # cut short
    with pytest.raises(CheckpointError, match=f"{MANIFEST} refused, it cannot be read"):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    os.remove(os.path.join(ckpt, "rng.safetensors"))
    with pytest.raises(CheckpointError, match="rng.safetensors"):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    assert snapshot(model, opt) == before


def test_file_and_manifest_disagreeing_on_step_seed_or_fingerprint_are_refused(tmp_path, target):
    # a manifest re-sealed over files of another run (or re-sealed by hand with other values)
    ckpt = write(tmp_path / "out", 2, seed=0, fingerprint="fp-a")
    model, opt = target
    before = snapshot(model, opt)
    for field, value, file in (("step", 3, "trainer_state.json"), ("seed", 1, "data_state.json"),
                               ("fingerprint", "fp-b", "state.arrow")):
        reseal(ckpt, **{"step": 2, "seed": 0, "fingerprint": "fp-a", field: value})
        with pytest.raises(CheckpointError, match=f"{file} refused: its {field} is .* but {MANIFEST} says"):
            load_checkpoint(ckpt, model=model, optimizer=opt)
    reseal(ckpt, step=2, seed=0, fingerprint="fp-a")
    with pytest.raises(CheckpointError, match="fingerprint 'fp-a', the data here has fingerprint 'fp-b'"):
        load_checkpoint(ckpt, model=model, optimizer=opt, expect_fingerprint="fp-b")
    assert snapshot(model, opt) == before


# ---------------------------------------------------------------- a refused load changes nothing
def _bigger_weights(ckpt):
    save_file({k: v.contiguous() for k, v in small_model(0, hidden=6).state_dict().items()},
              os.path.join(ckpt, "model.safetensors"))


def _extra_weight(ckpt):
    w = load_file(os.path.join(ckpt, "model.safetensors"))
    w["2.weight"] = torch.zeros(2, 2)
    save_file(w, os.path.join(ckpt, "model.safetensors"))


def _foreign_optimizer(ckpt):
    torch.save(stepped_optimizer(torch.nn.Linear(3, 2)).state_dict(), os.path.join(ckpt, "optimizer.pt"))


def _moments_of_another_shape(ckpt):
    torch.save(stepped_optimizer(small_model(0, hidden=6)).state_dict(), os.path.join(ckpt, "optimizer.pt"))


def _float_rng(ckpt):
    save_file({"cpu": torch.zeros(5056, dtype=torch.float32)}, os.path.join(ckpt, "rng.safetensors"))


def _short_rng(ckpt):
    save_file({"cpu": torch.zeros(16, dtype=torch.uint8)}, os.path.join(ckpt, "rng.safetensors"))


def _edit_json(name, edit):
    def apply(ckpt):
        path = os.path.join(ckpt, name)
        value = read_json(path)
        edit(value)
        with open(path, "w") as f:
            json.dump(value, f)
    return apply


def _truncated_state(ckpt):
    path = os.path.join(ckpt, "state.arrow")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


BAD = {  # file -> (how it is made bad, what the error says)
    "model: another shape": (_bigger_weights, "model.safetensors refused: weights of another shape"),
    "model: a weight the model lacks": (_extra_weight, "model.safetensors refused: it has weights the model lacks"),
    "optimizer: another model's": (_foreign_optimizer, "optimizer.pt refused: parameter group 0 holds 2"),
    "optimizer: moments of another shape": (_moments_of_another_shape, "optimizer.pt refused: exp_avg"),
    "rng: float": (_float_rng, "rng.safetensors refused: 'cpu' is a torch.float32"),
    "rng: short": (_short_rng, "rng.safetensors refused: .*shape \\(16,\\)"),
    "trainer_state: no step": (_edit_json("trainer_state.json", lambda d: d.pop("step")),
                               "trainer_state.json refused: it has no 'step'"),
    "trainer_state: step a string": (_edit_json("trainer_state.json", lambda d: d.update(step="2")),
                                     "trainer_state.json refused: 'step' must be an int >= 0, got '2'"),
    "data_state: not an object": (lambda c: open(os.path.join(c, "data_state.json"), "w").write("[1]"),
                                  "data_state.json refused, it cannot be read"),
    "state: truncated": (_truncated_state, "state.arrow refused, it cannot be read"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("sealed", [False, True], ids=["manifest-stale", "manifest-resealed"])
def test_a_refused_load_leaves_model_optimizer_and_rng_byte_identical(tmp_path, target, case, sealed):
    """Every file made bad in turn. With the manifest left as it was, the manifest refuses it; re-sealed
    (a checkpoint consistently wrong), the file's own checks refuse it. Either way nothing changed."""
    ckpt = write(tmp_path / "out", 2)
    make_bad, message = BAD[case]
    make_bad(ckpt)
    if sealed:
        reseal(ckpt)
    else:
        message = f"refused: it does not match {MANIFEST}"
    model, opt = target
    before = snapshot(model, opt)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    assert snapshot(model, opt) == before


def test_a_refusing_check_changes_nothing_and_a_good_load_changes_everything(tmp_path, target):
    ckpt = write(tmp_path / "out", 2)
    model, opt = target
    before = snapshot(model, opt)

    def refuse(trainer_state, data_state, state):
        raise ValueError(f"resume: `seed` is 3 but the checkpoint was written with {data_state['seed']}")

    with pytest.raises(ValueError, match="`seed` is 3"):
        load_checkpoint(ckpt, model=model, optimizer=opt, check=refuse)
    assert snapshot(model, opt) == before
    load_checkpoint(ckpt, model=model, optimizer=opt)  # the same checkpoint, accepted
    after = snapshot(model, opt)
    assert all(a != b for a, b in zip(after, before))  # the test can see a change: weights, optimizer, RNG


@pytest.mark.parametrize("victim", FILES)
def test_a_pickle_payload_behind_a_resealed_manifest_never_runs(tmp_path, target, victim):
    # the manifest refuses a planted file first; re-sealed, the readers must refuse it themselves
    ckpt = write(tmp_path / "out", 2)
    marker = tmp_path / "PAYLOAD-RAN"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"state": {}, "param_groups": [], "x": Payload()}, os.path.join(ckpt, victim))
    reseal(ckpt)
    model, opt = target
    before = snapshot(model, opt)
    with pytest.raises(CheckpointError, match=f"{victim} refused"):
        load_checkpoint(ckpt, model=model, optimizer=opt)
    assert not marker.exists(), "the pickle payload ran"
    assert snapshot(model, opt) == before


# ---------------------------------------------------------------- through train()
def _args(out, **kw):
    base = dict(output_dir=str(out), num_epochs=2, batch_size=4, learning_rate=1e-3, warmup_steps=0,
                logging_steps=1, save_steps=3, eval_steps=0, progress=False, dataloader_num_workers=0,
                save_total_limit=5)
    base.update(kw)
    return TrainArgs(**base)


@pytest.mark.parametrize("step", [None, "3", 2.5, True, -1])
def test_resume_with_a_trainer_state_without_an_int_step_names_the_file(tmp_path, step):
    args = _args(tmp_path / "out", num_epochs=1)
    train(gru_model(), rows(12), args=args, config=CFG, log=QUIET)
    ckpt = find_latest(args.output_dir)
    path = os.path.join(ckpt, "trainer_state.json")
    ts = read_json(path)
    if step is None:
        del ts["step"]
    else:
        ts["step"] = step
    with open(path, "w") as f:
        json.dump(ts, f)
    reseal(ckpt)  # as if written so: the file itself is refused, not only its hash
    with pytest.raises(CheckpointError, match=f"{ckpt}.*trainer_state.json refused: .*'step'"):
        train(gru_model(), rows(12), args=args, config=CFG, resume_from=args.output_dir, log=QUIET)


def test_refused_resume_leaves_the_callers_model_untouched(tmp_path):
    # a resume with another batch size is refused inside load_checkpoint, before the weights are applied
    args = _args(tmp_path / "out", num_epochs=1)
    train(gru_model(), rows(12), args=args, config=CFG, log=QUIET)
    fresh = gru_model()
    before = canon(fresh.state_dict())
    with pytest.raises(ValueError, match="`batch_size` is 2"):
        train(fresh, rows(12), args=_args(tmp_path / "out", num_epochs=1, batch_size=2), config=CFG,
              resume_from=args.output_dir, log=QUIET)
    assert canon(fresh.state_dict()) == before


@pytest.mark.parametrize("step,trainer_state,message", [
    (-1, {}, "`step` must be an int >= 0, got -1"), ("2", {}, "`step` must be an int >= 0, got '2'"),
    (2, {"step": 3}, "`trainer_state` step 3 differs from `step` 2")])
def test_save_checkpoint_refuses_a_bad_step(tmp_path, step, trainer_state, message):
    model = small_model()
    with pytest.raises(ValueError, match=message):
        save_checkpoint(str(tmp_path / "out"), step=step, model=model, optimizer=stepped_optimizer(model),
                        trainer_state=trainer_state, data_state={}, state=SampleState(4))
    assert not (tmp_path / "out").exists()


def test_a_lora_adapter_round_trips_and_one_of_another_rank_is_refused_unchanged(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def lora(r, seed):
        torch.manual_seed(seed)
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32))
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p)  # lora_B starts at zero: make every adapter weight tell runs apart
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    model, opt = lora(4, seed=0)
    ckpt = save_checkpoint(str(tmp_path / "out"), step=1, model=model, optimizer=opt, trainer_state={},
                           data_state={}, state=SampleState(4))
    assert "adapter.safetensors" in os.listdir(ckpt)
    fresh, fresh_opt = lora(4, seed=1)
    load_checkpoint(ckpt, model=fresh, optimizer=fresh_opt)
    def adapter(m):
        return canon({n: p for n, p in m.named_parameters() if p.requires_grad})

    assert adapter(fresh) == adapter(model) != adapter(lora(4, seed=1)[0])  # the base weights are not saved
    other, other_opt = lora(8, seed=2)
    before = snapshot(other, other_opt)
    with pytest.raises(CheckpointError, match="adapter.safetensors refused: weights of another shape"):
        load_checkpoint(ckpt, model=other, optimizer=other_opt)
    assert snapshot(other, other_opt) == before
