//! The configuration's choice of VMM backend and network mode: plain
//! data, no host access (the fuzzed configuration loader compiles this
//! file in on its own). [`crate::select`] acts on them.

/// `vm.backend` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    /// Cloud Hypervisor where it can run, QEMU otherwise.
    Auto,
    Qemu,
    CloudHypervisor,
    /// Instances of an Incus server or cluster (`[incus]`).
    Incus,
    /// No VMs: chat and admin commands only.
    None,
}

/// `vm.network` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkChoice {
    /// The bridge for Cloud Hypervisor, user mode for QEMU.
    Auto,
    User,
    Bridge,
}

/// `incus.instance_type`: which kind of Incus instance a project is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceType {
    Container,
    VirtualMachine,
}

impl std::fmt::Display for InstanceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InstanceType::Container => "container",
            InstanceType::VirtualMachine => "virtual-machine",
        })
    }
}

/// `incus.workspace`: where a project's source lives on Incus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceChoice {
    /// A volume on a cluster, the host's directory on a single server.
    Auto,
    /// The project's directory on Kennel's host, shared like a bind
    /// mount (an Incus server on Kennel's own host, or storage that
    /// every member mounts at the same path).
    Host,
    /// A custom storage volume on the instance's member: the source
    /// moves, copies and snapshots with the instance (`--path` is then
    /// refused: there is no host directory to share).
    Volume,
}

/// Where the proxies of an instance listen on its member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// One address on every member: loopback for an Incus on Kennel's own
    /// host, or an address every member has on a private network.
    At(std::net::IpAddr),
    /// Each member's own cluster address (its `url`'s host), re-read
    /// when an instance moves: members reachable only by each other and
    /// Kennel (docs/incus.md).
    Member,
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "member" {
            return Ok(Listen::Member);
        }
        s.parse()
            .map(Listen::At)
            .map_err(|_| format!("incus.listen_address is {s:?}: give an IP address or \"member\""))
    }
}
