//! `scripts/install.sh` into a temporary root: the binary, share, config,
//! data dir and unit land where the service expects them, the unit passes
//! `systemd-analyze verify` (against the host's own units, copied into the
//! root), a second run keeps the config, and uninstall keeps config and
//! data.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use kennel_testkit::require;

fn install(root: &Path, extra: &[&str]) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(repo.join("scripts/install.sh"))
        .arg("--root")
        .arg(root)
        .arg("--bin")
        .arg(env!("CARGO_BIN_EXE_kennel"))
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn the_service_installs_verifies_and_uninstalls_into_a_root() {
    require("systemd-analyze", "systemd");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let said = install(root, &[]);
    assert!(said.contains("wrote"), "{said}");
    let bin = root.join("usr/local/bin/kennel");
    assert!(bin.metadata().unwrap().permissions().mode() & 0o111 != 0);
    for p in [
        "usr/local/share/kennel/stacks/rust/stack.toml",
        "usr/local/share/kennel/images/base/recipe.toml",
        "usr/local/share/kennel/kennel.example.toml",
        "usr/local/share/kennel/docs/operations.md",
        "etc/systemd/system/kennel.service",
    ] {
        assert!(root.join(p).exists(), "{p} missing");
    }
    let data = root.join("var/lib/kennel");
    assert_eq!(data.metadata().unwrap().permissions().mode() & 0o777, 0o700);
    // The config is valid and puts data where the unit runs.
    let config = root.join("etc/kennel/kennel.toml");
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .arg("config")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("data_dir = \"/var/lib/kennel\""), "{shown}");
    assert!(
        shown.contains("stacks_dir = \"/usr/local/share/kennel/stacks\""),
        "{shown}"
    );
    // systemd reads the unit: its targets come from the host's units.
    let units = root.join("usr/lib/systemd");
    std::fs::create_dir_all(&units).unwrap();
    assert!(Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(&units)
        .status()
        .unwrap()
        .success());
    let unit = root.join("etc/systemd/system/kennel.service");
    let out = Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Again: the operator's config is kept.
    std::fs::write(&config, "data_dir = \"/var/lib/kennel\"\nlog = \"debug\"\n").unwrap();
    let said = install(root, &[]);
    assert!(said.contains("kept"), "{said}");
    assert!(std::fs::read_to_string(&config).unwrap().contains("debug"));
    // Uninstall: binary, unit and share go; config and data stay.
    std::fs::write(data.join("kennel.db"), b"not really").unwrap();
    let said = install(root, &["--uninstall"]);
    assert!(said.contains("Kept"), "{said}");
    assert!(!bin.exists() && !unit.exists());
    assert!(!root.join("usr/local/share/kennel").exists());
    assert!(config.exists() && data.join("kennel.db").exists());
}
