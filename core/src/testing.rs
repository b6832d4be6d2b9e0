//! One test fixture for every crate: an executor over an in-memory store
//! with a recording provisioner and a `rust` stack (app port 8000).
//!
//! ```text
//! let w = World::new().admin(Identity::new(Frontend::Matrix, "@root:example.org")).build();
//! let out = w.run(&w.admin, "projects").await;
//! ```

use std::sync::Arc;

use crate::catalog::{StackInfo, StaticCatalog};
use crate::model::{Frontend, Identity};
use crate::outcome::Outcome;
use crate::provision::testing::RecordingProvisioner;
use crate::provision::NoProgress;
use crate::render::{render, Format};
use crate::{Executor, Settings, Store};

/// An executor with what tests look at beside it.
#[derive(Debug)]
pub struct World {
    pub exec: Executor,
    pub vms: Arc<RecordingProvisioner>,
    pub store: Store,
    /// A configured admin (an admin user the first time it speaks).
    pub admin: Identity,
}

/// Builds a [`World`].
#[derive(Debug)]
pub struct WorldBuilder {
    admin: Identity,
    settings: Settings,
    vms: RecordingProvisioner,
}

impl World {
    /// A world whose admin is `@root:example.org` on Matrix, with default
    /// settings; change either with the builder.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> WorldBuilder {
        WorldBuilder {
            admin: Identity::new(Frontend::Matrix, "@root:example.org"),
            settings: Settings::default(),
            vms: RecordingProvisioner::default(),
        }
    }

    /// Runs one line for `who`, through the executor.
    pub async fn run(&self, who: &Identity, line: &str) -> Outcome {
        self.exec
            .front_door(who, None, line, crate::Style::PLAIN, &NoProgress)
            .await
            .outcome
    }

    /// A new executor over the same store, provisioner and catalog, as a
    /// restarted daemon has it: nothing in memory carried over.
    pub fn restarted(&self) -> Executor {
        Executor::new(
            self.store.clone(),
            self.vms.clone(),
            self.exec.catalog_arc(),
            self.exec.settings().clone(),
        )
    }

    /// A member: a Discord user `id` whose access request (with the key
    /// from `seed`) the admin approved.
    ///
    /// # Panics
    /// When the request or the approval is refused: a test's setup failed.
    #[allow(clippy::panic)]
    pub async fn member(&self, id: &str, seed: u8) -> Identity {
        let who = Identity::new(Frontend::Discord, id);
        let k = crate::keys::testing::ed25519(seed, None);
        let Ok(crate::outcome::Reply::RequestFiled { request, .. }) =
            self.run(&who, &format!("request-access {k}")).await
        else {
            panic!("{id}'s access request was not filed");
        };
        if let Err(e) = self
            .run(&self.admin, &format!("approve {}", request.id))
            .await
        {
            panic!("approving {id}: {e}");
        }
        who
    }

    /// Runs one line and renders the answer as plain text.
    pub async fn text(&self, who: &Identity, line: &str) -> String {
        render(&self.run(who, line).await, Format::Plain)
    }
}

impl WorldBuilder {
    /// The configured admin identity.
    pub fn admin(mut self, admin: Identity) -> Self {
        self.admin = admin;
        self
    }

    /// Settings (the admin is added to `admins`).
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// A pause after each progress step of a create, to watch progress.
    pub fn stage_delay(self, d: std::time::Duration) -> Self {
        if let Ok(mut s) = self.vms.stage_delay.lock() {
            *s = d;
        }
        self
    }

    /// The world, over a fresh in-memory store.
    ///
    /// # Panics
    /// If an in-memory SQLite database cannot be opened.
    #[allow(clippy::expect_used)]
    pub fn build(self) -> World {
        let store = Store::open_in_memory().expect("an in-memory store");
        let vms = Arc::new(self.vms);
        let catalog = Arc::new(StaticCatalog {
            stacks: vec![StackInfo {
                name: "rust".into(),
                summary: "Rust".into(),
                app_port: 8000,
                broken: None,
            }],
            templates: vec![],
        });
        let mut settings = self.settings;
        settings.admins.push(self.admin.clone());
        let exec = Executor::new(store.clone(), vms.clone(), catalog, settings);
        World {
            exec,
            vms,
            store,
            admin: self.admin,
        }
    }
}
