//! Data safety on the message path: the clock bound, reused event ids,
//! suppression by a shared duplicate window, late deliveries, invalid ids,
//! unpublishable outcomes, bounded streams, owner-first locking.
