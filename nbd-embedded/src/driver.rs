//! What both shells share: acting on the core's events against a
//! [`BlockStorage`], and producing the bytes of outgoing payloads one block
//! at a time.

use embedded_sdmmc::BlockDevice;
use nbd_core::export::Catalog;
use nbd_core::server::{
    CloseReason, CompletionError, Connection, Event, Payload, ProtocolError, ReadOutcome, Request,
    RequestId,
};
use nbd_core::wire::{ErrorCode, ExtDescriptor};

use crate::storage::{BlockStorage, zeroes};

/// Why a connection ended other than by the client's goodbye.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error<T> {
    /// The transport failed.
    Transport(T),
    /// The client broke the protocol (hard disconnect).
    Protocol(ProtocolError),
    /// The core refused a completion (a bug in this crate).
    Completion(CompletionError),
    /// The card failed during a read answered with a simple reply, whose
    /// header already promised the data: the connection must close.
    Storage,
    /// The client asked for TLS, which these shells do not offer.
    Tls,
    /// A message's header does not fit the transport's send buffer.
    SendBufferTooSmall,
}

impl<T> From<ProtocolError> for Error<T> {
    fn from(error: ProtocolError) -> Self {
        Self::Protocol(error)
    }
}

impl<T> From<CompletionError> for Error<T> {
    fn from(error: CompletionError) -> Self {
        Self::Completion(error)
    }
}

impl<T: core::fmt::Debug> core::fmt::Display for Error<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Transport(error) => write!(f, "transport failed: {error:?}"),
            Self::Protocol(error) => write!(f, "protocol error: {error}"),
            Self::Completion(error) => write!(f, "completion refused: {error}"),
            Self::Storage => f.write_str("storage failed during a simple-reply read"),
            Self::Tls => f.write_str("client started TLS, which is not supported"),
            Self::SendBufferTooSmall => f.write_str("send buffer too small for a message"),
        }
    }
}

impl<T: core::fmt::Debug> core::error::Error for Error<T> {}

/// A payload being sent: read data (streamed from the card) or zeroes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Outgoing {
    /// The streamed read, or `None` for zero padding of a hole.
    read: Option<RequestId>,
    offset: u64,
    remaining: u64,
    /// The card failed at this offset: the rest goes out as zeroes.
    failed: Option<(ErrorCode, u64)>,
}

/// A connection and the storage it serves.
#[derive(Debug)]
pub(crate) struct Driver<C, D, const REQUESTS: usize, const BUFFER: usize> {
    pub(crate) conn: Connection<C, REQUESTS, BUFFER>,
    pub(crate) out: Option<Outgoing>,
    _device: core::marker::PhantomData<D>,
}

impl<C: Catalog, D: BlockDevice, const REQUESTS: usize, const BUFFER: usize>
    Driver<C, D, REQUESTS, BUFFER>
{
    pub(crate) fn new(conn: Connection<C, REQUESTS, BUFFER>) -> Self {
        Self {
            conn,
            out: None,
            _device: core::marker::PhantomData,
        }
    }

    /// The client closed its side (a read gave 0 bytes): tells the core,
    /// as the std shells do. The core warns when the session was unfinished;
    /// either way nothing more comes, so the shell stops serving.
    pub(crate) fn end_of_input(&self) {
        match self.conn.end_of_input() {
            Ok(()) => info!("client closed the stream after ending the session"),
            Err(_) => info!("client closed the stream"),
        }
    }

    /// Feeds `input` to the core and acts on every event. Returns the bytes
    /// consumed and, when the session ended, why.
    pub(crate) fn input<T>(
        &mut self,
        storage: &mut BlockStorage<D>,
        mut input: &[u8],
    ) -> Result<(usize, Option<CloseReason>), Error<T>> {
        let mut consumed = 0;
        loop {
            let step = self.conn.process(input)?;
            consumed += step.consumed;
            input = &input[step.consumed..];
            let Some(event) = step.event else {
                return Ok((consumed, None));
            };
            match event {
                Event::Request(request) => self.request(storage, request)?,
                Event::WriteData {
                    id,
                    offset,
                    data,
                    remaining,
                } => {
                    let mut result = storage.write_piece(offset, data, remaining);
                    if remaining == 0 && result.is_ok() {
                        result = storage.write_back();
                    }
                    match result {
                        Err(_) => {
                            warn!("write {} failed at the card", id.to_bits());
                            storage.invalidate();
                            self.conn.complete(id, Err(ErrorCode::Io))?;
                        }
                        Ok(()) if remaining == 0 => self.conn.complete(id, Ok(()))?,
                        Ok(()) => {}
                    }
                }
                Event::ExportSelected { index, size, .. } => {
                    info!("client selected export {} ({} bytes)", index, size);
                }
                Event::StartTls => return Err(Error::Tls),
                Event::Closed(reason) => return Ok((consumed, Some(reason))),
                _ => {}
            }
        }
    }

    fn request<T>(
        &mut self,
        storage: &mut BlockStorage<D>,
        request: Request,
    ) -> Result<(), Error<T>> {
        debug!("request {:?}", request);
        let io = |result: Result<(), D::Error>| result.map_err(|_| ErrorCode::Io);
        let outside = |offset: u64, length: u64| {
            offset
                .checked_add(length)
                .is_none_or(|end| end > storage.size())
        };
        match request {
            Request::Read { id, offset, length } => {
                let outcome = if outside(offset, length) {
                    ReadOutcome::Error(ErrorCode::Io)
                } else {
                    ReadOutcome::Streamed
                };
                self.conn.complete_read(id, outcome)?;
            }
            // The payload follows as WriteData.
            Request::Write {
                id, offset, length, ..
            } => {
                if outside(offset, length) {
                    self.conn.complete(id, Err(ErrorCode::NoSpace))?;
                }
            }
            Request::Flush { id } => self.conn.complete(id, io(storage.flush()))?,
            Request::WriteZeroes {
                id,
                offset,
                length,
                fast,
                ..
            } => {
                let result = if fast {
                    Err(ErrorCode::NotSupported)
                } else if outside(offset, length) {
                    Err(ErrorCode::NoSpace)
                } else {
                    io(storage.write_zeroes(offset, length))
                };
                self.conn.complete(id, result)?;
            }
            Request::Trim {
                id, offset, length, ..
            } => {
                let result = if outside(offset, length) {
                    Err(ErrorCode::NoSpace)
                } else {
                    io(storage.trim(offset, length))
                };
                if result.is_err() {
                    storage.invalidate();
                }
                self.conn.complete(id, result)?;
            }
            Request::Cache { id, .. } => {
                self.conn.complete(id, Ok(()))?;
            }
            Request::BlockStatus { id, length, .. } => {
                // Everything is allocated data on a card.
                self.conn
                    .complete_block_status(id, &[ExtDescriptor { length, status: 0 }])?;
            }
            other => self
                .conn
                .complete(other.id(), Err(ErrorCode::NotSupported))?,
        }
        Ok(())
    }

    /// The next message's header parts, when no payload is being sent.
    /// Its payload, if any, becomes the current outgoing payload; read data
    /// then starts from the card, not from a block `storage` cached before
    /// (another server sharing the card may have written it since).
    pub(crate) fn next_message(&mut self, storage: &mut BlockStorage<D>) -> Option<[&[u8]; 3]> {
        if self.out.is_some() {
            return None;
        }
        let transmit = self.conn.poll_transmit()?;
        self.out = match transmit.payload {
            Some(Payload::Data { id, offset, length }) => {
                storage.forget_clean();
                Some(Outgoing {
                    read: Some(id),
                    offset,
                    remaining: length,
                    failed: None,
                })
            }
            Some(Payload::Zeroes { length }) => Some(Outgoing {
                read: None,
                offset: 0,
                remaining: length,
                failed: None,
            }),
            None => None,
        };
        Some(transmit.parts)
    }

    /// The next bytes of the outgoing payload (at most one block), or
    /// `None` when no payload is being sent. Call [`advance`](Self::advance)
    /// with the bytes actually sent.
    pub(crate) fn payload<'s, T>(
        &mut self,
        storage: &'s mut BlockStorage<D>,
    ) -> Result<Option<&'s [u8]>, Error<T>> {
        let Some(out) = self.out.as_mut() else {
            return Ok(None);
        };
        let max = usize::try_from(out.remaining).unwrap_or(usize::MAX);
        if out.read.is_none() || out.failed.is_some() {
            return Ok(Some(zeroes(out.remaining)));
        }
        match storage.read_piece(out.offset, max) {
            Ok(piece) => Ok(Some(piece)),
            Err(_) => {
                warn!("read failed at the card at offset {}", out.offset);
                if !self.conn.features().structured_replies {
                    return Err(Error::Storage);
                }
                out.failed = Some((ErrorCode::Io, out.offset));
                Ok(Some(zeroes(out.remaining)))
            }
        }
    }

    /// Counts `sent` payload bytes as sent; at the end of a streamed read,
    /// ends it.
    pub(crate) fn advance<T>(&mut self, sent: usize) -> Result<(), Error<T>> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        out.offset += sent as u64;
        out.remaining -= sent as u64;
        if out.remaining > 0 {
            return Ok(());
        }
        let out = *out;
        self.out = None;
        if let Some(id) = out.read {
            let result = match out.failed {
                Some(failure) => Err(failure),
                None => Ok(()),
            };
            match self.conn.finish_streamed_read(id, result) {
                Err(CompletionError::NotRepresentable) => return Err(Error::Storage),
                other => other?,
            }
        }
        Ok(())
    }
}

/// Room at the end of the input `buffer[start..end]` for the next read,
/// once everything the core would take was given to it and every reply was
/// sent ([`nbd_core::shape::make_room`]); a buffer still full is an error.
/// Returns the new `(start, end)`.
pub(crate) fn make_room<T>(
    buffer: &mut [u8],
    start: usize,
    end: usize,
) -> Result<(usize, usize), Error<T>> {
    let (start, end) = nbd_core::shape::make_room(buffer, start, end);
    if end == buffer.len() {
        // The core holds back input only while replies wait to be sent,
        // and they were all sent.
        return Err(Error::Protocol(ProtocolError::Closed));
    }
    Ok((start, end))
}
