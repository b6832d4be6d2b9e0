//! What a restarted Kennel finds: running VMs adopted, dead ones cleaned
//! up, half-created ones removed; and tearing a VM down.

use super::*;

impl LocalProvisioner {
    /// Adopts VMs that outlived a previous Kennel and cleans up after the
    /// dead: returns each known VM and whether it runs.
    pub async fn reconcile(&self) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        let vms = self.s.data_dir.join("vms");
        let entries: Vec<PathBuf> = std::fs::read_dir(&vms)
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        for dir in entries {
            let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let Some(r) = self.record(&name) else {
                // Half-created: no record was ever written.
                tracing::warn!(vm = %name, "removing a half-created VM directory");
                self.teardown(&name, None).await;
                continue;
            };
            let running = matches!(
                self.vmm.state(&r.machine).await,
                Ok(VmmState::Running | VmmState::Paused)
            );
            if running {
                tracing::info!(vm = %name, "adopted a running VM");
            } else {
                // Dead VMM: stop its virtiofsd, drop its TAP, clear stale files.
                let _ = self.vmm.force_stop(&r.machine).await;
                Virtiofsd::stop(&dir.join("virtiofsd.pid"), &r.machine.virtiofs_socket).await;
                if let NetAttach::Tap { tap, .. } = &r.machine.net {
                    net::delete_tap(self.runner.as_ref(), tap);
                }
                let _ = std::fs::remove_file(&r.machine.pid_file);
                let _ = std::fs::remove_file(&r.machine.control_socket);
            }
            out.push((name, running));
        }
        // TAPs on our bridge whose VM is gone (a crash between TAP and record).
        if let NetworkMode::Bridge(b) = &self.s.network {
            let ours: Vec<String> = out
                .iter()
                .filter_map(|(n, _)| self.record(n))
                .filter_map(|r| match r.machine.net {
                    NetAttach::Tap { tap, .. } => Some(tap),
                    NetAttach::User { .. } => None,
                })
                .collect();
            let brif = Path::new("/sys/class/net").join(&b.name).join("brif");
            if let Ok(rd) = std::fs::read_dir(brif) {
                for e in rd.filter_map(Result::ok) {
                    let tap = e.file_name().to_string_lossy().into_owned();
                    if tap.starts_with("kt") && !ours.contains(&tap) {
                        tracing::warn!(%tap, "removing an orphaned TAP");
                        net::delete_tap(self.runner.as_ref(), &tap);
                    }
                }
            }
        }
        // Slots whose VM directory is gone.
        if let Ok(slots) = self.store.call(|c| repo::all_slots(c)).await {
            for (project, _) in slots {
                if !vms.join(&project).exists() {
                    let p = project.clone();
                    let _ = self.store.call(move |c| repo::release_slot(c, &p)).await;
                }
            }
        }
        // Image builds interrupted mid-way (work directories and the mounts
        // mmdebstrap made in them), unless a build is running now.
        Images::new(&self.s.data_dir.join("images")).clean_interrupted();
        out
    }

    /// Removes everything of a VM but the source. Best effort: used by
    /// destroy and by rollback.
    pub(super) async fn teardown(&self, name: &str, record: Option<&VmRecord>) {
        let dir = self.vm_dir(name);
        if let Some(r) = record {
            let _ = self.vmm.force_stop(&r.machine).await;
            Virtiofsd::stop(&dir.join("virtiofsd.pid"), &r.machine.virtiofs_socket).await;
            if let NetAttach::Tap { tap, .. } = &r.machine.net {
                net::delete_tap(self.runner.as_ref(), tap);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(self.key_dir(name));
        crate::cgroup::remove(name);
        let n = name.to_owned();
        if let Err(e) = self.store.call(move |c| repo::release_slot(c, &n)).await {
            tracing::warn!(vm = name, error = %e, "could not release the VM's slot");
        }
    }
}
