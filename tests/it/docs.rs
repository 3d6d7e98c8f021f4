//! The documentation: README.md and docs/*.md link only to files that
//! exist, and the README stays short (the detail lives under docs/).

use std::path::PathBuf;

use crate::helpers::repo_root;

/// README.md and every Markdown file under docs/.
fn documents() -> Vec<PathBuf> {
    let root = repo_root();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("an entry of docs/").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    assert!(!docs.is_empty(), "docs/ holds no Markdown file");
    docs.sort();
    docs.insert(0, root.join("README.md"));
    docs
}

/// The targets of a document's Markdown links, `[text](target)`, outside
/// fenced code blocks; a title after the target is left out.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            targets.push(target.trim_matches(['<', '>']).to_owned());
            rest = &rest[end..];
        }
    }
    targets
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = repo_root();
    let mut broken = Vec::new();
    for file in documents() {
        let text = std::fs::read_to_string(&file).expect("a document");
        let dir = file.parent().expect("the document's directory");
        let shown = file.strip_prefix(root).unwrap_or(&file).display();
        for target in link_targets(&text) {
            if ["http://", "https://", "mailto:", "#"]
                .iter()
                .any(|scheme| target.starts_with(scheme))
            {
                continue;
            }
            let path = target.split('#').next().unwrap_or_default();
            if path.is_empty() || !dir.join(path).exists() {
                broken.push(format!("{shown}: ({target})"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to files that do not exist:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_readme_stays_short() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let lines = readme.lines().count();
    assert!(
        lines <= 400,
        "README.md has {lines} lines, more than 400: move the detail into docs/"
    );
}
