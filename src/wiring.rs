//! Builds Kennel's parts from the configuration.

use std::sync::Arc;

use anyhow::{Context, Result};
use std::time::Duration;

use kennel_core::provision::{Provisioner, Unavailable};
use kennel_core::{Executor, Settings, Store};
use kennel_provisioner::host::Host;
use kennel_provisioner::incus::IncusClient;
use kennel_provisioner::lifecycle::{
    IncusProvisioner, IncusSettings, LocalProvisioner, Settings as ProvisionerSettings,
};
use kennel_provisioner::process::SystemRunner;
use kennel_provisioner::select::select;
use kennel_provisioner::virtiofs::Virtiofsd;

use crate::config::Config;
use crate::datadir::DataDir;

/// The SSH gateway's host key, made on first use.
pub fn ssh_host_key(config: &Config) -> Result<kennel_gateway::HostKey> {
    let dir = DataDir::new(&config.data_dir);
    dir.create()?;
    Ok(kennel_gateway::ssh::host_key(
        &dir.root().join("keys/ssh_host_ed25519_key"),
    )?)
}

/// The executor's settings from the configuration.
pub fn settings(config: &Config) -> Result<Settings> {
    Ok(Settings {
        ssh_host: config.ssh.public_host.clone(),
        ssh_port: config.ssh.public_port.unwrap_or(config.ssh.listen.port()),
        domain: config.https.domain.clone(),
        https_port: config
            .https
            .public_port
            .unwrap_or(config.https.listen.port()),
        projects_root: std::path::absolute(config.projects_root())?,
        default_resources: config.default_resources()?,
        default_app_port: 8080,
        host_key_fingerprints: vec![kennel_gateway::ssh::host_key_fingerprint(&ssh_host_key(
            config,
        )?)],
        admins: config.admin_identities()?,
        max_parallel_creates: usize::try_from(config.vm.max_parallel_creates).unwrap_or(1),
        confirm_secs: 300,
        idle_stop: config.idle_stop()?,
        egress: config.egress()?,
        egress_once_secs: config.egress_once_secs()?,
        idle_cpu_percent: config.vm.idle_cpu_percent,
        checkpoint_keep: config.checkpoint.keep,
        llm_requests_per_minute: config.llm.requests_per_minute,
        llm_tokens_per_day: config.llm.tokens_per_day,
        agents: agents(config)?,
        public_addresses: config.https.public_addresses.clone(),
        ..Settings::default()
    })
}

/// The configured agents, the default first.
fn agents(config: &Config) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for (name, a) in &config.agents {
        if kennel_core::command::SlugName::new(name).is_err() {
            anyhow::bail!("agents.{name}: an agent's name is lowercase letters, digits and dashes");
        }
        if a.command.first().is_none_or(|p| p.trim().is_empty()) {
            anyhow::bail!("agents.{name}.command is empty: give the program and its arguments, with \"{{task}}\" where the task goes");
        }
        let entry = (name.clone(), a.command.clone());
        if a.default {
            out.insert(0, entry);
        } else {
            out.push(entry);
        }
    }
    Ok(out)
}

/// The metadata service's settings: sockets under the data dir, the
/// `[llm]` section with each backend's key read from its file.
pub fn meta_settings(config: &Config, dir: &DataDir) -> Result<kennel_gateway::meta::MetaSettings> {
    use kennel_core::llm::Provider;
    let l = &config.llm;
    let url = |what: &str, u: &str| -> Result<String> {
        kennel_gateway::meta::base_url(u)
            .ok_or_else(|| anyhow::anyhow!("{what} {u:?} is not an http:// or https:// URL"))
    };
    let mut backends = Vec::new();
    for (name, b) in &l.backends {
        let provider = Provider::parse(&b.api).ok_or_else(|| {
            anyhow::anyhow!(
                "llm.backends.{name}.api is {:?}: say \"openai\" or \"anthropic\"",
                b.api
            )
        })?;
        let key = match &b.key_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| {
                        format!("cannot read llm.backends.{name}.key_file {}", p.display())
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        backends.push(kennel_gateway::meta::Backend {
            name: name.clone(),
            provider,
            url: url(&format!("llm.backends.{name}.url"), &b.url)?,
            key,
            users: b.users.clone(),
        });
    }
    Ok(kennel_gateway::meta::MetaSettings {
        dir: dir.root().join("meta"),
        openai_url: url("llm.openai_url", &l.openai_url)?,
        anthropic_url: url("llm.anthropic_url", &l.anthropic_url)?,
        backends,
        max_body: usize::try_from(l.max_body_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
        connect_timeout: std::time::Duration::from_secs(10),
        answer_timeout: std::time::Duration::from_secs(l.answer_timeout_secs.max(1)),
        idle_timeout: std::time::Duration::from_secs(l.idle_timeout_secs.max(1)),
        notify_per_minute: l.notify_per_minute,
    })
}

/// Opens the store in the data dir (the caller holds the lock).
pub fn store(dir: &DataDir) -> Result<Store> {
    Store::open(&dir.db())
        .with_context(|| format!("cannot open the store in {}", dir.root().display()))
}

/// The provisioner this host runs projects with.
#[derive(Debug, Clone)]
pub enum Backend {
    /// VMs on this host (QEMU or Cloud Hypervisor).
    Local(Arc<LocalProvisioner>),
    /// Instances of an Incus server or cluster.
    Incus(Arc<IncusProvisioner>),
}

impl Backend {
    /// The backend's description, for logs.
    pub fn describe(&self) -> String {
        match self {
            Backend::Local(p) => p.describe(),
            Backend::Incus(p) => p.describe(),
        }
    }

    /// The projects' VMs found and whether each runs.
    pub async fn found(&self) -> Vec<(String, bool)> {
        match self {
            Backend::Local(p) => p.reconcile().await,
            Backend::Incus(p) => p.reconcile().await,
        }
    }

    fn provisioner(&self) -> Arc<dyn Provisioner> {
        match self {
            Backend::Local(p) => p.clone(),
            Backend::Incus(p) => p.clone(),
        }
    }
}

/// Kennel's host-side settings for either backend.
fn provisioner_settings(
    config: &Config,
    network: kennel_provisioner::net::NetworkMode,
    boot_timeout: Duration,
    host_guard: Option<(u32, Vec<u16>)>,
) -> Result<ProvisionerSettings, String> {
    let data_dir = std::path::absolute(&config.data_dir).map_err(|e| e.to_string())?;
    Ok(ProvisionerSettings {
        data_dir,
        stacks_dir: config.images.stacks_dir.clone(),
        templates_dir: config.images.templates_dir.clone(),
        recipe_dir: config.images.recipe_dir.clone(),
        apt_sources: config.images.apt_sources(),
        apt_cache: config.images.apt_cache.clone(),
        network,
        boot_timeout,
        stop_timeout: Duration::from_secs(config.vm.stop_timeout_secs),
        project_roots: vec![std::path::absolute(config.projects_root()).map_err(|e| e.to_string())?],
        default_owner: config.default_owner().map_err(|e| e.to_string())?,
        online: config.vm.online,
        git_allow_private_hosts: config.git.allow_private_hosts.clone(),
        host_guard,
    })
}

/// The Incus client of `[incus]`.
pub fn incus_client(c: &crate::config::IncusConfig) -> Result<IncusClient, String> {
    if c.address.starts_with("https://") {
        let read = |what: &str, p: &Option<std::path::PathBuf>| -> Result<Vec<u8>, String> {
            let p = p.as_ref().ok_or_else(|| {
                format!("incus.address is {} but incus.{what} is not set", c.address)
            })?;
            std::fs::read(p).map_err(|e| format!("cannot read incus.{what} {}: {e}", p.display()))
        };
        IncusClient::https(
            &c.address,
            &read("client_cert", &c.client_cert)?,
            &read("client_key", &c.client_key)?,
            &read("server_cert", &c.server_cert)?,
            &c.project,
        )
        .map_err(|e| e.to_string())
    } else {
        let path = c.address.strip_prefix("unix:").unwrap_or(&c.address);
        Ok(IncusClient::unix(std::path::Path::new(path), &c.project))
    }
}

/// The provisioner for this host, or why there is none.
pub fn provisioner(config: &Config, store: &Store) -> Result<Backend, String> {
    if config.vm.backend == kennel_provisioner::select::BackendChoice::Incus {
        let client = incus_client(&config.incus)?;
        let settings = provisioner_settings(
            config,
            kennel_provisioner::net::NetworkMode::User,
            config.vm.boot_timeout(false),
            None,
        )?;
        let set = IncusSettings {
            placement: kennel_provisioner::incus::spec::Placement {
                instance_type: config.incus.instance_type,
                storage_pool: config.incus.storage_pool.clone(),
                network: config.incus.network.clone(),
            },
            listen: config.incus.listen()?,
            ports: config.incus.port_range()?,
            workspace: config.incus.workspace,
        };
        return Ok(Backend::Incus(Arc::new(IncusProvisioner::new(
            settings,
            store.clone(),
            Arc::new(SystemRunner),
            client,
            set,
        ))));
    }
    let host = Host::real();
    let data_dir = std::path::absolute(&config.data_dir).map_err(|e| e.to_string())?;
    // Guests reach Kennel's gateways on the host, and no other service of
    // the host's (docs/networking.md): QEMU runs in a group of its own
    // (only root may start it so), whose rules load before the first boot.
    let host_guard = rustix::process::geteuid().is_root().then(|| {
        (
            kennel_provisioner::hostguard::guest_gid(&data_dir),
            vec![config.ssh.listen.port(), config.https.listen.port()],
        )
    });
    let guest_gid = host_guard.as_ref().map(|(gid, _)| *gid);
    let (vmm, network) = select(
        config.vm.backend,
        config.vm.network,
        &host,
        guest_gid,
        config.vm.emulated_cpu.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let virtiofsd = Virtiofsd::detect(&host).ok_or(
        "no virtiofsd on this host: apt-get install qemu-system-common, or cargo install virtiofsd",
    )?;
    let settings = provisioner_settings(
        config,
        network,
        config.vm.boot_timeout(vmm.emulated()),
        host_guard,
    )?;
    Ok(Backend::Local(Arc::new(LocalProvisioner::new(
        settings,
        vmm,
        Arc::new(virtiofsd),
        store.clone(),
        Arc::new(SystemRunner),
    ))))
}

/// The executor, with the provisioner this host can run (or one that
/// says why VMs are unavailable), and that provisioner.
pub fn executor(config: &Config, store: Store) -> Result<(Executor, Option<Backend>)> {
    let backend = provisioner(config, &store);
    let vms: Arc<dyn Provisioner> = match &backend {
        Ok(b) => b.provisioner(),
        Err(reason) => {
            tracing::warn!(%reason, "VMs are not available");
            Arc::new(Unavailable {
                reason: reason.clone(),
            })
        }
    };
    let catalog = catalog(config);
    Ok((
        Executor::new(store, vms, catalog, settings(config)?),
        backend.ok(),
    ))
}

/// The stacks and templates the configuration points at.
fn catalog(config: &Config) -> Arc<kennel_provisioner::catalog::DirCatalog> {
    Arc::new(kennel_provisioner::catalog::DirCatalog {
        stacks: kennel_provisioner::stacks::Stacks::load(&config.images.stacks_dir),
        templates: kennel_provisioner::templates::Templates::load(&config.images.templates_dir),
    })
}

/// An executor over an empty in-memory store, without VMs: for answers
/// that need no data (help, the stacks and templates on offer) where no
/// data directory exists, so that none is made.
pub fn ephemeral_executor(config: &Config) -> Result<Executor> {
    let store = Store::open_in_memory().context("cannot open an in-memory store")?;
    let catalog = catalog(config);
    let vms = Arc::new(Unavailable {
        reason: "no data directory".into(),
    });
    Ok(Executor::new(store, vms, catalog, Settings::default()))
}

/// Adopts VMs that outlived the last daemon and records every VM's state
/// (the mapping itself is core's: [`Executor::reconcile`]).
/// With `autostart`, the projects that were running when their VMs went
/// away (a host restart) are started again, in the background, one after
/// another (like libvirt's autostart), as Kennel itself.
pub async fn reconcile(exec: &Executor, backend: &Backend, autostart: bool) -> Result<()> {
    let found = backend.found().await;
    let done = exec.reconcile(&found).await?;
    if done != kennel_core::vmstate::Reconciled::default() {
        tracing::info!(?done, "reconciled the store with the VMs found");
    }
    if autostart && !done.interrupted.is_empty() {
        let exec = exec.clone();
        tokio::spawn(async move {
            let actor = kennel_core::vmstate::Actor::System { why: "autostart" };
            for name in done.interrupted {
                match exec
                    .ensure_running(&actor, &name, &kennel_core::provision::NoProgress)
                    .await
                {
                    Ok(_) => tracing::info!(project = %name, "started again (vm.autostart)"),
                    Err(e) => {
                        tracing::warn!(project = %name, error = %e, "could not start again (vm.autostart)")
                    }
                }
            }
        });
    }
    Ok(())
}

/// The SSH gateway's limits from `[ssh]`.
pub fn ssh_settings(config: &Config) -> kennel_gateway::ssh::SshSettings {
    let c = &config.ssh;
    kennel_gateway::ssh::SshSettings {
        max_connections_per_ip: c.max_connections_per_ip,
        max_connections_per_user: c.max_connections_per_user,
        max_auth_failures_per_ip: c.max_auth_failures_per_ip,
        max_requests_per_ip: c.max_requests_per_ip,
        idle_timeout: std::time::Duration::from_secs(c.idle_timeout_secs.max(1)),
    }
}

/// Where the HTTPS gateway's certificate comes from: an ACME CA, the
/// configured files, or the development CA in the data dir.
pub fn tls_source(config: &Config, dir: &DataDir) -> kennel_gateway::https::tls::TlsSource {
    use kennel_gateway::https::tls::TlsSource;
    if let Some(a) = &config.https.acme {
        let mut s = kennel_gateway::https::acme::AcmeSettings::new(
            a.directory.clone(),
            dir.root().join("acme"),
        );
        s.contact = a.contact.clone();
        s.ca_roots = a.ca_roots.clone();
        s.dns_hook = a.dns_hook.clone();
        s.dns_wait = std::time::Duration::from_secs(a.dns_wait_secs);
        s.renew_before = std::time::Duration::from_secs(a.renew_before_days.saturating_mul(86_400));
        s.check_every = std::time::Duration::from_secs(a.check_every_secs.max(1));
        s.orders_per_hour = a.orders_per_hour;
        return TlsSource::Acme {
            settings: s,
            domain: config.https.domain.clone(),
        };
    }
    match (&config.https.cert, &config.https.key) {
        (Some(cert), Some(key)) => TlsSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => TlsSource::DevCa {
            dir: dir.root().join("tls/dev-ca"),
            domain: config.https.domain.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ssh_limits_reach_the_gateway() {
        let mut c = crate::config::Config::default();
        c.ssh.max_connections_per_ip = 7;
        c.ssh.idle_timeout_secs = 60;
        let s = super::ssh_settings(&c);
        assert_eq!(s.max_connections_per_ip, 7);
        assert_eq!(s.max_connections_per_user, 64);
        assert_eq!(s.idle_timeout, std::time::Duration::from_secs(60));
    }
}
