"""cluster.yaml: valid for Ray's cluster launcher, and sized for the certification job."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TORCH_PIN = '"torch===2.13.0" "torchvision==0.28.0"'


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_matches_the_schema_ray_ships(cluster):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_t4"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)  # the check has teeth


def test_ray_own_validation_accepts_it(cluster):
    """What `ray up` does before touching AWS: fill in the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["max_workers"] >= sum(t.get("min_workers", 0) for t in prepared["available_node_types"].values())


def test_cpu_head_and_autoscaling_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0  # no actor on the head
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers.values())
    assert all(t.get("min_workers", 0) == 0 < t["max_workers"] for t in workers.values())  # scale from zero
    assert all(t["node_config"]["InstanceType"].split(".")[0] in {"g4dn", "g5", "g6", "p3", "p4d"} for t in workers.values())
    assert cluster["provider"]["type"] == "aws"


def test_every_node_installs_the_project_with_the_readme_pin(cluster):
    readme = (REPO / "README.md").read_text()
    assert TORCH_PIN in readme
    install = [c for c in cluster["setup_commands"] if "pip install" in c and " -e " in c]
    assert len(install) == 1 and TORCH_PIN in install[0]
    # The project is what the setup installs: it is mounted where the command cds to.
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    assert f"cd {mount} " in install[0]
    import ray

    assert f'"ray[default,train,tune]=={ray.__version__}"' in install[0]  # nodes run the local Ray version
