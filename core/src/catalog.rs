//! What projects can be built from: stacks and templates, as the executor
//! sees them. The `kennel-provisioner` crate loads them from `stacks/` and
//! `templates/`; a stack or template whose file has an error is listed as
//! broken, with the reason, rather than hidden.

use serde::Serialize;

/// A stack as listed by `stacks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StackInfo {
    pub name: String,
    pub summary: String,
    pub app_port: u16,
    /// Why the stack file could not be loaded (file and line), if it could not.
    pub broken: Option<String>,
}

/// A template as listed by `templates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateInfo {
    pub name: String,
    pub description: String,
    pub stack: String,
    pub broken: Option<String>,
}

/// The stacks and templates available.
pub trait Catalog: Send + Sync {
    /// Every stack, broken ones included.
    fn stacks(&self) -> Vec<StackInfo>;
    /// Every template, broken ones included.
    fn templates(&self) -> Vec<TemplateInfo>;
}

/// A fixed catalog (tests, and hosts where nothing is installed).
#[derive(Debug, Clone, Default)]
pub struct StaticCatalog {
    pub stacks: Vec<StackInfo>,
    pub templates: Vec<TemplateInfo>,
}

impl Catalog for StaticCatalog {
    fn stacks(&self) -> Vec<StackInfo> {
        self.stacks.clone()
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        self.templates.clone()
    }
}
