//! Keeps guests off the host's own services.
//!
//! In QEMU's user-mode networking a guest reaches the host's loopback at
//! `10.0.2.2`: every service bound to `127.0.0.1` (Kennel's metrics, a
//! database, Synapse, an admin UI) and, through the host's other
//! addresses, everything listening there. What a guest connects to, QEMU
//! connects to from the host, so the rule sits on QEMU's own traffic:
//! Kennel starts each VM's QEMU with a group of its own ([`vm_gid`]: a
//! range per data directory ([`guest_gid`]), so two Kennels on a host keep
//! their rules apart, and a number per VM within it, which its egress
//! policy matches), and an nftables table drops new connections from
//! sockets of that range to any
//! of the host's local addresses, except Kennel's gateways (and DNS, which
//! QEMU forwards to the host's resolver, possibly on loopback). Replies on
//! connections the host opened to the VM (its forwarded sshd and app) are
//! established traffic and pass. Outbound traffic to other hosts is not
//! touched (that is the egress policy's).
//!
//! Needs root (to load the table and to start QEMU in that group); without
//! it Kennel runs unguarded and says so (`kennel doctor`, the log).

use std::path::Path;

use crate::process::{Cmd, Runner};

/// The first of the groups QEMU runs in for the Kennel whose data
/// directory is `data_dir`: `0x4b00_0000` plus 8 bits of a hash of its
/// path, shifted past a VM's slot (16 bits).
pub fn guest_gid(data_dir: &Path) -> u32 {
    0x4b00_0000 | ((path_hash(data_dir) & 0xff) << 16)
}

/// The one group every VM's QEMU ran in before each had its own (16 bits
/// of the same hash): VMs started by an older Kennel keep it until they
/// restart, so the guard covers it too.
fn legacy_gid(data_dir: &Path) -> u32 {
    0x4b00_0000 | (path_hash(data_dir) & 0xffff)
}

/// FNV-1a of a path: stable across runs and builds (not a security
/// boundary).
fn path_hash(p: &Path) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in p.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The group of the VM in `slot` of the Kennel whose range starts at
/// `base` ([`guest_gid`]).
pub fn vm_gid(base: u32, slot: u32) -> u32 {
    base | (slot & 0xffff)
}

/// The groups of `base`'s range and the `legacy` one, as an nftables set.
fn gid_set(base: u32, legacy: u32) -> String {
    if legacy & 0xffff_0000 == base {
        format!("{base}-{}", base | 0xffff)
    } else {
        format!("{{ {legacy}, {base}-{} }}", base | 0xffff)
    }
}

/// The nftables table name for `gid`.
pub fn table(gid: u32) -> String {
    format!("kennel_guard_{gid:x}")
}

/// The nft script: the table made anew, allowing `tcp_ports` (Kennel's
/// gateways) and DNS on the host's addresses, refusing the rest at once
/// (a reset, so nothing in the guest waits for a timeout).
pub fn script(gid: u32, legacy: u32, tcp_ports: &[u16]) -> String {
    let t = table(gid);
    let gids = gid_set(gid, legacy);
    let allow = port_set(tcp_ports)
        .map(|set| format!("    meta skgid {gids} fib daddr type local tcp dport {set} accept\n"))
        .unwrap_or_default();
    format!(
        "table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n  chain output {{\n    type filter hook output priority filter; policy accept;\n    ct state established,related accept\n    meta skgid {gids} fib daddr type local meta l4proto {{ tcp, udp }} th dport 53 accept\n{allow}    meta skgid {gids} fib daddr type local meta l4proto tcp reject with tcp reset\n    meta skgid {gids} fib daddr type local drop\n  }}\n}}\n"
    )
}

/// Ports as an nft set (`{ 2222, 8443 }`), sorted, each once; `None`
/// for none.
pub fn port_set(ports: &[u16]) -> Option<String> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    (!ports.is_empty()).then(|| {
        let list: Vec<String> = ports.iter().map(ToString::to_string).collect();
        format!("{{ {} }}", list.join(", "))
    })
}

/// Loads the guard for the Kennel of `data_dir` (written to
/// `<data_dir>/host-guard.nft` first, for operators to read); returns the
/// group QEMU must run in. `Err` says why there is none.
pub fn install(runner: &dyn Runner, data_dir: &Path, tcp_ports: &[u16]) -> Result<u32, String> {
    if !rustix::process::geteuid().is_root() {
        return Err("Kennel does not run as root, so it cannot load nftables rules".into());
    }
    let gid = guest_gid(data_dir);
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot make {}: {e}", data_dir.display()))?;
    let file = data_dir.join("host-guard.nft");
    std::fs::write(&file, script(gid, legacy_gid(data_dir), tcp_ports))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    runner
        .run(&Cmd::new("nft").arg("-f").arg(&file))
        .map_err(|e| format!("nft could not load {}: {e}", file.display()))?;
    Ok(gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_group_per_data_dir_and_the_rule_names_it() {
        let a = guest_gid(Path::new("/var/lib/kennel"));
        let b = guest_gid(Path::new("/srv/other-kennel"));
        assert_ne!(a, b);
        assert_eq!(a >> 24, 0x4b);
        assert_eq!(a & 0xffff, 0);
        assert_eq!(a, guest_gid(Path::new("/var/lib/kennel")));
        assert_eq!(vm_gid(a, 2), a + 2);
        let legacy = legacy_gid(Path::new("/var/lib/kennel"));
        let s = script(a, legacy, &[8443, 2222, 2222]);
        assert!(
            s.contains(&format!(
                "meta skgid {{ {legacy}, {a}-{} }} fib daddr type local tcp dport {{ 2222, 8443 }} accept",
                a + 0xffff
            )),
            "{s}"
        );
        assert!(s.contains("ct state established,related accept"), "{s}");
        assert!(s.contains("reject with tcp reset"), "{s}");
        assert!(
            s.starts_with(&format!(
                "table inet {}\ndelete table inet {}\n",
                table(a),
                table(a)
            )),
            "{s}"
        );
    }
}
