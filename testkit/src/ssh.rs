//! OpenSSH's real client for tests: key pairs and `ssh` runs.

use std::path::{Path, PathBuf};
use std::process::Output;

/// Makes an ed25519 key pair `dir/name` with `ssh-keygen`; returns the
/// private key's path and the public key line.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    crate::require("ssh-keygen", "openssh-client");
    let path = dir.join(name);
    let ok = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            &format!("{name}@test"),
            "-f",
        ])
        .arg(&path)
        .status()
        .unwrap();
    assert!(ok.success());
    let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
    (path, public.trim().to_owned())
}

/// OpenSSH's `ssh` towards `127.0.0.1:port` with `key` only, trusting any
/// host key, at OpenSSH log level `level` (banners, which say why a
/// connection was refused, show from INFO on). Not in batch mode: OpenSSH
/// turns keyboard-interactive off there, and that is how a client whose
/// keys are all unknown reaches the request-access session (no prompt is
/// ever shown; passwords are off). Add the target and the command.
pub fn client(port: u16, key: &Path, level: &str) -> std::process::Command {
    let mut c = std::process::Command::new("ssh");
    c.args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
    ])
    .args([
        "-o",
        &format!("LogLevel={level}"),
        "-o",
        "PasswordAuthentication=no",
    ])
    .args(["-o", "IdentitiesOnly=yes", "-p", &port.to_string(), "-i"])
    .arg(key);
    c
}

/// `ssh -i key user@127.0.0.1 -p port args...`, off the runtime's threads.
pub async fn run_ssh(
    port: u16,
    key: PathBuf,
    user: String,
    args: Vec<String>,
    stdin: Option<String>,
) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut child = client(port, &key, "ERROR")
            .arg("-T")
            .arg(format!("{user}@127.0.0.1"))
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            use std::io::Write;
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}
