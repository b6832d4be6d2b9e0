//! Project templates: `templates/<name>/template.toml` plus a `files/` tree.
//! Like stacks, a broken template is listed with file and line, and the
//! others still load.

use std::path::{Path, PathBuf};

use kennel_core::catalog::TemplateInfo;
use serde::Deserialize;

use crate::stacks::{data_files, line_of, StackFileError};

/// A template file as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    pub name: String,
    pub description: String,
    pub stack: String,
    /// Run once in /workspace as `dev` when the VM is ready.
    #[serde(default)]
    pub post_create: Option<String>,
}

/// A loaded template.
#[derive(Debug, Clone)]
pub struct Template {
    pub file: TemplateFile,
    /// The tree copied into a new project.
    pub files: PathBuf,
}

/// Every template in a directory.
#[derive(Debug, Clone, Default)]
pub struct Templates {
    pub templates: Vec<Template>,
    pub broken: Vec<(String, StackFileError)>,
}

impl Templates {
    /// Loads `<dir>/<name>/template.toml` for every folder.
    pub fn load(dir: &Path) -> Self {
        let mut out = Self::default();
        for f in data_files(dir, "template.toml").unwrap_or_default() {
            let err = |line: usize, message: String| StackFileError {
                path: f.path.display().to_string(),
                line,
                message,
            };
            let text = match f.text {
                Ok(t) => t,
                Err(e) => {
                    out.broken.push((f.name, e));
                    continue;
                }
            };
            let name = f.name;
            match toml::from_str::<TemplateFile>(&text) {
                Ok(file) if file.name == name => out.templates.push(Template {
                    file,
                    files: f.folder.join("files"),
                }),
                Ok(file) => out.broken.push((
                    name.clone(),
                    err(
                        1,
                        format!(
                            "name is {:?} but the folder is {name:?}; they must match",
                            file.name
                        ),
                    ),
                )),
                Err(e) => {
                    let line = e.span().map_or(1, |s| line_of(&text, s.start));
                    out.broken.push((name, err(line, e.message().to_owned())));
                }
            }
        }
        out
    }

    /// A template by name.
    pub fn get(&self, name: &str) -> Option<&Template> {
        self.templates.iter().find(|t| t.file.name == name)
    }

    /// The catalog view, broken ones included.
    pub fn infos(&self) -> Vec<TemplateInfo> {
        let mut v: Vec<TemplateInfo> = self
            .templates
            .iter()
            .map(|t| TemplateInfo {
                name: t.file.name.clone(),
                description: t.file.description.clone(),
                stack: t.file.stack.clone(),
                broken: None,
            })
            .collect();
        v.extend(self.broken.iter().map(|(n, e)| TemplateInfo {
            name: n.clone(),
            description: String::new(),
            stack: String::new(),
            broken: Some(e.to_string()),
        }));
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_templates_load() {
        let t = Templates::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates"));
        assert!(t.broken.is_empty(), "{:?}", t.broken);
        for n in ["blank", "rust-cli", "node-web", "python-web"] {
            let tpl = t.get(n).unwrap();
            assert!(tpl.files.is_dir(), "{n} has files");
        }
        assert_eq!(t.get("rust-cli").unwrap().file.stack, "rust");
    }
}
