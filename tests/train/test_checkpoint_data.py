"""A resume against shards whose content changed since the checkpoint is refused."""

import json
import os

import pytest

from crash_job import CFG, rows
from crash_job import model as gru_model
from geko_data.shards import index_shards, write_shards
from geko_data.train import train
from geko_data.train.checkpoint import CheckpointError
from test_checkpoint import QUIET, _args, canon


def _flip_a_label_byte(shard_path):
    """Change one answer token of one sample in place: same size, same keys, other content."""
    data = bytearray(open(shard_path, "rb").read())
    at = data.index(b'"labels": [') + len(b'"labels": [')
    end = data.index(b"]", at)
    digit = max(i for i in range(at, end) if chr(data[i]).isdigit())  # the last answer token
    data[digit] = ord("1") if data[digit] != ord("1") else ord("2")
    with open(shard_path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.timeout(120)
def test_resume_against_shards_whose_content_changed_is_refused(tmp_path):
    """Train 1 epoch on shards with a checkpoint, flip one label byte in a shard (same size), re-index,
    resume: refused with an error naming the fingerprint. This needs the shard index's fingerprint to
    cover the samples' content (a per-sample hash in the index); over names and sizes alone the changed
    shard looks the same and the resume would train on other labels than the checkpoint's state."""
    folder = tmp_path / "shards"
    write_shards(({"__key__": f"r{i:03d}", "json": json.dumps(r).encode()} for i, r in enumerate(rows(12))),
                 str(folder / "s-%03d.tar"), maxcount=5)
    args = _args(tmp_path / "out", num_epochs=1, save_steps=0)  # the end checkpoint only
    first = train(gru_model(), str(folder), args=args, config=CFG, log=QUIET)
    assert first.step > 0
    shards = sorted(str(p) for p in folder.glob("s-*.tar"))
    sizes = [os.path.getsize(p) for p in shards]
    _flip_a_label_byte(shards[1])
    assert [os.path.getsize(p) for p in shards] == sizes
    index_shards(shards, output=str(folder / "index.arrow"))
    fresh = gru_model()
    before = canon(fresh.state_dict())
    with pytest.raises(ValueError, match="fingerprint") as err:
        train(fresh, str(folder), args=args, config=CFG, resume_from=args.output_dir, log=QUIET)
    assert isinstance(err.value, CheckpointError) and "the shards changed" in str(err.value)
    assert canon(fresh.state_dict()) == before
