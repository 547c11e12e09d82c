//! Phase 6: an allowed request goes to the pool its route picks: streamed
//! upstream, or relayed as a WebSocket, with the RateLimit headers of the
//! rules that applied, and its concurrency slots held until the response
//! (or the relayed connection) ends, whatever the answer is.

use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpResponse};

use super::{Admitted, Exchange};
use crate::in_flight;
use crate::limiter::Reservation;
use crate::proxy::{websocket, ForwardError, UpstreamResponse};
use crate::responses;

impl Exchange<'_> {
    /// Phase 6: forward, and carry the slots to the response's end.
    pub(super) async fn forward(
        self,
        payload: web::Payload,
        admitted: Admitted<'_>,
    ) -> HttpResponse {
        let head = self.req.method() == Method::HEAD;
        let Admitted {
            applied,
            slots,
            reservation,
        } = admitted;
        let resp = self.answer(payload, &applied, reservation).await;
        match slots {
            Some(slots) => in_flight::carry(resp, slots, head).await,
            None => resp,
        }
    }

    /// The upstream's answer (or the gateway's, when forwarding failed),
    /// with `applied`'s RateLimit headers.
    async fn answer(
        self,
        payload: web::Payload,
        applied: &[crate::limiter::RateInfo<'_>],
        reservation: Reservation,
    ) -> HttpResponse {
        let pool = match self.snap.pools.route(&self.req) {
            Ok(p) => p,
            Err(e) => {
                crate::metrics::client_error("ambiguous_path");
                return responses::bad_request(e.to_string());
            }
        };
        if websocket::is_upgrade(&self.req) {
            if !pool.config.websocket {
                return responses::websocket_refused();
            }
            let resp =
                match websocket::relay(&self.req, payload, pool, self.trusted, self.peer).await {
                    Ok(mut relayed) => {
                        responses::add_rate_headers(&mut relayed.builder, applied);
                        relayed.into_response()
                    }
                    Err(failure) => {
                        crate::metrics::upstream_error(failure.code());
                        failure.answer()
                    }
                };
            self.settle(reservation, None, resp.status()).await;
            return resp;
        }
        let up = self.clients.for_pool(pool);
        let started = std::time::Instant::now();
        let result = up
            .forward(pool, &self.req, payload, self.trusted, self.peer, self.key)
            .await;
        self.gw
            .metrics
            .upstream_seconds
            .record(started.elapsed().as_secs_f64());
        let resp = match result {
            Ok(mut resp) => {
                responses::add_rate_headers(&mut resp.builder, applied);
                let status = resp.status();
                self.settle(reservation, Some(&mut resp), status).await;
                return resp.into_response();
            }
            Err(ForwardError::Upstream(failure)) => {
                crate::metrics::upstream_error(failure.code());
                failure.answer()
            }
            Err(ForwardError::TooManyStreams) => {
                crate::metrics::client_error("too_many_streams");
                responses::too_many_streams()
            }
            Err(ForwardError::Client(fault)) => {
                crate::metrics::client_error(fault.code());
                responses::client_error(fault.status(), fault.code(), fault.message())
            }
        };
        self.settle(reservation, None, resp.status()).await;
        resp
    }

    /// Puts right what the request reserved on rules that settle or count
    /// (see [`crate::limiter::Reservation`]), now that its answer's head is
    /// known (`up`: the upstream's answer; `None`: the gateway answered
    /// itself, with no cost to read). What the head tells is settled before
    /// the client sees the answer; what the trailers will tell, before it
    /// sees the body's end.
    async fn settle(
        &self,
        mut r: Reservation,
        up: Option<&mut UpstreamResponse>,
        status: StatusCode,
    ) {
        if r.is_empty() {
            return;
        }
        let limiter = self.gw.limiter.clone();
        let status = status.as_u16();
        let Some(up) = up else {
            r.head(status, |_| None);
            r.end(|_| None);
            limiter.settle(&mut r).await;
            return;
        };
        let waits = r.head(status, |name| up.header(name));
        limiter.settle(&mut r).await;
        if waits {
            up.on_end(Box::new(move |trailers| {
                Box::pin(async move {
                    r.end(|name| {
                        trailers
                            .as_ref()
                            .and_then(|t| t.get(name))
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    });
                    limiter.settle(&mut r).await;
                })
            }));
        }
    }
}
