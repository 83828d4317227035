//! Issuing commands (spec: "Request types", "Command flags", "Block size
//! constraints", "Transmission flags") and ending the session.
//!
//! Every request is checked against what the server advertised before it
//! is queued: a command or flag it did not expose, a range past the end of
//! the export, misaligned or longer than the maximum block size gives a
//! [`UsageError`] and nothing is sent.

use super::connection::{Connection, Ending, Phase};
use super::inflight::{NewRequest, RequestId};
use super::{ExportInfo, UsageError};
use crate::wire::{Command, CommandFlags, HeaderStyle};

impl<const REQUESTS: usize, const BUFFER: usize> Connection<REQUESTS, BUFFER> {
    /// `NBD_CMD_READ` of `length` bytes at `offset`. Flags: `FUA`, `DF`
    /// (at most one content chunk), when advertised. The data comes as
    /// [`Event::ReadData`](super::Event::ReadData) and
    /// [`Event::ReadHole`](super::Event::ReadHole), then
    /// [`Event::Done`](super::Event::Done).
    pub fn read(
        &mut self,
        offset: u64,
        length: u64,
        flags: CommandFlags,
    ) -> Result<RequestId, UsageError> {
        self.submit(Command::Read, flags, offset, length)
    }

    /// `NBD_CMD_WRITE` of `length` bytes at `offset`: the shell sends the
    /// data after the header, when `poll_transmit` returns it with
    /// [`Payload::Data`](super::Payload::Data).
    pub fn write(&mut self, offset: u64, length: u64, fua: bool) -> Result<RequestId, UsageError> {
        self.submit(Command::Write, fua_flag(fua), offset, length)
    }

    /// `NBD_CMD_FLUSH`: every write completed so far becomes durable.
    pub fn flush(&mut self) -> Result<RequestId, UsageError> {
        self.submit(Command::Flush, CommandFlags::empty(), 0, 0)
    }

    /// `NBD_CMD_TRIM`: the range may be discarded.
    pub fn trim(&mut self, offset: u64, length: u64, fua: bool) -> Result<RequestId, UsageError> {
        self.submit(Command::Trim, fua_flag(fua), offset, length)
    }

    /// `NBD_CMD_CACHE`: the server may prefetch the range.
    pub fn cache(&mut self, offset: u64, length: u64) -> Result<RequestId, UsageError> {
        self.submit(Command::Cache, CommandFlags::empty(), offset, length)
    }

    /// `NBD_CMD_WRITE_ZEROES`. Flags: `FUA`, `NO_HOLE` (keep the range
    /// allocated), `FAST_ZERO` (fail with `NBD_ENOTSUP` unless fast), when
    /// advertised.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        length: u64,
        flags: CommandFlags,
    ) -> Result<RequestId, UsageError> {
        self.submit(Command::WriteZeroes, flags, offset, length)
    }

    /// `NBD_CMD_BLOCK_STATUS` for every selected metadata context; with
    /// `req_one` one extent each. Descriptors come as
    /// [`Event::BlockStatus`](super::Event::BlockStatus).
    pub fn block_status(
        &mut self,
        offset: u64,
        length: u64,
        req_one: bool,
    ) -> Result<RequestId, UsageError> {
        let flags = CommandFlags::empty().with_if(CommandFlags::REQ_ONE, req_one);
        self.submit(Command::BlockStatus, flags, offset, length)
    }

    /// `NBD_CMD_RESIZE` (experimental RESIZE extension) to `size` bytes,
    /// carried in the request's offset field. Until it is done, requests
    /// are checked against the smaller of the two sizes.
    pub fn resize(&mut self, size: u64) -> Result<RequestId, UsageError> {
        if self.resizing.is_some() {
            return Err(UsageError::ResizeInFlight);
        }
        let id = self.submit(Command::Resize, CommandFlags::empty(), size, 0)?;
        self.resizing = Some(id);
        Ok(id)
    }

    /// Ends the session gracefully: no new request is accepted,
    /// `NBD_CMD_DISC` goes out once every request in flight is answered,
    /// and the next `process` call (with no input, if none comes) returns
    /// [`Event::Closed`](super::Event::Closed). During negotiation, the
    /// same as [`abort`](Self::abort).
    pub fn disconnect(&mut self) -> Result<(), UsageError> {
        match self.phase {
            Phase::Greeting | Phase::Negotiating => {
                self.abort_negotiation();
                Ok(())
            }
            Phase::Transmission => {
                if self.ending == Ending::Open {
                    info!(
                        "disconnecting after {} requests in flight",
                        self.inflight.len()
                    );
                    self.ending = Ending::Disconnect;
                }
                Ok(())
            }
            Phase::Closed => Err(UsageError::Closing),
        }
    }

    /// Starts a graceful stop: the same call, with the same meaning, as the
    /// server side's [`shutdown`](crate::server::Connection::shutdown), so
    /// a shell stops either side alike. It is [`disconnect`](Self::disconnect)
    /// for a session still open, and does nothing once it is over.
    pub fn shutdown(&mut self) {
        if self.phase != Phase::Closed {
            // Only a closed session refuses a disconnect.
            let _ = self.disconnect();
        }
    }

    /// Ends the session as soon as the protocol allows: during negotiation
    /// `NBD_OPT_ABORT` once the current option is answered; during
    /// transmission `NBD_CMD_DISC` right after the queued headers (requests
    /// in flight still get their replies, which the server sends before
    /// closing).
    pub fn abort(&mut self) -> Result<(), UsageError> {
        match self.phase {
            Phase::Greeting | Phase::Negotiating => self.abort_negotiation(),
            Phase::Transmission => self.ending = Ending::Abort,
            Phase::Closed => return Err(UsageError::Closing),
        }
        info!("aborting the session");
        Ok(())
    }

    /// Checks and queues a request.
    fn submit(
        &mut self,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        length: u64,
    ) -> Result<RequestId, UsageError> {
        let export = match (self.phase, self.export) {
            (Phase::Transmission, Some(export)) if self.ending == Ending::Open => export,
            (Phase::Transmission | Phase::Closed, _) => return Err(UsageError::Closing),
            _ => return Err(UsageError::NotReady),
        };
        self.validate(&export, command, flags, offset, length)
            .inspect_err(|error| debug!("{:?} refused locally: {:?}", command, error))?;
        if self.inflight.is_full() {
            return Err(UsageError::Full);
        }
        let extended = self.header_style() == HeaderStyle::Extended;
        let flags = flags.with_if(
            CommandFlags::PAYLOAD_LEN,
            extended && command == Command::Write,
        );
        self.inflight
            .insert(NewRequest {
                command,
                flags,
                offset,
                length,
            })
            .ok_or(UsageError::Full)
    }

    /// The rules the spec sets for clients, in the order a caller fixes them.
    fn validate(
        &self,
        export: &ExportInfo,
        command: Command,
        flags: CommandFlags,
        offset: u64,
        length: u64,
    ) -> Result<(), UsageError> {
        let valid = match command {
            Command::Read => CommandFlags::DF,
            Command::WriteZeroes => CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
            Command::BlockStatus => CommandFlags::REQ_ONE,
            _ => CommandFlags::empty(),
        }
        .with(CommandFlags::FUA);
        if flags.without(valid) != CommandFlags::empty() {
            return Err(UsageError::InvalidFlags(flags.without(valid)));
        }
        for (flag, advertised) in [
            (CommandFlags::FUA, export.can_fua()),
            (CommandFlags::DF, export.can_df()),
            (CommandFlags::FAST_ZERO, export.can_fast_zero()),
        ] {
            if flags.contains(flag) && !advertised {
                return Err(UsageError::FlagNotAdvertised(flag));
            }
        }
        let advertised = command
            .required_flag()
            .is_none_or(|flag| export.flags.contains(flag))
            && (command != Command::BlockStatus || self.can_block_status());
        if !advertised {
            return Err(UsageError::NotAdvertised(command));
        }
        if command.changes_data() && export.is_read_only() {
            return Err(UsageError::ReadOnly);
        }
        let minimum = export.block_sizes.minimum;
        match command {
            Command::Flush => return Ok(()),
            Command::Resize if !offset.is_multiple_of(u64::from(minimum)) => {
                return Err(UsageError::Misaligned { minimum });
            }
            Command::Resize => return Ok(()),
            _ => {}
        }
        if length == 0 {
            return Err(UsageError::ZeroLength);
        }
        let size = match self.resizing.and_then(|id| self.inflight.get(id)) {
            Some(resize) => export.size.min(resize.offset),
            None => export.size,
        };
        let end = offset.checked_add(length).filter(|&end| end <= size);
        if end.is_none() {
            return Err(UsageError::OutOfRange);
        }
        // The server accepts a final partial block of an unaligned export.
        let unaligned = |value: u64| !value.is_multiple_of(u64::from(minimum));
        if unaligned(offset) || (unaligned(length) && end != Some(size)) {
            return Err(UsageError::Misaligned { minimum });
        }
        let mut maximum = if command.capped_by_maximum_block_size() {
            u64::from(export.block_sizes.maximum)
        } else {
            u64::MAX
        };
        if self.header_style() == HeaderStyle::Compact {
            maximum = maximum.min(u64::from(u32::MAX));
        }
        if length > maximum {
            return Err(UsageError::TooLarge { maximum });
        }
        Ok(())
    }
}

fn fua_flag(fua: bool) -> CommandFlags {
    CommandFlags::empty().with_if(CommandFlags::FUA, fua)
}
