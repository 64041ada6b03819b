//! The admin port's HTTP/1.1 as a pure codec: a request head parsed from bytes, a response
//! encoded to bytes. It does what a Prometheus scraper, a health probe and curl need and no
//! more: one GET or HEAD per connection, no request body read, no keep-alive, and a head of at
//! most [`HEAD_BYTES_MAX`] bytes, so a client can never make the node hold more than that.

/// Longest request head (request line and header fields) accepted.
pub const HEAD_BYTES_MAX: usize = 8 * 1024;

/// Content type of plain text responses.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// The request methods the admin port tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    /// A GET whose response carries no body (HTTP requires servers to support it).
    Head,
    /// Any other well-formed method: answered 405.
    Other,
}

/// A parsed request head: all the admin port looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The target's path, without query or fragment.
    pub path: String,
}

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// No end of the head within [`HEAD_BYTES_MAX`] bytes.
    TooLarge,
    /// Not HTTP/1.x syntax; the reason is for logs.
    Malformed(&'static str),
    /// Well-formed, but a version other than HTTP/1.0 and HTTP/1.1.
    UnsupportedVersion,
    /// The client closed its side before the head was complete.
    Incomplete,
}

impl HeadError {
    /// The status that answers this error.
    pub fn status(self) -> Status {
        match self {
            HeadError::TooLarge => Status::HeadTooLarge,
            HeadError::Malformed(_) | HeadError::Incomplete => Status::BadRequest,
            HeadError::UnsupportedVersion => Status::VersionNotSupported,
        }
    }
}

/// Response statuses the admin port sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    HeadTooLarge,
    InternalError,
    Unavailable,
    VersionNotSupported,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::HeadTooLarge => 431,
            Status::InternalError => 500,
            Status::Unavailable => 503,
            Status::VersionNotSupported => 505,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::HeadTooLarge => "Request Header Fields Too Large",
            Status::InternalError => "Internal Server Error",
            Status::Unavailable => "Service Unavailable",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// A complete response; the connection closes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    /// A plain text response.
    pub fn text(status: Status, body: &str) -> Response {
        Response {
            status,
            content_type: TEXT_PLAIN,
            body: body.as_bytes().to_vec(),
        }
    }

    /// The plain text response for `status` alone, its reason phrase as the body.
    pub fn status(status: Status) -> Response {
        Response::text(
            status,
            &format!("{}\n", status.reason().to_ascii_lowercase()),
        )
    }

    /// The bytes on the wire; the body is left out in answer to HEAD, its length kept.
    pub fn encode(&self, method: Method) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status.code(),
            self.status.reason(),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if self.status == Status::MethodNotAllowed {
            out.extend_from_slice(b"Allow: GET, HEAD\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if method != Method::Head {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Parses the request head at the front of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete, and judges the request line as soon as it
/// is complete, so garbage is refused without waiting for a blank line that may never come.
/// Accepts bare LF line ends as well as CRLF (RFC 9112 section 2.2).
pub fn parse_head(buf: &[u8]) -> Result<Option<Request>, HeadError> {
    let window = &buf[..buf.len().min(HEAD_BYTES_MAX)];
    let incomplete = || {
        if buf.len() >= HEAD_BYTES_MAX {
            Err(HeadError::TooLarge)
        } else {
            Ok(None)
        }
    };
    let Some(line_len) = find_newline(window) else {
        return incomplete();
    };
    let request = parse_request_line(trim_cr(&window[..line_len]))?;
    let mut start = line_len + 1;
    loop {
        let Some(len) = find_newline(&window[start..]) else {
            return incomplete();
        };
        let line = trim_cr(&window[start..start + len]);
        if line.is_empty() {
            return Ok(Some(request));
        }
        check_header_line(line)?;
        start += len + 1;
    }
}

fn find_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&byte| byte == b'\n')
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `tchar` of RFC 9110: the characters of a method or a header name.
fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().copied().all(is_token_byte)
}

fn parse_request_line(line: &[u8]) -> Result<Request, HeadError> {
    let mut parts = line.split(|&byte| byte == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed(
            "request line is not METHOD TARGET VERSION",
        ));
    };
    if !is_token(method) {
        return Err(HeadError::Malformed("invalid method"));
    }
    match version {
        b"HTTP/1.1" | b"HTTP/1.0" => {}
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            return Err(HeadError::UnsupportedVersion);
        }
        _ => return Err(HeadError::Malformed("invalid HTTP version")),
    }
    if target.is_empty() || !target.iter().all(|byte| byte.is_ascii_graphic()) {
        return Err(HeadError::Malformed("invalid request target"));
    }
    // Origin form `/path?query`, or absolute form `http://host/path?query`.
    let path = match target.strip_prefix(b"http://") {
        Some(rest) => rest
            .iter()
            .position(|&byte| byte == b'/')
            .map_or(&b"/"[..], |slash| &rest[slash..]),
        None if target.starts_with(b"/") => target,
        None => return Err(HeadError::Malformed("invalid request target")),
    };
    let path_len = path
        .iter()
        .position(|&byte| byte == b'?' || byte == b'#')
        .unwrap_or(path.len());
    let method = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        _ => Method::Other,
    };
    Ok(Request {
        method,
        // Checked above to be ASCII.
        path: String::from_utf8_lossy(&path[..path_len]).into_owned(),
    })
}

/// A header field line must be `name: value`; obsolete line folding is refused, as RFC 9112
/// allows.
fn check_header_line(line: &[u8]) -> Result<(), HeadError> {
    let Some(colon) = line.iter().position(|&byte| byte == b':') else {
        return Err(HeadError::Malformed("header line without a colon"));
    };
    if !is_token(&line[..colon]) {
        return Err(HeadError::Malformed("invalid header name"));
    }
    let value = &line[colon + 1..];
    if value
        .iter()
        .any(|&byte| (byte < 0x20 && byte != b'\t') || byte == 0x7f)
    {
        return Err(HeadError::Malformed("control character in a header value"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Result<Option<Request>, HeadError> {
        Ok(Some(Request {
            method: Method::Get,
            path: path.to_string(),
        }))
    }

    #[test]
    fn parses_a_curl_request() {
        let head = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9644\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
        assert_eq!(parse_head(head), get("/metrics"));
        // Every strict prefix is incomplete, never an error.
        for len in 0..head.len() - 1 {
            assert_eq!(parse_head(&head[..len]), Ok(None), "prefix of {len} bytes");
        }
    }

    #[test]
    fn accepts_bare_lf_queries_absolute_form_and_http_1_0() {
        assert_eq!(parse_head(b"GET /health?x=1 HTTP/1.0\n\n"), get("/health"));
        assert_eq!(
            parse_head(b"GET http://edge:9644/health HTTP/1.1\r\n\r\n"),
            get("/health")
        );
        assert_eq!(
            parse_head(b"HEAD / HTTP/1.1\r\n\r\n"),
            Ok(Some(Request {
                method: Method::Head,
                path: "/".into()
            }))
        );
        assert_eq!(
            parse_head(b"DELETE /health HTTP/1.1\r\n\r\n")
                .unwrap()
                .unwrap()
                .method,
            Method::Other
        );
    }

    #[test]
    fn refuses_garbage_as_soon_as_the_first_line_ends() {
        for head in [
            &b"hello\r\n"[..],
            b"GET /\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/1.1 extra\r\n",
            b"G(T / HTTP/1.1\r\n",
            b"GET health HTTP/1.1\r\n",
            b"GET /\x01 HTTP/1.1\r\n",
            b"GET / HTTP/one\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n",
        ] {
            assert!(
                matches!(parse_head(head), Err(HeadError::Malformed(_))),
                "{head:?}"
            );
        }
        // The HTTP/2 connection preface.
        assert_eq!(
            parse_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Err(HeadError::UnsupportedVersion)
        );
        assert_eq!(
            parse_head(b"OPTIONS * HTTP/1.1\r\n\r\n"),
            Err(HeadError::Malformed("invalid request target"))
        );
    }

    #[test]
    fn refuses_bad_header_lines() {
        for head in [
            &b"GET / HTTP/1.1\r\nno colon\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(head), Err(HeadError::Malformed(_))),
                "{head:?}"
            );
        }
    }

    #[test]
    fn a_head_must_end_within_the_limit() {
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.resize(HEAD_BYTES_MAX - 4, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head.len(), HEAD_BYTES_MAX);
        assert_eq!(parse_head(&head), get("/"));

        let mut long = head[..HEAD_BYTES_MAX - 4].to_vec();
        long.extend_from_slice(b"a\r\n\r\n");
        assert_eq!(parse_head(&long), Err(HeadError::TooLarge));
        // A request line that never ends is refused at the limit too.
        assert_eq!(
            parse_head(&vec![b'A'; HEAD_BYTES_MAX]),
            Err(HeadError::TooLarge)
        );
        assert_eq!(parse_head(&vec![b'A'; HEAD_BYTES_MAX - 1]), Ok(None));
    }

    #[test]
    fn encodes_responses() {
        let response = Response::text(Status::Ok, "ok\n");
        assert_eq!(
            response.encode(Method::Get),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
        assert_eq!(
            response.encode(Method::Head),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        let refused = Response::status(Status::MethodNotAllowed).encode(Method::Other);
        let refused = String::from_utf8(refused).unwrap();
        assert!(refused.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(refused.contains("\r\nAllow: GET, HEAD\r\n"));
        assert!(refused.ends_with("\r\n\r\nmethod not allowed\n"));
    }
}
