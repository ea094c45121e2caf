//! Stable error and disconnect codes of the Centrifugo client protocol that we send.
//!
//! The numbers are Centrifugo's own, so the SDKs react to them as they would to Centrifugo:
//! disconnect codes 3000–3499 mean "reconnect", 3500–3999 mean "do not reconnect".

/// An error in a reply: the command failed, the connection and its other subscriptions live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Internal,
    Unauthorized,
    UnknownChannel,
    PermissionDenied,
    MethodNotFound,
    AlreadySubscribed,
    LimitExceeded,
    BadRequest,
    NotAvailable,
    TokenExpired,
    TooManyRequests,
    UnrecoverablePosition,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        match self {
            Self::Internal => 100,
            Self::Unauthorized => 101,
            Self::UnknownChannel => 102,
            Self::PermissionDenied => 103,
            Self::MethodNotFound => 104,
            Self::AlreadySubscribed => 105,
            Self::LimitExceeded => 106,
            Self::BadRequest => 107,
            Self::NotAvailable => 108,
            Self::TokenExpired => 109,
            Self::TooManyRequests => 111,
            Self::UnrecoverablePosition => 112,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::Internal => "internal server error",
            Self::Unauthorized => "unauthorized",
            Self::UnknownChannel => "unknown channel",
            Self::PermissionDenied => "permission denied",
            Self::MethodNotFound => "method not found",
            Self::AlreadySubscribed => "already subscribed",
            Self::LimitExceeded => "limit exceeded",
            Self::BadRequest => "bad request",
            Self::NotAvailable => "not available",
            Self::TokenExpired => "token expired",
            Self::TooManyRequests => "too many requests",
            Self::UnrecoverablePosition => "unrecoverable position",
        }
    }

    /// Temporary errors tell the SDK that retrying the same command may succeed.
    pub fn temporary(self) -> bool {
        matches!(self, Self::Internal | Self::TooManyRequests)
    }
}

/// Why the server closes a connection: sent as the WebSocket close code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectCode {
    Normal,
    Shutdown,
    InternalServerError,
    Expired,
    Slow,
    InsufficientState,
    ForceReconnect,
    NoPong,
    TooManyRequests,
    InvalidToken,
    BadRequest,
    Stale,
    ForceNoReconnect,
    ConnectionLimit,
    ChannelLimit,
    /// The client used a method that has no handler and no reply (`send`).
    NotAvailable,
}

impl DisconnectCode {
    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 3000,
            Self::Shutdown => 3001,
            Self::InternalServerError => 3004,
            Self::Expired => 3005,
            Self::Slow => 3008,
            Self::InsufficientState => 3010,
            Self::ForceReconnect => 3011,
            Self::NoPong => 3012,
            Self::TooManyRequests => 3013,
            Self::InvalidToken => 3500,
            Self::BadRequest => 3501,
            Self::Stale => 3502,
            Self::ForceNoReconnect => 3503,
            Self::ConnectionLimit => 3504,
            Self::ChannelLimit => 3505,
            Self::NotAvailable => 3508,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Shutdown => "shutdown",
            Self::InternalServerError => "internal server error",
            Self::Expired => "connection expired",
            Self::Slow => "slow",
            Self::InsufficientState => "insufficient state",
            Self::ForceReconnect => "force reconnect",
            Self::NoPong => "no pong",
            Self::TooManyRequests => "too many requests",
            Self::InvalidToken => "invalid token",
            Self::BadRequest => "bad request",
            Self::Stale => "stale",
            Self::ForceNoReconnect => "force disconnect",
            Self::ConnectionLimit => "connection limit",
            Self::ChannelLimit => "channel limit",
            Self::NotAvailable => "not available",
        }
    }

    /// Whether the SDK will reconnect after this code (Centrifugo's code ranges).
    pub fn reconnect(self) -> bool {
        self.code() < 3500
    }

    /// Short label used for the `reason` of the connections-closed metric.
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Shutdown => "shutdown",
            Self::InternalServerError => "internal_error",
            Self::Expired => "expired",
            Self::Slow => "slow_consumer",
            Self::InsufficientState => "insufficient_state",
            Self::ForceReconnect => "force_reconnect",
            Self::NoPong => "no_pong",
            Self::TooManyRequests => "too_many_requests",
            Self::InvalidToken => "invalid_token",
            Self::BadRequest => "bad_request",
            Self::Stale => "stale",
            Self::ForceNoReconnect => "force_no_reconnect",
            Self::ConnectionLimit => "connection_limit",
            Self::ChannelLimit => "channel_limit",
            Self::NotAvailable => "not_available",
        }
    }

    pub fn from_code(code: u16) -> Option<Self> {
        ALL_DISCONNECTS.iter().copied().find(|d| d.code() == code)
    }
}

const ALL_DISCONNECTS: [DisconnectCode; 16] = [
    DisconnectCode::Normal,
    DisconnectCode::Shutdown,
    DisconnectCode::InternalServerError,
    DisconnectCode::Expired,
    DisconnectCode::Slow,
    DisconnectCode::InsufficientState,
    DisconnectCode::ForceReconnect,
    DisconnectCode::NoPong,
    DisconnectCode::TooManyRequests,
    DisconnectCode::InvalidToken,
    DisconnectCode::BadRequest,
    DisconnectCode::Stale,
    DisconnectCode::ForceNoReconnect,
    DisconnectCode::ConnectionLimit,
    DisconnectCode::ChannelLimit,
    DisconnectCode::NotAvailable,
];

/// Codes of the `unsubscribe` push: 2500–2999 tell the SDK to resubscribe.
pub mod unsubscribe {
    /// The server unsubscribed the client for good.
    pub const SERVER: u32 = 2000;
    /// The subscription lost its place in the stream; the SDK resubscribes and recovers.
    pub const INSUFFICIENT_STATE: u32 = 2500;
    /// The subscription token expired and was not refreshed; the SDK resubscribes with a
    /// new one.
    pub const SUBSCRIPTION_EXPIRED: u32 = 2501;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnect_codes_round_trip_and_reconnect_ranges_hold() {
        for d in ALL_DISCONNECTS {
            assert_eq!(DisconnectCode::from_code(d.code()), Some(d));
            assert_eq!(d.reconnect(), (3000..3500).contains(&d.code()));
        }
        assert!(DisconnectCode::Slow.reconnect());
        assert!(!DisconnectCode::BadRequest.reconnect());
    }

    #[test]
    fn only_internal_and_rate_limit_errors_are_temporary() {
        assert!(ErrorCode::Internal.temporary());
        assert!(ErrorCode::TooManyRequests.temporary());
        assert!(!ErrorCode::BadRequest.temporary());
    }
}
