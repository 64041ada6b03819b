//! Authentication and authorisation (being written).
