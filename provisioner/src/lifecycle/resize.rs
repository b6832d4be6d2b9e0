//! `resize`: a VM's CPUs, memory and disk.
//!
//! CPUs and memory are kept in `vm.json` for the next boot (and applied at
//! once where the backend can: Cloud Hypervisor's `vm.resize` within what
//! the VM booted with). The disk grows: a stopped VM's with `qemu-img
//! resize`, a running one's through the VMM (QEMU `block_resize`, CH
//! `vm.resize-disk`), then the guest's filesystem with `resize2fs` over
//! SSH; should that fail, the guest's init grows it at the next boot.

use kennel_core::names::ProjectName;
use kennel_core::provision::{ProvisionError, ResizedVm, Stage};

use super::{anyhow_chain, failed, LocalProvisioner};
use crate::disk;

impl LocalProvisioner {
    pub(super) async fn resize_vm(
        &self,
        project: &ProjectName,
        to: &kennel_core::model::Resources,
    ) -> Result<ResizedVm, ProvisionError> {
        let name = project.as_str();
        let _guard = self.lock(name).await;
        let mut r = self
            .record(name)
            .ok_or_else(|| ProvisionError::NoVm(name.to_owned()))?;
        let running = self.runs(&r, Stage::Disk).await?;
        let mut done = ResizedVm::default();
        let want = to.disk_mib.saturating_mul(1 << 20);
        let path = r.machine.disk.clone();
        let have = self
            .blocking(Stage::Disk, move |runner| {
                disk::info(runner, &path).map(|i| i.virtual_size)
            })
            .await?;
        if want > have {
            if running {
                self.vmm
                    .grow_disk(&r.machine, want)
                    .await
                    .map_err(|e| failed(Stage::Disk, anyhow_chain(&e)))?;
                match self.ssh_exec(&r, "sudo -n /sbin/resize2fs /dev/vda").await {
                    Ok(_) => done.disk_now = true,
                    Err(e) => tracing::warn!(
                        vm = name,
                        error = %e,
                        "the disk grew but its filesystem did not; the guest grows it at its next boot"
                    ),
                }
            } else {
                let path = r.machine.disk.clone();
                self.blocking(Stage::Disk, move |runner| disk::grow(runner, &path, want))
                    .await?;
            }
        }
        if running {
            match self
                .vmm
                .resize_live(&r.machine, to.vcpus, to.memory_mib)
                .await
            {
                Ok((cpus, memory)) => {
                    done.cpus_now = cpus;
                    done.memory_now = memory;
                }
                Err(e) => {
                    tracing::warn!(vm = name, error = %anyhow_chain(&e), "no live CPU or memory change; they apply at the next start");
                }
            }
        }
        r.machine.vcpus = to.vcpus;
        r.machine.memory_mib = to.memory_mib;
        self.save(&r)?;
        Ok(done)
    }
}
