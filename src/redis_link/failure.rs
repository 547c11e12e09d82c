//! Why a Redis call failed, and which failures a second try can fix.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Why a Redis call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisFailure {
    #[error("not connected to Redis")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis error: {0}")]
    Redis(#[from] RedisError),
    #[error("unexpected reply from Redis: {0}")]
    Reply(#[from] redis::ParsingError),
    /// A decision that waited in its worker's queue for its whole budget
    /// behind calls in flight, and was never sent.
    #[error("no Redis call was free within {0:?}")]
    Queued(Duration),
    /// A decision that shared a batch call with others, which failed: the
    /// failure is counted once, with the first decision of the batch.
    #[error("{0}")]
    Batch(String),
}

impl RedisFailure {
    /// Whether this failure is a failed call of its own, to be counted
    /// (`floodgate_redis_errors_total`, the breaker): the decisions that
    /// shared a failed batch, or never left the queue, are not.
    pub(crate) fn is_a_failed_call(&self) -> bool {
        !matches!(self, RedisFailure::Queued(_) | RedisFailure::Batch(_))
    }

    /// True when the call may have run in Redis although no answer came:
    /// the connection broke after the command was written, or the answer
    /// timed out. Sending such a call again could apply it twice.
    pub(crate) fn may_have_run(&self) -> bool {
        match self {
            RedisFailure::Timeout(_) => true,
            RedisFailure::Redis(e) => {
                !e.is_connection_refusal()
                    && (e.is_io_error()
                        || e.is_connection_dropped()
                        || matches!(e.kind(), ErrorKind::Io))
            }
            _ => false,
        }
    }

    /// True for failures a second try of the same call can fix: redirects
    /// (MOVED, ASK), a slot in the middle of a move (TRYAGAIN), a cluster
    /// between a master's failure and its replica's promotion (CLUSTERDOWN,
    /// MASTERDOWN), and connections to nodes that went away.
    pub(crate) fn is_transient(&self) -> bool {
        let RedisFailure::Redis(e) = self else {
            return false;
        };
        matches!(
            e.kind(),
            ErrorKind::Io
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::BusyLoading
                )
        ) || e.is_connection_dropped()
            || e.is_connection_refusal()
    }
}

/// True when Redis does not have the script (flushed, restarted, failed over).
pub(crate) fn is_noscript(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(ServerErrorKind::NoScript)) || e.code() == Some("NOSCRIPT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_and_lost_nodes_are_transient_script_errors_are_not() {
        let e = |kind, text: &'static str| RedisFailure::Redis(RedisError::from((kind, text)));
        assert!(e(ErrorKind::Server(ServerErrorKind::TryAgain), "TRYAGAIN").is_transient());
        assert!(e(ErrorKind::Server(ServerErrorKind::Moved), "MOVED").is_transient());
        assert!(e(ErrorKind::Server(ServerErrorKind::ClusterDown), "down").is_transient());
        assert!(e(ErrorKind::ClusterConnectionNotFound, "gone").is_transient());
        assert!(!e(
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "ERR script"
        )
        .is_transient());
        assert!(!RedisFailure::Timeout(Duration::from_millis(1)).is_transient());
    }
}
