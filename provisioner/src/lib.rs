//! Kennel's provisioner: turns a project spec into a running microVM with
//! the project's host source mounted, and keeps it running.
//!
//! Today it holds the host probes ([`host`]) that `kennel doctor` and
//! backend selection use. Stack detection, images, disks, the Cloud
//! Hypervisor and QEMU backends, virtiofsd and networking arrive with
//! their issues, each behind a small trait so the executor's
//! `kennel_core::provision::Provisioner` can be faked in tests.

pub mod host;
pub mod stacks;
