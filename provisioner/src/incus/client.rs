//! A typed client for the Incus REST API, over the daemon's Unix socket or
//! over HTTPS with a client certificate (a remote cluster).
//!
//! Every call opens its own HTTP/1.1 connection (a control plane makes a
//! few calls per user action; no pool to go stale when a member restarts)
//! and has a deadline. Background operations are waited for with
//! `/1.0/operations/UUID/wait`, in steps, until the caller's deadline.
//! A failed operation's `wait` answers with an error envelope carrying the
//! operation's own message (measured on Incus 6.0), which becomes a typed
//! [`IncusError`] the same way a refused request does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use super::api::{
    Envelope, Image, ImageAlias, Instance, InstanceState, InstancesPost, Member, MemberAction,
    MemberState, Operation, Server, StateAction, StatePut, StorageVolume,
};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A byte stream to the daemon: a Unix socket or TLS over TCP.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why an Incus call failed.
#[derive(Debug, thiserror::Error)]
pub enum IncusError {
    #[error(
        "cannot reach Incus at {address}: {source}; is incusd running, and is incus.address right?"
    )]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Incus at {address} did not answer {what} within {seconds} s")]
    Timeout {
        address: String,
        what: String,
        seconds: u64,
    },
    #[error("{what}: not found in Incus ({message})")]
    NotFound { what: String, message: String },
    #[error("{what}: already exists in Incus")]
    Exists { what: String },
    #[error("{what}: the instance is already running")]
    AlreadyRunning { what: String },
    #[error("{what}: the instance is not running")]
    NotRunning { what: String },
    /// The server cannot run this kind of instance (VMs without KVM).
    #[error("{what}: this Incus server cannot run it ({message}); set incus.instance_type = \"container\" or add members with KVM")]
    Unsupported { what: String, message: String },
    /// The member that holds the instance does not answer.
    #[error("host {member} is offline")]
    MemberOffline { member: String },
    #[error("Incus refused {what} ({status}): {message}")]
    Api {
        what: String,
        status: u16,
        message: String,
    },
    #[error("{what}: Incus answered something that is not what its API describes: {detail}")]
    Decode { what: String, detail: String },
    #[error("talking to Incus at {address} failed ({what})")]
    Http {
        address: String,
        what: String,
        #[source]
        source: hyper::Error,
    },
    #[error("incus TLS settings: {0}")]
    Tls(String),
}

impl IncusError {
    /// Whether this says the thing asked about does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, IncusError::NotFound { .. })
    }
}

/// Turns an error answer (a refused request or a failed operation) into
/// a typed error. Incus gives only a code and a sentence; these are the
/// sentences Incus 6.0 was seen to give for each case.
pub fn classify(what: &str, code: u16, message: &str) -> IncusError {
    let what = what.to_owned();
    let lower = message.to_ascii_lowercase();
    if code == 404 || lower.ends_with("not found") {
        IncusError::NotFound {
            what,
            message: message.to_owned(),
        }
    } else if lower.contains("already running") {
        IncusError::AlreadyRunning { what }
    } else if lower.contains("is not running") || lower.contains("already stopped") {
        IncusError::NotRunning { what }
    } else if lower.contains("is not supported on this server")
        || lower.contains("not supported by the server")
    {
        IncusError::Unsupported {
            what,
            message: message.to_owned(),
        }
    } else if lower.contains("already exists") || lower.contains("unique constraint failed") {
        IncusError::Exists { what }
    } else {
        IncusError::Api {
            what,
            status: code,
            message: message.to_owned(),
        }
    }
}

/// One request, before it is sent.
struct Outgoing<'a> {
    method: Method,
    uri: &'a str,
    body: Body,
    content_type: &'a str,
    headers: &'a [(&'a str, String)],
}

/// Where the daemon is.
#[derive(Clone)]
enum Endpoint {
    Unix(PathBuf),
    Https {
        /// `host:port`.
        authority: String,
        server_name: ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
    },
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Https { authority, .. } => write!(f, "https://{authority}"),
        }
    }
}

/// A client of one Incus server or cluster, in one Incus project.
#[derive(Debug, Clone)]
pub struct IncusClient {
    endpoint: Endpoint,
    project: String,
    /// Deadline of one request (waiting for operations has its own).
    timeout: Duration,
}

/// Characters left as they are in a path segment or query value.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// One path segment, percent-encoded (names come from users).
pub fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

impl IncusClient {
    /// A client of the daemon at `socket` (e.g. `/var/lib/incus/unix.socket`).
    pub fn unix(socket: &Path, project: &str) -> Self {
        Self {
            endpoint: Endpoint::Unix(socket.to_owned()),
            project: project.to_owned(),
            timeout: Duration::from_secs(30),
        }
    }

    /// A client of a remote server or cluster at `https://HOST:PORT`,
    /// proving itself with `client_cert`/`client_key` (PEM) and knowing
    /// the server by its certificate `server_cert` (PEM), pinned: Incus
    /// servers' certificates are self-signed.
    pub fn https(
        url: &str,
        client_cert: &[u8],
        client_key: &[u8],
        server_cert: &[u8],
        project: &str,
    ) -> Result<Self, IncusError> {
        let authority = url
            .strip_prefix("https://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| {
                IncusError::Tls(format!(
                    "incus.address {url:?} is neither a Unix socket path nor https://HOST:PORT"
                ))
            })?;
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:8443")
        };
        let host = authority
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(&authority);
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| IncusError::Tls(format!("{host:?} is not a host name or address")))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(client_cert)
            .collect::<Result<_, _>>()
            .map_err(|e| IncusError::Tls(format!("client certificate: {e}")))?;
        if chain.is_empty() {
            return Err(IncusError::Tls(
                "client certificate: no PEM certificate".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(client_key)
            .map_err(|e| IncusError::Tls(format!("client key: {e}")))?;
        let pinned = CertificateDer::from_pem_slice(server_cert)
            .map_err(|e| IncusError::Tls(format!("server certificate: {e}")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(Pinned {
            cert: pinned,
            provider: provider.clone(),
        });
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| IncusError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| IncusError::Tls(format!("client certificate and key: {e}")))?;
        Ok(Self {
            endpoint: Endpoint::Https {
                authority,
                server_name,
                tls: Arc::new(tls),
            },
            project: project.to_owned(),
            timeout: Duration::from_secs(30),
        })
    }

    /// The same client with another per-request deadline.
    #[must_use]
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The Incus project this client works in.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// Where the daemon is, for messages.
    pub fn address(&self) -> String {
        format!("{:?}", self.endpoint)
    }

    async fn exchange<S>(
        &self,
        io: S,
        req: Request<Body>,
        what: &str,
        etag: Option<&std::sync::Mutex<Option<String>>>,
    ) -> Result<(u16, Bytes), IncusError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http = |source| IncusError::Http {
            address: self.address(),
            what: what.to_owned(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(http)?;
        let driver = tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status().as_u16();
        if let Some(slot) = etag {
            let value = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            *slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
        }
        let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
        driver.abort();
        Ok((status, body))
    }

    /// Sends one request; the answer's status and body.
    async fn send(
        &self,
        out: Outgoing<'_>,
        what: &str,
        deadline: Duration,
    ) -> Result<(u16, Bytes), IncusError> {
        self.send_inner(out, what, deadline, None).await
    }

    /// [`Self::send`], keeping the answer's ETag in `etag` when given.
    async fn send_inner(
        &self,
        out: Outgoing<'_>,
        what: &str,
        deadline: Duration,
        etag: Option<&std::sync::Mutex<Option<String>>>,
    ) -> Result<(u16, Bytes), IncusError> {
        let Outgoing {
            method,
            uri: path_and_query,
            body,
            content_type,
            headers,
        } = out;
        let connect = |source| IncusError::Connect {
            address: self.address(),
            source,
        };
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "incus",
            Endpoint::Https { authority, .. } => authority.as_str(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", host)
            .header("content-type", content_type)
            .header("user-agent", "kennel");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req.body(body).map_err(|e| IncusError::Decode {
            what: what.to_owned(),
            detail: format!("cannot build the request: {e}"),
        })?;
        let fut = async {
            match &self.endpoint {
                Endpoint::Unix(socket) => {
                    let s = tokio::net::UnixStream::connect(socket)
                        .await
                        .map_err(connect)?;
                    self.exchange(s, req, what, etag).await
                }
                Endpoint::Https {
                    authority,
                    server_name,
                    tls,
                } => {
                    let tcp = tokio::net::TcpStream::connect(authority.as_str())
                        .await
                        .map_err(connect)?;
                    let _ = tcp.set_nodelay(true);
                    let s = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(server_name.clone(), tcp)
                        .await
                        .map_err(connect)?;
                    self.exchange(s, req, what, etag).await
                }
            }
        };
        tokio::time::timeout(deadline, fut)
            .await
            .map_err(|_| IncusError::Timeout {
                address: self.address(),
                what: what.to_owned(),
                seconds: deadline.as_secs(),
            })?
    }

    /// A fresh connection to the daemon (the events WebSocket runs on
    /// one of its own), and the `host` header requests on it carry.
    pub(super) async fn connect_io(&self) -> Result<(Box<dyn Io>, String), IncusError> {
        let connect = |source| IncusError::Connect {
            address: self.address(),
            source,
        };
        match &self.endpoint {
            Endpoint::Unix(socket) => {
                let s = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(connect)?;
                Ok((Box::new(s), "incus".to_owned()))
            }
            Endpoint::Https {
                authority,
                server_name,
                tls,
            } => {
                let tcp = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(connect)?;
                let _ = tcp.set_nodelay(true);
                let s = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(connect)?;
                Ok((Box::new(s), authority.clone()))
            }
        }
    }

    /// `path` with the project (and `extra` query pairs) added.
    pub(super) fn uri(&self, path: &str, extra: &[(&str, &str)]) -> String {
        let mut uri = format!(
            "{path}{}project={}",
            if path.contains('?') { '&' } else { '?' },
            seg(&self.project)
        );
        for (k, v) in extra {
            uri.push('&');
            uri.push_str(k);
            uri.push('=');
            uri.push_str(&seg(v));
        }
        uri
    }

    /// One call whose body is JSON (or empty); the answer's envelope,
    /// already turned into an error when it is one.
    async fn call(
        &self,
        method: Method,
        uri: &str,
        json: Option<Vec<u8>>,
        what: &str,
        deadline: Duration,
    ) -> Result<Envelope, IncusError> {
        let body = Full::new(Bytes::from(json.unwrap_or_default()))
            .map_err(|never| match never {})
            .boxed_unsync();
        let (status, bytes) = self
            .send(
                Outgoing {
                    method,
                    uri,
                    body,
                    content_type: "application/json",
                    headers: &[],
                },
                what,
                deadline,
            )
            .await?;
        envelope(what, status, &bytes)
    }

    fn encode<T: Serialize>(what: &str, body: &T) -> Result<Vec<u8>, IncusError> {
        serde_json::to_vec(body).map_err(|e| IncusError::Decode {
            what: what.to_owned(),
            detail: e.to_string(),
        })
    }

    /// `GET` of a `sync` answer's metadata.
    async fn get<T: DeserializeOwned>(&self, uri: &str, what: &str) -> Result<T, IncusError> {
        let env = self
            .call(Method::GET, uri, None, what, self.timeout)
            .await?;
        decode(what, env.metadata)
    }

    /// [`Self::get`], `None` for what does not exist.
    async fn get_opt<T: DeserializeOwned>(
        &self,
        uri: &str,
        what: &str,
    ) -> Result<Option<T>, IncusError> {
        match self.get(uri, what).await {
            Err(e) if e.is_not_found() => Ok(None),
            other => other.map(Some),
        }
    }

    /// A call that may start a background operation, waited for until
    /// `deadline` from now; its final state.
    async fn operate(
        &self,
        method: Method,
        uri: &str,
        json: Option<Vec<u8>>,
        what: &str,
        deadline: Duration,
    ) -> Result<Option<Operation>, IncusError> {
        let started = Instant::now();
        let env = self.call(method, uri, json, what, self.timeout).await?;
        if env.kind != "async" {
            return Ok(None);
        }
        let left = deadline.saturating_sub(started.elapsed());
        self.wait(&env.operation, what, left).await.map(Some)
    }

    /// Waits for the operation at `op` (`/1.0/operations/UUID`) to end,
    /// for at most `limit`.
    pub async fn wait(
        &self,
        op: &str,
        what: &str,
        limit: Duration,
    ) -> Result<Operation, IncusError> {
        // A forwarded request's operation URL carries `?project=…` (seen
        // in a cluster): the id is the last path segment.
        let path = op.split('?').next().unwrap_or(op);
        let id = path.rsplit('/').next().unwrap_or(path);
        let started = Instant::now();
        loop {
            let left = limit.saturating_sub(started.elapsed());
            // Incus holds the request until the operation ends or the
            // step's timeout passes (then it answers with it running).
            let step = left.min(Duration::from_secs(20)).as_secs().max(1);
            let uri = self.uri(
                &format!("/1.0/operations/{}/wait", seg(id)),
                &[("timeout", &step.to_string())],
            );
            let env = self
                .call(
                    Method::GET,
                    &uri,
                    None,
                    what,
                    Duration::from_secs(step) + self.timeout,
                )
                .await?;
            let op: Operation = decode(what, env.metadata)?;
            match op.status.as_str() {
                "Success" => return Ok(op),
                "Failure" | "Cancelled" => return Err(classify(what, 500, &op.err)),
                _ if started.elapsed() >= limit => {
                    return Err(IncusError::Timeout {
                        address: self.address(),
                        what: what.to_owned(),
                        seconds: limit.as_secs(),
                    })
                }
                // In a cluster, a member may answer the wait for an
                // operation running on another at once, still running
                // (seen on Incus 6.0): don't spin on it.
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The server and what it can do.
    pub async fn server(&self) -> Result<Server, IncusError> {
        self.get(&self.uri("/1.0", &[]), "the server").await
    }

    /// The cluster's members; empty when the server is not clustered.
    pub async fn members(&self) -> Result<Vec<Member>, IncusError> {
        match self
            .get(
                &self.uri("/1.0/cluster/members", &[("recursion", "1")]),
                "cluster members",
            )
            .await
        {
            Err(IncusError::Api { message, .. }) if message.contains("not clustered") => Ok(vec![]),
            other => other,
        }
    }

    /// Whether storage pool `name` exists.
    pub async fn has_storage_pool(&self, name: &str) -> Result<bool, IncusError> {
        self.exists(
            &format!("/1.0/storage-pools/{}", seg(name)),
            &format!("storage pool {name}"),
        )
        .await
    }

    /// Whether network `name` exists.
    pub async fn has_network(&self, name: &str) -> Result<bool, IncusError> {
        self.exists(
            &format!("/1.0/networks/{}", seg(name)),
            &format!("network {name}"),
        )
        .await
    }

    async fn exists(&self, path: &str, what: &str) -> Result<bool, IncusError> {
        match self
            .get::<serde_json::Value>(&self.uri(path, &[]), what)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One member.
    pub async fn member(&self, name: &str) -> Result<Member, IncusError> {
        self.get(
            &self.uri(&format!("/1.0/cluster/members/{}", seg(name)), &[]),
            &format!("host {name}"),
        )
        .await
    }

    /// A member's load and memory (it must answer).
    pub async fn member_sysinfo(&self, name: &str) -> Result<MemberState, IncusError> {
        self.get(
            &self.uri(&format!("/1.0/cluster/members/{}/state", seg(name)), &[]),
            &format!("host {name}"),
        )
        .await
    }

    /// Evacuates a member (its instances go elsewhere) or restores it.
    pub async fn member_state(
        &self,
        name: &str,
        action: MemberAction,
        limit: Duration,
    ) -> Result<(), IncusError> {
        #[derive(Serialize)]
        struct Body {
            action: MemberAction,
        }
        let what = format!("host {name}");
        let uri = self.uri(&format!("/1.0/cluster/members/{}/state", seg(name)), &[]);
        let json = Self::encode(&what, &Body { action })?;
        self.operate(Method::POST, &uri, Some(json), &what, limit)
            .await
            .map(drop)
    }

    /// Every instance of the project, with its configuration.
    pub async fn instances(&self) -> Result<Vec<Instance>, IncusError> {
        self.get(
            &self.uri("/1.0/instances", &[("recursion", "1")]),
            "instances",
        )
        .await
    }

    /// One instance, `None` when there is none by that name.
    pub async fn instance(&self, name: &str) -> Result<Option<Instance>, IncusError> {
        self.get_opt(
            &self.uri(&format!("/1.0/instances/{}", seg(name)), &[]),
            &format!("instance {name}"),
        )
        .await
    }

    /// An instance's runtime state.
    pub async fn instance_state(&self, name: &str) -> Result<InstanceState, IncusError> {
        let r = self
            .get(
                &self.uri(&format!("/1.0/instances/{}/state", seg(name)), &[]),
                &format!("instance {name}"),
            )
            .await;
        self.explain(name, r).await
    }

    /// An error about instance `name` as the member holding it explains
    /// it: when that member is not online, [`IncusError::MemberOffline`]
    /// (Incus itself only says "Server isn't ready yet" then).
    async fn explain<T>(&self, name: &str, r: Result<T, IncusError>) -> Result<T, IncusError> {
        let e = match r {
            Ok(v) => return Ok(v),
            // What a member that does not answer looks like from another:
            // "not ready", or a forwarded request that fails or hangs.
            Err(e @ IncusError::Api { .. }) if e.to_string().contains("isn't ready") => e,
            Err(e @ (IncusError::Timeout { .. } | IncusError::Http { .. })) => e,
            Err(e) => return Err(e),
        };
        match self.location(name).await {
            Some(member) => match self.member(&member).await {
                Ok(m) if !m.online() => Err(IncusError::MemberOffline { member }),
                _ => Err(e),
            },
            None => Err(e),
        }
    }

    /// The cluster member instance `name` lives on (`None` outside a
    /// cluster or when it cannot tell). Read from the instance list,
    /// which answers even when that member does not.
    pub async fn location(&self, name: &str) -> Option<String> {
        let all: Vec<Instance> = self
            .get(
                &self.uri("/1.0/instances", &[("recursion", "1")]),
                "instances",
            )
            .await
            .ok()?;
        all.into_iter()
            .find(|i| i.name == name)
            .map(|i| i.location)
            .filter(|l| !l.is_empty() && l != "none")
    }

    /// Creates an instance (on member `target`, or where Incus places
    /// it) and waits until it exists (and runs, if `post.start`).
    pub async fn create_instance(
        &self,
        post: &InstancesPost,
        target: Option<&str>,
        limit: Duration,
    ) -> Result<(), IncusError> {
        let what = format!("instance {}", post.name);
        let extra: Vec<(&str, &str)> = target.map(|t| ("target", t)).into_iter().collect();
        let uri = self.uri("/1.0/instances", &extra);
        let json = Self::encode(&what, post)?;
        self.operate(Method::POST, &uri, Some(json), &what, limit)
            .await
            .map(drop)
    }

    /// Starts, stops, restarts, freezes or unfreezes an instance.
    /// `timeout` is how long a clean stop may take before it fails.
    pub async fn change_state(
        &self,
        name: &str,
        action: StateAction,
        force: bool,
        timeout: Duration,
    ) -> Result<(), IncusError> {
        let what = format!("instance {name}");
        let uri = self.uri(&format!("/1.0/instances/{}/state", seg(name)), &[]);
        let put = StatePut {
            action,
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            force,
        };
        let json = Self::encode(&what, &put)?;
        let r = self
            .operate(
                Method::PUT,
                &uri,
                Some(json),
                &what,
                timeout + Duration::from_secs(30),
            )
            .await
            .map(drop);
        self.explain(name, r).await
    }

    /// Deletes a (stopped) instance and its root disk.
    pub async fn delete_instance(&self, name: &str, limit: Duration) -> Result<(), IncusError> {
        let what = format!("instance {name}");
        let uri = self.uri(&format!("/1.0/instances/{}", seg(name)), &[]);
        self.operate(Method::DELETE, &uri, None, &what, limit)
            .await
            .map(drop)
    }

    /// Renames a (stopped) instance.
    pub async fn rename_instance(
        &self,
        name: &str,
        to: &str,
        limit: Duration,
    ) -> Result<(), IncusError> {
        #[derive(Serialize)]
        struct Body<'a> {
            name: &'a str,
        }
        let what = format!("instance {name}");
        let uri = self.uri(&format!("/1.0/instances/{}", seg(name)), &[]);
        let json = Self::encode(&what, &Body { name: to })?;
        self.operate(Method::POST, &uri, Some(json), &what, limit)
            .await
            .map(drop)
    }

    /// Moves a (stopped) instance to cluster member `target`.
    pub async fn move_instance(
        &self,
        name: &str,
        target: &str,
        limit: Duration,
    ) -> Result<(), IncusError> {
        #[derive(Serialize)]
        struct Body<'a> {
            name: &'a str,
            migration: bool,
        }
        let what = format!("instance {name}");
        let uri = self.uri(
            &format!("/1.0/instances/{}", seg(name)),
            &[("target", target)],
        );
        let json = Self::encode(
            &what,
            &Body {
                name,
                migration: true,
            },
        )?;
        self.operate(Method::POST, &uri, Some(json), &what, limit)
            .await
            .map(drop)
    }

    /// Takes snapshot `snap` of instance `name` (its root disk; a running
    /// instance's as it is, crash-consistent unless it is frozen).
    pub async fn create_snapshot(
        &self,
        name: &str,
        snap: &str,
        limit: Duration,
    ) -> Result<(), IncusError> {
        #[derive(Serialize)]
        struct Body<'a> {
            name: &'a str,
            stateful: bool,
        }
        let what = format!("snapshot {snap} of {name}");
        let uri = self.uri(&format!("/1.0/instances/{}/snapshots", seg(name)), &[]);
        let json = Self::encode(
            &what,
            &Body {
                name: snap,
                stateful: false,
            },
        )?;
        self.operate(Method::POST, &uri, Some(json), &what, limit)
            .await
            .map(drop)
    }

    /// Puts a stopped instance's root disk back as it was at `snap`.
    pub async fn restore_snapshot(
        &self,
        name: &str,
        snap: &str,
        limit: Duration,
    ) -> Result<(), IncusError> {
        #[derive(Serialize)]
        struct Body<'a> {
            restore: &'a str,
        }
        let what = format!("snapshot {snap} of {name}");
        let uri = self.uri(&format!("/1.0/instances/{}", seg(name)), &[]);
        let json = Self::encode(&what, &Body { restore: snap })?;
        self.operate(Method::PUT, &uri, Some(json), &what, limit)
            .await
            .map(drop)
    }

    /// Deletes snapshot `snap` of instance `name`.
    pub async fn delete_snapshot(
        &self,
        name: &str,
        snap: &str,
        limit: Duration,
    ) -> Result<(), IncusError> {
        let what = format!("snapshot {snap} of {name}");
        let uri = self.uri(
            &format!("/1.0/instances/{}/snapshots/{}", seg(name), seg(snap)),
            &[],
        );
        self.operate(Method::DELETE, &uri, None, &what, limit)
            .await
            .map(drop)
    }

    /// Changes an instance's configuration: `change` edits its config
    /// and devices as Incus gives them (JSON), and the whole is written
    /// back with `PUT`, guarded by the ETag read (so a change made in
    /// between fails instead of being lost). A running instance takes
    /// device changes live.
    pub async fn update_instance(
        &self,
        name: &str,
        change: impl FnOnce(&mut serde_json::Value),
    ) -> Result<(), IncusError> {
        let what = format!("instance {name}");
        let uri = self.uri(&format!("/1.0/instances/{}", seg(name)), &[]);
        let (status, bytes, etag) = self.get_with_etag(&uri, &what).await?;
        let env = envelope(&what, status, &bytes)?;
        let mut put = serde_json::Map::new();
        for key in [
            "architecture",
            "config",
            "devices",
            "ephemeral",
            "profiles",
            "stateful",
            "description",
        ] {
            if let Some(v) = env.metadata.get(key) {
                put.insert(key.to_owned(), v.clone());
            }
        }
        // Incus's own `volatile.*` keys go back as they came: leaving one
        // out reads as deleting it, which Incus refuses (seen on 6.0).
        let mut put = serde_json::Value::Object(put);
        change(&mut put);
        let json = Self::encode(&what, &put)?;
        let headers: Vec<(&str, String)> = etag.into_iter().map(|e| ("if-match", e)).collect();
        let (status, bytes) = self
            .send(
                Outgoing {
                    method: Method::PUT,
                    uri: &uri,
                    body: Full::new(Bytes::from(json))
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                    content_type: "application/json",
                    headers: &headers,
                },
                &what,
                self.timeout,
            )
            .await?;
        let env = envelope(&what, status, &bytes)?;
        if env.kind == "async" {
            self.wait(&env.operation, &what, Duration::from_secs(120))
                .await?;
        }
        Ok(())
    }

    /// `/1.0/storage-pools/POOL/volumes/custom[/NAME[/REST]]` with
    /// `?target=MEMBER` when a member is named (volumes of a local pool
    /// live on one member; a cluster needs to be told which).
    fn volume_uri(&self, pool: &str, name: Option<&str>, rest: &str, at: Option<&str>) -> String {
        let mut path = format!("/1.0/storage-pools/{}/volumes/custom", seg(pool));
        if let Some(n) = name {
            path.push('/');
            path.push_str(&seg(n));
        }
        path.push_str(rest);
        let extra: Vec<(&str, &str)> = at.map(|t| ("target", t)).into_iter().collect();
        self.uri(&path, &extra)
    }

    /// The custom volumes of `pool` (with their snapshots, as
    /// `VOLUME/SNAPSHOT`), on every member.
    pub async fn volumes(&self, pool: &str) -> Result<Vec<StorageVolume>, IncusError> {
        let path = format!("/1.0/storage-pools/{}/volumes/custom", seg(pool));
        self.get(&self.uri(&path, &[("recursion", "1")]), "storage volumes")
            .await
    }

    /// Where custom volume `name` of `pool` lives: `Some("")` outside a
    /// cluster (or on shared storage), `None` when there is none.
    pub async fn volume_location(
        &self,
        pool: &str,
        name: &str,
    ) -> Result<Option<String>, IncusError> {
        Ok(self
            .volumes(pool)
            .await?
            .into_iter()
            .find(|v| v.name == name)
            .map(|v| {
                if v.location == "none" {
                    String::new()
                } else {
                    v.location
                }
            }))
    }

    /// Makes an empty filesystem volume `name` in `pool` (on member
    /// `at`), or a copy of `from` (`VOLUME` or `VOLUME/SNAPSHOT`, with
    /// the member it is on) with its snapshots.
    pub async fn create_volume(
        &self,
        pool: &str,
        name: &str,
        from: Option<(&str, &str)>,
        at: Option<&str>,
        limit: Duration,
    ) -> Result<(), IncusError> {
        #[derive(Serialize)]
        struct Source<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            pool: &'a str,
            name: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            location: &'a str,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            name: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            content_type: &'a str,
            #[serde(skip_serializing_if = "BTreeMap::is_empty")]
            config: BTreeMap<String, String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            source: Option<Source<'a>>,
        }
        let what = format!("storage volume {name}");
        // A copy takes its source's config, as Incus's own client sends
        // it: with it the id map the files are stored under
        // (`volatile.idmap.last`); without it, a copy attached to a
        // container showed its files as nobody's.
        let config = match from {
            Some((source, location)) => {
                let base = source.split('/').next().unwrap_or(source);
                let at = (!location.is_empty()).then_some(location);
                let v: StorageVolume = self
                    .get(&self.volume_uri(pool, Some(base), "", at), &what)
                    .await?;
                v.config
            }
            None => BTreeMap::new(),
        };
        let body = Body {
            name,
            kind: "custom",
            content_type: "filesystem",
            config,
            source: from.map(|(name, location)| Source {
                kind: "copy",
                pool,
                name,
                location,
            }),
        };
        let json = Self::encode(&what, &body)?;
        let uri = self.volume_uri(pool, None, "", at);
        self.operate(Method::POST, &uri, Some(json), &what, limit)
            .await
            .map(drop)
    }

    /// Deletes custom volume `name` (on member `at`); its snapshots go
    /// with it. Fails while an instance uses it.
    pub async fn delete_volume(
        &self,
        pool: &str,
        name: &str,
        at: Option<&str>,
        limit: Duration,
    ) -> Result<(), IncusError> {
        let what = format!("storage volume {name}");
        let uri = self.volume_uri(pool, Some(name), "", at);
        self.operate(Method::DELETE, &uri, None, &what, limit)
            .await
            .map(drop)
    }

    /// Takes snapshot `snap` of custom volume `name` (on member `at`),
    /// or, `restore`, puts the volume back as it was at `snap` (no
    /// running instance may use it then).
    pub async fn volume_snapshot(
        &self,
        pool: &str,
        name: &str,
        snap: &str,
        restore: bool,
        at: Option<&str>,
        limit: Duration,
    ) -> Result<(), IncusError> {
        let what = format!("snapshot {snap} of storage volume {name}");
        let (method, rest, body) = if restore {
            (Method::PUT, "", serde_json::json!({ "restore": snap }))
        } else {
            (
                Method::POST,
                "/snapshots",
                serde_json::json!({ "name": snap }),
            )
        };
        let json = Self::encode(&what, &body)?;
        let uri = self.volume_uri(pool, Some(name), rest, at);
        self.operate(method, &uri, Some(json), &what, limit)
            .await
            .map(drop)
    }

    /// Deletes snapshot `snap` of custom volume `name` (on member `at`).
    pub async fn delete_volume_snapshot(
        &self,
        pool: &str,
        name: &str,
        snap: &str,
        at: Option<&str>,
        limit: Duration,
    ) -> Result<(), IncusError> {
        let what = format!("snapshot {snap} of storage volume {name}");
        let uri = self.volume_uri(pool, Some(name), &format!("/snapshots/{}", seg(snap)), at);
        self.operate(Method::DELETE, &uri, None, &what, limit)
            .await
            .map(drop)
    }

    /// The image an alias points at, `None` when there is no such alias.
    pub async fn image_alias(&self, alias: &str) -> Result<Option<ImageAlias>, IncusError> {
        self.get_opt(
            &self.uri(&format!("/1.0/images/aliases/{}", seg(alias)), &[]),
            &format!("image alias {alias}"),
        )
        .await
    }

    /// One image by fingerprint.
    pub async fn image(&self, fingerprint: &str) -> Result<Option<Image>, IncusError> {
        self.get_opt(
            &self.uri(&format!("/1.0/images/{}", seg(fingerprint)), &[]),
            &format!("image {fingerprint}"),
        )
        .await
    }

    /// Imports a unified image tarball (`metadata.yaml` and `rootfs/`,
    /// or `rootfs.img` for VMs), streamed from `tarball`; its fingerprint.
    pub async fn import_image(
        &self,
        tarball: &Path,
        limit: Duration,
    ) -> Result<String, IncusError> {
        let what = format!("image import of {}", tarball.display());
        let file = tokio::fs::File::open(tarball)
            .await
            .map_err(|source| IncusError::Connect {
                address: tarball.display().to_string(),
                source,
            })?;
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map_ok(Frame::data);
        let body = BodyExt::boxed_unsync(StreamBody::new(stream));
        let started = Instant::now();
        let (status, bytes) = self
            .send(
                Outgoing {
                    method: Method::POST,
                    uri: &self.uri("/1.0/images", &[]),
                    body,
                    content_type: "application/octet-stream",
                    headers: &[],
                },
                &what,
                limit,
            )
            .await?;
        let env = envelope(&what, status, &bytes)?;
        let op = self
            .wait(
                &env.operation,
                &what,
                limit.saturating_sub(started.elapsed()),
            )
            .await?;
        op.metadata
            .get("fingerprint")
            .and_then(|f| f.as_str())
            .map(str::to_owned)
            .ok_or_else(|| IncusError::Decode {
                what,
                detail: "the import's operation names no fingerprint".into(),
            })
    }

    /// Points alias `name` at image `fingerprint` (creating it).
    pub async fn add_image_alias(&self, name: &str, fingerprint: &str) -> Result<(), IncusError> {
        #[derive(Serialize)]
        struct Body<'a> {
            name: &'a str,
            target: &'a str,
        }
        let what = format!("image alias {name}");
        let json = Self::encode(
            &what,
            &Body {
                name,
                target: fingerprint,
            },
        )?;
        self.call(
            Method::POST,
            &self.uri("/1.0/images/aliases", &[]),
            Some(json),
            &what,
            self.timeout,
        )
        .await
        .map(drop)
    }
}

impl IncusClient {
    /// Writes a file into an instance (a stopped container too), owned by
    /// `uid`:`gid` with `mode`, making it anew. Parent directories must
    /// exist in the instance.
    pub async fn push_file(
        &self,
        instance: &str,
        path: &str,
        content: Vec<u8>,
        (uid, gid, mode): (u32, u32, u32),
    ) -> Result<(), IncusError> {
        let what = format!("file {path} in instance {instance}");
        let body = Full::new(Bytes::from(content))
            .map_err(|never| match never {})
            .boxed_unsync();
        let headers = [
            ("x-incus-uid", uid.to_string()),
            ("x-incus-gid", gid.to_string()),
            ("x-incus-mode", format!("{mode:04o}")),
            ("x-incus-type", "file".to_owned()),
            ("x-incus-write", "overwrite".to_owned()),
        ];
        self.post_file(instance, path, body, &headers, &what)
            .await
            .map(drop)
    }

    /// Makes a directory in an instance (nothing when it exists).
    pub async fn push_dir(
        &self,
        instance: &str,
        path: &str,
        (uid, gid, mode): (u32, u32, u32),
    ) -> Result<(), IncusError> {
        let what = format!("directory {path} in instance {instance}");
        let headers = [
            ("x-incus-uid", uid.to_string()),
            ("x-incus-gid", gid.to_string()),
            ("x-incus-mode", format!("{mode:04o}")),
            ("x-incus-type", "directory".to_owned()),
        ];
        match self
            .post_file(instance, path, empty(), &headers, &what)
            .await
        {
            Err(IncusError::Exists { .. }) => Ok(()),
            other => other.map(drop),
        }
    }

    /// The instance's console log (a container's: what its init and
    /// Kennel's boot steps wrote to /dev/console).
    pub async fn console_log(&self, instance: &str) -> Result<String, IncusError> {
        let what = format!("console of instance {instance}");
        let uri = self.uri(&format!("/1.0/instances/{}/console", seg(instance)), &[]);
        let bytes = self.get_raw(&uri, &what).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Reads a file from an instance.
    pub async fn pull_file(&self, instance: &str, path: &str) -> Result<Vec<u8>, IncusError> {
        let what = format!("file {path} in instance {instance}");
        let uri = self.uri(
            &format!("/1.0/instances/{}/files", seg(instance)),
            &[("path", path)],
        );
        Ok(self.get_raw(&uri, &what).await?.to_vec())
    }

    /// A `GET`'s status, body and ETag.
    async fn get_with_etag(
        &self,
        uri: &str,
        what: &str,
    ) -> Result<(u16, Bytes, Option<String>), IncusError> {
        let etag = std::sync::Mutex::new(None);
        let (status, bytes) = self
            .send_inner(
                Outgoing {
                    method: Method::GET,
                    uri,
                    body: empty(),
                    content_type: "application/json",
                    headers: &[],
                },
                what,
                self.timeout,
                Some(&etag),
            )
            .await?;
        let etag = etag
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok((status, bytes, etag))
    }

    /// A `GET` whose success is raw bytes, not an envelope.
    async fn get_raw(&self, uri: &str, what: &str) -> Result<Bytes, IncusError> {
        let (status, bytes) = self
            .send(
                Outgoing {
                    method: Method::GET,
                    uri,
                    body: empty(),
                    content_type: "application/json",
                    headers: &[],
                },
                what,
                self.timeout,
            )
            .await?;
        if status >= 400 {
            envelope(what, status, &bytes)?;
        }
        Ok(bytes)
    }

    /// `POST …/files?path=` with `body` and Incus's file headers.
    async fn post_file(
        &self,
        instance: &str,
        path: &str,
        body: Body,
        headers: &[(&str, String)],
        what: &str,
    ) -> Result<Envelope, IncusError> {
        let uri = self.uri(
            &format!("/1.0/instances/{}/files", seg(instance)),
            &[("path", path)],
        );
        let (status, bytes) = self
            .send(
                Outgoing {
                    method: Method::POST,
                    uri: &uri,
                    body,
                    content_type: "application/octet-stream",
                    headers,
                },
                what,
                self.timeout,
            )
            .await?;
        envelope(what, status, &bytes)
    }
}

/// An empty request body.
fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Reads an answer's envelope; an `error` one (or an HTTP error status)
/// becomes a typed error.
fn envelope(what: &str, status: u16, bytes: &[u8]) -> Result<Envelope, IncusError> {
    let env: Envelope = serde_json::from_slice(bytes).map_err(|e| IncusError::Decode {
        what: what.to_owned(),
        detail: format!(
            "HTTP {status}, {e}: {}",
            String::from_utf8_lossy(bytes.get(..200).unwrap_or(bytes))
        ),
    })?;
    if env.kind == "error" || status >= 400 {
        let code = if env.error_code == 0 {
            status
        } else {
            env.error_code
        };
        return Err(classify(what, code, &env.error));
    }
    Ok(env)
}

fn decode<T: DeserializeOwned>(what: &str, v: serde_json::Value) -> Result<T, IncusError> {
    serde_json::from_value(v).map_err(|e| IncusError::Decode {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

/// Accepts exactly the pinned certificate (Incus servers present
/// self-signed ones); handshake signatures are still checked.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn errors_are_told_apart_by_what_incus_says() {
        // Messages as Incus 6.0 gave them.
        assert!(matches!(
            classify(
                "i",
                404,
                "Failed to fetch instance \"t9\" in project \"default\": Instance not found"
            ),
            IncusError::NotFound { .. }
        ));
        assert!(matches!(
            classify("i", 500, "The instance is already running"),
            IncusError::AlreadyRunning { .. }
        ));
        assert!(matches!(
            classify("i", 500, "Failed creating instance record: Instance type \"virtual-machine\" is not supported on this server: vhost_vsock kernel module not loaded"),
            IncusError::Unsupported { .. }
        ));
        assert!(matches!(
            classify("i", 500, "Failed creating instance record: Add instance info to the database: Failed to create \"instances\" entry: UNIQUE constraint failed: instances.project_id, instances.name"),
            IncusError::Exists { .. }
        ));
        assert!(matches!(
            classify("i", 500, "Operation not found"),
            IncusError::NotFound { .. }
        ));
        let e = classify(
            "instance x",
            500,
            "Failed shutting down instance, status is \"Running\": context deadline exceeded",
        );
        assert!(matches!(e, IncusError::Api { status: 500, .. }), "{e}");
        assert!(e.to_string().contains("context deadline exceeded"));
    }

    #[test]
    fn names_are_encoded_as_one_segment() {
        assert_eq!(seg("myapp"), "myapp");
        assert_eq!(seg("a/../b"), "a%2F..%2Fb");
        assert_eq!(seg("x?y=1&z"), "x%3Fy%3D1%26z");
        let c = IncusClient::unix(Path::new("/nonexistent"), "kennel test");
        assert_eq!(
            c.uri("/1.0/instances", &[("target", "m 1")]),
            "/1.0/instances?project=kennel%20test&target=m%201"
        );
        assert_eq!(
            c.uri("/1.0/operations/x/wait?timeout=1", &[]),
            "/1.0/operations/x/wait?timeout=1&project=kennel%20test"
        );
    }

    #[test]
    fn bad_tls_settings_are_named() {
        let e = IncusClient::https("http://x", b"", b"", b"", "default").unwrap_err();
        assert!(e.to_string().contains("https://HOST:PORT"), "{e}");
        let e = IncusClient::https("https://h:8443", b"", b"", b"", "default").unwrap_err();
        assert!(e.to_string().contains("client certificate"), "{e}");
    }
}
