//! The executor's catalog of stacks and templates, read from their folders.

use kennel_core::catalog::{Catalog, StackInfo, TemplateInfo};

use crate::stacks::Stacks;

/// Stacks loaded from `stacks/` (templates arrive with the `new project` work).
#[derive(Debug, Clone)]
pub struct DirCatalog {
    pub stacks: Stacks,
}

impl Catalog for DirCatalog {
    fn stacks(&self) -> Vec<StackInfo> {
        self.stacks.infos()
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        Vec::new()
    }
}
