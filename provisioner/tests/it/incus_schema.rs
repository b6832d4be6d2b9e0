//! What Kennel asks Incus for, checked as data against Incus's own API
//! description (tests/fixtures/incus-schema.json, extracted from Incus
//! 6.0.6 by scripts/incus-schema.py): every field of the create request,
//! every instance key and every device option Kennel sends exists, has a
//! value of its type, is meant for that instance type (containers or
//! VMs), and no required option is missing. The VM configuration matters
//! most here: only a KVM host can boot one, so this is what checks it
//! on a host like this one.

use std::collections::BTreeMap;

use kennel_provisioner::incus::api::InstanceType;
use kennel_provisioner::incus::spec::{self, Placement, ProjectInstance, Workspace};
use serde_json::Value;

fn schema() -> Value {
    serde_json::from_str(include_str!("../fixtures/incus-schema.json")).unwrap()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Number(_) => "integer",
        Value::Null => "null",
    }
}

/// Whether `key` matches `pattern` (`user.*`, `volatile.<name>.hwaddr`).
fn matches(pattern: &str, key: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('*') {
        return key.starts_with(prefix);
    }
    let (p, k): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), key.split('.').collect());
    p.len() == k.len()
        && p.iter()
            .zip(&k)
            .all(|(p, k)| p == k || (p.starts_with('<') && p.ends_with('>')))
}

/// The option's entry in `keys`, exact or by pattern.
fn find<'a>(keys: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    keys.get(key).or_else(|| {
        keys.iter()
            .find(|(p, _)| (p.contains('*') || p.contains('<')) && matches(p, key))
            .map(|(_, v)| v)
    })
}

/// What is wrong with `value` for an option described by `spec`.
fn value_problem(spec: &Value, value: &str, vm: bool) -> Option<String> {
    let ok = match spec["type"].as_str().unwrap_or("string") {
        "bool" => matches!(value, "true" | "false"),
        "int" | "integer" => value.parse::<i64>().is_ok(),
        _ => true,
    };
    if !ok {
        return Some(format!("{value:?} is not a {}", spec["type"]));
    }
    match spec["condition"].as_str().unwrap_or("") {
        "container" if vm => Some("is for containers only".into()),
        "virtual machine" if !vm => Some("is for VMs only".into()),
        _ => None,
    }
}

/// Everything in `post` the schema does not describe.
fn problems(post: &Value, vm: bool) -> Vec<String> {
    let s = schema();
    let mut out = Vec::new();
    for (field, v) in post.as_object().unwrap() {
        match s["instances_post"][field].as_str() {
            None => out.push(format!("field {field} is not in InstancesPost")),
            Some(t) if t != json_type(v) => {
                out.push(format!("field {field} is a {} not a {t}", json_type(v)))
            }
            _ => {}
        }
    }
    for (field, v) in post["source"].as_object().unwrap() {
        if s["instance_source"][field].as_str() != Some(json_type(v)) {
            out.push(format!(
                "source.{field} is not an InstanceSource {}",
                json_type(v)
            ));
        }
    }
    let keys = s["instance_keys"].as_object().unwrap();
    for (key, v) in post["config"].as_object().unwrap() {
        match find(keys, key) {
            None => out.push(format!("config {key} is not an instance key")),
            Some(spec) => {
                if let Some(p) = value_problem(spec, v.as_str().unwrap(), vm) {
                    out.push(format!("config {key}: {p}"));
                }
            }
        }
    }
    for (name, dev) in post["devices"].as_object().unwrap() {
        let kind = match dev["type"].as_str().unwrap() {
            "nic" => "nic_bridged",
            other => other,
        };
        let Some(options) = s["devices"][kind].as_object() else {
            out.push(format!("device {name}: no device type {kind}"));
            continue;
        };
        for (key, v) in dev.as_object().unwrap() {
            if key == "type" {
                continue;
            }
            match find(options, key) {
                None => out.push(format!("device {name}: {key} is not a {kind} option")),
                Some(spec) => {
                    if let Some(p) = value_problem(spec, v.as_str().unwrap(), vm) {
                        out.push(format!("device {name}: {key}: {p}"));
                    }
                }
            }
        }
        // A root disk (path /) is the one disk without a source.
        let root = kind == "disk" && dev["path"] == "/";
        for (key, spec) in options {
            if spec["required"] == true && dev.get(key).is_none() && !(root && key == "source") {
                out.push(format!("device {name}: required {key} missing"));
            }
        }
    }
    out
}

fn project(workspace: Workspace, guest_ip: Option<&str>) -> ProjectInstance {
    ProjectInstance {
        name: "myapp".into(),
        image: "a".repeat(64),
        vcpus: 2,
        memory_mib: 2048,
        disk_gib: 20,
        workspace,
        listen: "10.20.0.11".parse().unwrap(),
        ssh_port: 40022,
        app_port: 40080,
        guest_app_port: 8000,
        guest_ip: guest_ip.map(|ip| ip.parse().unwrap()),
        labels: BTreeMap::from([
            ("stack".into(), "rust".into()),
            ("ssh_port".into(), "40022".into()),
        ]),
    }
}

fn post(kind: InstanceType, p: &ProjectInstance) -> Value {
    let place = Placement {
        instance_type: kind,
        storage_pool: "default".into(),
        network: "kennelbr0".into(),
    };
    serde_json::to_value(spec::instance_post(&place, p)).unwrap()
}

#[test]
fn the_vm_kennel_asks_for_is_one_incus_describes() {
    let vm = post(
        InstanceType::VirtualMachine,
        &project(Workspace::Volume("myapp-src".into()), Some("10.20.0.50")),
    );
    assert_eq!(vm["type"], "virtual-machine");
    let found = problems(&vm, true);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_container_kennel_asks_for_is_one_incus_describes() {
    // Its source shared from the host, in a volume, or (made first, a
    // volume attached once placed) none yet.
    for ws in [
        Workspace::HostPath("/srv/kennel/projects/myapp".into()),
        Workspace::Volume("kennel-src-myapp".into()),
        Workspace::Later,
    ] {
        let ct = post(InstanceType::Container, &project(ws.clone(), None));
        let found = problems(&ct, false);
        assert!(found.is_empty(), "{ws:?}: {found:#?}");
    }
}

#[test]
fn the_check_catches_what_incus_would_refuse() {
    let mut vm = post(
        InstanceType::VirtualMachine,
        &project(Workspace::Volume("myapp-src".into()), Some("10.20.0.50")),
    );
    vm["config"]["limits.cpus"] = "2".into();
    vm["config"]["security.nesting"] = "true".into();
    vm["config"]["security.secureboot"] = "no".into();
    vm["devices"]["kennel-ssh"]["nat"] = "yes".into();
    vm["devices"]["kennel-app"]
        .as_object_mut()
        .unwrap()
        .remove("connect");
    vm["devices"]["workspace"]["mountpoint"] = "/workspace".into();
    vm["restore_from"] = "snap0".into();
    let found = problems(&vm, true).join("\n");
    for expected in [
        "config limits.cpus is not an instance key",
        "config security.nesting: is for containers only",
        "config security.secureboot: \"no\" is not a \"bool\"",
        "device kennel-ssh: nat: \"yes\" is not a \"bool\"",
        "device kennel-app: required connect missing",
        "device workspace: mountpoint is not a disk option",
        "field restore_from is not in InstancesPost",
    ] {
        assert!(found.contains(expected), "{expected}\n in\n{found}");
    }
}
