//! A real WebSocket client (tungstenite) over TLS (rustls, trusting one
//! CA file), for tests of the HTTPS gateway in front of real apps.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::{self, Message};

/// Opens `wss://HOST:PORT/PATH` on 127.0.0.1:`port` (SNI and `Host` are
/// `host`), trusting only `ca`; sends each of `texts` and returns the
/// text answered to each, in order. `Err` when the WebSocket could not be
/// opened (e.g. the server is not listening yet).
pub fn try_echo(
    ca: &Path,
    host: &str,
    port: u16,
    path: &str,
    texts: &[&str],
) -> Result<Vec<String>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let tls = rustls::StreamOwned::new(conn, tcp);
    let url = format!("wss://{host}:{port}{path}");
    let (mut ws, resp) = tungstenite::client(url.as_str(), Tls(tls)).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)) => {
            format!("the handshake was answered {}", r.status())
        }
        other => other.to_string(),
    })?;
    assert_eq!(resp.status(), 101);
    let mut out = Vec::new();
    for t in texts {
        ws.send(Message::Text((*t).to_owned())).unwrap();
        loop {
            match ws.read().unwrap() {
                Message::Text(s) => {
                    out.push(s);
                    break;
                }
                Message::Close(_) => panic!("the server closed the WebSocket"),
                _ => {}
            }
        }
    }
    let _ = ws.close(None);
    Ok(out)
}

/// A TLS stream tungstenite can own.
struct Tls(rustls::StreamOwned<rustls::ClientConnection, TcpStream>);

impl Read for Tls {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Tls {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
