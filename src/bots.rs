//! Starts the chat bots that are configured and built.

use std::path::Path;
#[cfg(any(feature = "matrix", feature = "discord"))]
use std::sync::Arc;

use kennel_core::Executor;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;

/// Resolves when the daemon is stopping.
#[cfg(any(feature = "matrix", feature = "discord"))]
async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Spawns each configured bot; a bot that cannot start logs why and ends.
#[cfg_attr(
    not(all(feature = "matrix", feature = "discord")),
    allow(unused_variables, unused_mut)
)]
pub fn start(
    config: &Config,
    exec: &Executor,
    data_dir: &Path,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    if config.matrix.enabled() {
        #[cfg(feature = "matrix")]
        {
            let cfg = config.matrix.clone();
            let desk = Arc::new(kennel_bot::desk::Desk::new(exec.gate(), cfg.limits.clone()));
            let dir = data_dir.join("bot/matrix");
            let stop = stopped(stop.clone());
            tasks.push(tokio::spawn(async move {
                let run = async {
                    let bot = kennel_bot::matrix::connect(cfg, &dir, desk).await?;
                    bot.run(stop).await
                };
                if let Err(e) = run.await {
                    tracing::error!(error = %e, "the Matrix bot stopped");
                    crate::logging::tell(format_args!("kennel serve: the Matrix bot stopped: {e}"));
                }
            }));
        }
        #[cfg(not(feature = "matrix"))]
        tracing::warn!("[matrix] is configured but this kennel was built without the `matrix` feature; rebuild with --features matrix");
    }
    if config.discord.enabled() {
        #[cfg(feature = "discord")]
        {
            let cfg = config.discord.clone();
            let desk = Arc::new(kennel_bot::desk::Desk::new(exec.gate(), cfg.limits.clone()));
            let stop = stopped(stop.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = kennel_bot::discord::run(cfg, desk, stop).await {
                    tracing::error!(error = %e, "the Discord bot stopped");
                    crate::logging::tell(format_args!(
                        "kennel serve: the Discord bot stopped: {e}"
                    ));
                }
            }));
        }
        #[cfg(not(feature = "discord"))]
        tracing::warn!("[discord] is configured but this kennel was built without the `discord` feature; rebuild with --features discord");
    }
    tasks
}
