//! Certificates for the HTTPS gateway: files an operator provides
//! (reloaded when they change), or, for development, a local CA that
//! Kennel makes on first start and a leaf it issues for `DOMAIN` and
//! `*.DOMAIN`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what}: {message}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("cannot make the development certificate: {0}")]
    Generate(String),
    #[error("the certificate and key do not work together: {0}")]
    Rustls(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the gateway's certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files: a chain (leaf first) and its private key.
    Files { cert: PathBuf, key: PathBuf },
    /// A local development CA in `dir` (made on first use) and a leaf
    /// for `domain` and `*.domain`.
    DevCa { dir: PathBuf, domain: String },
    /// An ACME CA: per-host certificates by TLS-ALPN-01, or a wildcard
    /// by DNS-01 through a hook.
    Acme {
        settings: super::acme::AcmeSettings,
        domain: String,
    },
}

/// What the gateway's listener needs for TLS: the configuration for
/// clients, and the ACME source when certificates come from one (its
/// validations are answered, and names certified, during the handshake).
#[derive(Debug, Clone)]
pub struct GatewayTls {
    pub config: Arc<rustls::ServerConfig>,
    pub acme: Option<Arc<super::acme::Acme>>,
}

impl From<Arc<rustls::ServerConfig>> for GatewayTls {
    fn from(config: Arc<rustls::ServerConfig>) -> Self {
        Self { config, acme: None }
    }
}

/// The TLS set-up for `source`: HTTP/2 and HTTP/1.1 by ALPN, ring as
/// the crypto provider.
pub fn server_config(source: &TlsSource) -> Result<GatewayTls, TlsError> {
    let mut acme = None;
    let resolver: Arc<dyn ResolvesServerCert> = match source {
        TlsSource::Files { cert, key } => Arc::new(FileCert::load(cert, key)?),
        TlsSource::DevCa { dir, domain } => Arc::new(DevCa::open(dir, domain)?),
        TlsSource::Acme { settings, domain } => {
            let a = super::acme::Acme::open(settings.clone(), domain)
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            acme = Some(a.clone());
            a
        }
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(GatewayTls {
        config: Arc::new(config),
        acme,
    })
}

pub(super) fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| TlsError::Rustls(e.to_string()))
}

fn read_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            what: "certificate",
            message: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.to_owned(),
            what: "certificate",
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_owned(),
            what: "certificate",
            message: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.to_owned(),
        what: "private key",
        message: e.to_string(),
    })?;
    Ok((chain, key))
}

/// Certificate files, read again when they change (checked at most every
/// few seconds, at a handshake), so a renewed certificate is used without
/// a restart. A broken new pair keeps the old one in use.
#[derive(Debug)]
struct FileCert {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<FileState>,
}

#[derive(Debug)]
struct FileState {
    current: Arc<CertifiedKey>,
    stamp: Option<(SystemTime, SystemTime)>,
    checked: Instant,
}

const RELOAD_CHECK: Duration = Duration::from_secs(5);

impl FileCert {
    fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let (chain, k) = read_pair(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: Mutex::new(FileState {
                current: certified(chain, k)?,
                stamp: stamp(cert, key),
                checked: Instant::now(),
            }),
        })
    }
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut st = self.state.lock().ok()?;
        if st.checked.elapsed() >= RELOAD_CHECK {
            st.checked = Instant::now();
            let now = stamp(&self.cert, &self.key);
            if now.is_some() && now != st.stamp {
                match read_pair(&self.cert, &self.key).and_then(|(c, k)| certified(c, k)) {
                    Ok(ck) => {
                        tracing::info!(cert = %self.cert.display(), "reloaded the HTTPS certificate");
                        st.current = ck;
                        st.stamp = now;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the new HTTPS certificate is not usable; keeping the old one")
                    }
                }
            }
        }
        Some(st.current.clone())
    }
}

/// The development CA's certificate, to trust in a browser or pass to
/// `curl --cacert`.
pub fn dev_ca_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// The development CA: made once and kept in `dir`; it issues a leaf
/// for each name under the domain as clients ask for it (by SNI), since
/// TLS clients refuse a wildcard directly under a one-label name such as
/// `*.localhost`.
struct DevCa {
    domain: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    leaves: Mutex<std::collections::HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// Leaves the dev CA keeps at most (a scanner sending random names
/// cannot make it hold more).
const MAX_DEV_LEAVES: usize = 1024;

impl DevCa {
    fn open(dir: &Path, domain: &str) -> Result<Self, TlsError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (ca_cert, ca_key) = (dev_ca_path(dir), dir.join("ca-key.pem"));
        let ca_params = || -> Result<CertificateParams, TlsError> {
            let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
            p.distinguished_name
                .push(DnType::CommonName, "Kennel development CA");
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            Ok(p)
        };
        let key = if ca_key.exists() && ca_cert.exists() {
            let pem = std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?;
            KeyPair::from_pem(&pem).map_err(gen)?
        } else {
            let k = KeyPair::generate().map_err(gen)?;
            let ca = ca_params()?.self_signed(&k).map_err(gen)?;
            write_private(&ca_key, k.serialize_pem().as_bytes())?;
            std::fs::write(&ca_cert, ca.pem()).map_err(io(&ca_cert))?;
            k
        };
        // The issuer is rebuilt from the same parameters and key, so
        // leaves chain to the CA file on disk.
        Ok(Self {
            domain: domain.to_ascii_lowercase(),
            issuer: rcgen::Issuer::new(ca_params()?, key),
            leaves: Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let mut p = CertificateParams::new(vec![name.to_owned()]).map_err(gen)?;
        p.distinguished_name.push(DnType::CommonName, name);
        let k = KeyPair::generate().map_err(gen)?;
        let cert = p.signed_by(&k, &self.issuer).map_err(gen)?;
        let key = PrivateKeyDer::try_from(k.serialize_der())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        certified(vec![cert.der().clone()], key)
    }
}

impl ResolvesServerCert for DevCa {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let asked = hello.server_name().map(str::to_ascii_lowercase);
        let name = match asked {
            Some(n) if n == self.domain || n.ends_with(&format!(".{}", self.domain)) => n,
            _ => self.domain.clone(),
        };
        let mut leaves = self.leaves.lock().ok()?;
        if let Some(ck) = leaves.get(&name) {
            return Some(ck.clone());
        }
        if leaves.len() >= MAX_DEV_LEAVES {
            leaves.clear();
        }
        match self.leaf(&name) {
            Ok(ck) => {
                leaves.insert(name, ck.clone());
                Some(ck)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot issue a development certificate");
                None
            }
        }
    }
}

/// Writes a private key file: mode 0600 from the start, written beside
/// and renamed into place, so a crash never leaves half a key.
pub(super) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tmp_of(path);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Writes a public file (a certificate) by rename, as [`write_private`].
pub(super) fn write_public(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let tmp = tmp_of(path);
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// `PATH.tmp`, beside `path`.
fn tmp_of(path: &Path) -> PathBuf {
    let mut t = path.as_os_str().to_owned();
    t.push(".tmp");
    PathBuf::from(t)
}
