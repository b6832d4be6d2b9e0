//! Incus's event stream (`GET /1.0/events`, a WebSocket): lifecycle
//! events as they happen, so Kennel knows an instance stopped (from
//! inside, or by an operator's `incus stop`) without asking Incus about
//! every project every few seconds.

use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

use super::client::{IncusClient, IncusError};

/// One lifecycle event, as much of it as Kennel reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Lifecycle {
    /// `instance-started`, `instance-stopped`, `instance-shutdown`, …
    pub action: String,
    /// `/1.0/instances/NAME?project=P`.
    #[serde(default)]
    pub source: String,
}

impl Lifecycle {
    /// The instance the event is about, if it is about one.
    pub fn instance(&self) -> Option<&str> {
        let rest = self.source.strip_prefix("/1.0/instances/")?;
        let name = rest.split(['?', '/']).next()?;
        (!name.is_empty()).then_some(name)
    }
}

#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    metadata: serde_json::Value,
}

/// An open event stream.
pub struct Events {
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// The next lifecycle event; `None` when the stream ended (the daemon
    /// went away: open another).
    pub async fn next(&mut self) -> Option<Lifecycle> {
        while let Some(msg) = self.ws.next().await {
            let text = match msg {
                Ok(Message::Text(t)) => t,
                Ok(Message::Binary(b)) => String::from_utf8_lossy(&b).into_owned(),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            };
            let Ok(env) = serde_json::from_str::<Envelope>(&text) else {
                tracing::debug!("an Incus event Kennel cannot read");
                continue;
            };
            if env.kind != "lifecycle" {
                continue;
            }
            if let Ok(l) = serde_json::from_value::<Lifecycle>(env.metadata) {
                return Some(l);
            }
        }
        None
    }
}

impl IncusClient {
    /// Opens the stream of lifecycle events of this client's project.
    pub async fn events(&self) -> Result<Events, IncusError> {
        let what = "the event stream";
        let (io, host) = self.connect_io().await?;
        let http = |source| IncusError::Http {
            address: self.address(),
            what: what.to_owned(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            // Runs until the upgraded stream is dropped.
            let _ = conn.with_upgrades().await;
        });
        let req = Request::builder()
            .method(Method::GET)
            .uri(self.uri("/1.0/events", &[("type", "lifecycle")]))
            .header("host", host)
            .header("user-agent", "kennel")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header(
                "sec-websocket-key",
                tokio_tungstenite::tungstenite::handshake::client::generate_key(),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| IncusError::Decode {
                what: what.to_owned(),
                detail: e.to_string(),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(IncusError::Api {
                what: what.to_owned(),
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(http)?;
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
        Ok(Events { ws })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_name_their_instance() {
        let l = Lifecycle {
            action: "instance-stopped".into(),
            source: "/1.0/instances/myapp?project=default".into(),
        };
        assert_eq!(l.instance(), Some("myapp"));
        let l = Lifecycle {
            action: "instance-snapshot-created".into(),
            source: "/1.0/instances/myapp/snapshots/s1".into(),
        };
        assert_eq!(l.instance(), Some("myapp"));
        let l = Lifecycle {
            action: "network-updated".into(),
            source: "/1.0/networks/kbr".into(),
        };
        assert_eq!(l.instance(), None);
    }
}
