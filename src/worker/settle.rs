//! The delivery policy, in one place and free of I/O: given how a message
//! arrived, what it came to and how often it has been delivered, what
//! happens to it — answered (reply, outcome event, ack), retried later
//! (NAK with a delay), or set aside in the dead-letter stream. The code in
//! `mod.rs` only carries the answer out; the table test below is the whole
//! policy.

use std::time::Duration;

use crate::event::Status;

/// How a message arrived, and so what can be done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// From the JetStream consumer: acked, NAK'd or set aside.
    Stream,
    /// From a core subscription: cannot be redelivered.
    Core,
    /// From the service endpoint: the caller waits for the reply.
    Request,
    /// From the renewal schedule: tried again at a later check.
    Schedule,
}

/// What becomes of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Reply (when the message takes one), publish the outcome event, and
    /// acknowledge a stream message once the event is stored; if it cannot
    /// be stored, [`unpublished`] decides.
    Answer,
    /// NAK: redelivered after the delay.
    Retry(Duration),
    /// Store a dead-letter entry (with its 503 failure event), reply when
    /// the message takes one, and acknowledge a stream message; NAK it if
    /// the entry cannot be stored.
    SetAside,
}

/// The bounds the policy applies: the settings themselves
/// (`worker.max_deliver`, `worker.nak_delay_ms`, `worker.nak_max_delay_ms`).
pub(super) use crate::config::DeliverySettings as Policy;

impl Policy {
    /// The delay before delivery `delivered + 1`: doubled per delivery,
    /// capped.
    pub(super) fn nak_delay(&self, delivered: i64) -> Duration {
        let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
        self.nak_delay
            .saturating_mul(1u32 << doublings)
            .min(self.nak_max_delay)
    }

    /// Retried while deliveries remain, else set aside: nothing is
    /// redelivered forever.
    fn retry_or_set_aside(&self, delivered: i64) -> Action {
        if delivered < self.max_deliver {
            Action::Retry(self.nak_delay(delivered))
        } else {
            Action::SetAside
        }
    }
}

/// What happens to a handled message. A final status (200, 4xx) is an
/// answer. A 503 is not: a stream message is retried, and set aside at its
/// last delivery; a core message cannot be retried, so it is set aside at
/// once; a request's caller gets the 503 as its answer; the schedule
/// renews again at a later check.
pub(super) fn decide(kind: Kind, status: Status, delivered: i64, policy: &Policy) -> Action {
    match (kind, status) {
        (_, s) if s != Status::Unavailable => Action::Answer,
        (Kind::Request | Kind::Schedule, _) => Action::Answer,
        (Kind::Core, _) => Action::SetAside,
        (Kind::Stream, _) => policy.retry_or_set_aside(delivered),
    }
}

/// What follows a message's dead-letter entry: the answer (the ack of a
/// stream message, the reply of a core message or a request) once the
/// entry is stored; a stream message whose entry could not be stored is
/// not acknowledged, which would lose it, but retried after the delay,
/// whatever its deliveries (a core message or a request cannot be
/// retried: it is answered either way).
pub(super) fn after_dead_letter(
    kind: Kind,
    stored: bool,
    delivered: i64,
    policy: &Policy,
) -> Action {
    match (kind, stored) {
        (Kind::Stream, false) => Action::Retry(policy.nak_delay(delivered)),
        _ => Action::Answer,
    }
}

/// Whether a message is past its deliveries before it is handled: a stream
/// message delivered more than `max_deliver` times had earlier deliveries
/// that ended without an answer (the worker died handling it). It is
/// answered 503 without being handled, and so set aside ([`decide`]):
/// whatever killed the worker is not tried again.
pub(super) fn overdelivered(kind: Kind, delivered: i64, policy: &Policy) -> bool {
    kind == Kind::Stream && delivered > policy.max_deliver
}

/// A stream message was answered but its outcome event could not be
/// stored: it is delivered again (the store recognises the event, and the
/// event is published again), and set aside at its last delivery.
pub(super) fn unpublished(delivered: i64, policy: &Policy) -> Action {
    policy.retry_or_set_aside(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        max_deliver: 3,
        nak_delay: Duration::from_millis(100),
        nak_max_delay: Duration::from_millis(300),
    };

    #[test]
    fn every_kind_verdict_and_delivery_has_one_action() {
        use Action::{Answer, Retry, SetAside};
        use Kind::{Core, Request, Schedule, Stream};
        let ms = Duration::from_millis;
        let finals = [
            Status::Ok,
            Status::BadRequest,
            Status::Unauthorized,
            Status::NotFound,
            Status::Conflict,
            Status::Unprocessable,
        ];
        // (kind, 503?, delivery, action)
        let table = [
            (Stream, false, 1, Answer),
            (Stream, false, 3, Answer),
            (Stream, true, 1, Retry(ms(100))),
            (Stream, true, 2, Retry(ms(200))),
            (Stream, true, 3, SetAside),
            (Stream, true, 9, SetAside),
            (Core, false, 1, Answer),
            (Core, true, 1, SetAside),
            (Request, false, 1, Answer),
            (Request, true, 1, Answer),
            (Schedule, false, 1, Answer),
            (Schedule, true, 1, Answer),
        ];
        for (kind, unavailable, delivered, want) in table {
            let statuses: &[Status] = if unavailable {
                &[Status::Unavailable]
            } else {
                &finals
            };
            for &status in statuses {
                assert_eq!(
                    decide(kind, status, delivered, &POLICY),
                    want,
                    "{kind:?} {status:?} delivery {delivered}"
                );
            }
        }
    }

    #[test]
    fn an_outcome_that_cannot_be_stored_is_retried_then_set_aside() {
        assert_eq!(
            unpublished(1, &POLICY),
            Action::Retry(Duration::from_millis(100))
        );
        assert_eq!(
            unpublished(2, &POLICY),
            Action::Retry(Duration::from_millis(200))
        );
        assert_eq!(unpublished(3, &POLICY), Action::SetAside);
    }

    #[test]
    fn a_dead_letter_that_was_not_stored_leaves_a_stream_message_unacknowledged() {
        let ms = Duration::from_millis;
        assert_eq!(
            after_dead_letter(Kind::Stream, true, 3, &POLICY),
            Action::Answer
        );
        assert_eq!(
            after_dead_letter(Kind::Stream, false, 3, &POLICY),
            Action::Retry(ms(300))
        );
        assert_eq!(
            after_dead_letter(Kind::Stream, false, 9, &POLICY),
            Action::Retry(ms(300))
        );
        for kind in [Kind::Core, Kind::Request, Kind::Schedule] {
            for stored in [true, false] {
                assert_eq!(after_dead_letter(kind, stored, 1, &POLICY), Action::Answer);
            }
        }
    }

    #[test]
    fn a_stream_message_past_its_deliveries_is_not_handled_again() {
        assert!(!overdelivered(Kind::Stream, 3, &POLICY));
        assert!(overdelivered(Kind::Stream, 4, &POLICY));
        assert!(!overdelivered(Kind::Request, 9, &POLICY));
        assert!(!overdelivered(Kind::Core, 9, &POLICY));
        assert!(!overdelivered(Kind::Schedule, 9, &POLICY));
        // Answered 503 instead, it is set aside.
        assert_eq!(
            decide(Kind::Stream, Status::Unavailable, 4, &POLICY),
            Action::SetAside
        );
    }

    #[test]
    fn nak_delays_double_and_are_capped() {
        let delays: Vec<u128> = (0..6).map(|d| POLICY.nak_delay(d).as_millis()).collect();
        assert_eq!(delays, [100, 100, 200, 300, 300, 300]);
        assert_eq!(POLICY.nak_delay(i64::MAX), Duration::from_millis(300));
    }
}
