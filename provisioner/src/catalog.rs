//! The executor's catalog of stacks and templates, read from their folders.

use kennel_core::catalog::{Catalog, StackInfo, TemplateInfo};

use crate::stacks::Stacks;
use crate::templates::Templates;

/// Stacks and templates loaded from their folders.
#[derive(Debug, Clone)]
pub struct DirCatalog {
    pub stacks: Stacks,
    pub templates: Templates,
}

impl Catalog for DirCatalog {
    fn stacks(&self) -> Vec<StackInfo> {
        self.stacks.infos()
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        self.templates.infos()
    }
}
