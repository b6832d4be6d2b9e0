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
