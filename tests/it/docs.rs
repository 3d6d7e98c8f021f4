//! The documentation: README.md and docs/*.md link only to files that
//! exist, the README stays short (the detail lives under docs/), and the
//! contract (docs/contract.md, the README's table) and `config/nats.conf`
//! name exactly the subjects and endpoints of the worker's table.

use std::collections::BTreeSet;
use std::path::PathBuf;

use rotation_worker::endpoints::{INBOUND, Inbound, Kind, OUTBOUND};

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

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).expect(path)
}

/// The lines of the Markdown section that starts with the heading `title`
/// (exactly), up to the next heading of its level or above.
fn section<'a>(text: &'a str, title: &str) -> Vec<&'a str> {
    let level = title.chars().take_while(|c| *c == '#').count();
    let mut lines = text.lines().skip_while(|line| line.trim_end() != title);
    let mut found: Vec<&str> = lines.next().into_iter().collect();
    assert!(!found.is_empty(), "no heading {title:?}");
    found.extend(lines.take_while(|line| {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        !(hashes > 0 && hashes <= level && line[hashes..].starts_with(' '))
    }));
    found
}

/// The `code` spans of a line, in order.
fn code_spans(line: &str) -> Vec<&str> {
    line.split('`').skip(1).step_by(2).collect()
}

/// What the contract calls a row's kind: `event` or `request`.
fn kind_word(row: &Inbound) -> &'static str {
    match row.kind {
        Kind::Event => "event",
        Kind::Request { .. } => "request",
    }
}

fn inbound() -> BTreeSet<String> {
    INBOUND.iter().map(|row| row.subject.to_owned()).collect()
}

fn outbound() -> BTreeSet<String> {
    OUTBOUND.iter().map(|row| row.subject.to_owned()).collect()
}

#[test]
fn the_contract_names_the_subjects_and_endpoints_of_the_table() {
    let contract = read("docs/contract.md");

    // The headings of the contract's inbound sections, such as
    // "### Status: `vault.approle.status` (request)", name every inbound
    // subject with its kind, and no other.
    let mut headed = BTreeSet::new();
    for line in section(&contract, "## The contract") {
        let Some(heading) = line.strip_prefix("### ") else {
            continue;
        };
        let parts: Vec<&str> = heading.split('`').collect();
        for pair in parts.windows(2).skip(1).step_by(2) {
            let kind = pair[1].trim_start().strip_prefix('(');
            if let Some(kind) = kind.and_then(|k| k.split(')').next()) {
                headed.insert(format!("{} ({kind})", pair[0]));
            }
        }
    }
    let expected: BTreeSet<String> = INBOUND
        .iter()
        .map(|row| format!("{} ({})", row.subject, kind_word(row)))
        .collect();
    assert_eq!(headed, expected, "docs/contract.md: the inbound headings");

    // The request-reply delivery lists the endpoints: "`rotate` on
    // `vault.approle.rotate`, ...".
    let delivery = section(&contract, "### Delivery");
    let bullet: String = delivery
        .iter()
        .skip_while(|line| !line.starts_with("- **Request-reply**"))
        .enumerate()
        .take_while(|(i, line)| *i == 0 || line.starts_with("  "))
        .map(|(_, line)| format!("{line} "))
        .collect();
    assert!(
        !bullet.is_empty(),
        "docs/contract.md: no Request-reply bullet"
    );
    let parts: Vec<&str> = bullet.split('`').collect();
    let listed: BTreeSet<String> = parts
        .windows(3)
        .skip(1)
        .step_by(2)
        .filter(|pair| pair[1].trim() == "on")
        .map(|pair| format!("{} on {}", pair[0], pair[2]))
        .collect();
    let expected: BTreeSet<String> = INBOUND
        .iter()
        .filter_map(|row| Some(format!("{} on {}", row.endpoint()?, row.subject)))
        .collect();
    assert_eq!(
        listed, expected,
        "docs/contract.md: the service's endpoints"
    );

    // The outbound section names the outcome subjects, and no other of
    // the worker's.
    let named: BTreeSet<String> = section(&contract, "### Outbound")
        .iter()
        .flat_map(|line| code_spans(line))
        .filter(|span| span.starts_with("vault."))
        .map(str::to_owned)
        .collect();
    assert_eq!(named, outbound(), "docs/contract.md: the outbound subjects");
}

#[test]
fn the_readmes_contract_table_has_a_row_per_subject_of_the_table() {
    let readme = read("README.md");
    let (mut seen_in, mut seen_out) = (BTreeSet::new(), BTreeSet::new());
    for line in section(&readme, "## The contract") {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, subject, kind, ..] = cells[..] else {
            continue;
        };
        let Some(subject) = subject.strip_prefix('`').and_then(|s| s.strip_suffix('`')) else {
            continue;
        };
        if kind.contains("outbound") {
            seen_out.insert(subject.to_owned());
            continue;
        }
        let Some(row) = INBOUND.iter().find(|row| row.subject == subject) else {
            assert!(
                !(kind.starts_with("event") || kind.starts_with("request")),
                "README.md: `{subject}` is not in the worker's table"
            );
            continue;
        };
        assert!(
            kind.starts_with(kind_word(row)),
            "README.md: {subject}: {kind}"
        );
        if let Some(endpoint) = row.endpoint() {
            let named = format!("endpoint `{endpoint}`");
            assert!(kind.contains(&named), "README.md: {subject}: {kind}");
        }
        seen_in.insert(subject.to_owned());
    }
    assert_eq!(seen_in, inbound(), "README.md: the inbound rows");
    assert_eq!(seen_out, outbound(), "README.md: the outbound rows");
}

/// Each user of a nats-server configuration and the subjects its
/// permissions allow it to publish and to subscribe to.
#[derive(Debug, Default)]
struct User {
    name: String,
    publish: Vec<String>,
    subscribe: Vec<String>,
}

/// Reads the users of `config/nats.conf`: follows the nesting of its
/// blocks (`permissions: { publish: { allow: [ ... ] } }`) and collects the
/// quoted subjects of each user's `allow` lists.
fn nats_users(conf: &str) -> Vec<User> {
    let mut users: Vec<User> = Vec::new();
    let mut nesting: Vec<String> = Vec::new();
    for line in conf.lines() {
        if let Some(name) = line.trim().strip_prefix("user:") {
            users.push(User {
                name: name.trim().trim_matches('"').to_owned(),
                ..User::default()
            });
        }
        let (mut word, mut key) = (String::new(), String::new());
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c.is_ascii_alphanumeric() || c == '_' {
                word.push(c);
                continue;
            }
            if !word.is_empty() {
                key = std::mem::take(&mut word);
            }
            match c {
                '#' => break,
                '{' | '[' => nesting.push(std::mem::take(&mut key)),
                '}' | ']' => {
                    nesting.pop();
                }
                '"' => {
                    let quoted: String = chars.by_ref().take_while(|c| *c != '"').collect();
                    let path: Vec<&str> = nesting.iter().map(String::as_str).collect();
                    let Some(user) = users.last_mut() else {
                        continue;
                    };
                    match path[..] {
                        [.., "publish", "allow"] => user.publish.push(quoted),
                        [.., "subscribe", "allow"] => user.subscribe.push(quoted),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }
    assert!(nesting.is_empty(), "config/nats.conf: unbalanced blocks");
    users
}

/// Whether a NATS subject pattern (`*` a token, `>` the rest) covers
/// `subject`.
fn covers(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for part in pattern.split('.') {
        match (part, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (part, Some(token)) if part == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[test]
fn nats_conf_lets_the_table_s_subjects_through() {
    let users = nats_users(&read("config/nats.conf"));
    let worker = users
        .iter()
        .find(|user| user.name == "worker")
        .expect("config/nats.conf: the worker's user");
    for row in INBOUND {
        let senders: Vec<&str> = users
            .iter()
            .filter(|user| user.publish.iter().any(|p| covers(p, row.subject)))
            .map(|user| user.name.as_str())
            .collect();
        assert!(
            senders.iter().any(|name| *name != "worker"),
            "config/nats.conf: no user may publish {}",
            row.subject
        );
        assert!(
            worker.subscribe.iter().any(|p| covers(p, row.subject)),
            "config/nats.conf: the worker may not subscribe to {}",
            row.subject
        );
    }
    for row in OUTBOUND {
        assert!(
            worker.publish.iter().any(|p| covers(p, row.subject)),
            "config/nats.conf: the worker may not publish {}",
            row.subject
        );
    }
    // And the worker subscribes to none of the worker's subjects the table
    // has not.
    let extra: Vec<&String> = worker
        .subscribe
        .iter()
        .filter(|p| p.starts_with("vault.") && !inbound().contains(p.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "config/nats.conf: {extra:?} not in the table"
    );
}
