//! TEMP stub
#![allow(missing_docs, dead_code, unreachable_pub)]
use crate::mqtt::topic::{TopicFilter, TopicName};
use std::path::Path;
#[derive(Debug)]
pub struct PasswordFile;
#[derive(Debug)]
pub struct AclRules;
#[derive(Debug, thiserror::Error)]
#[error("auth")]
pub struct AuthError;
pub struct Identity<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
}
impl PasswordFile {
    pub fn load(_p: &Path) -> Result<Self, AuthError> {
        Ok(Self)
    }
    pub fn verify(&self, _u: &str, _p: &[u8]) -> bool {
        false
    }
}
impl AclRules {
    pub fn load(_p: &Path) -> Result<Self, AuthError> {
        Ok(Self)
    }
    pub fn allows_publish(&self, _w: &Identity<'_>, _t: &TopicName) -> bool {
        true
    }
    pub fn allows_subscribe(&self, _w: &Identity<'_>, _t: &TopicFilter) -> bool {
        true
    }
    pub fn allows_receive(&self, _w: &Identity<'_>, _t: &TopicName) -> bool {
        true
    }
}
