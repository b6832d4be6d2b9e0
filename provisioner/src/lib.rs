//! Kennel's provisioner: turns a project spec into a running microVM with
//! the project's host source mounted, and keeps it running.
//!
//! - [`host`]: what this host can do (KVM, binaries, TAP permission).
//! - [`stacks`]: stack files and detecting a tree's stack.
//! - [`kernel`]: Debian's cloud kernel and Kennel's initramfs.
//! - [`image`]: stack images built with mmdebstrap, cached by content hash.
//! - [`process`]: external programs behind a fakeable [`process::Runner`].
//!
//! Disks, the Cloud Hypervisor and QEMU backends, virtiofsd and networking
//! arrive with their issues, each behind a small trait so the executor's
//! `kennel_core::provision::Provisioner` can be faked in tests.

pub mod catalog;
pub mod cgroup;
pub mod devcontainer;
pub mod disk;
pub mod host;
pub mod image;
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
