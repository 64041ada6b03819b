//! One connection to one Kafka-protocol broker: framing, correlation ids and API version
//! negotiation. Requests on a connection are answered in order, so `call` sends one request and
//! reads its response before the next.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiVersionsRequest, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::KafkaError;

/// Largest response accepted: above Fetch's largest `max_bytes` the CLI asks for, plus room.
const MAX_RESPONSE_BYTES: usize = 256 << 20;
/// The ApiVersions version tried first; brokers that do not know it answer at version 0.
const API_VERSIONS_VERSION: i16 = 3;
/// Kafka's UNSUPPORTED_VERSION error code.
const UNSUPPORTED_VERSION: i16 = 35;

/// A connection with the versions the broker supports.
#[derive(Debug)]
pub(crate) struct Connection {
    addr: String,
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    next_correlation_id: i32,
    /// Broker's supported range per API key.
    versions: HashMap<i16, (i16, i16)>,
    client_id: StrBytes,
    /// Upper bound on one request's round trip, on top of any wait the request asks for.
    timeout: Duration,
}

impl Connection {
    /// Connects to `addr` and asks the broker which API versions it supports.
    pub(crate) async fn connect(
        addr: &str,
        client_id: &str,
        timeout: Duration,
    ) -> Result<Connection, KafkaError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| KafkaError::Timeout(format!("connecting to {addr}")))?
            .map_err(|error| KafkaError::Io(format!("cannot connect to {addr}: {error}")))?;
        // Requests are small and answered one at a time: Nagle would only add delay.
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let mut connection = Connection {
            addr: addr.to_string(),
            reader: BufReader::new(read),
            writer: BufWriter::new(write),
            next_correlation_id: 0,
            versions: HashMap::new(),
            client_id: StrBytes::from_string(client_id.to_string()),
            timeout,
        };
        connection.negotiate().await?;
        Ok(connection)
    }

    async fn negotiate(&mut self) -> Result<(), KafkaError> {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("silt"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut response = self
            .call_at(&request, API_VERSIONS_VERSION, Duration::ZERO)
            .await?;
        if response.error_code == UNSUPPORTED_VERSION {
            // The broker lists what it supports in a version 0 answer; ask in that version.
            response = self.call_at(&request, 0, Duration::ZERO).await?;
        }
        if response.error_code != 0 {
            return Err(KafkaError::from_code(
                response.error_code,
                format!("ApiVersions from {}", self.addr),
            ));
        }
        self.versions = response
            .api_keys
            .iter()
            .map(|key| (key.api_key, (key.min_version, key.max_version)))
            .collect();
        Ok(())
    }

    /// The highest version of `R` both sides support, capped at `ours`, the newest version
    /// whose fields the caller fills in.
    pub(crate) fn version<R: Request>(&self, ours: i16) -> Result<i16, KafkaError> {
        let name = api_name(R::KEY);
        let &(broker_min, broker_max) = self.versions.get(&R::KEY).ok_or_else(|| {
            KafkaError::Unsupported(format!(
                "the broker at {} does not support {name}",
                self.addr
            ))
        })?;
        let low = broker_min.max(R::VERSIONS.min);
        let high = broker_max.min(ours).min(R::VERSIONS.max);
        if low > high {
            return Err(KafkaError::Unsupported(format!(
                "no common version of {name}: the broker at {} supports {broker_min}..={broker_max}, \
                 this client {}..={ours}",
                self.addr,
                R::VERSIONS.min
            )));
        }
        Ok(high)
    }

    /// Sends `request` at the best common version up to `ours` and returns the response and
    /// the version used. `wait` is how long the broker may hold the request (Fetch's max wait).
    pub(crate) async fn call<R: Request>(
        &mut self,
        request: &R,
        ours: i16,
        wait: Duration,
    ) -> Result<(R::Response, i16), KafkaError> {
        let version = self.version::<R>(ours)?;
        let response = self.call_at(request, version, wait).await?;
        Ok((response, version))
    }

    /// Sends `request` and reads no response: for Produce with acks=0, which gets none.
    pub(crate) async fn send_only<R: Request>(
        &mut self,
        request: &R,
        ours: i16,
    ) -> Result<(), KafkaError> {
        let version = self.version::<R>(ours)?;
        let (frame, _) = self.frame(request, version)?;
        let send = async {
            self.writer.write_all(&frame).await?;
            self.writer.flush().await
        };
        tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| {
                KafkaError::Timeout(format!("sending {} to {}", api_name(R::KEY), self.addr))
            })?
            .map_err(|error| {
                KafkaError::Io(format!("{} to {}: {error}", api_name(R::KEY), self.addr))
            })
    }

    /// The request's frame (length prefix, header, body) and its correlation id.
    fn frame<R: Request>(
        &mut self,
        request: &R,
        version: i16,
    ) -> Result<(BytesMut, i32), KafkaError> {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(self.client_id.clone()));
        let mut frame = BytesMut::with_capacity(64);
        frame.put_i32(0);
        let encoded = header
            .encode(&mut frame, R::header_version(version))
            .and_then(|()| request.encode(&mut frame, version));
        encoded.map_err(|error| {
            KafkaError::Protocol(format!(
                "cannot encode {} v{version}: {error}",
                api_name(R::KEY)
            ))
        })?;
        let len = i32::try_from(frame.len() - 4)
            .map_err(|_| KafkaError::Protocol("request too large".to_string()))?;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        Ok((frame, correlation_id))
    }

    async fn call_at<R: Request>(
        &mut self,
        request: &R,
        version: i16,
        wait: Duration,
    ) -> Result<R::Response, KafkaError> {
        let (frame, correlation_id) = self.frame(request, version)?;
        let exchange = async {
            self.writer.write_all(&frame).await?;
            self.writer.flush().await?;
            let len = self.reader.read_i32().await?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&len| len <= MAX_RESPONSE_BYTES)
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("bad response length {len}"),
                    )
                })?;
            let mut body = vec![0; len];
            self.reader.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>(Bytes::from(body))
        };
        let mut body = tokio::time::timeout(self.timeout + wait, exchange)
            .await
            .map_err(|_| {
                KafkaError::Timeout(format!(
                    "waiting for {} from {}",
                    api_name(R::KEY),
                    self.addr
                ))
            })?
            .map_err(|error| {
                KafkaError::Io(format!("{} to {}: {error}", api_name(R::KEY), self.addr))
            })?;
        let decoded = ResponseHeader::decode(&mut body, R::Response::header_version(version))
            .and_then(|header| Ok((header, R::Response::decode(&mut body, version)?)));
        let (header, response) = decoded.map_err(|error| {
            KafkaError::Protocol(format!(
                "cannot decode {} v{version} from {}: {error}",
                api_name(R::KEY),
                self.addr
            ))
        })?;
        if header.correlation_id != correlation_id {
            return Err(KafkaError::Protocol(format!(
                "{} answered correlation id {} to request {correlation_id}",
                self.addr, header.correlation_id
            )));
        }
        Ok(response)
    }
}

/// The API's name for messages, e.g. `Fetch`.
fn api_name(key: i16) -> String {
    match kafka_protocol::messages::ApiKey::try_from(key) {
        Ok(api) => format!("{api:?}"),
        Err(()) => format!("API {key}"),
    }
}
