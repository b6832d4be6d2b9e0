//! The Incus client against a server replaying answers recorded from a
//! real Incus 6.0 daemon (`incus/recorded.json`): operations, 404s,
//! "already running", "already stopped", VMs unsupported, duplicates; and
//! against servers that misbehave (garbage, silence, a closed socket).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kennel_provisioner::incus::api::{InstanceSource, InstanceType, InstancesPost, StateAction};
use kennel_provisioner::incus::{IncusClient, IncusError};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// One request the replay server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    content_type: String,
    body: Vec<u8>,
}

type Answers = BTreeMap<(String, String), VecDeque<(u16, Value)>>;

/// A server on a Unix socket that answers each (method, path) with the
/// recorded answers for it, in order, and records what it was sent.
struct Replay {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    _dir: tempfile::TempDir,
}

fn recorded() -> Vec<Value> {
    let text = include_str!("incus/recorded.json");
    let v: Value = serde_json::from_str(text).unwrap();
    v["answers"].as_array().unwrap().clone()
}

impl Replay {
    fn start(answers: &[Value]) -> Replay {
        let mut map: Answers = BTreeMap::new();
        for a in answers {
            map.entry((
                a["method"].as_str().unwrap().to_owned(),
                a["path"].as_str().unwrap().to_owned(),
            ))
            .or_default()
            .push_back((a["status"].as_u64().unwrap() as u16, a["body"].clone()));
        }
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("unix.socket");
        let listener = UnixListener::bind(&socket).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(map));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answers = answers.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    let Some(req) = read_request(&mut r).await else {
                        return;
                    };
                    let path = req.uri.split('?').next().unwrap_or("").to_owned();
                    let answer = answers
                        .lock()
                        .unwrap()
                        .get_mut(&(req.method.clone(), path.clone()))
                        .and_then(VecDeque::pop_front);
                    seen.lock().unwrap().push(req);
                    let (status, body) = answer.unwrap_or((
                        599,
                        serde_json::json!({"type": "error", "error_code": 599,
                            "error": format!("no recorded answer for {path}")}),
                    ));
                    let body = serde_json::to_vec(&body).unwrap();
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = w.write_all(head.as_bytes()).await;
                    let _ = w.write_all(&body).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Replay {
            socket,
            seen,
            _dir: dir,
        }
    }

    fn client(&self) -> IncusClient {
        IncusClient::unix(&self.socket, "default").with_timeout(Duration::from_secs(5))
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1.1 request (body by content-length or chunked).
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<Seen> {
    let mut line = String::new();
    r.read_line(&mut line).await.ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let uri = parts.next()?.to_owned();
    let (mut length, mut chunked, mut content_type) = (0usize, false, String::new());
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        match k.to_ascii_lowercase().as_str() {
            "content-length" => length = v.trim().parse().ok()?,
            "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
            "content-type" => content_type = v.trim().to_owned(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    if chunked {
        body.clear();
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_exact(&mut body).await.ok()?;
    }
    Some(Seen {
        method,
        uri,
        content_type,
        body,
    })
}

fn post(name: &str, kind: InstanceType, fingerprint: &str) -> InstancesPost {
    InstancesPost {
        name: name.into(),
        kind,
        source: InstanceSource::image(fingerprint),
        config: BTreeMap::new(),
        devices: BTreeMap::new(),
        profiles: vec!["default".into()],
        description: String::new(),
        start: true,
    }
}

const LONG: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_recorded_session_reads_as_typed_results_and_errors() {
    let answers = recorded();
    let server = Replay::start(&answers);
    let c = server.client();

    let s = c.server().await.unwrap();
    assert_eq!(s.environment.server_version, "6.0.4");
    assert!(!s.environment.server_clustered);
    assert_eq!(s.auth, "trusted");
    // Not clustered: no members, not an error.
    assert_eq!(c.members().await.unwrap(), vec![]);

    // An image import is streamed, then its operation waited for.
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("image.tar.gz");
    std::fs::write(&tarball, vec![7u8; 300_000]).unwrap();
    let fp = c.import_image(&tarball, LONG).await.unwrap();
    assert_eq!(fp.len(), 64, "{fp}");
    let e = c.import_image(&tarball, LONG).await.unwrap_err();
    assert!(matches!(e, IncusError::Exists { .. }), "{e}");
    c.add_image_alias("kennel-test", &fp).await.unwrap();
    assert_eq!(
        c.image_alias("kennel-test").await.unwrap().unwrap().target,
        fp
    );
    assert!(c.image_alias("nope").await.unwrap().is_none());

    // Create and start; the instance and its state.
    c.create_instance(&post("rec1", InstanceType::Container, &fp), None, LONG)
        .await
        .unwrap();
    let i = c.instance("rec1").await.unwrap().unwrap();
    assert_eq!((i.name.as_str(), i.status.as_str()), ("rec1", "Running"));
    let st = c.instance_state("rec1").await.unwrap();
    assert!(st.running());
    assert!(st.cpu.unwrap().usage > 0);

    // Already running; a duplicate; VMs where KVM is missing.
    let e = c
        .change_state("rec1", StateAction::Start, false, Duration::from_secs(0))
        .await
        .unwrap_err();
    assert!(matches!(e, IncusError::AlreadyRunning { .. }), "{e}");
    let e = c
        .create_instance(&post("rec1", InstanceType::Container, &fp), None, LONG)
        .await
        .unwrap_err();
    assert!(matches!(e, IncusError::Exists { .. }), "{e}");
    let e = c
        .create_instance(&post("vm1", InstanceType::VirtualMachine, &fp), None, LONG)
        .await
        .unwrap_err();
    assert!(matches!(e, IncusError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("vhost_vsock"), "{e}");
    assert!(
        e.to_string().contains("instance_type = \"container\""),
        "{e}"
    );

    // A clean stop that times out says so; a forced one works; stopping
    // a stopped instance is its own error.
    let e = c
        .change_state("rec1", StateAction::Stop, false, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("context deadline exceeded"), "{e}");
    c.change_state("rec1", StateAction::Stop, true, Duration::from_secs(10))
        .await
        .unwrap();
    let e = c
        .change_state("rec1", StateAction::Stop, true, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(e, IncusError::NotRunning { .. }), "{e}");
    let st = c.instance_state("rec1").await.unwrap();
    assert!(!st.running());
    assert_eq!(st.ipv4("eth0"), None);

    // Rename, list, delete; what is gone is not found.
    c.rename_instance("rec1", "rec2", LONG).await.unwrap();
    let all = c.instances().await.unwrap();
    assert_eq!(
        all.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["rec2"]
    );
    c.delete_instance("rec2", LONG).await.unwrap();
    let e = c.delete_instance("rec2", LONG).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = c.instance_state("rec2").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("rec2"), "{e}");
    let e = c
        .wait(
            "/1.0/operations/00000000-0000-0000-0000-000000000000",
            "x",
            LONG,
        )
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");

    // What was sent: every request in the project, JSON bodies as the
    // API takes them, the image as one octet stream.
    let seen = server.seen();
    assert_eq!(seen.len(), answers.len());
    for (s, a) in seen.iter().zip(&answers) {
        assert_eq!(s.method, a["method"].as_str().unwrap());
        assert!(s.uri.contains("project=default"), "{}", s.uri);
    }
    let upload = seen
        .iter()
        .find(|s| s.method == "POST" && s.uri.starts_with("/1.0/images?"))
        .unwrap();
    assert_eq!(upload.content_type, "application/octet-stream");
    assert_eq!(upload.body.len(), 300_000);
    let create: Value = serde_json::from_slice(
        &seen
            .iter()
            .find(|s| s.method == "POST" && s.uri.starts_with("/1.0/instances?"))
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(create["type"], "container");
    assert_eq!(create["source"]["fingerprint"], fp.as_str());
    let stop: Value = serde_json::from_slice(
        &seen
            .iter()
            .find(|s| s.method == "PUT" && s.body.windows(4).any(|w| w == b"stop"))
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(
        stop,
        serde_json::json!({"action": "stop", "timeout": 1, "force": false})
    );
    let waits = seen
        .iter()
        .filter(|s| s.uri.contains("/wait?") && s.uri.contains("timeout="))
        .count();
    assert!(waits >= 10, "{waits}");
}

#[tokio::test]
async fn names_reach_incus_as_single_path_segments() {
    let server = Replay::start(&[]);
    let c = server.client();
    let _ = c.instance_state("../../1.0/certificates").await;
    let _ = c.move_instance("myapp", "host 2&x=1", LONG).await;
    let seen = server.seen();
    assert_eq!(
        seen[0].uri,
        "/1.0/instances/..%2F..%2F1.0%2Fcertificates/state?project=default"
    );
    assert_eq!(
        seen[1].uri,
        "/1.0/instances/myapp?project=default&target=host%202%26x%3D1"
    );
}

/// A listener that answers each connection with `reply` (or nothing).
fn misbehaving(dir: &Path, reply: Option<&'static [u8]>) -> PathBuf {
    let socket = dir.join("bad.socket");
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                match reply {
                    Some(r) => {
                        let _ = s.write_all(r).await;
                        let _ = s.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(60)).await,
                }
            });
        }
    });
    socket
}

#[tokio::test]
async fn a_server_that_misbehaves_gives_clear_errors_and_no_hang() {
    let dir = tempfile::tempdir().unwrap();
    // No daemon at all.
    let c = IncusClient::unix(&dir.path().join("none.socket"), "default");
    let e = c.server().await.unwrap_err();
    assert!(matches!(e, IncusError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("is incusd running"), "{e}");
    // Silence: the deadline.
    let silent = misbehaving(dir.path(), None);
    let c = IncusClient::unix(&silent, "default").with_timeout(Duration::from_millis(300));
    let e = c.server().await.unwrap_err();
    assert!(matches!(e, IncusError::Timeout { .. }), "{e}");
    // Not the API.
    std::fs::remove_file(&silent).unwrap();
    let garbage = misbehaving(
        dir.path(),
        Some(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot json!"),
    );
    let e = IncusClient::unix(&garbage, "default")
        .server()
        .await
        .unwrap_err();
    assert!(matches!(e, IncusError::Decode { .. }), "{e}");
    assert!(e.to_string().contains("not json!"), "{e}");
}
