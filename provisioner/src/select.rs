//! Choosing the VMM backend and network mode for this host.
//!
//! `auto` picks Cloud Hypervisor when its binary is present and KVM can run
//! ordinary guests, QEMU otherwise (with KVM when it can, TCG when not).
//! Cloud Hypervisor has no user-mode networking, so it gets the bridge;
//! QEMU gets user mode unless the bridge is asked for.

use std::sync::Arc;

use crate::host::Host;
use crate::net::{Bridge, NetworkMode};
use crate::vmm::ch::CloudHypervisor;
use crate::vmm::qemu::{Accel, Qemu};
use crate::vmm::Vmm;

pub use crate::choice::{BackendChoice, InstanceType, Listen, NetworkChoice, WorkspaceChoice};

/// Whether this host's CPU has AES and carry-less multiply instructions
/// (AES-GCM at hardware speed).
pub fn host_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Which VMM a backend setting comes to on a host, and why: the one
/// decision [`select`] acts on and `kennel doctor` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Cloud Hypervisor (else QEMU, or nothing for `none`).
    pub cloud_hypervisor: bool,
    /// QEMU would use KVM (else TCG).
    pub kvm: bool,
    pub why: &'static str,
}

/// Decides the VMM for `backend` on `host`, without building anything.
pub fn decide(backend: BackendChoice, host: &Host) -> Result<Decision, SelectError> {
    let kvm = host.kvm().runs_guests();
    let ch = host.which("cloud-hypervisor", &[]).is_some();
    let (cloud_hypervisor, why) = match backend {
        BackendChoice::CloudHypervisor if !ch => {
            return Err(SelectError::NoCloudHypervisor(
                "its binary is not installed",
            ))
        }
        BackendChoice::CloudHypervisor if !kvm => {
            return Err(SelectError::NoCloudHypervisor(
                "KVM cannot run guests on this host",
            ))
        }
        BackendChoice::CloudHypervisor => (true, "configured"),
        BackendChoice::Qemu => (false, "configured"),
        BackendChoice::None => (false, "vm.backend is \"none\": no VMs"),
        BackendChoice::Incus => (false, "vm.backend is \"incus\": projects run on Incus"),
        BackendChoice::Auto => match (ch, kvm) {
            (true, true) => (true, "auto: binary present and KVM runs guests"),
            (false, _) => (false, "auto: no cloud-hypervisor binary"),
            (true, false) => (false, "auto: KVM cannot run guests here"),
        },
    };
    Ok(Decision {
        cloud_hypervisor,
        kvm,
        why,
    })
}

/// Why no backend could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("vm.backend is cloud-hypervisor but {0}; install it or set vm.backend = \"qemu\"")]
    NoCloudHypervisor(&'static str),
    #[error("no qemu-system-x86_64 on this host: apt-get install qemu-system-x86")]
    NoQemu,
    #[error("bridge networking needs CAP_NET_ADMIN (run kennel serve as root), and Cloud Hypervisor needs bridge networking")]
    NoBridge,
    #[error("vm.backend is \"none\" in the configuration")]
    Disabled,
    #[error("vm.backend is \"incus\": projects run on the Incus server of [incus], not on a VMM of this host")]
    Incus,
}

/// The backend and network mode for `backend`/`network` settings on
/// `host`; under QEMU's emulation, guests get the CPU model `tcg_cpu`
/// ([`crate::vmm::qemu::TCG_CPU`] when `None`).
pub fn select(
    backend: BackendChoice,
    network: NetworkChoice,
    host: &Host,
    guest_gid: Option<u32>,
    tcg_cpu: Option<&str>,
) -> Result<(Arc<dyn Vmm>, NetworkMode), SelectError> {
    if backend == BackendChoice::None {
        return Err(SelectError::Disabled);
    }
    if backend == BackendChoice::Incus {
        return Err(SelectError::Incus);
    }
    let d = decide(backend, host)?;
    let ch = host.which("cloud-hypervisor", &[]);
    let vmm: Arc<dyn Vmm> = match (d.cloud_hypervisor, ch) {
        (true, Some(binary)) => Arc::new(CloudHypervisor { binary }),
        _ => Arc::new(Qemu {
            binary: host
                .which("qemu-system-x86_64", &[])
                .ok_or(SelectError::NoQemu)?,
            accel: if d.kvm { Accel::Kvm } else { Accel::Tcg },
            tcg_cpu: tcg_cpu.unwrap_or(crate::vmm::qemu::TCG_CPU).to_owned(),
            guest_gid,
        }),
    };
    let mode = match (network, d.cloud_hypervisor) {
        (NetworkChoice::Bridge, _) | (NetworkChoice::Auto, true) => {
            if !host.can_create_taps() {
                return Err(SelectError::NoBridge);
            }
            NetworkMode::Bridge(Bridge::default())
        }
        (NetworkChoice::User, true) => return Err(SelectError::NoBridge),
        (NetworkChoice::User | NetworkChoice::Auto, false) => NetworkMode::User,
    };
    Ok((vmm, mode))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn host(with_ch: bool, kvm: bool) -> (tempfile::TempDir, Host) {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        if with_ch {
            let ch = bin.join("cloud-hypervisor");
            std::fs::write(&ch, "").unwrap();
            std::fs::set_permissions(&ch, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        if kvm {
            // A file the test can open read-write stands in for /dev/kvm.
            std::fs::create_dir_all(d.path().join("dev")).unwrap();
            std::fs::write(d.path().join("dev/kvm"), "").unwrap();
            std::fs::create_dir_all(d.path().join("sys/module/kvm_intel")).unwrap();
        }
        let h = Host::at(d.path(), vec![bin]);
        (d, h)
    }

    #[test]
    fn one_decision_for_every_setting() {
        let (_d, h) = host(true, true);
        let d = decide(BackendChoice::Auto, &h).unwrap();
        assert!(d.cloud_hypervisor && d.kvm, "{d:?}");
        let (_d, h) = host(false, true);
        let d = decide(BackendChoice::Auto, &h).unwrap();
        assert!(!d.cloud_hypervisor && d.kvm, "{d:?}");
        assert!(d.why.contains("no cloud-hypervisor"));
        let (_d, h) = host(true, false);
        let d = decide(BackendChoice::Auto, &h).unwrap();
        assert!(!d.cloud_hypervisor && !d.kvm, "{d:?}");
        assert!(matches!(
            decide(BackendChoice::CloudHypervisor, &h),
            Err(SelectError::NoCloudHypervisor(_))
        ));
        assert!(!decide(BackendChoice::Qemu, &h).unwrap().cloud_hypervisor);
        assert!(matches!(
            select(BackendChoice::None, NetworkChoice::Auto, &h, None, None),
            Err(SelectError::Disabled)
        ));
    }

    #[test]
    fn qemu_without_kvm_says_its_guests_are_emulated() {
        for kvm in [false, true] {
            let (d, h) = host(false, kvm);
            let qemu = d.path().join("bin/qemu-system-x86_64");
            std::fs::write(&qemu, "").unwrap();
            std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
            let (vmm, _) =
                select(BackendChoice::Auto, NetworkChoice::User, &h, None, None).unwrap();
            assert_eq!(vmm.emulated(), !kvm, "{}", vmm.describe());
        }
    }

    #[test]
    fn settings_read_as_the_config_writes_them() {
        let b: BackendChoice = serde_json::from_str("\"cloud-hypervisor\"").unwrap();
        assert_eq!(b, BackendChoice::CloudHypervisor);
        let n: NetworkChoice = serde_json::from_str("\"bridge\"").unwrap();
        assert_eq!(n, NetworkChoice::Bridge);
        assert!(serde_json::from_str::<BackendChoice>("\"kvm\"").is_err());
    }
}
