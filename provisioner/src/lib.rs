//! Kennel's provisioner: turns a project spec into a running microVM with
//! the project's host source mounted, and keeps it running.
//!
//! - [`host`]: what this host can do (KVM, binaries, TAP permission).
//! - [`stacks`]: stack files and detecting a tree's stack.
//! - [`kernel`]: Debian's cloud kernel and Kennel's initramfs.
//! - [`image`]: stack images built with mmdebstrap, cached by content hash.
//! - [`process`]: external programs behind a fakeable [`process::Runner`].
//! - [`source`], [`netguard`], [`templates`], [`devcontainer`]: the host
//!   source (git2 clones guarded to public hosts, new repositories,
//!   adopted directories) and what it says about itself.
//! - [`disk`], [`virtiofs`], [`net`], [`cgroup`]: qcow2 disks, virtiofsd,
//!   TAP/bridge and user-mode networking, the VMs' cgroups.
//! - [`vmm`]: the Cloud Hypervisor (REST API over a Unix socket) and QEMU
//!   (QMP; TCG where there is no KVM) backends behind the `Vmm` trait;
//!   [`select`] picks one for this host from the configuration's
//!   [`choice`]s.
//! - [`lifecycle`]: [`lifecycle::LocalProvisioner`], core's
//!   `kennel_core::provision::Provisioner` on this host: create with
//!   rollback, boot, stop, copy, rename, destroy, checkpoints, reconcile.
//!
//! Each external program or device sits behind a small trait with a fake
//! for unit tests; failures come back as core's typed `ProvisionError`
//! (one variant per operation, `Invalid` for what the user must fix).

pub mod catalog;
pub mod cgroup;
pub mod choice;
pub mod devcontainer;
pub mod disk;
pub mod egress;
pub mod host;
pub mod hostguard;
pub mod image;
pub mod incus;
pub mod kernel;
pub mod lifecycle;
pub mod net;
pub mod netguard;
pub mod pins;
pub mod process;
pub mod select;
pub mod source;
pub mod stacks;
pub mod templates;
pub mod virtiofs;
pub mod vmm;
