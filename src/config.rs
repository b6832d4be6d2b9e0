//! Configuration: one TOML file, `KENNEL_*` environment overrides, flags.
//!
//! Types here are plain serde structs with `deny_unknown_fields`;
//! [`Config::validate`] checks what serde cannot; [`load`] layers the
//! sources with figment, which also remembers where each value came from
//! for `kennel config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use figment::providers::{Env, Format as _, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use kennel_core::command::Size;
use kennel_core::model::{Frontend, Identity, Resources};
use kennel_provisioner::select::{BackendChoice, NetworkChoice};
use serde::{Deserialize, Serialize};

/// Everything Kennel can be configured with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store, keys, images, project sources and VMs live.
    pub data_dir: PathBuf,
    /// Default home of project sources; `<data_dir>/projects` if unset.
    pub projects_root: Option<PathBuf>,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `kennel=debug`.
    pub log: String,
    /// `text` (the default) or `json`: one JSON object per line, with the
    /// fields of the enclosing spans (project, user, session), for log
    /// shippers.
    pub log_format: crate::logging::LogFormat,
    /// Identities that are admins from their first message, as
    /// `frontend:id`, e.g. `matrix:@ann:example.org` or `discord:1234`.
    pub admins: Vec<String>,
    pub ssh: SshConfig,
    pub https: HttpsConfig,
    pub vm: VmConfig,
    /// The Incus server or cluster projects run on (`vm.backend = "incus"`).
    pub incus: IncusConfig,
    pub images: ImagesConfig,
    pub git: GitConfig,
    pub metrics: MetricsConfig,
    pub checkpoint: CheckpointConfig,
    /// The LLM gateway of the metadata service VMs reach.
    pub llm: LlmConfig,
    /// Coding agents `agent NAME TASK` may run in a project's VM, by name.
    pub agents: std::collections::BTreeMap<String, AgentConfig>,
    /// The Matrix bot (runs when `matrix.homeserver` is set).
    pub matrix: kennel_bot::config::MatrixConfig,
    /// The Discord bot (runs when `discord.token` is set).
    pub discord: kennel_bot::config::DiscordConfig,
}

/// Checkpoints (`checkpoint NAME`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Checkpoints kept per project: past it, the oldest that Kennel took
    /// itself (before a rollback) are removed; named ones never are.
    pub keep: u32,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { keep: 10 }
    }
}

/// The LLM gateway (`http://metadata.kennel.internal/llm/…` in VMs): where
/// requests go and the limits per user. An owner's own key (`secret set
/// openai-api-key …`) goes to `openai_url`/`anthropic_url`; without one,
/// the first backend of the API the owner may use answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Requests per user in any minute; 0: no limit.
    pub requests_per_minute: u32,
    /// Tokens per user per UTC day (from the answers' usage); 0: no limit.
    pub tokens_per_day: u64,
    /// Where owners' own OpenAI keys go (the API base, `/v1` included).
    pub openai_url: String,
    /// Where owners' own Anthropic keys go.
    pub anthropic_url: String,
    /// The largest request body forwarded, in MiB.
    pub max_body_mib: u64,
    /// Until a backend's answer starts.
    pub answer_timeout_secs: u64,
    /// The longest pause inside a streamed answer.
    pub idle_timeout_secs: u64,
    /// `/kennel/v1/notify` lines per project per minute.
    pub notify_per_minute: u32,
    /// Backends the operator runs or pays for, by name.
    pub backends: std::collections::BTreeMap<String, LlmBackendConfig>,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: 60,
            tokens_per_day: 2_000_000,
            openai_url: "https://api.openai.com/v1".into(),
            anthropic_url: "https://api.anthropic.com/v1".into(),
            max_body_mib: 4,
            answer_timeout_secs: 300,
            idle_timeout_secs: 300,
            notify_per_minute: 6,
            backends: std::collections::BTreeMap::new(),
        }
    }
}

/// The agents Kennel knows without configuration: gptme, which the
/// python stack's image carries, on the OpenAI-compatible route of the
/// LLM gateway (a model name every such server answers to is the
/// operator's to set: `[agents.gptme] command = [..., "--model",
/// "openai/MODEL", "{task}"]`, or `local/MODEL` for Ollama's).
fn default_agents() -> std::collections::BTreeMap<String, AgentConfig> {
    let command = [
        "gptme",
        "--non-interactive",
        "--no-confirm",
        "--model",
        "openai/gpt-4o",
        "{task}",
    ];
    std::collections::BTreeMap::from([(
        "gptme".to_owned(),
        AgentConfig {
            command: command.map(String::from).to_vec(),
            default: false,
        },
    )])
}

/// One agent (`[agents.NAME]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The program and its arguments, run as `dev` in `/workspace`;
    /// `{task}` in a word is replaced by the task (still one argument).
    pub command: Vec<String>,
    /// The agent `agent NAME TASK` runs when the project has no
    /// `.kennel/agent` and none is named (else the first by name).
    #[serde(default)]
    pub default: bool,
}

/// One operator backend (`[llm.backends.NAME]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmBackendConfig {
    /// `openai` (any compatible server: vLLM, Ollama's `/v1`) or `anthropic`.
    pub api: String,
    /// The API base, `/v1` included, e.g. `http://127.0.0.1:11434/v1`.
    pub url: String,
    /// A file holding the key (read at start, never logged); none for a
    /// server that needs no key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Users who may use it (by name); empty: everyone.
    #[serde(default)]
    pub users: Vec<String>,
}

/// Prometheus metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `/metrics` is served (plain HTTP: keep it on loopback or a
    /// private network). `""` turns metrics off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl MetricsConfig {
    /// The address, `None` when off.
    pub fn addr(&self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        let l = self.listen.trim();
        if l.is_empty() || l == "off" {
            return Ok(None);
        }
        l.parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "metrics.listen {l:?} is not an address like 127.0.0.1:9464 (or \"\" for off)"
            )
        })
    }
}

/// Cloning members' `--git` URLs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitConfig {
    /// Hosts (as written in URLs: names or addresses) members may clone
    /// from although they resolve to loopback, link-local or private
    /// addresses, e.g. an internal GitLab. Admins may clone from anywhere.
    pub allow_private_hosts: Vec<String>,
}

/// Stacks, templates and guest images.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Folder of `<stack>/stack.toml` files.
    pub stacks_dir: PathBuf,
    /// Folder of project templates.
    pub templates_dir: PathBuf,
    /// The base image recipe (recipe.toml, customize.sh, overlay/).
    pub recipe_dir: PathBuf,
    /// apt sources for images: a sources.list or deb822 .sources file
    /// naming the suite the recipe builds. Default: the recipe's own
    /// `debian.sources` (Debian 13 from deb.debian.org), whatever the host
    /// itself runs; set it to use a local mirror.
    pub apt_sources: Option<PathBuf>,
    /// Downloaded packages kept between image builds; empty to disable.
    pub apt_cache: Option<PathBuf>,
}

/// The checkout Kennel was built from; its data folders are the defaults.
const SOURCE_DIR: &str = env!("CARGO_MANIFEST_DIR");

impl Default for ImagesConfig {
    fn default() -> Self {
        let src = Path::new(SOURCE_DIR);
        Self {
            stacks_dir: src.join("stacks"),
            templates_dir: src.join("templates"),
            recipe_dir: src.join("images/base"),
            apt_sources: None,
            apt_cache: std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kennel/apt")),
        }
    }
}

impl ImagesConfig {
    /// The apt sources images are built from.
    pub fn apt_sources(&self) -> PathBuf {
        self.apt_sources
            .clone()
            .unwrap_or_else(|| self.recipe_dir.join("debian.sources"))
    }
}

/// The SSH gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    /// Address the gateway listens on.
    pub listen: SocketAddr,
    /// Host name users type (`ssh myapp@HOST`).
    pub public_host: String,
    /// Port users type; defaults to the listen port.
    pub public_port: Option<u16>,
    /// Connections one address may hold open.
    pub max_connections_per_ip: usize,
    /// Connections one user may hold open.
    pub max_connections_per_user: usize,
    /// Failed sign-ins an address may have per ten minutes before it is
    /// refused for the rest of them.
    pub max_auth_failures_per_ip: u32,
    /// Access requests an address may file per hour.
    pub max_requests_per_ip: u32,
    /// Seconds a connection may be silent before it is closed.
    pub idle_timeout_secs: u64,
}

/// The HTTPS gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpsConfig {
    pub listen: SocketAddr,
    /// Projects are served at `https://<project>.<domain>`.
    pub domain: String,
    /// Port in the URLs Kennel hands out; defaults to the listen port.
    pub public_port: Option<u16>,
    /// A PEM certificate chain for `domain` and `*.domain` (reloaded when
    /// it changes). Without `cert` and `key`, Kennel makes a development
    /// CA in `<data_dir>/tls/dev-ca/` and issues its own certificates.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Load balancers in front of Kennel whose `X-Forwarded-*` headers
    /// are believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Certificates from an ACME CA (Let's Encrypt) instead of files or
    /// the development CA.
    pub acme: Option<AcmeConfig>,
    /// Kennel's public addresses: a custom domain's A/AAAA record may
    /// point at one (besides the addresses `domain` resolves to).
    pub public_addresses: Vec<std::net::IpAddr>,
    /// The DNS server (`host:port`) custom domains are checked with;
    /// default: the system's (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// Seconds a script's request for a stopped project waits for the VM
    /// to start before a 503 (browsers get a page that reloads itself).
    /// Raise it on hosts without KVM, where boots are slower.
    pub wake_wait_secs: u64,
    /// Seconds after a wake that a project with `.kennel/start` may take
    /// for its app to listen: browsers see the starting page meanwhile,
    /// scripts wait.
    pub app_start_wait_secs: u64,
}

/// `[https.acme]`: certificates from an ACME CA, per host by TLS-ALPN-01
/// (the CA must reach `https.listen` on port 443), or one wildcard by
/// DNS-01 when `dns_hook` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcmeConfig {
    /// The CA's directory URL.
    pub directory: String,
    /// Contact URLs for the account, e.g. `["mailto:ops@example.com"]`.
    pub contact: Vec<String>,
    /// Extra PEM roots for the CA's own HTTPS (a private or test CA).
    pub ca_roots: Option<PathBuf>,
    /// A command run as `HOOK set|clear _acme-challenge.DOMAIN. VALUE` to
    /// publish DNS-01 records; with it, one `*.DOMAIN` certificate.
    pub dns_hook: Option<PathBuf>,
    /// Seconds to wait after the hook before the CA looks.
    pub dns_wait_secs: u64,
    /// Renew this many days before expiry.
    pub renew_before_days: u64,
    /// Seconds between renewal checks.
    pub check_every_secs: u64,
    /// New orders per hour at most.
    pub orders_per_hour: u32,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        Self {
            directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            contact: Vec::new(),
            ca_roots: None,
            dns_hook: None,
            dns_wait_secs: 30,
            renew_before_days: 30,
            check_every_secs: 3600,
            orders_per_hour: 30,
        }
    }
}

/// Project VMs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// `auto`, `qemu`, `cloud-hypervisor`, `incus` (projects on the Incus
    /// server or cluster of `[incus]`), or `none` (no VMs: chat and admin
    /// commands only).
    pub backend: BackendChoice,
    pub default_cpus: u32,
    pub default_memory: String,
    pub default_disk: String,
    /// How many `new project`s may build at once.
    pub max_parallel_creates: u32,
    /// `auto` (bridge for Cloud Hypervisor, user mode for QEMU), `user` or `bridge`.
    pub network: NetworkChoice,
    /// Seconds a VM may take to become ready (sshd and /workspace); unset,
    /// 120 where the CPU is virtualised (KVM) and 300 where it is emulated
    /// (QEMU's TCG runs a guest several times slower).
    pub boot_timeout_secs: Option<u64>,
    /// The CPU model QEMU shows guests where it emulates the CPU (TCG, no
    /// KVM), as QEMU's `-cpu` takes it. Unset: x86-64-v2
    /// (`qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt`), which emulates faster
    /// than `max`; `max` offers AVX2 for software that needs it.
    pub emulated_cpu: Option<String>,
    /// Seconds a graceful stop may take before the VM is forced off
    /// (systemd stops the guest's services; Docker gives a container 10 s).
    pub stop_timeout_secs: u64,
    /// `uid:gid` given to project sources Kennel creates as root, and to the
    /// guest's `dev` when a source belongs to root.
    pub default_owner: String,
    /// Whether guests can reach the internet (runs stacks' first-boot steps).
    pub online: bool,
    /// How long a running VM may sit idle (no SSH session or forward, no
    /// HTTPS request or WebSocket, guest CPU under `idle_cpu_percent`)
    /// before Kennel stops it: `30m`, `2h`, `never`. The next `ssh` or
    /// HTTPS visit starts it again; `idle NAME ...` sets it per project.
    pub idle_stop: String,
    /// Guest CPU use, in percent of one host core, above which a VM with
    /// nobody connected still counts as in use (a build under `nohup`).
    pub idle_cpu_percent: u32,
    /// At start, start again the projects that were running when their
    /// VMs went away (a host restart, a crash), like libvirt's autostart.
    /// Off: they are shown stopped, and the next ssh or visit wakes them.
    pub autostart: bool,
    /// Who new projects' VMs may reach: `open` (anything the host reaches,
    /// the default) or `closed` (only what each project's list allows;
    /// new names are asked about in chat). `egress NAME ...` sets it per
    /// project.
    pub egress: String,
    /// How long `egress NAME allow-once DEST` lets DEST through: `1h`.
    pub egress_once: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("kennel-data"),
            projects_root: None,
            log: "info".into(),
            log_format: crate::logging::LogFormat::Text,
            admins: Vec::new(),
            ssh: SshConfig::default(),
            https: HttpsConfig::default(),
            vm: VmConfig::default(),
            incus: IncusConfig::default(),
            images: ImagesConfig::default(),
            git: GitConfig::default(),
            metrics: MetricsConfig::default(),
            checkpoint: CheckpointConfig::default(),
            llm: LlmConfig::default(),
            agents: default_agents(),
            matrix: Default::default(),
            discord: Default::default(),
        }
    }
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 2222)),
            public_host: "127.0.0.1".into(),
            public_port: None,
            max_connections_per_ip: 64,
            max_connections_per_user: 64,
            max_auth_failures_per_ip: 20,
            max_requests_per_ip: 5,
            idle_timeout_secs: 3600,
        }
    }
}

impl Default for HttpsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            domain: "localhost".into(),
            public_port: None,
            cert: None,
            key: None,
            trusted_proxies: Vec::new(),
            acme: None,
            public_addresses: Vec::new(),
            resolver: None,
            wake_wait_secs: 120,
            app_start_wait_secs: 120,
        }
    }
}

/// The Incus server or cluster of `vm.backend = "incus"` (docs/incus.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IncusConfig {
    /// The daemon's Unix socket (a server on this host), or
    /// `https://HOST:8443` (a remote server or cluster, with the three
    /// certificate files below).
    pub address: String,
    /// Kennel's client certificate and key (PEM), trusted by the cluster
    /// (`incus config trust add-certificate`), for `https://` addresses.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The server's certificate (PEM), pinned: Incus's are self-signed.
    pub server_cert: Option<PathBuf>,
    /// The Incus project Kennel's instances live in.
    pub project: String,
    pub storage_pool: String,
    pub network: String,
    /// `container` or `virtual-machine` (VMs need KVM on the members).
    pub instance_type: kennel_provisioner::select::InstanceType,
    /// Where each instance's SSH and app proxies listen on its member: an
    /// address only Kennel reaches (loopback for a server on this host),
    /// or `member`: each member's own cluster address.
    pub listen_address: String,
    /// The member ports those proxies take, `FIRST-LAST`.
    pub ports: String,
    /// Where a project's source lives: `volume` (a custom storage volume
    /// on its member: a cluster), `host` (the project's directory on
    /// Kennel's host: a server on this host), or `auto` (a volume when
    /// the server is a cluster).
    pub workspace: kennel_provisioner::select::WorkspaceChoice,
}

impl Default for IncusConfig {
    fn default() -> Self {
        Self {
            address: "/var/lib/incus/unix.socket".into(),
            client_cert: None,
            client_key: None,
            server_cert: None,
            project: "default".into(),
            storage_pool: "default".into(),
            network: "incusbr0".into(),
            instance_type: kennel_provisioner::select::InstanceType::Container,
            listen_address: "127.0.0.1".into(),
            ports: "40000-40999".into(),
            workspace: kennel_provisioner::select::WorkspaceChoice::Auto,
        }
    }
}

impl IncusConfig {
    /// `listen_address` read, or what is wrong with it.
    pub fn listen(&self) -> Result<kennel_provisioner::select::Listen, String> {
        self.listen_address.parse()
    }

    /// `ports` as a range, or what is wrong with it.
    pub fn port_range(&self) -> Result<(u16, u16), String> {
        let bad = || {
            format!(
                "incus.ports is {:?}: give FIRST-LAST, e.g. \"40000-40999\"",
                self.ports
            )
        };
        let (a, b) = self.ports.split_once('-').ok_or_else(bad)?;
        let (a, b): (u16, u16) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a == 0 || b <= a {
            return Err(bad());
        }
        Ok((a, b))
    }
}

impl VmConfig {
    /// How long a VM may take to become ready: the configured limit, or
    /// 120 s where the CPU is virtualised and 300 s where it is emulated.
    pub fn boot_timeout(&self, emulated: bool) -> std::time::Duration {
        let default = if emulated { 300 } else { 120 };
        std::time::Duration::from_secs(self.boot_timeout_secs.unwrap_or(default))
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            default_cpus: 2,
            default_memory: "2G".into(),
            default_disk: "20G".into(),
            max_parallel_creates: 2,
            network: NetworkChoice::Auto,
            boot_timeout_secs: None,
            emulated_cpu: None,
            stop_timeout_secs: 30,
            default_owner: "1000:1000".into(),
            online: false,
            idle_stop: "30m".into(),
            idle_cpu_percent: 5,
            autostart: false,
            egress: "open".into(),
            egress_once: "1h".into(),
        }
    }
}

impl Config {
    /// Checks what the types cannot: names, sizes, identities.
    pub fn validate(&self) -> Result<()> {
        if !(1..=64).contains(&self.vm.default_cpus) {
            bail!("vm.default_cpus must be 1 to 64");
        }
        if self.vm.max_parallel_creates == 0 {
            bail!("vm.max_parallel_creates must be at least 1");
        }
        if let Some(cpu) = &self.vm.emulated_cpu {
            // One argument to QEMU (never a shell): a model name and
            // `,+feature` / `,feature=off` options.
            let ok = !cpu.is_empty()
                && cpu.len() <= 256
                && cpu.starts_with(|c: char| c.is_ascii_alphanumeric())
                && cpu
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.,+=".contains(c));
            if !ok {
                bail!("vm.emulated_cpu must be a QEMU CPU model such as \"max\" or \"qemu64,+sse4.2\" (letters, digits and - _ . , + =)");
            }
        }
        self.default_owner()?;
        self.default_resources()?;
        self.idle_stop()?;
        self.egress()?;
        self.egress_once_secs()?;
        if !(1..=100).contains(&self.vm.idle_cpu_percent) {
            bail!("vm.idle_cpu_percent must be 1 to 100 (percent of one host core)");
        }
        self.admin_identities()?;
        if self.https.domain.is_empty() || self.https.domain.contains(['/', ' ', ':']) {
            bail!("https.domain {:?} is not a domain name", self.https.domain);
        }
        if self.https.acme.is_some() && self.https.cert.is_some() {
            bail!("https.acme and https.cert are two sources of certificates: keep one");
        }
        if let Some(a) = &self.https.acme {
            if !a.directory.starts_with("https://") {
                bail!(
                    "https.acme.directory {:?} must be an https:// URL",
                    a.directory
                );
            }
        }
        if self.https.cert.is_some() != self.https.key.is_some() {
            bail!("https.cert and https.key go together: set both (certificate files) or neither (a development CA)");
        }
        if let Some(problem) = self.matrix.problem() {
            bail!("{problem}");
        }
        if let Some(problem) = self.discord.problem() {
            bail!("{problem}");
        }
        Ok(())
    }

    /// `vm.egress`, parsed.
    pub fn egress(&self) -> Result<kennel_core::egress::EgressMode> {
        self.vm
            .egress
            .parse()
            .map_err(|e| anyhow::anyhow!("vm.egress: {e}"))
    }

    /// `vm.egress_once`, in seconds (1 second to 30 days).
    pub fn egress_once_secs(&self) -> Result<i64> {
        let d = humantime::parse_duration(&self.vm.egress_once)
            .map_err(|e| anyhow::anyhow!("vm.egress_once: {e} (write 1h, 30m, 10s)"))?;
        let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        if !(1..=30 * 86_400).contains(&secs) {
            bail!("vm.egress_once must be 1s to 30d");
        }
        Ok(secs)
    }

    /// `vm.idle_stop`, parsed.
    pub fn idle_stop(&self) -> Result<kennel_core::model::IdleStop> {
        kennel_core::model::IdleStop::parse(&self.vm.idle_stop)
            .map_err(|e| anyhow::anyhow!("vm.idle_stop: {e}"))
    }

    /// Default VM resources.
    pub fn default_resources(&self) -> Result<Resources> {
        let memory = Size::parse(&self.vm.default_memory, 'M')
            .map_err(|e| anyhow::anyhow!("vm.default_memory: {e}"))?;
        let disk = Size::parse(&self.vm.default_disk, 'G')
            .map_err(|e| anyhow::anyhow!("vm.default_disk: {e}"))?;
        Ok(Resources {
            vcpus: self.vm.default_cpus,
            memory_mib: memory.mib,
            disk_mib: disk.mib,
        })
    }

    /// `vm.default_owner` as (uid, gid).
    pub fn default_owner(&self) -> Result<(u32, u32)> {
        let (u, g) = self.vm.default_owner.split_once(':').with_context(|| {
            format!(
                "vm.default_owner {:?} must be uid:gid, e.g. 1000:1000",
                self.vm.default_owner
            )
        })?;
        Ok((
            u.parse()
                .context("vm.default_owner: the uid is not a number")?,
            g.parse()
                .context("vm.default_owner: the gid is not a number")?,
        ))
    }

    /// `admins` as identities.
    pub fn admin_identities(&self) -> Result<Vec<Identity>> {
        self.admins
            .iter()
            .map(|a| {
                let (f, id) = a.split_once(':').with_context(|| {
                    format!(
                        "admins entry {a:?} must look like matrix:@ann:example.org or discord:1234"
                    )
                })?;
                let f: Frontend = f
                    .parse()
                    .with_context(|| format!("admins entry {a:?}: unknown front end {f:?}"))?;
                Ok(Identity::new(f, id))
            })
            .collect()
    }

    /// Where project sources go by default.
    pub fn projects_root(&self) -> PathBuf {
        self.projects_root
            .clone()
            .unwrap_or_else(|| self.data_dir.join("projects"))
    }
}

/// Where the configuration came from, for `kennel config`.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub figment: Figment,
    pub file: Option<PathBuf>,
}

impl Loaded {
    /// Whether `data_dir` is the built-in default (no file, variable or
    /// flag set it; the `--data-dir` flag is the caller's to know).
    pub fn data_dir_is_default(&self) -> bool {
        matches!(
            self.figment.find_metadata("data_dir"),
            None | Some(figment::Metadata {
                source: Some(figment::Source::Code(_)),
                ..
            })
        )
    }
}

/// Finds the config file: the flag, else `./kennel.toml`, else
/// `$XDG_CONFIG_HOME/kennel/kennel.toml` (or `~/.config/...`), if present.
fn find_file(flag: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(p) = flag {
        if !p.exists() {
            bail!("config file {} does not exist", p.display());
        }
        return Ok(Some(p.to_owned()));
    }
    let local = PathBuf::from("kennel.toml");
    if local.exists() {
        return Ok(Some(local));
    }
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    Ok(xdg
        .map(|d| d.join("kennel/kennel.toml"))
        .filter(|p| p.exists()))
}

/// Layers defaults, the file, `KENNEL_*` variables and flags, in that order.
pub fn load(file_flag: Option<&Path>, data_dir_flag: Option<&Path>) -> Result<Loaded> {
    let file = find_file(file_flag)?;
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(f) = &file {
        figment = figment.merge(Toml::file_exact(f));
    }
    figment = figment.merge(
        Env::prefixed("KENNEL_")
            // Not settings: the config file's path, the test suite's caches
            // and the crash tests' fault point.
            .ignore(&["CONFIG", "TEST_CACHE", "SYNAPSE_VENV", "FAULT_HOLD"])
            .split("__"),
    );
    if let Some(d) = data_dir_flag {
        figment = figment.merge(Serialized::global("data_dir", d));
    }
    let config = extract(&figment)?;
    Ok(Loaded {
        config,
        figment,
        file,
    })
}

/// A configuration from TOML text alone, over the defaults (no file, no
/// environment): what the config fuzz target and the example's test read.
#[cfg(any(test, fuzzing))]
pub fn parse_toml(text: &str) -> Result<Config> {
    extract(&Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)))
}

/// The settings `figment` holds, checked.
fn extract(figment: &Figment) -> Result<Config> {
    let config: Config = figment.extract().map_err(|e| {
        let mut msg = String::from("invalid configuration");
        for err in e {
            msg.push_str(&format!("\n  - {err}"));
        }
        anyhow::anyhow!(msg)
    })?;
    config.validate()?;
    Ok(config)
}

/// `key = value  # source` lines for every setting in force.
pub fn describe(loaded: &Loaded, data_dir_flag: bool) -> Result<String> {
    let value = loaded.figment.find_value("")?;
    let mut out = String::new();
    if let Some(f) = &loaded.file {
        out.push_str(&format!("# config file: {}\n", f.display()));
    } else {
        out.push_str("# no config file (defaults, KENNEL_* variables and flags only)\n");
    }
    let mut lines = Vec::new();
    if let Value::Dict(_, dict) = value {
        flatten("", &dict, &mut lines);
    }
    for (key, val) in lines {
        let source = match loaded.figment.find_metadata(&key) {
            _ if key == "data_dir" && data_dir_flag => "--data-dir flag".to_owned(),
            // Values serialized from code are the built-in defaults.
            None
            | Some(figment::Metadata {
                source: Some(figment::Source::Code(_)),
                ..
            }) => "default".to_owned(),
            Some(m) => match &m.source {
                Some(src) => format!("{} {src}", m.name),
                None => m.name.to_string(),
            },
        };
        out.push_str(&format!("{key} = {val}  # {source}\n"));
    }
    Ok(out)
}

fn flatten(prefix: &str, dict: &Dict, out: &mut Vec<(String, String)>) {
    for (k, v) in dict {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Dict(_, d) => flatten(&key, d, out),
            other => out.push((key, toml_value(other))),
        }
    }
}

fn toml_value(v: &Value) -> String {
    match v {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("{c:?}"),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => n
            .to_u128()
            .map(|u| u.to_string())
            .or_else(|| n.to_i128().map(|i| i.to_string()))
            .or_else(|| n.to_f64().map(|f| f.to_string()))
            .unwrap_or_default(),
        Value::Empty(_, _) => "(unset)".into(),
        Value::Array(_, a) => format!(
            "[{}]",
            a.iter().map(toml_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Dict(_, _) => "{...}".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_boot_limit_follows_the_cpu_unless_set() {
        let mut vm = super::VmConfig::default();
        assert_eq!(vm.boot_timeout(false).as_secs(), 120);
        assert_eq!(vm.boot_timeout(true).as_secs(), 300);
        vm.boot_timeout_secs = Some(45);
        assert_eq!(vm.boot_timeout(true).as_secs(), 45);
    }

    #[test]
    fn the_emulated_cpu_is_one_qemu_argument_or_a_clear_error() {
        let mut c = super::Config::default();
        for good in [
            "max",
            "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt",
            "max,avx2=off",
        ] {
            c.vm.emulated_cpu = Some(good.into());
            assert!(c.validate().is_ok(), "{good}");
        }
        for bad in ["", "max -device x", "max;id", ",+aes", "max\n"] {
            c.vm.emulated_cpu = Some(bad.into());
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("vm.emulated_cpu"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn incus_ports_are_a_range_or_a_clear_error() {
        let mut c = super::IncusConfig::default();
        assert_eq!(c.port_range(), Ok((40000, 40999)));
        for bad in ["40000", "x-y", "0-10", "500-400", "1-70000"] {
            c.ports = bad.into();
            let e = c.port_range().unwrap_err();
            assert!(e.contains("FIRST-LAST"), "{bad}: {e}");
        }
        let parsed = super::parse_toml(
            "[vm]\nbackend = \"incus\"\n[incus]\ninstance_type = \"virtual-machine\"\nlisten_address = \"10.8.0.2\"",
        )
        .unwrap();
        assert_eq!(parsed.vm.backend, super::BackendChoice::Incus);
        assert_eq!(
            parsed.incus.instance_type,
            kennel_provisioner::select::InstanceType::VirtualMachine
        );
        assert!(super::parse_toml("[incus]\ninstance_type = \"pod\"").is_err());
        assert_eq!(
            parsed.incus.listen(),
            Ok(kennel_provisioner::select::Listen::At(
                "10.8.0.2".parse().unwrap()
            ))
        );
        c.listen_address = "member".into();
        assert_eq!(c.listen(), Ok(kennel_provisioner::select::Listen::Member));
        c.listen_address = "somewhere".into();
        assert!(c.listen().unwrap_err().contains("\"member\""));
    }

    #[test]
    fn the_example_configuration_parses_and_bad_text_is_an_error() {
        let example = include_str!("../docs/kennel.example.toml");
        assert!(super::parse_toml(example).is_ok());
        for bad in ["vm = 3", "[ssh]\nlisten = \"nowhere\"", "log = ["] {
            assert!(super::parse_toml(bad).is_err(), "{bad}");
        }
    }
}
