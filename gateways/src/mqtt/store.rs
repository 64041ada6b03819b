//! The durable session and retained-message store (being written).
