//! Stack detection over fixture trees modelled on real repository layouts.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use kennel_provisioner::stacks::{Detection, Stacks};

fn stacks() -> Stacks {
    let s = Stacks::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../stacks"));
    assert!(s.broken.is_empty(), "{:?}", s.broken);
    s
}

fn detect(files: &[&str]) -> Detection {
    let d = tempfile::tempdir().unwrap();
    for f in files {
        let p = d.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "x").unwrap();
    }
    stacks().detect(d.path())
}

#[test]
fn cargo_workspace() {
    let d = detect(&[
        "Cargo.toml",
        "Cargo.lock",
        "crates/core/Cargo.toml",
        "crates/core/src/lib.rs",
        "crates/cli/Cargo.toml",
        "crates/cli/src/main.rs",
        "target/debug/build/x/out/package.json",
        ".git/HEAD",
    ]);
    assert_eq!(d.stack, "rust");
    assert_eq!(d.evidence[0], "Cargo.toml");
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
}

#[test]
fn pnpm_monorepo() {
    let d = detect(&[
        "package.json",
        "pnpm-workspace.yaml",
        "pnpm-lock.yaml",
        "packages/web/package.json",
        "packages/web/src/index.tsx",
        "packages/api/package.json",
        "packages/api/src/server.ts",
        "node_modules/left-pad/package.json",
        "node_modules/native/Cargo.toml",
    ]);
    assert_eq!(d.stack, "node");
    assert!(d.evidence.contains(&"package.json".to_owned()));
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
}

#[test]
fn django_with_requirements() {
    let d = detect(&[
        "manage.py",
        "requirements.txt",
        "mysite/settings.py",
        "mysite/urls.py",
        "polls/views.py",
        "polls/templates/polls/index.html",
        "static/js/app.js",
    ]);
    assert_eq!(d.stack, "python");
    assert!(d.evidence.contains(&"requirements.txt".to_owned()));
}

#[test]
fn poetry_project() {
    let d = detect(&[
        "pyproject.toml",
        "poetry.lock",
        "src/pkg/__init__.py",
        "tests/test_pkg.py",
        ".venv/lib/x/setup.py",
    ]);
    assert_eq!(d.stack, "python");
    assert_eq!(d.evidence[0], "pyproject.toml");
}

#[test]
fn go_module_with_vendor() {
    let d = detect(&[
        "go.mod",
        "go.sum",
        "main.go",
        "internal/store/store.go",
        "vendor/modules.txt",
        "vendor/github.com/foo/bar/bar.go",
        "vendor/github.com/foo/ui/package.json",
    ]);
    assert_eq!(d.stack, "go");
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
}

#[test]
fn rails_app_with_a_js_bundle() {
    let d = detect(&[
        "Gemfile",
        "Gemfile.lock",
        "config.ru",
        "Rakefile",
        "app/models/user.rb",
        "app/controllers/users_controller.rb",
        "config/routes.rb",
        "package.json",
        "app/javascript/application.js",
    ]);
    assert_eq!(d.stack, "ruby");
    assert!(
        d.warnings.iter().any(|w| w.contains("also found node")),
        "{:?}",
        d.warnings
    );
}

#[test]
fn gradle_and_maven() {
    let g = detect(&[
        "build.gradle.kts",
        "settings.gradle.kts",
        "gradlew",
        "src/main/kotlin/App.kt",
        ".gradle/x/pom.xml",
    ]);
    assert_eq!(g.stack, "jvm");
    let m = detect(&[
        "pom.xml",
        "src/main/java/com/example/App.java",
        "target/classes/App.class",
    ]);
    assert_eq!(m.stack, "jvm");
    assert_eq!(m.evidence[0], "pom.xml");
}

#[test]
fn polyglot_rust_with_a_node_frontend() {
    let d = detect(&[
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "frontend/package.json",
        "frontend/package-lock.json",
        "frontend/src/App.tsx",
    ]);
    assert_eq!(d.stack, "rust");
    assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
    assert!(
        d.warnings[0].contains("also found node (frontend/package.json"),
        "{}",
        d.warnings[0]
    );
    assert!(
        d.summary().starts_with("rust (Cargo.toml"),
        "{}",
        d.summary()
    );
}

#[test]
fn empty_repo_is_base() {
    let d = detect(&[]);
    assert_eq!(d.stack, "base");
    assert!(d.evidence.is_empty());
    assert_eq!(d.summary(), "base (no stack markers found)");
}

#[test]
fn markers_only_under_ignored_dirs_are_base() {
    let d = detect(&[
        "node_modules/x/package.json",
        "target/release/Cargo.toml",
        "README.md",
    ]);
    assert_eq!(d.stack, "base", "{d:?}");
}

#[test]
fn a_phoenix_app_is_elixir_not_node() {
    // mix.exs at the top, JavaScript only under assets/.
    let d = detect(&[
        "mix.exs",
        "mix.lock",
        "lib/app.ex",
        "lib/app_web/router.ex",
        "assets/package.json",
        "assets/package-lock.json",
        "assets/js/app.js",
        "assets/js/socket.js",
        "assets/tailwind.config.js",
    ]);
    assert_eq!(d.stack, "base", "{d:?}");
    assert_eq!(d.evidence, ["mix.exs"]);
    assert!(
        d.warnings[0]
            .starts_with("Elixir project (mix.exs) — Kennel has no elixir stack; using base"),
        "{:?}",
        d.warnings
    );
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("node was found only deeper")),
        "{:?}",
        d.warnings
    );
}

#[test]
fn languages_without_a_stack_say_so() {
    for (file, lang) in [
        ("composer.json", "PHP"),
        ("App.csproj", ".NET"),
        ("stack.yaml", "Haskell"),
        ("build.zig", "Zig"),
    ] {
        let d = detect(&[file, "README.md"]);
        assert_eq!(d.stack, "base", "{file}: {d:?}");
        assert!(
            d.warnings[0].starts_with(&format!("{lang} project ({file})")),
            "{:?}",
            d.warnings
        );
    }
}

#[test]
fn a_top_level_manifest_beats_more_files_deeper_down() {
    // A Rust project with a large JavaScript docs site under docs/.
    let mut files = vec!["Cargo.toml", "src/main.rs"];
    let deep: Vec<String> = (0..30)
        .map(|i| format!("docs/site/src/page{i}.js"))
        .collect();
    files.extend([
        "docs/site/package.json",
        "docs/site/package-lock.json",
        "docs/site/tsconfig.json",
    ]);
    files.extend(deep.iter().map(String::as_str));
    let d = detect(&files);
    assert_eq!(d.stack, "rust", "{d:?}");
    assert_eq!(d.evidence[0], "Cargo.toml");
    // A stack's top-level marker beside one of a language without a stack:
    // the stack, with a word about the other.
    let d = detect(&["package.json", "composer.json", "index.js"]);
    assert_eq!(d.stack, "node", "{d:?}");
    assert!(
        d.warnings.iter().any(|w| w.contains("also a PHP project")),
        "{:?}",
        d.warnings
    );
}
