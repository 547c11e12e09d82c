//! One worker's HTTP/1.1 connections to the URLs of one pool, on hyper's
//! connection-level client with a pool of our own.
//!
//! Why not a ready-made pooled client: the gateway needs three things of
//! its upstream connections that the usual pools hide. Reads are paced by
//! the client (hyper's read buffer is capped at [`READ_BUFFER`], and the
//! connection reads only when the response body is asked for more), so a
//! client that stops reading holds at most that much here. A connection
//! goes back to the pool the moment its answer has been read, which for a
//! buffered answer is before the client has it. And a retry after a dead
//! pooled connection must be able to ask for a fresh one.
//!
//! Everything here lives on one worker thread (actix workers are
//! single-threaded runtimes): connections are driven by local tasks, the
//! pool is a `RefCell`, and `max_connections` is a local semaphore.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::upload::UploadBody;

/// The most of an answer one connection reads ahead of its client (and
/// the largest response head it accepts).
pub(crate) const READ_BUFFER: usize = 8 * 1024;

/// A request body on its way upstream: none, or the client's, handed over
/// chunk by chunk by [`pump`] running in the request's own task.
///
/// Why not let the connection's task read the client's body itself: the
/// HTTP server notices a broken body (a malformed chunk) while it runs the
/// request's task, and disconnects right after that task's turn. Read from
/// the request's task, the fault is seen in that same turn and answered
/// (400), instead of the client losing its connection without a word.
pub(crate) enum OutBody {
    Empty,
    Pumped {
        rx: tokio::sync::mpsc::Receiver<Bytes>,
        /// Set by the pump when the client's body ended: a channel closed
        /// without it is a body cut short, never a complete one.
        done: Rc<Cell<bool>>,
    },
}

impl OutBody {
    /// A pumped body and the pump that feeds it from `upload`.
    pub(crate) fn pumped(upload: UploadBody) -> (OutBody, impl std::future::Future<Output = bool>) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let done = Rc::new(Cell::new(false));
        (
            OutBody::Pumped {
                rx,
                done: done.clone(),
            },
            pump(upload, tx, done),
        )
    }
}

/// Moves the client's body to the connection, a chunk at a time (the
/// channel holds one: the client is read no faster than the upstream
/// takes it). False when the client's body failed (see [`Upload::fault`]).
///
/// [`Upload::fault`]: crate::upload::Upload::fault
async fn pump(
    mut upload: UploadBody,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    done: Rc<Cell<bool>>,
) -> bool {
    use futures_util::StreamExt;
    while let Some(chunk) = upload.next().await {
        match chunk {
            Ok(b) => {
                if tx.send(b).await.is_err() {
                    return true; // the connection is gone: nothing to feed
                }
            }
            Err(_) => return false,
        }
    }
    done.set(true);
    true
}

/// The client's body ended before its end (or the request gave up on it).
#[derive(Debug)]
pub(crate) struct CutShort;

impl std::fmt::Display for CutShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body was cut short")
    }
}

impl std::error::Error for CutShort {}

impl Body for OutBody {
    type Data = Bytes;
    type Error = CutShort;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            OutBody::Empty => Poll::Ready(None),
            OutBody::Pumped { rx, done } => match rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Poll::Ready(None) if done.get() => Poll::Ready(None),
                Poll::Ready(None) => Poll::Ready(Some(Err(CutShort))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, OutBody::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Empty => SizeHint::with_exact(0),
            OutBody::Pumped { .. } => SizeHint::default(),
        }
    }
}

type Sender = http1::SendRequest<OutBody>;

/// One open connection counted against `max_connections` until its task
/// ends; a waiter for a connection is woken then.
struct Open(Rc<Cell<usize>>, Rc<Notify>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
        self.1.notify_one();
    }
}

/// A connection taken from the pool for one exchange. Dropped rather than
/// put back (its answer not read to the end, an error), it is closed at
/// once: nothing else could use it, and an upstream that keeps sending
/// must not keep it open.
pub(crate) struct Conn {
    tx: Sender,
    /// Whether it served an exchange before (a failure on it before any
    /// answer may mean the upstream had closed it while idle).
    pub(crate) reused: bool,
    authority: Rc<str>,
    task: tokio::task::AbortHandle,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Why no connection could be had.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// Refused, unreachable, or no handshake within `connect_timeout`.
    Failed(String),
    /// None free (the pool is at `max_connections`) and none made within
    /// the request's time.
    Timeout,
}

/// One worker's connections to one pool.
pub(crate) struct Connections {
    idle: RefCell<HashMap<Rc<str>, Vec<Idle>>>,
    /// Connections open now, at most `max` (`upstream.max_connections`).
    open: Rc<Cell<usize>>,
    max: usize,
    /// Woken when a connection is put back or closes.
    freed: Rc<Notify>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    builder: http1::Builder,
}

impl Connections {
    pub(crate) fn new(
        max_connections: usize,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Connections {
        let mut builder = http1::Builder::new();
        builder.read_buf_exact_size(Some(READ_BUFFER));
        Connections {
            idle: RefCell::new(HashMap::new()),
            open: Rc::new(Cell::new(0)),
            max: max_connections.max(1),
            freed: Rc::new(Notify::new()),
            connect_timeout,
            idle_timeout,
            builder,
        }
    }

    /// A connection to `authority` by `deadline`: an idle one (unless
    /// `fresh`), else a new one while the pool has room, else the first one
    /// put back or made room for.
    pub(crate) async fn checkout(
        &self,
        authority: &str,
        fresh: bool,
        deadline: Instant,
    ) -> Result<Conn, ConnectError> {
        loop {
            if !fresh {
                if let Some(conn) = self.take_idle(authority).await {
                    return Ok(conn);
                }
            }
            if let Some(permit) = self.room() {
                return self.connect(authority, permit, deadline).await;
            }
            // Full: an idle connection to another URL makes room.
            self.close_one_idle();
            let wait = self.freed.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if let Some(permit) = self.room() {
                return self.connect(authority, permit, deadline).await;
            }
            if tokio::time::timeout_at(deadline.into(), wait)
                .await
                .is_err()
            {
                return Err(ConnectError::Timeout);
            }
        }
    }

    /// The most recently idle connection to `authority` still usable.
    async fn take_idle(&self, authority: &str) -> Option<Conn> {
        loop {
            let idle = self.idle.borrow_mut().get_mut(authority)?.pop()?;
            if idle.conn.tx.is_closed() || idle.since.elapsed() >= self.idle_timeout {
                continue; // dropped: its connection closes
            }
            let mut conn = idle.conn;
            // Ready at once unless the connection is closing.
            if conn.tx.ready().await.is_err() {
                continue;
            }
            conn.reused = true;
            return Some(conn);
        }
    }

    fn key(&self, authority: &str) -> Rc<str> {
        self.idle
            .borrow()
            .get_key_value(authority)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Rc::from(authority))
    }

    /// Room for one more connection, taken until the guard drops.
    fn room(&self) -> Option<Open> {
        let n = self.open.get();
        if n >= self.max {
            return None;
        }
        self.open.set(n + 1);
        Some(Open(self.open.clone(), self.freed.clone()))
    }

    fn close_one_idle(&self) {
        let mut idle = self.idle.borrow_mut();
        if let Some(list) = idle.values_mut().find(|l| !l.is_empty()) {
            list.remove(0);
        }
    }

    async fn connect(
        &self,
        authority: &str,
        permit: Open,
        deadline: Instant,
    ) -> Result<Conn, ConnectError> {
        let limit = self
            .connect_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let made = tokio::time::timeout(limit, async {
            let stream = TcpStream::connect(authority).await?;
            let _ = stream.set_nodelay(true);
            self.builder
                .handshake::<_, OutBody>(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)
        })
        .await;
        let (tx, conn) = match made {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => return Err(ConnectError::Failed(e.to_string())),
            Err(_) if Instant::now() >= deadline => return Err(ConnectError::Timeout),
            Err(_) => {
                return Err(ConnectError::Failed(format!(
                    "no connection within {limit:?}"
                )))
            }
        };
        let task = actix_web::rt::spawn(async move {
            let _open = permit;
            if let Err(e) = conn.await {
                log::debug!("upstream connection ended: {e}");
            }
        });
        Ok(Conn {
            tx,
            reused: false,
            authority: self.key(authority),
            task: task.abort_handle(),
        })
    }

    /// A connection whose exchange ended cleanly, for the next request.
    pub(crate) fn put_back(&self, conn: Conn) {
        if conn.tx.is_closed() {
            return;
        }
        self.idle
            .borrow_mut()
            .entry(conn.authority.clone())
            .or_default()
            .push(Idle {
                conn,
                since: Instant::now(),
            });
        self.freed.notify_one();
    }
}

impl Conn {
    /// Sends `req` on this connection; the answer's head, or hyper's error.
    pub(crate) async fn send(
        &mut self,
        req: http::Request<OutBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        self.tx.send_request(req).await
    }
}
