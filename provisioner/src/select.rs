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

/// Why no backend could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("vm.backend is cloud-hypervisor but {0}; install it or set vm.backend = \"qemu\"")]
    NoCloudHypervisor(&'static str),
    #[error("no qemu-system-x86_64 on this host: apt-get install qemu-system-x86")]
    NoQemu,
    #[error("bridge networking needs CAP_NET_ADMIN (run kennel serve as root), and Cloud Hypervisor needs bridge networking")]
    NoBridge,
    #[error("unknown {what} {value:?}")]
    Unknown { what: &'static str, value: String },
}

/// The backend and network mode for `backend`/`network` settings on `host`.
pub fn select(
    backend: &str,
    network: &str,
    host: &Host,
) -> Result<(Arc<dyn Vmm>, NetworkMode), SelectError> {
    let kvm = host.kvm().runs_guests();
    let ch = host.which("cloud-hypervisor", &[]);
    let use_ch = match backend {
        "cloud-hypervisor" => {
            if ch.is_none() {
                return Err(SelectError::NoCloudHypervisor(
                    "its binary is not installed",
                ));
            }
            if !kvm {
                return Err(SelectError::NoCloudHypervisor(
                    "KVM cannot run guests on this host",
                ));
            }
            true
        }
        "qemu" => false,
        "auto" => ch.is_some() && kvm,
        other => {
            return Err(SelectError::Unknown {
                what: "backend",
                value: other.into(),
            })
        }
    };
    let vmm: Arc<dyn Vmm> = match (use_ch, ch) {
        (true, Some(binary)) => Arc::new(CloudHypervisor { binary }),
        _ => Arc::new(Qemu {
            binary: host
                .which("qemu-system-x86_64", &[])
                .ok_or(SelectError::NoQemu)?,
            accel: if kvm { Accel::Kvm } else { Accel::Tcg },
        }),
    };
    let mode = match (network, use_ch) {
        ("bridge", _) | ("auto", true) => {
            if !host.can_create_taps() {
                return Err(SelectError::NoBridge);
            }
            NetworkMode::Bridge(Bridge::default())
        }
        ("user", true) => return Err(SelectError::NoBridge),
        ("user" | "auto", false) => NetworkMode::User,
        (other, _) => {
            return Err(SelectError::Unknown {
                what: "network mode",
                value: other.into(),
            })
        }
    };
    Ok((vmm, mode))
}
