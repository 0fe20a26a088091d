//! The proxy's own Tower layers, one concern each.
//! `crate::stack` decides their order; the edge layer turns their refusals into responses.

pub mod access_log;
pub mod auth;
pub mod edge;
pub mod once;
pub mod rate_limit;
pub mod request_id;
