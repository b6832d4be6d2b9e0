//! What Kennel asks Incus for, as data: one project's instance (its
//! resources, root disk, network, `/workspace`, and the proxy devices by
//! which Kennel's gateways reach its sshd and app on the member's
//! address), and the files that carry Kennel's guest config contract
//! into it (the same `env`, `authorized_keys` and host key the KENNELCFG
//! disk holds for Kennel's own VMs; the guest reads them from
//! `/var/lib/kennel/config` when there is no such disk).

use std::collections::BTreeMap;

use super::api::{Device, InstanceSource, InstanceType, InstancesPost};

/// Where the guest's config files go (kept on the root disk: a container's
/// `/run` is a fresh tmpfs at every boot).
pub const CONFIG_DIR: &str = "/var/lib/kennel/config";

/// The `[incus]` settings an instance is made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub instance_type: InstanceType,
    pub storage_pool: String,
    pub network: String,
}

/// Where a project's source comes from in the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workspace {
    /// A directory on the member (a single Incus server on Kennel's own
    /// host): shared like a bind mount, owners kept as they are.
    HostPath(String),
    /// A custom volume of the storage pool (a cluster: the source lives
    /// where the instance does).
    Volume(String),
    /// None yet: a volume is made on the member Incus places the
    /// instance on, then attached ([`workspace_device`]).
    Later,
}

/// The `/workspace` disk device for `ws` (none for [`Workspace::Later`]).
pub fn workspace_device(place: &Placement, ws: &Workspace) -> Option<Device> {
    let mut workspace = match ws {
        Workspace::HostPath(path) => {
            let mut d = device(&[("type", "disk"), ("source", path)]);
            if place.instance_type == InstanceType::Container {
                // An idmapped mount: a file of host uid N is uid N in
                // the guest and back, as with Kennel's virtio-fs share.
                d.insert("shift".to_owned(), "true".to_owned());
            }
            d
        }
        // Incus maps a custom volume into a container by itself (and
        // refuses `shift` on one).
        Workspace::Volume(volume) => device(&[
            ("type", "disk"),
            ("pool", &place.storage_pool),
            ("source", volume),
        ]),
        Workspace::Later => return None,
    };
    workspace.insert("path".to_owned(), "/workspace".to_owned());
    Some(workspace)
}

/// One project's instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectInstance {
    pub name: String,
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub workspace: Workspace,
    /// The member's address the proxies listen on: one only Kennel
    /// reaches (loopback for an Incus on Kennel's own host, the member's
    /// private cluster address otherwise), never every interface: the
    /// app port behind it is private until Kennel's gateway says not.
    pub listen: std::net::IpAddr,
    /// The member port Kennel's SSH gateway connects to.
    pub ssh_port: u16,
    /// The member port Kennel's HTTPS gateway connects to, and the app's
    /// port in the guest.
    pub app_port: u16,
    pub guest_app_port: u16,
    /// A VM's fixed address on the network (Incus's proxy devices reach
    /// a VM only by NAT to a static address); unused for containers.
    pub guest_ip: Option<std::net::Ipv4Addr>,
    /// Kennel's own labels (`user.kennel.*`), read back by reconcile.
    pub labels: BTreeMap<String, String>,
}

/// The `POST /1.0/instances` body for `p`. Not started: Kennel writes the
/// config files first.
pub fn instance_post(place: &Placement, p: &ProjectInstance) -> InstancesPost {
    let vm = place.instance_type == InstanceType::VirtualMachine;
    let mut config = BTreeMap::new();
    config.insert("limits.cpu".to_owned(), limits_cpu(p.vcpus));
    config.insert("limits.memory".to_owned(), limits_memory(p.memory_mib));
    if vm {
        // Kennel's config files reach a VM through the agent.
        config.insert("security.secureboot".to_owned(), "false".to_owned());
    } else {
        // Docker and systemd's sandboxing in the guest.
        config.insert("security.nesting".to_owned(), "true".to_owned());
    }
    // An evacuated member stops Kennel's instances instead of moving
    // them: Kennel moves them itself (`evacuate`), so their proxies
    // follow them to the member they land on.
    config.insert("cluster.evacuate".to_owned(), "stop".to_owned());
    for (k, v) in &p.labels {
        config.insert(format!("user.kennel.{k}"), v.clone());
    }
    let mut devices: BTreeMap<String, Device> = BTreeMap::new();
    devices.insert(
        "root".to_owned(),
        device(&[
            ("type", "disk"),
            ("path", "/"),
            ("pool", &place.storage_pool),
            ("size", &disk_size(p.disk_gib)),
        ]),
    );
    let mut nic = device(&[
        ("type", "nic"),
        ("network", &place.network),
        ("name", "eth0"),
    ]);
    if let (true, Some(ip)) = (vm, p.guest_ip) {
        nic.insert("ipv4.address".to_owned(), ip.to_string());
    }
    devices.insert("eth0".to_owned(), nic);
    if let Some(workspace) = workspace_device(place, &p.workspace) {
        devices.insert("workspace".to_owned(), workspace);
    }
    // Gateways reach the guest on the member's own address; the member
    // relays to the guest's loopback (containers) or, for VMs, NATs to
    // the guest's address.
    for (dev, host, guest) in [
        ("kennel-ssh", p.ssh_port, 22),
        ("kennel-app", p.app_port, p.guest_app_port),
    ] {
        let mut d = device(&[
            ("type", "proxy"),
            (
                "listen",
                &format!("tcp:{}", std::net::SocketAddr::new(p.listen, host)),
            ),
            ("connect", &format!("tcp:127.0.0.1:{guest}")),
        ]);
        if vm {
            let ip = p
                .guest_ip
                .map_or_else(|| "0.0.0.0".to_owned(), |ip| ip.to_string());
            d.insert("nat".to_owned(), "true".to_owned());
            d.insert("connect".to_owned(), format!("tcp:{ip}:{guest}"));
        }
        devices.insert(dev.to_owned(), d);
    }
    InstancesPost {
        name: p.name.clone(),
        kind: place.instance_type,
        source: InstanceSource::image(&p.image),
        config,
        devices,
        // Kennel sets every device itself: no profile's may add a second
        // NIC or a disk the operator meant for something else.
        profiles: Vec::new(),
        description: format!("Kennel project {}", p.name),
        start: false,
    }
}

/// `limits.cpu` for `vcpus` (a count: Incus spreads them).
pub fn limits_cpu(vcpus: u32) -> String {
    vcpus.max(1).to_string()
}

/// `limits.memory` for `mib`.
pub fn limits_memory(mib: u64) -> String {
    format!("{}MiB", mib.max(128))
}

/// The root disk's `size` for `gib`.
pub fn disk_size(gib: u64) -> String {
    format!("{}GiB", gib.max(1))
}

fn device(pairs: &[(&str, &str)]) -> Device {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The guest's `env` for an instance: Kennel's KENNEL_* variables, with
/// the address from the network's DHCP.
pub fn guest_env(hostname: &str, dev_uid: u32, dev_gid: u32, online: bool) -> String {
    format!(
        "KENNEL_HOSTNAME={hostname}\nKENNEL_DHCP=1\nKENNEL_DEV_UID={dev_uid}\nKENNEL_DEV_GID={dev_gid}\nKENNEL_ONLINE={}\n",
        u8::from(online)
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn project(ws: Workspace) -> ProjectInstance {
        ProjectInstance {
            name: "myapp".into(),
            image: "f00d".into(),
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 10,
            workspace: ws,
            listen: "127.0.0.1".parse().unwrap(),
            ssh_port: 40022,
            app_port: 40080,
            guest_app_port: 3000,
            guest_ip: Some("10.9.0.7".parse().unwrap()),
            labels: BTreeMap::from([("owner".into(), "alice".into())]),
        }
    }

    /// Containers in the `default` pool on `incusbr0`.
    fn container_place() -> Placement {
        Placement {
            instance_type: InstanceType::Container,
            storage_pool: "default".into(),
            network: "incusbr0".into(),
        }
    }

    #[test]
    fn a_container_shares_the_host_source_shifted_and_proxies_to_loopback() {
        let place = container_place();
        let post = instance_post(
            &place,
            &project(Workspace::HostPath("/srv/src/myapp".into())),
        );
        let v = serde_json::to_value(&post).unwrap();
        assert_eq!(v["type"], "container");
        assert_eq!(v["start"], false);
        assert_eq!(v["profiles"], serde_json::json!([]));
        assert_eq!(v["config"]["limits.memory"], "2048MiB");
        assert_eq!(v["config"]["user.kennel.owner"], "alice");
        assert_eq!(v["config"]["security.nesting"], "true");
        assert_eq!(
            v["devices"]["workspace"],
            serde_json::json!({"type": "disk", "source": "/srv/src/myapp", "path": "/workspace", "shift": "true"})
        );
        assert_eq!(v["devices"]["root"]["size"], "10GiB");
        assert_eq!(
            v["devices"]["kennel-ssh"],
            serde_json::json!({"type": "proxy", "listen": "tcp:127.0.0.1:40022", "connect": "tcp:127.0.0.1:22"})
        );
        assert_eq!(v["devices"]["kennel-app"]["connect"], "tcp:127.0.0.1:3000");
        assert!(v["devices"]["eth0"].get("ipv4.address").is_none());
    }

    #[test]
    fn a_vm_gets_a_volume_and_nat_proxies() {
        let place = Placement {
            instance_type: InstanceType::VirtualMachine,
            storage_pool: "remote".into(),
            network: "kennel".into(),
        };
        let post = instance_post(&place, &project(Workspace::Volume("myapp-src".into())));
        let v = serde_json::to_value(&post).unwrap();
        assert_eq!(v["type"], "virtual-machine");
        assert_eq!(
            v["devices"]["workspace"],
            serde_json::json!({"type": "disk", "pool": "remote", "source": "myapp-src", "path": "/workspace"})
        );
        assert_eq!(v["devices"]["kennel-ssh"]["nat"], "true");
        assert_eq!(v["devices"]["kennel-ssh"]["connect"], "tcp:10.9.0.7:22");
        assert_eq!(v["devices"]["eth0"]["ipv4.address"], "10.9.0.7");
        assert!(v["config"].get("security.nesting").is_none());
    }

    #[test]
    fn a_containers_volume_is_mapped_by_incus_and_later_means_none_yet() {
        let place = container_place();
        let post = instance_post(
            &place,
            &project(Workspace::Volume("kennel-src-myapp".into())),
        );
        let v = serde_json::to_value(&post).unwrap();
        // Incus refuses `shift` on a custom volume: it maps it itself.
        assert_eq!(
            v["devices"]["workspace"],
            serde_json::json!({"type": "disk", "pool": "default", "source": "kennel-src-myapp", "path": "/workspace"})
        );
        let post = instance_post(&place, &project(Workspace::Later));
        let v = serde_json::to_value(&post).unwrap();
        assert!(v["devices"].get("workspace").is_none(), "{v}");
        assert!(v["devices"].get("root").is_some());
        assert_eq!(workspace_device(&place, &Workspace::Later), None);
    }

    #[test]
    fn the_guest_env_asks_for_dhcp() {
        let env = guest_env("myapp", 1000, 1000, true);
        assert!(env.contains("KENNEL_DHCP=1\n") && env.contains("KENNEL_DEV_UID=1000\n"));
        assert!(env.contains("KENNEL_ONLINE=1\n"));
    }
}
