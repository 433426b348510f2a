"""`dsmooth certify`: planning, bad input, and real Ray runs (job submission, kill, resume).

The Ray tests start their own head node on 127.0.0.1 (free ports, own --temp-dir, token
auth with a token made here) and stop exactly that node's processes afterwards: `ray stop`
would also kill every other Ray on the machine.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from jobs.cli import main as cli_main
from jobs.options import flags
from pipeline.certify.plan import (
    CertifyConfig,
    certify_identity,
    default_shard_size,
    requests_of,
)
from pipeline.certify.run import Shard, model_vote_rows as vote_rows, plan_shards
from pipeline.config import ConfigError, parse_config
from pipeline.data import ImageDataset, open_dataset
from pipeline.data.core import ImageRecord
from pipeline.sampling.engine import optimize_for_inference
from pipeline.certify.pair import ModelBytes, ModelIdentity, PairCounter, PairInfo, load_pair
from pipeline.models import DataMismatchError, ModelMeta, build_model, compose, file_sha256, save_checkpoint
from pipeline.sampling.noise import SampleRequest
from pipeline.stats.smoothing import ABSTAIN, certify_counts, predict_counts
from pipeline.runs.storage import VOTE_SCHEMA, VOTES, read_votes

from cifar_support import two_per_class
from noise_support import direct_counts

REPO = Path(__file__).resolve().parents[1]
SIGMA = 0.25
N0, N = 20, 200  # small, but enough votes to split between classes and to certify some images



# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """20 CIFAR-10 test images (2 per class) in the class-folder layout."""
    root = two_per_class(tmp_path_factory.mktemp("cifar"))
    assert len(list(root.glob("test/*/*.jpg"))) == 20
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cifar_root) -> dict[str, Path]:
    """Untrained ResNet-20 + small DnCNN whose BatchNorm statistics were set on noisy images.

    Calibrated BN makes an untrained pair split its votes between classes under noise, so
    equal counts across runs mean something; it takes a second, not a training run.
    """
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    classifier, denoiser = build_model("cifar_resnet20"), build_model("dncnn_small")
    data = open_dataset("cifar10", cifar_root, "test")
    images = torch.stack([data.load(i) for i in range(len(data))])
    pair = compose(classifier, denoiser).eval()
    classifier.train()  # statistics of the classifier's inputs: the denoised noisy images
    with torch.no_grad():
        for _ in range(4):
            pair(images + SIGMA * torch.randn_like(images))
    pair.eval()
    paths = {"classifier": folder / "resnet20.pt", "denoiser": folder / "dncnn_small.pt"}
    save_checkpoint(paths["classifier"], classifier, ModelMeta(arch="cifar_resnet20"))
    save_checkpoint(paths["denoiser"], denoiser, ModelMeta(arch="dncnn_small", sigma=SIGMA))
    return paths


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_range(size: int) -> int:
    """The first of `size` consecutive free ports (for Ray's worker ports)."""
    rng = np.random.default_rng()
    for _ in range(200):
        base = int(rng.integers(30_000, 60_000 - size))
        try:
            sockets = []
            for port in range(base, base + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free port range")


def _cluster_processes(temp_dir: str) -> set[int]:
    """PIDs of the processes of *our* Ray node: command line names our temp dir, or a parent does."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (parent, command)
    found = {pid for pid, (_, command) in table.items() if temp_dir in command}
    while True:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        if not children:
            break
        found |= children
    found.discard(os.getpid())
    return found


def _stop_cluster(temp_dir: str) -> None:
    """`ray stop` for one node only: SIGTERM its processes, SIGKILL what is left after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in _cluster_processes(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while _cluster_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_cluster(cifar_root, own_ray_module) -> Iterator[dict[str, str]]:
    """A real head node (`ray start --head`) with the dashboard, for job submission."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the test cluster's clean-up reads /proc")
    from ray._private.authentication_test_utils import reset_auth_token_state

    temp_dir = tempfile.mkdtemp(prefix="dsr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    saved = {key: os.environ.get(key) for key in (*auth, "RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")} | auth
    gcs, dashboard = _free_port(), _free_port()
    workers = _port_range(64)
    command = [
        "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={_free_port()}", f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}", f"--min-worker-port={workers}",
        f"--max-worker-port={workers + 63}", "--num-cpus=2", "--num-gpus=0",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        for key in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
            os.environ.pop(key, None)
        os.environ.update(auth)
        reset_auth_token_state()
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}", "temp_dir": temp_dir}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _stop_cluster(temp_dir)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        try:
            reset_auth_token_state()
        except Exception:  # noqa: BLE001 - best effort for later tests in this process
            pass
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def write_config(path: Path, **settings) -> Path:
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}))
    return path


def base_settings(cifar_root: Path, checkpoints: dict[str, Path], output: Path, **overrides) -> dict:
    settings = {
        "dataset": "cifar10", "data_root": cifar_root, "split": "test",
        "classifier": checkpoints["classifier"], "denoiser": checkpoints["denoiser"],
        "sigma": SIGMA, "n0": N0, "n": N, "seed": 3, "chunk_size": 64, "batch_size": 100,
        "actors": 2, "cpus_per_actor": 1, "shard_size": 4, "output": output,
    }
    settings.update(overrides)
    return settings


def submit(cluster: dict, config: Path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster["dashboard"])
    job_id = client.submit_job(entrypoint=f"dsmooth certify --config {config}", runtime_env={"working_dir": str(REPO)})
    return client, job_id


def wait_job(client, job_id: str, timeout_s: float = 420.0):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(0.5)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still running after {timeout_s}s:\n{client.get_job_logs(job_id)[-4000:]}")


def raw_rows(run_dir: Path) -> pa.Table:
    """Every row of every part, duplicates included (read_votes would hide them)."""
    parts = VOTES.parts(run_dir)
    if not parts:
        return VOTE_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(p, schema=VOTE_SCHEMA) for p in parts)


def counts_by_key(run_dir: Path) -> dict[tuple[int, str], list[int]]:
    frame = read_votes(run_dir)
    return {(int(r.image_id), r.phase): list(r.counts) for r in frame.itertuples()}


# --------------------------------------------------------------------------- planning (no Ray)


def test_config_validation_names_the_field():
    good = {"dataset": "cifar10", "data_root": "d", "classifier": "c.pt", "sigma": 0.5, "output": "o"}
    assert parse_config(CertifyConfig, good).phases() == [("selection", 100), ("estimation", 100_000)]
    assert parse_config(CertifyConfig, {**good, "mode": "predict", "n0": 10**9}).phases() == [("prediction", 100_000)]
    assert parse_config(CertifyConfig, {**good, "denoiser": "none"}).denoiser is None
    for bad, field in (
        ({"sigma": 0}, "sigma"), ({"n0": 200, "n": 100}, "n0"), ({"alpha": 1.5}, "alpha"),
        ({"batch_size": 0}, "batch_size"), ({"actors": 0}, "actors"), ({"gpus_per_actor": -1}, "gpus_per_actor"),
        ({"mode": "attack"}, "mode"), ({"skip": 0}, "skip"), ({"sigmaa": 1}, "sigmaa"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(CertifyConfig, {**good, **bad})
        assert caught.value.field == field


def test_identity_holds_meaning_not_speed_or_location(tmp_path):
    base = {"dataset": "cifar10", "classifier": "c", "sigma": 0.5, "output": "o"}
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    split = ImageDataset.from_array(images, [0, 1, 2, 3], name="cifar10/test")
    info = PairInfo(ModelIdentity("cifar_resnet20", "aa"), ModelIdentity("dncnn", "bb"), 10)
    config = parse_config(CertifyConfig, {**base, "data_root": "/x/cifar.tgz", "batch_size": 7, "actors": 3,
                                          "skip": 2, "max": 3})
    identity = certify_identity(config, split, info)
    for key in ("job", "mode", "dataset", "data", "listing_sha256", "classifier_sha256", "denoiser_sha256",
                "sigma", "n0", "n", "seed", "chunk_size", "num_classes"):
        assert key in identity
    assert identity["data"] == "cifar.tgz" and identity["dataset"] == "cifar10/test"
    assert not {"batch_size", "actors", "alpha", "gpus_per_actor", "amp", "shard_size", "skip", "max",
                "ids", "data_root"} & set(identity)
    # Another location of the same data (another working directory, `ray job submit`'s unpacked
    # copy), other speed settings and another selection of images: the same run.
    other = parse_config(CertifyConfig, {**base, "data_root": "../elsewhere/cifar.tgz", "batch_size": 400})
    assert certify_identity(other, split, info) == identity
    # A data set with another listing, or another noise seed: another run.
    renamed = ImageDataset.from_array(images, [0, 1, 2, 3], name="cifar10/test")
    renamed.records[1] = ImageRecord(1, "other-file.jpg", 1)
    assert certify_identity(config, renamed, info)["listing_sha256"] != identity["listing_sha256"]
    reseeded = parse_config(CertifyConfig, {**base, "data_root": "/x/cifar.tgz", "seed": 1})
    assert certify_identity(reseeded, split, info)["seed"] == 1


def test_shards_and_rows():
    records = [ImageRecord(i * 20, f"img{i}", i % 10) for i in range(10)]
    shards = plan_shards(records, 4)
    assert [s.image_ids for s in shards] == [[0, 20, 40, 60], [80, 100, 120, 140], [160, 180]]
    # For a pool that sizes its shards itself, they taper at the end: at most 1/(2 x actors) of
    # what is left, down to one image, so no last round of full shards keeps most actors idle.
    many = [ImageRecord(i, f"img{i}", 0) for i in range(200)]
    tapered = [len(s.records) for s in plan_shards(many, 2, actors=16)]
    assert tapered == [2] * 84 + [1] * 32 and [r.image_id for s in plan_shards(many, 2, 16) for r in s.records] == list(
        range(200))
    big = [len(s.records) for s in plan_shards(many, 64, actors=2)]
    assert big[0] == 50 and big == sorted(big, reverse=True) and big[-1] == 1 and sum(big) == 200
    assert [len(s.records) for s in plan_shards(many, 2)] == [2] * 100  # a given shard size is kept
    assert default_shard_size(100_100, pending=500, actors=4) == 1
    # Issue 22: the progress counts saved shards, so it moves image by image once an image takes
    # ~10,000 samples (the README's `certify`: n0 = 100, n = 10,000), not 19 images at a time.
    assert default_shard_size(10_100, pending=500, actors=1) == 1
    assert default_shard_size(1_100, pending=5000, actors=4) == 9  # ~10,000 samples per shard
    assert default_shard_size(420, pending=5000, actors=1) == 23
    assert default_shard_size(420, pending=100, actors=2) == 7  # the demo: 8 shards per actor at least
    assert default_shard_size(20, pending=5000, actors=1) == 64  # never more than 64 images
    assert default_shard_size(1_100, pending=10, actors=4) == 1
    config = parse_config(CertifyConfig, {"dataset": "cifar10", "data_root": "d", "classifier": "c", "sigma": 0.5,
                                          "output": "o", "n0": 2, "n": 5, "seed": 9})
    shard = Shard(0, tuple(records[:2]))
    requests = requests_of(config)(shard)
    assert [(r.image_id, r.phase, r.num_samples, r.seed, r.chunk_size) for r in requests] == [
        (0, "selection", 2, 9, 256), (0, "estimation", 5, 9, 256), (20, "selection", 2, 9, 256),
        (20, "estimation", 5, 9, 256)]
    counts = np.array([[2, 0], [4, 1], [0, 2], [1, 4]])
    from datetime import datetime, timezone

    rows = vote_rows(run_id="r", config=config, records=shard.records, requests=requests, counts=counts, compute_s=14.0,
                     worker="actor-0", finished_at=datetime.now(timezone.utc),
                     classifier=ModelIdentity("f", "fs"), denoiser=None, class_names=["a", "b"])
    assert [r["label_name"] for r in rows] == ["a", "a", "b", "b"]
    assert sum(r["elapsed_s"] for r in rows) == pytest.approx(14.0) and rows[1]["elapsed_s"] == pytest.approx(5.0)
    assert rows[3]["counts"] == [1, 4] and rows[3]["model_sha256"] == "fs" and rows[3]["denoiser"] is None
    assert rows[3]["seed"] == 9 and rows[3]["chunk_size"] == 256


def test_optimized_model_gives_the_same_predictions():
    torch.manual_seed(0)
    pair = compose(build_model("cifar_resnet20"), build_model("dncnn_small")).eval()
    x = torch.rand(16, 3, 32, 32)
    fast = optimize_for_inference(pair)
    with torch.inference_mode():
        reference, got = pair(x), fast(x)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    assert any(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.dim() == 4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # folded into the convs


def test_pipeline_does_not_import_ray():
    code = ("import sys, pipeline.certify.plan, pipeline.certify.pair, pipeline.sampling.engine, pipeline.sampling.engine; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_example_config_and_help_cover_every_setting(capsys):
    from pipeline.config import load_config

    example = load_config(CertifyConfig, REPO / "examples" / "certify_cifar10_small.yaml")
    assert example.dataset == "cifar10" and example.mode == "certify" and example.denoiser is not None
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["certify", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    every = flags(CertifyConfig)
    assert set(every) == set(CertifyConfig.model_fields)  # every setting has a flag
    for flag in every.values():
        assert re.search(rf"{flag}\b[^\n]*\n?\s+\S", text), f"{flag} lacks a help text"
    for needed in ("--config", "--address", "resume", "dsmooth reduce", "ray job submit"):
        assert needed.lower() in text.lower()


@pytest.mark.slow
def test_benchmark_runs_without_ray(tmp_path):
    """benchmarks/certify_throughput.py on a machine where `import ray` fails (no figures checked)."""
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(REPO)])}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "certify_throughput.py"), "--device", "cpu", "--n", "24",
         "--n0", "5", "--images", "2", "--batch", "16", "--reps", "2", "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert re.match(r"\s+1\s+[\d,]+\s+[\d,]+\s+[\d.]+x", lines[2]) and re.match(r"\s+2\s", lines[3])
    assert "median wall-clock: reference" in result.stdout and "peak memory" in result.stdout


# --------------------------------------------------------------------------- bad input (no Ray needed)


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = cli_main(["certify", *argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if "error:" in line]


def test_bad_settings_are_one_line_errors(capsys, tmp_path, cifar_root, checkpoints):
    common = ["--dataset", "cifar10", "--data-root", str(cifar_root), "--classifier", str(checkpoints["classifier"])]
    out = tmp_path / "run"
    cases = [
        (["--sigma", "0", "--output", str(out)], "sigma"),
        (["--sigma", "0.25", "--n0", "500", "--n", "100", "--output", str(out)], "n0=500 must not exceed n=100"),
        (["--sigma", "0.25"], "'output': is required (--output)"),
    ]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases.append((["--sigma", "0.25", "--output", str(blocker / "run")], "not writable"))
    for argv, expected in cases:
        code, errors = run_cli(capsys, *common, *argv)
        assert code == 2 and len(errors) == 1 and expected in errors[0], (argv, errors)
    assert not out.exists()


def test_mismatched_checkpoints_are_refused(capsys, tmp_path, cifar_root, checkpoints):
    common = ["--dataset", "cifar10", "--data-root", str(cifar_root), "--sigma", "0.25", "--output", str(tmp_path / "o")]
    # A denoiser where the classifier belongs.
    code, errors = run_cli(capsys, *common, "--classifier", str(checkpoints["denoiser"]))
    assert code == 2 and "not a classifier" in errors[0] and "dncnn_small.pt" in errors[0]
    # Weights of a ResNet-20 declared as a ResNet-110.
    code, errors = run_cli(capsys, *common, "--classifier", str(checkpoints["classifier"]),
                           "--classifier-arch", "cifar_resnet110")
    assert code == 2 and "cifar_resnet110" in errors[0] and "resnet20.pt" in errors[0]
    # A raw state dict that does not fit the named architecture.
    raw = tmp_path / "raw.pth"
    torch.save(build_model("cifar_resnet20").net.state_dict(), raw)
    code, errors = run_cli(capsys, *common, "--classifier", str(raw), "--classifier-arch", "cifar_wrn28_10")
    assert code == 2 and "do not fit" in errors[0] and "raw.pth" in errors[0]
    # ... and with no architecture named at all.
    code, errors = run_cli(capsys, *common, "--classifier", str(raw))
    assert code == 2 and "--classifier-arch" in errors[0]
    # A classifier with fewer outputs than the data set has classes.
    five = tmp_path / "five.pt"
    save_checkpoint(five, build_model("cifar_resnet20", num_classes=5), ModelMeta(arch="cifar_resnet20", num_classes=5))
    code, errors = run_cli(capsys, *common, "--classifier", str(five))
    assert code == 2 and "5 outputs" in errors[0] and "cifar10 (10 classes" in errors[0]
    # A raw state dict that fits: a foreign checkpoint, refused unless allowed explicitly.
    fits = tmp_path / "fits.pth"
    torch.save(build_model("cifar_resnet20").net.state_dict(), fits)
    code, errors = run_cli(capsys, *common, "--classifier", str(fits), "--classifier-arch", "cifar_resnet20")
    assert code == 2 and "--allow-foreign-classifier" in errors[0] and "fits.pth" in errors[0]
    data = open_dataset("cifar10", cifar_root, "test").describe()
    _, info = load_pair(ModelBytes.read(fits), None, data, "cifar_resnet20", allow_foreign_classifier=True)
    assert info.num_classes == 10
    assert not (tmp_path / "o").exists()


def test_classifier_of_another_data_set_is_refused(capsys, tmp_path, cifar_root, checkpoints):
    """An ImageNet ResNet-18 (1000 classes, 224x224) on CIFAR-10 images runs without an error and
    certifies nonsense; it must be refused before any work, naming both data sets."""
    imagenet = tmp_path / "resnet18-imagenet.pt"
    save_checkpoint(imagenet, build_model("resnet18"), ModelMeta(arch="resnet18"))
    common = ["--dataset", "cifar10", "--data-root", str(cifar_root), "--sigma", "0.25", "--output", str(tmp_path / "o")]
    code, errors = run_cli(capsys, *common, "--classifier", str(imagenet), "--allow-foreign-classifier")
    assert code == 2 and len(errors) == 1
    assert "imagenet (1000 classes, 224x224 images)" in errors[0] and "cifar10 (10 classes, 32x32 images)" in errors[0]
    assert "resnet18-imagenet.pt" in errors[0]
    # A checkpoint without a recorded data set: refused unless allowed; never when contradicting.
    unrecorded = tmp_path / "unrecorded.pt"
    save_checkpoint(unrecorded, build_model("cifar_resnet20"), ModelMeta(arch="cifar_resnet20", dataset=""))
    code, errors = run_cli(capsys, *common, "--classifier", str(unrecorded))
    assert code == 2 and "does not record which data set" in errors[0]
    # An input size other than the data's, and a denoiser of another data set.
    big = tmp_path / "resnet20-64px.pt"
    save_checkpoint(big, build_model("cifar_resnet20"), ModelMeta(arch="cifar_resnet20", input_size=64))
    code, errors = run_cli(capsys, *common, "--classifier", str(big))
    assert code == 2 and "64x64 images" in errors[0] and "32x32 images" in errors[0]
    denoiser = tmp_path / "dncnn-imagenet.pt"
    save_checkpoint(denoiser, build_model("dncnn_small"), ModelMeta(arch="dncnn_small", dataset="imagenet", sigma=0.25))
    code, errors = run_cli(capsys, *common, "--classifier", str(checkpoints["classifier"]), "--denoiser", str(denoiser))
    assert code == 2 and "trained on imagenet" in errors[0] and "cifar10" in errors[0]
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataMismatchError):
        load_pair(ModelBytes.read(imagenet), None, open_dataset("cifar10", cifar_root, "test").describe())


# --------------------------------------------------------------------------- real Ray


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, cifar_root, checkpoints, tmp_path_factory) -> dict:
    """One complete certification submitted as a Ray job (the reference for the other tests)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    output = folder / "run"
    config = write_config(folder / "certify.yaml", **base_settings(cifar_root, checkpoints, output))
    client, job_id = submit(ray_cluster, config)
    status = wait_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status.name == "SUCCEEDED", logs[-5000:]
    return {"output": output, "config": config, "logs": logs}


@pytest.mark.slow
def test_job_submission_writes_complete_recomputable_votes(uninterrupted, cifar_root, checkpoints):
    """`ray job submit` to a `ray start --head` node: every image once per phase, votes recomputable offline
    from their noise addresses."""
    output, logs = uninterrupted["output"], uninterrupted["logs"]
    table = raw_rows(output).to_pandas()
    data = open_dataset("cifar10", cifar_root, "test")
    # Every image exactly once per phase, all in one run, with everything needed offline.
    assert len(table) == 2 * len(data)
    assert sorted(zip(table.image_id, table.phase)) == sorted(
        (r.image_id, p) for r in data.records for p in ("selection", "estimation"))
    by_id = {r.image_id: r for r in data.records}
    for row in table.itertuples():
        assert row.label == by_id[row.image_id].label and row.image_name == by_id[row.image_id].name
        assert sum(row.counts) == row.n == (N0 if row.phase == "selection" else N) and len(row.counts) == 10
        assert (row.sigma, row.seed, row.chunk_size) == (SIGMA, 3, 64)
        assert row.model == "cifar_resnet20" and row.model_sha256 == file_sha256(checkpoints["classifier"])
        assert row.denoiser == "dncnn_small" and row.denoiser_sha256 == file_sha256(checkpoints["denoiser"])
        assert row.elapsed_s > 0 and row.worker.startswith("actor-") and row.run_id == table.run_id[0]
    # Both phases of an image share a part file (an image is complete or absent).
    for part in VOTES.parts(output):
        rows = pq.read_table(part).to_pandas()
        assert (rows.groupby("image_id").phase.nunique() == 2).all()
    # Certificates from the Parquet counts agree with pipeline.stats.smoothing, and make sense.
    votes = read_votes(output)
    certificates = {}
    for image_id, rows in votes.groupby("image_id"):
        phase = {r.phase: np.asarray(r.counts) for r in rows.itertuples()}
        certificates[image_id] = certify_counts(phase["selection"], phase["estimation"], SIGMA, 0.001)
    max_radius = SIGMA * 2.5  # sigma * Phi^-1(0.001 ** (1/200)) ~ 0.58 with n = 200
    assert all(c == ABSTAIN and r == 0 or 0 <= c < 10 and 0 < r < max_radius for c, r in certificates.values())
    assert any(c != ABSTAIN for c, _ in certificates.values())
    assert sum(int(np.count_nonzero(c)) > 1 for c in votes["counts"]) >= 5, "votes never split: a constant model"
    try:
        from pipeline.reduce import load_run
    except ImportError:
        pass
    else:
        reduced = load_run(output, 0.001)
        for row in reduced.itertuples():
            assert (row.predict, pytest.approx(row.radius)) == certificates[row.image_id]
    # The actors' counts are those of the noise computed directly from each sample's address
    # (seed 3, not the default 0), through the same models; another seed gives other counts.
    description = data.describe()
    _, info = load_pair(ModelBytes.read(checkpoints["classifier"]), ModelBytes.read(checkpoints["denoiser"]), description)
    pair, _ = load_pair(ModelBytes.read(checkpoints["classifier"]), ModelBytes.read(checkpoints["denoiser"]), description)
    pair = optimize_for_inference(pair)  # the actors' numerics (BatchNorm folded, channels-last)
    expected = counts_by_key(output)
    for image_id in (0, 7):
        image = data.load(image_id)
        for phase, total in (("selection", N0), ("estimation", N)):
            direct = direct_counts(pair, image, 3, image_id, phase, total, 64, SIGMA, 10)
            assert list(direct) == expected[(image_id, phase)], (image_id, phase)
    reseeded = [list(direct_counts(pair, data.load(i), 4, i, "estimation", N, 64, SIGMA, 10)) for i in range(6)]
    assert reseeded != [expected[(i, "estimation")] for i in range(6)]
    # ... and so are the engine's here without Ray, batched otherwise.
    counter = PairCounter(ModelBytes.read(checkpoints["classifier"]), ModelBytes.read(checkpoints["denoiser"]), info,
                          description, sigma=SIGMA, batch_size=37)
    requests = [SampleRequest(3, i, p, n, 64) for i in (0, 7) for p, n in (("selection", N0), ("estimation", N))]
    local, _ = counter.count(requests, {i: data.by_ids([i]).as_uint8()[0] for i in (0, 7)})
    assert [list(row) for row in local] == [expected[(r.image_id, r.phase)] for r in requests]
    # The job tells where the votes are and how to go on.
    assert f"votes:  {output}/votes" in logs and f"dsmooth reduce {output}" in logs and "resume:" in logs
    assert re.search(r"certify: 20/20 images \(100\.0%\) \| [\d,]+ samples/s", logs)


@pytest.mark.slow
def test_killed_actor_and_stopped_job_resume_to_identical_counts(ray_cluster, uninterrupted, cifar_root,
                                                                   checkpoints, tmp_path):
    """A submitted job whose actor is killed, then the job stopped and resubmitted, ends with counts
    identical to the uninterrupted run."""
    output = tmp_path / "run"
    # Other speed settings than the reference run: they must not change a single count.
    # One actor, one image per shard: a kill stops all progress until the actor is back.
    settings = base_settings(cifar_root, checkpoints, output, shard_size=1, batch_size=64, actors=1, max_restarts=1)
    config = write_config(tmp_path / "certify.yaml", **settings)
    client, job_id = submit(ray_cluster, config)
    deadline = time.monotonic() + 300

    def workers() -> list[str]:
        """Actor labels ("actor-K@host:PID/cpu") of the parts written so far."""
        return list(raw_rows(output).column("worker").to_pylist())

    def wait_for_part(seen: set[str]) -> str:
        """The label of a part from an actor process not in `seen`."""
        while True:
            fresh = set(workers()) - seen
            if fresh:
                return fresh.pop()
            assert time.monotonic() < deadline and client.get_job_status(job_id).name in ("PENDING", "RUNNING"), \
                client.get_job_logs(job_id)[-4000:]
            time.sleep(0.1)

    def kill(worker: str) -> None:
        os.kill(int(worker.split(":")[1].split("/")[0]), signal.SIGKILL)  # a process of our own test cluster

    first = wait_for_part(set())
    kill(first)  # Ray restarts the actor (max_restarts=1) and retries its calls
    restarted = wait_for_part({first})
    kill(restarted)  # restarts used up: the job's pool starts a replacement and resubmits the shards
    replacement = wait_for_part({first, restarted})
    assert first.split("@")[0] == restarted.split("@")[0] == replacement.split("@")[0] == "actor-0"
    assert "is gone for good" in client.get_job_logs(job_id)  # its shards go to the replacement
    client.stop_job(job_id)  # now kill the whole job mid-way
    assert wait_job(client, job_id).name == "STOPPED"
    partial = raw_rows(output).to_pandas()
    done = set(partial.image_id)
    assert 0 < len(done) < 20, f"the job was not stopped mid-way ({len(done)} images done)"
    assert not partial.duplicated(["image_id", "phase"]).any()
    assert (partial.groupby("image_id").phase.nunique() == 2).all()

    write_config(tmp_path / "certify.yaml", **{**settings, "batch_size": 400, "actors": 2, "shard_size": 3})
    client, job_id = submit(ray_cluster, config)
    status = wait_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status.name == "SUCCEEDED", logs[-5000:]
    assert f"{len(done)} already in" in logs and f"{20 - len(done)} to do" in logs
    final = raw_rows(output).to_pandas()
    assert len(final) == 40 and not final.duplicated(["image_id", "phase"]).any()
    assert counts_by_key(output) == counts_by_key(uninterrupted["output"])


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_and_keeps_votes(capsys, uninterrupted):
    """A finished submitted run rerun with other settings is refused in one line, and no vote part is
    rewritten."""
    output = uninterrupted["output"]
    before = {p: p.read_bytes() for p in VOTES.parts(output)}
    code, errors = run_cli(capsys, "--config", str(uninterrupted["config"]), "--seed", "4")
    assert code == 2 and len(errors) == 1 and "seed: run has 3, now 4" in errors[0]
    # A denoiser used at another sigma than it was trained for is refused before that.
    code, errors = run_cli(capsys, "--config", str(uninterrupted["config"]), "--sigma", "0.5")
    assert code == 2 and len(errors) == 1 and "trained for sigma=0.25 but the run uses sigma=0.5" in errors[0]
    # Finished: nothing to redo, and nothing lost or rewritten.
    assert run_cli(capsys, "--config", str(uninterrupted["config"]), "--batch", "8")[0] == 0
    assert {p: p.read_bytes() for p in VOTES.parts(output)} == before


@pytest.mark.slow
def test_unreadable_image_is_named_and_earlier_votes_stay(capsys, ray_cluster, cifar_root, checkpoints, tmp_path):
    """PREDICT on a folder (unlabelled) whose 4th image is garbage: clear error, images 0-2 written."""
    folder = tmp_path / "images"
    folder.mkdir(parents=True)
    sources = sorted((cifar_root / "test").glob("*/0000.jpg"))[:6]
    for index, source in enumerate(sources):
        (folder / f"{index:04d}.jpg").write_bytes(source.read_bytes())
    (folder / "0003.jpg").write_bytes(b"this is not a JPEG")
    output = tmp_path / "run"
    code, errors = run_cli(
        capsys, "--dataset", "folder", "--data-root", str(tmp_path / "images"), "--classifier",
        str(checkpoints["classifier"]), "--sigma", "0.25", "--mode", "predict", "--n", "30", "--actors", "1",
        "--shard-size", "1", "--output", str(output), "--address", ray_cluster["address"],
    )
    assert code == 2 and len(errors) == 1 and str(folder / "0003.jpg") in errors[0], errors
    votes = read_votes(output)
    assert sorted(votes.image_id) == [0, 1, 2] and set(votes.phase) == {"prediction"}
    assert all(sum(c) == 30 for c in votes.counts) and (votes.denoiser.isna()).all()
    assert all(predict_counts(np.asarray(c), 0.001) in (ABSTAIN, *range(10)) for c in votes.counts)


@pytest.mark.slow
def test_resume_from_another_working_directory(capsys, monkeypatch, ray_cluster, uninterrupted, cifar_root,
                                               checkpoints, tmp_path):
    """The run names its data by the root's base name and listing, not the path: a run started
    in one directory resumes in another that holds its own copy of the data (as `ray job
    submit --working-dir` unpacks a new copy for every job)."""
    import shutil

    first, second = tmp_path / "a" / "b", tmp_path / "c"
    for folder in (first, second):
        shutil.copytree(cifar_root, folder / "cifar")
    output = tmp_path / "run"
    common = ["--dataset", "cifar10", "--classifier", str(checkpoints["classifier"]),
              "--denoiser", str(checkpoints["denoiser"]), "--sigma", str(SIGMA), "--n0", str(N0), "--n", str(N),
              "--seed", "3", "--chunk-size", "64", "--actors", "1", "--output", str(output),
              "--address", ray_cluster["address"]]
    monkeypatch.chdir(first)
    assert cli_main(["certify", "--data-root", "cifar", "--max", "6", *common]) == 0
    monkeypatch.chdir(second)
    capsys.readouterr()
    assert cli_main(["certify", "--data-root", "cifar", *common]) == 0
    err = capsys.readouterr().err
    assert "6 already in" in err and "14 to do" in err
    assert counts_by_key(output) == counts_by_key(uninterrupted["output"])


@pytest.mark.slow
def test_object_storage_run_resumes_and_reduces(capsys, monkeypatch, ray_cluster, uninterrupted, cifar_root,
                                                checkpoints, tmp_path):
    """Data, checkpoints and votes on S3 (moto's server on 127.0.0.1): the run resumes there
    with the same counts as a local run, and `dsmooth reduce s3://...` reads it."""
    from pipeline.runs.fs import Location
    from s3_support import new_bucket

    bucket = new_bucket()
    monkeypatch.setenv("DSMOOTH_CACHE", str(tmp_path / "cache"))
    for path in sorted(cifar_root.rglob("*.jpg")):
        Location.of(f"s3://{bucket}/data/cifar/{path.relative_to(cifar_root).as_posix()}").write_bytes(path.read_bytes())
    for name, path in checkpoints.items():
        Location.of(f"s3://{bucket}/models/{path.name}").write_bytes(path.read_bytes())
    output = f"s3://{bucket}/runs/c10"
    common = ["--dataset", "cifar10", "--data-root", f"s3://{bucket}/data/cifar",
              "--classifier", f"s3://{bucket}/models/{checkpoints['classifier'].name}",
              "--denoiser", f"s3://{bucket}/models/{checkpoints['denoiser'].name}", "--sigma", str(SIGMA),
              "--n0", str(N0), "--n", str(N), "--seed", "3", "--chunk-size", "64", "--actors", "2",
              "--output", output, "--address", ray_cluster["address"]]
    monkeypatch.chdir(tmp_path)
    assert cli_main(["certify", "--max", "8", *common]) == 0
    capsys.readouterr()
    assert cli_main(["certify", *common]) == 0
    err = capsys.readouterr().err
    assert "8 already in" in err and "12 to do" in err
    assert not (tmp_path / "s3:").exists()
    assert counts_by_key(output) == counts_by_key(uninterrupted["output"])
    assert cli_main(["reduce", output, "--alpha", "0.001", "--format", "csv"]) == 0
    assert "c10" in capsys.readouterr().out


@pytest.mark.slow
def test_bad_images_can_be_skipped_and_are_listed(capsys, ray_cluster, cifar_root, checkpoints, tmp_path):
    """--on-bad-image skip: the unreadable file is named in the summary and run.json, the
    others are certified; the default (fail) stops with the file named."""
    from pipeline.runs.storage import read_run_record

    folder = tmp_path / "images"
    folder.mkdir()
    for index, source in enumerate(sorted((cifar_root / "test").glob("*/0000.jpg"))[:5]):
        (folder / f"{index:04d}.jpg").write_bytes(source.read_bytes())
    (folder / "0002.jpg").write_bytes(b"this is not a JPEG")
    output = tmp_path / "run"
    common = ["--dataset", "folder", "--data-root", str(folder), "--classifier", str(checkpoints["classifier"]),
              "--sigma", "0.25", "--mode", "predict", "--n", "20", "--actors", "1", "--output", str(output),
              "--address", ray_cluster["address"]]
    assert cli_main(["certify", *common, "--on-bad-image", "skip"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable image(s)" in captured.out and "0002.jpg" in captured.out
    assert "skipping 0002.jpg" in captured.err
    record = read_run_record(output)
    assert [s["name"] for s in record["skipped_images"]] == ["0002.jpg"]
    assert sorted(read_votes(output).image_id) == [0, 1, 3, 4]


@pytest.mark.slow
def test_bad_images_are_skipped_in_cifar_class_folders_and_archives(capsys, monkeypatch, ray_cluster, cifar_root,
                                                                    checkpoints, tmp_path):
    """--on-bad-image skip on the eagerly decoded cifar10 layouts: a corrupt JPEG in a class
    folder (the first image, which also sizes the models' check) and in a .tar.gz is skipped
    and listed, the others certified; the default stops on the class-folder one, naming it."""
    from pipeline.runs.storage import read_run_record

    tree = tmp_path / "tree"
    for name in ("airplane", "automobile"):  # ids 0, 1 (airplane), 2, 3 (automobile)
        (tree / "test" / name).mkdir(parents=True)
        for index, source in enumerate(sorted((cifar_root / "test" / name).glob("*.jpg"))[:2]):
            (tree / "test" / name / f"{index:04d}.jpg").write_bytes(source.read_bytes())
    intact = (tree / "test" / "airplane" / "0000.jpg").read_bytes()
    (tree / "test" / "airplane" / "0000.jpg").write_bytes(intact[: len(intact) // 3])  # truncated
    common = ["--dataset", "cifar10", "--classifier", str(checkpoints["classifier"]), "--sigma", "0.25",
              "--mode", "predict", "--n", "10", "--actors", "1", "--address", ray_cluster["address"]]

    def certify(root: Path, output: Path, *extra: str) -> tuple[int, str, str]:
        code = cli_main(["certify", *common, "--data-root", str(root), "--output", str(output), *extra])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = certify(tree, tmp_path / "stop")
    assert code == 2 and "airplane/0000.jpg" in err.splitlines()[-1], err[-2000:]

    code, out, err = certify(tree, tmp_path / "folders", "--on-bad-image", "skip")
    assert code == 0, err[-2000:]
    assert "skipped 1 unreadable image(s)" in out and "test/airplane/0000.jpg" in out
    assert [s["name"] for s in read_run_record(tmp_path / "folders")["skipped_images"]] == ["test/airplane/0000.jpg"]
    assert sorted(read_votes(tmp_path / "folders").image_id) == [1, 2, 3]

    (tree / "test" / "airplane" / "0000.jpg").write_bytes(intact)
    (tree / "test" / "automobile" / "0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    archive = tmp_path / "tiny-cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "test", arcname="test")
    monkeypatch.setenv("DSMOOTH_CACHE", str(tmp_path / "cache"))
    code, out, err = certify(archive, tmp_path / "archive", "--on-bad-image", "skip")
    assert code == 0, err[-2000:]
    assert "skipped 1 unreadable image(s)" in out and "test/automobile/0001.jpg" in out
    assert sorted(read_votes(tmp_path / "archive").image_id) == [0, 1, 2]


@pytest.mark.slow
def test_quiet_default_and_verbose_output(tmp_path, cifar_root, checkpoints):
    """Default output: dsmooth's own lines and the result, no Ray noise or colour codes;
    --quiet: the result only; --verbose: Ray's own lines too. And GPUs asked of a CPU-only
    local Ray fail at once with the reason, before any work."""
    common = ["certify", "--dataset", "cifar10", "--data-root", str(cifar_root), "--max", "2",
              "--classifier", str(checkpoints["classifier"]), "--sigma", "0.25", "--n0", "5", "--n", "20",
              "--actors", "1"]

    def dsmooth(*args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                              timeout=600, cwd=REPO, env=env)

    default = dsmooth(*common, "--output", str(tmp_path / "a"))
    assert default.returncode == 0, default.stderr[-3000:]
    assert "dsmooth: 2 images selected" in default.stderr and "dsmooth certify: 2 images in" in default.stdout
    noise = ("(pid=", "ModelActor pid", "INFO worker.py", "core_worker", "\x1b[")
    assert not [n for n in noise if n in default.stderr + default.stdout], default.stderr[-2000:]
    quiet = dsmooth(*common, "--output", str(tmp_path / "b"), "--quiet")
    assert quiet.returncode == 0 and "dsmooth:" not in quiet.stderr and "2 images in" in quiet.stdout
    verbose = dsmooth(*common, "--output", str(tmp_path / "c"), "--verbose")
    assert verbose.returncode == 0 and "Started a local Ray instance" in verbose.stderr
    gpus = dsmooth(*common, "--output", str(tmp_path / "d"), "--gpus-per-actor", "1")
    errors = [line for line in gpus.stderr.splitlines() if "error:" in line]
    assert gpus.returncode == 2 and len(errors) == 1, gpus.stderr[-2000:]
    assert "asked 1 actor(s) x 1 CPU + 1 GPU" in errors[0] and "0 GPU in total" in errors[0]


@pytest.mark.slow
def test_a_paused_certify_on_s3_stops_in_one_line_after_losing_its_lease(tmp_path, cifar_root, checkpoints):
    """Issue 21's reproduction: `kill -STOP` a certify on s3:// past its lease, let another job
    take the run, `kill -CONT` it: no part is written after the takeover and the job ends with
    one error line (exit 2), no traceback."""
    from pipeline.runs.lock import exclusive_run
    from s3_support import new_bucket

    output = f"s3://{new_bucket()}/runs/paused"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"DSMOOTH_LEASE_S": "3"}
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "certify", "--dataset", "cifar10", "--data-root", str(cifar_root),
         "--classifier", str(checkpoints["classifier"]), "--denoiser", str(checkpoints["denoiser"]),
         "--sigma", str(SIGMA), "--n0", "20", "--n", "1000", "--shard-size", "1", "--actors", "1",
         "--output", output],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 400
        while not VOTES.parts(output) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.poll() is None and VOTES.parts(output), "no part was written while the job ran"
        job.send_signal(signal.SIGSTOP)  # just after a part: waiting for the next one
        time.sleep(5.0)  # past its 3 s lease
        with exclusive_run(output, "intruder", lease_s=120):
            parts = set(VOTES.parts(output))
            job.send_signal(signal.SIGCONT)
            job.wait(timeout=300)
            assert set(VOTES.parts(output)) == parts
    finally:
        job.kill()
        _, stderr = job.communicate(timeout=60)
    errors = [line for line in stderr.splitlines() if line.startswith("dsmooth certify: error:")]
    assert job.returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "another job took over this run's lease" in errors[0] and output in errors[0]


@pytest.mark.slow
def test_ctrl_c_keeps_what_the_progress_counted(tmp_path, cifar_root, checkpoints):
    """Issue 22 item 2: SIGINT in the middle of the second shard, when images of it have
    finished in flight but are not saved. The progress's last count is the number of images
    whose votes are saved, and the one-line message says that number (exit 130)."""
    import threading

    output = tmp_path / "interrupted"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "certify", "--dataset", "cifar10", "--data-root", str(cifar_root),
         "--classifier", str(checkpoints["classifier"]), "--denoiser", str(checkpoints["denoiser"]),
         "--sigma", str(SIGMA), "--n0", "20", "--n", "600", "--shard-size", "10", "--actors", "1",
         "--output", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in job.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 400
        while not VOTES.parts(str(output)) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        first_part = time.monotonic()
        assert job.poll() is None and VOTES.parts(str(output)), "no part was written while the job ran"
        started = next(t for t, line in list(lines) if "shards of" in line)
        time.sleep(0.6 * (first_part - started))  # about half the next shard's images finished, unsaved
        job.send_signal(signal.SIGINT)
        job.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        job.kill()
    stderr = "".join(line for _, line in lines)
    saved = read_votes(str(output)).groupby("image_id")["phase"].nunique()
    saved = int((saved == 2).sum())
    assert job.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    counted = [int(m) for m in re.findall(r"certify: (\d+)/20 images", stderr)]
    assert counted and counted[-1] == saved, stderr[-3000:]
    assert f"interrupted: {saved} of 20 images finished and saved" in stderr, stderr[-3000:]
