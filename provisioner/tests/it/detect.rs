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
        ".formatter.exs",
        "lib/app.ex",
        "lib/app_web/router.ex",
        "lib/app_web/components/layouts/root.html.heex",
        "test/app_test.exs",
        "assets/package.json",
        "assets/package-lock.json",
        "assets/js/app.js",
        "assets/js/socket.js",
        "assets/tailwind.config.js",
        "deps/phoenix/mix.exs",
        "_build/dev/lib/app/ebin/app.app",
    ]);
    assert_eq!(d.stack, "elixir", "{d:?}");
    assert_eq!(d.evidence[0], "mix.exs");
    assert!(
        d.warnings.iter().all(|w| !w.contains("using node")),
        "{:?}",
        d.warnings
    );
}

#[test]
fn an_erlang_rebar_project_is_elixir() {
    let d = detect(&["rebar.config", "src/app.erl", "src/app_sup.erl"]);
    assert_eq!(d.stack, "elixir", "{d:?}");
    assert_eq!(d.evidence[0], "rebar.config");
}

#[test]
fn a_laravel_app_with_a_node_front_end_is_php() {
    // composer.json and package.json both at the top (Vite for assets).
    let d = detect(&[
        "artisan",
        "composer.json",
        "composer.lock",
        "package.json",
        "package-lock.json",
        "vite.config.js",
        "phpunit.xml",
        "app/Http/Controllers/Controller.php",
        "app/Models/User.php",
        "routes/web.php",
        "config/app.php",
        "resources/js/app.js",
        "resources/js/bootstrap.js",
        "vendor/laravel/framework/composer.json",
    ]);
    assert_eq!(d.stack, "php", "{d:?}");
    assert_eq!(d.evidence[0], "composer.json");
    assert!(
        d.warnings
            .iter()
            .any(|w| w.starts_with("also found node (package.json")),
        "{:?}",
        d.warnings
    );
}

#[test]
fn a_symfony_app_is_php() {
    let d = detect(&[
        "composer.json",
        "symfony.lock",
        "src/Kernel.php",
        "public/index.php",
    ]);
    assert_eq!(d.stack, "php", "{d:?}");
}

#[test]
fn a_dotnet_solution_is_base_and_says_why() {
    let d = detect(&[
        "App.sln",
        "global.json",
        "src/App/App.csproj",
        "src/App/Program.cs",
        "src/App/wwwroot/package.json",
        "src/App/wwwroot/js/site.js",
    ]);
    assert_eq!(d.stack, "base", "{d:?}");
    assert!(
        d.warnings[0].starts_with(
            ".NET project (App.sln) — Kennel has no dotnet stack; using base. Debian has no .NET SDK"
        ),
        "{:?}",
        d.warnings
    );
}

#[test]
fn languages_without_a_stack_say_so() {
    for (file, lang) in [
        ("App.csproj", ".NET"),
        ("stack.yaml", "Haskell"),
        ("build.zig", "Zig"),
        ("deno.json", "Deno"),
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
    let d = detect(&["package.json", "build.zig", "index.js"]);
    assert_eq!(d.stack, "node", "{d:?}");
    assert!(
        d.warnings.iter().any(|w| w.contains("also a Zig project")),
        "{:?}",
        d.warnings
    );
}

#[test]
fn the_docs_list_every_stack_with_its_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let docs = std::fs::read_to_string(root.join("docs/stacks.md")).unwrap();
    let s = stacks();
    for st in &s.stacks {
        assert!(
            docs.contains(&format!("### {}\n", st.name())),
            "docs/stacks.md lacks {}",
            st.name()
        );
        for r in &st.file.detect.rules {
            assert!(
                docs.contains(&format!("| `{}` | {} |", r.glob, r.weight)),
                "docs/stacks.md lacks {}'s rule {}",
                st.name(),
                r.glob
            );
        }
    }
    for l in &s.unsupported {
        assert!(
            docs.contains(&format!("| {} |", l.name)),
            "docs/stacks.md lacks {}",
            l.name
        );
    }
}
