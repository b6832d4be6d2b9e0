//! VM networking.
//!
//! - **User mode** (no privileges; QEMU only): the guest is 10.0.2.15
//!   behind QEMU's NAT. Its sshd and app are forwarded to a loopback
//!   address of the VM's own, `127.77.x.y` from its slot, on fixed ports.
//!   Guests cannot reach each other: a guest's packets to another VM's
//!   127.77.x.y stay in its own loopback, and 10.0.2.2 reaches only the
//!   host's 127.0.0.1 (where the gateways listen; see docs/networking.md).
//! - **Bridge mode** (CAP_NET_ADMIN; QEMU and Cloud Hypervisor): one TAP
//!   per VM on `kennel0` with `10.90.0.<slot>`, bridge ports isolated so VMs
//!   cannot talk to each other, NAT for egress with nftables, and the host
//!   reaching every VM directly.

use crate::process::{Cmd, RunError, Runner};
use crate::vmm::NetAttach;

/// Port the guest's sshd is forwarded to in user mode.
pub const USER_SSH_PORT: u16 = 10022;
/// Port the guest's app is forwarded to in user mode.
pub const USER_APP_PORT: u16 = 10080;
/// Highest slot (user mode names 127.77.0.2 up to 127.77.253.232).
pub const MAX_SLOT: u32 = 65000;

/// How VMs are networked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    User,
    Bridge(Bridge),
}

/// Kennel's bridge: `name` with `10.90.0.1/24` by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    /// First three octets of the /24, e.g. `10.90.0`.
    pub prefix: String,
}

impl Default for Bridge {
    fn default() -> Self {
        Self {
            name: "kennel0".into(),
            prefix: "10.90.0".into(),
        }
    }
}

/// The loopback address of a slot in user mode.
pub fn user_host_ip(slot: u32) -> String {
    format!("127.77.{}.{}", (slot >> 8) & 0xff, slot & 0xff)
}

/// The slot of a user-mode loopback address (`127.77.x.y`), the inverse
/// of [`user_host_ip`].
pub fn user_slot(host_ip: &str) -> Option<u32> {
    let ip: std::net::Ipv4Addr = host_ip.parse().ok()?;
    let [a, b, x, y] = ip.octets();
    ((a, b) == (127, 77)).then(|| (u32::from(x) << 8) | u32::from(y))
}

/// The attachment of the VM in `slot`.
pub fn attach(mode: &NetworkMode, slot: u32, guest_app_port: u16) -> NetAttach {
    match mode {
        NetworkMode::User => NetAttach::User {
            host_ip: user_host_ip(slot),
            ssh_port: USER_SSH_PORT,
            app_port: USER_APP_PORT,
            guest_app_port,
        },
        NetworkMode::Bridge(b) => NetAttach::Tap {
            tap: format!("kt{slot}"),
            mac: format!("52:54:00:4b:{:02x}:{:02x}", (slot >> 8) & 0xff, slot & 0xff),
            guest_ip: format!("{}.{}", b.prefix, slot & 0xff),
            prefix: 24,
            gateway: format!("{}.1", b.prefix),
        },
    }
}

/// The guest's side, for the config disk: (address/prefix, gateway, dns).
pub fn guest_config(a: &NetAttach) -> (String, String, String) {
    match a {
        NetAttach::User { .. } => ("10.0.2.15/24".into(), "10.0.2.2".into(), "10.0.2.3".into()),
        NetAttach::Tap {
            guest_ip,
            prefix,
            gateway,
            ..
        } => (
            format!("{guest_ip}/{prefix}"),
            gateway.clone(),
            gateway.clone(),
        ),
    }
}

/// The nftables ruleset for the bridge: NAT out, no routing between VMs,
/// and guests kept off the host's own services: from the bridge, only
/// Kennel's gateways (`host_ports`) and DNS on the host's addresses, and
/// replies to what the host opened (its SSH into the VMs).
pub fn nft_ruleset(b: &Bridge, host_ports: &[u16]) -> String {
    let allow = crate::hostguard::port_set(host_ports)
        .map(|set| format!("    iifname \"{}\" tcp dport {set} accept\n", b.name))
        .unwrap_or_default();
    format!(
        "table inet kennel {{}}\ndelete table inet kennel\ntable inet kennel {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {p}.0/24 oifname != \"{n}\" masquerade\n  }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    iifname \"{n}\" oifname \"{n}\" drop\n  }}\n  chain input {{\n    type filter hook input priority filter; policy accept;\n    iifname \"{n}\" ct state established,related accept\n    iifname \"{n}\" meta l4proto {{ tcp, udp }} th dport 53 accept\n    iifname \"{n}\" ct status dnat accept\n{allow}    iifname \"{n}\" meta l4proto tcp reject with tcp reset\n    iifname \"{n}\" drop\n  }}\n}}\n",
        p = b.prefix,
        n = b.name
    )
}

/// Creates the bridge (idempotent) and installs the nftables rules.
pub fn ensure_bridge(runner: &dyn Runner, b: &Bridge, host_ports: &[u16]) -> Result<(), RunError> {
    let exists = runner
        .run(&Cmd::new("ip").args(["link", "show", "dev", &b.name]))
        .is_ok();
    if !exists {
        runner.run(&Cmd::new("ip").args(["link", "add", "name", &b.name, "type", "bridge"]))?;
        runner.run(&Cmd::new("ip").args([
            "addr",
            "add",
            &format!("{}.1/24", b.prefix),
            "dev",
            &b.name,
        ]))?;
    }
    runner.run(&Cmd::new("ip").args(["link", "set", "dev", &b.name, "up"]))?;
    runner.run(&Cmd::new("sysctl").args(["-q", "-w", "net.ipv4.ip_forward=1"]))?;
    let rules = std::env::temp_dir().join(format!("kennel-nft-{}.conf", std::process::id()));
    std::fs::write(&rules, nft_ruleset(b, host_ports)).map_err(|source| RunError::Spawn {
        program: "nft".into(),
        source,
    })?;
    let r = runner.run(&Cmd::new("nft").arg("-f").arg(&rules));
    let _ = std::fs::remove_file(&rules);
    r.map(|_| ())
}

/// Creates a VM's TAP on the bridge, isolated from the other ports.
pub fn create_tap(runner: &dyn Runner, b: &Bridge, tap: &str) -> Result<(), RunError> {
    let _ = runner.run(&Cmd::new("ip").args(["link", "del", "dev", tap]));
    runner.run(&Cmd::new("ip").args(["tuntap", "add", "dev", tap, "mode", "tap"]))?;
    runner.run(&Cmd::new("ip").args(["link", "set", "dev", tap, "master", &b.name]))?;
    runner.run(&Cmd::new("bridge").args(["link", "set", "dev", tap, "isolated", "on"]))?;
    runner.run(&Cmd::new("ip").args(["link", "set", "dev", tap, "up"]))?;
    Ok(())
}

/// Removes a TAP (no error if it is gone).
pub fn delete_tap(runner: &dyn Runner, tap: &str) {
    let _ = runner.run(&Cmd::new("ip").args(["link", "del", "dev", tap]));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::FakeRunner;

    #[test]
    fn slots_name_addresses() {
        assert_eq!(user_host_ip(2), "127.77.0.2");
        assert_eq!(user_host_ip(300), "127.77.1.44");
        let NetAttach::Tap {
            tap, mac, guest_ip, ..
        } = attach(&NetworkMode::Bridge(Bridge::default()), 7, 8080)
        else {
            panic!()
        };
        assert_eq!(
            (tap.as_str(), mac.as_str(), guest_ip.as_str()),
            ("kt7", "52:54:00:4b:00:07", "10.90.0.7")
        );
        let a = attach(&NetworkMode::User, 2, 3000);
        assert_eq!(a.ssh_addr(), "127.77.0.2:10022");
        assert_eq!(a.app_addr(3000), "127.77.0.2:10080");
    }

    #[test]
    fn taps_are_isolated_bridge_ports() {
        let r = FakeRunner::default();
        create_tap(&r, &Bridge::default(), "kt7").unwrap();
        let calls = r.calls.lock().unwrap().join("\n");
        assert!(calls.contains("ip tuntap add dev kt7 mode tap"), "{calls}");
        assert!(
            calls.contains("ip link set dev kt7 master kennel0"),
            "{calls}"
        );
        assert!(
            calls.contains("bridge link set dev kt7 isolated on"),
            "{calls}"
        );
        let rules = nft_ruleset(&Bridge::default(), &[8443, 2222]);
        assert!(rules.contains("iifname \"kennel0\" oifname \"kennel0\" drop"));
        assert!(
            rules.contains("iifname \"kennel0\" tcp dport { 2222, 8443 } accept"),
            "{rules}"
        );
        assert!(
            rules.contains("iifname \"kennel0\" ct state established,related accept"),
            "{rules}"
        );
    }
}
