//! The metadata service (LLM gateway, `/kennel/v1`) against an
//! OpenAI/Anthropic-compatible upstream written for the test, which
//! records what it receives. VMs are stood in for by connections to their
//! projects' sockets, as QEMU's forward makes them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kennel_core::model::Identity;
use kennel_core::testing::World;
use kennel_core::Settings;
use kennel_gateway::meta::{Backend, MetaService, MetaSettings};

/// What the upstream received.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: http::HeaderMap,
    body: String,
}

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Set when a hanging answer's stream was dropped (its client left).
    hang_dropped: Arc<AtomicBool>,
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn sse(chunks: Vec<(Duration, String)>, flag: Option<DropFlag>, hang: bool) -> UpBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        let _flag = flag;
        for (wait, c) in chunks {
            tokio::time::sleep(wait).await;
            if tx.send(Ok(Frame::data(Bytes::from(c)))).await.is_err() {
                return;
            }
        }
        if hang {
            // Holds the answer open until the gateway drops it.
            tx.closed().await;
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    StreamBody::new(stream).boxed()
}

fn full(s: impl Into<Bytes>) -> UpBody {
    Full::new(s.into()).map_err(|n| match n {}).boxed()
}

async fn upstream() -> Upstream {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let hang_dropped = Arc::new(AtomicBool::new(false));
    let (s2, h2) = (seen.clone(), hang_dropped.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (seen, hang) = (s2.clone(), h2.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let (seen, hang) = (seen.clone(), hang.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let body = String::from_utf8_lossy(&body).into_owned();
                            let path = parts.uri.to_string();
                            seen.lock().unwrap().push(Seen {
                                path: path.clone(),
                                headers: parts.headers.clone(),
                                body: body.clone(),
                            });
                            let json: serde_json::Value =
                                serde_json::from_str(&body).unwrap_or_default();
                            let resp = |ct: &str, b: UpBody| {
                                Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .header("content-type", ct)
                                        .body(b)
                                        .unwrap(),
                                )
                            };
                            match parts.uri.path() {
                                "/v1/chat/completions" if json["stream"] == true => {
                                    let gap = Duration::from_millis(400);
                                    let mut chunks: Vec<(Duration, String)> = (0..3)
                                    .map(|i| {
                                        (gap, format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"part{i}\"}}}}]}}\n\n"))
                                    })
                                    .collect();
                                    if json["stream_options"]["include_usage"] == true {
                                        chunks.push((Duration::ZERO, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":22,\"total_tokens\":33}}\n\n".into()));
                                    }
                                    chunks.push((Duration::ZERO, "data: [DONE]\n\n".into()));
                                    resp("text/event-stream", sse(chunks, None, false))
                                }
                                "/v1/chat/completions" => resp(
                                    "application/json",
                                    full(
                                        r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#,
                                    ),
                                ),
                                "/v1/messages" => resp(
                                    "application/json",
                                    full(
                                        r#"{"content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":7,"output_tokens":5}}"#,
                                    ),
                                ),
                                "/v1/hang" => resp(
                                    "text/event-stream",
                                    sse(
                                        vec![(Duration::ZERO, "data: {\"x\":1}\n\n".into())],
                                        Some(DropFlag(hang)),
                                        true,
                                    ),
                                ),
                                "/v1/slow" => {
                                    tokio::time::sleep(Duration::from_secs(5)).await;
                                    resp("application/json", full("{}"))
                                }
                                _ => Ok(http::Response::builder()
                                    .status(404)
                                    .body(full("no such upstream path"))
                                    .unwrap()),
                            }
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        seen,
        hang_dropped,
    }
}

struct Meta {
    w: World,
    dir: tempfile::TempDir,
    up: Upstream,
    ann: Identity,
    bob: Identity,
    _stop: tokio::sync::oneshot::Sender<()>,
}

const ANN_KEY: &str = "sk-ann-secret-0123456789";
const BOB_KEY: &str = "sk-bob-secret-9876543210";
const TEAM_KEY: &str = "sk-team-backend-key";

async fn meta(tokens_per_day: u64, requests_per_minute: u32) -> Meta {
    let up = upstream().await;
    let w = World::new()
        .settings(Settings {
            llm_tokens_per_day: tokens_per_day,
            llm_requests_per_minute: requests_per_minute,
            ..Settings::default()
        })
        .build();
    let ann = w.member("ann", 1).await;
    let bob = w.member("bob", 2).await;
    let carl = w.member("carl", 3).await;
    for (who, p) in [(&ann, "annapp"), (&bob, "bobapp"), (&carl, "carlapp")] {
        let out = w.text(who, &format!("new project {p} --stack rust")).await;
        assert!(out.contains(p), "{out}");
    }
    let out = w
        .text(&ann, &format!("secret set openai-api-key {ANN_KEY}"))
        .await;
    assert!(out.contains("Stored"), "{out}");
    let out = w
        .text(&bob, &format!("secret set openai-api-key {BOB_KEY}"))
        .await;
    assert!(out.contains("Stored"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let base = format!("http://{}/v1", up.addr);
    let svc = MetaService::new(
        w.exec.gate(),
        MetaSettings {
            dir: dir.path().join("meta"),
            openai_url: base.clone(),
            anthropic_url: base.clone(),
            backends: vec![
                Backend {
                    name: "team".into(),
                    provider: kennel_core::llm::Provider::Anthropic,
                    url: base.clone(),
                    key: Some(TEAM_KEY.into()),
                    users: vec!["ann".into()],
                },
                Backend {
                    name: "down".into(),
                    provider: kennel_core::llm::Provider::OpenAi,
                    // Nothing listens on port 9 here.
                    url: "http://127.0.0.1:9/v1".into(),
                    key: None,
                    users: vec!["carl".into()],
                },
            ],
            max_body: 64 * 1024,
            answer_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            ..MetaSettings::default()
        },
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(svc.run(None, async move {
        let _ = stopped.await;
    }));
    let m = Meta {
        w,
        dir,
        up,
        ann,
        bob,
        _stop: stop,
    };
    for p in ["annapp", "bobapp", "carlapp"] {
        let sock = m.sock(p);
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no socket {}",
                sock.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    m
}

impl Meta {
    fn sock(&self, project: &str) -> PathBuf {
        self.dir.path().join("meta").join(format!("{project}.sock"))
    }

    /// One request from `project`'s VM; the answer's status and its body
    /// chunks with the time each arrived.
    async fn ask(
        &self,
        project: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, Vec<(Duration, Bytes)>) {
        ask_on(&self.sock(project), method, path, headers, body).await
    }
}

async fn ask_on(
    sock: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(Duration, Bytes)>) {
    let s = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "metadata.kennel.internal")
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let t0 = Instant::now();
    let resp = send
        .send_request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let mut b = resp.into_body();
    let mut chunks = Vec::new();
    while let Some(f) = b.frame().await {
        let Ok(f) = f else { break };
        if let Ok(d) = f.into_data() {
            chunks.push((t0.elapsed(), d));
        }
    }
    (status, chunks)
}

fn text(chunks: &[(Duration, Bytes)]) -> String {
    chunks
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect()
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `llm usage` for `who` once it says `needle` (counts are written when
/// an answer ends).
async fn usage_until(m: &Meta, who: &Identity, needle: &str) -> String {
    let t0 = Instant::now();
    loop {
        let u = m.w.text(who, "llm usage").await;
        if u.contains(needle) {
            return u;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{u}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const CHAT: &str = r#"{"model":"gpt-test","messages":[{"role":"user","content":"hello"}]}"#;

#[tokio::test]
async fn each_vm_gets_its_owners_key_which_never_reaches_the_vm() {
    let m = meta(0, 0).await;
    // The guest's own placeholder credentials are dropped.
    let (status, body) = m
        .ask(
            "annapp",
            "POST",
            "/llm/openai/v1/chat/completions",
            &[
                ("authorization", "Bearer kennel-metadata"),
                ("x-api-key", "forged"),
            ],
            CHAT,
        )
        .await;
    assert_eq!(status, 200, "{}", text(&body));
    let answer = text(&body);
    assert!(answer.contains("\"total_tokens\":30"), "{answer}");
    assert!(!answer.contains(ANN_KEY));
    let (status, _) = m
        .ask(
            "bobapp",
            "POST",
            "/llm/openai/v1/chat/completions?x=1",
            &[],
            CHAT,
        )
        .await;
    assert_eq!(status, 200);
    let seen = m.up.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {ANN_KEY}")
    );
    assert!(seen[0].headers.get("x-api-key").is_none());
    assert_eq!(seen[0].body, CHAT);
    // A second VM's request carries its own owner's key.
    assert_eq!(seen[1].path, "/v1/chat/completions?x=1");
    assert_eq!(
        seen[1].headers["authorization"],
        format!("Bearer {BOB_KEY}")
    );
    // The day's use is counted from the answers' usage, per owner.
    let usage = usage_until(&m, &m.ann, "1 requests, 30 tokens").await;
    assert!(usage.contains("ann's LLM use"), "{usage}");
    let usage = m.w.text(&m.bob, "llm usage ann").await;
    assert!(usage.contains("only admins"), "{usage}");
    // Every request is in the audit log, without prompt or answer.
    let audit =
        m.w.store
            .call(|c| kennel_core::store::repo::recent_audit(c, 50))
            .await
            .unwrap();
    let audit: String = audit
        .iter()
        .filter(|e| e.action == "llm request")
        .map(|e| {
            format!(
                "{} {} {:?} {:?} {}\n",
                e.identity,
                e.action,
                e.user,
                e.target,
                e.detail.clone().unwrap_or_default()
            )
        })
        .collect();
    assert!(
        audit.contains("system:vm:annapp") || audit.contains("vm:annapp"),
        "{audit}"
    );
    assert!(
        audit.contains("backend=openai model=gpt-test tokens=30 status=200"),
        "{audit}"
    );
    assert!(
        !audit.contains("hello") && !audit.contains(ANN_KEY),
        "{audit}"
    );
    // /kennel/v1/me says which project and owner this VM is.
    let (status, me) = m.ask("bobapp", "GET", "/kennel/v1/me", &[], "").await;
    assert_eq!(status, 200);
    let me: serde_json::Value = serde_json::from_str(&text(&me)).unwrap();
    assert_eq!(me["project"], "bobapp");
    assert_eq!(me["owner"], "bob");
}

#[tokio::test]
async fn streams_pass_through_chunk_by_chunk_and_count_their_tokens() {
    let m = meta(0, 0).await;
    let body = r#"{"model":"gpt-test","stream":true,"messages":[]}"#;
    let (status, chunks) = m
        .ask(
            "annapp",
            "POST",
            "/llm/openai/v1/chat/completions",
            &[],
            body,
        )
        .await;
    assert_eq!(status, 200);
    let all = text(&chunks);
    assert!(
        all.contains("part0") && all.contains("part2") && all.contains("[DONE]"),
        "{all}"
    );
    // The first chunk arrived well before the upstream finished (3 × 400 ms).
    let first = chunks
        .iter()
        .find(|(_, b)| b.windows(5).any(|w| w == b"part0"))
        .unwrap()
        .0;
    let last = chunks.last().unwrap().0;
    assert!(
        last >= first + Duration::from_millis(700),
        "first {first:?}, last {last:?}"
    );
    // Kennel asked for the stream's usage, and counted it.
    let seen = m.up.seen.lock().unwrap().clone();
    let sent: serde_json::Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    usage_until(&m, &m.ann, "1 requests, 33 tokens").await;
}

#[tokio::test]
async fn an_operator_backend_serves_who_it_names_and_anthropic_gets_x_api_key() {
    let m = meta(0, 0).await;
    let msg = r#"{"model":"claude-test","max_tokens":5,"messages":[]}"#;
    let (status, body) = m
        .ask(
            "annapp",
            "POST",
            "/llm/anthropic/v1/messages",
            &[("anthropic-version", "2023-06-01")],
            msg,
        )
        .await;
    assert_eq!(status, 200, "{}", text(&body));
    let seen = m.up.seen.lock().unwrap().clone();
    assert_eq!(seen[0].path, "/v1/messages");
    assert_eq!(seen[0].headers["x-api-key"], TEAM_KEY);
    assert_eq!(seen[0].headers["anthropic-version"], "2023-06-01");
    assert!(seen[0].headers.get("authorization").is_none());
    // bob has no Anthropic key and the backend is not his.
    let (status, body) = m
        .ask("bobapp", "POST", "/llm/anthropic/v1/messages", &[], msg)
        .await;
    assert_eq!(status, 403);
    let t = text(&body);
    assert!(
        t.contains("no LLM is configured for you") && t.contains("secret set anthropic-api-key"),
        "{t}"
    );
    // carl's only backend is down: 502 naming it.
    let (status, body) = m
        .ask(
            "carlapp",
            "POST",
            "/llm/openai/v1/chat/completions",
            &[],
            CHAT,
        )
        .await;
    assert_eq!(status, 502);
    assert!(text(&body).contains("'down'"), "{}", text(&body));
    assert_eq!(m.up.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_input_gets_clear_answers() {
    let m = meta(0, 0).await;
    let (status, body) = m.ask("annapp", "GET", "/latest/meta-data/", &[], "").await;
    assert_eq!(status, 404);
    assert!(text(&body).contains("/llm/openai/v1/"), "{}", text(&body));
    let (status, _) = m.ask("annapp", "POST", "/llm/gemini/v1/x", &[], "{}").await;
    assert_eq!(status, 404);
    // Oversized bodies are refused before anything goes upstream.
    let big = format!(r#"{{"model":"m","messages":"{}"}}"#, "x".repeat(70 * 1024));
    let (status, body) = m
        .ask(
            "annapp",
            "POST",
            "/llm/openai/v1/chat/completions",
            &[],
            &big,
        )
        .await;
    assert_eq!(status, 413, "{}", text(&body));
    // A slow upstream: 504 after the answer timeout (1 s here).
    let t0 = Instant::now();
    let (status, body) = m
        .ask("annapp", "POST", "/llm/openai/v1/slow", &[], "{}")
        .await;
    assert_eq!(status, 504, "{}", text(&body));
    assert!(t0.elapsed() < Duration::from_secs(4));
    // An upstream 404 is passed on as it is.
    let (status, _) = m
        .ask("annapp", "GET", "/llm/openai/v1/models", &[], "")
        .await;
    assert_eq!(status, 404);
    assert!(m
        .up
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| !s.body.contains("xxxx")));
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_upstream_request() {
    let m = meta(0, 0).await;
    let s = tokio::net::UnixStream::connect(m.sock("annapp"))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::builder()
                .method("POST")
                .uri("/llm/openai/v1/hang")
                .header("host", "metadata.kennel.internal")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut b = resp.into_body();
    let first = b.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data:"));
    assert!(!m.up.hang_dropped.load(Ordering::SeqCst));
    drop(b);
    drop(send);
    conn.abort();
    eventually("the upstream answer dropped", || {
        m.up.hang_dropped.load(Ordering::SeqCst).then_some(())
    })
    .await;
}

#[tokio::test]
async fn limits_answer_429_naming_the_limit() {
    // Two requests a minute.
    let m = meta(0, 2).await;
    for _ in 0..2 {
        let (status, _) = m
            .ask(
                "annapp",
                "POST",
                "/llm/openai/v1/chat/completions",
                &[],
                CHAT,
            )
            .await;
        assert_eq!(status, 200);
    }
    let (status, body) = m
        .ask(
            "annapp",
            "POST",
            "/llm/openai/v1/chat/completions",
            &[],
            CHAT,
        )
        .await;
    assert_eq!(status, 429);
    assert!(
        text(&body).contains("2 LLM requests a minute"),
        "{}",
        text(&body)
    );
    // Per user: bob still may.
    let (status, _) = m
        .ask(
            "bobapp",
            "POST",
            "/llm/openai/v1/chat/completions",
            &[],
            CHAT,
        )
        .await;
    assert_eq!(status, 200);

    // 40 tokens a day: the second 30-token answer crosses it, the third
    // request is refused.
    let m = meta(40, 0).await;
    for n in 1..=2 {
        let (status, _) = m
            .ask(
                "annapp",
                "POST",
                "/llm/openai/v1/chat/completions",
                &[],
                CHAT,
            )
            .await;
        assert_eq!(status, 200);
        usage_until(&m, &m.ann, &format!("{n} requests, {} tokens", n * 30)).await;
    }
    let (status, body) = m
        .ask(
            "annapp",
            "POST",
            "/llm/openai/v1/chat/completions",
            &[],
            CHAT,
        )
        .await;
    assert_eq!(status, 429);
    assert!(
        text(&body).contains("40 LLM tokens a day"),
        "{}",
        text(&body)
    );
    assert_eq!(m.up.seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn notify_reaches_the_owner_and_is_rate_limited() {
    let m = meta(0, 0).await;
    let mut events = m.w.exec.gate().subscribe();
    let (status, _) = m
        .ask(
            "annapp",
            "POST",
            "/kennel/v1/notify",
            &[],
            "tests are green",
        )
        .await;
    assert_eq!(status, 202);
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    match ev {
        kennel_core::Event::ProjectNotice {
            project,
            owner,
            identities,
            text,
        } => {
            assert_eq!(project.as_str(), "annapp");
            assert_eq!(owner.as_str(), "ann");
            assert_eq!(text, "tests are green");
            assert!(identities.contains(&m.ann), "{identities:?}");
        }
        other => panic!("{other:?}"),
    }
    let (status, _) = m
        .ask("annapp", "POST", "/kennel/v1/notify", &[], "two\nlines")
        .await;
    assert_eq!(status, 400);
    for _ in 0..5 {
        let (status, _) = m
            .ask("annapp", "POST", "/kennel/v1/notify", &[], "again")
            .await;
        assert_eq!(status, 202);
    }
    let (status, body) = m
        .ask("annapp", "POST", "/kennel/v1/notify", &[], "one too many")
        .await;
    assert_eq!(status, 429, "{}", text(&body));
}
