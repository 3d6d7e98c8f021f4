//! W3C trace context carried across NATS: an inbound `traceparent` is
//! continued (same trace id, a new span id) on every event and reply the
//! message causes; a message without one starts a new trace.

use std::fmt::Write;

/// A parsed `traceparent`: version 00, trace id, parent span id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id.
    pub trace_id: [u8; 16],
    /// 8-byte span id.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl TraceParent {
    /// Parses a `traceparent` header; `None` for anything invalid, which
    /// the W3C spec says to treat as absent.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id = hex_to::<16>(trace).filter(|t| t.iter().any(|&b| b != 0))?;
        let span_id = hex_to::<8>(span).filter(|s| s.iter().any(|&b| b != 0))?;
        let [flags] = hex_to::<1>(flags)?;
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new root: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        let mut trace_id = [0u8; 16];
        crate::crypto::fill_random(&mut trace_id);
        Self {
            trace_id,
            span_id: new_span_id(),
            flags: 1,
        }
    }

    /// The same trace with a new span id: the context to send onwards.
    pub fn child(&self) -> Self {
        Self {
            span_id: new_span_id(),
            ..*self
        }
    }

    /// The trace id in hex.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Continues `inbound` when it is valid, else starts a new trace.
    pub fn continue_from(inbound: Option<&str>) -> Self {
        inbound
            .and_then(Self::parse)
            .map(|t| t.child())
            .unwrap_or_else(Self::new_root)
    }
}

fn new_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0; 8] {
        crate::crypto::fill_random(&mut id);
    }
    id
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_continues_and_rejects() {
        let inbound = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(inbound).expect("valid");
        assert_eq!(parsed.to_string(), inbound);
        let child = TraceParent::continue_from(Some(inbound));
        assert_eq!(child.trace_id, parsed.trace_id);
        assert_ne!(child.span_id, parsed.span_id);
        assert_eq!(child.flags, 1);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        assert_ne!(
            TraceParent::continue_from(Some("junk")).trace_id,
            parsed.trace_id
        );
    }
}
