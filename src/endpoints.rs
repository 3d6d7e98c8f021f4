//! The worker's subjects in one table: what arrives on each (and whether as
//! an event or as a request to which service endpoint), what the worker
//! does with it, and the span names of both directions.
//!
//! An operation used to be spelled out in five places (the subject
//! constants, the service's endpoints, the span of each request, the span
//! names, the docs), which had to be kept in step by hand. Now the sources
//! add one endpoint per request row and the spans read their names here;
//! the integration tests compare the table with `docs/contract.md`, the
//! README's contract table and `config/nats.conf`. To add an operation, add
//! a row to [`INBOUND`] (see `docs/design.md`).

use crate::event::{
    Operation, SUBJECT_COMPLETED, SUBJECT_FAILED, SUBJECT_RENEW, SUBJECT_ROLLBACK, SUBJECT_ROTATE,
    SUBJECT_ROTATED, SUBJECT_STATUS,
};

/// How messages arrive on a subject.
///
/// A subject is one or the other: a subject both captured by the inbound
/// stream and served by an endpoint would deliver each message twice. An
/// operation that is both announced and asked for is two rows (a rotation:
/// `vault.approle.rotated` and `vault.approle.rotate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Announced: taken from the inbound stream, or the core queue
    /// subscription with `worker.ingest = "core"`.
    Event,
    /// Asked for: a request to the service endpoint of this name, in the
    /// service's queue group.
    Request {
        /// The endpoint's name in the micro protocol.
        endpoint: &'static str,
    },
}

/// What the worker does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Changes the integration: the message goes through its
    /// integration's lane, in order with the others, as this operation.
    Change(Operation),
    /// Reads the integration's status: answered beside the lanes (a few
    /// at once), as it changes nothing and publishes no event.
    Status,
}

/// A subject the worker takes messages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    /// The subject.
    pub subject: &'static str,
    /// An event or a request, and to which endpoint.
    pub kind: Kind,
    /// What is done with it.
    pub action: Action,
    /// The `otel.name` of its CONSUMER span, `process <subject>`: written
    /// out, so that no message formats it.
    pub process_span: &'static str,
}

impl Inbound {
    /// The service endpoint's name, for a request.
    pub const fn endpoint(&self) -> Option<&'static str> {
        match self.kind {
            Kind::Event => None,
            Kind::Request { endpoint } => Some(endpoint),
        }
    }
}

/// Every subject the worker takes messages from; the service's endpoints
/// are added in this order.
pub const INBOUND: [Inbound; 5] = [
    Inbound {
        subject: SUBJECT_ROTATED,
        kind: Kind::Event,
        action: Action::Change(Operation::Rotate),
        process_span: "process vault.approle.rotated",
    },
    Inbound {
        subject: SUBJECT_ROTATE,
        kind: Kind::Request { endpoint: "rotate" },
        action: Action::Change(Operation::Rotate),
        process_span: "process vault.approle.rotate",
    },
    Inbound {
        subject: SUBJECT_ROLLBACK,
        kind: Kind::Request {
            endpoint: "rollback",
        },
        action: Action::Change(Operation::Rollback),
        process_span: "process vault.approle.rollback",
    },
    Inbound {
        subject: SUBJECT_RENEW,
        kind: Kind::Request { endpoint: "renew" },
        action: Action::Change(Operation::Renew),
        process_span: "process vault.approle.renew",
    },
    Inbound {
        subject: SUBJECT_STATUS,
        kind: Kind::Request { endpoint: "status" },
        action: Action::Status,
        process_span: "process vault.approle.status",
    },
];

/// A subject the worker publishes outcome events on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    /// The subject.
    pub subject: &'static str,
    /// The `otel.name` of its PRODUCER span, `send <subject>`.
    pub send_span: &'static str,
}

/// The outcome events' subjects: a success, a failure.
pub const OUTBOUND: [Outbound; 2] = [
    Outbound {
        subject: SUBJECT_COMPLETED,
        send_span: "send vault.approle.rotation.completed",
    },
    Outbound {
        subject: SUBJECT_FAILED,
        send_span: "send vault.approle.rotation.failed",
    },
];

/// The span name of `operation` (`process` or `send`) on one of the
/// table's subjects; `None` for any other.
pub fn span_name(operation: &str, subject: &str) -> Option<&'static str> {
    match operation {
        "process" => INBOUND
            .iter()
            .find(|row| row.subject == subject)
            .map(|row| row.process_span),
        "send" => OUTBOUND
            .iter()
            .find(|row| row.subject == subject)
            .map(|row| row.send_span),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn span_names_are_the_operation_and_the_subject() {
        for row in INBOUND {
            assert_eq!(row.process_span, format!("process {}", row.subject));
            assert_eq!(span_name("process", row.subject), Some(row.process_span));
        }
        for row in OUTBOUND {
            assert_eq!(row.send_span, format!("send {}", row.subject));
            assert_eq!(span_name("send", row.subject), Some(row.send_span));
        }
        assert_eq!(span_name("process", "rotation-worker.dlq"), None);
        assert_eq!(span_name("send", SUBJECT_ROTATE), None);
    }

    /// The event source is the inbound stream (or the core subscription)
    /// on `vault.approle.rotated` alone, and takes rotations only; a status
    /// read is answered by an endpoint.
    #[test]
    fn the_one_event_is_a_rotation_and_a_read_is_a_request() {
        let events: Vec<_> = INBOUND.iter().filter(|r| r.kind == Kind::Event).collect();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].subject, SUBJECT_ROTATED);
        assert_eq!(events[0].action, Action::Change(Operation::Rotate));
        for row in INBOUND.iter().filter(|r| r.action == Action::Status) {
            assert!(row.endpoint().is_some(), "{}", row.subject);
        }
    }

    #[test]
    fn subjects_and_endpoint_names_are_unique() {
        let subjects: HashSet<_> = INBOUND
            .iter()
            .map(|row| row.subject)
            .chain(OUTBOUND.iter().map(|row| row.subject))
            .collect();
        assert_eq!(subjects.len(), INBOUND.len() + OUTBOUND.len());
        let endpoints: Vec<_> = INBOUND.iter().filter_map(Inbound::endpoint).collect();
        let unique: HashSet<_> = endpoints.iter().collect();
        assert_eq!(unique.len(), endpoints.len());
    }
}
