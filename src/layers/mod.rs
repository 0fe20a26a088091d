//! The proxy's own Tower layers, one concern each.
//! `crate::stack` decides their order; `crate::error` turns their refusals into responses.

pub mod access_log;
pub mod auth;
pub mod once;
pub mod rate_limit;
pub mod request_id;
pub mod rescue;
