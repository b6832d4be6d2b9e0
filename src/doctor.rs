//! `kennel doctor`: what this host has, what is missing, how to install it.

use std::net::TcpListener;
use std::path::Path;

use kennel_provisioner::host::{Host, Kvm};
use serde::Serialize;

use crate::config::Config;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// Works, degraded or with a caveat.
    Warn,
    /// Kennel cannot do its job without this.
    Missing,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to run or do about it.
    pub fix: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// The VM backend `auto` selects on this host, and why.
    pub backend: String,
}

impl Report {
    /// Whether anything required is missing.
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Missing)
    }

    /// A plain-text table.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let tag = match c.status {
                Status::Ok => "ok",
                Status::Warn => "WARN",
                Status::Missing => "MISSING",
            };
            out.push_str(&format!("{tag:<8} {:<18} {}\n", c.name, c.detail));
            if let Some(f) = &c.fix {
                out.push_str(&format!("{:<8} {:<18} fix: {f}\n", "", ""));
            }
        }
        out.push_str(&format!("\nVM backend: {}\n", self.backend));
        if self.failed() {
            out.push_str("Some required parts are missing: Kennel cannot run VMs until they are installed.\n");
        }
        out
    }
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: Option<&str>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: fix.map(str::to_owned),
    }
}

fn binary(host: &Host, name: &'static str, fallbacks: &[&str], required: bool, fix: &str) -> Check {
    match host.which(name, fallbacks) {
        Some(p) => check(name, Status::Ok, p.display().to_string(), None),
        None if required => check(name, Status::Missing, "not found", Some(fix)),
        None => check(name, Status::Warn, "not found (optional here)", Some(fix)),
    }
}

/// Runs every check.
pub fn run(config: &Config, host: &Host) -> Report {
    let mut checks = Vec::new();
    let kvm = host.kvm();
    checks.push(match &kvm {
        Kvm::Usable { module } => check("kvm", Status::Ok, format!("/dev/kvm ({module}): guests run accelerated"), None),
        Kvm::Pvm => check(
            "kvm",
            Status::Warn,
            "/dev/kvm is the kvm_pvm module (nested PVM): ordinary guest kernels cannot run under it, so VMs run under QEMU with TCG (software emulation, slower)",
            None,
        ),
        Kvm::NoPermission => check(
            "kvm",
            Status::Warn,
            "/dev/kvm exists but this user cannot open it; VMs fall back to QEMU with TCG",
            Some("add this user to the 'kvm' group and log in again"),
        ),
        Kvm::Absent => check("kvm", Status::Warn, "no /dev/kvm: VMs run under QEMU with TCG (software emulation, slower)", None),
    });

    // The same decision `kennel serve` acts on.
    let (use_ch, backend) = match kennel_provisioner::select::decide(config.vm.backend, host) {
        Ok(d) if d.cloud_hypervisor => (true, format!("cloud-hypervisor ({})", d.why)),
        Ok(_) if config.vm.backend == kennel_provisioner::select::BackendChoice::Incus => (
            false,
            format!(
                "incus ({}s at {})",
                config.incus.instance_type, config.incus.address
            ),
        ),
        Ok(d) if config.vm.backend == kennel_provisioner::select::BackendChoice::None => {
            (false, format!("none ({})", d.why))
        }
        Ok(d) => (
            false,
            format!(
                "qemu with {} ({})",
                if d.kvm { "KVM" } else { "TCG" },
                d.why
            ),
        ),
        Err(e) => (true, format!("none: {e}")),
    };
    checks.push(binary(
        host,
        "cloud-hypervisor",
        &[],
        use_ch,
        "install cloud-hypervisor from its upstream release on KVM hosts (it is not in Debian's archive); set vm.backend = \"qemu\" otherwise",
    ));
    // Projects on Incus need no VMM on this host (images are still built
    // here: mmdebstrap and mkfs.ext4 stay required).
    let on_incus = config.vm.backend == kennel_provisioner::select::BackendChoice::Incus;
    checks.push(binary(
        host,
        "qemu-system-x86_64",
        &[],
        !use_ch && !on_incus,
        "apt-get install qemu-system-x86",
    ));
    checks.push(binary(
        host,
        "qemu-img",
        &[],
        !on_incus,
        "apt-get install qemu-utils",
    ));
    checks.push(binary(
        host,
        "virtiofsd",
        &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"],
        !on_incus,
        "apt-get install qemu-system-common (ships /usr/lib/qemu/virtiofsd), or cargo install virtiofsd",
    ));
    checks.push(binary(
        host,
        "mmdebstrap",
        &[],
        true,
        "apt-get install mmdebstrap",
    ));
    checks.push(binary(
        host,
        "mkfs.ext4",
        &[],
        true,
        "apt-get install e2fsprogs",
    ));
    checks.push(if host.can_create_taps() {
        check("networking", Status::Ok, "can create TAP devices and bridges (CAP_NET_ADMIN)", None)
    } else {
        check(
            "networking",
            Status::Warn,
            "cannot create TAP devices (no CAP_NET_ADMIN or /dev/net/tun): VMs use QEMU user-mode networking with forwarded ports",
            Some("run kennel serve as root or grant CAP_NET_ADMIN for bridged networking"),
        )
    });
    // Whether guests are kept off the host's own services (loaded, as
    // `kennel serve` loads it).
    checks.push(match host.which("nft", &["/usr/sbin/nft", "/sbin/nft"]) {
        Some(_) if rustix::process::geteuid().is_root() => check(
            "host guard",
            Status::Ok,
            "guests reach Kennel's gateways on this host and none of its other services (nftables, loaded by kennel serve)",
            None,
        ),
        _ => check(
            "host guard",
            Status::Warn,
            "guests in user-mode networking can reach every service on this host's loopback (10.0.2.2) and addresses",
            Some("run kennel serve as root with nftables installed (apt-get install nftables)"),
        ),
    });
    for (name, addr) in [
        ("ssh port", config.ssh.listen),
        ("https port", config.https.listen),
    ] {
        checks.push(match TcpListener::bind(addr) {
            Ok(_) => check(name, Status::Ok, format!("{addr} is free"), None),
            Err(e) => check(
                name,
                Status::Warn,
                format!("{addr} is not available ({e}); fine if `kennel serve` is already running"),
                Some("pick another address in the config (ssh.listen / https.listen)"),
            ),
        });
    }
    checks.push(disk_space(&config.data_dir));
    let host_key = config.data_dir.join("keys/ssh_host_ed25519_key");
    checks.push(match russh_host_key(&host_key) {
        Some(fp) => check(
            "ssh host key",
            Status::Ok,
            format!("{fp} (users verify this when they first connect)"),
            None,
        ),
        None => check(
            "ssh host key",
            Status::Ok,
            "made on the first `kennel serve`".to_owned(),
            None,
        ),
    });
    checks.push(tls_check(config));
    checks.push(service_check());
    if config.vm.backend == kennel_provisioner::select::BackendChoice::Incus {
        checks.extend(incus_checks(config));
    }
    Report { checks, backend }
}

/// `vm.backend = "incus"`: the server answers and trusts Kennel, its
/// members are online, the pool and network of `[incus]` exist, and it
/// can run the configured kind of instance.
fn incus_checks(config: &Config) -> Vec<Check> {
    let c = &config.incus;
    let client = match crate::wiring::incus_client(c) {
        Ok(client) => client,
        Err(e) => {
            return vec![check(
                "incus",
                Status::Missing,
                e,
                Some("fix [incus] in the configuration (docs/incus.md)"),
            )]
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return vec![check("incus", Status::Missing, e.to_string(), None)],
    };
    rt.block_on(async {
        let mut out = Vec::new();
        let server = match client.server().await {
            Ok(s) => s,
            Err(e) => {
                out.push(check("incus", Status::Missing, e.to_string(), Some("start incusd, or point incus.address at it (docs/incus.md)")));
                return out;
            }
        };
        if server.auth != "trusted" {
            out.push(check("incus", Status::Missing, format!("{} does not trust Kennel's client certificate", client.address()), Some("on a member: incus config trust add-certificate <incus.client_cert>")));
            return out;
        }
        let env = &server.environment;
        out.push(check("incus", Status::Ok, format!("Incus {} at {} (driver {})", env.server_version, client.address(), env.driver), None));
        let wants = match c.instance_type {
            kennel_provisioner::select::InstanceType::Container => "lxc",
            kennel_provisioner::select::InstanceType::VirtualMachine => "qemu",
        };
        if !env.driver.split('|').any(|d| d.trim() == wants) {
            out.push(check("incus type", Status::Missing, format!("incus.instance_type is {} but the server's drivers are {:?}", c.instance_type, env.driver), Some("VMs need KVM on the members; otherwise set incus.instance_type = \"container\"")));
        }
        match client.members().await {
            Ok(ms) if ms.is_empty() => out.push(check("incus cluster", Status::Ok, "a single server (not clustered)", None)),
            Ok(ms) => {
                let down: Vec<String> = ms.iter().filter(|m| !m.online()).map(|m| format!("{} ({})", m.server_name, m.status)).collect();
                out.push(if down.is_empty() {
                    check("incus cluster", Status::Ok, format!("{} members, all online", ms.len()), None)
                } else {
                    check("incus cluster", Status::Warn, format!("{} members; not online: {}", ms.len(), down.join(", ")), None)
                });
            }
            Err(e) => out.push(check("incus cluster", Status::Warn, e.to_string(), None)),
        }
        for (name, found, fix) in [
            ("incus pool", client.has_storage_pool(&c.storage_pool).await, "create it (incus storage create) or set incus.storage_pool"),
            ("incus network", client.has_network(&c.network).await, "create it (incus network create) or set incus.network"),
        ] {
            let what = if name == "incus pool" { &c.storage_pool } else { &c.network };
            out.push(match found {
                Ok(true) => check(name, Status::Ok, what.clone(), None),
                Ok(false) => check(name, Status::Missing, format!("{what} does not exist"), Some(fix)),
                Err(e) => check(name, Status::Warn, e.to_string(), None),
            });
        }
        if let Err(e) = c.port_range() {
            out.push(check("incus ports", Status::Missing, e, None));
        }
        if let Err(e) = c.listen() {
            out.push(check("incus listen", Status::Missing, e, None));
        }
        out
    })
}

/// Where the HTTPS certificate comes from, and whether it loads.
fn tls_check(config: &Config) -> Check {
    use kennel_gateway::https::tls;
    let dir = crate::datadir::DataDir::new(&config.data_dir);
    let source = crate::wiring::tls_source(config, &dir);
    match &source {
        tls::TlsSource::Files { cert, key } => match tls::server_config(&source) {
            Ok(_) => check(
                "https certificate",
                Status::Ok,
                format!("files {} and {} (reloaded when they change)", cert.display(), key.display()),
                None,
            ),
            Err(e) => check(
                "https certificate",
                Status::Missing,
                e.to_string(),
                Some("point https.cert and https.key at a PEM chain for DOMAIN and *.DOMAIN and its key"),
            ),
        },
        tls::TlsSource::Acme { settings, domain } => check(
            "https certificate",
            Status::Ok,
            match &settings.dns_hook {
                Some(hook) => format!(
                    "ACME ({}): one certificate for {domain} and *.{domain} by DNS-01 through {}; kept in {}",
                    settings.directory,
                    hook.display(),
                    settings.dir.display()
                ),
                None => format!(
                    "ACME ({}): a certificate per project host by TLS-ALPN-01 (the CA must reach this host on port 443); kept in {}",
                    settings.directory,
                    settings.dir.display()
                ),
            },
            None,
        ),
        tls::TlsSource::DevCa { dir, domain } => check(
            "https certificate",
            Status::Ok,
            format!(
                "a development CA issues certificates for {domain} and *.{domain}; trust {} in browsers (curl --cacert it), or set https.cert and https.key",
                tls::dev_ca_path(dir).display()
            ),
            None,
        ),
    }
}

fn disk_space(dir: &Path) -> Check {
    // The data dir may not exist yet; measure the nearest existing parent.
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("."));
    let probe = if probe.as_os_str().is_empty() {
        Path::new(".")
    } else {
        probe
    };
    match rustix::fs::statvfs(probe) {
        Ok(s) => {
            let gib = s.f_bavail.saturating_mul(s.f_frsize) / (1 << 30);
            let detail = format!("{gib} GiB free for {}", dir.display());
            match gib {
                0..=1 => check("disk space", Status::Missing, detail, Some("free space or set data_dir to a larger disk; images and VM disks need at least 10 GiB")),
                2..=9 => check("disk space", Status::Warn, detail, Some("images and VM disks want at least 10 GiB")),
                _ => check("disk space", Status::Ok, detail, None),
            }
        }
        Err(e) => check(
            "disk space",
            Status::Warn,
            format!("cannot measure free space in {}: {e}", probe.display()),
            None,
        ),
    }
}

/// The gateway host key's fingerprint, if the key exists (never made here).
fn russh_host_key(path: &Path) -> Option<String> {
    if !path.exists() {
        return None;
    }
    kennel_gateway::ssh::host_key(path)
        .ok()
        .map(|k| kennel_gateway::ssh::host_key_fingerprint(&k))
}

/// Whether Kennel is installed as a systemd service (scripts/install.sh)
/// and runs. Not being a service is fine (`kennel serve` by hand).
fn service_check() -> Check {
    let unit = Path::new("/etc/systemd/system/kennel.service");
    if !unit.exists() {
        return check(
            "service",
            Status::Ok,
            "not installed as a service (kennel serve runs by hand)",
            Some("scripts/install.sh installs kennel.service, /etc/kennel/kennel.toml and /var/lib/kennel"),
        );
    }
    let state = std::process::Command::new("systemctl")
        .args(["is-active", "kennel.service"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "unknown (no systemctl)".into());
    if state == "active" {
        check(
            "service",
            Status::Ok,
            "kennel.service is installed and running",
            None,
        )
    } else {
        check(
            "service",
            Status::Warn,
            format!("kennel.service is installed but {state}"),
            Some("systemctl enable --now kennel; journalctl -u kennel says why it stopped"),
        )
    }
}
