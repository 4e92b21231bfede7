//! Transports for the management channel: QEMU chardev unix socket, serial device, or TCP.
//!
//! Design: an address string names the transport (`unix:/path`, `tcp:host:port`, `serial:/dev/ttyS1`) and
//! [`connect`] / [`Listener`] turn it into a boxed async byte stream, so the channel code above is transport-free.
//! Serial devices are put in raw mode (no echo, no line discipline) so COBS bytes pass untouched.
//!
//! Invariant: the stream carries bytes only; framing and integrity are the job of `proto`. The one `unsafe`
//! block registers a device descriptor owned by a `File` with the reactor (see its SAFETY note).

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A bidirectional byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Boxed stream.
pub type BoxStream = Pin<Box<dyn Stream>>;

/// A parsed channel address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// Unix socket path (QEMU `-chardev socket,path=...,server=on`).
    Unix(String),
    /// TCP `host:port`.
    Tcp(String),
    /// Serial device path.
    Serial(String),
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!("address '{s}' must be unix:PATH, tcp:HOST:PORT or serial:DEVICE")
        })?;
        if rest.is_empty() {
            return Err(format!("address '{s}' has an empty target"));
        }
        match kind {
            "unix" => Ok(Self::Unix(rest.into())),
            "tcp" => Ok(Self::Tcp(rest.into())),
            "serial" => Ok(Self::Serial(rest.into())),
            _ => Err(format!(
                "unknown transport '{kind}' in '{s}' (unix, tcp, serial)"
            )),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{p}"),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Serial(p) => write!(f, "serial:{p}"),
        }
    }
}

/// Opens a client connection.
///
/// # Errors
/// I/O errors of the transport.
pub async fn connect(addr: &Address) -> std::io::Result<BoxStream> {
    match addr {
        Address::Unix(p) => Ok(Box::pin(tokio::net::UnixStream::connect(p).await?)),
        Address::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            Ok(Box::pin(s))
        }
        Address::Serial(p) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(noctty_flag())
                .open(p)?;
            make_raw(&file)?;
            Ok(Box::pin(SerialStream::new(file)?))
        }
    }
}

fn noctty_flag() -> i32 {
    i32::try_from(rustix::fs::OFlags::NOCTTY.bits()).unwrap_or(0)
}

/// A character device (serial port, pseudo-terminal) driven by the reactor: the descriptor is non-blocking and
/// registered with epoll, so reads and writes proceed independently (a pending read never holds up a write,
/// unlike `tokio::fs::File`, which runs one blocking operation at a time).
#[derive(Debug)]
pub struct SerialStream {
    fd: AsyncFd<std::fs::File>,
}

impl SerialStream {
    /// Wraps an open device; sets it non-blocking.
    ///
    /// # Errors
    /// If the descriptor cannot be made non-blocking or registered (e.g. a regular file).
    pub fn new(file: std::fs::File) -> std::io::Result<Self> {
        let flags = rustix::fs::fcntl_getfl(&file)?;
        rustix::fs::fcntl_setfl(&file, flags | rustix::fs::OFlags::NONBLOCK)?;
        // SAFETY: `File` owns its descriptor, which stays open and refers to the same open file description
        // until the `File` is dropped together with the `AsyncFd`; `as_raw_fd` on it always returns that same
        // descriptor, and this type never hands the `File` out (no `into_inner`, no `&mut` access).
        let fd = unsafe { AsyncFd::register(file) }.map_err(std::io::Error::from)?;
        Ok(Self { fd })
    }
}

impl AsyncRead for SerialStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| {
                let mut f: &std::fs::File = inner.get_ref();
                f.read(unfilled)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for SerialStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| {
                let mut f: &std::fs::File = inner.get_ref();
                f.write(data)
            }) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn make_raw(file: &std::fs::File) -> std::io::Result<()> {
    use rustix::termios;
    match termios::tcgetattr(file) {
        Ok(mut t) => {
            t.make_raw();
            termios::tcsetattr(file, termios::OptionalActions::Now, &t)?;
            Ok(())
        }
        // Not a terminal (a FIFO or a plain file in tests): nothing to configure.
        Err(rustix::io::Errno::NOTTY) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A listening endpoint (used by the simulated host and the test proxy).
#[derive(Debug)]
pub enum Listener {
    /// Unix socket.
    Unix(tokio::net::UnixListener, String),
    /// TCP.
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Binds `addr` (an existing unix socket file is replaced).
    ///
    /// # Errors
    /// I/O errors; serial addresses cannot listen.
    pub async fn bind(addr: &Address) -> std::io::Result<Self> {
        match addr {
            Address::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Ok(Self::Unix(tokio::net::UnixListener::bind(p)?, p.clone()))
            }
            Address::Tcp(a) => Ok(Self::Tcp(tokio::net::TcpListener::bind(a).await?)),
            Address::Serial(_) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "cannot listen on a serial device",
            )),
        }
    }

    /// The bound address (with the real port for `tcp:...:0`).
    ///
    /// # Errors
    /// I/O errors.
    pub fn local(&self) -> std::io::Result<Address> {
        match self {
            Self::Unix(_, p) => Ok(Address::Unix(p.clone())),
            Self::Tcp(l) => Ok(Address::Tcp(l.local_addr()?.to_string())),
        }
    }

    /// Accepts one connection.
    ///
    /// # Errors
    /// I/O errors.
    pub async fn accept(&self) -> std::io::Result<BoxStream> {
        match self {
            Self::Unix(l, _) => Ok(Box::pin(l.accept().await?.0)),
            Self::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok(Box::pin(s))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_reject_junk() {
        assert_eq!("unix:/tmp/x".parse(), Ok(Address::Unix("/tmp/x".into())));
        assert_eq!(
            "tcp:127.0.0.1:9".parse(),
            Ok(Address::Tcp("127.0.0.1:9".into()))
        );
        assert_eq!(
            "serial:/dev/ttyS1".parse(),
            Ok(Address::Serial("/dev/ttyS1".into()))
        );
        assert!("udp:x".parse::<Address>().is_err());
        assert!("unix:".parse::<Address>().is_err());
        assert!("nothing".parse::<Address>().is_err());
    }
}
