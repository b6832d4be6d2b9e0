//! Kennel's core: the domain model, the SQLite store, the command language
//! that every front end speaks, access policy, and the executor that runs
//! commands against the store and a provisioner.
//!
//! Front ends (chat bots, the SSH gateway, the HTTP API, the local CLI)
//! stay thin: they turn what they receive into text and an [`Identity`],
//! call the front door ([`Executor::front_door`]), and send back the text
//! it renders, showing [`provision::Progress`] on the way. The VM state
//! the store records is kept true by [`vmstate`] (reconcile at start, a
//! watcher for VMs that die), and [`idle`] stops VMs nobody uses.

pub mod catalog;
pub mod command;
pub mod dns;
pub mod egress;
pub mod executor;
pub mod fault;
pub mod frontdoor;
pub mod gate;
pub mod guest;
pub mod hostpath;
pub mod idle;
pub mod keys;
pub mod llm;
pub mod model;
pub mod names;
pub mod outcome;
pub mod policy;
pub mod provision;
pub mod qr;
pub mod redact;
pub mod render;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod urls;
pub mod vmstate;
pub mod web;

pub use command::{parse, Command, Invocation, ParseError};
pub use executor::{Event, Executor, Settings};
pub use frontdoor::{Answered, Style};
pub use gate::{Gate, VmReach};
pub use idle::Presence;
pub use model::{Identity, Role, User};
pub use outcome::{exit_code, CommandError, Outcome, Reply};
pub use render::{render, Format};
pub use store::{Store, StoreError};
pub use urls::Urls;
pub use vmstate::{Actor, Woke};
