//! A real Chromium, headless, driven over WebDriver by `chromedriver`
//! (Debian's `chromium` and `chromium-driver`). As root it runs with
//! `--no-sandbox`; every browser gets a fresh profile.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A browser session; dropped, it quits the browser and the driver.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// WebDriver's name for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Starts a browser; `host_rules` map names to addresses (Chromium's
    /// `--host-resolver-rules`, e.g. `MAP *.example.test 127.0.0.1`).
    ///
    /// # Panics
    /// If Chromium or chromedriver is missing or does not start.
    #[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    pub fn start(host_rules: &str) -> Self {
        let chromium = crate::require("chromium", "chromium");
        crate::require("chromedriver", "chromium-driver");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "chromedriver did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = vec![
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-gpu".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
            format!("--host-resolver-rules={host_rules}"),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let mut b = Self {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let v = b.call("POST", "/session", Some(&caps));
        b.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        b
    }

    /// Opens `url` and waits for it to load.
    pub fn goto(&mut self, url: &str) {
        self.cmd("POST", "url", Some(&json!({ "url": url })));
    }

    /// The current URL.
    pub fn url(&mut self) -> String {
        self.cmd("GET", "url", None)
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// The page's HTML.
    pub fn source(&mut self) -> String {
        self.cmd("GET", "source", None)
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// The page's HTML once it contains `needle` (a click's navigation
    /// finishes after the click returns), or as it is after `limit`.
    pub fn source_with(&mut self, needle: &str, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            let s = self.source();
            if s.contains(needle) || t.elapsed() > limit {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the first element matching the CSS selector.
    #[allow(clippy::panic)]
    pub fn click(&mut self, css: &str) {
        let v = self.cmd(
            "POST",
            "element",
            Some(&json!({"using": "css selector", "value": css})),
        );
        let id = v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned();
        self.cmd("POST", &format!("element/{id}/click"), Some(&json!({})));
    }

    /// A PNG of the viewport.
    #[allow(clippy::unwrap_used)]
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let v = self.cmd("GET", "screenshot", None);
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap()
    }

    /// Sets the window's size (CSS pixels).
    pub fn resize(&mut self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "window/rect",
            Some(&json!({"width": width, "height": height})),
        );
    }

    /// Runs `script` in the page; returns its value.
    pub fn eval(&mut self, script: &str) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            Some(&json!({"script": script, "args": []})),
        )
    }

    fn cmd(&mut self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let p = format!("/session/{}/{path}", self.session);
        self.call(method, &p, body)["value"].clone()
    }

    /// One WebDriver call over HTTP/1.1 (chromedriver answers with a
    /// Content-Length).
    #[allow(clippy::unwrap_used, clippy::panic)]
    fn call(&mut self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l
                .to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
            {
                len = v.parse().unwrap_or(0);
            }
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf).unwrap();
        let v: Value = serde_json::from_slice(&buf)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&buf)));
        if v["value"].get("error").is_some() {
            panic!("WebDriver {method} {path}: {}", v["value"]);
        }
        v
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let p = format!("/session/{}", self.session);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.call("DELETE", &p, None)
            }));
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
