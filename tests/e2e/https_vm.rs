//! The HTTPS gateway in front of a real guest (QEMU/TCG): a Node server
//! in the VM answers through `kennel serve`'s gateway, over HTTP/1.1 and
//! HTTP/2 with curl, a WebSocket (tungstenite) reaches a guest's echo
//! server, `port` moves a running VM's app at once, another port
//! of the VM is reached through its sshd for a signed-in user, and a
//! stopped project wakes on a request, its `.kennel/start` bringing the
//! app back (scripts wait for it, browsers see the starting page).
#![cfg(feature = "vm-tests")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use crate::support::{curl, Kennel};

/// Echoes the request's headers as JSON.
const SERVER_JS: &str = r#"
const http = require('http');
const port = Number(process.argv[2] || 3000);
http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ port, path: req.url, headers: req.headers }));
}).listen(port, '0.0.0.0');
"#;

/// A WebSocket echo written out by hand (Node has no WebSocket server
/// of its own): text frames in, "echo: TEXT" frames out.
const WS_JS: &str = r#"
const http = require('http'), crypto = require('crypto');
const port = Number(process.argv[2] || 3002);
const srv = http.createServer((req, res) => res.end('websocket only'));
srv.on('upgrade', (req, sock) => {
  const accept = crypto.createHash('sha1')
    .update(req.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' + accept + '\r\n\r\n');
  let buf = Buffer.alloc(0);
  sock.on('data', d => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 2) {
      const op = buf[0] & 0x0f; let len = buf[1] & 0x7f, off = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
      else if (len === 127) { sock.destroy(); return; }
      const masked = buf[1] & 0x80;
      if (buf.length < off + (masked ? 4 : 0) + len) return;
      const mask = masked ? buf.subarray(off, off + 4) : null; if (masked) off += 4;
      const p = Buffer.from(buf.subarray(off, off + len));
      if (mask) for (let i = 0; i < len; i++) p[i] ^= mask[i & 3];
      buf = buf.subarray(off + len);
      if (op === 8) { sock.end(); return; }
      if (op === 1) {
        const t = Buffer.from('echo: ' + p.toString());
        const h = t.length < 126 ? Buffer.from([0x81, t.length]) : Buffer.from([0x81, 126, t.length >> 8, t.length & 255]);
        sock.write(Buffer.concat([h, t]));
      }
    }
  });
});
srv.listen(port, '0.0.0.0');
"#;

/// Signs a cookie jar in as the console's admin: the `login` link,
/// confirmed by its POST.
fn sign_in(k: &Kennel) -> std::path::PathBuf {
    let out = k.exec_ok("login");
    let url = out
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .unwrap_or_else(|| panic!("no link in {out}"))
        .to_owned();
    let jar = k.dir.join("cookies");
    let ca = k.dir.join("kennel-data/tls/dev-ca/ca.pem");
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "--cacert",
        ])
        .arg(&ca)
        .arg("-c")
        .arg(&jar)
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", k.https_port))
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "303", "{out:?}");
    jar
}

/// A browser-like visit with the signed-in jar: the hand-over redirects
/// through Kennel's host are followed.
fn curl_signed_in(k: &Kennel, jar: &std::path::Path, host: &str, path: &str) -> (String, String) {
    let mut extra: Vec<String> = vec!["-L".into(), "-H".into(), "Accept: text/html".into()];
    for flag in ["-b", "-c"] {
        extra.push(flag.into());
        extra.push(jar.display().to_string());
    }
    extra.push("--resolve".into());
    extra.push(format!("localhost:{}:127.0.0.1", k.https_port));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    curl(k, host, path, &extra)
}

#[test]
fn a_guest_app_answers_through_the_https_gateway_and_wakes_on_a_request() {
    let tmp = tempfile::tempdir().unwrap();
    let mut k = Kennel::new(tmp.path());
    k.start_serve();
    k.exec_ok("new project site --stack node --cpus 1 --memory 768M --disk 3G");
    let source = tmp.path().join("kennel-data/projects/site");
    std::fs::write(source.join("server.js"), SERVER_JS).unwrap();
    std::fs::write(source.join("ws.js"), WS_JS).unwrap();
    let start = |port: u16| {
        format!("nohup node /workspace/server.js {port} >/tmp/server-{port}.log 2>&1 </dev/null & sleep 0.2")
    };
    k.ssh_ok("site", &start(3000));
    k.ssh_ok("site", &start(3001));
    k.ssh_ok(
        "site",
        "nohup node /workspace/ws.js 3002 >/tmp/ws.log 2>&1 </dev/null & sleep 0.2",
    );
    let host = "site.localhost";
    // Private: a script without a session is refused.
    let (code, _) = curl(&k, host, "/", &[]);
    assert!(code.starts_with("401"), "{code}");
    k.exec_ok("public site");
    // The server takes a moment to listen under TCG.
    let t = Instant::now();
    let (code, body) = loop {
        let (code, body) = curl(
            &k,
            host,
            "/hello?x=1",
            &["--http1.1", "-H", "X-Kennel-User: mallory"],
        );
        if code.starts_with("200") || t.elapsed() > Duration::from_secs(180) {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(code, "200 1.1", "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["path"], "/hello?x=1");
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    assert_eq!(v["headers"]["host"], format!("{host}:{}", k.https_port));
    assert!(v["headers"].get("x-kennel-user").is_none(), "{v}");
    let (code, body) = curl(&k, host, "/two", &["--http2"]);
    assert_eq!(code, "200 2", "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["port"],
        3000
    );
    // `port` on the running VM: the next request goes to the new port.
    // The second server may still be starting under TCG (on a loaded
    // host, seconds after the first answers): wait until it listens.
    k.ssh_ok(
        "site",
        "for i in $(seq 1 120); do curl -s -o /dev/null http://127.0.0.1:3001/ && exit 0; sleep 0.5; done; cat /tmp/server-3001.log; exit 1",
    );
    k.exec_ok("port site 3001");
    let (code, body) = curl(&k, host, "/three", &[]);
    assert!(code.starts_with("200"), "{code} {body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["port"],
        3001
    );
    // A WebSocket through the gateway to the guest's echo server.
    k.exec_ok("port site 3002");
    let ca = k.dir.join("kennel-data/tls/dev-ca/ca.pem");
    // The server may still be starting under TCG.
    let t = Instant::now();
    let back = loop {
        match kennel_testkit::ws::try_echo(&ca, host, k.https_port, "/socket", &["one", "two"]) {
            Ok(b) => break b,
            Err(e) if t.elapsed() < Duration::from_secs(180) => {
                eprintln!("websocket: {e}; again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(back, ["echo: one", "echo: two"]);
    k.exec_ok("port site 3001");
    // Another port of the VM (`NAME--PORT`), reached through the VM's
    // sshd: private even though the project is public.
    let other = "site--3000.localhost";
    let (code, _) = curl(&k, other, "/", &[]);
    assert!(code.starts_with("401"), "{code}");
    let jar = sign_in(&k);
    let (code, body) = curl_signed_in(&k, &jar, other, "/via-ssh");
    assert!(code.starts_with("200"), "{code} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["port"], 3000, "{v}");
    assert_eq!(v["path"], "/via-ssh");
    assert!(v["headers"]["x-kennel-user"].is_string(), "{v}");
    // Nothing listens on that port: the gateway says so.
    let (code, _) = curl_signed_in(&k, &jar, "site--3999.localhost", "/");
    assert!(code.starts_with("502"), "{code}");
    // Stopped: a request wakes it. Without a start script nothing starts
    // the server again, and the gateway says the app is not answering.
    k.exec_ok("port site 3000");
    k.exec_ok("stop site");
    let (code, body) = curl(&k, host, "/", &[]);
    assert!(code.starts_with("502"), "{code} {body}");
    assert_eq!(k.state("site").0, "running");
    // With `.kennel/start`, the guest starts the server at boot, and the
    // request that woke the VM waits for it: the app's own answer.
    std::fs::create_dir_all(source.join(".kennel")).unwrap();
    std::fs::write(
        source.join(".kennel/start"),
        "exec node /workspace/server.js 3000\n",
    )
    .unwrap();
    k.exec_ok("stop site");
    let woke = Instant::now();
    let (code, body) = curl(&k, host, "/after-wake", &[]);
    assert!(code.starts_with("200"), "{code} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["path"], "/after-wake");
    eprintln!(
        "wake by an HTTPS request to the app's answer: {:?}",
        woke.elapsed()
    );
    // A browser is shown the starting page until the app answers.
    k.exec_ok("stop site");
    let t = Instant::now();
    let mut pages = 0;
    let body = loop {
        let (code, body) = curl(&k, host, "/page", &["-H", "Accept: text/html"]);
        if code.starts_with("200") {
            break body;
        }
        assert!(
            code.starts_with("503") && body.contains("Starting site"),
            "{code} {body}"
        );
        assert!(t.elapsed() < Duration::from_secs(300), "still starting");
        pages += 1;
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(pages >= 1 && body.contains("/page"), "{pages} {body}");
}
