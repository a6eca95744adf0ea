"""Multi-node training: dist.nnodes / node_rank / rdzv_endpoint, checked and passed to torchrun
as a c10d rendezvous; 2 nodes x 1 process on loopback (gloo) trains exactly what 1 node x 2
processes does."""

from __future__ import annotations

import socket
from pathlib import Path
import threading

import pytest
import torch

from reqdedup.errors import InputError
from reqdedup.evaluate.matrix import _comparable
from reqdedup.train.config import config_from_dict
from reqdedup.train.launch import rdzv_id_of, torchrun_args, torchrun_command


@pytest.mark.parametrize("dist,message", [
    ({"nnodes": 0}, "dist.nnodes"),
    ({"nnodes": "2", "rdzv_endpoint": "h:1"}, "dist.nnodes"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:29400"}, "dist.node_rank"),
    ({"nnodes": 2, "node_rank": -1, "rdzv_endpoint": "h:29400"}, "dist.node_rank"),
    ({"nnodes": 2}, "dist.rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "nohostport"}, "dist.rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": "h:99999"}, "dist.rdzv_endpoint"),
    ({"nnodes": 2, "rdzv_endpoint": 29400}, "dist.rdzv_endpoint"),
    ({"node_rank": 1}, "dist.node_rank"),
])
def test_bad_multinode_keys_are_refused(dist, message):
    with pytest.raises(InputError) as err:
        config_from_dict({"dist": dist}, "cfg.yaml")
    assert message in str(err.value) and "cfg.yaml" in str(err.value)


def test_torchrun_gets_a_c10d_rendezvous_only_past_one_node():
    one = config_from_dict({"dist": {"nproc_per_node": 3}})
    assert torchrun_args(one.dist, 3, "x") == ["--standalone", "--nproc-per-node", "3"]
    for rank in (0, 1):
        cfg = config_from_dict({"dist": {"nproc_per_node": 4, "nnodes": 2, "node_rank": rank,
                                         "rdzv_endpoint": "[::1]:29400"}})
        args = torchrun_args(cfg.dist, 4, "rid")
        assert "--standalone" not in args
        pairs = dict(zip(args[::2], args[1::2]))
        assert pairs == {"--nnodes": "2", "--node-rank": str(rank), "--nproc-per-node": "4", "--rdzv-backend": "c10d",
                         "--rdzv-endpoint": "[::1]:29400", "--rdzv-id": "rid",
                         "--rdzv-conf": f"is_host={'true' if rank == 0 else 'false'}"}
    # the evaluation's dist mapping takes the same path
    cmd = torchrun_command("c.yaml", 1, {"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "127.0.0.1:1"}, "e")
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "127.0.0.1:1" and cmd[-2:] == ["--config", "c.yaml"]
    assert rdzv_id_of("train", "a") == rdzv_id_of("train", "a") != rdzv_id_of("train", "b")


def test_node_layout_stays_out_of_the_evaluation_id():
    def comparable(dist):
        return _comparable(config_from_dict({"dist": dist, "output": {"run_dir": "-"}}))

    plain = comparable({"nproc_per_node": 2})
    assert "nnodes" not in plain["dist"]  # ids of one-node evaluations are unchanged
    a = comparable({"nproc_per_node": 1, "nnodes": 2, "node_rank": 0, "rdzv_endpoint": "127.0.0.1:5"})
    b = comparable({"nproc_per_node": 1, "nnodes": 2, "node_rank": 1, "rdzv_endpoint": "10.0.0.1:6"})
    assert a == b and "nnodes" not in a["dist"]
    assert a == comparable({"nproc_per_node": 2}) != comparable({"nproc_per_node": 1})  # the world size counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_one_process_train_what_one_node_of_two_does(tmp_path, monkeypatch):
    from reqdedup.config import get_settings
    from reqdedup.data.generator import GeneratorConfig, write_landing
    from reqdedup.train.launch import run_training
    from reqdedup.train.worker import FINAL_MODEL

    # The landed Parquet as the read source: no Spark needed to compare two launches.
    monkeypatch.setenv("REQDEDUP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REQDEDUP_READ_SOURCE", "landing")
    monkeypatch.setenv("REQDEDUP_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings = get_settings()
    day = "2026-05-03"
    write_landing(GeneratorConfig(date=day, users=30, requests=60, candidates=8, history=16, items=300, seed=3),
                  out_dir=settings.landing_dir)

    def config(dist, run_dir):
        return config_from_dict({
            "name": "multinode",
            "data": {"train_start": day, "train_end": day, "order": "request_shuffle", "batch_rows": 64, "workers": 0},
            "model": {"items": 300, "seq_len": 8, "d_model": 16, "n_layers": 1, "n_heads": 2, "ff_dim": 32,
                      "emb_dim": 8, "user_mlp": [16], "item_mlp": [16], "head_mlp": [16, 8]},
            "train": {"epochs": 2, "seed": 7, "sync_bn": True},
            "dist": {"device": "cpu", **dist},
            "output": {"run_dir": str(run_dir)},
            "mlflow": {"enabled": False},
        })

    env = {"OMP_NUM_THREADS": "1"}
    single = run_training(config({"nproc_per_node": 2}, tmp_path / "one_node"), settings, extra_env=env)

    endpoint = f"127.0.0.1:{_free_port()}"
    results, errors = {}, []

    def node(rank):
        try:
            dist = {"nproc_per_node": 1, "nnodes": 2, "node_rank": rank, "rdzv_endpoint": endpoint}
            results[rank] = run_training(config(dist, tmp_path / "two_nodes"), settings, extra_env=env)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=node, args=(r,)) for r in (1, 0)]  # node 1 first: it waits for the host
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    multi = results[0]
    assert single["world_size"] == multi["world_size"] == 2
    assert [h["loss"] for h in single["history"]] == [h["loss"] for h in multi["history"]]
    assert single["final"]["rows"] == multi["final"]["rows"] > 0
    a = torch.load(tmp_path / "one_node" / FINAL_MODEL, weights_only=False)["model"]
    b = torch.load(tmp_path / "two_nodes" / FINAL_MODEL, weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_two_node_evaluation_reports_what_one_node_does(tmp_path, monkeypatch):
    """Node 0 plans, logs and reports; node 1 waits for the plan and joins the rendezvous."""
    import yaml

    from reqdedup.config import get_settings
    from reqdedup.data.generator import GeneratorConfig, write_landing
    from reqdedup.evaluate.matrix import parse_matrix, run_evaluation

    monkeypatch.setenv("REQDEDUP_READ_SOURCE", "landing")
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/eval_tiny.yaml").read_text())
    raw["seeds"] = [0]
    raw["mlflow"] = {"enabled": False}
    raw["data"].update(train_start="2026-05-04", train_end="2026-05-04", eval_start="2026-05-05", eval_end="2026-05-05",
                       workers=0)

    def evaluate(home, dist, node_results=None):
        monkeypatch.setenv("REQDEDUP_HOME", str(home))
        settings = get_settings()
        for i, day in enumerate(("2026-05-04", "2026-05-05")):
            write_landing(GeneratorConfig(date=day, users=30, requests=60, candidates=8, history=16, items=500, seed=20 + i),
                          out_dir=settings.landing_dir)
        cfg = parse_matrix({**raw, "dist": {"device": "cpu", **dist}}, "two-node test")
        return settings, cfg

    settings1, one = evaluate(tmp_path / "one", {"nproc_per_node": 2})
    single = run_evaluation(one, settings1, report_dir=tmp_path / "one" / "report", extra_env={"OMP_NUM_THREADS": "1"})

    endpoint = f"127.0.0.1:{_free_port()}"
    settings2, node0 = evaluate(tmp_path / "two", {"nproc_per_node": 1, "nnodes": 2, "node_rank": 0, "rdzv_endpoint": endpoint})
    _, node1 = evaluate(tmp_path / "two", {"nproc_per_node": 1, "nnodes": 2, "node_rank": 1, "rdzv_endpoint": endpoint})
    results, errors = {}, []

    def node(rank, cfg):
        try:
            results[rank] = run_evaluation(cfg, settings2, report_dir=tmp_path / "two" / "report",
                                           extra_env={"OMP_NUM_THREADS": "1"}, plan_wait_s=600)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=node, args=(1, node1)), threading.Thread(target=node, args=(0, node0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert not errors, errors
    assert results[1]["status"] == "joined" and results[1]["evaluation_id"] == results[0]["evaluation_id"]
    two = results[0]
    assert two["status"] == "succeeded" and single["evaluation_id"] == two["evaluation_id"]

    def quality(summary):  # the metrics, not the clocks
        return {(r["config"], r["seed"]): {k: v for k, v in r["metrics"].items()
                                           if not any(t in k for t in ("seconds", "per_s", "wait", "share"))}
                for r in summary["runs"]}

    a, b = quality(single), quality(two)
    assert a.keys() == b.keys() and a == b
    assert all("auc" in m for m in a.values())
