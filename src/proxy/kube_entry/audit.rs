//! The audit record of a Kubernetes request through the root: one per request, on the audit
//! stream beside the dials' ([`crate::proxy::audit::TARGET`]), written when its answer has
//! been sent whole (or its upgraded connection has ended), with the bytes each way.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::request_info::RequestInfo;
use crate::admin::metrics::{Labels, label};
use crate::protocol::ClusterName;
use crate::proxy::access::Who;
use crate::proxy::audit::TARGET;

/// A request under way, recorded once when dropped (its answer's body is sent or abandoned).
pub struct KubeAudit {
    /// Who asked; `None` until authenticated (a refused stranger is recorded too).
    pub who: Option<Who>,
    /// The client's address.
    pub from: SocketAddr,
    /// The leaf asked for.
    pub leaf: Option<ClusterName>,
    /// What it asked.
    pub info: RequestInfo,
    /// How it ended; set once the answer is known.
    outcome: Mutex<Outcome>,
    /// `tether_proxy_kube_requests_total`, counted with the record.
    counted: Family<Labels, Counter>,
    started: Instant,
    up: AtomicU64,
    down: AtomicU64,
}

/// How a request ended.
#[derive(Default)]
struct Outcome {
    /// `ok` (the leaf answered, whatever its status), or why the root refused or failed.
    decision: &'static str,
    /// The refusal's message.
    reason: String,
    /// The HTTP status sent back.
    status: u16,
}

impl KubeAudit {
    pub fn start(from: SocketAddr, info: RequestInfo, counted: Family<Labels, Counter>) -> Self {
        Self {
            counted,
            who: None,
            from,
            leaf: None,
            info,
            // Until it ends otherwise: the client went away while the root was still deciding.
            outcome: Mutex::new(Outcome {
                decision: "abandoned",
                ..Outcome::default()
            }),
            started: Instant::now(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    /// Notes how the request ended: `decision` `ok` for the leaf's answer, or why not.
    pub fn ended(&self, decision: &'static str, status: u16, reason: &str) {
        let mut outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        *outcome = Outcome {
            decision,
            reason: reason.to_owned(),
            status,
        };
    }

    /// Counts bytes carried after an upgrade.
    pub fn carried(&self, (up, down): (u64, u64)) {
        self.up.fetch_add(up, Ordering::Relaxed);
        self.down.fetch_add(down, Ordering::Relaxed);
    }
}

impl Drop for KubeAudit {
    fn drop(&mut self) {
        let who = self.who.as_ref();
        let outcome = std::mem::take(self.outcome.get_mut().unwrap_or_else(|p| p.into_inner()));
        self.counted
            .get_or_create(&label("decision", outcome.decision))
            .inc();
        tracing::info!(
            target: TARGET,
            who = who.map_or("", |w| w.user.as_str()),
            groups = ?who.map(|w| &w.groups[..]).unwrap_or_default(),
            via = "kube",
            from = %self.from,
            leaf = self.leaf.as_ref().map_or("", |l| l.as_str()),
            verb = self.info.verb,
            resource = self.info.resource,
            subresource = self.info.subresource,
            namespace = self.info.namespace,
            name = self.info.name,
            decision = outcome.decision,
            reason = outcome.reason,
            status = outcome.status,
            bytes_up = self.up.load(Ordering::Relaxed),
            bytes_down = self.down.load(Ordering::Relaxed),
            duration_ms = self.started.elapsed().as_millis() as u64,
            "kube"
        );
    }
}

/// Which way a [`Counted`] body goes.
#[derive(Clone, Copy)]
pub enum Direction {
    Up,
    Down,
}

/// A body whose data bytes count toward its request's record; the record goes with the last
/// of them to be dropped.
pub struct Counted<B> {
    inner: B,
    audit: Arc<KubeAudit>,
    direction: Direction,
}

impl<B> Counted<B> {
    pub fn new(inner: B, audit: Arc<KubeAudit>, direction: Direction) -> Self {
        Self {
            inner,
            audit,
            direction,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let counter = match self.direction {
                Direction::Up => &self.audit.up,
                Direction::Down => &self.audit.down,
            };
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
