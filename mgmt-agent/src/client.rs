//! Client side of `cvctl`: a minimal HTTP/1.1 client for the agent's loopback API, and table output.
//!
//! Design: one short-lived `Connection: close` request per call over `std::net::TcpStream` (the API is on
//! loopback, so a full HTTP client stack would only add build time). Non-2xx answers become
//! [`ClientError::Http`] carrying the agent's error message, which the CLI prints before exiting non-zero.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the agent.
    #[error("cannot reach the agent at {0}: {1}")]
    Connect(String, std::io::Error),
    /// The answer was not HTTP or not JSON.
    #[error("bad answer from the agent: {0}")]
    Protocol(String),
    /// The agent answered with an error status.
    #[error("HTTP {0}: {1}")]
    Http(u16, String),
}

/// API client.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
}

impl Client {
    /// A client for the agent at `addr` (`host:port`).
    #[must_use]
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr
                .trim()
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
        }
    }

    /// GET `path`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.request("GET", path, None)
    }

    /// POST `path` with a JSON body.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request("POST", path, Some(body))
    }

    /// GET `path` as text (for `/metrics`).
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let (status, body) = self.raw("GET", path, None)?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Http(status, body));
        }
        Ok(body)
    }

    /// Any request.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let (status, text) = self.raw(method, path, body)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            ClientError::Protocol(format!(
                "{e} in {:?}",
                text.chars().take(200).collect::<String>()
            ))
        })?;
        if !(200..300).contains(&status) {
            let msg = v
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| text.clone(), str::to_string);
            return Err(ClientError::Http(status, msg));
        }
        Ok(v)
    }

    fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), ClientError> {
        let conn = |e| ClientError::Connect(self.addr.clone(), e);
        let mut s = TcpStream::connect(&self.addr).map_err(conn)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(conn)?;
        let payload = body.map(Value::to_string).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            self.addr,
            payload.len()
        );
        s.write_all(req.as_bytes()).map_err(conn)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(conn)?;
        let text = String::from_utf8_lossy(&resp);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| ClientError::Protocol("no header end".into()))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol(format!("bad status line in {head:?}")))?;
        let chunked = head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("transfer-encoding:") && l.contains("chunked")
        });
        let body = if chunked {
            dechunk(body)?
        } else {
            body.to_string()
        };
        Ok((status, body))
    }
}

fn dechunk(mut s: &str) -> Result<String, ClientError> {
    let mut out = String::new();
    loop {
        let (size, rest) = s
            .split_once("\r\n")
            .ok_or_else(|| ClientError::Protocol("bad chunk".into()))?;
        let n = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| ClientError::Protocol("bad chunk size".into()))?;
        if n == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..n)
            .ok_or_else(|| ClientError::Protocol("short chunk".into()))?;
        out.push_str(chunk);
        s = rest.get(n + 2..).unwrap_or("");
    }
}

/// Renders rows as an aligned text table.
#[must_use]
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// A JSON field as display text.
#[must_use]
pub fn field(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_chunks_decode() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
        assert!(dechunk("zz\r\n").is_err());
    }
}
