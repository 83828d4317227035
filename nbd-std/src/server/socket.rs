//! The socket under a connection's stream, used directly where the
//! stream's bytes are the socket's (TCP and unix sockets, not TLS):
//! reading what it holds without a trip through the event loop, and
//! sending read data straight from a file's page cache.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::Interest;

/// Most bytes one `sendfile` moves (Linux's limit for one call).
const MAX_SENDFILE: usize = 0x7fff_f000;

/// A stream whose socket may be used directly.
pub(super) trait PlainSocket: Sync {
    /// The socket; `None` when the stream's bytes are not the socket's
    /// (TLS records), and everything must go through the stream.
    fn plain_fd(&self) -> Option<BorrowedFd<'_>>;

    /// Runs `send` (which must not wait) once the socket is writable,
    /// waiting for that through the event loop: `send` failing with
    /// `WouldBlock` means the socket was full after all.
    fn send_with<F>(&self, send: F) -> impl Future<Output = io::Result<usize>> + Send
    where
        F: FnMut(BorrowedFd<'_>) -> io::Result<usize> + Send;

    /// Tells the event loop that a read of our own on [`plain_fd`](Self::plain_fd)
    /// just found the socket empty (`EAGAIN`). The loop otherwise still
    /// holds the socket readable from the last time it looked, and its
    /// next wait for input would begin with a read that finds nothing
    /// (4 KiB writes at queue depth 32: 0.06 such `recv`s a request). Only
    /// for `EAGAIN`: forgetting a readiness whose bytes are still there
    /// would leave the loop asleep until more came.
    fn found_empty(&self);

    /// Waits until the socket has bytes to read (or its end), through the
    /// event loop, for reads of our own on [`plain_fd`](Self::plain_fd).
    fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send;
}

macro_rules! plain_socket {
    ($stream:ty) => {
        impl PlainSocket for $stream {
            fn plain_fd(&self) -> Option<BorrowedFd<'_>> {
                Some(self.as_fd())
            }

            fn send_with<F>(&self, mut send: F) -> impl Future<Output = io::Result<usize>> + Send
            where
                F: FnMut(BorrowedFd<'_>) -> io::Result<usize> + Send,
            {
                async move {
                    loop {
                        self.writable().await?;
                        // `try_io` forgets the readiness when `send` would
                        // block, so the next `writable` waits for real.
                        match self.try_io(Interest::WRITABLE, || send(self.as_fd())) {
                            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                            sent => return sent,
                        }
                    }
                }
            }

            fn found_empty(&self) {
                // `try_io` forgets the readiness it saw when the closure
                // would block; one that came since it was seen stays.
                let _ = self.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
                });
            }

            fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                self.readable()
            }
        }
    };
}

plain_socket!(tokio::net::TcpStream);
plain_socket!(tokio::net::UnixStream);

#[cfg(feature = "tls")]
impl<S: Sync> PlainSocket for tokio_rustls::server::TlsStream<S> {
    /// The socket carries records for the TLS session.
    fn plain_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn send_with<F>(&self, _send: F) -> impl Future<Output = io::Result<usize>> + Send
    where
        F: FnMut(BorrowedFd<'_>) -> io::Result<usize> + Send,
    {
        std::future::ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a TLS stream's bytes are sent through the session",
        )))
    }

    /// Never read directly: nothing to tell.
    fn found_empty(&self) {}

    /// Never read directly: the session reads the socket.
    fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a TLS stream's bytes are read through the session",
        )))
    }
}

/// What came to a socket within a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arrival {
    /// No byte.
    Nothing,
    /// Bytes, fewer than asked for.
    Fewer,
    /// The bytes asked for.
    Enough,
}

/// What came to `fd` within `timeout`, the thread sleeping meanwhile
/// (`poll(2)`; only for a connection alone on its thread). With
/// `at_least` above 1 the thread sleeps until the socket holds that
/// many bytes or the timeout (`SO_RCVLOWAT`, for the call only; TCP
/// honours it, a unix socket wakes at the first byte). A failed `poll`
/// (a signal, say) counts as the timeout. Fails only if the socket's
/// low mark cannot be put back to one byte, as the event loop's waits
/// would then miss a short request.
pub(super) fn readable_within(
    fd: BorrowedFd<'_>,
    timeout: std::time::Duration,
    at_least: usize,
) -> io::Result<Arrival> {
    // A mark that cannot be set only wakes the thread sooner.
    let marked = at_least > 1 && set_receive_low_mark(fd, at_least).is_ok();
    let came = poll_readable(fd, timeout);
    if marked {
        set_receive_low_mark(fd, 1)?;
    }
    Ok(if came {
        Arrival::Enough
    } else if marked && poll_readable(fd, std::time::Duration::ZERO) {
        Arrival::Fewer
    } else {
        Arrival::Nothing
    })
}

/// Whether `fd` is readable within `timeout` (at its low mark).
fn poll_readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> bool {
    let timeout = rustix::event::Timespec {
        tv_sec: timeout.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: timeout.subsec_nanos().into(),
    };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
}

/// Sets the bytes `fd` must hold before it reads as readable
/// (`SO_RCVLOWAT`; rustix has no call for it).
fn set_receive_low_mark(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is an open socket for the call, and the option's value
    // is a `c_int` that outlives it, its size given.
    #[allow(unsafe_code)]
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends all of `slices` (consuming them) with `MSG_MORE`: more follows
/// at once, so the kernel holds a short header back to leave with the
/// data after it. Returns the bytes sent.
pub(super) async fn send_all_more<S: PlainSocket>(
    socket: &S,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<usize> {
    let mut sent = 0;
    while !slices.is_empty() {
        let batch = slices.len().min(super::connection::MAX_IOVECS);
        let written = socket
            .send_with(|fd| {
                rustix::net::sendmsg(
                    fd,
                    &slices[..batch],
                    &mut Default::default(),
                    rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            })
            .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
        sent += written;
    }
    Ok(sent)
}

/// Sends `length` bytes of `file` from `offset` with `sendfile`: from the
/// page cache into the socket, without a copy of the server's own. A file
/// that ends before is an error: a reply's header already promised the
/// bytes.
pub(super) async fn send_file<S: PlainSocket>(
    socket: &S,
    file: BorrowedFd<'_>,
    mut offset: u64,
    length: u64,
) -> io::Result<()> {
    let end = offset.saturating_add(length);
    while offset < end {
        let count = usize::try_from(end - offset).map_or(MAX_SENDFILE, |n| n.min(MAX_SENDFILE));
        let sent = socket
            .send_with(|fd| {
                rustix::fs::sendfile(fd, file, Some(&mut offset), count).map_err(io::Error::from)
            })
            .await?;
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file ended before a read's data was sent",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A pair of connected unix sockets: a tokio end and a std end.
    fn pair() -> (tokio::net::UnixStream, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        (
            tokio::net::UnixStream::from_std(ours).expect("tokio stream"),
            theirs,
        )
    }

    #[test]
    fn readable_within_waits_for_bytes_or_the_timeout() {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let began = std::time::Instant::now();
        assert_eq!(
            readable_within(ours.as_fd(), std::time::Duration::from_millis(2), 1).expect("poll"),
            Arrival::Nothing
        );
        assert!(began.elapsed() >= std::time::Duration::from_millis(2));
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            theirs.write_all(b"x").expect("write");
            theirs
        });
        // Well within the wait: the byte ends it.
        let began = std::time::Instant::now();
        assert_eq!(
            readable_within(ours.as_fd(), std::time::Duration::from_secs(10), 1).expect("poll"),
            Arrival::Enough
        );
        assert!(began.elapsed() < std::time::Duration::from_secs(5));
        let theirs = writer.join().expect("writer");
        drop(theirs);
        // A closed peer reads as the end of the stream: readable too.
        let mut byte = [0u8; 1];
        (&ours).read_exact(&mut byte).expect("the byte");
        assert_eq!(
            readable_within(ours.as_fd(), std::time::Duration::from_millis(1), 1).expect("poll"),
            Arrival::Enough
        );
    }

    #[test]
    fn a_wait_for_more_bytes_sleeps_through_fewer_and_leaves_the_mark_at_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let mut theirs =
            std::net::TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (ours, _) = listener.accept().expect("accept");
        theirs.set_nodelay(true).expect("nodelay");
        let wait = std::time::Duration::from_millis(20);
        let began = std::time::Instant::now();
        assert_eq!(
            readable_within(ours.as_fd(), wait, 64).expect("poll"),
            Arrival::Nothing
        );
        assert!(began.elapsed() >= wait);
        // Fewer bytes than asked for: the wait runs to its end.
        theirs.write_all(&[1; 28]).expect("write");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let began = std::time::Instant::now();
        assert_eq!(
            readable_within(ours.as_fd(), wait, 64).expect("poll"),
            Arrival::Fewer
        );
        assert!(began.elapsed() >= wait, "woke for 28 of 64 bytes");
        assert!(
            poll_readable(ours.as_fd(), std::time::Duration::ZERO),
            "the mark is back at one byte, for the event loop's waits"
        );
        // Enough bytes end the wait.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            theirs.write_all(&[2; 36]).expect("write");
            theirs
        });
        let began = std::time::Instant::now();
        assert_eq!(
            readable_within(ours.as_fd(), std::time::Duration::from_secs(10), 64).expect("poll"),
            Arrival::Enough
        );
        assert!(began.elapsed() < std::time::Duration::from_secs(5));
        drop(writer.join().expect("writer"));
    }

    #[tokio::test]
    async fn a_header_then_file_data_arrive_in_order_past_a_full_socket() {
        let mut file = tempfile::tempfile().expect("tempfile");
        // Larger than a unix socket's buffer: sending must wait for the
        // reader, through the event loop.
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        file.write_all(&data).expect("write");
        let (ours, mut theirs) = pair();
        let offset = 4096;
        let length = data.len() as u64 - offset - 100;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).expect("read");
            got
        });
        let header = b"header";
        let sent = send_all_more(&ours, &mut [IoSlice::new(header)])
            .await
            .expect("header");
        assert_eq!(sent, header.len());
        send_file(&ours, file.as_fd(), offset, length)
            .await
            .expect("file data");
        drop(ours);
        let got = reader.join().expect("reader");
        assert_eq!(&got[..header.len()], header);
        assert!(got[header.len()..] == data[offset as usize..(offset + length) as usize]);
    }

    #[tokio::test]
    async fn bytes_after_a_socket_found_empty_still_wake_the_event_loop() {
        use tokio::io::AsyncReadExt;
        let (mut ours, mut theirs) = pair();
        // The event loop sees the socket readable; a read of our own
        // takes the byte and finds nothing after it.
        theirs.write_all(b"a").expect("write");
        ours.readable().await.expect("readable");
        let mut buf = [0u8; 8];
        let fd = ours.as_fd();
        let read = rustix::net::recv(fd, &mut buf, rustix::net::RecvFlags::DONTWAIT);
        assert_eq!(read.map(|(n, _)| n), Ok(1));
        let read = rustix::net::recv(fd, &mut buf, rustix::net::RecvFlags::DONTWAIT);
        assert_eq!(read.map(|(n, _)| n), Err(rustix::io::Errno::AGAIN));
        ours.found_empty();
        let short = std::time::Duration::from_millis(20);
        assert!(
            tokio::time::timeout(short, ours.readable()).await.is_err(),
            "the stale readiness was forgotten"
        );
        theirs.write_all(b"b").expect("write");
        let long = std::time::Duration::from_secs(10);
        let n = tokio::time::timeout(long, ours.read(&mut buf))
            .await
            .expect("woken by the new byte")
            .expect("read");
        assert_eq!(&buf[..n], b"b");
    }

    #[tokio::test]
    async fn a_file_shorter_than_promised_is_an_error() {
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(&[7u8; 1000]).expect("write");
        let (ours, _theirs) = pair();
        let error = send_file(&ours, file.as_fd(), 500, 1000)
            .await
            .expect_err("short file");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
