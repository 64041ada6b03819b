//! TLS server configuration (being written).
