//! A Cloud Hypervisor API double: a server on a Unix socket that
//! implements CH v54's VM state machine and checks request bodies against
//! the OpenAPI description's required fields and types.
//!
//! Behaviour measured on a real CH v54 that it reproduces:
//! - 204 with no body on success; `vm.info` and `vmm.ping` 200 with JSON;
//!   `vmm.shutdown` 200 with an empty body (and the server then stops);
//! - errors are a JSON array of strings, outermost first; 404 when no VM
//!   is created, 400 for a bad config, 500 for bad state transitions;
//! - virtio-fs without `memory.shared = true` fails at `vm.boot`;
//! - a virtio-fs socket that does not exist makes `vm.boot` block the whole
//!   API (the double holds its lock for `trap_delay`) and then fail; the
//!   double records that the trap was hit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::Mutex;

/// One request the double received.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub endpoint: String,
    pub body: Option<Value>,
}

/// The VM's state, as CH names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    NotCreated,
    Created,
    Running,
    Paused,
    Shutdown,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::NotCreated => "NotCreated",
            State::Created => "Created",
            State::Running => "Running",
            State::Paused => "Paused",
            State::Shutdown => "Shutdown",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: State,
    config: Option<Value>,
    requests: Vec<Recorded>,
    trapped: bool,
    snapshots: Vec<String>,
    /// Disk sizes `vm.resize-disk` set, by disk id.
    disk_sizes: std::collections::HashMap<String, i64>,
}

/// A running double.
#[derive(Debug, Clone)]
pub struct ChDouble {
    pub socket: PathBuf,
    inner: Arc<Mutex<Inner>>,
    /// Set once the VMM "exits": the listener and every connection close.
    stop: Arc<tokio::sync::watch::Sender<bool>>,
    /// How long `vm.boot` blocks when the virtio-fs socket is missing.
    pub trap_delay: Duration,
}

type Answer = (StatusCode, Option<Value>);

fn err(status: StatusCode, msgs: &[&str]) -> Answer {
    (status, Some(json!(msgs)))
}

fn ok() -> Answer {
    (StatusCode::NO_CONTENT, None)
}

const TOP_LEVEL: &[&str] = &[
    "cpus",
    "memory",
    "payload",
    "rate_limit_groups",
    "disks",
    "net",
    "rng",
    "balloon",
    "fs",
    "generic_vhost_user",
    "pmem",
    "serial",
    "console",
    "debug_console",
    "devices",
    "user_devices",
    "vdpa",
    "vsock",
    "numa",
    "iommu",
    "watchdog",
    "rtc",
    "pvpanic",
    "pci_segments",
    "platform",
    "tpm",
    "landlock_enable",
    "landlock_rules",
];
const CONSOLE_MODES: &[&str] = &["Off", "Pty", "Tty", "File", "Socket", "Null"];
const IMAGE_TYPES: &[&str] = &["FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"];

fn is_int(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

/// Checks a field's type if present.
fn typed(
    obj: &serde_json::Map<String, Value>,
    key: &str,
    kind: &str,
    ctx: &str,
) -> Result<(), String> {
    let Some(v) = obj.get(key) else { return Ok(()) };
    let good = match kind {
        "string" => v.is_string(),
        "bool" => v.is_boolean(),
        "int" => is_int(v),
        "object" => v.is_object(),
        "array" => v.is_array(),
        _ => false,
    };
    if good {
        Ok(())
    } else {
        Err(format!("{ctx}.{key} must be a {kind}"))
    }
}

fn required(obj: &serde_json::Map<String, Value>, keys: &[&str], ctx: &str) -> Result<(), String> {
    for k in keys {
        if !obj.contains_key(*k) {
            return Err(format!("{ctx}: missing required field `{k}`"));
        }
    }
    Ok(())
}

fn object<'a>(v: &'a Value, ctx: &str) -> Result<&'a serde_json::Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{ctx} must be an object"))
}

/// Validates a `VmConfig` against the spec's required fields and types.
pub fn validate_vm_config(v: &Value) -> Result<(), String> {
    let top = object(v, "VmConfig")?;
    for k in top.keys() {
        if !TOP_LEVEL.contains(&k.as_str()) {
            return Err(format!("VmConfig: unknown field `{k}`"));
        }
    }
    required(top, &["payload"], "VmConfig")?;
    let payload = object(&top["payload"], "payload")?;
    for k in [
        "firmware",
        "kernel",
        "cmdline",
        "initramfs",
        "igvm",
        "host_data",
    ] {
        typed(payload, k, "string", "payload")?;
    }
    if let Some(c) = top.get("cpus") {
        let c = object(c, "cpus")?;
        required(c, &["boot_vcpus", "max_vcpus"], "cpus")?;
        let b = c["boot_vcpus"]
            .as_i64()
            .ok_or("cpus.boot_vcpus must be an integer")?;
        let m = c["max_vcpus"]
            .as_i64()
            .ok_or("cpus.max_vcpus must be an integer")?;
        if b < 1 || m < 1 || b > m {
            return Err("cpus: need 1 <= boot_vcpus <= max_vcpus".into());
        }
    }
    if let Some(m) = top.get("memory") {
        let m = object(m, "memory")?;
        required(m, &["size"], "memory")?;
        typed(m, "size", "int", "memory")?;
        for k in ["shared", "hugepages", "mergeable", "prefault", "thp"] {
            typed(m, k, "bool", "memory")?;
        }
    }
    for (key, req, strings, bools, ints) in [
        (
            "disks",
            &[][..],
            &["path", "vhost_socket", "id", "serial"][..],
            &[
                "readonly",
                "direct",
                "backing_files",
                "sparse",
                "vhost_user",
            ][..],
            &["num_queues", "queue_size"][..],
        ),
        (
            "net",
            &[][..],
            &["tap", "ip", "mask", "mac", "host_mac", "id", "vhost_socket"][..],
            &["vhost_user", "offload_tso"][..],
            &["mtu", "num_queues", "queue_size"][..],
        ),
        (
            "fs",
            &["num_queues", "queue_size", "socket", "tag"][..],
            &["tag", "socket", "id"][..],
            &[][..],
            &["num_queues", "queue_size"][..],
        ),
    ] {
        let Some(list) = top.get(key) else { continue };
        let list = list
            .as_array()
            .ok_or_else(|| format!("{key} must be an array"))?;
        for (i, item) in list.iter().enumerate() {
            let ctx = format!("{key}[{i}]");
            let o = object(item, &ctx)?;
            required(o, req, &ctx)?;
            for s in strings {
                typed(o, s, "string", &ctx)?;
            }
            for b in bools {
                typed(o, b, "bool", &ctx)?;
            }
            for n in ints {
                typed(o, n, "int", &ctx)?;
            }
            if let Some(t) = o.get("image_type") {
                if !t.as_str().is_some_and(|t| IMAGE_TYPES.contains(&t)) {
                    return Err(format!("{ctx}.image_type must be one of {IMAGE_TYPES:?}"));
                }
            }
        }
    }
    if let Some(r) = top.get("rng") {
        let r = object(r, "rng")?;
        required(r, &["src"], "rng")?;
        typed(r, "src", "string", "rng")?;
    }
    for key in ["serial", "console"] {
        if let Some(c) = top.get(key) {
            let c = object(c, key)?;
            required(c, &["mode"], key)?;
            if !c["mode"]
                .as_str()
                .is_some_and(|m| CONSOLE_MODES.contains(&m))
            {
                return Err(format!("{key}.mode must be one of {CONSOLE_MODES:?}"));
            }
            typed(c, "file", "string", key)?;
            typed(c, "socket", "string", key)?;
        }
    }
    if let Some(vs) = top.get("vsock") {
        let vs = object(vs, "vsock (one object, not a list)")?;
        required(vs, &["cid", "socket"], "vsock")?;
        if vs["cid"].as_i64().is_none_or(|c| c < 3) {
            return Err("vsock.cid must be an integer >= 3".into());
        }
        typed(vs, "socket", "string", "vsock")?;
    }
    Ok(())
}

impl ChDouble {
    /// Serves the double on `socket` until [`ChDouble::stop`] or `vmm.shutdown`,
    /// with the real VMM's 60 s virtio-fs trap.
    pub async fn start(socket: &Path) -> std::io::Result<Self> {
        Self::start_with_trap(socket, Duration::from_secs(60)).await
    }

    /// Like [`ChDouble::start`], with a shorter trap for tests.
    pub async fn start_with_trap(socket: &Path, trap_delay: Duration) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let me = Self {
            socket: socket.to_owned(),
            inner: Arc::new(Mutex::new(Inner {
                state: State::NotCreated,
                config: None,
                requests: Vec::new(),
                trapped: false,
                snapshots: Vec::new(),
                disk_sizes: std::collections::HashMap::new(),
            })),
            stop: Arc::new(tokio::sync::watch::channel(false).0),
            trap_delay,
        };
        let srv = me.clone();
        let mut stopped = me.stop.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { break };
                        let srv = srv.clone();
                        let mut conn_stopped = srv.stop.subscribe();
                        tokio::spawn(async move {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let svc = hyper::service::service_fn(move |req| {
                                let srv = srv.clone();
                                async move { Ok::<_, std::convert::Infallible>(srv.handle(req).await) }
                            });
                            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
                            tokio::select! {
                                _ = conn => {}
                                _ = conn_stopped.wait_for(|s| *s) => {}
                            }
                        });
                    }
                }
            }
            let _ = std::fs::remove_file(&srv.socket);
        });
        Ok(me)
    }

    /// Stops serving, as if the VMM process ended.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Every request so far.
    pub async fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().await.requests.clone()
    }

    /// The VM's state.
    pub async fn state(&self) -> State {
        self.inner.lock().await.state
    }

    /// The size `vm.resize-disk` last gave a disk.
    pub async fn disk_size(&self, id: &str) -> Option<i64> {
        self.inner.lock().await.disk_sizes.get(id).copied()
    }

    /// Whether a `vm.boot` ever hit the missing virtio-fs socket trap.
    pub async fn trapped(&self) -> bool {
        self.inner.lock().await.trapped
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let endpoint = path.strip_prefix("/api/v1/").unwrap_or(&path).to_owned();
        let (status, body) = self.dispatch(&method, &endpoint, &bytes).await;
        let mut resp = Response::builder().status(status);
        let body = match body {
            Some(v) => {
                resp = resp.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        resp.body(body).unwrap_or_default()
    }

    async fn dispatch(&self, method: &Method, endpoint: &str, bytes: &Bytes) -> Answer {
        // One lock for the whole request: CH's API thread handles one at a time.
        let mut s = self.inner.lock().await;
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            match serde_json::from_slice(bytes) {
                Ok(v) => Some(v),
                Err(e) => {
                    return err(
                        StatusCode::BAD_REQUEST,
                        &["Error from API", &format!("invalid JSON: {e}")],
                    )
                }
            }
        };
        s.requests.push(Recorded {
            method: method.to_string(),
            endpoint: endpoint.to_owned(),
            body: body.clone(),
        });
        let expect = |m: &Method| {
            if method == m {
                None
            } else {
                Some((StatusCode::METHOD_NOT_ALLOWED, None))
            }
        };
        let running = |s: &Inner| matches!(s.state, State::Running | State::Paused);
        match endpoint {
            "vmm.ping" => expect(&Method::GET).unwrap_or_else(|| {
                (
                    StatusCode::OK,
                    Some(json!({"build_version": "v54.0.0-double", "version": "54.0.0", "pid": std::process::id(), "features": ["kvm"]})),
                )
            }),
            "vmm.shutdown" => expect(&Method::PUT).unwrap_or_else(|| {
                // Answer first, then go away, as the real process does.
                let stop = self.stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    stop.send_replace(true);
                });
                (StatusCode::OK, None)
            }),
            "vm.create" => expect(&Method::PUT).unwrap_or_else(|| {
                if s.state != State::NotCreated {
                    return err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The VM could not be created", "VM is already created"]);
                }
                let Some(cfg) = body else {
                    return err(StatusCode::BAD_REQUEST, &["Error from API", "missing VmConfig body"]);
                };
                if let Err(e) = validate_vm_config(&cfg) {
                    return err(StatusCode::BAD_REQUEST, &["Error from API", "The VM could not be created", &e]);
                }
                s.config = Some(cfg);
                s.state = State::Created;
                ok()
            }),
            "vm.boot" => match expect(&Method::PUT) {
                Some(a) => a,
                None => {
                    let Some(cfg) = s.config.clone() else {
                        return err(StatusCode::NOT_FOUND, &["Error from API", "The VM could not boot", "VM is not created"]);
                    };
                    if s.state == State::Running || s.state == State::Paused {
                        return err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The VM could not boot", "VM is already running"]);
                    }
                    let fs = cfg.get("fs").and_then(Value::as_array).cloned().unwrap_or_default();
                    if !fs.is_empty() && cfg.pointer("/memory/shared") != Some(&Value::Bool(true)) {
                        return err(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &["Error from API", "The VM could not boot", "Error booting VM", "Cannot use vhost-user devices without shared memory: memory.shared=on is required"],
                        );
                    }
                    for f in &fs {
                        let sock = f.get("socket").and_then(Value::as_str).unwrap_or_default();
                        if !Path::new(sock).exists() {
                            // The real VMM retries the vhost-user connection for
                            // 60 s with its API blocked; so does the double.
                            s.trapped = true;
                            tokio::time::sleep(self.trap_delay).await;
                            return err(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                &["Error from API", "The VM could not boot", "Error booting VM", &format!("Failed to connect to vhost-user socket {sock}")],
                            );
                        }
                    }
                    s.state = State::Running;
                    ok()
                }
            },
            "vm.info" => expect(&Method::GET).unwrap_or_else(|| match &s.config {
                None => err(StatusCode::NOT_FOUND, &["Error from API", "The VM information could not be retrieved", "VM is not created"]),
                Some(cfg) => (
                    StatusCode::OK,
                    Some(json!({"config": cfg, "state": s.state.name(), "memory_actual_size": cfg.pointer("/memory/size")})),
                ),
            }),
            "vm.shutdown" | "vm.reboot" | "vm.power-button" => expect(&Method::PUT).unwrap_or_else(|| {
                if s.config.is_none() {
                    return err(StatusCode::NOT_FOUND, &["Error from API", "VM is not created"]);
                }
                if !running(&s) {
                    return err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", &format!("The VM could not {endpoint}"), "VM is not running"]);
                }
                if endpoint == "vm.shutdown" {
                    s.state = State::Shutdown;
                }
                ok()
            }),
            "vm.pause" => expect(&Method::PUT).unwrap_or_else(|| match s.state {
                State::Running => {
                    s.state = State::Paused;
                    ok()
                }
                State::NotCreated => err(StatusCode::NOT_FOUND, &["Error from API", "VM is not created"]),
                _ => err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The VM could not be paused", "Invalid state transition"]),
            }),
            "vm.resume" => expect(&Method::PUT).unwrap_or_else(|| match s.state {
                State::Paused => {
                    s.state = State::Running;
                    ok()
                }
                State::NotCreated => err(StatusCode::NOT_FOUND, &["Error from API", "VM is not created"]),
                _ => err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The VM could not be resumed", "Invalid state transition"]),
            }),
            "vm.delete" => expect(&Method::PUT).unwrap_or_else(|| {
                s.state = State::NotCreated;
                s.config = None;
                ok()
            }),
            "vm.resize" => expect(&Method::PUT).unwrap_or_else(|| {
                let Some(b) = body.as_ref().and_then(Value::as_object) else {
                    return err(StatusCode::BAD_REQUEST, &["Error from API", "VmResize must be an object"]);
                };
                if b.get("desired_vcpus").is_some_and(|v| v.as_i64().is_none_or(|n| n < 1)) {
                    return err(StatusCode::BAD_REQUEST, &["Error from API", "desired_vcpus must be >= 1"]);
                }
                let Some(cfg) = s.config.as_ref() else {
                    return err(StatusCode::NOT_FOUND, &["Error from API", "VM is not created"]);
                };
                // A real CH hot-plugs CPUs only up to the max_vcpus it
                // booted with, and memory only into its hotplug_size.
                let max = cfg.pointer("/cpus/max_vcpus").and_then(Value::as_i64).unwrap_or(1);
                if b.get("desired_vcpus").and_then(Value::as_i64).is_some_and(|n| n > max) {
                    return err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The VM could not be resized", "Error resizing VM", "Request to hot plug more vCPUs than allowed max"]);
                }
                let size = cfg.pointer("/memory/size").and_then(Value::as_i64).unwrap_or(0);
                let hotplug = cfg.pointer("/memory/hotplug_size").and_then(Value::as_i64).unwrap_or(0);
                if b.get("desired_ram").and_then(Value::as_i64).is_some_and(|r| r != size && (hotplug == 0 || r > size + hotplug)) {
                    return err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The VM could not be resized", "Error resizing VM", "Memory hotplug is not enabled or the size exceeds it"]);
                }
                ok()
            }),
            "vm.resize-disk" => expect(&Method::PUT).unwrap_or_else(|| {
                let Some(b) = body.as_ref().and_then(Value::as_object) else {
                    return err(StatusCode::BAD_REQUEST, &["Error from API", "VmResizeDisk must be an object"]);
                };
                let (Some(id), Some(size)) = (b.get("id").and_then(Value::as_str), b.get("desired_size").and_then(Value::as_i64)) else {
                    return err(StatusCode::BAD_REQUEST, &["Error from API", "id and desired_size are required"]);
                };
                let Some(cfg) = s.config.as_ref() else {
                    return err(StatusCode::NOT_FOUND, &["Error from API", "The disk could not be resized", "VM is not created"]);
                };
                let disks = cfg.get("disks").and_then(Value::as_array).cloned().unwrap_or_default();
                if !disks.iter().any(|d| d.get("id").and_then(Value::as_str) == Some(id)) {
                    return err(StatusCode::NOT_FOUND, &["Error from API", "The disk could not be resized", &format!("No disk with id {id}")]);
                }
                if size <= 0 || size % 512 != 0 {
                    return err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The disk could not be resized", "Size must be a positive multiple of 512 bytes"]);
                }
                s.disk_sizes.insert(id.to_owned(), size);
                ok()
            }),
            "vm.snapshot" => expect(&Method::PUT).unwrap_or_else(|| {
                let Some(url) = body.as_ref().and_then(|b| b.get("destination_url")).and_then(Value::as_str) else {
                    return err(StatusCode::BAD_REQUEST, &["Error from API", "destination_url is required"]);
                };
                if s.state != State::Paused {
                    return err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The VM could not be snapshotted", "VM is not paused"]);
                }
                s.snapshots.push(url.to_owned());
                ok()
            }),
            "vm.restore" => expect(&Method::PUT).unwrap_or_else(|| {
                let Some(url) = body.as_ref().and_then(|b| b.get("source_url")).and_then(Value::as_str) else {
                    return err(StatusCode::BAD_REQUEST, &["Error from API", "source_url is required"]);
                };
                if s.state != State::NotCreated {
                    return err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The VM could not be restored", "VM is already created"]);
                }
                if !s.snapshots.iter().any(|u| u == url) {
                    return err(StatusCode::INTERNAL_SERVER_ERROR, &["Error from API", "The VM could not be restored", "snapshot not found"]);
                }
                s.state = if body.as_ref().and_then(|b| b.get("resume")).and_then(Value::as_bool) == Some(true) {
                    State::Running
                } else {
                    State::Paused
                };
                s.config = Some(json!({"payload": {}}));
                ok()
            }),
            _ => err(StatusCode::NOT_FOUND, &["Error from API", "unknown endpoint"]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_follows_the_spec() {
        assert!(validate_vm_config(&json!({"payload": {"kernel": "/k"}})).is_ok());
        assert!(validate_vm_config(&json!({}))
            .unwrap_err()
            .contains("payload"));
        assert!(
            validate_vm_config(&json!({"payload": {}, "cpus": {"boot_vcpus": 1}}))
                .unwrap_err()
                .contains("max_vcpus")
        );
        assert!(
            validate_vm_config(&json!({"payload": {}, "vsock": [{"cid": 3, "socket": "/s"}]}))
                .unwrap_err()
                .contains("not a list")
        );
        assert!(
            validate_vm_config(&json!({"payload": {}, "fs": [{"tag": "w", "socket": "/s"}]}))
                .unwrap_err()
                .contains("num_queues")
        );
        assert!(
            validate_vm_config(&json!({"payload": {}, "serial": {"mode": "file"}}))
                .unwrap_err()
                .contains("mode")
        );
        assert!(validate_vm_config(&json!({"payload": {}, "bogus": 1}))
            .unwrap_err()
            .contains("unknown field"));
        assert!(validate_vm_config(
            &json!({"payload": {}, "disks": [{"path": "/d", "image_type": "qcow2"}]})
        )
        .is_err());
    }
}
