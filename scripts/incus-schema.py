#!/usr/bin/env python3
"""Extracts what Kennel's Incus tests check a VM's configuration against:
the fields of `InstancesPost` and `InstanceSource` (doc/rest-api.yaml) and
every instance key and device option with its type, whether it is
required and which instance type it is for
(internal/server/metadata/configuration.json), from an Incus checkout.

    scripts/incus-schema.py /path/to/incus v6.0.6 > provisioner/tests/fixtures/incus-schema.json

Both files are Incus's (Apache-2.0); only names, types and conditions are
kept."""
import json
import subprocess
import sys

import yaml

repo, tag = sys.argv[1], sys.argv[2]


def show(path):
    return subprocess.run(
        ["git", "-C", repo, "show", f"{tag}:{path}"],
        check=True, capture_output=True, text=True,
    ).stdout


api = yaml.safe_load(show("doc/rest-api.yaml"))["definitions"]


def fields(name):
    out = {}
    for field, spec in api[name]["properties"].items():
        if "$ref" in spec:
            ref = api[spec["$ref"].rsplit("/", 1)[-1]]
            out[field] = ref.get("type", "object")
        else:
            out[field] = spec.get("type", "string")
    return out


meta = json.loads(show("internal/server/metadata/configuration.json"))["configs"]


def keys(groups):
    out = {}
    for group in groups.values():
        for entry in group["keys"]:
            for key, spec in entry.items():
                out[key] = {
                    "type": spec.get("type", "string"),
                    "required": spec.get("required", "no") == "yes",
                    "condition": spec.get("condition", ""),
                }
    return out


print(json.dumps({
    "source": f"Incus {tag}: doc/rest-api.yaml, internal/server/metadata/configuration.json (Apache-2.0)",
    "instances_post": fields("InstancesPost"),
    "instance_source": fields("InstanceSource"),
    "instance_keys": keys(meta["instance"]),
    "devices": {kind: keys({"all": spec}) for kind, spec in meta["devices"].items()},
}, indent=1, sort_keys=True))
