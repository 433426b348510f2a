"""Node loss on a real multi-node Ray cluster (ray.cluster_utils: a head and two worker nodes,
each its own raylet on 127.0.0.1): a worker node is killed mid-run, and the job finishes
with counts identical to an uninterrupted run, no image lost or written twice."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from cifar_support import two_per_class
from log_support import dsmooth_records
from pipeline.config import parse_config


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(own_ray_module):
    from ray.cluster_utils import Cluster

    from api_support import install_fake_credentials

    install_fake_credentials()  # before the nodes start: their workers inherit the environment
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return two_per_class(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from pipeline.models import ModelMeta, build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("cifar_resnet20")
    with torch.no_grad():  # BatchNorm statistics that make an untrained model split its votes
        model.train()
        for _ in range(3):
            model(torch.rand(64, 3, 32, 32))
    path = tmp_path_factory.mktemp("ckpt") / "resnet20.pt"
    save_checkpoint(path, model.eval(), ModelMeta(arch="cifar_resnet20"))
    return path


def certify_config(cifar: Path, classifier: Path, output: Path):
    from pipeline.certify.plan import CertifyConfig

    return parse_config(CertifyConfig, {
        "dataset": "cifar10", "data_root": str(cifar), "classifier": str(classifier), "sigma": 0.25,
        "n0": 10, "n": 400, "seed": 2, "actors": 2, "cpus_per_actor": 1, "shard_size": 1, "batch_size": 100,
        "max_restarts": 1, "output": str(output), "wait_timeout": 120,
    })


def every_row(run: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((run / "votes").glob("part-*.parquet")))


def counts(run: Path) -> dict[tuple[int, str], list[int]]:
    table = every_row(run).to_pandas()
    return {(int(r.image_id), r.phase): list(r.counts) for r in table.itertuples()}


def busy_worker_node(head, workers, actor_class: str):
    """A worker node that hosts a live actor of `actor_class` (so killing it loses work)."""
    from ray._private.state import actors

    hosting = {a["Address"]["NodeID"] for a in actors().values()
               if a["ActorClassName"] == actor_class and a["State"] == "ALIVE"}
    return next(n for n in workers if n.node_id in hosting)


def test_certify_survives_the_loss_of_a_worker_node(cluster, cifar, classifier, tmp_path):
    """A worker node of a multi-node cluster is removed mid-run: the run finishes on the other node with
    counts identical to a reference run."""
    from jobs.certify import certify

    head, workers = cluster
    reference = certify(certify_config(cifar, classifier, tmp_path / "reference"), address=head.address)
    assert reference.finished_now == 20

    run = tmp_path / "run"
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["result"] = certify(certify_config(cifar, classifier, run), address=head.address)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = error

    with dsmooth_records(logging.WARNING) as records:
        thread = threading.Thread(target=job)
        thread.start()
        deadline = time.monotonic() + 300
        # Votes are written in batched parts (at most one per WRITE_EVERY_S): once the first is
        # saved, both actors hold items (one image per shard, 20 shards) and the node goes.
        while not list(run.glob("votes/part-*.parquet")):
            assert time.monotonic() < deadline and thread.is_alive(), outcome
            time.sleep(0.2)
        victim = busy_worker_node(head, workers, "ModelActor")
        head.remove_node(victim, allow_graceful=False)  # the node and its actor die mid-shard
        thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].finished_now == 20
    rows = every_row(run).to_pandas()
    assert len(rows) == 40 and not rows.duplicated(["image_id", "phase"]).any()  # nothing lost, nothing twice
    assert counts(run) == counts(tmp_path / "reference")
    lost = [r.getMessage() for r in records if re.search(r"actor \d lost .* [1-9]\d* item\(s\) resubmitted",
                                                             r.getMessage())]
    assert lost, f"no in-flight work was lost with the node: {[r.getMessage() for r in records]}"


def test_certify_api_survives_the_loss_of_a_worker_node(cluster, tmp_path):
    """Two API actors on two worker nodes; one node dies mid-run. The job finishes with the
    answers of an uninterrupted run, and only calls in flight on the dead node are repeated."""
    from api_support import GRAY_IDS, RGB_IDS, job_config
    from jobs.certify_api import certify_api
    from pipeline.apis.emulator import EmulatorServer
    from pipeline.apis.run.prepare import load_job_config
    from pipeline.runs.storage import read_votes

    head, workers = cluster
    deadline = time.monotonic() + 180
    while ray.cluster_resources().get("CPU", 0) < 2:  # the certify test took a node away
        assert time.monotonic() < deadline, ray.nodes()
        workers.append(head.add_node(num_cpus=1))
        head.wait_for_nodes()
        time.sleep(2.0)  # the cluster's resources catch up with the new node
    ids = [RGB_IDS[0], GRAY_IDS[1], RGB_IDS[1], GRAY_IDS[0]]
    needed = len(ids) * (1 + 5 + 20)
    concurrency = 4

    def config(output: Path, url: str):
        return load_job_config(job_config("aws", url, output, ids, **{
            "rate.actors": 2, "rate.actor_cpus": 1, "rate.concurrency": concurrency, "rate.qps": 40,
            "wait_timeout": 120}))

    with EmulatorServer(seed=5) as emulator:
        emulator.set_faults("aws", latency_s=0.05)
        reference = certify_api(config(tmp_path / "reference", emulator.url), address=head.address)
        assert reference.status == "complete"
        emulator.reset()
        emulator.set_faults("aws", latency_s=0.05)
        outcome: dict = {}

        def job() -> None:
            try:
                outcome["summary"] = certify_api(config(tmp_path / "run", emulator.url), address=head.address)
            except BaseException as error:  # noqa: BLE001 - reported below
                outcome["error"] = error

        with dsmooth_records(logging.WARNING) as records:
            thread = threading.Thread(target=job)
            thread.start()
            deadline = time.monotonic() + 300
            while emulator.calls("aws") < needed // 3:
                assert time.monotonic() < deadline and thread.is_alive(), outcome
                time.sleep(0.05)
            victim = busy_worker_node(head, workers, "ApiActor")
            head.remove_node(victim, allow_graceful=False)
            thread.join(timeout=600)
        assert "error" not in outcome, outcome.get("error")
        summary = outcome["summary"]
        assert summary.status == "complete" and summary.images_complete == len(ids)
        repeated = emulator.repeated("aws")
        assert repeated <= concurrency and emulator.calls("aws") - repeated == needed
        assert summary.run.calls - summary.run.unconfirmed <= emulator.calls("aws") <= summary.run.calls
    key = lambda frame: {(int(r.image_id), r.phase): dict(zip(r.classes, r.counts)) for r in frame.itertuples()}  # noqa: E731
    assert key(read_votes(tmp_path / "run")) == key(read_votes(tmp_path / "reference"))
    assert any(re.search(r"actor \d lost", r.getMessage()) for r in records)
