//! What `mles --version` prints: the version and the TLS and ACME backends compiled in, so
//! an operator can tell from the binary alone what it speaks.

/// The version text after the program name, e.g.
/// `0.1.0 (rustls/ring, ACME: rustls-acme TLS-ALPN-01)`.
///
/// TLS is rustls with the ring crypto provider (TLS 1.2 and 1.3, see `tls::server_config`);
/// ACME is rustls-acme answering TLS-ALPN-01 challenges on the main port. Neither is a
/// cargo feature of this crate, so the text is fixed at compile time; if one ever becomes
/// optional, this is the place to say which one was built.
pub const LONG: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (rustls/ring, ACME: rustls-acme TLS-ALPN-01)"
);
