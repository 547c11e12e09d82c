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
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::upload::UploadBody;

/// The most of an answer one connection reads ahead of its client (and
/// the largest response head it accepts).
pub(crate) const READ_BUFFER: usize = 8 * 1024;

/// A request body on its way upstream: none, or the client's, streamed.
/// It is read when the connection is driven, which is always from the
/// request's own task (see [`Conn`]): the HTTP server notices a broken
/// body (a malformed chunk) while it runs that task, and disconnects right
/// after; read there, the fault is answered (400) in the same turn.
pub(crate) enum OutBody {
    Empty,
    Upload(UploadBody),
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = actix_web::error::PayloadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            OutBody::Empty => Poll::Ready(None),
            OutBody::Upload(body) => Pin::new(body)
                .poll_next(cx)
                .map(|chunk| chunk.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, OutBody::Empty)
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Empty => SizeHint::with_exact(0),
            OutBody::Upload(_) => SizeHint::default(),
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

/// A connection taken from the pool for one exchange, driven by the task
/// that uses it: sending the request, reading the answer and reading the
/// client's body all happen in the request's own task, with no task of the
/// connection's own to wake and hand results over (one task switch and
/// its channels less per request). Dropped rather than put back (its
/// answer not read to the end, an error), it is closed at once.
pub(crate) struct Conn {
    tx: Sender,
    io: Pin<Box<http1::Connection<TokioIo<TcpStream>, OutBody>>>,
    /// Whether it served an exchange before (a failure on it before any
    /// answer may mean the upstream had closed it while idle).
    pub(crate) reused: bool,
    /// Set once the connection has ended.
    ended: bool,
    authority: Rc<str>,
    _open: Open,
}

impl Conn {
    /// Lets the connection read and write what it can; ready once it has
    /// ended (closed by either side, or failed).
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.ended {
            return Poll::Ready(());
        }
        match self.io.as_mut().poll(cx) {
            Poll::Ready(result) => {
                if let Err(e) = result {
                    log::debug!("upstream connection ended: {e}");
                }
                self.ended = true;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Sends `req` on this connection; the answer's head, or hyper's error.
    pub(crate) async fn send(
        &mut self,
        req: http::Request<OutBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        let answer = self.tx.send_request(req);
        tokio::pin!(answer);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if self.drive(cx).is_ready() {
                // Ended: the answer resolves (to an error) now.
                return answer.as_mut().poll(cx);
            }
            Poll::Pending
        })
        .await
    }

    /// Whether the connection takes a request now (driving it once).
    fn ready_now(&mut self) -> bool {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let _ = self.drive(&mut cx);
        !self.ended && matches!(self.tx.poll_ready(&mut cx), Poll::Ready(Ok(())))
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
                if let Some(conn) = self.take_idle(authority) {
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

    /// The most recently idle connection to `authority` still usable (one
    /// the upstream closed while idle is noticed here, driven once).
    fn take_idle(&self, authority: &str) -> Option<Conn> {
        loop {
            let idle = self.idle.borrow_mut().get_mut(authority)?.pop()?;
            if idle.since.elapsed() >= self.idle_timeout {
                continue; // dropped: its connection closes
            }
            let mut conn = idle.conn;
            if !conn.ready_now() {
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
        Ok(Conn {
            tx,
            io: Box::pin(conn),
            reused: false,
            ended: false,
            authority: self.key(authority),
            _open: permit,
        })
    }

    /// A connection whose exchange ended cleanly, for the next request.
    pub(crate) fn put_back(&self, conn: Conn) {
        if conn.ended || conn.tx.is_closed() {
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
