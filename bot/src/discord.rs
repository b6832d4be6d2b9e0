//! The Discord bot, on serenity.

use std::sync::Arc;

use crate::config::DiscordConfig;
use crate::desk::Desk;

/// Why the Discord bot stopped.
#[derive(Debug, thiserror::Error)]
pub enum DiscordError {
    #[error("the Discord bot is not built yet")]
    NotBuilt,
}

/// Runs the bot until `shutdown` resolves.
pub async fn run(
    cfg: DiscordConfig,
    desk: Arc<Desk>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), DiscordError> {
    let _ = (cfg, desk, shutdown);
    Err(DiscordError::NotBuilt)
}
