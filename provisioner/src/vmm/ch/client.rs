//! A typed client for Cloud Hypervisor's REST API on its Unix socket
//! (hyper + hyperlocal).
//!
//! Measured against a real CH v54: success is 204 with no body, except
//! `vm.info` and `vmm.ping` (200, JSON) and `vmm.shutdown` (200, empty);
//! errors are a JSON array of strings, outermost first, mostly with 500,
//! 404 when no VM is created, 400 for a bad config. Every call has a
//! deadline, so a VMM stuck in a blocking operation cannot hang Kennel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector, Uri};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::types::{
    RestoreConfig, VmConfig, VmInfo, VmResize, VmResizeDisk, VmSnapshotConfig, VmmPingResponse,
};

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ChApiError {
    #[error("cannot reach the Cloud Hypervisor API at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{endpoint} did not answer within {seconds} s")]
    Timeout {
        endpoint: &'static str,
        seconds: u64,
    },
    /// CH's own error messages, outermost first.
    #[error("{endpoint} failed with {status}: {}", messages.join(": "))]
    Api {
        endpoint: &'static str,
        status: u16,
        messages: Vec<String>,
    },
    #[error("{endpoint} answered something that is not what the API describes")]
    Decode {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{endpoint}: reading the answer failed")]
    Body {
        endpoint: &'static str,
        #[source]
        source: hyper::Error,
    },
}

impl ChApiError {
    /// The HTTP status of an API error, if the VMM answered one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ChApiError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one VMM's API socket.
#[derive(Debug, Clone)]
pub struct ChClient {
    socket: PathBuf,
    client: Client<UnixConnector, Full<Bytes>>,
    timeout: Duration,
}

impl ChClient {
    /// A client of the API at `socket`, with a 10 s deadline per call.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            client: Client::unix(),
            timeout: Duration::from_secs(10),
        }
    }

    /// The same client with another per-call deadline.
    #[must_use]
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    async fn call(
        &self,
        method: Method,
        endpoint: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ChApiError> {
        let uri: hyper::Uri = Uri::new(&self.socket, &format!("/api/v1/{endpoint}")).into();
        let mut req = Request::builder().method(method).uri(uri);
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| ChApiError::Api {
            endpoint,
            status: 0,
            messages: vec![e.to_string()],
        })?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|source| ChApiError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|source| ChApiError::Body { endpoint, source })?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ChApiError::Timeout {
                endpoint,
                seconds: self.timeout.as_secs(),
            })?
    }

    fn check(endpoint: &'static str, status: StatusCode, body: &Bytes) -> Result<(), ChApiError> {
        if status.is_success() {
            return Ok(());
        }
        let messages = serde_json::from_slice::<Vec<String>>(body).unwrap_or_else(|_| {
            let text = String::from_utf8_lossy(body).trim().to_owned();
            vec![if text.is_empty() {
                status.to_string()
            } else {
                text
            }]
        });
        Err(ChApiError::Api {
            endpoint,
            status: status.as_u16(),
            messages,
        })
    }

    async fn put<T: Serialize>(
        &self,
        endpoint: &'static str,
        body: Option<&T>,
    ) -> Result<(), ChApiError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|source| ChApiError::Decode { endpoint, source })?;
        let (status, bytes) = self.call(Method::PUT, endpoint, body).await?;
        Self::check(endpoint, status, &bytes)
    }

    async fn get<R: DeserializeOwned>(&self, endpoint: &'static str) -> Result<R, ChApiError> {
        let (status, bytes) = self.call(Method::GET, endpoint, None).await?;
        Self::check(endpoint, status, &bytes)?;
        serde_json::from_slice(&bytes).map_err(|source| ChApiError::Decode { endpoint, source })
    }

    /// `GET /vmm.ping`.
    pub async fn ping(&self) -> Result<VmmPingResponse, ChApiError> {
        self.get("vmm.ping").await
    }
    /// `PUT /vmm.shutdown`: ends the VMM process.
    pub async fn vmm_shutdown(&self) -> Result<(), ChApiError> {
        self.put::<()>("vmm.shutdown", None).await
    }
    /// `PUT /vm.create`.
    pub async fn create(&self, config: &VmConfig) -> Result<(), ChApiError> {
        self.put("vm.create", Some(config)).await
    }
    /// `PUT /vm.boot`.
    pub async fn boot(&self) -> Result<(), ChApiError> {
        self.put::<()>("vm.boot", None).await
    }
    /// `GET /vm.info`.
    pub async fn info(&self) -> Result<VmInfo, ChApiError> {
        self.get("vm.info").await
    }
    /// `PUT /vm.shutdown`.
    pub async fn shutdown(&self) -> Result<(), ChApiError> {
        self.put::<()>("vm.shutdown", None).await
    }
    /// `PUT /vm.reboot`.
    pub async fn reboot(&self) -> Result<(), ChApiError> {
        self.put::<()>("vm.reboot", None).await
    }
    /// `PUT /vm.power-button`.
    pub async fn power_button(&self) -> Result<(), ChApiError> {
        self.put::<()>("vm.power-button", None).await
    }
    /// `PUT /vm.pause`.
    pub async fn pause(&self) -> Result<(), ChApiError> {
        self.put::<()>("vm.pause", None).await
    }
    /// `PUT /vm.resume`.
    pub async fn resume(&self) -> Result<(), ChApiError> {
        self.put::<()>("vm.resume", None).await
    }
    /// `PUT /vm.delete`.
    pub async fn delete(&self) -> Result<(), ChApiError> {
        self.put::<()>("vm.delete", None).await
    }
    /// `PUT /vm.resize`.
    pub async fn resize(&self, r: &VmResize) -> Result<(), ChApiError> {
        self.put("vm.resize", Some(r)).await
    }
    /// `PUT /vm.resize-disk`.
    pub async fn resize_disk(&self, r: &VmResizeDisk) -> Result<(), ChApiError> {
        self.put("vm.resize-disk", Some(r)).await
    }
    /// `PUT /vm.snapshot` (the VM must be paused).
    pub async fn snapshot(&self, s: &VmSnapshotConfig) -> Result<(), ChApiError> {
        self.put("vm.snapshot", Some(s)).await
    }
    /// `PUT /vm.restore` (no VM may be created yet).
    pub async fn restore(&self, r: &RestoreConfig) -> Result<(), ChApiError> {
        self.put("vm.restore", Some(r)).await
    }
}
