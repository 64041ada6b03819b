//! TEMP stub
pub fn peer_common_name(_c: &rustls::ServerConnection) -> Option<String> {
    None
}
