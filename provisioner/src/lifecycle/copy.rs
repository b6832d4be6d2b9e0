//! Copying a project's VM (a copy-on-write disk and a copy of its source)
//! and renaming one.

use super::*;

impl LocalProvisioner {
    pub(super) async fn copy_inner(
        &self,
        from: &ProjectName,
        label: Option<&str>,
        to: &CreateRequest,
        progress: &dyn ProgressSink,
    ) -> Result<Created, ProvisionError> {
        let src = self
            .record(from.as_str())
            .ok_or_else(|| ProvisionError::NoVm(from.to_string()))?;
        // From a checkpoint: its layer and source copy, which nothing
        // writes, so the original keeps running.
        let at = label
            .map(|l| self.checkpoint_files(from.as_str(), l))
            .transpose()?;
        let note = match label {
            Some(l) => format!("a copy of {from} as at checkpoint {l}"),
            None => format!("a copy of {from}"),
        };
        let name = to.project.as_str().to_owned();
        // Both ends beneath a root, no link on the way; the copy itself
        // (cp -a) copies links as links.
        self.check_source(&src.source, Stage::Validated)?;
        let dest_source = self.copy_destination(to)?;
        // A consistent disk needs the VM stopped; it is started again after.
        let was_running = at.is_none() && {
            let _g = self.lock(from.as_str()).await;
            let running = self.may_run(&src).await;
            if running {
                step(
                    progress,
                    Stage::Stopping,
                    Some(format!("{from}, to copy its disk")),
                );
                self.graceful_stop(&src).await?;
            }
            // A new layer a crash left beside the disk is the disk to copy.
            self.settle_cut_off(&src).await?;
            running
        };
        let _guard = self.lock(&name).await;
        // Until the copy is a project, a restart removes it.
        let marker = self.pending_source(&name);
        let result = async {
            crate::source::Pending {
                path: dest_source.clone(),
                whole: true,
            }
            .record(&marker)
            .map_err(|e| {
                failed(
                    Stage::Disk,
                    format!("cannot write {}: {e}", marker.display()),
                )
            })?;
            let dir = self.vm_dir(&name);
            std::fs::create_dir_all(&dir).map_err(|e| failed(Stage::Disk, e.to_string()))?;
            let slot = self.allocate_slot(&name, to.app_port, &[]).await?;
            let k = kernel::KernelSet::open(src.machine.kernel.parent().unwrap_or(Path::new("/")))
                .ok_or_else(|| failed(Stage::Image, "the source VM's kernel is gone"))?;
            let m = self.machine(
                &name,
                &k,
                to.resources.vcpus,
                to.resources.memory_mib,
                net::attach(&self.s.network, slot, to.app_port),
            );
            step(
                progress,
                Stage::Disk,
                Some(format!("copy-on-write copy of {from}'s disk and source")),
            );
            let (from_disk, from_src) = match &at {
                Some((layer, source)) => (layer.clone(), source.clone()),
                None => (src.machine.disk.clone(), src.source.clone()),
            };
            let (to_disk, to_src) = (m.disk.clone(), dest_source.clone());
            let (kd, vd, label) = (self.key_dir(&name), dir.clone(), format!("kennel-{name}"));
            self.blocking(Stage::Disk, move |runner| {
                // A disk on checkpoint layers is written out whole over the
                // stack image, so the copy needs none of them.
                let on_layers = disk::info(runner, &from_disk)
                    .ok()
                    .and_then(|i| i.backing_format)
                    .is_some_and(|f| f == "qcow2");
                if on_layers {
                    let base = disk::chain_base(runner, &from_disk)?;
                    disk::flatten_onto(runner, &from_disk, &base, &to_disk)?;
                } else {
                    // --reflink=auto: a copy-on-write clone where the filesystem can.
                    runner
                        .run(
                            &Cmd::new("cp")
                                .args(["--reflink=auto", "--sparse=always"])
                                .arg(&from_disk)
                                .arg(&to_disk),
                        )
                        .map_err(|e| e.to_string())?;
                }
                runner
                    .run(
                        &Cmd::new("cp")
                            .args(["-a", "--reflink=auto"])
                            .arg(&from_src)
                            .arg(&to_src),
                    )
                    .map_err(|e| e.to_string())?;
                kennel_core::fault::point("copying");
                new_keypairs(runner, &kd, &vd, &label)
            })
            .await?;
            let record = VmRecord {
                project: name.clone(),
                image: src.image.clone(),
                stack: src.stack.clone(),
                source: dest_source.clone(),
                slot,
                app_port: to.app_port,
                machine: m,
                ..src.clone()
            };
            let mut record = record;
            let status = self
                .boot_in_a_free_slot(
                    &mut record,
                    &to.authorized_keys,
                    progress,
                    &mut Timings::default(),
                )
                .await?;
            Ok(Created {
                stack: record.stack.clone(),
                source_path: dest_source.display().to_string(),
                notes: vec![note],
                status,
                app_port: None,
            })
        }
        .await;
        if result.is_err() {
            let record = self.record(&name);
            self.teardown(&name, record.as_ref()).await;
            // The copied source is this attempt's own; the original is untouched.
            let _ = std::fs::remove_dir_all(&dest_source);
        }
        crate::source::Pending::clear(&marker);
        if was_running {
            let _g = self.lock(from.as_str()).await;
            let keys = self.current_keys(from.as_str());
            // While it was down for the copy, its address may have been
            // taken: it moves to a free slot rather than staying down.
            let mut src = src;
            if let Err(e) = self
                .boot_in_a_free_slot(&mut src, &keys, progress, &mut Timings::default())
                .await
            {
                tracing::error!(vm = %from, error = %e, "could not restart the VM after copying it");
            }
        }
        result
    }

    /// Where a copy's source goes (`to.path`): beneath a projects root,
    /// reached without links, and not there yet.
    pub(super) fn copy_destination(&self, to: &CreateRequest) -> Result<PathBuf, ProvisionError> {
        let dest = PathBuf::from(
            to.path
                .clone()
                .ok_or_else(|| failed(Stage::Validated, "no source path was given"))?,
        );
        let root = self.root_for(&dest, Stage::Validated)?;
        let rel = root
            .relative(&dest)
            .map_err(|e| failed(Stage::Validated, e.to_string()))?;
        if root
            .lookup(&rel)
            .map_err(|e| failed(Stage::Validated, e.to_string()))?
            .is_some()
        {
            return Err(failed(
                Stage::Validated,
                format!("{} already exists", dest.display()),
            ));
        }
        Ok(dest)
    }

    pub(super) async fn rename_inner(
        &self,
        from: &ProjectName,
        to: &ProjectName,
    ) -> Result<(), ProvisionError> {
        let _g1 = self.lock(from.as_str()).await;
        let _g2 = self.lock(to.as_str()).await;
        let Some(r) = self.record(from.as_str()) else {
            return Ok(()); // no VM: nothing of ours to rename
        };
        let running = self.may_run(&r).await;
        let keys = self.current_keys(from.as_str());
        if running {
            self.graceful_stop(&r).await?;
        }
        // Before the move: only the disk's layers get their backing
        // files' new paths.
        self.settle_cut_off(&r).await?;
        if self.vm_dir(to.as_str()).exists() {
            return Err(failed(
                Stage::Validated,
                format!("{} already exists", self.vm_dir(to.as_str()).display()),
            ));
        }
        let mut record = self.move_vm(from.as_str(), to.as_str(), r)?;
        if running {
            self.boot_in_a_free_slot(
                &mut record,
                &keys,
                &kennel_core::provision::NoProgress,
                &mut Timings::default(),
            )
            .await?;
        }
        Ok(())
    }

    /// Moves `r`, the VM of `from`, to the name `to`: its directory (unless
    /// already moved), its keys, and a record whose paths name `to`. Each
    /// step can be done again, so a rename cut off by a restart is finished
    /// by [`LocalProvisioner::reconcile`].
    pub(super) fn move_vm(
        &self,
        from: &str,
        to: &str,
        r: VmRecord,
    ) -> Result<VmRecord, ProvisionError> {
        let (old_dir, new_dir) = (self.vm_dir(from), self.vm_dir(to));
        let io = |e: std::io::Error| failed(Stage::Disk, e.to_string());
        if old_dir.exists() {
            std::fs::rename(&old_dir, &new_dir).map_err(io)?;
            // Checkpoint layers name their backing files by path.
            self.repoint_layers(self.runner.as_ref(), &old_dir, &new_dir)
                .map_err(|e| failed(Stage::Disk, e))?;
        }
        kennel_core::fault::point("renaming-vm");
        if self.key_dir(from).exists() && !self.key_dir(to).exists() {
            std::fs::rename(self.key_dir(from), self.key_dir(to)).map_err(io)?;
        }
        let k = kernel::KernelSet::open(r.machine.kernel.parent().unwrap_or(Path::new("/")))
            .ok_or_else(|| failed(Stage::Image, "the VM's kernel is gone"))?;
        let mut m = self.machine(
            to,
            &k,
            r.machine.vcpus,
            r.machine.memory_mib,
            r.machine.net.clone(),
        );
        m.kernel = r.machine.kernel.clone();
        m.initramfs = r.machine.initramfs.clone();
        let record = VmRecord {
            project: to.to_owned(),
            machine: m,
            ..r
        };
        self.save(&record)?;
        Ok(record)
    }
}
