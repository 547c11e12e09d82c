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
}

impl RedisFailure {
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
