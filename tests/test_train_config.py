"""Training config: strict keys, impossible values refused with the key named."""

import pytest

from reqdedup.errors import InputError
from reqdedup.train.config import config_from_dict, dump_config, load_config


def test_example_config_loads_and_round_trips(tmp_path):
    cfg = load_config("configs/train_small.yaml")
    assert cfg.dist.nproc_per_node == 2 and cfg.model.seq_len == 32
    again = load_config(dump_config(cfg, tmp_path / "c.yaml"))
    assert again == cfg


@pytest.mark.parametrize("raw,message", [
    ({"trian": {}}, "unknown key(s) trian"),
    ({"train": {"epocs": 2}}, "train.epocs"),
    ({"model": {"d_model": 30, "n_heads": 4}}, "model.n_heads"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"data": {"order": "random"}}, "data.order"),
    ({"data": {"train_start": "2026-02-02", "train_end": "2026-02-01"}}, "data.train_end"),
    ({"data": {"train_start": "yesterday"}}, "data.train_start"),
    ({"dist": {"nproc_per_node": 0}}, "dist.nproc_per_node"),
    ({"train": {"user_encoding": "sometimes"}}, "train.user_encoding"),
    ({"data": {"batch_rows": 0}}, "data.batch_rows"),
])
def test_bad_configs_name_the_key(raw, message):
    with pytest.raises(InputError) as err:
        config_from_dict(raw, "cfg.yaml")
    assert message in str(err.value) and "cfg.yaml" in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(bad)
