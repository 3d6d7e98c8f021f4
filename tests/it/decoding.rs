//! Property tests of decoding: arbitrary input never panics and always maps
//! to a 4xx; valid events round-trip.

use bytes::Bytes;
use proptest::prelude::*;
use rotation_worker::auth::{ApiKey, AuthError};
use rotation_worker::event::{Decoded, Envelope, Status, decode_body};
use serde_json::{Value, json};
use uuid::Uuid;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("integrationId".to_owned()),
                    Just("secretId".to_owned()),
                    Just("eventId".to_owned()),
                    Just("rotatedAt".to_owned()),
                    Just("roleId".to_owned()),
                    ".{0,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_a_bad_request_or_an_event(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        match decode_body(&bytes) {
            Ok(_) => {}
            Err(failure) => prop_assert_eq!(failure.status, Status::BadRequest),
        }
    }

    #[test]
    fn arbitrary_json_is_a_bad_request_or_an_event(value in json_value()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        if let Err(failure) = decode_body(&bytes) {
            prop_assert_eq!(failure.status, Status::BadRequest);
        }
    }

    #[test]
    fn arbitrary_envelopes_decode_without_panicking(
        authorization in proptest::option::of(".{0,80}"),
        msg_id in proptest::option::of(".{0,300}"),
        traceparent in proptest::option::of(".{0,60}"),
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let decoded = Decoded::new(Envelope {
            authorization,
            msg_id,
            traceparent,
            tracestate: None,
            payload: Bytes::from(payload),
            fallback_id: Some("js:S:1:1".into()),
            received_at: None,
            operation: Default::default(),
        });
        let _ = decoded.integration_id();
        let _ = decoded.dedupe_id();
        if let Err(failure) = &decoded.body {
            prop_assert_eq!(failure.status, Status::BadRequest);
        }
        if let Err(e) = &decoded.key {
            prop_assert!(matches!(e, AuthError::Missing | AuthError::Malformed));
        }
    }

    #[test]
    fn authorization_headers_never_panic(header in ".{0,600}") {
        let _ = ApiKey::from_authorization(Some(&header));
    }

    #[test]
    fn valid_events_round_trip(
        id in any::<u128>(),
        secret in "[!-~]{1,200}",
        event_id in proptest::option::of("[a-zA-Z0-9:._-]{1,64}"),
        seconds in proptest::option::of(0i64..4_102_444_800),
        micros in 0u32..1_000_000,
        role_id in proptest::option::of("[a-z0-9-]{1,40}"),
    ) {
        let integration_id = Uuid::from_u128(id);
        let rotated_at = seconds.map(|s| {
            time::OffsetDateTime::from_unix_timestamp(s).unwrap() + time::Duration::microseconds(micros.into())
        });
        let mut body = json!({"integrationId": integration_id, "secretId": secret});
        if let Some(e) = &event_id {
            body["eventId"] = json!(e);
        }
        if let Some(t) = rotated_at {
            body["rotatedAt"] = json!(t.format(&time::format_description::well_known::Rfc3339).unwrap());
        }
        if let Some(r) = &role_id {
            body["roleId"] = json!(r);
        }
        let event = decode_body(&serde_json::to_vec(&body).unwrap()).expect("a valid event decodes");
        prop_assert_eq!(event.target.id(), Some(integration_id));
        prop_assert_eq!(event.secret.plain().map(|s| s.expose()), Some(secret.as_str()));
        prop_assert_eq!(event.event_id, event_id);
        prop_assert_eq!(event.rotated_at, rotated_at);
        prop_assert_eq!(event.role_id, role_id);
    }
}
