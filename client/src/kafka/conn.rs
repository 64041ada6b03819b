//! One connection to one Kafka-protocol broker: framing, correlation ids and API version
//! negotiation. Requests on a connection are answered in order: `call` sends one request and
//! reads its response; `send` and `receive` let a caller keep a request in flight (a consumer
//! asks for its next Fetch before it checks the previous one).

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
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
    /// Response buffers, used in turn (two, so one response can be worked on while the next
    /// is read).
    buffers: [BytesMut; 2],
    next_buffer: usize,
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
            buffers: Default::default(),
            next_buffer: 0,
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
        self.send(request, ours).await.map(|_| ())
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
        let sent = self.send_at(request, version).await?;
        self.receive::<R>(sent, wait).await
    }

    /// Sends `request` at the best common version up to `ours` without waiting for its
    /// response, so a caller can keep it in flight while it works on an earlier one; read the
    /// answer with [`Connection::receive`]. Responses come in the order requests were sent.
    pub(crate) async fn send<R: Request>(
        &mut self,
        request: &R,
        ours: i16,
    ) -> Result<Sent, KafkaError> {
        let version = self.version::<R>(ours)?;
        self.send_at(request, version).await
    }

    async fn send_at<R: Request>(&mut self, request: &R, version: i16) -> Result<Sent, KafkaError> {
        let (frame, correlation_id) = self.frame(request, version)?;
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
            })?;
        Ok(Sent {
            correlation_id,
            version,
        })
    }

    /// Reads the response to the request `sent`, which must be the oldest one unanswered.
    /// `wait` is how long the broker may hold it (Fetch's max wait).
    pub(crate) async fn receive<R: Request>(
        &mut self,
        sent: Sent,
        wait: Duration,
    ) -> Result<R::Response, KafkaError> {
        let Sent {
            correlation_id,
            version,
        } = sent;
        // The response is read into one of two buffers used in turn, without zeroing; once
        // the caller has dropped what it decoded from a buffer (every record set of a Fetch
        // is a view of it), the next read reuses its memory instead of allocating.
        self.next_buffer = (self.next_buffer + 1) % self.buffers.len();
        let buffer = &mut self.buffers[self.next_buffer];
        let reader = &mut self.reader;
        let exchange = async {
            let len = reader.read_i32().await?;
            let len = usize::try_from(len)
                .ok()
                .filter(|&len| len <= MAX_RESPONSE_BYTES)
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("bad response length {len}"),
                    )
                })?;
            buffer.clear();
            buffer.reserve(len);
            while buffer.len() < len {
                let mut limited = (&mut *reader).take((len - buffer.len()) as u64);
                if limited.read_buf(buffer).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
            Ok::<_, std::io::Error>(buffer.split().freeze())
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

/// A request sent and not yet answered: what [`Connection::receive`] needs to read its
/// response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a sent request's response must be received before later ones"]
pub(crate) struct Sent {
    correlation_id: i32,
    version: i16,
}

/// The API's name for messages, e.g. `Fetch`.
fn api_name(key: i16) -> String {
    match kafka_protocol::messages::ApiKey::try_from(key) {
        Ok(api) => format!("{api:?}"),
        Err(()) => format!("API {key}"),
    }
}
