//! Kennel's stack images as Incus images: the same root filesystem Kennel
//! builds for its own VMs (so one recipe, one content hash), imported once
//! under the alias `kennel/<image id>` (`<stack>-<hash>`), which is how it
//! is found again.
//!
//! A container image is a unified tarball: `metadata.yaml` and the root
//! filesystem under `rootfs/`. It is made from the ext4 file by mounting
//! it read-only and streaming it through `tar` (owners, modes, extended
//! attributes and file capabilities kept), into a file beside the image.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::client::{IncusClient, IncusError};
use crate::image::ImageInfo;
use crate::process::{Cmd, RunError, Runner};

/// Why an image could not be made available in Incus.
#[derive(Debug, thiserror::Error)]
pub enum IncusImageError {
    #[error("making the Incus image of {image} failed")]
    Run {
        image: String,
        #[source]
        source: RunError,
    },
    #[error("making the Incus image of {image} failed: {source}")]
    Io {
        image: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Incus(#[from] IncusError),
}

/// The alias under which Kennel's image `id` lives in Incus.
pub fn alias(id: &str) -> String {
    format!("kennel/{id}")
}

/// `metadata.yaml` of a Kennel image.
pub fn metadata(info: &ImageInfo) -> String {
    format!(
        "architecture: x86_64\ncreation_date: {}\nproperties:\n  os: debian\n  description: \"Kennel {} image {}\"\n  kennel.image: \"{}\"\n",
        info.built_at, info.stack, info.hash, info.id
    )
}

/// Writes the unified tarball of `info` to `out`, mounting its root
/// filesystem read-only at `mnt` (an empty directory) meanwhile.
pub fn write_tarball(
    runner: &dyn Runner,
    info: &ImageInfo,
    mnt: &Path,
    out: &Path,
) -> Result<(), IncusImageError> {
    let io = |source| IncusImageError::Io {
        image: info.id.clone(),
        source,
    };
    let run = |cmd: Cmd| {
        runner.run(&cmd).map_err(|source| IncusImageError::Run {
            image: info.id.clone(),
            source,
        })
    };
    let meta = out.with_extension("meta");
    std::fs::create_dir_all(&meta).map_err(io)?;
    std::fs::write(meta.join("metadata.yaml"), metadata(info)).map_err(io)?;
    std::fs::create_dir_all(mnt).map_err(io)?;
    run(Cmd::new("mount")
        .args(["-o", "loop,ro,noload"])
        .arg(info.rootfs())
        .arg(mnt))?;
    let tarred = run(Cmd::new("tar")
        .args(["--create", "--file"])
        .arg(out)
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--sparse",
            "--one-file-system",
        ])
        .arg("-C")
        .arg(&meta)
        .arg("metadata.yaml")
        .arg("-C")
        .arg(mnt)
        // Everything of the mount under rootfs/ (metadata.yaml, given
        // first and without "./", is left as it is).
        .args([
            "--transform=s,^\\./,rootfs/,",
            "--transform=s,^\\.$,rootfs,",
            ".",
        ]));
    let unmounted = run(Cmd::new("umount").arg(mnt));
    let _ = std::fs::remove_dir_all(&meta);
    tarred?;
    unmounted?;
    Ok(())
}

/// Makes sure Kennel image `info` is in Incus; its fingerprint. Imports
/// it (building the tarball under `work`) only when its alias is absent.
pub async fn ensure(
    client: &IncusClient,
    runner: std::sync::Arc<dyn Runner>,
    info: &ImageInfo,
    work: &Path,
    on_step: &mut (dyn FnMut(&str) + Send),
) -> Result<String, IncusImageError> {
    let name = alias(&info.id);
    if let Some(a) = client.image_alias(&name).await? {
        if client.image(&a.target).await?.is_some() {
            return Ok(a.target);
        }
    }
    on_step(&format!("importing {} into Incus", info.id));
    let dir: PathBuf = work.join(format!("incus-import-{}", info.id));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| IncusImageError::Io {
        image: info.id.clone(),
        source,
    })?;
    let tarball = dir.join("image.tar");
    let (info2, mnt, out) = (info.clone(), dir.join("mnt"), tarball.clone());
    let made = tokio::task::spawn_blocking(move || write_tarball(&*runner, &info2, &mnt, &out))
        .await
        .map_err(|e| IncusImageError::Io {
            image: info.id.clone(),
            source: std::io::Error::other(e.to_string()),
        });
    let imported = match made {
        Ok(Ok(())) => {
            on_step(&format!("uploading {} to Incus", info.id));
            match client
                .import_image(&tarball, Duration::from_secs(1800))
                .await
            {
                Ok(f) => Ok(f),
                // Imported before under no alias (an interrupted run):
                // the fingerprint of a unified tarball is its SHA-256.
                Err(IncusError::Exists { .. }) => {
                    sha256_file(&tarball).map_err(|source| IncusImageError::Io {
                        image: info.id.clone(),
                        source,
                    })
                }
                Err(e) => Err(e.into()),
            }
        }
        Ok(Err(e)) | Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let fingerprint = imported?;
    match client.add_image_alias(&name, &fingerprint).await {
        Ok(()) | Err(IncusError::Exists { .. }) => Ok(fingerprint),
        Err(e) => Err(e.into()),
    }
}

/// The SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_metadata_names_the_image() {
        let info = ImageInfo {
            id: "rust-abc".into(),
            stack: "rust".into(),
            hash: "abc".into(),
            kernel_release: String::new(),
            packages: vec![],
            size_bytes: 0,
            built_at: 1_700_000_000,
            build_seconds: 0.0,
            dir: PathBuf::new(),
        };
        let m = metadata(&info);
        assert!(
            m.starts_with("architecture: x86_64\ncreation_date: 1700000000\n"),
            "{m}"
        );
        assert!(m.contains("kennel.image: \"rust-abc\""));
        assert_eq!(alias("rust-abc"), "kennel/rust-abc");
    }
}
