//! The command line itself, through the real binary: what `run --help`
//! tells an operator, the one size rule for secrets read from stdin, and
//! the prompt that does not echo a secret typed at a terminal.

use rotation_worker::config::Settings;
use rotation_worker::domain::{MAX_SECRET_ID_BYTES, SecretId};
use rotation_worker::event::decode_body;
use secrecy::ExposeSecret;

use crate::helpers::{Backend, TestEnv, create_with_stdin, known_variable, secret_of};

/// `run --help` names where the worker connects and every way to set it:
/// the variables, the file, the pattern; the defaults it quotes are those
/// of `config/default.toml`, and every variable it names is one the worker
/// reads.
#[tokio::test]
async fn run_help_says_where_it_connects_and_which_variables_apply() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotation-worker"))
        .args(["run", "--help"])
        .env_remove("ROTATION_WORKER_CONFIG")
        .output()
        .await
        .expect("run --help");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();

    for needle in [
        "NATS_URL",
        "DATABASE_URL",
        "ROTATION_WORKER_CONFIG",
        "--config",
        "ROTATION_WORKER_<SECTION>__<KEY>",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(help.contains(needle), "run --help lacks {needle}:\n{help}");
    }
    let defaults = Settings::load_with_env(None, Vec::new()).unwrap();
    for (setting, value) in [
        ("nats.url", defaults.nats.url.expose_secret().to_owned()),
        (
            "database.sqlite_path",
            defaults.database.sqlite_path.display().to_string(),
        ),
        (
            "telemetry.http_addr",
            defaults.telemetry.http_addr.unwrap().to_string(),
        ),
    ] {
        assert!(
            help.contains(&value),
            "run --help does not quote {setting} = {value:?}:\n{help}"
        );
    }
    // Every variable it names (patterns with <...> aside) is one the
    // worker reads.
    let variables = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '<'))
        .filter(|w| !w.contains('<'))
        .filter(|w| {
            ["ROTATION_WORKER_", "OTEL_", "RUST_"]
                .iter()
                .any(|p| w.starts_with(p))
                || w.ends_with("_URL")
        });
    let mut seen = 0;
    for name in variables {
        assert!(
            known_variable(name),
            "run --help names {name}, which nothing reads"
        );
        seen += 1;
    }
    assert!(seen >= 6, "{help}");
}

/// A secret_id on stdin has one limit, the domain's, and one message, the
/// one an event gets: at the limit it is stored (with or without a line
/// ending); one byte over, or far over, it is refused the same way and
/// nothing is created.
#[tokio::test]
async fn a_long_secret_id_has_one_limit_and_one_message() {
    let env = TestEnv::on(Backend::Sqlite);
    let message = SecretId::too_long().to_string();
    assert_eq!(message, "secretId must be at most 4096 bytes");
    let over = "x".repeat(MAX_SECRET_ID_BYTES + 1);
    let wire = decode_body(
        format!(
            r#"{{"integrationId":"{}","secretId":"{over}"}}"#,
            uuid::Uuid::nil()
        )
        .as_bytes(),
    )
    .expect_err("an event with it is refused");
    assert_eq!(wire.message, message, "the wire says the same");

    let at = "x".repeat(MAX_SECRET_ID_BYTES);
    for (name, stdin) in [
        ("bare", at.clone()),
        ("lf", format!("{at}\n")),
        ("crlf", format!("{at}\r\n")),
    ] {
        let out = create_with_stdin(&env, "acme", name, &stdin).await;
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
    }
    let listed = env.cli(&["integration", "list"], "").await.json();
    assert_eq!(listed.as_array().unwrap().len(), 3);

    for (len, ending) in [
        (MAX_SECRET_ID_BYTES + 1, ""),
        (MAX_SECRET_ID_BYTES + 1, "\n"),
        (MAX_SECRET_ID_BYTES + 1, "\r\n"),
        (MAX_SECRET_ID_BYTES + 2, ""),
        (MAX_SECRET_ID_BYTES + 3, ""),
        (5000, "\n"),
        (20_000, ""),
    ] {
        let stdin = format!("{}{ending}", "y".repeat(len));
        let out = create_with_stdin(&env, "acme", "over", &stdin).await;
        out.assert_fails_with(&message);
        let last = out.stderr.lines().last().unwrap_or_default();
        assert_eq!(last, format!("error: {message}"), "{len} bytes{ending:?}");
    }
    assert_eq!(
        env.cli(&["integration", "list"], "").await.json(),
        listed,
        "a refused secret created nothing"
    );

    // An API key on stdin: past its own limit, the same message as any
    // other text that is not a key.
    for key in ["not a key".to_owned(), format!("rwk_{}", "k".repeat(2000))] {
        env.cli(&["api-key", "revoke"], &key)
            .await
            .assert_fails_with("stdin does not hold an API key");
    }
}

/// A secret_id typed at a terminal is not echoed. The CLI runs on a
/// pseudo-terminal of the test's own, made its controlling terminal as a
/// shell's would be; the test types the secret once the terminal no longer
/// echoes (and fails if that never happens), then nothing the terminal
/// showed holds it, and the integration does.
#[tokio::test]
async fn a_secret_id_typed_at_a_terminal_is_not_echoed() {
    use std::io::{Read, Write};

    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    use rustix::termios::{LocalModes, tcgetattr};

    const TYPED: &str = "s.typed-at-a-terminal";
    let env = TestEnv::on(Backend::Sqlite);
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("a pseudo-terminal");
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ptsname(&master, Vec::new()).unwrap().to_str().unwrap())
        .unwrap();
    let mut command = env.command_of("setsid");
    command
        // --ctty: the terminal on stdin becomes the controlling one, the
        // /dev/tty the prompt is read from.
        .args(["--ctty", "--wait", env!("CARGO_BIN_EXE_rotation-worker")])
        .args([
            "integration",
            "create",
            "--owner",
            "acme",
            "--name",
            "typed",
            "--address",
            "https://vault.example.com:8200",
            "--role-id",
            "role-1",
        ])
        .stdin(terminal)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = command.spawn().expect("spawn setsid");
    // Only the child holds the terminal now: its exit ends the screen.
    drop(command);

    let mut screen = std::fs::File::from(master.try_clone().unwrap());
    let shown = tokio::task::spawn_blocking(move || {
        let mut shown = Vec::new();
        // Reading ends with an error (EIO) once the terminal is closed.
        let _ = screen.read_to_end(&mut shown);
        String::from_utf8_lossy(&shown).into_owned()
    });
    let echo_off = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while tcgetattr(&master)
            .unwrap()
            .local_modes
            .contains(LocalModes::ECHO)
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    std::fs::File::from(master.try_clone().unwrap())
        .write_all(format!("{TYPED}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    drop(master);
    let shown = shown.await.unwrap();
    assert!(
        echo_off.is_ok(),
        "the terminal still echoes while the CLI waits for the secret: {shown:?}"
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shown.contains("Enter the AppRole secret_id"), "{shown:?}");
    assert!(!shown.contains(TYPED), "the secret was echoed: {shown:?}");
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = uuid::Uuid::parse_str(record["id"].as_str().unwrap()).unwrap();
    assert_eq!(secret_of(&env.store().await, id).await, TYPED);
}
