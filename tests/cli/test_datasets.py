"""``--dataset``: what the dataset holds equals the npz archive of the same run, per token and per context window,
in a folder and in object storage (a real S3-compatible server, moto's, started here); SAE features sparse."""

import os
import socket
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
from helpers import load_json, run_cli, write_sae

import gemmalens

SAE = "resid_post/layer_1_width_128_l0_small"
FEATURES = "sae.resid_post_layer_1_width_128_l0_small.features"
RUN = ["--max-tokens", 5, "--batch-size", 3, "--seed", 4, "--temperature", 0.9, "--capture", "model.layers.*.resid_out",
       "--capture", "model.layers.0.self_attn.attn_weights", "--capture", FEATURES,
       "--ablate", "model.layers.2.self_attn.attn_out:1"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server (moto in server mode) with a bucket, and the environment that points clients at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        import boto3

        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                             aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket="activations")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield env
    finally:
        server.terminate()
        server.wait()
        log.close()


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tiny_folder):
    """A run writing both the npz archive and a dataset of one row per token."""
    out = tmp_path_factory.mktemp("token")
    write_sae(out, SAE, "model.layers.1.output", 64, exact=True)
    done = run_cli("run", "--model", tiny_folder, *RUN, "--sae", out / SAE, "--save-activations", "--dataset",
                   out / "dataset", "--output-dir", out / "run")
    assert done.returncode == 0, done.stderr
    assert "model.layers.0.self_attn.attn_weights is not written to the dataset" in done.stderr
    return out


def test_the_dataset_holds_what_the_npz_archive_holds(token_run):
    dataset = datasets.load_from_disk(str(token_run / "dataset"))
    rows = dataset.with_format("numpy")[:]
    archive = gemmalens.open_activations(token_run / "run")
    results = {r["id"]: r for r in load_json(token_run / "run" / "results.json")}
    assert sorted(set(rows["prompt_id"].tolist())) == sorted(results)
    for prompt, result in results.items():
        mine = rows["prompt_id"] == prompt
        sequence = result["prompt_tokens"] + result["tokens"]
        positions, _ = archive.trajectory("model.layers.3.resid_out", prompt)
        assert rows["position"][mine].tolist() == positions.tolist()
        assert rows["token_ids"][mine].tolist() == [sequence[p] for p in positions]
        assert rows["is_generated"][mine].tolist() == [p >= len(result["prompt_tokens"]) for p in positions]
        assert set(rows["category"][mine]) == {result["category"]}
        assert set(rows["intervention"][mine]) == {",".join(result["interventions"])} != {""}
        for layer in range(4):
            name = f"model.layers.{layer}.resid_out"
            assert np.array_equal(rows[name][mine], archive.trajectory(name, prompt)[1])
        features = archive.trajectory(FEATURES, prompt, sparse=True)[1]
        stored = [(i, v) for i, v in zip(dataset[FEATURES + ".indices"][np.nonzero(mine)[0].tolist()],
                                         dataset[FEATURES + ".values"][np.nonzero(mine)[0].tolist()])]
        starts = np.concatenate([[0], np.cumsum(features.counts)])
        for entry, (indices, values) in enumerate(stored):
            assert indices == features.indices[starts[entry]:starts[entry + 1]].tolist()
            assert np.array_equal(np.asarray(values, np.float32), features.values[starts[entry]:starts[entry + 1]])
    assert "model.layers.0.self_attn.attn_weights" not in dataset.column_names


def test_context_rows_in_object_storage_are_what_saelens_loads(token_run, tiny_folder, tmp_path, s3):
    url = "s3://activations/runs/context"
    env = {**os.environ, **s3}
    done = run_cli("run", "--model", tiny_folder, *RUN, "--sae", token_run / SAE, "--dataset", url, "--dataset-rows",
                   "context", "--context", 4, "--output-dir", tmp_path / "run", env=env)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "run" / "activations").exists()  # --dataset alone: no npz archive
    os.environ.update(s3)
    try:
        dataset = datasets.load_from_disk(url)
    finally:
        for key in s3:
            os.environ.pop(key)
    # SAELens' cached activations: the hook's column Array2D(context_size, d_in), token_ids a list of context_size
    assert dataset.features["model.layers.2.resid_out"].shape == (4, 64)
    assert dataset.features["token_ids"].length == 4
    dataset.set_format(type="torch", columns=["model.layers.2.resid_out", "token_ids"])
    assert tuple(dataset[0:2]["model.layers.2.resid_out"].shape) == (2, 4, 64)
    windows = dataset.with_format("numpy")[:]
    tokens = datasets.load_from_disk(str(token_run / "dataset")).with_format("numpy")[:]
    # each batch's token rows, in order, cut into windows of 4 (a batch's remainder dropped)
    expected, start = [], 0
    for batch in range(0, 8, 3):
        count = int(np.isin(tokens["prompt_id"], list(range(batch, batch + 3))).sum())
        whole = count // 4 * 4
        expected.append(np.arange(start, start + whole))
        start += count
    order = np.concatenate(expected)
    assert np.array_equal(windows["model.layers.2.resid_out"].reshape(-1, 64), tokens["model.layers.2.resid_out"][order])
    assert np.array_equal(windows["token_ids"].reshape(-1), tokens["token_ids"][order])
    assert np.array_equal(windows["prompt_id"].reshape(-1), tokens["prompt_id"][order])


def test_a_dataset_needs_points_with_a_value_per_token(tmp_path, tiny_folder):
    out = run_cli("run", "--model", tiny_folder, "--dataset", tmp_path / "d", "--output-dir", tmp_path / "run")
    assert out.returncode == 2 and "--dataset needs --capture PATTERN" in out.stderr
    out = run_cli("run", "--model", tiny_folder, "--dataset", tmp_path / "d", "--capture", "*attn_weights",
                  "--output-dir", tmp_path / "run")
    assert out.returncode == 2 and "no captured point has a value per token" in out.stderr
    assert not (tmp_path / "run").exists()
