"""Classifiers people already have, certified end to end on unlabelled 224 px images laid out
like the paper's 100 ImageNet validation images (`api_support.IMAGES`): the CLI (fixed n
and --sequential, with and without a denoiser), `reduce` with its table and figure, the
Python API with every form, bad input in one line before Ray, and (slow) a multi-node
`ray.cluster_utils.Cluster`. Stand-ins are tiny and built at test time; no network."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import dsmooth
from api_support import IMAGES as IMAGENET_100
from cifar_support import two_per_class
from classifier_support import FACTORY_MODULE, factory_module, hf_folder, timm_files, timm_net
from jobs.cli import main as cli_main
from pipeline.certify.clean_labels import LABELS_FROM_CLASSIFIER
from pipeline.data import open_dataset
from pipeline.models import ModelMeta, build_model, file_sha256, save_checkpoint
from ray_support import forbid_ray_start

IDS = [0, 3]  # an RGB and a grayscale PNG
SIGMA = 0.25


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    files = timm_files(folder / "timm", num_classes=1000)
    torch.manual_seed(0)
    denoiser = build_model("dncnn", depth=3, n_channels=8).eval()
    save_checkpoint(folder / "dncnn.pt", denoiser, ModelMeta("dncnn", dataset="imagenet", sigma=SIGMA,
                                                            arch_kwargs={"depth": 3, "n_channels": 8}))
    files["denoiser"] = folder / "dncnn.pt"
    files["hf"] = hf_folder(folder / "hf", num_labels=1000, image_size=32)
    files["factories"] = factory_module(folder / "factories")
    return files


def votes(run: Path):
    return pq.read_table(run / "votes").to_pandas()


def certify_cli(*argv: str) -> int:
    return cli_main(["certify", "--dataset", "folder", "--data-root", str(IMAGENET_100),
                     "--ids", *map(str, IDS), "--sigma", str(SIGMA), "--actors", "1", "--batch", "32", *argv])


def clean_predictions(classifier, **spec) -> list[int]:
    """f alone on the clean images, through the public API: the labels unlabelled data gets."""
    model = dsmooth.load_model(classifier, dataset="imagenet", **spec)
    data = open_dataset("folder", IMAGENET_100, "test")
    with torch.inference_mode():
        return [int(model(data.load(i)[None]).argmax()) for i in IDS]


def test_cli_timm_with_denoiser_fixed_then_reduce(models, tmp_path, capsys, ray_local):
    run = tmp_path / "run"
    assert certify_cli("--classifier", "timm:test_resnet", "--classifier-weights", str(models["safetensors"]),
                       "--denoiser", str(models["denoiser"]), "--n0", "4", "--n", "16", "--output", str(run)) == 0
    record = json.loads((run / "run.json").read_text())
    pipeline = record["identity"]["classifier_pipeline"]
    assert pipeline["kind"] == "timm" and pipeline["weights_sha256"] == file_sha256(models["safetensors"])
    assert pipeline["preprocessing"]["crop"] == 160 and record["identity"]["num_classes"] == 1000
    assert record["extra"]["labels_from"] == LABELS_FROM_CLASSIFIER
    rows = votes(run)
    assert sorted(set(rows.image_id)) == IDS and all(len(c) == 1000 for c in rows.counts)
    # Unlabelled: each label is the classifier's own clean prediction (no denoiser), not -1.
    labels = rows.drop_duplicates("image_id").sort_values("image_id").label.tolist()
    assert labels == clean_predictions("timm:test_resnet", classifier_weights=models["safetensors"])
    capsys.readouterr()
    plot = tmp_path / "curve.png"
    assert cli_main(["reduce", str(run), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "no labels in the data" in table and LABELS_FROM_CLASSIFIER in table
    assert plot.is_file() and plot.stat().st_size > 1000


def test_cli_hf_folder_sequential(models, tmp_path, capsys, ray_local):
    run = tmp_path / "seq"
    assert certify_cli("--classifier", str(models["hf"]), "--sequential", "--n0", "16", "--n", "64",
                       "--chunk-size", "16", "--output", str(run)) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["identity"]["classifier_pipeline"]["kind"] == "hf"
    assert record["identity"]["classifier"] == "hf:ViTForImageClassification"
    assert record["extra"]["labels_from"] == LABELS_FROM_CLASSIFIER
    labels = votes(run).drop_duplicates("image_id").sort_values("image_id").label.tolist()
    assert labels == clean_predictions(str(models["hf"]))
    reduced = dsmooth.reduce([run], alpha=0.001)
    assert sorted(reduced.certificates.image_id) == IDS and reduced.inputs[0].labels_from == LABELS_FROM_CLASSIFIER


@pytest.mark.parametrize("where", [pytest.param("ray", marks=pytest.mark.slow), "in-process"])
def test_python_api_every_form(models, tmp_path, monkeypatch, request, where):
    """dsmooth.certify with an nn.Module object, a factory, a .pt2 and a TorchScript archive;
    the object and the .pt2 of one network, given the same preprocessing, give the same votes
    for the same seed. On Ray (slow tier) the object is shipped to the actors and the factory
    imported on the workers; in this process (fast tier) the same four runs without Ray."""
    from test_classifier_sources import timm_flags

    monkeypatch.setenv("PYTHONPATH", f"{models['factories']}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(models["factories"]))
    flags = {f"classifier_{k}": v for k, v in timm_flags().items()}
    flags["classifier_mean"], flags["classifier_std"] = list(flags["classifier_mean"]), list(flags["classifier_std"])
    common = dict(dataset="folder", data_root=str(IMAGENET_100), ids=IDS, sigma=SIGMA, n0=4, n=16, seed=3,
                  actors=1, batch_size=32, in_process=where == "in-process")
    forms = {
        "object": dict(classifier=timm_net(1000), **flags),
        "factory": dict(classifier=f"{FACTORY_MODULE}:timm_net", classifier_weights=str(models["safetensors"]),
                        **flags),
        "pt2": dict(classifier=str(models["pt2"]), **flags),
        "torchscript": dict(classifier=str(models["torchscript"]), **flags),
    }
    if where == "ray":  # a Ray of its own: its workers must see PYTHONPATH, set above, to import the factory
        import ray

        request.getfixturevalue("own_ray")
        ray.init(num_cpus=2, log_to_driver=False)
    try:
        results = {name: dsmooth.certify(**common, **spec, output=str(tmp_path / name)) for name, spec in forms.items()}
    finally:
        sys.modules.pop(FACTORY_MODULE, None)
    counts = {}
    for name, certificates in results.items():
        assert sorted(certificates.image_id) == IDS, name
        record = json.loads((tmp_path / name / "run.json").read_text())
        assert record["identity"]["classifier_pipeline"]["kind"] == {"object": "module", "pt2": "export"}.get(name, name)
        if name in ("pt2", "torchscript"):  # the identity names the content; run.json keeps the path for humans
            assert record["extra"]["classifier_source"] == str(models[name]), record["extra"]
            assert record["identity"]["classifier"].startswith(f"{record['identity']['classifier_pipeline']['kind']}:")
        counts[name] = np.stack(votes(tmp_path / name).sort_values(["image_id", "phase"]).counts.to_list())
    assert np.array_equal(counts["object"], counts["factory"])
    for name in ("pt2", "torchscript"):
        agreement = np.minimum(counts[name], counts["object"]).sum() / counts["object"].sum()
        assert agreement >= 0.99, (name, agreement)


def test_bad_input_is_one_line_before_ray(models, tmp_path, capsys):
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "config.json").write_text("{}")
    cases = [
        (["--classifier", str(tmp_path / "missing.pt2")], "classifier not found"),
        (["--classifier", str(neither)], "neither a timm folder"),
        (["--classifier", "no_such_pkg_x.mod:make"], "cannot import no_such_pkg_x.mod"),
        (["--classifier", "timm:test_resnet"], "needs its weights"),
        (["--classifier", str(models["pt2"]), "--classifier-mean", "0.5"], "mean and std together"),
    ]
    for argv, message in cases:
        with forbid_ray_start():
            code = certify_cli(*argv, "--n0", "2", "--n", "4", "--output", str(tmp_path / "out"))
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert code == 2 and len(errors) == 1 and message in errors[0], (argv, errors)
    assert not (tmp_path / "out").exists()


def test_class_count_mismatch_is_one_line(models, tmp_path, capsys):
    cifar = two_per_class(tmp_path / "cifar")
    code = cli_main(["certify", "--dataset", "cifar10", "--data-root", str(cifar), "--classifier", "timm:test_resnet",
                     "--classifier-weights", str(models["safetensors"]), "--sigma", "0.25", "--output", str(tmp_path / "o")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "1000 classes but the data is cifar10" in errors[0], errors


@pytest.mark.slow
def test_multi_node_cluster_certifies_an_archive(models, tmp_path, own_ray):
    """Two worker nodes of a `ray.cluster_utils.Cluster` (the head has no CPU): the archive
    travels as bytes in the blob store (no model code on the workers) and worker-node actors
    load it and count every vote.

    Which actor counts which shard is the pool's choice (a node ready first may take them all,
    and under load the other actor may not even be placed before the run ends), so the test asks
    Ray's state API where the counting actors ran and how every actor ended."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        certificates = dsmooth.certify(
            dataset="folder", data_root=str(IMAGENET_100), ids=[0, 3, 11, 74], sigma=SIGMA, n0=4, n=16, seed=3,
            classifier=str(models["pt2"]), classifier_input_size=160, classifier_mean=[0.5] * 3,
            classifier_std=[0.5] * 3, actors=2, shard_size=1, batch_size=32, address=cluster.address,
            output=str(tmp_path / "cluster"))
        assert sorted(certificates.image_id) == [0, 3, 11, 74]
        if not ray.is_initialized():
            ray.init(address=cluster.address)
        actors = list_actors(filters=[("class_name", "=", "ModelActor")], detail=True)
        for actor in actors:  # none failed to load the archive, none restarted
            assert actor.num_restarts == 0 and "creation_task_failure" not in str(actor.death_cause), actor
        counted_by = {int(worker.split(":")[1].split("/")[0]) for worker in votes(tmp_path / "cluster").worker}
        worker_nodes = {node.node_id for node in workers}
        assert counted_by and counted_by <= {actor.pid for actor in actors if actor.node_id in worker_nodes}, (
            counted_by, actors)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_diffusion_beit_recipe(models, tmp_path, ray_local):
    """examples/certify_imagenet_diffusion_beit.yaml as shipped, with tiny random stand-ins in
    its formats: a guided-diffusion checkpoint (+ its flags .yaml) as the denoiser and a timm
    folder as the classifier, on ImageNet images; only paths and sizes are overridden."""
    import yaml

    from pipeline.models.diffusion.convert import guided_unet_kwargs
    from pipeline.models.diffusion.guided_unet import GuidedUNet

    recipe = Path(__file__).resolve().parents[1] / "examples" / "certify_imagenet_diffusion_beit.yaml"
    config = yaml.safe_load(recipe.read_text())
    assert config["classifier"].endswith("beit_large_patch16_512") and config["denoiser"].endswith(
        "256x256_diffusion_uncond.pt")
    flags = {"image_size": 64, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
             "attention_resolutions": "16", "num_heads": 2, "learn_sigma": True, "diffusion_steps": 1000,
             "noise_schedule": "linear", "rescale_timesteps": False}
    torch.manual_seed(0)
    unet = GuidedUNet(**guided_unet_kwargs(flags)).eval()
    torch.save({k: torch.randn_like(v) * 0.02 for k, v in unet.state_dict().items()}, tmp_path / "guided.pt")
    (tmp_path / "guided.yaml").write_text(yaml.safe_dump(flags))
    certificates = dsmooth.certify(
        recipe, dataset="folder", data_root=str(IMAGENET_100), split="test", skip=1, ids=[0], image_size=64,
        denoiser=str(tmp_path / "guided.pt"), classifier=str(models["folder"]), n0=2, n=4, batch_size=8,
        actors=1, output=str(tmp_path / "recipe"))
    assert list(certificates.image_id) == [0]
    identity = json.loads((tmp_path / "recipe" / "run.json").read_text())["identity"]
    assert identity["denoiser"] == "guided_unet" and identity["classifier_pipeline"]["kind"] == "timm"
    assert identity["sigma"] == config["sigma"] and identity["n0"] == 2


def test_cli_registry_name_with_weights(tmp_path, ray_local):
    """`NAME --classifier-weights FILE` (a raw state dict of a registry architecture): the
    name travels to the actors, which rebuild the same network (the identity is the file's)."""
    from pipeline.models import build_model as build

    torch.manual_seed(0)
    net = build("cifar_resnet20", num_classes=10).net.eval()
    torch.save(net.state_dict(), tmp_path / "resnet20.pth")
    run = tmp_path / "named"
    assert certify_cli("--classifier", "cifar_resnet20", "--classifier-weights", str(tmp_path / "resnet20.pth"),
                       "--allow-foreign-classifier", "--n0", "2", "--n", "4", "--output", str(run)) == 0
    identity = json.loads((run / "run.json").read_text())["identity"]
    assert identity["classifier"] == "cifar_resnet20" and "classifier_pipeline" not in identity
    assert identity["classifier_sha256"] == file_sha256(tmp_path / "resnet20.pth")
    assert sorted(set(votes(run).image_id)) == IDS
