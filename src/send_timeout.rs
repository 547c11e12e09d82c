//! `server.send_timeout`: a client that takes no response bytes for that
//! long is disconnected, and with it goes the upstream connection its
//! response was streaming from.
//!
//! The gateway buffers at most `server.response_buffer` bytes of a response
//! per connection and stops reading from the upstream until the client
//! takes them, so a client that stops reading leaves its response waiting
//! in the kernel's socket buffers, with its receive window closed. The
//! timeout is the kernel's `TCP_USER_TIMEOUT` on each accepted connection:
//! data unacknowledged, or held back by a closed window, for that long
//! aborts the connection (Linux 5.11 and later count the closed window).
//! The HTTP server then drops the response, which closes its upstream
//! connection. It costs nothing per request and needs no timer of ours.
//! (An HTTP/2 stream whose client keeps the connection alive but never
//! opens the stream's window is the response body's watch's, in
//! `proxy::watch`.)
//! Separate from `server` because it is one socket option with its reasons.

use std::any::Any;
use std::time::Duration;

use actix_web::dev::Extensions;

/// The callback for `HttpServer::on_connect` that arms the timeout on each
/// TCP connection, plain or under TLS, and turns Nagle's algorithm off on
/// it: a response head and its first body bytes go out as separate writes,
/// and Nagle would hold the second back until the first is acknowledged.
pub(crate) fn on_connect(
    timeout: Duration,
) -> impl Fn(&dyn Any, &mut Extensions) + Send + Sync + 'static {
    move |conn, _| {
        if let Some(tcp) = tcp_of(conn) {
            let _ = tcp.set_nodelay(true);
            arm(tcp, timeout);
        } else {
            log::warn!("a client connection of an unknown kind: server.send_timeout not armed");
        }
    }
}

/// The TCP connection under an accepted connection of either listener.
fn tcp_of(conn: &dyn Any) -> Option<&actix_web::rt::net::TcpStream> {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        return Some(tcp);
    }
    conn.downcast_ref::<Tls>().map(|tls| tls.get_ref().0)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn arm(tcp: &actix_web::rt::net::TcpStream, timeout: Duration) {
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(timeout)) {
        log::warn!("cannot set the send timeout on a client connection: {e}");
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn arm(_: &actix_web::rt::net::TcpStream, _: Duration) {
    log::warn!("server.send_timeout is only enforced on Linux");
}
