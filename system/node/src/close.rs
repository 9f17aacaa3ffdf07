//! The WebSocket close codes the node sends (4000-4999 are the application's); shared by
//! the connection loop and the hub, which closes slow consumers.

pub const CLOSE_UNAUTHORIZED: u16 = 4401;
pub const CLOSE_TOO_LARGE: u16 = 1009;
/// The client did not read fast enough: its unsent frames passed the node's byte bound.
pub const CLOSE_SLOW: u16 = 4408;
/// Nothing heard from the client (no frame, no pong) for the idle timeout.
pub const CLOSE_IDLE: u16 = 4409;
/// Policy violation: the client kept exceeding its rate limit.
pub const CLOSE_RATE_LIMIT: u16 = 1008;
pub const CLOSE_SHUTDOWN: u16 = 1012;
