//! A connection's pipe for write payloads moved from the socket into a
//! file without passing through the server's memory: `splice` takes the
//! socket's pages into the pipe, and a second `splice` writes them into
//! the page cache (one copy, the kernel's, where reading into the input
//! buffer and then writing makes two). Used for large payloads to
//! backends that can write from a pipe (file exports), over plain sockets.
//!
//! What the pipe holds is bounded by its capacity (1 MiB where the system
//! allows, `fs.pipe-max-size`), and it is empty again before the
//! connection reads anything else.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::pipe::{PipeFlags, SpliceFlags};

/// Capacity asked for: 1 MiB, Linux's default `fs.pipe-max-size` (what an
/// unprivileged process may set); a smaller pipe still works, in more
/// steps.
const PIPE_BYTES: usize = 1 << 20;

/// A pipe and how many payload bytes it holds.
pub(super) struct PayloadPipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    held: usize,
}

impl PayloadPipe {
    /// A fresh, empty pipe (non-blocking both ends, closed on exec).
    pub(super) fn new() -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Refused above `fs.pipe-max-size`: the default capacity then.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_BYTES);
        let capacity = rustix::pipe::fcntl_getpipe_size(&write)?;
        Ok(Self {
            read,
            write,
            capacity,
            held: 0,
        })
    }

    /// Bytes the pipe holds.
    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// Room for more bytes.
    pub(super) fn room(&self) -> usize {
        self.capacity - self.held
    }

    /// The end storage takes the held bytes from.
    pub(super) fn output(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Moves up to `max` bytes (at most the room) the socket holds into
    /// the pipe without waiting: `Ok(0)` at the end of the client's input,
    /// `WouldBlock` when the socket holds nothing.
    pub(super) fn fill_from(&mut self, socket: BorrowedFd<'_>, max: usize) -> io::Result<usize> {
        let max = max.min(self.room());
        loop {
            match rustix::pipe::splice(
                socket,
                None,
                &self.write,
                None,
                max,
                SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
            ) {
                Ok(moved) => {
                    self.held += moved;
                    return Ok(moved);
                }
                Err(Errno::INTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Notes that storage took `length` held bytes (through
    /// [`output`](Self::output)).
    pub(super) fn stored(&mut self, length: usize) {
        self.held -= length.min(self.held);
    }

    /// Copies the next `buf.len()` held bytes (at most what is held) out
    /// of the pipe into `buf`.
    pub(super) fn take(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            match rustix::io::read(&self.read, &mut buf[filled..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    filled += n;
                    self.held -= n.min(self.held);
                }
                Err(Errno::INTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Drops every held byte (after storage failed): the pipe is empty
    /// again, or the error says why not.
    pub(super) fn discard(&mut self) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        while self.held > 0 {
            let n = self.held.min(scratch.len());
            self.take(&mut scratch[..n])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn moves_what_the_socket_holds_and_hands_it_out() {
        let (mut client, server) = std::os::unix::net::UnixStream::pair().expect("pair");
        server.set_nonblocking(true).expect("non-blocking");
        let mut pipe = PayloadPipe::new().expect("pipe");
        assert!(pipe.room() >= 4096);
        let error = pipe
            .fill_from(server.as_fd(), 100)
            .expect_err("empty socket");
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        client.write_all(&[1, 2, 3, 4, 5, 6]).expect("send");
        assert_eq!(pipe.fill_from(server.as_fd(), 4).expect("fill"), 4);
        assert_eq!(pipe.held(), 4);
        let mut first = [0u8; 3];
        pipe.take(&mut first).expect("take");
        assert_eq!(first, [1, 2, 3]);
        assert_eq!(pipe.fill_from(server.as_fd(), 100).expect("fill"), 2);
        assert_eq!(pipe.held(), 3);
        pipe.discard().expect("discard");
        assert_eq!(pipe.held(), 0);
        drop(client);
        assert_eq!(pipe.fill_from(server.as_fd(), 100).expect("end"), 0);
    }
}
