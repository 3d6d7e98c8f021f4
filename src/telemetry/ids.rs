//! Trace context without spans to export.
//!
//! When no OTLP endpoint is set, nothing reads a span's attributes, events
//! or links, yet the W3C context must still continue across NATS (every
//! outcome event and reply carries a `traceparent` of the inbound trace)
//! and JSON lines still start with their span's ids. The OpenTelemetry
//! layer would build a whole span per message for that, only to drop it
//! when it closes: attributes, log lines as span events, links, half the
//! worker's CPU per message with the text log line. [`IdsLayer`] gives
//! each of the worker's spans only its [`SpanContext`]: the trace id, flags
//! and state of its parent (or of the remote parent set with
//! [`set_parent`]), and a span id of its own.

use std::cell::RefCell;

use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator};
use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::Context as LayerContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

/// The context of one span, kept in its extensions.
struct Ids(SpanContext);

thread_local! {
    /// The trace and span ids of the spans entered on this thread,
    /// innermost last: what a log line written now belongs to.
    static ENTERED: RefCell<Vec<(TraceId, SpanId)>> = const { RefCell::new(Vec::new()) };
}

/// Gives each span it sees a [`SpanContext`] and, for the JSON lines
/// that show them (`entered`), tracks the entered ones.
pub(super) struct IdsLayer {
    pub(super) entered: bool,
}

impl<S> Layer<S> for IdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let parent = match attrs.parent() {
            Some(parent) => ctx.span(parent),
            None if attrs.is_contextual() => ctx.lookup_current(),
            None => None,
        };
        let child = {
            let extensions = parent.as_ref().map(|p| p.extensions());
            child_of(
                extensions
                    .as_ref()
                    .and_then(|e| e.get::<Ids>())
                    .map(|i| &i.0),
            )
        };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Ids(child));
        }
    }

    fn on_enter(&self, id: &Id, ctx: LayerContext<'_, S>) {
        if !self.entered {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        if let Some(Ids(cx)) = span.extensions().get::<Ids>() {
            ENTERED.with(|e| e.borrow_mut().push((cx.trace_id(), cx.span_id())));
        }
    }

    fn on_exit(&self, id: &Id, ctx: LayerContext<'_, S>) {
        if !self.entered {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        if span.extensions().get::<Ids>().is_some() {
            ENTERED.with(|e| e.borrow_mut().pop());
        }
    }
}

/// A new span's context: its parent's trace, flags and state, or a new
/// sampled trace, and a span id of its own.
fn child_of(parent: Option<&SpanContext>) -> SpanContext {
    let ids = RandomIdGenerator::default();
    let (trace_id, flags, state) = match parent {
        Some(p) if p.is_valid() => (p.trace_id(), p.trace_flags(), p.trace_state().clone()),
        _ => (ids.new_trace_id(), TraceFlags::SAMPLED, TraceState::NONE),
    };
    SpanContext::new(trace_id, ids.new_span_id(), flags, false, state)
}

/// Runs `f` on the [`Ids`] of `span`, when the [`IdsLayer`] gave it some.
fn with_ids<T>(span: &tracing::Span, f: impl FnOnce(&mut Ids) -> T) -> Option<T> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span(id)?;
        let mut extensions = data.extensions_mut();
        extensions.get_mut::<Ids>().map(f)
    })
    .flatten()
}

/// Continues `parent`'s trace in `span` (which has no children yet):
/// its trace id, flags and state. An invalid parent changes nothing.
pub(super) fn set_parent(span: &tracing::Span, parent: &Context) -> bool {
    let remote = parent.span().span_context().clone();
    with_ids(span, |ids| {
        if remote.is_valid() {
            ids.0 = SpanContext::new(
                remote.trace_id(),
                ids.0.span_id(),
                remote.trace_flags(),
                false,
                remote.trace_state().clone(),
            );
        }
    })
    .is_some()
}

/// The context the [`IdsLayer`] gave `span`, if it did.
pub(super) fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    with_ids(span, |ids| ids.0.clone())
}

/// The trace and span ids of the innermost span entered on this thread,
/// as the [`IdsLayer`] tracks them.
pub(super) fn entered() -> Option<(TraceId, SpanId)> {
    ENTERED.with(|e| e.borrow().last().copied())
}
