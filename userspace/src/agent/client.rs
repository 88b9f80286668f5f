//! The CLI's side of the agent's API: find the agent of a node, send it a command, borrow its
//! lock.
//!
//! Blocking HTTP/1.1 over the Unix socket, one request per connection, responses parsed with
//! `httparse` (the parser under hyper). The CLI stays single-threaded, which `run` relies on
//! when it forks.

use std::{
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use super::{Executed, Record};
use crate::node::Paths;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent (pid {pid}) at {}", socket.display())]
    Connect {
        pid: u32,
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent's answer was cut short or malformed: {0}")]
    Protocol(String),
    #[error("the agent answered {status}: {message}")]
    Status { status: u16, message: String },
}

/// An agent that answers on its socket.
#[derive(Debug)]
pub struct Client {
    pub pid: u32,
    pub socket: PathBuf,
}

/// The agent of this node, if one runs: its record names a socket that accepts connections.
/// A record left by a killed agent (nothing listening) means no agent.
pub fn find(paths: &Paths) -> Result<Option<Client>, ClientError> {
    let Some(record) = Record::load(&paths.state_dir) else {
        return Ok(None);
    };
    match UnixStream::connect(&record.socket) {
        Ok(_) => Ok(Some(Client {
            pid: record.pid,
            socket: record.socket,
        })),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            Ok(None)
        }
        Err(source) => Err(ClientError::Connect {
            pid: record.pid,
            socket: record.socket,
            source,
        }),
    }
}

/// A response: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Answer {
    /// The `error` of a JSON error body, or the body as text.
    pub fn message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_owned())
    }
}

impl Client {
    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            pid: self.pid,
            socket: self.socket.clone(),
            source,
        })
    }

    fn send(
        stream: &mut UnixStream,
        method: &str,
        path: &str,
        body: &[u8],
        close: bool,
    ) -> Result<(), ClientError> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bulkhead\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .map_err(|e| ClientError::Protocol(format!("sending the request: {e}")))
    }

    /// One request, its whole answer.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<Answer, ClientError> {
        let mut stream = self.connect()?;
        let sent = Self::send(&mut stream, method, path, body, true);
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .map_err(|e| ClientError::Protocol(format!("reading the answer: {e}")))?;
        // The agent may refuse a request before reading all of it (a body over its limit):
        // its answer says why better than the broken pipe does.
        match (parse(&raw), sent) {
            (Ok(answer), _) => Ok(answer),
            (Err(_), Err(e)) | (Err(e), Ok(())) => Err(e),
        }
    }

    /// Runs a CLI command in the agent: its output and exit code, as if run here.
    pub fn cli(&self, args: &[String], stdin: &str) -> Result<Executed, ClientError> {
        let body = serde_json::to_vec(&serde_json::json!({ "args": args, "stdin": stdin }))
            .expect("serialises");
        let answer = self.request("POST", "/v1/cli", &body)?;
        if answer.status != 200 {
            return Err(ClientError::Status {
                status: answer.status,
                message: answer.message(),
            });
        }
        serde_json::from_slice(&answer.body)
            .map_err(|e| ClientError::Protocol(format!("the command's result: {e}")))
    }

    /// Borrows the agent's hold on the node: the agent changes nothing until the returned
    /// value is dropped (the connection closes).
    pub fn hold(&self) -> Result<Box<dyn Send>, ClientError> {
        let mut stream = self.connect()?;
        Self::send(&mut stream, "POST", "/v1/hold", b"", false)?;
        // The status line and headers arrive once the agent holds its mutex for us.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                Ok(_) => return Err(ClientError::Protocol("the agent hung up".into())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        }
        let answer = parse(&head)?;
        if answer.status != 200 {
            return Err(ClientError::Status {
                status: answer.status,
                message: answer.message(),
            });
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        Ok(Box::new(stream))
    }
}

/// Parses a whole HTTP/1.1 response (a chunked body is decoded).
fn parse(raw: &[u8]) -> Result<Answer, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Protocol("incomplete headers".into()));
        }
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    };
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let rest = &raw[len..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(Answer {
        status: response.code.unwrap_or(0),
        content_type: header("content-type"),
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut body = Vec::new();
    loop {
        match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete((start, 0))) => {
                let _ = start;
                return Ok(body);
            }
            Ok(httparse::Status::Complete((start, size))) => {
                let end = start + size as usize;
                if rest.len() < end + 2 {
                    return Err(ClientError::Protocol("a chunk was cut short".into()));
                }
                body.extend_from_slice(&rest[start..end]);
                rest = &rest[end + 2..];
            }
            Ok(httparse::Status::Partial) => return Ok(body),
            Err(_) => return Err(ClientError::Protocol("bad chunk size".into())),
        }
    }
}
