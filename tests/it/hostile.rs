//! Hostile input: a catalogue of malformed messages, sent on the event
//! subject and on the request subject. Each gets its exact status, the store
//! stays byte-for-byte the same, and valid events interleaved with them are
//! still applied.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

use crate::helpers::Backend;

/// The inbound stream's largest message (the worker's setting).
const INBOUND_MAX_MESSAGE: usize = 256 * 1024;
use crate::worker::{Fixture, body};

/// Headers of a hostile case: pairs sent as they are, in raw protocol when
/// a value holds bytes a well-behaved client refuses (CR, LF).
#[derive(Clone)]
struct Case {
    name: &'static str,
    headers: Vec<(String, String)>,
    payload: Bytes,
    status: u16,
    /// A whole header block, sent instead of one built from `headers`.
    raw_head: Option<Vec<u8>>,
}

fn case(
    name: &'static str,
    headers: Vec<(&str, String)>,
    payload: impl Into<Bytes>,
    status: u16,
) -> Case {
    Case {
        name,
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        payload: payload.into(),
        status,
        raw_head: None,
    }
}

fn raw(name: &'static str, head: &[u8], payload: impl Into<Bytes>, status: u16) -> Case {
    Case {
        raw_head: Some(head.to_vec()),
        ..case(name, vec![], payload, status)
    }
}

fn catalogue(key: &str, revoked: &str, mine: Uuid, theirs: Uuid) -> Vec<Case> {
    let auth = |v: &str| vec![("Authorization", v.to_owned())];
    let ok = || auth(&format!("Bearer {key}"));
    let valid = || body(json!({"integrationId": mine, "secretId": "s.hostile"}));
    let with = |v: serde_json::Value| body(v);
    let nested_objects = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    let nested_arrays = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let mut invalid_utf8 = br#"{"integrationId":""#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xfd]);
    invalid_utf8.extend_from_slice(br#"","secretId":"s"}"#);
    let mut trailing_nul =
        serde_json::to_vec(&json!({"integrationId": mine, "secretId": "s"})).unwrap();
    trailing_nul.push(0);
    let mut bom = "\u{feff}".as_bytes().to_vec();
    bom.extend_from_slice(&valid());
    vec![
        // 401: the credential.
        case("no headers", vec![], valid(), 401),
        case("empty Authorization", auth(""), valid(), 401),
        case("Bearer alone", auth("Bearer"), valid(), 401),
        case("Bearer and a space", auth("Bearer "), valid(), 401),
        case(
            "Basic scheme",
            auth("Basic dXNlcjpwYXNzd29yZA=="),
            valid(),
            401,
        ),
        case("Token scheme", auth(&format!("Token {key}")), valid(), 401),
        case("two spaces", auth(&format!("Bearer  {key}")), valid(), 401),
        case(
            "trailing words",
            auth(&format!("Bearer {key} extra")),
            valid(),
            401,
        ),
        case(
            "SQL in the key",
            auth("Bearer rwk_' OR '1'='1"),
            valid(),
            401,
        ),
        case(
            "path in the key",
            auth("Bearer ../../etc/passwd"),
            valid(),
            401,
        ),
        case("NUL in the key", auth("Bearer rwk_\0abc"), valid(), 401),
        // JetStream refuses to store a header block over 64 KiB at all.
        case(
            "60 KiB key",
            auth(&format!("Bearer {}", "a".repeat(60 * 1024))),
            valid(),
            401,
        ),
        case(
            "revoked key",
            auth(&format!("Bearer {revoked}")),
            valid(),
            401,
        ),
        case(
            "unknown key",
            auth("Bearer rwk_unknown0000000000000000000000000000000000"),
            valid(),
            401,
        ),
        case(
            "upper-case header name",
            vec![("AUTHORIZATION", format!("Bearer {key}"))],
            valid(),
            401,
        ),
        case(
            "two Authorization headers",
            vec![
                ("Authorization", "Bearer bogus".into()),
                ("Authorization", format!("Bearer {key}")),
            ],
            valid(),
            401,
        ),
        case(
            "CR/LF smuggles a second Authorization",
            auth(&format!("Bearer bogus\r\nAuthorization: Bearer {key}")),
            valid(),
            401,
        ),
        case(
            "bare CR in the value",
            auth(&format!("Bearer {key}\rX")),
            valid(),
            401,
        ),
        raw(
            "header block not UTF-8",
            b"NATS/1.0\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
            valid(),
            401,
        ),
        raw(
            "header line without a colon",
            b"NATS/1.0\r\nnot a header\r\n\r\n",
            valid(),
            401,
        ),
        raw(
            "header name with a space",
            b"NATS/1.0\r\nAuth orization: Bearer x\r\n\r\n",
            valid(),
            401,
        ),
        raw(
            "forged heartbeat status line",
            b"NATS/1.0 100 Idle Heartbeat\r\n\r\n",
            valid(),
            401,
        ),
        raw(
            "forged consumer-deleted status",
            b"NATS/1.0 409 Consumer Deleted\r\n\r\n",
            valid(),
            401,
        ),
        raw(
            "forged no-responders status",
            b"NATS/1.0 503\r\n\r\n",
            valid(),
            401,
        ),
        raw(
            "unparsable status",
            b"NATS/1.0 abc nonsense\r\n\r\n",
            valid(),
            401,
        ),
        // 400: the body.
        case(
            "binary garbage",
            ok(),
            vec![0xff, 0x00, 0x13, 0x37, 0xde, 0xad, 0xbe, 0xef],
            400,
        ),
        case("invalid UTF-8 in a string", ok(), invalid_utf8, 400),
        case(
            "truncated JSON",
            ok(),
            format!(r#"{{"integrationId":"{mine}","secretId":"s"#),
            400,
        ),
        case("10,000 nested objects", ok(), nested_objects, 400),
        case("10,000 nested arrays", ok(), nested_arrays, 400),
        case("1 MiB payload", ok(), vec![b' '; 1_000_000], 400),
        case("empty payload", ok(), Bytes::new(), 400),
        case("null", ok(), "null", 400),
        case("a string", ok(), r#""hello""#, 400),
        case("a number", ok(), "42", 400),
        case("byte-order mark", ok(), bom, 400),
        case("NUL after the object", ok(), trailing_nul, 400),
        case(
            "integrationId a number",
            ok(),
            with(json!({"integrationId": 7, "secretId": "s"})),
            400,
        ),
        case(
            "integrationId null",
            ok(),
            with(json!({"integrationId": null, "secretId": "s"})),
            400,
        ),
        case(
            "integrationId an object",
            ok(),
            with(json!({"integrationId": {"id": mine}, "secretId": "s"})),
            400,
        ),
        case(
            "SQL in integrationId",
            ok(),
            with(json!({"integrationId": "'; DROP TABLE integrations; --", "secretId": "s"})),
            400,
        ),
        case(
            "path in integrationId",
            ok(),
            with(json!({"integrationId": "../../../etc/passwd", "secretId": "s"})),
            400,
        ),
        case(
            "NUL in integrationId",
            ok(),
            with(json!({"integrationId": format!("{mine}\u{0}"), "secretId": "s"})),
            400,
        ),
        case(
            "braced integrationId",
            ok(),
            with(json!({"integrationId": format!("{{{mine}}}"), "secretId": "s"})),
            400,
        ),
        case(
            "secretId an array",
            ok(),
            with(json!({"integrationId": mine, "secretId": ["s"]})),
            400,
        ),
        case(
            "secretId an object",
            ok(),
            with(json!({"integrationId": mine, "secretId": {"v": "s"}})),
            400,
        ),
        case(
            "secretId a boolean",
            ok(),
            with(json!({"integrationId": mine, "secretId": true})),
            400,
        ),
        case(
            "secretId of no-break spaces",
            ok(),
            with(json!({"integrationId": mine, "secretId": "\u{a0}\u{2003}"})),
            400,
        ),
        case(
            "duplicate secretId",
            ok(),
            format!(r#"{{"integrationId":"{mine}","secretId":"a","secretId":"b"}}"#),
            400,
        ),
        case(
            "duplicate integrationId",
            ok(),
            format!(r#"{{"integrationId":"{mine}","integrationId":"{theirs}","secretId":"a"}}"#),
            400,
        ),
        case(
            "impossible rotatedAt",
            ok(),
            with(
                json!({"integrationId": mine, "secretId": "s", "rotatedAt": "2026-13-45T99:99:99Z"}),
            ),
            400,
        ),
        case(
            "SQL in rotatedAt",
            ok(),
            with(
                json!({"integrationId": mine, "secretId": "s", "rotatedAt": "now()); DELETE FROM integrations; --"}),
            ),
            400,
        ),
        case(
            "eventId a number",
            ok(),
            with(json!({"integrationId": mine, "secretId": "s", "eventId": 5})),
            400,
        ),
        case(
            "10 KiB eventId",
            ok(),
            with(json!({"integrationId": mine, "secretId": "s", "eventId": "e".repeat(10 * 1024)})),
            400,
        ),
        case(
            "300-byte Nats-Msg-Id",
            vec![
                ("Authorization", format!("Bearer {key}")),
                ("Nats-Msg-Id", "m".repeat(300)),
            ],
            valid(),
            400,
        ),
        case(
            "another roleId",
            ok(),
            with(json!({"integrationId": mine, "secretId": "s", "roleId": "admin"})),
            400,
        ),
        // 404: the integration.
        case(
            "unknown integration",
            ok(),
            with(json!({"integrationId": Uuid::new_v4(), "secretId": "s"})),
            404,
        ),
        case(
            "nil integration",
            ok(),
            with(json!({"integrationId": Uuid::nil(), "secretId": "s"})),
            404,
        ),
        case(
            "another owner's integration",
            ok(),
            with(json!({"integrationId": theirs, "secretId": "s"})),
            404,
        ),
        case(
            "SQL in eventId, unknown integration",
            ok(),
            with(
                json!({"integrationId": Uuid::new_v4(), "secretId": "s", "eventId": "' OR 1=1; --"}),
            ),
            404,
        ),
    ]
}

/// The NATS header block of a case, as raw protocol text.
fn header_block(headers: &[(String, String)]) -> Vec<u8> {
    let mut block = b"NATS/1.0\r\n".to_vec();
    for (k, v) in headers {
        block.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    block.extend_from_slice(b"\r\n");
    block
}

/// Publishes a message over a raw connection (HPUB), so that header values
/// can hold what no well-behaved client sends.
async fn raw_publish(url: &str, subject: &str, reply: Option<&str>, c: &Case) {
    let payload = &c.payload[..];
    let addr = url.trim_start_matches("nats://");
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    lines.next_line().await.expect("INFO");
    let hdr = c
        .raw_head
        .clone()
        .unwrap_or_else(|| header_block(&c.headers));
    let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
    let mut msg = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}}\r\nHPUB {subject}{reply} {} {}\r\n",
        hdr.len(),
        hdr.len() + payload.len()
    )
    .into_bytes();
    msg.extend_from_slice(&hdr);
    msg.extend_from_slice(payload);
    msg.extend_from_slice(b"\r\nPING\r\n");
    write.write_all(&msg).await.expect("write");
    // PONG: the server has read the message.
    loop {
        let line = lines.next_line().await.expect("read").expect("open");
        assert!(
            !line.starts_with("-ERR"),
            "server refused the message: {line}"
        );
        if line == "PONG" {
            break;
        }
    }
}

async fn setup(backend: Backend) -> (Fixture, Uuid, Vec<Case>) {
    let mut f = Fixture::on(backend).await;
    let mine = f.integration("acme", "s.initial").await;
    let theirs = f.integration("globex", "s.theirs").await;
    f.remember_secret("s.hostile");
    let cases = catalogue(&f.key, &f.revoked_key, mine.id, theirs.id);
    assert!(cases.len() >= 40, "a catalogue of at least 40");
    (f, mine.id, cases)
}

/// A valid rotation between hostile groups: still served.
async fn valid_event(f: &mut Fixture, id: Uuid, n: usize, request: bool) {
    let secret = format!("s.valid-between-{n}");
    f.remember_secret(&secret);
    let mut h = HeaderMap::new();
    h.insert("Authorization", format!("Bearer {}", f.key).as_str());
    let payload = body(json!({"integrationId": id, "secretId": secret}));
    if request {
        let reply = f.request(h, payload).await;
        assert_eq!(
            reply.header("Nats-Service-Error-Code"),
            None,
            "valid request {n}: {:?}",
            reply.body
        );
    } else {
        f.publish(h, payload).await;
    }
    assert_eq!(
        f.next_outcome().await.subject,
        "vault.approle.rotation.completed",
        "valid event {n}"
    );
    assert_eq!(f.secret(id).await, secret);
}

async fn hostile_events_get_their_status_and_change_nothing(backend: Backend) {
    let (mut f, mine, cases) = setup(backend).await;
    let worker = f.worker().await;
    for (group, chunk) in cases.chunks(5).enumerate() {
        valid_event(&mut f, mine, group, false).await;
        let before = f.env.dump().await;
        for c in chunk {
            if c.payload.len() > INBOUND_MAX_MESSAGE {
                // Over the inbound stream's largest message: JetStream
                // refuses it, and the publisher is told.
                let refused =
                    f.js.publish("vault.approle.rotated", c.payload.clone())
                        .await
                        .unwrap()
                        .await;
                let err = refused.expect_err(c.name).to_string();
                assert!(
                    err.contains("message size exceeds maximum"),
                    "{}: {err}",
                    c.name
                );
                continue;
            }
            raw_publish(&f.nats.url, "vault.approle.rotated", None, c).await;
            let seen = f.next_outcome().await;
            assert_eq!(seen.subject, "vault.approle.rotation.failed", "{}", c.name);
            assert_eq!(seen.body["status"], c.status, "{}: {:?}", c.name, seen.body);
        }
        assert_eq!(
            f.env.dump().await,
            before,
            "group {group} changed the store"
        );
    }
    valid_event(&mut f, mine, 99, false).await;
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

async fn hostile_requests_get_their_status_and_change_nothing(backend: Backend) {
    let (mut f, mine, cases) = setup(backend).await;
    let worker = f.worker().await;
    let mut replies = f.client.subscribe("_INBOX.hostile.>").await.unwrap();
    f.client.flush().await.unwrap();
    for (group, chunk) in cases.chunks(5).enumerate() {
        valid_event(&mut f, mine, group, true).await;
        let before = f.env.dump().await;
        for (i, c) in chunk.iter().enumerate() {
            let inbox = format!("_INBOX.hostile.{group}.{i}");
            raw_publish(&f.nats.url, "vault.approle.rotate", Some(&inbox), c).await;
            let reply = tokio::time::timeout(Duration::from_secs(20), replies.next())
                .await
                .unwrap_or_else(|_| panic!("no reply for {}", c.name))
                .unwrap();
            assert_eq!(reply.subject.as_str(), inbox);
            let code = reply
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Service-Error-Code"))
                .map(|v| v.as_str().to_owned());
            assert_eq!(code, Some(c.status.to_string()), "{}", c.name);
            let failure: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
            assert_eq!(failure["status"], c.status, "{}", c.name);
            f.outbound.extend_from_slice(&reply.payload);
            assert_eq!(
                f.next_outcome().await.body["status"],
                c.status,
                "{}: failure event",
                c.name
            );
        }
        assert_eq!(
            f.env.dump().await,
            before,
            "group {group} changed the store"
        );
    }
    valid_event(&mut f, mine, 99, true).await;
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

crate::on_both_stores!(
    hostile_events_get_their_status_and_change_nothing,
    hostile_requests_get_their_status_and_change_nothing,
);
