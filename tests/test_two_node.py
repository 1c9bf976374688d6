"""A scoring job on a real two-node Ray cluster, submitted the way a platform team does it.

The cluster (a head with the dashboard, which serves the Jobs API, and one worker node; each its
own raylet) runs in a subprocess of its own, so it never touches the in-process Ray session the
other tests share; it is torn down by its process group id, which is the PID we started.
jobs/score.py goes in through JobSubmissionClient with the repository as working_dir, as
`ray job submit --working-dir . -- python jobs/score.py ...` sends it. The test then checks the
output with plain pyarrow (every input exactly once, no errors) and, through Ray's state API,
that scoring tasks finished on both nodes.
"""
from __future__ import annotations

import csv
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from promptad.demo import make_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # model input size: small, so 2 CPUs score a few hundred images quickly
CPUS_PER_NODE = 2
# More than a node has room for twice, so the two scoring actors must go to different nodes;
# the 0.5 CPU left on each node runs the read and commit tasks.
CPUS_PER_ACTOR = 1.5

# Runs in the subprocess: the cluster lives as long as our stdin stays open. The head's dashboard
# agent (which runs submitted jobs) gets a free port: its default, 52365, belongs to whichever Ray
# on this machine started first (e.g. the tests' shared session), and without its agent the head
# answers every submission with "No available agent".
CLUSTER_SCRIPT = f"""
import json, socket, sys
from ray.cluster_utils import Cluster

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    agent_port = s.getsockname()[1]
cluster = Cluster(initialize_head=True, head_node_args={{
    "num_cpus": {CPUS_PER_NODE}, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 0,
    "dashboard_agent_listen_port": agent_port}})
cluster.add_node(num_cpus={CPUS_PER_NODE})
cluster.wait_for_nodes()
print(json.dumps({{"dashboard": "http://" + cluster.head_node.address_info["webui_url"]}}), flush=True)
sys.stdin.read()
cluster.shutdown()
"""


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"the cluster did not come up within {timeout:.0f} s")
    return proc.stdout.readline()


@pytest.fixture
def two_node_cluster(tmp_path):
    """Dashboard URL of a fresh two-node cluster; its processes are ours and end with the test."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           # The job's `python` must be this environment's, as on a cluster node built from the image.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    log = open(tmp_path / "cluster.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log, text=True, env=env, start_new_session=True)
    try:
        line = _readline(proc, 180)
        if not line:
            raise RuntimeError(f"the cluster did not start: {(tmp_path / 'cluster.log').read_text()[-2000:]}")
        yield json.loads(line)["dashboard"]
    finally:
        proc.stdin.close()  # the script shuts the cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of that process group is still alive
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


@pytest.fixture
def scoring_inputs(tmp_path) -> dict:
    """A one-epoch effnet-lite0 artifact and a manifest of 256 generated images."""
    from promptad.data.datasets import load_samples
    from promptad.fit.pipeline import fit_in_process, load_images
    from promptad.learning.training import TrainConfig
    from promptad.models.artifact import save_artifact
    from promptad.models.model import ModelConfig

    data = make_dataset(tmp_path / "data", size=SIZE, n_train=128, n_test_good=64, n_test_defect=64)
    train = load_samples(str(data), ["tile"], "train")
    images = {"tile": load_images(train[:16], SIZE)}
    model = fit_in_process(images, ModelConfig(backbone="effnet-lite0", input_size=SIZE),
                           TrainConfig(epochs=1, batch_size=8), log=None)
    save_artifact(model, str(tmp_path / "model"))
    samples = train + load_samples(str(data), ["tile"], "test")
    manifest = tmp_path / "images.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "image_id", "category"])
        writer.writerows([s.path, s.image_id, s.category] for s in samples)
    return {"model": str(tmp_path / "model"), "manifest": str(manifest),
            "image_ids": sorted(s.image_id for s in samples)}


def _submit(client, timeout: float = 120, **kwargs) -> str:
    """submit_job, retried while the head's job agent is still starting (the dashboard answers
    first and says "No available agent")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _wait(client, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s:\n{client.get_job_logs(job_id)[-3000:]}")


def _predict_tasks_per_node(dashboard: str) -> Counter:
    """Finished model-stage tasks per node id (the state API's task events arrive a moment late)."""
    from ray.util.state import list_tasks

    from promptad.score.command import Predictor

    name = f"MapWorker(MapBatches({Predictor.__name__})).submit"  # Ray Data's actor-pool task name
    per_node: Counter = Counter()
    for _ in range(20):
        tasks = list_tasks(address=dashboard, filters=[("name", "=", name), ("state", "=", "FINISHED")],
                           detail=True, limit=10_000, raise_on_missing_output=False)
        per_node = Counter(t.node_id for t in tasks)
        if len(per_node) >= 2:
            break
        time.sleep(1)
    return per_node


@pytest.mark.slow
def test_score_job_on_two_nodes(two_node_cluster, scoring_inputs, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_nodes

    dashboard = two_node_cluster
    nodes = [n for n in list_nodes(address=dashboard) if n.state == "ALIVE"]
    assert len(nodes) == 2
    output = tmp_path / "scores"
    client = JobSubmissionClient(dashboard)
    job_id = _submit(
        client,
        entrypoint=(f"python jobs/score.py --model {scoring_inputs['model']} --input {scoring_inputs['manifest']} "
                    f"--output {output} --actors 2 --cpus-per-actor {CPUS_PER_ACTOR} --batch-size 8"),
        runtime_env={"working_dir": str(REPO), "env_vars": {"HF_HUB_OFFLINE": "1"}},
    )
    status = _wait(client, job_id, timeout=420)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    table = pads.dataset(str(output), format="parquet").to_table()
    assert sorted(table["image_id"].to_pylist()) == scoring_inputs["image_ids"]  # each input exactly once
    assert table["error"].null_count == table.num_rows
    assert table["score"].null_count == 0 and set(table["run_id"].to_pylist()) == {table["run_id"][0].as_py()}

    per_node = _predict_tasks_per_node(dashboard)
    assert set(per_node) == {n.node_id for n in nodes}, f"model-stage tasks per node: {dict(per_node)}"
