//! The backends: [`memory`] (always compiled in, the embedded default), and [`redis`],
//! [`nats`] and [`rabbitmq`] behind the cargo features of the same names. Each opens the
//! [`Roles`](crate::bundle::Roles) asked of it from one URL; [`crate::connect`](mod@crate::connect) picks the
//! backend by the URL's scheme. Backends import the contracts (traits, bundle, wire format)
//! and never the engine, nor each other.

pub mod memory;

#[cfg(feature = "redis")]
#[path = "../../backends/redis/mod.rs"]
pub mod redis;

#[cfg(feature = "nats")]
#[path = "../../backends/nats/mod.rs"]
pub mod nats;

#[cfg(feature = "rabbitmq")]
#[path = "../../backends/rabbitmq/mod.rs"]
pub mod rabbitmq;

/// Installs rustls' `ring` crypto provider as the process default, once. Different client crates
/// bring different providers (ring, aws-lc-rs); with more than one compiled in, rustls refuses to
/// pick one and a TLS connect would panic. An application that installed its own provider first
/// keeps it: one that wants post-quantum key exchange installs aws-lc-rs's
/// (`rustls::crypto::aws_lc_rs::default_provider().install_default()`) before connecting.
#[cfg(any(feature = "redis", feature = "nats", feature = "rabbitmq"))]
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_some() {
            return;
        }
        // rustls 0.23.48 deprecates ring's provider for its lack of post-quantum key exchange,
        // but ring is the one provider every backend compiles (aws-lc-rs comes only with
        // lapin): the choice is deliberate, and an application can override it (above).
        #[allow(deprecated)]
        let ring = rustls::crypto::ring::default_provider();
        let _ = ring.install_default();
    });
}
