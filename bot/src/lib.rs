//! Kennel's chat front ends: a Matrix bot (matrix-sdk, feature `matrix`) and
//! a Discord bot (serenity, feature `discord`).
//!
//! Both stay thin. A bot receives text, maps its sender to an
//! [`Identity`](kennel_core::model::Identity), hands the text to the shared
//! [`desk::Desk`] (size and rate limits, parsing with the bot's own address
//! stripped, the executor), shows progress by editing one message
//! ([`desk::track`]) and sends the rendered outcome. Parsing, policy and
//! state live in `kennel_core`.

pub mod config;
pub mod desk;
#[cfg(feature = "discord")]
pub mod discord;
#[cfg(feature = "matrix")]
pub mod matrix;
