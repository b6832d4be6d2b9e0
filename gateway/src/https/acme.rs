//! Certificates from an ACME CA (Let's Encrypt, or Pebble in tests), by
//! instant-acme.
//!
//! Two ways, chosen by configuration:
//! - **per host, TLS-ALPN-01**: the first handshake for `NAME.DOMAIN`
//!   (or `DOMAIN`) orders a certificate for that name, if the name is
//!   Kennel's or a project's in the store (the gateway asks before it
//!   calls [`Acme::obtain`]; a scanner's random names never reach the CA);
//!   the CA's validation connects back with ALPN `acme-tls/1` and is
//!   answered from [`Acme::challenge_config`].
//! - **a wildcard, DNS-01**: with a hook command, one certificate for
//!   `DOMAIN` and `*.DOMAIN`; the hook publishes and removes the TXT
//!   records (`HOOK set _acme-challenge.DOMAIN. VALUE`, then `clear`).
//!
//! The account key and the certificates live in the data dir
//! (`acme/account.json`, `acme/certs/NAME.{pem,key}`, keys mode 0600) and
//! are renewed [`AcmeSettings::renew_before`] their expiry. Orders are
//! rate-limited (per hour, and a name whose order failed waits), since a
//! CA's limits are strict and long.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::tls::{certified, write_private, write_public, TlsError};

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How Kennel talks to its ACME CA.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The CA's directory URL, e.g. Let's Encrypt's
    /// `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: String,
    /// Contact URLs for the account (`mailto:ops@example.com`).
    pub contact: Vec<String>,
    /// PEM roots to trust for the CA's own HTTPS (a test CA such as
    /// Pebble); the system's roots are trusted too.
    pub ca_roots: Option<PathBuf>,
    /// Where the account and certificates are kept (`<data_dir>/acme`).
    pub dir: PathBuf,
    /// A command that publishes DNS-01 TXT records: with it, one wildcard
    /// certificate covers every host.
    pub dns_hook: Option<PathBuf>,
    /// How long to wait after the hook for DNS to answer with the record.
    pub dns_wait: Duration,
    /// Renew a certificate this long before it expires.
    pub renew_before: Duration,
    /// How often certificates are checked for renewal.
    pub check_every: Duration,
    /// New orders per hour at most (Let's Encrypt allows 300 per 3 h, and
    /// 5 failed validations per name per hour).
    pub orders_per_hour: u32,
    /// How long a name whose order failed waits before another.
    pub retry_after_failure: Duration,
}

impl AcmeSettings {
    /// Let's Encrypt's defaults for a data dir's `acme/`.
    pub fn new(directory: String, dir: PathBuf) -> Self {
        Self {
            directory,
            contact: Vec::new(),
            ca_roots: None,
            dir,
            dns_hook: None,
            dns_wait: Duration::from_secs(30),
            renew_before: Duration::from_secs(30 * 24 * 3600),
            check_every: Duration::from_secs(3600),
            orders_per_hour: 30,
            retry_after_failure: Duration::from_secs(15 * 60),
        }
    }
}

/// Why a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("the ACME CA: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("the ACME order for {name} failed: {why}")]
    Order { name: String, why: String },
    #[error("too many certificate orders this hour; {name} waits")]
    RateLimited { name: String },
    #[error("the DNS hook {hook} failed: {why}")]
    Hook { hook: PathBuf, why: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AcmeError + '_ {
    move |source| AcmeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A certificate in use and when it expires.
#[derive(Clone)]
struct Held {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

/// Orders made lately, and names whose last order failed.
#[derive(Default)]
struct Budget {
    orders: Vec<Instant>,
    failed: HashMap<String, Instant>,
}

/// The file stem the wildcard certificate is kept under.
const WILDCARD: &str = "_wildcard";

/// The ACME certificate source.
pub struct Acme {
    s: AcmeSettings,
    domain: String,
    account: tokio::sync::OnceCell<Account>,
    /// Certificates by name (`*.DOMAIN` for the wildcard).
    certs: RwLock<HashMap<String, Held>>,
    /// TLS-ALPN-01 answers while an order waits for validation.
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// One order per name at a time.
    ordering: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    budget: Mutex<Budget>,
    challenge_config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("directory", &self.s.directory)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// Answers TLS-ALPN-01 validations.
#[derive(Debug)]
struct Challenges(std::sync::Weak<Acme>);

impl ResolvesServerCert for Challenges {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = self.0.upgrade()?;
        let name = hello.server_name()?.to_ascii_lowercase();
        let found = acme.challenges.lock().ok()?.get(&name).cloned();
        found
    }
}

impl Acme {
    /// Opens the certificate store in `s.dir` (made if missing) and loads
    /// what it holds.
    pub fn open(s: AcmeSettings, domain: &str) -> Result<Arc<Self>, AcmeError> {
        let certs_dir = s.dir.join("certs");
        std::fs::create_dir_all(&certs_dir).map_err(io(&certs_dir))?;
        let domain = domain.to_ascii_lowercase();
        let acme = Arc::new_cyclic(|me: &std::sync::Weak<Acme>| {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map(|b| {
                    b.with_no_client_auth()
                        .with_cert_resolver(Arc::new(Challenges(me.clone())))
                });
            let mut config = match config {
                Ok(c) => c,
                // TLS 1.3 with ring is always available; keep a config
                // that answers nothing rather than fail.
                Err(_) => rustls::ServerConfig::builder()
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(Challenges(me.clone()))),
            };
            config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
            Acme {
                s,
                domain,
                account: tokio::sync::OnceCell::new(),
                certs: RwLock::new(HashMap::new()),
                challenges: Mutex::new(HashMap::new()),
                ordering: Mutex::new(HashMap::new()),
                budget: Mutex::new(Budget::default()),
                challenge_config: Arc::new(config),
            }
        });
        acme.load_all(&certs_dir);
        Ok(acme)
    }

    /// The TLS configuration for a client that offers only `acme-tls/1`.
    pub fn challenge_config(&self) -> Arc<rustls::ServerConfig> {
        self.challenge_config.clone()
    }

    /// Whether the wildcard (DNS-01) is how names are covered.
    pub fn wildcard(&self) -> bool {
        self.s.dns_hook.is_some()
    }

    /// Whether `name` is Kennel's domain or under it (not a custom domain).
    fn under_domain(&self, name: &str) -> bool {
        let name = name.trim_start_matches("*.");
        name == self.domain || name.ends_with(&format!(".{}", self.domain))
    }

    fn load_all(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("pem") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            match read_held(&path, &path.with_extension("key")) {
                Ok(h) => {
                    let name = self.name_of_stem(stem);
                    if let Ok(mut c) = self.certs.write() {
                        c.insert(name, h);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unusable stored ACME certificate")
                }
            }
        }
    }

    fn name_of_stem(&self, stem: &str) -> String {
        if stem == WILDCARD {
            format!("*.{}", self.domain)
        } else {
            stem.to_owned()
        }
    }

    fn stem_of_name<'a>(&self, name: &'a str) -> &'a str {
        if name.starts_with("*.") {
            WILDCARD
        } else {
            name
        }
    }

    /// The certificate that covers `name`, if one is held.
    fn covering(&self, name: &str) -> Option<Held> {
        let certs = self.certs.read().ok()?;
        if let Some(h) = certs.get(name) {
            return Some(h.clone());
        }
        // The wildcard's certificate names the domain itself too.
        if name == self.domain {
            return certs.get(&format!("*.{name}")).cloned();
        }
        let parent = name.split_once('.').map(|(_, p)| p)?;
        certs.get(&format!("*.{parent}")).cloned()
    }

    /// Whether `name` has no certificate yet, or one about to expire.
    pub fn needs(&self, name: &str) -> bool {
        match self.covering(name) {
            None => true,
            Some(h) => self.expiring(&h),
        }
    }

    fn expiring(&self, h: &Held) -> bool {
        h.not_after
            .duration_since(SystemTime::now())
            .map_or(true, |left| left <= self.s.renew_before)
    }

    /// Obtains (or renews) the certificate for `name` by TLS-ALPN-01, or
    /// the wildcard by DNS-01 when a hook is configured. The caller has
    /// checked that `name` is one Kennel serves.
    pub async fn obtain(&self, name: &str) -> Result<(), AcmeError> {
        // The wildcard covers Kennel's names; a custom domain gets a
        // certificate of its own, by TLS-ALPN-01.
        let names = if self.wildcard() && self.under_domain(name) {
            vec![self.domain.clone(), format!("*.{}", self.domain)]
        } else {
            vec![name.to_owned()]
        };
        let key = names.last().cloned().unwrap_or_default();
        let lock = {
            let mut o = self
                .ordering
                .lock()
                .map_err(|_| AcmeError::RateLimited { name: key.clone() })?;
            o.entry(key.clone()).or_default().clone()
        };
        let _one = lock.lock().await;
        // Another handshake may have finished the same order meanwhile.
        if !self.needs(&key) {
            return Ok(());
        }
        self.spend(&key)?;
        let span = tracing::info_span!("acme", name = %key);
        let r = tracing::Instrument::instrument(self.order(&names), span).await;
        match &r {
            Ok(()) => {
                tracing::info!(name = %key, "obtained a certificate from the ACME CA");
                if let Ok(mut b) = self.budget.lock() {
                    b.failed.remove(&key);
                }
            }
            Err(e) => {
                tracing::warn!(name = %key, error = %e, "could not obtain a certificate");
                if let Ok(mut b) = self.budget.lock() {
                    b.failed.insert(key, Instant::now());
                }
            }
        }
        r
    }

    /// Takes one order from the hour's budget, unless `name` failed lately.
    fn spend(&self, name: &str) -> Result<(), AcmeError> {
        let mut b = self.budget.lock().map_err(|_| AcmeError::RateLimited {
            name: name.to_owned(),
        })?;
        let hour = Duration::from_secs(3600);
        b.orders.retain(|t| t.elapsed() < hour);
        let failed_lately = b
            .failed
            .get(name)
            .is_some_and(|t| t.elapsed() < self.s.retry_after_failure);
        let over = b.orders.len() >= usize::try_from(self.s.orders_per_hour).unwrap_or(usize::MAX);
        if failed_lately || over {
            return Err(AcmeError::RateLimited {
                name: name.to_owned(),
            });
        }
        b.orders.push(Instant::now());
        Ok(())
    }

    async fn account(&self) -> Result<&Account, AcmeError> {
        self.account
            .get_or_try_init(|| async {
                let path = self.s.dir.join("account.json");
                let http = self.http_client()?;
                if let Ok(text) = std::fs::read_to_string(&path) {
                    if let Ok(creds) = serde_json::from_str::<StoredAccount>(&text) {
                        if creds.directory == self.s.directory {
                            return Ok(Account::builder_with_http(http)
                                .from_credentials(creds.credentials)
                                .await?);
                        }
                    }
                    tracing::info!(path = %path.display(), "the stored ACME account is for another CA; making a new one");
                }
                let contact: Vec<&str> = self.s.contact.iter().map(String::as_str).collect();
                let (account, credentials) = Account::builder_with_http(http)
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.s.directory.clone(),
                        None,
                    )
                    .await?;
                let stored = StoredAccount {
                    directory: self.s.directory.clone(),
                    credentials,
                };
                let text = serde_json::to_string(&stored).map_err(|e| AcmeError::Order {
                    name: "account".into(),
                    why: e.to_string(),
                })?;
                write_private(&path, text.as_bytes())?;
                tracing::info!(directory = %self.s.directory, "made an ACME account");
                Ok(account)
            })
            .await
    }

    /// An HTTPS client for the CA: ring, the system's roots, and the
    /// configured extra roots.
    fn http_client(&self) -> Result<Box<dyn instant_acme::HttpClient>, AcmeError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        if let Some(p) = &self.s.ca_roots {
            let certs = CertificateDer::pem_file_iter(p)
                .map_err(|e| TlsError::Pem {
                    path: p.clone(),
                    what: "certificate",
                    message: e.to_string(),
                })?
                .flatten();
            for c in certs {
                roots.add(c).map_err(|e| TlsError::Rustls(e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, instant_acme::BodyWrapper<bytes::Bytes>>(https);
        Ok(Box::new(client))
    }

    async fn order(&self, names: &[String]) -> Result<(), AcmeError> {
        let account = self.account().await?;
        let ids: Vec<Identifier> = names
            .iter()
            .map(|n| Identifier::Dns(n.trim_start_matches("*.").to_owned()))
            .collect();
        // A wildcard is asked for as such.
        let ids: Vec<Identifier> = ids
            .into_iter()
            .zip(names)
            .map(|(id, n)| match (id, n.starts_with("*.")) {
                (Identifier::Dns(d), true) => Identifier::Dns(format!("*.{d}")),
                (id, _) => id,
            })
            .collect();
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let mut published: Vec<Published> = Vec::new();
        let ready = self.answer_challenges(&mut order, &mut published).await;
        let status = match ready {
            Ok(()) => order
                .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(120)))
                .await
                .map_err(AcmeError::from),
            Err(e) => Err(e),
        };
        self.withdraw(published).await;
        let status = status?;
        let first = names.first().cloned().unwrap_or_default();
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order {
                name: first,
                why: format!(
                    "the CA did not validate it ({status:?}){}",
                    order_problem(&mut order).await
                ),
            });
        }
        let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(gen)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(gen)?;
        order.finalize_csr(csr.der()).await?;
        let chain = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(120)))
            .await?;
        let stem = self.stem_of_name(names.last().map_or("", String::as_str));
        let (cert_path, key_path) = self.paths(stem);
        let held = held_of(&chain, &key.serialize_pem(), &cert_path)?;
        // The key first, so a certificate on disk always has its key.
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_public(&cert_path, chain.as_bytes())?;
        let name = names.last().cloned().unwrap_or_default();
        if let Ok(mut c) = self.certs.write() {
            c.insert(name, held);
        }
        Ok(())
    }

    fn paths(&self, stem: &str) -> (PathBuf, PathBuf) {
        let dir = self.s.dir.join("certs");
        (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        )
    }

    /// Answers each pending authorization: a TLS-ALPN-01 certificate, or
    /// a TXT record through the hook.
    async fn answer_challenges(
        &self,
        order: &mut instant_acme::Order,
        published: &mut Vec<Published>,
    ) -> Result<(), AcmeError> {
        let mut authzs = order.authorizations();
        let mut dns_published = false;
        while let Some(a) = authzs.next().await {
            let mut a = a?;
            match a.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => {
                    return Err(AcmeError::Order {
                        name: a.identifier().to_string(),
                        why: format!("its authorization is {other:?}"),
                    })
                }
            }
            let name = a.identifier().to_string();
            let kind = if self.wildcard() && self.under_domain(&name) {
                ChallengeType::Dns01
            } else {
                ChallengeType::TlsAlpn01
            };
            let Some(ch) = a.challenge(kind.clone()) else {
                return Err(AcmeError::Order {
                    name,
                    why: format!("the CA offers no {kind:?} challenge"),
                });
            };
            let base = match &ch.identifier().identifier {
                Identifier::Dns(d) => d.clone(),
                _ => name.clone(),
            };
            let ka = ch.key_authorization();
            if let ChallengeType::Dns01 = kind {
                let record = format!("_acme-challenge.{base}.");
                let value = ka.dns_value();
                self.hook("set", &record, &value).await?;
                published.push(Published::Txt { record, value });
                dns_published = true;
            } else {
                let ck = challenge_cert(&base, ka.digest().as_ref())?;
                if let Ok(mut c) = self.challenges.lock() {
                    c.insert(base.clone(), ck);
                }
                published.push(Published::Alpn(base));
            }
        }
        if dns_published && !self.s.dns_wait.is_zero() {
            tracing::info!(
                secs = self.s.dns_wait.as_secs(),
                "waiting for the DNS records to be served"
            );
            tokio::time::sleep(self.s.dns_wait).await;
        }
        // Tell the CA only now: DNS answers need their wait first.
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a?;
            if a.status != AuthorizationStatus::Pending {
                continue;
            }
            let kind = if self.wildcard() {
                ChallengeType::Dns01
            } else {
                ChallengeType::TlsAlpn01
            };
            if let Some(mut ch) = a.challenge(kind) {
                ch.set_ready().await?;
            }
        }
        Ok(())
    }

    async fn withdraw(&self, published: Vec<Published>) {
        for p in published {
            match p {
                Published::Alpn(name) => {
                    if let Ok(mut c) = self.challenges.lock() {
                        c.remove(&name);
                    }
                }
                Published::Txt { record, value } => {
                    if let Err(e) = self.hook("clear", &record, &value).await {
                        tracing::warn!(error = %e, "the DNS hook could not remove a challenge record");
                    }
                }
            }
        }
    }

    /// Runs the DNS hook with its arguments (no shell).
    async fn hook(&self, verb: &str, record: &str, value: &str) -> Result<(), AcmeError> {
        let Some(hook) = &self.s.dns_hook else {
            return Ok(());
        };
        let fail = |why: String| AcmeError::Hook {
            hook: hook.clone(),
            why,
        };
        let run = tokio::process::Command::new(hook)
            .args([verb, record, value])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .map_err(|_| fail("timed out after 120 s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(fail(format!(
                "{}: {}",
                out.status,
                kennel_core::redact::excerpt(err.trim())
            )));
        }
        Ok(())
    }

    /// Renews what is due, and makes the wildcard if it is missing, every
    /// [`AcmeSettings::check_every`]; `still_served` says whether a
    /// per-host name is still Kennel's or a project's (certificates of
    /// removed projects are not renewed).
    pub async fn maintain<F, Fut>(self: Arc<Self>, still_served: F)
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        loop {
            if self.wildcard() {
                let w = format!("*.{}", self.domain);
                if self.needs(&w) {
                    let _ = self.obtain(&w).await;
                }
            } else {
                let due: Vec<String> = self
                    .certs
                    .read()
                    .map(|c| {
                        c.iter()
                            .filter(|(n, h)| !n.starts_with("*.") && self.expiring(h))
                            .map(|(n, _)| n.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                for name in due {
                    if still_served(name.clone()).await {
                        tracing::info!(%name, "renewing a certificate");
                        let _ = self.obtain(&name).await;
                    }
                }
            }
            tokio::time::sleep(self.s.check_every).await;
        }
    }
}

/// What an order published for validation, to take back afterwards.
enum Published {
    Alpn(String),
    Txt { record: String, value: String },
}

/// The saved account: its credentials and the CA they belong to.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// Says why an order failed, from its authorizations' errors.
async fn order_problem(order: &mut instant_acme::Order) -> String {
    let mut out = String::new();
    let mut authzs = order.authorizations();
    while let Some(Ok(a)) = authzs.next().await {
        for c in &a.challenges {
            if let Some(p) = &c.error {
                out.push_str(&format!(": {p}"));
            }
        }
    }
    out
}

/// The self-signed certificate that answers a TLS-ALPN-01 validation.
fn challenge_cert(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut p = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(gen)?;
    p.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let k = rcgen::KeyPair::generate().map_err(gen)?;
    let cert = p.self_signed(&k).map_err(gen)?;
    let key = PrivateKeyDer::try_from(k.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    // Not through `CertifiedKey::from_der`: its check parses the
    // certificate with webpki, which refuses the critical acmeIdentifier
    // extension that this certificate exists to carry.
    let signer = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

fn read_held(cert: &Path, key: &Path) -> Result<Held, AcmeError> {
    let chain = std::fs::read_to_string(cert).map_err(io(cert))?;
    let k = std::fs::read_to_string(key).map_err(io(key))?;
    held_of(&chain, &k, cert)
}

fn held_of(chain_pem: &str, key_pem: &str, path: &Path) -> Result<Held, AcmeError> {
    let pem_err = |what: &'static str| {
        move |e: rustls_pki_types::pem::Error| TlsError::Pem {
            path: path.to_owned(),
            what,
            message: e.to_string(),
        }
    };
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err("certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("private key"))?;
    let leaf = chain.first().ok_or_else(|| TlsError::Pem {
        path: path.to_owned(),
        what: "certificate",
        message: "no CERTIFICATE block".into(),
    })?;
    let not_after = not_after(leaf).ok_or_else(|| TlsError::Pem {
        path: path.to_owned(),
        what: "certificate",
        message: "its validity cannot be read".into(),
    })?;
    Ok(Held {
        key: certified(chain, key)?,
        not_after,
    })
}

/// When a certificate stops being valid.
fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = u64::try_from(c.validity().not_after.timestamp()).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

impl ResolvesServerCert for Acme {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let asked = hello.server_name().map(str::to_ascii_lowercase);
        let name = asked.unwrap_or_else(|| self.domain.clone());
        if let Some(h) = self.covering(&name) {
            return Some(h.key);
        }
        // A name without its own: Kennel's host's, so the handshake
        // completes and the browser says which name it expected.
        self.covering(&self.domain).map(|h| h.key)
    }
}
