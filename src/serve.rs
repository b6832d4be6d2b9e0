//! `kennel serve`: the daemon. It owns the data dir, the store's writes and
//! every part that is built, and stops gracefully on SIGTERM or SIGINT.

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::datadir::DataDir;
use crate::{console, wiring};

/// Parts of Kennel that `serve` would start but that are not built yet.
const NOT_BUILT: &[&str] = &["SSH gateway", "HTTPS gateway", "Matrix bot", "Discord bot"];

/// Runs the daemon until a signal arrives.
pub async fn run(config: &Config) -> Result<()> {
    let dir = DataDir::new(&config.data_dir);
    let _lock = dir.lock()?;
    let store = wiring::store(&dir)?;
    let (exec, local) = wiring::executor(config, store)?;
    match &local {
        Some(p) => {
            wiring::reconcile(&exec, p).await?;
            tracing::info!(backend = %p.describe(), "provisioner ready");
        }
        None => tracing::warn!("VMs are not available on this host; see `kennel doctor`"),
    }
    for part in NOT_BUILT {
        tracing::warn!(part, "not built yet; not started");
    }
    let socket = dir.control_socket();
    eprintln!(
        "kennel serve: data in {}, control socket {}; not built yet: {}",
        dir.root().display(),
        socket.display(),
        NOT_BUILT.join(", ")
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let result = tokio::select! {
        r = console::serve(exec, &socket) => r,
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
    };
    let _ = std::fs::remove_file(&socket);
    eprintln!("kennel serve: stopped");
    result
}
