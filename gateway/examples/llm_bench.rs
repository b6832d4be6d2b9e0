//! The LLM gateway's overhead, for `bench/llm.sh`: the same
//! OpenAI-compatible upstream reached directly (TCP, keep-alive) and
//! through Kennel's metadata service (a project's socket, the owner's key
//! added on the way), side by side in one run.
//!
//!     llm_bench [REQUESTS] [STREAMS]     the benchmark (prints a table)
//!     llm_bench upstream                 the upstream alone (prints its port)
//!     llm_bench gateway URL DIR          the metadata service alone
//!
//! The upstream and the gateway are processes of their own, so each one's
//! CPU time and memory are read from /proc. Measured: per-request latency
//! (p50/p99, a small JSON answer), time to the first streamed chunk, and
//! STREAMS concurrent streamed answers (20 chunks 20 ms apart each): the
//! gateway's CPU against the upstream's for the same answers, and its RSS.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::cast_precision_loss
)]

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kennel_core::testing::World;
use kennel_core::Settings;
use kennel_gateway::meta::{MetaService, MetaSettings};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

const CHUNKS: usize = 20;
const CHUNK_GAP: Duration = Duration::from_millis(20);

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match a.get(1).map(String::as_str) {
        Some("upstream") => rt.block_on(upstream()),
        Some("gateway") => rt.block_on(gateway(&a[2], Path::new(&a[3]))),
        _ => {
            let requests = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
            let streams = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(50);
            rt.block_on(bench(requests, streams));
        }
    }
}

// ------------------------------------------------------------ the upstream

async fn upstream() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", l.local_addr().unwrap().port());
    loop {
        let (s, _) = l.accept().await.unwrap();
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(answer);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        });
    }
}

async fn answer(
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Body>, Infallible> {
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
    if !stream {
        let b = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
        return Ok(http::Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b.as_bytes())).boxed())
            .unwrap());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        for i in 0..CHUNKS {
            if i > 0 {
                tokio::time::sleep(CHUNK_GAP).await;
            }
            let c =
                format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"token{i} \"}}}}]}}\n\n");
            if tx.send(Ok(Frame::data(Bytes::from(c)))).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(
                b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":20,\"total_tokens\":25}}\n\ndata: [DONE]\n\n",
            ))))
            .await;
    });
    let s =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    Ok(http::Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(s).boxed())
        .unwrap())
}

// ------------------------------------------------------------- the gateway

async fn gateway(url: &str, dir: &Path) {
    let w = World::new()
        .settings(Settings {
            llm_requests_per_minute: u32::MAX,
            llm_tokens_per_day: u64::MAX,
            ..Settings::default()
        })
        .build();
    let out = w.text(&w.admin, "new project app --stack rust").await;
    assert!(out.contains("app"), "{out}");
    let out = w.text(&w.admin, "secret set openai-api-key sk-bench").await;
    assert!(out.contains("Stored"), "{out}");
    let svc = MetaService::new(
        w.exec.gate(),
        MetaSettings {
            dir: dir.to_owned(),
            openai_url: url.to_owned(),
            ..MetaSettings::default()
        },
    )
    .unwrap();
    let sock = MetaService::socket_of(dir, &kennel_core::names::ProjectName::new("app").unwrap());
    let run = tokio::spawn(svc.run(None, std::future::pending()));
    while !sock.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("ready");
    let _ = run.await;
}

// ---------------------------------------------------------- the benchmark

/// One way to the upstream.
#[derive(Clone)]
enum Way {
    Direct(u16),
    Gateway(PathBuf),
}

impl Way {
    fn path(&self) -> &'static str {
        match self {
            Way::Direct(_) => "/v1/chat/completions",
            Way::Gateway(_) => "/llm/openai/v1/chat/completions",
        }
    }

    async fn connect(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        macro_rules! hand {
            ($io:expr) => {{
                let (send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new($io))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                send
            }};
        }
        match self {
            Way::Direct(port) => {
                let s = tokio::net::TcpStream::connect(("127.0.0.1", *port))
                    .await
                    .unwrap();
                s.set_nodelay(true).unwrap();
                hand!(s)
            }
            Way::Gateway(sock) => hand!(tokio::net::UnixStream::connect(sock).await.unwrap()),
        }
    }
}

fn request(way: &Way, stream: bool) -> http::Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"bench","stream":{stream},"messages":[{{"role":"user","content":"say ok"}}]}}"#
    );
    http::Request::post(way.path())
        .header("host", "metadata.kennel.internal")
        .header("content-type", "application/json")
        .header("authorization", "Bearer kennel-metadata")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Sequential small requests on one keep-alive connection: latencies, µs.
async fn latencies(way: &Way, n: usize) -> Vec<u64> {
    let mut send = way.connect().await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let resp = send.send_request(request(way, false)).await.unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        resp.into_body().collect().await.unwrap();
        out.push(t.elapsed().as_micros() as u64);
    }
    out
}

/// Time to the first chunk of a streamed answer, µs; reads the rest.
async fn first_chunk(way: &Way, n: usize) -> Vec<u64> {
    let mut send = way.connect().await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let resp = send.send_request(request(way, true)).await.unwrap();
        let mut body = resp.into_body();
        let mut first = None;
        while let Some(f) = body.frame().await {
            if f.unwrap().is_data() && first.is_none() {
                first = Some(t.elapsed().as_micros() as u64);
            }
        }
        out.push(first.unwrap());
    }
    out
}

/// `n` streamed answers at once, each on its own connection; how long.
async fn concurrent(way: &Way, n: usize) -> Duration {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let way = way.clone();
        tasks.push(tokio::spawn(async move {
            let mut send = way.connect().await;
            let resp = send.send_request(request(&way, true)).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(body.ends_with(b"[DONE]\n\n"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    t.elapsed()
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)] as f64 / 1000.0
}

/// A child's CPU time (user + system), ms, and RSS, KiB.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = 100.0; // USER_HZ on Linux
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (ticks as f64 * 1000.0 / hz, rss)
}

fn spawn(args: &[&str]) -> (Child, String) {
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap();
    // LLM_BENCH_WRAP="valgrind --tool=callgrind" profiles the gateway.
    let wrap: Vec<String> = match std::env::var("LLM_BENCH_WRAP") {
        Ok(w) if args.first() == Some(&"gateway") => {
            w.split_whitespace().map(str::to_owned).collect()
        }
        _ => Vec::new(),
    };
    let mut cmd = match wrap.split_first() {
        Some((prog, rest)) => {
            let mut c = Command::new(prog);
            c.args(rest).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let mut c = cmd.args(args).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(c.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (c, line.trim().to_owned())
}

async fn bench(requests: usize, streams: usize) {
    let dir = std::env::temp_dir().join(format!("kennel-llm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut up, port) = spawn(&["upstream"]);
    let port: u16 = port.parse().unwrap();
    let url = format!("http://127.0.0.1:{port}/v1");
    let (mut gw, ready) = spawn(&["gateway", &url, dir.to_str().unwrap()]);
    assert_eq!(ready, "ready");
    // The client on the other CPU (bench/llm.sh starts all on CPU 0).
    if std::thread::available_parallelism().map_or(1, usize::from) >= 2 {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status();
    }
    let ways = [
        ("direct", Way::Direct(port)),
        (
            "gateway",
            Way::Gateway(MetaService::socket_of(
                &dir,
                &kennel_core::names::ProjectName::new("app").unwrap(),
            )),
        ),
    ];
    // Warm both (connections, the store's first queries).
    for (_, w) in &ways {
        latencies(w, 50).await;
        first_chunk(w, 3).await;
    }
    println!("LLM gateway overhead: {requests} small requests, {} streamed (first chunk), {streams} concurrent streams of {CHUNKS} chunks {} ms apart", requests / 20, CHUNK_GAP.as_millis());
    println!();
    println!("| way | p50 ms | p99 ms | first chunk p50 ms | p99 ms | {streams} streams s | upstream CPU ms | gateway CPU ms | gateway RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, w) in &ways {
        let (u0, _) = usage(up.id());
        let (g0, _) = usage(gw.id());
        let mut lat = latencies(w, requests).await;
        let mut first = first_chunk(w, (requests / 20).max(10)).await;
        let (u1, _) = usage(up.id());
        let (g1, _) = usage(gw.id());
        let took = concurrent(w, streams).await;
        let (u2, _) = usage(up.id());
        let (g2, rss) = usage(gw.id());
        let row = (
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            pct(&mut first, 0.5),
            pct(&mut first, 0.99),
            took.as_secs_f64(),
            u2 - u1,
            g2 - g1,
            rss as f64 / 1024.0,
            (u1 - u0, g1 - g0),
        );
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} |",
            row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7
        );
        rows.push(row);
    }
    let (d, g) = (&rows[0], &rows[1]);
    println!();
    println!(
        "added by the gateway: p50 {:+.2} ms, p99 {:+.2} ms, first chunk p50 {:+.2} ms",
        g.0 - d.0,
        g.1 - d.1,
        g.2 - d.2
    );
    println!(
        "CPU for {streams} concurrent streams: upstream {:.0} ms, gateway {:.0} ms; the gateway path costs {:.2}x the direct one (upstream + gateway over upstream)",
        g.5,
        g.6,
        (g.5 + g.6) / d.5.max(1.0)
    );
    println!(
        "CPU per small request: upstream {:.3} ms, gateway {:.3} ms (the gateway's includes the store: usage count and audit line)",
        d.8 .0 / requests as f64,
        g.8 .1 / requests as f64
    );
    if std::env::var_os("LLM_BENCH_WRAP").is_some() {
        // A profiler writes its data on a clean signal, not on SIGKILL.
        let _ = Command::new("kill").arg(gw.id().to_string()).status();
        let _ = gw.wait();
    }
    let _ = gw.kill();
    let _ = up.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
