//! Phase 6: an allowed request goes to the pool its route picks: streamed
//! upstream, or relayed as a WebSocket, with the RateLimit headers of the
//! rules that applied, and its concurrency slots held until the response
//! (or the relayed connection) ends, whatever the answer is.

use actix_web::http::Method;
use actix_web::{web, HttpResponse};

use super::{Admitted, Exchange};
use crate::in_flight;
use crate::proxy::{websocket, ForwardError};
use crate::responses;

impl Exchange<'_> {
    /// Phase 6: forward, and carry the slots to the response's end.
    pub(super) async fn forward(
        self,
        payload: web::Payload,
        admitted: Admitted<'_>,
    ) -> HttpResponse {
        let head = self.req.method() == Method::HEAD;
        let Admitted { applied, slots } = admitted;
        let resp = self.answer(payload, &applied).await;
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
            return match websocket::relay(&self.req, payload, pool, self.trusted, self.peer).await {
                Ok(mut relayed) => {
                    responses::add_rate_headers(&mut relayed.builder, applied);
                    relayed.into_response()
                }
                Err(failure) => {
                    crate::metrics::upstream_error(failure.code());
                    failure.answer()
                }
            };
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
        match result {
            Ok(mut resp) => {
                responses::add_rate_headers(&mut resp.builder, applied);
                resp.into_response()
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
        }
    }
}
