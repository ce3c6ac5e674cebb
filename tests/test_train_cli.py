import json

from geko_data.train.__main__ import build_parser, main


def test_every_field_is_a_flag():
    ns = build_parser().parse_args(["--num_epochs", "2", "--bucket_weights", "[5, 2, 0]", "--bf16", "true"])
    assert ns.num_epochs == 2 and ns.bucket_weights == [5, 2, 0] and ns.bf16 is True


def test_bad_values_exit_2_with_the_field_named(capsys):
    assert main(["--num_epochs", "0"]) == 2
    assert "num_epochs" in capsys.readouterr().err
    assert main(["--mode", "fast"]) == 2
    assert "mode" in capsys.readouterr().err


def test_config_file_unknown_key(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"num_epochs": 1}, "geko": {"bogus": 1}}))
    assert main(["--config", str(cfg)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_toml_config_is_read(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nnum_epochs = 0\n")
    assert main(["--config", str(cfg)]) == 2  # the file's value was applied (and rejected)
    assert "num_epochs" in capsys.readouterr().err
