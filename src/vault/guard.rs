//! Bulkheads between tenants' Vaults: at most a few calls to one address at
//! once, and a circuit breaker per address, so that a Vault that hangs or
//! fails holds up only its own integrations, and a flood of calls to it is
//! answered 503 at once instead of waiting out every timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The state kept per Vault address.
#[derive(Debug)]
struct Address {
    calls: Arc<Semaphore>,
    /// Transient failures in a row.
    failures: u32,
    /// While set and in the future, calls are refused.
    open_until: Option<Instant>,
}

/// Limits per Vault address, shared by every call the worker makes.
#[derive(Debug)]
pub(super) struct Guard {
    per_address: usize,
    failures_to_open: u32,
    cooldown: Duration,
    addresses: Mutex<HashMap<String, Address>>,
}

/// Addresses remembered before idle ones are forgotten.
const REMEMBERED: usize = 4096;

/// Why a call was not let through.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Shut {
    /// The address's breaker is open.
    Open,
    /// No room at the address before the deadline.
    Busy,
}

/// The right to make one call to an address; reports how it went.
#[derive(Debug)]
pub(super) struct Pass<'a> {
    guard: &'a Guard,
    address: String,
    _permit: OwnedSemaphorePermit,
}

impl Guard {
    pub(super) fn new(per_address: usize, failures_to_open: u32, cooldown: Duration) -> Self {
        Self {
            per_address: per_address.max(1),
            failures_to_open: failures_to_open.max(1),
            cooldown,
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// Waits (until `deadline` at most) for room to call `address`; refused
    /// at once while its breaker is open.
    pub(super) async fn enter(
        &self,
        address: &str,
        deadline: std::time::Instant,
    ) -> Result<Pass<'_>, Shut> {
        let calls = {
            let mut addresses = self.lock();
            if addresses.len() >= REMEMBERED {
                // Forget addresses with no call running and a closed breaker.
                addresses.retain(|_, a| {
                    a.open_until.is_some()
                        || a.failures > 0
                        || a.calls.available_permits() < self.per_address
                });
            }
            let state = addresses
                .entry(address.to_owned())
                .or_insert_with(|| Address {
                    calls: Arc::new(Semaphore::new(self.per_address)),
                    failures: 0,
                    open_until: None,
                });
            if state.open_until.is_some_and(|until| Instant::now() < until) {
                return Err(Shut::Open);
            }
            state.calls.clone()
        };
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(wait, calls.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Pass {
                guard: self,
                address: address.to_owned(),
                _permit: permit,
            }),
            _ => Err(Shut::Busy),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Address>> {
        // The map holds counters only: a panic elsewhere cannot leave it
        // in a state worth refusing to read.
        self.addresses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Pass<'_> {
    /// The call reached Vault and got an answer that is not a transient
    /// failure: the address's failures are forgotten.
    pub(super) fn succeeded(self) {
        if let Some(state) = self.guard.lock().get_mut(&self.address) {
            state.failures = 0;
            state.open_until = None;
        }
    }

    /// The call failed transiently: one more in a row; enough of them open
    /// the breaker for the cooldown (a call let through after it that fails
    /// opens it again at once).
    pub(super) fn failed(self) {
        let (open, failures) = {
            let mut addresses = self.guard.lock();
            let Some(state) = addresses.get_mut(&self.address) else {
                return;
            };
            state.failures = state.failures.saturating_add(1);
            let open = state.failures >= self.guard.failures_to_open;
            if open {
                state.open_until = Some(Instant::now() + self.guard.cooldown);
            }
            (open, state.failures)
        };
        if open {
            tracing::warn!(
                address = %self.address,
                failures,
                cooldown_ms = self.guard.cooldown.as_millis() as u64,
                "Vault circuit breaker open: calls to this address are answered 503"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> std::time::Instant {
        std::time::Instant::now() + Duration::from_secs(1)
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_the_breaker_until_the_cooldown_ends() {
        let guard = Guard::new(2, 3, Duration::from_millis(200));
        for _ in 0..2 {
            guard.enter("a", later()).await.unwrap().failed();
        }
        // A success in between starts the count again.
        guard.enter("a", later()).await.unwrap().succeeded();
        for _ in 0..3 {
            guard.enter("a", later()).await.unwrap().failed();
        }
        assert_eq!(guard.enter("a", later()).await.unwrap_err(), Shut::Open);
        // Another address is not affected.
        guard.enter("b", later()).await.unwrap().succeeded();
        tokio::time::advance(Duration::from_millis(150)).await;
        assert_eq!(guard.enter("a", later()).await.unwrap_err(), Shut::Open);
        tokio::time::advance(Duration::from_millis(100)).await;
        // After the cooldown one call goes through; it fails: open again.
        guard.enter("a", later()).await.unwrap().failed();
        assert_eq!(guard.enter("a", later()).await.unwrap_err(), Shut::Open);
    }

    #[tokio::test]
    async fn calls_to_one_address_are_bounded() {
        let guard = Guard::new(2, 5, Duration::from_secs(1));
        let one = guard.enter("a", later()).await.unwrap();
        let _two = guard.enter("a", later()).await.unwrap();
        let soon = std::time::Instant::now() + Duration::from_millis(50);
        assert_eq!(guard.enter("a", soon).await.unwrap_err(), Shut::Busy);
        let _other = guard.enter("b", soon).await.unwrap();
        drop(one);
        assert!(guard.enter("a", soon).await.is_ok());
    }
}
