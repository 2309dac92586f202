//! mles: a Mles v2 pub/sub relay over TLS WebSockets.
//!
//! [`server::run`] serves a [`config::Config`]; tests bind a [`server::Server`] on port 0
//! and talk to it as clients do.

pub mod admin;
pub mod budget;
pub mod compression;
pub mod config;
pub mod connection;
pub mod frame;
pub mod http;
pub mod hub;
pub mod limits;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod static_files;
pub mod store;
pub mod sweeper;
pub mod tls;
pub mod version;
pub mod websocket;
pub mod write_deadline;

use std::net::SocketAddr;

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
