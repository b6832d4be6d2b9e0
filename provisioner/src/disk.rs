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

/// Grows a (stopped VM's) disk to `bytes`; the guest's init grows its
/// filesystem at the next boot.
pub fn grow(runner: &dyn Runner, disk: &Path, bytes: u64) -> Result<(), String> {
    runner
        .run(
            &Cmd::new("qemu-img")
                .args(["resize", "-q", "-f", "qcow2"])
                .arg(disk)
                .arg(bytes.to_string()),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What `qemu-img info` says of a disk (read with `-U`: a running VM may
/// hold it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub virtual_size: u64,
    /// The backing file as written in the image, if any.
    pub backing: Option<String>,
    pub backing_format: Option<String>,
}

/// Reads a disk's size and backing file.
pub fn info(runner: &dyn Runner, disk: &Path) -> Result<DiskInfo, String> {
    let out = runner
        .run(
            &Cmd::new("qemu-img")
                .args(["info", "--output=json", "-U"])
                .arg(disk),
        )
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .map_err(|e| format!("qemu-img info of {}: {e}", disk.display()))?;
    let text = |k: &str| v.get(k).and_then(|b| b.as_str()).map(str::to_owned);
    Ok(DiskInfo {
        virtual_size: v
            .get("virtual-size")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("qemu-img info of {} gave no size", disk.display()))?,
        backing: text("backing-filename"),
        backing_format: text("backing-filename-format"),
    })
}

/// Creates `disk` as an empty qcow2 child of the qcow2 `backing`, of
/// `size` bytes, without opening `backing` (it may not exist yet, or be
/// held by a running VM).
pub fn create_child(
    runner: &dyn Runner,
    backing: &Path,
    disk: &Path,
    size: u64,
) -> Result<(), String> {
    runner
        .run(
            &Cmd::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-u", "-b"])
                .arg(backing)
                .arg(disk)
                .arg(size.to_string()),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Makes `child` read from `backing` (of `format`) instead of its
/// current backing file, copying into it what differs (a merge of the
/// layer it skips). Neither may be in use.
pub fn rebase(
    runner: &dyn Runner,
    child: &Path,
    backing: &str,
    format: &str,
) -> Result<(), String> {
    rebase_with(runner, child, backing, format, &[])
}

/// Rewrites the backing file name in `child` to `backing` without
/// touching data (after the files moved).
pub fn rename_backing(
    runner: &dyn Runner,
    child: &Path,
    backing: &str,
    format: &str,
) -> Result<(), String> {
    rebase_with(runner, child, backing, format, &["-u"])
}

fn rebase_with(
    runner: &dyn Runner,
    child: &Path,
    backing: &str,
    format: &str,
    extra: &[&str],
) -> Result<(), String> {
    runner
        .run(
            &Cmd::new("qemu-img")
                .args(["rebase", "-q"])
                .args(extra)
                .args(["-f", "qcow2", "-F", format, "-b", backing])
                .arg(child),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Writes `to` as a standalone qcow2 child of `base` (raw) holding what
/// the whole chain of `from` holds beyond `base`: a disk that needs none
/// of `from`'s layers.
pub fn flatten_onto(runner: &dyn Runner, from: &Path, base: &str, to: &Path) -> Result<(), String> {
    runner
        .run(
            &Cmd::new("qemu-img")
                .args([
                    "convert", "-q", "-U", "-O", "qcow2", "-B", base, "-F", "raw",
                ])
                .arg(from)
                .arg(to),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The bottom of a disk's backing chain (the stack image).
pub fn chain_base(runner: &dyn Runner, disk: &Path) -> Result<String, String> {
    let out = runner
        .run(
            &Cmd::new("qemu-img")
                .args(["info", "--output=json", "-U", "--backing-chain"])
                .arg(disk),
        )
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .map_err(|e| format!("qemu-img info of {}: {e}", disk.display()))?;
    v.as_array()
        .and_then(|chain| chain.last())
        .and_then(|last| last.get("filename"))
        .and_then(|f| f.as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("no backing chain for {}", disk.display()))
}

/// Bytes a file takes on disk (allocated blocks, not its length).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).map_or(0, |m| m.blocks().saturating_mul(512))
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
