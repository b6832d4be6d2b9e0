//! The HTTPS gateway in-process on 127.0.0.1:0 with its development CA,
//! driven by the real `curl` (HTTP/1.1 and HTTP/2, `--resolve`,
//! `--cacert`) and a real WebSocket client, in front of a small HTTP
//! backend on the host standing in for a project's app. (A real guest's
//! app behind the gateway is tested in the root crate's tests.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use kennel_core::keys::testing::ed25519;
use kennel_core::model::{Frontend, Identity};
use kennel_core::store::repo;
use kennel_core::testing::World;
use kennel_core::{Reply, Settings};
use kennel_gateway::https::{tls, HttpsGateway, HttpsSettings};
use kennel_testkit::require;

const DOMAIN: &str = "kennel.test";
/// A `curl` argument of these tests: without the cookie jar.
const ANON: &str = "--anonymous";

/// The stand-in app: echoes what it was sent as JSON; `/ws` is a
/// WebSocket echo.
async fn backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: http::Request<hyper::body::Incoming>| async move {
                        if req.uri().path() == "/ws" {
                            let key = req.headers().get("sec-websocket-key").cloned().unwrap();
                            let accept =
                                tokio_tungstenite::tungstenite::handshake::derive_accept_key(
                                    key.as_bytes(),
                                );
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                use futures_util::{SinkExt, StreamExt};
                                let io = hyper_util::rt::TokioIo::new(up.await.unwrap());
                                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                                    io,
                                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                                    None,
                                )
                                .await;
                                while let Some(Ok(m)) = ws.next().await {
                                    if m.is_text() {
                                        let _ = ws.send(m).await;
                                    }
                                }
                            });
                            return Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(101)
                                    .header("connection", "upgrade")
                                    .header("upgrade", "websocket")
                                    .header("sec-websocket-accept", accept)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            );
                        }
                        let mut seen = serde_json::Map::new();
                        for (k, v) in req.headers() {
                            seen.insert(
                                k.as_str().to_owned(),
                                serde_json::Value::String(v.to_str().unwrap_or("").to_owned()),
                            );
                        }
                        seen.insert("path".into(), req.uri().to_string().into());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        seen.insert(
                            "body".into(),
                            String::from_utf8_lossy(&body).into_owned().into(),
                        );
                        Ok(http::Response::builder()
                            .header("content-type", "application/json")
                            .header("set-cookie", "__Host-kennel=stolen; Path=/; Secure")
                            .header("set-cookie", "app=1; Path=/")
                            .body(Full::new(Bytes::from(
                                serde_json::Value::Object(seen).to_string(),
                            )))
                            .unwrap())
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

struct Gw {
    w: World,
    port: u16,
    ca: PathBuf,
    dir: tempfile::TempDir,
    app: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn gateway() -> Gw {
    gateway_with(HttpsSettings::default()).await
}

async fn gateway_with(s: HttpsSettings) -> Gw {
    require("curl", "curl");
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = backend().await;
    let w = World::new()
        .settings(Settings {
            domain: DOMAIN.into(),
            https_port: port,
            ..Settings::default()
        })
        .build();
    *w.vms.app_addr.lock().unwrap() = Some(app.to_string());
    let source = tls::TlsSource::DevCa {
        dir: dir.path().join("ca"),
        domain: DOMAIN.into(),
    };
    let config = tls::server_config(&source).unwrap();
    let gw = HttpsGateway::new(&w.exec.gate(), s);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gw.run(listener, config, async move {
        let _ = stopped.await;
    }));
    let ca = tls::dev_ca_path(&dir.path().join("ca"));
    Gw {
        w,
        port,
        ca,
        dir,
        app,
        _stop: stop,
    }
}

impl Gw {
    /// What every curl of these tests starts with: quiet but for errors,
    /// bounded, trusting the development CA.
    fn curl_args(&self) -> Vec<String> {
        vec![
            "-sS".into(),
            "--max-time".into(),
            "20".into(),
            "--cacert".into(),
            self.ca.display().to_string(),
        ]
    }

    /// curl against `https://HOST:PORT/PATH`, every host resolved to the
    /// gateway; `-w` appends the status and HTTP version.
    async fn curl(&self, host: &str, path: &str, extra: &[&str]) -> (String, String, String) {
        let jar = self.dir.path().join("cookies");
        let anonymous = extra.contains(&ANON);
        let extra: Vec<&str> = extra.iter().copied().filter(|a| *a != ANON).collect();
        let mut args = self.curl_args();
        if !anonymous {
            for flag in ["-c", "-b"] {
                args.push(flag.into());
                args.push(jar.display().to_string());
            }
        }
        args.extend([
            "-D".into(),
            "-".into(),
            "-w".into(),
            "\n%{http_code} %{http_version}".into(),
        ]);
        for h in [
            DOMAIN.to_owned(),
            format!("web.{DOMAIN}"),
            format!("other.{DOMAIN}"),
            format!("nosuch.{DOMAIN}"),
            format!("web--8080.{DOMAIN}"),
            "app.example.com".to_owned(),
            "nosuch.example.com".to_owned(),
        ] {
            args.push("--resolve".into());
            args.push(format!("{h}:{}:127.0.0.1", self.port));
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push(format!("https://{host}:{}{path}", self.port));
        let out: Output = tokio::process::Command::new("curl")
            .args(&args)
            .output()
            .await
            .unwrap();
        if !out.status.success() {
            eprintln!("curl: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (rest, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        let (head, body) = rest.rsplit_once("\r\n\r\n").unwrap_or((rest, ""));
        (code.to_owned(), head.to_owned(), body.to_owned())
    }

    async fn project(&self, name: &str) {
        let out = self
            .w
            .run(&self.w.admin, &format!("new project {name} --stack rust"))
            .await;
        assert!(out.is_ok(), "{out:?}");
    }

    /// A one-time login link for `who`.
    async fn login_link(&self, who: &Identity) -> String {
        match self.w.run(who, "login").await {
            Ok(Reply::LoginLink { url, .. }) => url,
            other => panic!("{other:?}"),
        }
    }

    /// Signs the cookie jar in as `who` on Kennel's host.
    async fn sign_in(&self, who: &Identity) {
        let link = self.login_link(who).await;
        let path = link
            .split_once(&format!(":{}", self.port))
            .unwrap()
            .1
            .to_owned();
        let (code, _, body) = self.curl(DOMAIN, &path, &[]).await;
        assert!(code.starts_with("200"), "{code} {body}");
        assert!(body.contains("Sign this browser in as"), "{body}");
        let (code, head, _) = self.curl(DOMAIN, &path, &["-X", "POST"]).await;
        assert!(code.starts_with("303"), "{code} {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("set-cookie: __host-kennel="),
            "{head}"
        );
    }

    /// A member, `bob` on Discord as `id`, approved with a key of `seed`.
    async fn member(&self, id: &str, seed: u8) -> Identity {
        let bob = Identity::new(Frontend::Discord, id);
        let key = ed25519(seed, Some("bob"));
        let Ok(Reply::RequestFiled { request, .. }) =
            self.w.run(&bob, &format!("request-access {key}")).await
        else {
            panic!()
        };
        self.w
            .run(&self.w.admin, &format!("approve {}", request.id))
            .await
            .unwrap();
        bob
    }

    /// Asserts that the audit log has an entry that `is`.
    async fn audited(&self, is: impl Fn(&kennel_core::model::AuditEvent) -> bool) {
        let audit = self
            .w
            .store
            .call(|c| repo::recent_audit(c, 50))
            .await
            .unwrap();
        assert!(audit.iter().any(is), "{audit:?}");
    }

    async fn user(&self, who: &Identity) -> kennel_core::User {
        self.w.exec.resolve(who).await.unwrap().unwrap()
    }
}

fn location(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or_else(|| l.strip_prefix("Location: "))
        })
        .unwrap_or("")
        .trim()
        .to_owned()
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_by_default_and_unknown_hosts_answer_alike() {
    let gw = gateway().await;
    gw.project("web").await;
    // A script gets 401; a browser is sent to sign in.
    let (code, _, body) = gw.curl(&format!("web.{DOMAIN}"), "/", &[]).await;
    assert!(code.starts_with("401"), "{code} {body}");
    let (ucode, _, ubody) = gw.curl(&format!("nosuch.{DOMAIN}"), "/", &[]).await;
    assert_eq!(
        (code, body),
        (ucode, ubody),
        "an unknown project answers like a private one"
    );
    let html = ["-H", "Accept: text/html"];
    let (code, head, _) = gw.curl(&format!("web.{DOMAIN}"), "/x?y=1", &html).await;
    assert!(code.starts_with("302"), "{code}");
    assert_eq!(
        location(&head),
        format!(
            "https://{DOMAIN}:{}/auth?host=web.{DOMAIN}&to=/x%3Fy%3D1",
            gw.port
        )
    );
    let (_, uhead, _) = gw.curl(&format!("nosuch.{DOMAIN}"), "/x?y=1", &html).await;
    assert_eq!(location(&uhead).replace("nosuch", "web"), location(&head));
    // Not signed in at Kennel's host: how to sign in.
    let (code, _, body) = gw
        .curl(DOMAIN, &format!("/auth?host=web.{DOMAIN}&to=/"), &html)
        .await;
    assert!(
        code.starts_with("401") && body.contains("login"),
        "{code} {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_flow_hands_a_session_to_the_app_host_and_the_app_sees_the_user() {
    let gw = gateway().await;
    gw.project("web").await;
    gw.sign_in(&gw.w.admin).await;
    let me = gw.user(&gw.w.admin).await;
    // Kennel's host hands over; the app's host sets its own cookie; the
    // app sees the user, never Kennel's cookie or a spoofed identity.
    let (code, body, _) = {
        let (code, head, body) = gw
            .curl(
                &format!("web.{DOMAIN}"),
                "/echo?q=1",
                &[
                    "-L",
                    "-H",
                    "Accept: text/html",
                    "-H",
                    "X-Kennel-User: mallory",
                    "-H",
                    "X-Kennel-Email: mallory@evil.example",
                    "-H",
                    "X-Forwarded-For: 6.6.6.6",
                    "-H",
                    "Cookie: theirs=1",
                ],
            )
            .await;
        (code, body, head)
    };
    assert!(code.starts_with("200"), "{code} {body}");
    let seen = json(&body);
    assert_eq!(seen["x-kennel-user"], me.name.as_str(), "{seen}");
    assert!(seen.get("x-kennel-email").is_none(), "{seen}");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-host"], format!("web.{DOMAIN}"));
    assert_eq!(seen["path"], "/echo?q=1");
    let cookie = seen["cookie"].as_str().unwrap_or("");
    assert!(
        !cookie.contains("__Host-kennel"),
        "Kennel's cookie reached the app: {cookie}"
    );
    assert!(cookie.contains("theirs=1"), "{seen}");
    // The app cannot set Kennel's cookie; its own cookies pass.
    let (_, head, _) = gw.curl(&format!("web.{DOMAIN}"), "/", &[]).await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("set-cookie: app=1"), "{head}");
    assert!(!lower.contains("__host-kennel=stolen"), "{head}");
    // Over HTTP/2 as well.
    let (code, _, body) = gw.curl(&format!("web.{DOMAIN}"), "/h2", &["--http2"]).await;
    assert_eq!(code, "200 2", "{body}");
    assert_eq!(json(&body)["x-kennel-user"], me.name.as_str());
    // Web logins are audited.
    let audit =
        gw.w.store
            .call(|c| repo::recent_audit(c, 20))
            .await
            .unwrap();
    assert!(
        audit.iter().any(|e| e.action == "web login"
            && e.target.as_deref() == Some(&format!("web.{DOMAIN}") as &str)),
        "{audit:?}"
    );
    // logout ends every session.
    gw.w.run(&gw.w.admin, "logout").await.unwrap();
    let (code, _, _) = gw.curl(&format!("web.{DOMAIN}"), "/", &[]).await;
    assert!(code.starts_with("401"), "{code}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_links_work_once_expire_and_stay_on_their_host() {
    let gw = gateway().await;
    gw.project("web").await;
    // A GET (a link preview) does not use the link up; one POST does.
    let link = gw.login_link(&gw.w.admin).await;
    let path = link
        .split_once(&format!(":{}", gw.port))
        .unwrap()
        .1
        .to_owned();
    for _ in 0..3 {
        let (code, _, _) = gw.curl(DOMAIN, &path, &[]).await;
        assert!(code.starts_with("200"), "{code}");
    }
    let (code, _, _) = gw.curl(DOMAIN, &path, &["-X", "POST"]).await;
    assert!(code.starts_with("303"), "{code}");
    let (code, _, _) = gw.curl(DOMAIN, &path, &["-X", "POST"]).await;
    assert!(code.starts_with("410"), "a used link: {code}");
    // Posted from another site: refused.
    let other = gw.login_link(&gw.w.admin).await;
    let opath = other
        .split_once(&format!(":{}", gw.port))
        .unwrap()
        .1
        .to_owned();
    let (code, _, _) = gw
        .curl(
            DOMAIN,
            &opath,
            &["-X", "POST", "-H", "Origin: https://evil.example"],
        )
        .await;
    assert!(code.starts_with("403"), "{code}");
    let (code, _, _) = gw
        .curl(
            DOMAIN,
            &opath,
            &["-X", "POST", "-H", "Sec-Fetch-Site: cross-site"],
        )
        .await;
    assert!(code.starts_with("403"), "{code}");
    // Expired.
    gw.w.store
        .call(|c| {
            c.execute("UPDATE web_links SET expires_at = 0", [])?;
            Ok(())
        })
        .await
        .unwrap();
    let (code, _, _) = gw.curl(DOMAIN, &opath, &["-X", "POST"]).await;
    assert!(code.starts_with("410"), "an expired link: {code}");
    // A hand-over code is for one host only.
    let me = gw.user(&gw.w.admin).await;
    let gate = gw.w.exec.gate();
    let code_for_web = gate
        .mint_handoff(&me, &format!("web.{DOMAIN}"))
        .await
        .unwrap();
    let (code, head, _) = gw
        .curl(
            &format!("other.{DOMAIN}"),
            &format!("/__kennel/handoff?code={code_for_web}&to=/"),
            &[],
        )
        .await;
    assert!(code.starts_with("400"), "{code} {head}");
    // Redirect targets stay on the host.
    for evil in [
        "//evil.example",
        "/%5Cevil.example",
        "https://evil.example/",
        "/a%0d%0aSet-Cookie:%20x=1",
    ] {
        let c = gate
            .mint_handoff(&me, &format!("web.{DOMAIN}"))
            .await
            .unwrap();
        let (code, head, _) = gw
            .curl(
                &format!("web.{DOMAIN}"),
                &format!("/__kennel/handoff?code={c}&to={evil}"),
                &[],
            )
            .await;
        assert!(code.starts_with("302"), "{code}");
        assert_eq!(location(&head), "/", "{evil} -> {head}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_public_and_private() {
    let gw = gateway().await;
    gw.project("web").await;
    // bob: a member; first an SSH-only share, then a web share.
    let bob = gw.member("42", 5).await;
    let bob_name = gw.user(&bob).await.name;
    gw.w.run(&gw.w.admin, &format!("share web {bob_name} --ssh"))
        .await
        .unwrap();
    gw.sign_in(&bob).await;
    let html = ["-L", "-H", "Accept: text/html"];
    let (code, _, body) = gw.curl(&format!("web.{DOMAIN}"), "/", &html).await;
    assert!(
        code.starts_with("403") && body.contains("not open to you"),
        "{code} {body}"
    );
    gw.w.run(&gw.w.admin, &format!("share web {bob_name} --web"))
        .await
        .unwrap();
    let (code, _, body) = gw.curl(&format!("web.{DOMAIN}"), "/", &html).await;
    assert!(code.starts_with("200"), "{code} {body}");
    assert_eq!(json(&body)["x-kennel-user"], bob_name.as_str());
    // public: anyone; private again: not.
    gw.w.run(&gw.w.admin, "public web").await.unwrap();
    let (code, _, body) = gw.curl(&format!("web.{DOMAIN}"), "/", &[ANON]).await;
    assert!(code.starts_with("200"), "{code} {body}");
    assert!(json(&body).get("x-kennel-user").is_none(), "{body}");
    // Its other ports stay private.
    let (code, _, _) = gw.curl(&format!("web--8080.{DOMAIN}"), "/", &[ANON]).await;
    assert!(code.starts_with("401"), "{code}");
    gw.w.run(&gw.w.admin, "private web").await.unwrap();
    let (code, _, _) = gw.curl(&format!("web.{DOMAIN}"), "/", &[ANON]).await;
    assert!(code.starts_with("401"), "{code}");
}

/// A stand-in app that counts the connections made to it and those that
/// ended: `/close` answers with `Connection: close`, `/big` with 2 MiB,
/// `/slow` with a first chunk and then nothing more (until its connection
/// goes); any other path with itself.
async fn counting_backend() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use http_body_util::combinators::BoxBody;
    type AppBody = BoxBody<Bytes, Infallible>;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (made, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (m, e) = (made.clone(), ended.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            m.fetch_add(1, Ordering::SeqCst);
            let e = e.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let path = req.uri().path().to_owned();
                        let mut r = http::Response::builder();
                        let body: AppBody = match path.as_str() {
                            "/big" => Full::new(Bytes::from(vec![b'x'; 2 << 20])).boxed(),
                            "/slow" => {
                                use futures_util::StreamExt;
                                let first = futures_util::stream::once(async {
                                    Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(
                                        vec![b's'; 1024],
                                    )))
                                });
                                let body = first.chain(futures_util::stream::pending());
                                BodyExt::boxed(http_body_util::StreamBody::new(body))
                            }
                            _ => {
                                if path == "/close" {
                                    r = r.header("connection", "close");
                                }
                                Full::new(Bytes::from(path)).boxed()
                            }
                        };
                        Ok::<_, Infallible>(r.body(body).unwrap())
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
                e.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, made, ended)
}

/// curl's `-w` text for an answer followed by its status.
const STATUS: &str = " %{http_code}\n";

/// curl's output for several URLs on `host` in one run (one client
/// connection, or streams of one with HTTP/2), each answer followed by
/// curl's `-w` text `w`.
async fn curl_all(gw: &Gw, host: &str, paths: &[&str], extra: &[&str], w: &str) -> String {
    let mut args = gw.curl_args();
    args.push("--resolve".into());
    args.push(format!("{host}:{}:127.0.0.1", gw.port));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    for p in paths {
        args.extend(["-w".to_owned(), w.to_owned()]);
        args.push(format!("https://{host}:{}{p}", gw.port));
    }
    let out = tokio::process::Command::new("curl")
        .args(&args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connection_keeps_its_own_connections_to_the_app() {
    let gw = gateway().await;
    let (app, made, ended) = counting_backend().await;
    *gw.w.vms.app_addr.lock().unwrap() = Some(app.to_string());
    gw.project("web").await;
    gw.w.run(&gw.w.admin, "public web").await.unwrap();
    let host = format!("web.{DOMAIN}");
    // HTTP/1.1: one client connection, its requests over one connection to
    // the app, made again after the app closed it.
    let out = curl_all(
        &gw,
        &host,
        &["/one", "/close", "/two", "/three"],
        &["--http1.1"],
        STATUS,
    )
    .await;
    assert_eq!(out, "/one 200\n/close 200\n/two 200\n/three 200\n");
    assert_eq!(made.load(Ordering::SeqCst), 2);
    // Large answers stream whole, over HTTP/1.1 and HTTP/2.
    for proto in ["--http1.1", "--http2"] {
        let out = curl_all(
            &gw,
            &host,
            &["/big"],
            &[proto, "-o", "/dev/null"],
            "%{size_download} %{http_code}\n",
        )
        .await;
        assert_eq!(out, "2097152 200\n", "{proto}");
    }
    // HTTP/2: concurrent streams, each answered with its own.
    let paths: Vec<String> = (0..12).map(|i| format!("/s{i}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    let saved = gw.dir.path().join("h2");
    let out = curl_all(
        &gw,
        &host,
        &paths,
        &[
            "--http2",
            "-Z",
            "--parallel-max",
            "6",
            "--remote-name-all",
            "--create-dirs",
            "--output-dir",
            saved.to_str().unwrap(),
        ],
        "%{http_code}\n",
    )
    .await;
    assert_eq!(out, "200\n".repeat(paths.len()));
    for p in &paths {
        let got = std::fs::read_to_string(saved.join(&p[1..])).unwrap();
        assert_eq!(&got, p);
    }
    // A client gone in the middle of an answer takes that connection to
    // the app with it; once every client has gone, so have all the
    // connections to the app (none is kept past its client's).
    let (code, _, body) = gw.curl(&host, "/slow", &[ANON, "--max-time", "2"]).await;
    assert!(
        code.starts_with("200") && body.len() == 1024,
        "{code} {}",
        body.len()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ended.load(Ordering::SeqCst) < made.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} connections to the app made, {} ended",
            made.load(Ordering::SeqCst),
            ended.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the app is still answered.
    let out = curl_all(&gw, &host, &["/after"], &[], STATUS).await;
    assert_eq!(out, "/after 200\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_project_wakes_on_a_request() {
    let gw = gateway().await;
    gw.project("web").await;
    gw.w.run(&gw.w.admin, "public web").await.unwrap();
    gw.w.run(&gw.w.admin, "stop web").await.unwrap();
    // A browser gets a page that reloads itself.
    let (code, head, body) = gw
        .curl(&format!("web.{DOMAIN}"), "/", &["-H", "Accept: text/html"])
        .await;
    assert!(
        code.starts_with("503") && body.contains("Starting web"),
        "{code} {body}"
    );
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 2"),
        "{head}"
    );
    // A script waits for the start and gets the app.
    gw.w.run(&gw.w.admin, "stop web").await.unwrap();
    let (code, _, body) = gw.curl(&format!("web.{DOMAIN}"), "/after", &[]).await;
    assert!(code.starts_with("200"), "{code} {body}");
    assert_eq!(json(&body)["path"], "/after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_and_idle_ones_are_closed() {
    use futures_util::{SinkExt, StreamExt};
    let gw = gateway_with(HttpsSettings {
        upgrade_idle_timeout: Duration::from_secs(2),
        ..HttpsSettings::default()
    })
    .await;
    gw.project("web").await;
    gw.w.run(&gw.w.admin, "public web").await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&gw.ca).unwrap();
    for c in rustls_pem_certs(&pem) {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(format!("web.{DOMAIN}")).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let url = format!("wss://web.{DOMAIN}:{}/ws", gw.port);
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(tokio_tungstenite::tungstenite::Message::Text(format!(
            "hello {i}"
        )))
        .await
        .unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap(), format!("hello {i}"));
    }
    // An open WebSocket keeps the project in use (idle stop).
    let later = std::time::Instant::now() + Duration::from_secs(3600);
    let idle = gw.w.exec.check_idle(later).await.unwrap();
    assert!(idle.stopped.is_empty(), "{idle:?}");
    let status = gw.w.text(&gw.w.admin, "status web").await;
    assert!(status.contains("in use now"), "{status}");
    // Silent both ways for longer than the upgrade idle timeout: closed.
    let end = tokio::time::timeout(Duration::from_secs(15), ws.next())
        .await
        .expect("an idle WebSocket is closed");
    assert!(!matches!(end, Some(Ok(ref m)) if m.is_text()), "{end:?}");
    // Closed, it no longer counts: half an hour later the VM is stopped.
    let mut stopped = Vec::new();
    for _ in 0..50 {
        let at = later + Duration::from_secs(31 * 60);
        stopped = gw.w.exec.check_idle(at).await.unwrap().stopped;
        if !stopped.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stopped.len(), 1, "the closed WebSocket still counts");
    let _ = gw.app;
}

fn rustls_pem_certs(pem: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_headers_slowly_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = gateway_with(HttpsSettings {
        header_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pem_certs(&std::fs::read(&gw.ca).unwrap()) {
        roots.add(c).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(DOMAIN.to_owned()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {DOMAIN}\r\nX-Slow: ");
    let mut closed = false;
    for b in request.bytes().chain(std::iter::repeat(b'a')).take(60) {
        if tls.write_all(&[b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {
                // hyper answers 408 as it closes.
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "the slow client was never dropped");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "dropped only after {:?}",
        started.elapsed()
    );
}

/// The whole sign-in in a real browser: a private app sends it to sign
/// in; the login link's confirm page and its button; the hand-over to the
/// app's host; the app's page with the user, and no cookie of Kennel's
/// that scripts could read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_signs_in_from_a_chat_link_and_reaches_the_private_app() {
    let gw = gateway().await;
    gw.project("web").await;
    let link = gw.login_link(&gw.w.admin).await;
    let me = gw.user(&gw.w.admin).await.name.to_string();
    let port = gw.port;
    let seen = tokio::task::spawn_blocking(move || {
        let mut b = kennel_testkit::browser::Browser::start(&format!(
            "MAP *.{DOMAIN} 127.0.0.1, MAP {DOMAIN} 127.0.0.1"
        ));
        let app = format!("https://web.{DOMAIN}:{port}/app?x=1");
        b.goto(&app);
        let before = b.source();
        assert!(
            b.url()
                .starts_with(&format!("https://{DOMAIN}:{port}/auth?")),
            "{}",
            b.url()
        );
        assert!(before.contains("login"), "{before}");
        // The link from chat: a confirm page; its button signs in.
        b.goto(&link);
        assert!(
            b.source().contains("Sign this browser in as"),
            "{}",
            b.source()
        );
        b.click("button");
        let home = b.source_with("You are signed in as", Duration::from_secs(20));
        assert!(home.contains("You are signed in as"), "{home}");
        // Back to the app: handed over to its host, and in.
        b.goto(&app);
        let url = b.url();
        let page = b.source();
        let cookies = b.eval("return document.cookie;");
        (url, page, cookies)
    })
    .await
    .unwrap();
    let (url, page, cookies) = seen;
    assert_eq!(url, format!("https://web.{DOMAIN}:{}/app?x=1", gw.port));
    assert!(
        page.contains(&format!("\"x-kennel-user\":\"{me}\"")),
        "{page}"
    );
    assert!(page.contains("\"path\":\"/app?x=1\""), "{page}");
    assert!(
        !page.contains("__Host-kennel"),
        "Kennel's cookie reached the app: {page}"
    );
    let cookies = cookies.as_str().unwrap_or("").to_owned();
    assert!(
        !cookies.contains("__Host-kennel"),
        "scripts can read the session: {cookies}"
    );
}

// ------------------------------------------------------------ share links

/// A share link of `project` made by the admin: its id and URL.
async fn share_link(gw: &Gw, line: &str) -> (i64, String) {
    match gw.w.run(&gw.w.admin, line).await {
        Ok(Reply::LinkCreated { id, url, .. }) => (id, url),
        other => panic!("{other:?}"),
    }
}

/// The path of a URL on the gateway (after `:PORT`).
fn path_of(gw: &Gw, url: &str) -> String {
    url.split_once(&format!(":{}", gw.port))
        .unwrap()
        .1
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_link_opens_one_project_once_until_revoked() {
    let gw = gateway().await;
    gw.project("web").await;
    gw.project("other").await;
    let (id, url) = share_link(&gw, "share web --link --note for-carol").await;
    assert!(
        url.starts_with(&format!("https://web.{DOMAIN}:{}/__kennel/link/", gw.port)),
        "{url}"
    );
    let path = path_of(&gw, &url);
    let token = path.rsplit('/').next().unwrap().to_owned();
    // Stored hashed: the token itself is nowhere in the store.
    let db =
        gw.w.store
            .call(|c| {
                let mut st = c.prepare("SELECT token_hash FROM share_links")?;
                let rows = st.query_map([], |r| r.get::<_, String>(0))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
            .unwrap();
    assert!(!db.iter().any(|h| h == &token), "{db:?}");

    // Unknown alike: the link on another project's host is refused (and
    // not used up); a made-up token too.
    let (unknown, _, unknown_body) = gw.curl(&format!("nosuch.{DOMAIN}"), "/", &[ANON]).await;
    for host in [format!("other.{DOMAIN}"), format!("web--8080.{DOMAIN}")] {
        let (code, _, body) = gw.curl(&host, &path, &[ANON, "-X", "POST"]).await;
        assert_eq!((code, body), (unknown.clone(), unknown_body.clone()));
    }
    let made_up = format!("/__kennel/link/{}", "0".repeat(64));
    let (code, _, _) = gw.curl(&format!("web.{DOMAIN}"), &made_up, &[ANON]).await;
    assert_eq!(code, unknown);

    // GET asks (a chat preview cannot use it up); POST redeems it.
    let (code, _, body) = gw.curl(&format!("web.{DOMAIN}"), &path, &[]).await;
    assert!(
        code.starts_with("200") && body.contains("Open web"),
        "{code} {body}"
    );
    let (code, head, _) = gw
        .curl(&format!("web.{DOMAIN}"), &path, &["-X", "POST"])
        .await;
    assert!(code.starts_with("303"), "{code} {head}");
    let cookie = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: __host-kennel-link=")
                .then(|| l.to_owned())
        })
        .unwrap_or_else(|| panic!("{head}"));
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("Secure") && !cookie.contains("Domain"),
        "{cookie}"
    );
    let session = cookie
        .split_once('=')
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    // In: the app, as an anonymous visitor; the cookie never reaches it.
    let html = ["-H", "Accept: text/html"];
    let (code, _, body) = gw.curl(&format!("web.{DOMAIN}"), "/page", &html).await;
    assert!(code.starts_with("200"), "{code} {body}");
    assert!(json(&body).get("x-kennel-user").is_none(), "{body}");
    assert!(!body.contains("__Host-kennel"), "{body}");
    // Nothing else: another project, another port, Kennel's dashboard.
    let with = format!("Cookie: __Host-kennel-link={session}");
    for host in [format!("other.{DOMAIN}"), format!("web--8080.{DOMAIN}")] {
        let (code, _, _) = gw.curl(&host, "/", &[ANON, "-H", &with]).await;
        assert!(code.starts_with("401"), "{host}: {code}");
    }
    let (code, _, body) = gw.curl(DOMAIN, "/", &[ANON, "-H", &with]).await;
    assert!(
        code.starts_with("200") && body.contains("To sign in"),
        "{code} {body}"
    );
    // Used once: the same URL in another browser answers as unknown.
    let (code, _, _) = gw.curl(&format!("web.{DOMAIN}"), &path, &[ANON]).await;
    assert_eq!(code, unknown);

    // `shares` lists it with its visit; every visit is audited.
    let text = gw.w.text(&gw.w.admin, "shares web").await;
    assert!(
        text.contains("for-carol") && text.contains(&id.to_string()),
        "{text}"
    );
    let Ok(Reply::Shares { links, .. }) = gw.w.run(&gw.w.admin, "shares web").await else {
        panic!()
    };
    assert_eq!(links.first().map(|l| l.visits), Some(1), "{links:?}");
    gw.audited(|e| e.action == "link redeemed" && e.target.as_deref() == Some("web"))
        .await;
    gw.audited(|e| e.action == "link visit" && e.detail.as_deref() == Some("/page"))
        .await;

    // Revoked: the live session ends at once.
    gw.w.run(&gw.w.admin, &format!("unshare web {id}"))
        .await
        .unwrap();
    let (code, _, _) = gw.curl(&format!("web.{DOMAIN}"), "/page", &[]).await;
    assert_eq!(code, unknown);
    assert!(gw
        .w
        .run(&gw.w.admin, &format!("unshare web {id}"))
        .await
        .is_err());

    // Expired: unknown alike.
    let (_, url) = share_link(&gw, "share web --link --expires 1s").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, _, _) = gw
        .curl(&format!("web.{DOMAIN}"), &path_of(&gw, &url), &[ANON])
        .await;
    assert_eq!(code, unknown);

    // A port's link opens that port's site only.
    let (_, url) = share_link(&gw, "share web --link --port 8080").await;
    assert!(url.contains(&format!("web--8080.{DOMAIN}")), "{url}");

    // Only the owner (or an admin) makes links; a member has a limit.
    let bob = gw.member("77", 7).await;
    let bob_name = gw.user(&bob).await.name;
    gw.w.run(&gw.w.admin, &format!("share web {bob_name}"))
        .await
        .unwrap();
    assert!(gw.w.run(&bob, "share web --link").await.is_err());
    for _ in 0..20 {
        let _ = gw.w.run(&gw.w.admin, "share other --link").await;
    }
    let e =
        gw.w.run(&gw.w.admin, "share other --link")
            .await
            .unwrap_err();
    assert!(e.to_string().contains("its limit"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_opens_a_share_link_sees_only_that_app_and_is_out_once_revoked() {
    let gw = gateway().await;
    gw.project("web").await;
    gw.project("other").await;
    let (id, link) = share_link(&gw, "share web --link").await;
    let port = gw.port;
    let (b, seen) = tokio::task::spawn_blocking(move || {
        let mut b = kennel_testkit::browser::Browser::start(&format!(
            "MAP *.{DOMAIN} 127.0.0.1, MAP {DOMAIN} 127.0.0.1"
        ));
        b.goto(&link);
        assert!(b.source().contains("Open web"), "{}", b.source());
        b.click("button");
        let app = b.source_with("\"path\":\"/\"", Duration::from_secs(20));
        let cookies = b.eval("return document.cookie;");
        // No dashboard, no other project.
        b.goto(&format!("https://{DOMAIN}:{port}/"));
        let kennel = b.source();
        b.goto(&format!("https://other.{DOMAIN}:{port}/"));
        let other = b.source();
        b.goto(&format!("https://web.{DOMAIN}:{port}/again"));
        let again = b.source();
        (b, (app, cookies, kennel, other, again))
    })
    .await
    .unwrap();
    let (app, cookies, kennel, other, again) = seen;
    assert!(app.contains("\"path\":\"/\""), "{app}");
    assert!(
        !cookies.as_str().unwrap_or("").contains("kennel"),
        "{cookies}"
    );
    assert!(kennel.contains("To sign in"), "{kennel}");
    assert!(!other.contains("\"path\""), "{other}");
    assert!(again.contains("\"path\":\"/again\""), "{again}");
    // Revoked: the next page is the sign-in page, not the app.
    gw.w.run(&gw.w.admin, &format!("unshare web {id}"))
        .await
        .unwrap();
    let after = tokio::task::spawn_blocking(move || {
        let mut b = b;
        b.goto(&format!("https://web.{DOMAIN}:{port}/after"));
        b.source()
    })
    .await
    .unwrap();
    assert!(!after.contains("\"path\""), "{after}");
    assert!(after.contains("login"), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_domain_serves_the_app_with_its_own_sign_in_until_removed() {
    use kennel_core::dns::{testing::FakeDns, DnsAnswer};
    let gw = gateway().await;
    gw.project("web").await;
    let dns = Arc::new(FakeDns::default());
    dns.set(
        "app.example.com",
        DnsAnswer {
            cname: Some(format!("web.{DOMAIN}")),
            addrs: vec![],
        },
    );
    gw.w.exec.set_dns(dns);
    // Not served before it is added: as any unknown name.
    let (unknown, _, _) = gw.curl("nosuch.example.com", "/", &[ANON, "-k"]).await;
    let (code, _, _) = gw.curl("app.example.com", "/", &[ANON, "-k"]).await;
    assert_eq!(code, unknown);
    gw.w.run(&gw.w.admin, "domain add web app.example.com")
        .await
        .unwrap();
    // Private: a visitor is sent to sign in, for that host.
    let html = ["-k", "-H", "Accept: text/html"];
    let (code, head, _) = gw.curl("app.example.com", "/x?y=1", &html).await;
    assert!(code.starts_with("302"), "{code} {head}");
    assert!(
        location(&head).contains("/auth?host=app.example.com&to=/x%3Fy%3D1"),
        "{head}"
    );
    // Signed in at Kennel's host: handed over to the custom domain with a
    // cookie of its own, and in.
    gw.sign_in(&gw.w.admin).await;
    let me = gw.user(&gw.w.admin).await.name.to_string();
    let (code, _, body) = gw
        .curl(
            "app.example.com",
            "/x?y=1",
            &["-k", "-L", "-H", "Accept: text/html"],
        )
        .await;
    assert!(code.starts_with("200"), "{code} {body}");
    assert_eq!(json(&body)["x-kennel-user"], me.as_str());
    assert_eq!(json(&body)["path"], "/x?y=1");
    let jar = std::fs::read_to_string(gw.dir.path().join("cookies")).unwrap();
    assert!(
        jar.lines().any(|l| l
            .trim_start_matches("#HttpOnly_")
            .starts_with("app.example.com\t")
            && l.contains("__Host-kennel")),
        "{jar}"
    );
    // Removed: unknown again.
    gw.w.run(&gw.w.admin, "domain rm web app.example.com")
        .await
        .unwrap();
    let (code, _, _) = gw.curl("app.example.com", "/", &[ANON, "-k"]).await;
    assert_eq!(code, unknown);
}

// ------------------------------------------------------------ the HTTP API

/// A new API token of `who`'s.
async fn api_token(gw: &Gw, who: &Identity, line: &str) -> String {
    match gw.w.run(who, line).await {
        Ok(Reply::TokenCreated { token, .. }) => token,
        other => panic!("{other:?}"),
    }
}

/// `POST /api/v1/exec` with `line` and `token`: (status, body).
async fn api(gw: &Gw, token: &str, line: &str, extra: &[&str]) -> (String, String) {
    let auth = format!("Authorization: Bearer {token}");
    let mut args = vec![ANON, "-H", &auth, "--data-binary", line];
    args.extend_from_slice(extra);
    let (code, _, body) = gw.curl(DOMAIN, "/api/v1/exec", &args).await;
    (code.split(' ').next().unwrap_or("").to_owned(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_token_runs_commands_until_revoked_and_errors_have_their_status() {
    let gw = gateway().await;
    let token = api_token(&gw, &gw.w.admin, "token create ci").await;
    // A line as text, and as JSON.
    let (code, body) = api(&gw, &token, "whoami", &[]).await;
    assert_eq!(code, "200", "{body}");
    assert_eq!(json(&body)["ok"], true);
    let (code, body) = api(
        &gw,
        &token,
        r#"{"line": "new project web --stack rust"}"#,
        &["-H", "Content-Type: application/json"],
    )
    .await;
    assert_eq!(code, "200", "{body}");
    // Each kind of error, its status.
    for (line, status) in [
        ("prjects", "400"),
        ("status nosuch", "404"),
        ("new project web --stack rust", "409"),
    ] {
        let (code, body) = api(&gw, &token, line, &[]).await;
        assert_eq!(code, status, "{line}: {body}");
        assert_eq!(json(&body)["ok"], false, "{body}");
    }
    // A member's token is refused what members may not do.
    let bob = gw.member("42", 6).await;
    let bobs = api_token(&gw, &bob, "token create laptop").await;
    let (code, body) = api(&gw, &bobs, "users", &[]).await;
    assert_eq!(code, "403", "{body}");
    let (code, body) = api(&gw, &bobs, "rm web", &[]).await;
    assert_eq!(code, "403", "{body}");
    // Audited under the token's label.
    gw.audited(|e| e.identity == "http:token:ci" && e.action == "new project")
        .await;
    // Listed, never shown again; revoked, refused.
    let Ok(Reply::Tokens { tokens }) = gw.w.run(&gw.w.admin, "tokens").await else {
        panic!()
    };
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].last_used_at.is_some());
    gw.w.run(&gw.w.admin, "token rm ci").await.unwrap();
    let (code, body) = api(&gw, &token, "whoami", &[]).await;
    assert_eq!(code, "401", "{body}");
    // No token, a made-up one, a cookie instead: 401.
    let (code, _, _) = gw
        .curl(DOMAIN, "/api/v1/exec", &[ANON, "--data", "whoami"])
        .await;
    assert!(code.starts_with("401"), "{code}");
    let (code, _) = api(&gw, &"0".repeat(64), "whoami", &[]).await;
    assert_eq!(code, "401");
    // An expired token.
    let short = api_token(&gw, &gw.w.admin, "token create short --expires 1s").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, _) = api(&gw, &short, "whoami", &[]).await;
    assert_eq!(code, "401");
    // The description.
    let (code, _, body) = gw.curl(DOMAIN, "/api/v1/openapi.json", &[ANON]).await;
    assert!(code.starts_with("200"), "{code}");
    assert!(json(&body)["paths"]["/api/v1/exec"]["post"].is_object());
}

/// One mapping from an error to its status, whoever made the mistake and
/// however the caller signed in: a caller's mistake is a 4xx, the host's
/// failure a 5xx, a store that cannot be read 503 for tokens and
/// signatures alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_each_error_kind_with_its_one_status() {
    require("ssh-keygen", "openssh-client");
    let gw = gateway().await;
    let token = api_token(&gw, &gw.w.admin, "token create ci").await;
    let (code, body) = api(&gw, &token, "new project web --stack rust", &[]).await;
    assert_eq!(code, "200", "{body}");
    // A member asking for a name that is taken: a conflict (409), as
    // `rename` into a taken name is, not a refusal.
    let bob = gw.member("43", 7).await;
    let bobs = api_token(&gw, &bob, "token create laptop").await;
    for line in ["new project web --stack rust", "rename web other"] {
        let (code, body) = api(
            &gw,
            if line.starts_with("new") {
                &bobs
            } else {
                &token
            },
            line,
            &[],
        )
        .await;
        if line.starts_with("rename") {
            // The admin's rename into a free name works; into a taken one, 409.
            assert_eq!(code, "200", "{line}: {body}");
            continue;
        }
        assert_eq!(code, "409", "{line}: {body}");
        assert_eq!(json(&body)["error"]["kind"], "conflict", "{body}");
    }
    gw.w.run(&gw.w.admin, "new project third --stack rust")
        .await
        .unwrap();
    let (code, body) = api(&gw, &token, "rename other third", &[]).await;
    assert_eq!(code, "409", "{body}");
    assert_eq!(json(&body)["error"]["kind"], "conflict", "{body}");
    // The user's own mistake, found by the provisioner (a target directory
    // that is not empty): 422, never 500.
    gw.w.vms
        .refuse_next_create("/srv/x exists and is not empty; pass --adopt to use it");
    let (code, body) = api(&gw, &token, "new project mistaken --stack rust", &[]).await;
    assert_eq!(code, "422", "{body}");
    assert_eq!(json(&body)["error"]["kind"], "invalid", "{body}");
    assert!(body.contains("not empty"), "{body}");
    // The host's failure: 500.
    gw.w.vms.fail_next_create("qemu exited");
    let (code, body) = api(&gw, &token, "new project broken --stack rust", &[]).await;
    assert_eq!(code, "500", "{body}");
    assert_eq!(json(&body)["error"]["kind"], "failed", "{body}");
    // The store gone: 503, whether the caller holds a token or signs.
    let (key, public) = kennel_testkit::ssh::keygen(gw.dir.path(), "signer");
    gw.w.run(&gw.w.admin, &format!("key add \"{public}\""))
        .await
        .unwrap();
    gw.w.store.close();
    let (code, body) = api(&gw, &token, "whoami", &[]).await;
    assert_eq!(code, "503", "{body}");
    assert_eq!(json(&body)["error"]["kind"], "unavailable", "{body}");
    let now = kennel_core::model::now();
    let (code, body) = signed_call(
        &gw,
        &key,
        "whoami",
        now,
        "nonce-store-0123456789",
        "kennel-api",
    )
    .await;
    assert_eq!(code, "503", "{body}");
    assert_eq!(json(&body)["error"]["kind"], "unavailable", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_progress_streams_as_ndjson_and_calls_are_rate_limited() {
    let gw = gateway_with(HttpsSettings {
        api_per_minute: 3,
        ..HttpsSettings::default()
    })
    .await;
    let token = api_token(&gw, &gw.w.admin, "token create").await;
    let (code, body) = api(
        &gw,
        &token,
        "new project web --stack rust",
        &["-H", "Accept: application/x-ndjson", "-N"],
    )
    .await;
    assert_eq!(code, "200", "{body}");
    let lines: Vec<serde_json::Value> = body.lines().map(json).collect();
    assert!(lines.len() >= 2, "{body}");
    assert!(lines[0]["progress"]["stage"].is_string(), "{body}");
    let last = lines.last().unwrap();
    assert_eq!(last["ok"], true, "{body}");
    // Three calls a minute: the next two (2nd, 3rd) pass, the 4th waits.
    for _ in 0..2 {
        let (code, _) = api(&gw, &token, "whoami", &[]).await;
        assert_eq!(code, "200");
    }
    let (code, _, body) = gw
        .curl(
            DOMAIN,
            "/api/v1/exec",
            &[
                ANON,
                "-H",
                &format!("Authorization: Bearer {token}"),
                "--data",
                "whoami",
            ],
        )
        .await;
    assert!(code.starts_with("429"), "{code} {body}");
    assert_eq!(json(&body)["error"]["kind"], "rate_limited");
}

/// An SSH-signed `POST /api/v1/exec` of `line`, signed by `key` with
/// `ssh-keygen -Y sign` at time `ts` with `nonce` in `namespace`.
async fn signed_call(
    gw: &Gw,
    key: &std::path::Path,
    line: &str,
    ts: i64,
    nonce: &str,
    namespace: &str,
) -> (String, String) {
    use kennel_gateway::https::api::signed_message;
    let msg = signed_message(ts, nonce, DOMAIN, "POST", "/api/v1/exec", line.as_bytes());
    let file = gw.dir.path().join(format!("msg-{nonce}"));
    std::fs::write(&file, msg).unwrap();
    let sig = file.with_file_name(format!("msg-{nonce}.sig"));
    let _ = std::fs::remove_file(&sig);
    let ok = tokio::process::Command::new("ssh-keygen")
        .args(["-q", "-Y", "sign", "-n", namespace, "-f"])
        .arg(key)
        .arg(&file)
        .status()
        .await
        .unwrap();
    assert!(ok.success());
    let out = tokio::process::Command::new("base64")
        .args(["-w0"])
        .arg(&sig)
        .output()
        .await
        .unwrap();
    let b64 = String::from_utf8(out.stdout).unwrap();
    let (ts, nonce, sig) = (
        format!("X-Kennel-Timestamp: {ts}"),
        format!("X-Kennel-Nonce: {nonce}"),
        format!("X-Kennel-Signature: {b64}"),
    );
    let (code, _, body) = gw
        .curl(
            DOMAIN,
            "/api/v1/exec",
            &[
                ANON,
                "-H",
                &ts,
                "-H",
                &nonce,
                "-H",
                &sig,
                "--data-binary",
                line,
            ],
        )
        .await;
    (code.split(' ').next().unwrap_or("").to_owned(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_signed_api_requests_need_no_token_and_cannot_be_replayed() {
    require("ssh-keygen", "openssh-client");
    let gw = gateway().await;
    let (key, public) = kennel_testkit::ssh::keygen(gw.dir.path(), "admin-key");
    gw.w.run(&gw.w.admin, &format!("key add \"{public}\""))
        .await
        .unwrap();
    let now = kennel_core::model::now();
    let nonce = "nonce-0123456789abcdef";
    let (code, body) = signed_call(&gw, &key, "whoami", now, nonce, "kennel-api").await;
    assert_eq!(code, "200", "{body}");
    assert_eq!(json(&body)["ok"], true, "{body}");
    // The same with the script people use (scripts/kennel-call).
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kennel-call");
    let out = tokio::process::Command::new(&script)
        .arg("whoami")
        .env("KENNEL_URL", format!("https://{DOMAIN}:{}", gw.port))
        .env("KEY", &key)
        .env(
            "CURL_OPTS",
            format!(
                "--cacert {} --resolve {DOMAIN}:{}:127.0.0.1",
                gw.ca.display(),
                gw.port
            ),
        )
        .output()
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        json(&body)["ok"],
        true,
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same request again: a replay.
    let (code, body) = signed_call(&gw, &key, "whoami", now, nonce, "kennel-api").await;
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("replay"), "{body}");
    // Too old, another namespace, a key that is nobody's: refused.
    let old = now - 600;
    let (code, body) = signed_call(
        &gw,
        &key,
        "whoami",
        old,
        "nonce-old-0123456789",
        "kennel-api",
    )
    .await;
    assert_eq!(code, "401", "{body}");
    let (code, body) = signed_call(&gw, &key, "whoami", now, "nonce-ns-0123456789ab", "file").await;
    assert_eq!(code, "401", "{body}");
    // A timestamp at the end of the range must not overflow anything.
    let (code, _) = signed_call(
        &gw,
        &key,
        "whoami",
        i64::MIN,
        "nonce-min-0123456789ab",
        "kennel-api",
    )
    .await;
    assert_eq!(code, "401");
    let (stranger, _) = kennel_testkit::ssh::keygen(gw.dir.path(), "stranger");
    let (code, body) = signed_call(
        &gw,
        &stranger,
        "whoami",
        now,
        "nonce-str-0123456789ab",
        "kennel-api",
    )
    .await;
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("not an active key"), "{body}");
    // A command that changes something: audited under the key's
    // fingerprint.
    let (code, body) = signed_call(
        &gw,
        &key,
        "new project web --stack rust",
        now,
        "nonce-new-0123456789ab",
        "kennel-api",
    )
    .await;
    assert_eq!(code, "200", "{body}");
    gw.audited(|e| e.identity.starts_with("http:ssh:SHA256:") && e.action == "new project")
        .await;
    // Reads too, over the API.
    gw.audited(|e| e.identity.starts_with("http:ssh:SHA256:") && e.action == "whoami")
        .await;
}

// ------------------------------------------------------------ the dashboard

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_projects_acts_and_updates_live() {
    let gw = gateway().await;
    gw.project("web").await;
    gw.project("shop").await;
    let link = gw.login_link(&gw.w.admin).await;
    let port = gw.port;
    let (exec, admin) = (gw.w.exec.clone(), gw.w.admin.clone());
    let rt = tokio::runtime::Handle::current();
    let shots = std::env::var_os("KENNEL_SCREENSHOTS").map(std::path::PathBuf::from);
    let (page, after_stop, after_start, live, running_buttons, stopped_buttons) =
        tokio::task::spawn_blocking(move || {
        let mut b = kennel_testkit::browser::Browser::start(&format!(
            "MAP *.{DOMAIN} 127.0.0.1, MAP {DOMAIN} 127.0.0.1"
        ));
        b.resize(1280, 800);
        b.goto(&link);
        b.click("button");
        let page = b.source_with("data-state=\"web\"", Duration::from_secs(20));
        if let Some(dir) = &shots {
            std::fs::write(dir.join("dashboard.png"), b.screenshot()).unwrap();
        }
        // A button: its answer streams into the page (progress, then what
        // chat would say), and the state follows.
        let state = |b: &mut kennel_testkit::browser::Browser| {
            b.eval("return document.querySelector('[data-state=\"web\"]').textContent;")
                .as_str()
                .unwrap_or("")
                .to_owned()
        };
        let said = |b: &mut kennel_testkit::browser::Browser| {
            let t = std::time::Instant::now();
            loop {
                let v = b.eval("const p = document.getElementById('said'); return [p.dataset.done || '', p.textContent];");
                if v[0] == "yes" || t.elapsed() > Duration::from_secs(20) {
                    return v[1].as_str().unwrap_or("").to_owned();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        let wait_state = |b: &mut kennel_testkit::browser::Browser, want: &str| {
            let t = std::time::Instant::now();
            let mut now = state(b);
            while now != want && t.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(200));
                now = state(b);
            }
            now
        };
        // Only the buttons that apply show: a running project has stop
        // and restart, not start; stopped, the other way round.
        let shown = |b: &mut kennel_testkit::browser::Browser, label: &str| {
            b.eval(&format!(
                "return document.querySelector('button[aria-label=\"{label}\"]').checkVisibility();"
            ))
        };
        let running_buttons = [
            shown(&mut b, "start web"),
            shown(&mut b, "stop web"),
            shown(&mut b, "restart web"),
        ];
        b.click("button[aria-label=\"stop web\"]");
        let after_stop = (said(&mut b), wait_state(&mut b, "stopped"));
        let stopped_buttons = [
            shown(&mut b, "start web"),
            shown(&mut b, "stop web"),
            shown(&mut b, "restart web"),
        ];
        b.click("button[aria-label=\"start web\"]");
        let after_start = (said(&mut b), wait_state(&mut b, "running"));
        // Live: a stop from chat shows without a reload.
        rt.block_on(async {
            let out = exec
                .front_door(&admin, None, "stop web", kennel_core::Style::PLAIN, &kennel_core::provision::NoProgress)
                .await;
            assert!(out.outcome.is_ok(), "{:?}", out.outcome);
        });
        let live = wait_state(&mut b, "stopped");
        if let Some(dir) = &shots {
            b.eval("document.getElementById('said').hidden = true; window.scrollTo(0, 0); return 1;");
            b.resize(390, 844);
            std::fs::write(dir.join("dashboard-phone.png"), b.screenshot()).unwrap();
        }
        (page, after_stop, after_start, live, running_buttons, stopped_buttons)
    })
    .await
    .unwrap();
    assert!(page.contains("You are signed in as"), "{page}");
    for needle in [
        "data-state=\"web\">running<",
        "data-state=\"shop\"",
        "ssh web@",
        "vscode://vscode-remote/ssh-remote+kennel-web/workspace",
        &format!("https://web.{DOMAIN}:{port}"),
    ] {
        assert!(page.contains(needle), "{needle} not in {page}");
    }
    assert!(after_stop.0.contains("… stopping"), "{after_stop:?}");
    assert!(after_stop.0.contains("web is stopped"), "{after_stop:?}");
    assert_eq!(after_stop.1, "stopped");
    assert!(after_start.0.contains("… booting"), "{after_start:?}");
    assert_eq!(after_start.1, "running");
    assert_eq!(live, "stopped", "the state did not update live");
    let (t, f) = (
        serde_json::Value::Bool(true),
        serde_json::Value::Bool(false),
    );
    assert_eq!(
        running_buttons,
        [f.clone(), t.clone(), t.clone()],
        "running"
    );
    assert_eq!(stopped_buttons, [t, f.clone(), f], "stopped");
    // A POST without the form's CSRF token is refused, even with the
    // session cookie.
    gw.sign_in(&gw.w.admin).await;
    let (code, _, body) = gw.curl(DOMAIN, "/do", &["--data", "line=start+web"]).await;
    assert!(code.starts_with("403"), "{code} {body}");
    let (code, _, _) = gw
        .curl(DOMAIN, "/run", &["--data", "line=start+web&csrf=0000"])
        .await;
    assert!(code.starts_with("403"), "{code}");
    let Ok(Reply::Status { project, .. }) = gw.w.run(&gw.w.admin, "status web").await else {
        panic!()
    };
    assert_eq!(
        project.state.as_str(),
        "stopped",
        "the forged POST did nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_runs_commands_resizes_and_shares_by_link_with_a_qr_code() {
    let gw = gateway().await;
    gw.project("web").await;
    gw.w.exec
        .set_guest_shell(Arc::new(kennel_core::guest::EchoGuest));
    let dns = Arc::new(kennel_core::dns::testing::FakeDns::default());
    dns.set(
        "app.example.com",
        kennel_core::dns::DnsAnswer {
            cname: Some(format!("web.{DOMAIN}")),
            addrs: vec![],
        },
    );
    gw.w.exec.set_dns(dns);
    let link = gw.login_link(&gw.w.admin).await;
    let port = gw.port;
    // A closed project's VM asked for a name (shown on the dashboard).
    gw.w.exec
        .egress_asked(kennel_core::egress::EgressAsked {
            project: kennel_core::names::ProjectName::new("web").unwrap(),
            dest: "api.example.com".into(),
        })
        .await;
    let seen = tokio::task::spawn_blocking(move || {
        let mut b = kennel_testkit::browser::Browser::start(&format!(
            "MAP *.{DOMAIN} 127.0.0.1, MAP {DOMAIN} 127.0.0.1"
        ));
        b.goto(&link);
        b.click("button");
        b.source_with("data-state=\"web\"", Duration::from_secs(20));
        // The page's own stylesheet applies (no inline styles under its CSP).
        let styled = b.eval("return getComputedStyle(document.querySelector('.p')).borderRadius;");
        let open = "document.querySelectorAll('details').forEach((d) => { d.open = true; });";
        // run: the output streams into the page, then the exit code.
        b.eval(&format!("{open} document.querySelector('input[aria-label=\"command to run in web\"]').value = 'false --flag \"two words\"'; return 1;"));
        b.click("button[aria-label=\"run in web\"]");
        let t = std::time::Instant::now();
        let mut ran = String::new();
        while t.elapsed() < Duration::from_secs(20) {
            let v = b.eval("const p = document.getElementById('said'); return [p.dataset.done || '', p.textContent];");
            if v[0] == "yes" {
                ran = v[1].as_str().unwrap_or("").to_owned();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // resize from its form.
        b.eval(&format!("{open} document.querySelector('input[aria-label=\"CPUs of web\"]').value = '4'; document.querySelector('input[aria-label=\"disk of web\"]').form.submit(); return 1;"));
        let resized = b.source_with("vCPUs", Duration::from_secs(20));
        // A share link: the URL and its QR code, listed with a revoke button.
        b.eval(&format!("{open} document.querySelector('input[aria-label=\"link note of web\"]').value = 'for carol'; document.querySelector('input[aria-label=\"link note of web\"]').form.submit(); return 1;"));
        let linked = b.source_with("Share link", Duration::from_secs(20));
        let qr = b.eval("const i = document.querySelector('img.qr'); return i ? [i.complete, i.naturalWidth] : null;");
        b.goto(&format!("https://{DOMAIN}:{port}/"));
        b.eval(&format!("{open} return 1;"));
        let listed = b.source();
        b.click("button[aria-label^=\"revoke link\"]");
        let revoked = b.source_with("is revoked", Duration::from_secs(20));
        // A custom domain: added from its form, listed, removed.
        b.eval(&format!("{open} document.querySelector('input[aria-label=\"custom domain of web\"]').value = 'app.example.com'; document.querySelector('input[aria-label=\"custom domain of web\"]').form.submit(); return 1;"));
        let domained = b.source_with("is served at", Duration::from_secs(20));
        b.eval(&format!("{open} return 1;"));
        let domain_listed = b.source();
        b.click("button[aria-label=\"remove the domain app.example.com of web\"]");
        let undomained = b.source_with("no longer served", Duration::from_secs(20));
        // An egress ask: listed with its answers; Allow decides it.
        b.goto(&format!("https://{DOMAIN}:{port}/"));
        let asks = b.source_with("Egress asks", Duration::from_secs(20));
        b.click("button[aria-label=\"allow api.example.com for web\"]");
        let allowed = b.source_with("Done", Duration::from_secs(20));
        (styled, ran, resized, linked, qr, listed, revoked, (domained, domain_listed, undomained, asks, allowed))
    })
    .await
    .unwrap();
    let (
        styled,
        ran,
        resized,
        linked,
        qr,
        listed,
        revoked,
        (domained, domain_listed, undomained, asks, allowed),
    ) = seen;
    assert!(
        asks.contains("tried to reach <code>api.example.com</code>"),
        "{asks}"
    );
    assert!(allowed.contains("api.example.com"), "{allowed}");
    let Ok(Reply::Egress { egress, .. }) = gw.w.run(&gw.w.admin, "egress web").await else {
        panic!()
    };
    assert!(egress.asked.is_empty(), "{egress:?}");
    assert!(
        egress.rules.iter().any(|r| r.dest == "api.example.com"),
        "{egress:?}"
    );
    assert!(
        domained.contains(&format!("web is served at https://app.example.com:{port}")),
        "{domained}"
    );
    assert!(
        domain_listed.contains("aria-label=\"custom domains of web\""),
        "{domain_listed}"
    );
    assert!(
        undomained.contains("web is no longer served at app.example.com"),
        "{undomained}"
    );
    assert_eq!(styled, "10px", "the stylesheet did not apply");
    assert!(ran.contains("guest says: false --flag two words"), "{ran}");
    assert!(ran.contains("exited with 3"), "{ran}");
    assert!(resized.contains("2 → 4 vCPUs"), "{resized}");
    assert!(
        linked.contains(&format!("https://web.{DOMAIN}:{port}/__kennel/link/")),
        "{linked}"
    );
    assert_eq!(qr[0], true, "{qr}");
    assert!(qr[1].as_u64().unwrap_or(0) > 20, "{qr}");
    assert!(listed.contains("(for carol)"), "{listed}");
    assert!(revoked.contains("is revoked"), "{revoked}");
    let Ok(Reply::Shares { links, .. }) = gw.w.run(&gw.w.admin, "shares web").await else {
        panic!()
    };
    assert!(links.is_empty(), "{links:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_makes_projects_approves_requests_keeps_keys_and_secrets_and_follows_logs() {
    let gw = gateway().await;
    let bob = Identity::new(Frontend::Discord, "77");
    let key = ed25519(9, Some("bob"));
    let Ok(Reply::RequestFiled { request, .. }) =
        gw.w.run(&bob, &format!("request-access {key} bob's laptop"))
            .await
    else {
        panic!()
    };
    let link = gw.login_link(&gw.w.admin).await;
    let (id, port) = (request.id, gw.port);
    let new_key = ed25519(10, Some("desk")).to_string();
    let (made, approved, keyed, secreted, seen) = tokio::task::spawn_blocking(move || {
        let mut b = kennel_testkit::browser::Browser::start(&format!(
            "MAP *.{DOMAIN} 127.0.0.1, MAP {DOMAIN} 127.0.0.1"
        ));
        b.goto(&link);
        b.click("button");
        let page = b.source_with("Access requests", Duration::from_secs(20));
        assert!(page.contains("<h2>Users</h2>"), "{page}");
        assert!(page.contains("bob&#39;s laptop") || page.contains("bob's laptop"), "{page}");
        // New project: its progress streams into the page.
        b.eval("document.querySelector('#new [name=name]').value = 'fresh'; document.querySelector('#new [name=stack]').value = 'rust'; document.querySelector('#new [name=cpus]').value = '1'; return 1;");
        b.click("#new button");
        let t = std::time::Instant::now();
        let mut made = String::new();
        while t.elapsed() < Duration::from_secs(30) {
            let v = b.eval("const p = document.getElementById('progress'); return [p.dataset.done || '', p.textContent];");
            if v[0] == "yes" {
                made = v[1].as_str().unwrap_or("").to_owned();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Approve bob's request.
        b.goto(&format!("https://{DOMAIN}:{port}/"));
        b.click(&format!("button[aria-label=\"approve request {id}\"]"));
        let approved = b.source_with("Done", Duration::from_secs(20));
        // A key pasted in, a secret set: the value never shows.
        let submit = |b: &mut kennel_testkit::browser::Browser, field: &str, js: &str| {
            b.eval(&format!(
                "{js}; document.querySelector('input[name={field}]').form.submit(); return 1;"
            ));
        };
        submit(
            &mut b,
            "key",
            &format!("document.querySelector('input[name=key]').value = '{new_key}'; document.querySelector('input[name=label]').value = 'desk'"),
        );
        let keyed = b.source_with("desk</td>", Duration::from_secs(20));
        submit(
            &mut b,
            "secret",
            "document.querySelector('input[name=secret]').value = 'git-token'; document.querySelector('input[name=value]').value = 'hunter2-secret-value'",
        );
        let secreted = b.source_with("<code>git-token</code>", Duration::from_secs(20));
        // The log, followed live.
        b.goto(&format!("https://{DOMAIN}:{port}/logs?project=fresh"));
        let t = std::time::Instant::now();
        let mut seen = serde_json::Value::Null;
        while t.elapsed() < Duration::from_secs(20) {
            seen = b.eval("const l = document.getElementById('log'); return l.dataset.seen === 'yes' ? l.textContent : null;");
            if !seen.is_null() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // port, then rm with the question chat asks, answered by a button.
        b.goto(&format!("https://{DOMAIN}:{port}/"));
        b.eval("document.querySelectorAll('details').forEach((d) => { d.open = true; }); document.querySelector('input[aria-label=\"app port of fresh\"]').value = '9000'; document.querySelector('input[aria-label=\"app port of fresh\"]').form.submit(); return 1;");
        let ported = b.source_with("9000", Duration::from_secs(20));
        assert!(ported.contains("port 9000"), "{ported}");
        // Tags from the form, then shown under the project's name.
        b.eval("document.querySelectorAll('details').forEach((d) => { d.open = true; }); document.querySelector('input[aria-label=\"tags of fresh\"]').value = 'web team-x'; document.querySelector('input[aria-label=\"tags of fresh\"]').form.submit(); return 1;");
        let tagged = b.source_with("tags: team-x, web", Duration::from_secs(20));
        assert!(tagged.contains("fresh's tags: team-x, web"), "{tagged}");
        b.goto(&format!("https://{DOMAIN}:{port}/"));
        let listed = b.source_with("team-x web", Duration::from_secs(20));
        assert!(
            listed.contains("aria-label=\"tags of fresh\">team-x web</small>"),
            "{listed}"
        );
        // A checkpoint taken by its button (the answer streams in), then a
        // rollback to it: the question chat asks, answered by a button.
        b.eval("document.querySelectorAll('details').forEach((d) => { d.open = true; }); return 1;");
        b.click("button[aria-label=\"take checkpoint fresh\"]");
        let t = std::time::Instant::now();
        let mut taken = String::new();
        while t.elapsed() < Duration::from_secs(20) && !taken.contains("Checkpoint c1 of fresh taken") {
            std::thread::sleep(Duration::from_millis(100));
            taken = b.eval("return document.getElementById('said').textContent;").as_str().unwrap_or("").to_owned();
        }
        assert!(taken.contains("Checkpoint c1 of fresh taken"), "{taken}");
        b.eval("document.querySelectorAll('details').forEach((d) => { d.open = true; }); document.querySelector('input[aria-label=\"roll fresh back to\"]').value = 'c1'; document.querySelector('input[aria-label=\"roll fresh back to\"]').form.submit(); return 1;");
        let asked = b.source_with("Yes, do it", Duration::from_secs(20));
        assert!(asked.contains("checkpoint c1"), "{asked}");
        b.click("button[aria-label=\"confirm\"]");
        let rolled = b.source_with("back at checkpoint c1", Duration::from_secs(20));
        assert!(rolled.contains("rollback fresh auto-1"), "{rolled}");
        b.eval("document.querySelectorAll('details').forEach((d) => { d.open = true; }); return 1;");
        b.click("button[aria-label=\"remove fresh\"]");
        let asked = b.source_with("Yes, do it", Duration::from_secs(20));
        assert!(asked.contains("Yes, do it"), "{asked}");
        b.click("button[aria-label=\"confirm\"]");
        // Wait for the answer to the confirmation, not the question (both
        // pages say "Done").
        let removed = b.source_with("fresh is gone", Duration::from_secs(20));
        assert!(!removed.contains("data-state=\"fresh\""), "{removed}");
        (made, approved, keyed, secreted, seen)
    })
    .await
    .unwrap();
    assert!(keyed.contains("desk</td>"), "{keyed}");
    assert!(secreted.contains("<code>git-token</code>"), "{secreted}");
    assert!(
        !secreted.contains("hunter2-secret-value"),
        "a secret's value was shown"
    );
    assert!(!seen.is_null(), "the log view never filled");
    assert!(made.contains("… "), "no progress lines: {made}");
    assert!(made.contains("fresh"), "{made}");
    assert!(approved.contains("Done"), "{approved}");
    // Made with the stack asked for (the recording provisioner saw it),
    // then removed through the question.
    assert!(
        gw.w.vms.calls().iter().any(|c| c.contains("fresh")),
        "{:?}",
        gw.w.vms.calls()
    );
    assert!(gw.w.run(&gw.w.admin, "status fresh").await.is_err());
    let Ok(Reply::Requests { requests }) = gw.w.run(&gw.w.admin, "requests --all").await else {
        panic!()
    };
    let r = requests.iter().find(|r| r.id == id).unwrap();
    assert_eq!(r.state.as_str(), "approved", "{r:?}");
}
