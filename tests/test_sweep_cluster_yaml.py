"""cluster.yaml is a valid Ray cluster-launcher config (checked against Ray's own schema)."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def schema():
    return json.loads(SCHEMA.read_text())


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_ray_schema(schema, cluster):
    jsonschema.validate(cluster, schema)


def test_schema_check_is_not_vacuous(schema, cluster):
    bad = dict(cluster, provider=dict(cluster["provider"]), head_node_typo="head")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_cluster_shape(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0                 # CPU head
    gpu = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert gpu and all(t["resources"]["GPU"] >= 1 for t in gpu)  # GPU workers
    assert all(t["min_workers"] < t["max_workers"] for t in gpu)  # autoscaling
    setup = "\n".join(cluster["setup_commands"])
    assert 'torch==2.13.0" --index-url https://download.pytorch.org/whl/cu' in setup
    assert "-e \"/home/ubuntu/sae-sweep\"" in setup                # installs this project
