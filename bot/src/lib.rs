//! Kennel's chat front ends: a Matrix bot (matrix-sdk) and a Discord bot
//! (serenity), behind the `matrix` and `discord` features of the `kennel`
//! binary.
//!
//! Neither is built yet: `kennel serve` says so when it starts. Both will
//! map chat users to identities, pass text to `kennel_core`'s executor,
//! render its outcomes (HTML for Matrix, Markdown for Discord) and show
//! progress by editing one message.
