//! Disks: a project's root disk, a qcow2 copy-on-write child of its stack
//! image (O(1) whatever the image size; works for QEMU and Cloud
//! Hypervisor), and the small read-only config disk (`KENNELCFG`) that
//! carries per-boot settings into the guest.

use std::path::Path;

use crate::process::{Cmd, RunError, Runner};

/// Creates `disk` as a qcow2 child of the raw image `base`, `size_mib` large.
pub fn create_root(
    runner: &dyn Runner,
    base: &Path,
    disk: &Path,
    size_mib: u64,
) -> Result<(), RunError> {
    runner
        .run(
            &Cmd::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(base)
                .arg(disk)
                .arg(format!("{size_mib}M")),
        )
        .map(|_| ())
}

/// The backing file a qcow2 disk was made from (for image references).
pub fn backing_file(runner: &dyn Runner, disk: &Path) -> Option<String> {
    let out = runner
        .run(
            &Cmd::new("qemu-img")
                .args(["info", "--output=json", "-U"])
                .arg(disk),
        )
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    v.get("backing-filename")
        .and_then(|b| b.as_str())
        .map(str::to_owned)
}

/// Makes `image` an ext4 filesystem of `size` (e.g. `8M`) labelled `label`
/// holding the tree at `dir`, owned by root whoever owns the files.
pub fn mkfs_from_dir(
    runner: &dyn Runner,
    dir: &Path,
    image: &Path,
    label: &str,
    size: &str,
) -> Result<(), RunError> {
    let _ = std::fs::remove_file(image);
    runner
        .run(
            &Cmd::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-L",
                    label,
                    "-m",
                    "0",
                    "-E",
                    "root_owner=0:0",
                    "-d",
                ])
                .arg(dir)
                .arg(image)
                .arg(size),
        )
        .map(|_| ())
}

/// Writes the config disk image from the files in `dir`.
pub fn create_config(runner: &dyn Runner, dir: &Path, image: &Path) -> Result<(), RunError> {
    mkfs_from_dir(runner, dir, image, "KENNELCFG", "8M")
}

/// Makes an ed25519 keypair at `path` (and `path.pub`) with no passphrase.
pub fn keygen(runner: &dyn Runner, path: &Path, comment: &str) -> Result<(), RunError> {
    runner
        .run(
            &Cmd::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
                .arg(path),
        )
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::FakeRunner;

    #[test]
    fn root_disks_are_qcow2_children() {
        let r = FakeRunner::default();
        create_root(
            &r,
            Path::new("/i/rootfs.ext4"),
            Path::new("/v/disk.qcow2"),
            20480,
        )
        .unwrap();
        let calls = r.calls.lock().unwrap();
        assert_eq!(
            calls[0],
            "qemu-img create -q -f qcow2 -F raw -b /i/rootfs.ext4 /v/disk.qcow2 20480M"
        );
    }
}
